"""Fused kernels that `lsd_jax` can switch to by config (docs/DESIGN.md section 7).

The place for Pallas kernels of the hot paths (temporal attention over the ring-buffer cache,
spatial flash attention, fused LayerNorm + adaLN modulate) and jax-triton kernels where Triton is
the better tool, each next to the pure-JAX reference it is tested against (`interpret=True` on
CPU; jax-triton imported lazily and only on GPU). A kernel registers itself with
`lsd_jax.attention.register` under a name starting with `pallas`, and `model.attention_impl`
selects it; no kernel is registered yet, so the pure-JAX `xla` path is the one in use.
"""
