"""Interop with PyTorch and Oasis, apart from the JAX core of `lsd_jax`.

- `torch_ref/`: the model, VAE, diffusion formulas, streaming step and Oasis sampling loop written
  again in PyTorch (the reference the JAX code is checked against);
- `convert.py`: Oasis / torch state dicts <-> Flax NNX parameters;
- `parity.py`: `lsd parity`: the JAX model against its torch reference on the same weights and
  noise;
- `oasis.py`: Oasis-500M as an action-conditioned world model (`lsd oasis`).

Nothing in the core imports this package; it imports the core.
"""
