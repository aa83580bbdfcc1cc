"""Model checkpoints: save, load into a model built from the stored config, and the errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx

from lsd_jax.checkpoint import load_model, save_model
from lsd_jax.config import load_config
from lsd_jax.errors import CheckpointError
from lsd_jax.model import DiT, randomize

SMALL = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
         "model.depth=1", "model.prompt_dim=8"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = load_config(CONFIGS / "tiny.py", SMALL)
    model = randomize(DiT(cfg.model, rngs=nnx.Rngs(0)), seed=3)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(directory, cfg, model)
    return cfg, model, directory


def test_round_trip_is_exact(saved):
    cfg, model, directory = saved
    cfg2, model2 = load_model(directory)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(model2)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (1, 3, 16, 16, 3))
    kwargs = dict(cond_bthwc=jax.random.normal(k[1], (1, 3, 16, 16, 3)),
                  step_size_bt=jnp.full((1, 3), 0.25), prompt_bp=jax.random.normal(k[2], (1, 8)))
    time_bt = jnp.asarray([[900.0, 400.0, 20.0]])
    out = model(x, time_bt, **kwargs)
    assert float(jnp.std(out)) > 0.1
    np.testing.assert_array_equal(np.asarray(model2(x, time_bt, **kwargs)), np.asarray(out))


def test_errors_name_the_problem(saved, tmp_path):
    cfg, model, directory = saved
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_model(directory, cfg, model)
    with pytest.raises(CheckpointError, match="weights do not fit the config"):
        load_model(directory, ["model.hidden_size=64"])
    meta = json.loads((directory / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99, expected 'lsd-jax-model' version 1"):
        load_model(other)
