"""ModernBERT: a pre-norm encoder with rotary positions, GLU feed-forward and alternating global / local attention.

No Flax ModernBERT ever existed in Transformers; the parameter tree is named so that each path maps
onto the PyTorch state-dict key of ModernBertFor* through `checkpoint_io.pytorch_key` (e.g.
`model/layers/1/attn/Wqkv/kernel` <-> `model.layers.1.attn.Wqkv.weight`). Semantics follow
Transformers' PyTorch `modeling_modernbert.py`:

- embeddings: token embedding -> LayerNorm -> dropout (no position embedding: RoPE in attention);
- layer i: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)); layer 0 has no attn_norm;
- attention: fused `Wqkv`, rotary positions with the layer's theta, softmax over keys; a local
  (sliding) layer sees only keys within `local_attention // 2` positions on either side;
- MLP: `Wi` -> split into (input, gate) -> act(input) * gate -> `Wo`;
- `final_norm` after the last layer; LayerNorms and linear layers without biases unless the
  config's `norm_bias`, `attention_bias`, `mlp_bias`, `classifier_bias`, `decoder_bias` say so;
- heads: `head` (dense -> classifier activation -> norm), then `classifier` or the tied `decoder`.

This is the padded path (every row has L positions, padding keys masked out). Transformers' unpadded
path (flash attention) gives the same values on real tokens: rotary scores depend only on the
distance between positions, and so does the sliding window. The masked-LM head scores every
position (Transformers' `sparse_prediction` is a PyTorch-only speed-up).

Config differences between Transformers versions: 4.x has `global_attn_every_n_layers`,
`global_rope_theta`, `local_rope_theta`; 5.x has `layer_types` and `rope_parameters` (per layer
type). Both are read. ModernBERT takes no token type ids; `token_type_ids` is accepted and ignored.

Shapes: B batch, L sequence length, H hidden size, N heads, D head size, I intermediate size,
V vocabulary, C labels.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_finetune.modeling import Family, Output, layer, register, register_family
from flax_finetune.modeling.bert import _split_span_logits, activation, padding_mask

Array = Any

GLOBAL, LOCAL = "full_attention", "sliding_attention"  # Transformers 5's layer type names


# --------------------------------------------------------------------------- config readers (4.x and 5.x)


def layer_type(config, index: int) -> str:
    """GLOBAL or LOCAL for layer `index`: `layer_types` (5.x), else every n-th layer global from 0 (4.x)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return LOCAL if index % config.global_attn_every_n_layers else GLOBAL


def rope_theta(config, kind: str) -> float:
    """The rotary base of a GLOBAL or LOCAL layer: `rope_parameters` (5.x), else global/local_rope_theta (4.x)."""
    parameters = getattr(config, "rope_parameters", None)
    if parameters:
        rope = parameters[kind]
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"ModernBERT: rope_type {rope['rope_type']!r} is not supported, only 'default'")
        return rope["rope_theta"]
    if getattr(config, "rope_scaling", None):
        raise ValueError("ModernBERT: rope_scaling is not supported")
    if kind == LOCAL and config.local_rope_theta is not None:
        return config.local_rope_theta
    return config.global_rope_theta


def _truncated_normal(config, std: float) -> Callable:
    """Transformers' ModernBERT initialisation: normal(0, std) cut at +-initializer_cutoff_factor std."""
    cutoff = 3.0 if config.initializer_cutoff_factor is None else config.initializer_cutoff_factor
    return nn.initializers.truncated_normal(stddev=std, lower=-cutoff, upper=cutoff)


def _in_init(config) -> Callable:
    return _truncated_normal(config, config.initializer_range)


def _out_init(config) -> Callable:
    return _truncated_normal(config, config.initializer_range / math.sqrt(2.0 * config.num_hidden_layers))


def _norm(config, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.norm_eps, use_bias=config.norm_bias, dtype=dtype, name=name)


# --------------------------------------------------------------------------- rotary positions and masks


def rotary(position_ids: Array, head_size: int, theta: float) -> tuple[Array, Array]:
    """cos and sin [B, L, 1, D] (float32) of positions [B, L] for a rotary base `theta`."""
    inverse_frequency = 1.0 / (theta ** (jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size))
    angles = position_ids[..., None].astype(jnp.float32) * inverse_frequency  # [B, L, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(states: Array, cos: Array, sin: Array) -> Array:
    """Rotate queries or keys [B, L, N, D] by their positions (in float32, as Transformers does)."""
    dtype = states.dtype
    states = states.astype(jnp.float32)
    first, second = jnp.split(states, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    return (states * cos + rotated_half * sin).astype(dtype)


def sliding_window_mask(length: int, half_window: int) -> Array:
    """Boolean [1, 1, L, L]: True where |query - key| <= half_window."""
    positions = jnp.arange(length)
    return (jnp.abs(positions[:, None] - positions[None, :]) <= half_window)[None, None]


def attend_additive(
    query: Array, key: Array, value: Array, mask: Optional[Array], probs_dropout: nn.Dropout, deterministic: bool
) -> Array:
    """`bert.attend` with the mask added to the float32 scores (0 or the float32 minimum), as PyTorch's eager
    attention adds it: query [B, L, N, D], key and value [B, L, N, D], boolean mask -> [B, L, N, D].

    The two differ only on a query with no key to attend to, which sliding windows create (a padding
    query whose window holds only padding): the probabilities are uniform in both, but only the added
    mask lets gradients flow through that row's scores, as they do in Transformers' PyTorch model."""
    dtype = query.dtype
    scores = jnp.einsum("bqnd,bknd->bnqk", query / jnp.sqrt(query.shape[-1]).astype(dtype), key)  # [B, N, L, L]
    scores = scores.astype(jnp.float32)
    if mask is not None:
        scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    probs = probs_dropout(jax.nn.softmax(scores, axis=-1).astype(dtype), deterministic=deterministic)
    return jnp.einsum("bnqk,bknd->bqnd", probs, value)


def layer_masks(attention_mask: Optional[Array], length: int, config) -> dict[str, Optional[Array]]:
    """The attention mask of each layer type, broadcastable to [B, N, L, L] (None: attend everywhere)."""
    keys = padding_mask(attention_mask)
    window = sliding_window_mask(length, config.local_attention // 2)
    return {GLOBAL: keys, LOCAL: window if keys is None else keys & window}


# --------------------------------------------------------------------------- encoder


class ModernBertEmbeddings(nn.Module):
    """`tok_embeddings` -> `norm` -> dropout: ids [B, L] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool) -> Array:
        config = self.config
        hidden = nn.Embed(
            config.vocab_size, config.hidden_size, embedding_init=_in_init(config), dtype=self.dtype,
            name="tok_embeddings",
        )(input_ids)
        if config.pad_token_id is not None:  # PyTorch's nn.Embedding(padding_idx=...): no gradient to that row
            hidden = jnp.where((input_ids == config.pad_token_id)[..., None], jax.lax.stop_gradient(hidden), hidden)
        hidden = _norm(config, self.dtype, "norm")(hidden)
        return nn.Dropout(config.embedding_dropout)(hidden, deterministic=deterministic)


class ModernBertAttention(nn.Module):
    """Fused-projection self-attention with rotary positions: [B, L, H] -> [B, L, H].

    `kind` (GLOBAL or LOCAL) picks the rotary base; the caller passes the matching mask."""

    config: Any
    kind: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], position_ids: Array, deterministic: bool) -> Array:
        config = self.config
        heads = config.num_attention_heads
        if config.hidden_size % heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {heads}")
        head_size = config.hidden_size // heads
        dense = partial(nn.Dense, use_bias=config.attention_bias, dtype=self.dtype)
        qkv = dense(3 * config.hidden_size, kernel_init=_in_init(config), name="Wqkv")(hidden)
        qkv = qkv.reshape(qkv.shape[:2] + (3, heads, head_size))  # [B, L, 3, N, D]
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        cos, sin = rotary(position_ids, head_size, rope_theta(config, self.kind))
        context = attend_additive(
            apply_rotary(query, cos, sin),
            apply_rotary(key, cos, sin),
            value,
            mask,
            nn.Dropout(config.attention_dropout),
            deterministic,
        )
        output = dense(config.hidden_size, kernel_init=_out_init(config), name="Wo")(
            context.reshape(context.shape[:2] + (-1,))
        )
        return nn.Dropout(config.attention_dropout)(output, deterministic=deterministic)


class ModernBertMLP(nn.Module):
    """GLU feed-forward: `Wi` [H -> 2I] -> act(input) * gate -> dropout -> `Wo` [I -> H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        config = self.config
        dense = partial(nn.Dense, use_bias=config.mlp_bias, dtype=self.dtype)
        inputs, gate = jnp.split(
            dense(2 * config.intermediate_size, kernel_init=_in_init(config), name="Wi")(hidden), 2, axis=-1
        )
        hidden = nn.Dropout(config.mlp_dropout)(activation(config.hidden_activation)(inputs) * gate,
                                                deterministic=deterministic)
        return dense(config.hidden_size, kernel_init=_out_init(config), name="Wo")(hidden)


class ModernBertLayer(nn.Module):
    """Pre-norm layer: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)); layer 0 has no attn_norm."""

    config: Any
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, masks: dict, position_ids: Array, deterministic: bool) -> Array:
        config = self.config
        kind = layer_type(config, self.index)
        normed = hidden if self.index == 0 else _norm(config, self.dtype, "attn_norm")(hidden)
        hidden = hidden + ModernBertAttention(config, kind, self.dtype, name="attn")(
            normed, masks[kind], position_ids, deterministic
        )
        normed = _norm(config, self.dtype, "mlp_norm")(hidden)
        return hidden + ModernBertMLP(config, self.dtype, name="mlp")(normed, deterministic)


class ModernBertLayerStack(nn.Module):
    """`num_hidden_layers` layers named "0", "1", ... (PyTorch's `layers` ModuleList): [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, masks: dict, position_ids: Array, deterministic: bool) -> Array:
        for index in range(self.config.num_hidden_layers):
            hidden = layer(ModernBertLayer)(self.config, index, self.dtype, name=str(index))(
                hidden, masks, position_ids, deterministic
            )
        return hidden


class ModernBertModel(nn.Module):
    """The encoder: ids [B, L] -> final-normed hidden states [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        deterministic: bool = True,
    ) -> Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        length = input_ids.shape[-1]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        hidden = ModernBertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, deterministic)
        masks = layer_masks(attention_mask, length, self.config)
        hidden = ModernBertLayerStack(self.config, self.dtype, name="layers")(
            hidden, masks, jnp.asarray(position_ids), deterministic
        )
        return _norm(self.config, self.dtype, "final_norm")(hidden)

    def word_embedding(self) -> Array:
        """The token embedding table [V, H] (the tied decoder); call after `__call__`."""
        return self.variables["params"]["embeddings"]["tok_embeddings"]["embedding"]


# --------------------------------------------------------------------------- heads


class ModernBertPredictionHead(nn.Module):
    """`dense` -> classifier activation -> `norm`: [..., H] -> [..., H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        config = self.config
        hidden = nn.Dense(
            config.hidden_size, use_bias=config.classifier_bias, dtype=self.dtype, kernel_init=_out_init(config),
            name="dense",
        )(hidden)
        return _norm(config, self.dtype, "norm")(activation(config.classifier_activation)(hidden))


class _ModernBert(nn.Module):
    """Base of the task modules: the encoder under "model" (Transformers' base_model_prefix), then `head`."""

    config: Any
    dtype: Any = jnp.float32

    def encoder(self) -> ModernBertModel:
        return ModernBertModel(self.config, self.dtype, name="model")

    def classify(self, hidden: Array, deterministic: bool) -> Array:
        """`head` -> dropout -> `classifier`: [..., H] -> logits [..., C] (float32)."""
        config = self.config
        hidden = ModernBertPredictionHead(config, self.dtype, name="head")(hidden)
        hidden = nn.Dropout(config.classifier_dropout)(hidden, deterministic=deterministic)
        logits = nn.Dense(
            config.num_labels, dtype=self.dtype, kernel_init=_truncated_normal(config, config.hidden_size**-0.5),
            name="classifier",
        )(hidden)
        return logits.astype(jnp.float32)


def pool(hidden: Array, attention_mask: Optional[Array], pooling: str) -> Array:
    """[B, L, H] -> [B, H]: the first token ("cls") or the mean over real tokens ("mean")."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"classifier_pooling {pooling!r}: use 'cls' or 'mean'")
    if attention_mask is None:
        return hidden.mean(axis=1)
    weights = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    return (hidden * weights).sum(axis=1) / weights.sum(axis=1)


register_family("modernbert", Family(base_prefix="model", tied_pytorch_keys=("decoder.weight",)))


@register("modernbert", "sequence-classification")
class ModernBertForSequenceClassification(_ModernBert):
    """Pooled hidden state (`classifier_pooling`: cls or mean) -> head -> classifier. Logits [B, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        hidden = self.encoder()(input_ids, attention_mask, position_ids, deterministic)
        pooled = pool(hidden, attention_mask, self.config.classifier_pooling)
        return Output(logits=self.classify(pooled, deterministic))


@register("modernbert", "token-classification")
class ModernBertForTokenClassification(_ModernBert):
    """head -> classifier on every token. Logits [B, L, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        hidden = self.encoder()(input_ids, attention_mask, position_ids, deterministic)
        return Output(logits=self.classify(hidden, deterministic))


@register("modernbert", "question-answering")
class ModernBertForQuestionAnswering(_ModernBert):
    """head -> classifier [B, L, 2] on every token. start_logits, end_logits [B, L] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        hidden = self.encoder()(input_ids, attention_mask, position_ids, deterministic)
        return _split_span_logits(self.classify(hidden, deterministic), self.config.num_labels)


class ModernBertDecoder(nn.Module):
    """Hidden states [..., H] -> vocabulary scores [..., V] (+ `bias` with config.decoder_bias).

    With `tied_embedding` ([V, H], the token embeddings; the default) the projection is
    `hidden @ embedding.T` and no `kernel` of its own (PyTorch's `decoder.weight` is tied)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, tied_embedding: Optional[Array]) -> Array:
        config = self.config
        if tied_embedding is None:
            kernel = self.param("kernel", _out_init(config), (config.hidden_size, config.vocab_size))
        else:
            kernel = tied_embedding.T
        scores = hidden @ jnp.asarray(kernel, self.dtype)
        if config.decoder_bias:
            scores = scores + jnp.asarray(self.param("bias", nn.initializers.zeros, (config.vocab_size,)), self.dtype)
        return scores


@register("modernbert", "masked-lm")
class ModernBertForMaskedLM(_ModernBert):
    """head -> decoder (tied to the token embeddings by default) on every token. Logits [B, L, V] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        encoder = self.encoder()
        hidden = encoder(input_ids, attention_mask, position_ids, deterministic)
        hidden = ModernBertPredictionHead(self.config, self.dtype, name="head")(hidden)
        tied = encoder.word_embedding() if self.config.tie_word_embeddings else None
        logits = ModernBertDecoder(self.config, self.dtype, name="decoder")(hidden, tied)
        return Output(logits=logits.astype(jnp.float32))
