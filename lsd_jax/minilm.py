"""all-MiniLM-L6-v2 in Flax NNX: a sentence -> a unit float32 vector `[384]`.

The sentence-transformers model: a 6-layer BERT (hidden 384, 12 heads, intermediate 1536, exact
erf GELU, post-LayerNorm with eps 1e-12, learned absolute positions up to 512 and token types),
mean pooling of the last hidden states over the attention mask, then L2 normalisation. Weights and
tokenizer are the original `model.safetensors` and `tokenizer.json` (`lsd_jax.minilm_files` says
where they come from); tokenisation is the `tokenizers` package with truncation at 256 tokens,
as sentence-transformers does for this model.

    encoder = load_minilm_encoder()          # MiniLMPromptEncoder, a PromptEncoder
    vector_d = encoder.encode("a pencil sketch")

Token ids are padded to the smallest of a few fixed lengths (`LENGTH_BUCKETS`) that holds them, so
the jitted forward compiles once per bucket, not once per new prompt length.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd_jax.errors import PromptError
from lsd_jax.minilm_files import MINILM_ID, minilm_dir
from lsd_jax.prompt_encoder import PromptEncoder

MAX_LENGTH = 256
LENGTH_BUCKETS = (16, 32, 64, 128, 256)
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shapes of the BERT encoder; the defaults are all-MiniLM-L6-v2's `config.json`."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise PromptError(f"BERT hidden_size={self.hidden_size} is not divisible by "
                              f"num_heads={self.num_heads}")


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, precision=_HIGHEST, rngs=rngs)


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token type embeddings, then LayerNorm.

    ids and token type ids, int `[b, l]` -> `[b, l, d]`.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.word = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.position = nnx.Embed(cfg.max_positions, d, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, ids_bl: jax.Array, type_ids_bl: jax.Array) -> jax.Array:
        positions_l = jnp.arange(ids_bl.shape[1])
        x_bld = self.word(ids_bl) + self.position(positions_l)[None] + self.token_type(type_ids_bl)
        return self.norm(x_bld)


class BertLayer(nnx.Module):
    """Self-attention and a GELU MLP, each added back and post-LayerNormed.

    `x_bld [b, l, d]`, `mask_bl [b, l]` (1 for a token, 0 for padding) -> `[b, l, d]`.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.num_heads = cfg.num_heads
        self.query, self.key, self.value = (_linear(d, d, rngs) for _ in range(3))
        self.attn_out = _linear(d, d, rngs)
        self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.mlp_in = _linear(d, f, rngs)
        self.mlp_out = _linear(f, d, rngs)
        self.mlp_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x_bld: jax.Array, mask_bl: jax.Array) -> jax.Array:
        b, length, d = x_bld.shape
        h = self.num_heads

        def split(t):
            return t.reshape(b, length, h, d // h)

        q, k, v = split(self.query(x_bld)), split(self.key(x_bld)), split(self.value(x_bld))
        scores_bhqk = jnp.einsum("bqhe,bkhe->bhqk", q, k, precision=_HIGHEST) / np.sqrt(d // h)
        keep_b11k = mask_bl[:, None, None, :].astype(bool)
        scores_bhqk = jnp.where(keep_b11k, scores_bhqk, jnp.finfo(scores_bhqk.dtype).min)
        probs_bhqk = jax.nn.softmax(scores_bhqk, axis=-1)
        ctx_bld = jnp.einsum("bhqk,bkhe->bqhe", probs_bhqk, v, precision=_HIGHEST)
        ctx_bld = ctx_bld.reshape(b, length, d)
        x_bld = self.attn_norm(x_bld + self.attn_out(ctx_bld))
        hidden_blf = jax.nn.gelu(self.mlp_in(x_bld), approximate=False)
        return self.mlp_norm(x_bld + self.mlp_out(hidden_blf))


class MiniLM(nnx.Module):
    """The BERT encoder with sentence-transformers' mean pooling and L2 normalisation."""

    def __init__(self, cfg: BertConfig = BertConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def token_embeddings(self, ids_bl: jax.Array, mask_bl: jax.Array,
                         type_ids_bl: jax.Array | None = None) -> jax.Array:
        """int ids `[b, l]`, mask `[b, l]` (1 token, 0 padding) -> last hidden states
        `[b, l, d]`."""
        if type_ids_bl is None:
            type_ids_bl = jnp.zeros_like(ids_bl)
        x_bld = self.embeddings(ids_bl, type_ids_bl)
        for layer in self.layers:
            x_bld = layer(x_bld, mask_bl)
        return x_bld

    def __call__(self, ids_bl: jax.Array, mask_bl: jax.Array,
                 type_ids_bl: jax.Array | None = None) -> jax.Array:
        """int ids `[b, l]`, mask `[b, l]` -> sentence embeddings `[b, d]`, unit L2 norm."""
        x_bld = self.token_embeddings(ids_bl, mask_bl, type_ids_bl)
        weight_bl1 = mask_bl.astype(x_bld.dtype)[..., None]
        pooled_bd = (x_bld * weight_bl1).sum(1) / jnp.maximum(weight_bl1.sum(1), 1e-9)
        norm_b1 = jnp.linalg.norm(pooled_bd, axis=-1, keepdims=True)
        return pooled_bd / jnp.maximum(norm_b1, 1e-12)


# ----------------------------------------------------------------------------- weights


def _torch_names(cfg: BertConfig) -> dict[str, tuple[tuple, bool]]:
    """safetensors key -> (path of our parameter, whether the matrix is transposed)."""
    names = {
        "embeddings.word_embeddings.weight": (("embeddings", "word", "embedding"), False),
        "embeddings.position_embeddings.weight": (("embeddings", "position", "embedding"), False),
        "embeddings.token_type_embeddings.weight": (("embeddings", "token_type", "embedding"),
                                                    False),
        "embeddings.LayerNorm.weight": (("embeddings", "norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embeddings", "norm", "bias"), False),
    }
    ours = {"attention.self.query": "query", "attention.self.key": "key",
            "attention.self.value": "value", "attention.output.dense": "attn_out",
            "intermediate.dense": "mlp_in", "output.dense": "mlp_out"}
    norms = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "mlp_norm"}
    for i in range(cfg.num_layers):
        prefix = f"encoder.layer.{i}."
        for theirs, mine in ours.items():
            names[f"{prefix}{theirs}.weight"] = (("layers", i, mine, "kernel"), True)
            names[f"{prefix}{theirs}.bias"] = (("layers", i, mine, "bias"), False)
        for theirs, mine in norms.items():
            names[f"{prefix}{theirs}.weight"] = (("layers", i, mine, "scale"), False)
            names[f"{prefix}{theirs}.bias"] = (("layers", i, mine, "bias"), False)
    return names


# Keys of the file the sentence embedding does not use (BERT's pooler serves the CLS head).
_UNUSED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def minilm_from_tensors(tensors: dict[str, np.ndarray], cfg: BertConfig = BertConfig()) -> MiniLM:
    """A `MiniLM` holding the weights of a Hugging Face `BertModel` state dict (numpy arrays, keys
    like `encoder.layer.0.attention.self.query.weight`, Linear weights `[out, in]`). A missing or
    unknown key, or a wrong shape, is a `PromptError` naming it."""
    model = nnx.eval_shape(lambda: MiniLM(cfg, rngs=nnx.Rngs(0)))
    names = _torch_names(cfg)
    missing = sorted(set(names) - set(tensors))
    unknown = sorted(set(tensors) - set(names) - set(_UNUSED))
    if missing or unknown:
        raise PromptError(f"BERT weights: missing keys {missing[:5]}, unknown keys {unknown[:5]} "
                          f"(expected the {len(names)} keys of a {cfg.num_layers}-layer BertModel)")
    for key, (path, transpose) in names.items():
        array = np.asarray(tensors[key], np.float32)
        array = array.T if transpose else array
        node = model
        for part in path[:-1]:
            node = node[part] if isinstance(part, int) else getattr(node, part)
        param = getattr(node, path[-1])
        expected = tuple(param.get_value().shape)
        if expected != array.shape:
            raise PromptError(f"BERT weight {key!r} has shape {array.shape}"
                              f"{' (transposed)' if transpose else ''}, expected {expected}")
        param.set_value(jnp.asarray(array))
    return model


def load_minilm(path: str | Path) -> MiniLM:
    """The NNX model from an all-MiniLM-L6-v2 `model.safetensors` file."""
    from safetensors.numpy import load_file

    return minilm_from_tensors(load_file(str(path)))


# ----------------------------------------------------------------------------- prompt encoder


def _bucket(length: int, buckets: tuple[int, ...]) -> int:
    fits = [b for b in buckets if b >= length]
    if not fits:
        raise PromptError(f"{length} tokens, expected at most {max(buckets)} (the largest length "
                          f"bucket {buckets})")
    return min(fits)


class MiniLMPromptEncoder(PromptEncoder):
    """A `PromptEncoder` running `MiniLM` on `tokenizers` ids: `encode(prompt) -> [d]` float32,
    unit norm, cached (LRU) per prompt string.

    `tokenizer` is a `tokenizers.Tokenizer` (its own padding and truncation settings are replaced:
    truncation at `max_length` tokens, specials included, no padding); ids are padded to the
    smallest of `buckets` holding them, so the jitted forward compiles once per bucket. `identity`
    names the weights and tokenizer (recorded with models trained on this encoder).
    """

    def __init__(self, model: MiniLM, tokenizer, *, identity: str, max_length: int = MAX_LENGTH,
                 buckets: tuple[int, ...] = LENGTH_BUCKETS, cache_size: int = 1024):
        super().__init__(cache_size=cache_size)
        from tokenizers import Tokenizer

        if max(buckets) < max_length:
            raise PromptError(f"length buckets {buckets} do not hold max_length={max_length}")
        self.dim = model.cfg.hidden_size
        self.name, self.identity = "all-MiniLM-L6-v2", identity
        self.max_length = max_length
        self.buckets = tuple(sorted(buckets))
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        graphdef, self._state = nnx.split(model)
        self.traces = 0  # how many times the forward was traced (once per bucket and batch size)

        def forward(state, ids_bl, mask_bl):
            self.traces += 1
            return nnx.merge(graphdef, state)(ids_bl, mask_bl)

        self._forward = jax.jit(forward)

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and attention mask, int32 `[len(prompts), bucket]`, padded with 0 past each
        prompt's tokens (`[CLS] ... [SEP]`, at most `max_length` of them)."""
        encodings = self.tokenizer.encode_batch(list(prompts))
        length = _bucket(max(len(e.ids) for e in encodings), self.buckets)
        ids_bl = np.zeros((len(encodings), length), np.int32)
        mask_bl = np.zeros((len(encodings), length), np.int32)
        for i, e in enumerate(encodings):
            ids_bl[i, : len(e.ids)] = e.ids
            mask_bl[i, : len(e.ids)] = 1
        return ids_bl, mask_bl

    def embed_batch(self, prompts: list[str]) -> np.ndarray:
        """Uncached: float32 `[len(prompts), d]` through the jitted forward."""
        ids_bl, mask_bl = self.tokenize(prompts)
        return np.asarray(self._forward(self._state, ids_bl, mask_bl))

    def _embed(self, prompt: str) -> np.ndarray:
        return self.embed_batch([prompt])[0]


@functools.cache
def _load_encoder(directory: str) -> MiniLMPromptEncoder:
    from tokenizers import Tokenizer

    directory = Path(directory)
    return MiniLMPromptEncoder(load_minilm(directory / "model.safetensors"),
                               Tokenizer.from_file(str(directory / "tokenizer.json")),
                               identity=MINILM_ID)


def load_minilm_encoder() -> MiniLMPromptEncoder:
    """The all-MiniLM-L6-v2 prompt encoder from the verified files (`minilm_files.minilm_dir`,
    fetched on first use); one shared instance per directory in a process."""
    return _load_encoder(str(minilm_dir().resolve()))
