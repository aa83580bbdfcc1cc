"""Training metrics: TensorBoard events, `metrics.jsonl`, a console bar, samples and plots.

In: logged scalars per step (`Metrics.log`), the EMA parameters at sample steps
(`Metrics.sample`). Out, under the work directory (process 0 only):
    tb/                       TensorBoard scalars (loss, loss per noise-level bucket, grad norm,
                              learning rate, frames/s, tokens/s) and sample frame strips
    metrics.jsonl             one JSON line per logged step: the scalars and `batch_crcs`, the
                              fingerprints of the batches since the previous line (data order)
    samples/step_NNNNNNN.mp4  a clip of the procedural held-out split streamed by the EMA model:
                              input | output | target
    plots/loss.png            the loss curve so far
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lsd_jax.atomic import atomic_path, atomic_write_text
from lsd_jax.codec import make_codec
from lsd_jax.config import Config
from lsd_jax.model import abstract_model, model_from_params
from lsd_jax.progress import progress_bar
from lsd_jax.streaming import init_stream, make_step
from lsd_jax.video import Mp4Writer
from lsd_train.data import make_dataset
from lsd_train.latents import pixel_twin

SAMPLE_FPS = 8


class Metrics:
    """Writers for one run; every method is a no-op when `enabled` is False (other processes).
    `metrics.jsonl` keeps the lines of steps up to `start_step`, the step the run starts from."""

    def __init__(self, workdir: str | Path, cfg: Config, *, enabled: bool = True,
                 progress: bool = True, start_step: int = 0):
        self.workdir, self.cfg, self.enabled = Path(workdir), cfg, enabled
        self.show_progress = progress and enabled
        self.history: list[tuple[int, float]] = []
        self._writer = None
        self._codec = None  # a latent model's codec, for its samples
        self._said_no_codec = False
        self._heldout = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.workdir / "tb"))
            jsonl = self.workdir / "metrics.jsonl"
            if jsonl.exists():
                # Steps after the one the run (re)starts from were logged by a run that died
                # before saving them; they are about to be logged again.
                kept = [line for line in jsonl.read_text().splitlines(keepends=True)
                        if line.strip() and json.loads(line)["step"] <= start_step]
                atomic_write_text(jsonl, "".join(kept))  # a kill here keeps the old lines
            self._jsonl = jsonl.open("a")

    def progress(self, start: int, total: int):
        """Training progress on stderr (`lsd_jax.progress`): a context yielding a tracker whose
        `update(step, note)` takes the step reached and the loss text."""
        return progress_bar("train", total, start, enabled=self.show_progress)

    def log(self, step: int, values: dict[str, float], batch_crcs: list[int]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **values, "batch_crcs": batch_crcs}) + "\n")
        self._jsonl.flush()
        self.history.append((step, values["loss"]))

    def plot_loss(self) -> Path:
        """`plots/loss.png`: the logged loss against the step (log scale)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = self.workdir / "plots" / "loss.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        steps, losses = zip(*self.history, strict=True)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"{self.cfg.name}: train loss")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp)
        finally:
            plt.close(fig)
        return path

    def sample(self, step: int, ema_params: dict) -> Path | None:
        """Stream one held-out clip through the EMA model; write the video, a TensorBoard strip of
        its frames and the loss plot. Single-process runs only (the weights are gathered to one
        host); returns the video path."""
        if not self.enabled or jax.process_count() > 1 or not self._sample_codec():
            return None
        cond_thwc, target_thwc, prompt_p = self._heldout_clip()
        out_thwc = stream_clip(self.cfg, jax.device_get(ema_params), cond_thwc, prompt_p,
                               codec=self._codec)
        panel_thwc = np.concatenate([cond_thwc, out_thwc, target_thwc], axis=2)
        path = self.workdir / "samples" / f"step_{step:07d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = panel_thwc.shape[1:3]
        with Mp4Writer(path, SAMPLE_FPS, (w, h)) as video:
            for frame in panel_thwc:
                video.write(frame)
        strip_hwc = np.concatenate(list(panel_thwc), axis=0)
        self._writer.add_image("sample/input|output|target", strip_hwc, step, dataformats="HWC")
        if self.history:
            self.plot_loss()
        return path

    def _sample_codec(self) -> bool:
        """Whether samples can be made: a pixel model's always; a latent model's through the codec
        of `data.codec_dir` (loaded once), else never (said once)."""
        if self._codec is None and self.cfg.codec != "pixel":
            if not self.cfg.data.codec_dir:
                if not self._said_no_codec:
                    print(f"lsd train: no samples: codec={self.cfg.codec!r} decodes latents to "
                          "frames only with data.codec_dir=DIR", file=sys.stderr)
                    self._said_no_codec = True
                return False
            self._codec = make_codec(self.cfg, self.cfg.data.codec_dir)
        return True

    def _heldout_clip(self):
        """The first clip of the procedural held-out split (whatever the training source, so
        samples of every run are comparable and never training data), at the frame size of the
        codec's pixels for a latent model."""
        if self._heldout is None:
            cfg = self.cfg if self._codec is None else pixel_twin(self.cfg, self._codec.frame_hw)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                    source="procedural"))
            batch = next(iter(make_dataset(cfg, split="heldout", batch_size=1)))
            self._heldout = (batch["cond"][0], batch["target"][0],
                             batch["prompt"][0] if "prompt" in batch else None)
        return self._heldout

    def close(self) -> None:
        if self.enabled:
            if self.history:
                self.plot_loss()
            self._writer.close()
            self._jsonl.close()


def stream_clip(cfg: Config, params: dict, cond_thwc: np.ndarray,
                prompt_p: np.ndarray | None, *, codec=None) -> np.ndarray:
    """Restyle a uint8 clip `[T, H, W, 3]` frame by frame with the streaming step (what `lsd
    stream` runs), through `codec` (None: the config's pixel codec; a latent model's VAE codec);
    returns uint8 `[T, H, W, 3]`."""
    _, state = nnx.split(model_from_params(cfg.model, params))
    step = _stream_step(cfg, codec)
    stream = init_stream(cfg, 1, cfg.seed)
    prompt_bp = None if prompt_p is None else np.asarray(prompt_p)[None]
    extra = {} if codec is None else {"codec_params": codec.params}
    frames = []
    for frame_hwc in cond_thwc:
        stream, out_bhwc = step(state, stream, frame_hwc[None], prompt_bp, **extra)
        frames.append(np.asarray(out_bhwc[0]))
    return np.stack(frames)


@functools.cache
def _stream_step(cfg: Config, codec=None):
    """The jitted streaming step of `cfg` (through `codec`), built once per run (its graph does
    not change)."""
    return make_step(cfg, nnx.split(abstract_model(cfg.model))[0], codec=codec)
