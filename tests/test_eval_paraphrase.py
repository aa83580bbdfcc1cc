"""`lsd eval paraphrase`: every paraphrase row scored against every task's target, margins by
their definition, on a small random model (the shipped demo's margins: tests/test_eval.py)."""

from __future__ import annotations

import pytest
from flax import nnx

from lsd_jax.config import load_config
from lsd_jax.errors import ConfigError
from lsd_jax.prompt import make_prompt_encoder
from lsd_jax.resolve import untrained_model
from lsd_train import eval_data, evaluate
from lsd_train.eval_paraphrase import evaluate_paraphrases, paraphrase_markdown
from lsd_train.tasks import PARAPHRASES, TASK_NAMES

SMALL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.window=3"]


def _model(overrides):
    cfg = load_config("lsd_configs/tiny.py", [*SMALL, *overrides])
    graphdef, state = nnx.split(untrained_model(cfg, seed=4))
    return evaluate.EvalModel("small", "small", cfg, graphdef, state)


def test_paraphrase_rows_and_margins():
    model = _model([])
    result = evaluate_paraphrases(model, steps=1, clips=1, frames=3, progress=False)
    assert list(result["tasks"]) == list(TASK_NAMES)
    names, _, cond, target, _ = eval_data.heldout_pairs(model.cfg, clips=1, frames=3)
    row = result["tasks"]["sepia"]["paraphrases"][1]
    assert row["prompt"] == PARAPHRASES["sepia"][1]
    # The same row streamed alone: its PSNR against every task's target, the margin over the
    # nearest other task.
    prompt = make_prompt_encoder(model.cfg).encode_batch([row["prompt"]])
    out = evaluate.stream_batch(model, cond[:1], prompt, steps=1)[0]
    psnr = {n: evaluate.clip_psnr(out, target[i]) for i, n in enumerate(names)}
    other = max((n for n in psnr if n != "sepia"), key=psnr.get)
    assert row["psnr"] == pytest.approx(psnr["sepia"], abs=0.05)
    assert row["other_task"] == other and row["margin"] == pytest.approx(
        psnr["sepia"] - psnr[other], abs=0.1)
    margins = [p["margin"] for t in result["tasks"].values() for p in t["paraphrases"]]
    assert len(margins) == 2 * len(TASK_NAMES) and result["min_margin"] == min(margins)
    assert result["all_closer"] == (min(margins) > 0)
    table = paraphrase_markdown([result])
    assert table.count("(paraphrase)") == 18 and table.count("(trained)") == 9
    assert f"{row['margin']:+.2f}" in table


def test_a_model_without_prompts_is_refused():
    with pytest.raises(ConfigError, match="takes no prompt"):
        evaluate_paraphrases(_model(["model.prompt_dim=0"]), steps=1, clips=1, frames=2,
                             progress=False)
