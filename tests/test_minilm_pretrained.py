"""all-MiniLM-L6-v2 with its real weights and tokenizer (fetched on first use, no torch needed):
tokeniser edge cases, length buckets, the nearest trained prompt, and a DiT conditioned on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx

from lsd_jax.checkpoint import load_model, save_model
from lsd_jax.config import load_config
from lsd_jax.minilm import MiniLMPromptEncoder, load_minilm_encoder
from lsd_jax.minilm_files import MINILM_ID
from lsd_jax.model import DiT, randomize
from lsd_jax.prompt import encoder_from_record, make_prompt_encoder, nearest_prompt
from lsd_train.tasks import TASKS

CLS, SEP, UNK = 101, 102, 100
MINILM_CFG = ["model.frame_height=16", "model.frame_width=16", "model.hidden_size=32",
              "model.depth=1", "model.prompt_dim=384", "prompt.encoder=minilm"]


@pytest.fixture(scope="module")
def encoder() -> MiniLMPromptEncoder:
    return load_minilm_encoder()


def test_empty_prompt(encoder):
    assert encoder.tokenizer.encode("").ids == [CLS, SEP]
    vector = encoder.encode("")
    assert vector.shape == (384,) and vector.dtype == np.float32 and np.isfinite(vector).all()
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-6)
    assert float(vector @ encoder.encode("a pencil sketch")) < 0.5


def test_very_long_prompt_is_truncated_to_one_vector(encoder):
    ids = encoder.tokenizer.encode("painting " * 1000).ids
    assert len(ids) == 256 and ids[0] == CLS and ids[-1] == SEP and set(ids[1:-1]) == {4169}
    vector = encoder.encode("painting " * 1000)
    assert vector.shape == (384,)
    # 254 word tokens fit: the longer prompt is exactly the one cut there.
    np.testing.assert_array_equal(vector, encoder.encode("painting " * 254))
    assert np.abs(vector - encoder.encode("painting " * 200)).max() > 1e-4
    long = " ".join(f"frame {i} of a watercolor painting" for i in range(100))
    np.testing.assert_array_equal(encoder.encode(long),
                                  encoder.encode(long + " in thermal neon colours"))


def test_non_latin_text(encoder):
    tokens = encoder.tokenizer.encode("東京の夜景").tokens
    assert tokens[:4] == ["[CLS]", "東", "京", "の"]  # CJK characters are split one by one
    prompts = ["東京の夜景", "Привет, мир", "مرحبا بالعالم", "Καλημέρα κόσμε"]
    vectors = np.stack([encoder.encode(p) for p in prompts])
    for p in prompts:
        ids = encoder.tokenizer.encode(p).ids
        assert sum(i != UNK for i in ids[1:-1]) >= 2, (p, ids)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    cosines = vectors @ vectors.T
    assert cosines[~np.eye(len(prompts), dtype=bool)].max() < 0.95
    # Accents are stripped and case folded, as BERT-uncased does.
    np.testing.assert_array_equal(encoder.encode("Crème Brûlée"), encoder.encode("creme brulee"))


def test_new_prompts_of_one_bucket_do_not_recompile(encoder):
    encoder.encode("warm up the 16-token bucket")
    traces = encoder.traces
    for prompt in ("a charcoal drawing", "a blue hour city street", "an oil painting of fog",
                   "a neon sign reflected in rain", "children's crayon drawing"):
        encoder.encode(prompt)
    assert encoder.traces == traces


def test_nearest_trained_prompt_under_minilm(encoder):
    known = [t.prompt for t in TASKS]
    table = np.stack([encoder.encode(p) for p in known]).astype(np.float64)
    for prompt, want in (("a charcoal drawing", "a pencil sketch"),
                         ("an infrared heat map", "a thermal camera image"),
                         ("neon lights", "glowing neon edges on a dark scene")):
        nearest, similarity = nearest_prompt(encoder, prompt, known)
        cosines = table @ encoder.encode(prompt).astype(np.float64)
        assert nearest == want == known[int(np.argmax(cosines))]
        assert similarity == pytest.approx(cosines.max(), rel=1e-6) and 0.5 < similarity < 0.95


def test_paraphrases_read_as_their_task_and_unrelated_prompts_as_far(encoder):
    """Every held-out paraphrase is nearest a trained prompt of its own task, at or above
    NEAR_SIMILARITY; prompts unrelated to any task stay below it."""
    from lsd_jax.prompt import NEAR_SIMILARITY
    from lsd_train.tasks import PARAPHRASES, trained_prompts

    trained = trained_prompts(384, "all", phrasings=True)
    owner = {p: t.name for t in TASKS for p in (t.prompt, *t.phrasings)}
    for task, paraphrases in PARAPHRASES.items():
        for paraphrase in paraphrases:
            nearest, similarity = nearest_prompt(encoder, paraphrase, trained)
            assert owner[nearest] == task and similarity >= NEAR_SIMILARITY, (paraphrase, nearest,
                                                                               similarity)
    for unrelated in ("a cat wearing sunglasses", "a bowl of soup", "a photo of a dog"):
        assert nearest_prompt(encoder, unrelated, trained)[1] < NEAR_SIMILARITY - 0.1, unrelated


def test_a_dit_conditioned_on_minilm(tmp_path, encoder):
    cfg = load_config(CONFIGS / "tiny.py", MINILM_CFG)
    assert make_prompt_encoder(cfg) is encoder
    assert encoder_from_record({"encoder": "minilm", "id": MINILM_ID, "dim": 384}) is encoder
    save_model(tmp_path / "m", cfg, randomize(DiT(cfg.model, rngs=nnx.Rngs(0)), seed=1))
    cfg2, model = load_model(tmp_path / "m")
    assert cfg2.prompt.encoder == "minilm"
    prompt_bp = jnp.asarray(encoder.encode_batch(["a pencil sketch", "a thermal camera image"]))
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    x = jax.random.normal(k[0], (1, 2, 16, 16, 3))
    cond = jax.random.normal(k[1], (1, 2, 16, 16, 3))
    time_bt = jnp.asarray([[0.7, 0.3]])
    outs = [model(x, time_bt, cond_bthwc=cond, step_size_bt=jnp.full((1, 2), 0.25),
                  prompt_bp=prompt_bp[i : i + 1])
            for i in range(2)]
    assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-3
