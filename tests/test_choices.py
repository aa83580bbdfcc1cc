"""Each config choice is listed once (lsd_jax/config.py) and honoured where it is used."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx

from lsd_jax import model as model_lib
from lsd_jax.config import DTYPES, REMAT_POLICIES, dtype_of, load_config
from lsd_jax.streaming import init_stream

SMALL = ["model.frame_height=8", "model.frame_width=8", "model.patch_size=4",
         "model.hidden_size=32", "model.num_heads=2", "model.depth=1", "model.window=2",
         "model.use_step_size=false", "model.prompt_dim=0"]


def test_every_remat_name_has_a_policy():
    assert set(model_lib._CHECKPOINT_POLICIES) == set(REMAT_POLICIES) - {"none"}


@pytest.mark.slow
def test_remat_policies_compute_the_same_gradients():
    """Rematerialisation changes what is kept for the backward pass, never the values: the same
    weights give the same loss and gradients under every `model.remat_policy`."""
    cfg = load_config(CONFIGS / "tiny.py", SMALL)
    m = cfg.model
    _, params = nnx.split(model_lib.randomize(model_lib.DiT(m, rngs=nnx.Rngs(0)), seed=0))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(keys[0], (1, 3, *m.frame_shape))
    time = jax.random.uniform(keys[1], (1, 3), maxval=1000.0)
    cond = jax.random.normal(keys[2], (1, 3, m.frame_height, m.frame_width, m.cond_channels))
    results = {}
    for name in REMAT_POLICIES:
        graphdef = nnx.graphdef(model_lib.abstract_model(dataclasses.replace(m,
                                                                             remat_policy=name)))

        def loss(params, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, params)(x, time, cond_bthwc=cond) ** 2)

        results[name] = jax.jit(jax.value_and_grad(loss))(params)
    ref_loss, ref_grads = results["none"]
    for name, (loss, grads) in results.items():
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6), name
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                       err_msg=name)


def test_dtype_of_config_and_array_names():
    assert [dtype_of(name) for name in DTYPES] == [np.dtype(np.float32), np.dtype(jnp.bfloat16)]
    assert dtype_of("uint32") == np.uint32 and dtype_of("int32") == np.int32
    with pytest.raises(TypeError):
        dtype_of("float99")


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_dtype_is_honoured(dtype):
    cfg = load_config(CONFIGS / "tiny.py", [*SMALL, f"model.dtype={dtype}",
                                            f"model.param_dtype={dtype}"])
    model = model_lib.DiT(cfg.model, rngs=nnx.Rngs(0))
    kernels = [leaf for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)) if leaf.ndim == 2]
    assert kernels and all(k.dtype == dtype_of(dtype) for k in kernels)
    state = init_stream(cfg, 1, 0)
    assert state.cache_k.dtype == state.cache_v.dtype == dtype_of(dtype)
