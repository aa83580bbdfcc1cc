"""Fused kernels that `lsd_jax` can switch to by config (DESIGN.md section 7).

Pallas kernels for the hot paths (temporal attention over the ring-buffer cache, spatial flash
attention, fused LayerNorm + adaLN modulate) and jax-triton kernels where Triton is the better
tool. Each sits next to the pure-JAX reference it is tested against (with `interpret=True` on CPU);
jax-triton is imported lazily and only on GPU. Kernels register themselves with
`lsd_jax.attention.register` under their own names; the pure-JAX path stays the default wherever a
kernel is not faster.
"""
