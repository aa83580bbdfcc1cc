"""Training at scale (docs/DESIGN.md section 6).

Turns video clips into a checkpoint: a grain input pipeline (folders of video files decoded with
OpenCV, and procedural sources that need no download) with a paired-task layer producing
(input clip, target clip, prompt); the Diffusion Forcing + history augmentation + shortcut objective
from `lsd_jax`; a `jax.jit` train step sharded over a named `Mesh` (`data`, `fsdp`, `tensor`) with
donated state; optax (AdamW, warmup + cosine, clipping, EMA); orbax checkpoints that hold the data
iterator state, so a resumed run continues exactly; metrics for TensorBoard and a console bar.
"""
