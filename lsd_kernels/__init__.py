"""Fused kernels that `lsd_jax` can switch to by config (docs/DESIGN.md section 7).

The place for Pallas kernels of the hot paths (temporal attention over the ring-buffer cache,
spatial flash attention, fused LayerNorm + adaLN modulate) and jax-triton kernels where Triton is
the better tool, each next to the pure-JAX reference it is tested against (`interpret=True` on
CPU; jax-triton imported lazily and only on GPU).

A kernel implements one of the two seams, `lsd_jax.attention.AttentionImpl` (`spatial`,
`temporal_band`, `temporal_cache`) or `lsd_jax.norm.NormImpl` (`norm_modulate`,
`residual_norm_modulate`), and is a row of the kernel table in `lsd_jax/kernels.py` (name,
`module:attribute`, platforms, dtypes); `model.attention_impl` / `model.norm_impl` select it by
that name. Nothing registers itself on import, and nothing here is imported until selected.
`tests/test_attention_seam.py` runs every row against the reference.

- `flash_spatial`: spatial flash attention, RoPE in the kernel, forward and backward;
- `ring_temporal`: the streaming step's attention over the ring-buffer cache, read in place;
- `norm_modulate`: residual + LayerNorm + adaLN modulate fused;
- `triton_ring`: the ring attention as a `@triton.jit` kernel through jax-triton (CUDA only);
- `backends`: Triton, Mosaic TPU and the two interpreters; `impls`: the seams built from them;
- `tpu_aot`, `triton_aot`: ahead-of-time compiles for TPU topologies (libtpu) and sm_90 (triton)
  (`lsd kernels tpu-aot`, `lsd kernels triton-aot`);
- `bench`: `lsd bench kernels`.
"""
