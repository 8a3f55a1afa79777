"""T5, mT5 and UMT5 for conditional generation, one implementation configured per model type.

- `t5`: T5 v1.0 (ReLU, tied embeddings) or T5 v1.1 (gated GELU, separate lm_head), as the config says;
- `mt5`: T5 v1.1 under another name (always a separate lm_head, see `ties_output_to_embedding`);
- `umt5`: T5 v1.1 where every block owns its relative position table (`VARIANTS`).

The parameter tree is that of Transformers 4.x `FlaxT5ForConditionalGeneration` (and
`FlaxMT5ForConditionalGeneration`, the same class); its PyTorch names are those of
`T5/MT5/UMT5ForConditionalGeneration`:

    shared/embedding                                          [vocab, d_model]
    encoder/block/<i>/layer/0/{layer_norm, SelfAttention}     self-attention sublayer
    encoder/block/<i>/layer/1/{layer_norm, DenseReluDense}    feed-forward sublayer
    decoder/block/<i>/layer/0/{layer_norm, SelfAttention}
    decoder/block/<i>/layer/1/{layer_norm, EncDecAttention}   cross-attention sublayer
    decoder/block/<i>/layer/2/{layer_norm, DenseReluDense}
    {encoder,decoder}/final_layer_norm/weight
    lm_head/kernel                                            only when embeddings are not tied

In T5 and mT5 only block 0 of each stack owns `SelfAttention/relative_attention_bias`; the
bias it computes (with the attention mask folded in) is reused by every later block. In UMT5
every block owns one and computes its own bias.

Besides `__call__` (teacher-forced logits), the module has `encode`, `decode`,
`init_decoding_state` and `decode_step`, used through `module.apply(..., method=...)`,
so that generation (see `generation.py`) runs the encoder once and then one decoder
token per step against a key/value cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import Family, Output, layer, register, register_family
from .generation import update_cache

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.swish,
    "swish": nn.swish,
    "tanh": jnp.tanh,
}

# Additive bias for a masked attention position (scores are computed in float32).
MASKED = float(jnp.finfo(jnp.float32).min)


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask (True = may attend) -> float32 additive bias of the same shape (0 or MASKED)."""
    return jnp.where(mask, 0.0, MASKED).astype(jnp.float32)


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each relative position (key position - query position), int32 in [0, num_buckets).

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before.
    Causal (decoder): only keys at or before the query count; later ones share bucket 0.
    Within each half, the first `num_buckets // 4` (resp. `// 2`) distances get one bucket each and
    larger distances share logarithmically wider buckets, all distances >= max_distance the last one.
    """
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    exact_buckets = num_buckets // 2
    is_exact = distance < exact_buckets
    # Same float32 operations in the same order as the reference, so that distances on a bucket
    # boundary land in the same bucket.
    log_bucket = exact_buckets + (
        jnp.log(distance / exact_buckets)
        / jnp.log(max_distance / exact_buckets)
        * (num_buckets - exact_buckets)
    )
    log_bucket = jnp.minimum(log_bucket, num_buckets - 1)
    return (offset + jnp.where(is_exact, distance, log_bucket)).astype(jnp.int32)


def attend(query, keys, values, bias, dropout: nn.Dropout, deterministic: bool):
    """Softmax attention without scaling (T5 folds 1/sqrt(d) into its initialisation).

    query [batch, q_len, heads, d_kv], keys/values [batch, k_len, heads, d_kv],
    bias float32 broadcastable to [batch, heads, q_len, k_len] or None -> [batch, q_len, heads, d_kv].
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, keys).astype(jnp.float32)
    if bias is not None:
        scores = scores + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    weights = dropout(weights, deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, values)


class T5LayerNorm(nn.Module):
    """RMS norm without bias or mean subtraction, computed in float32; parameter `weight`."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        """hidden [..., d_model] -> same shape, in `dtype`."""
        weight = self.param("weight", nn.initializers.ones, (hidden.shape[-1],))
        hidden = hidden.astype(jnp.float32)
        variance = jnp.mean(jnp.square(hidden), axis=-1, keepdims=True)
        return (weight * (hidden / jnp.sqrt(variance + self.epsilon))).astype(self.dtype)


class T5Attention(nn.Module):
    """Multi-head attention with projections q, k, v, o (no biases) and, optionally, the relative position table."""

    config: Any
    has_relative_attention_bias: bool = False
    bidirectional: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        inner_dim = config.num_heads * config.d_kv
        factor = config.initializer_factor

        def dense(features, std):
            return nn.Dense(
                features, use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.normal(factor * std)
            )

        self.q = dense(inner_dim, (inner_dim * config.d_kv) ** -0.5)
        self.k = dense(inner_dim, inner_dim**-0.5)
        self.v = dense(inner_dim, inner_dim**-0.5)
        self.o = dense(config.d_model, inner_dim**-0.5)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = nn.Embed(
                config.relative_attention_num_buckets,
                config.num_heads,
                embedding_init=nn.initializers.normal(factor * inner_dim**-0.5),
                dtype=self.dtype,
            )
        self.dropout = nn.Dropout(config.dropout_rate, broadcast_dims=(0, 1))

    def relative_bias(self, query_positions: jax.Array, key_length: int) -> jax.Array:
        """query_positions [q_len] int -> float32 bias [1, heads, q_len, key_length] from the bucket table."""
        relative_position = jnp.arange(key_length, dtype=jnp.int32)[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(
            relative_position,
            bidirectional=self.bidirectional,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(buckets)  # [q_len, key_length, heads]
        return values.transpose(2, 0, 1)[None].astype(jnp.float32)

    def _split_heads(self, states):
        return states.reshape(states.shape[:2] + (self.num_heads, self.head_dim))

    def keys_values(self, states):
        """states [batch, length, d_model] -> (keys, values), each [batch, length, heads, d_kv]."""
        return self._split_heads(self.k(states)), self._split_heads(self.v(states))

    def __call__(self, hidden, *, bias, keys_values=None, cache=None, position=None, deterministic=True):
        """Attend from hidden [batch, q_len, d_model].

        keys_values: precomputed (keys, values) to attend to (cross-attention); None for self-attention.
        cache: {"key", "value"} [batch, max_length, heads, d_kv] of a decoding state; this call's keys
        and values are written at `position` and the query attends to the whole cache (bias masks
        the positions not written yet).
        Returns (output [batch, q_len, d_model], updated cache or None).
        """
        query = self._split_heads(self.q(hidden))
        keys, values = self.keys_values(hidden) if keys_values is None else keys_values
        if cache is not None:
            cache = update_cache(cache, keys, values, position)
            keys, values = cache["key"], cache["value"]
        output = attend(query, keys, values, bias, self.dropout, deterministic)
        output = output.reshape(output.shape[:2] + (self.num_heads * self.head_dim,))
        return self.o(output), cache


class T5FeedForward(nn.Module):
    """`DenseReluDense`: wi -> activation -> wo, or (v1.1, gated) act(wi_0) * wi_1 -> wo."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, deterministic=True):
        """hidden [..., d_model] -> [..., d_model]."""
        config = self.config
        factor = config.initializer_factor
        activation = ACTIVATIONS[config.dense_act_fn]

        def dense(features, fan_in, name):
            init = nn.initializers.normal(factor * fan_in**-0.5)
            return nn.Dense(features, use_bias=False, kernel_init=init, dtype=self.dtype, name=name)

        if config.is_gated_act:
            inner = activation(dense(config.d_ff, config.d_model, "wi_0")(hidden))
            inner = inner * dense(config.d_ff, config.d_model, "wi_1")(hidden)
        else:
            inner = activation(dense(config.d_ff, config.d_model, "wi")(hidden))
        inner = nn.Dropout(config.dropout_rate)(inner, deterministic=deterministic)
        return dense(config.d_model, config.d_ff, "wo")(inner)


class T5SelfAttentionLayer(nn.Module):
    """Pre-norm residual self-attention sublayer (`layer/0`)."""

    config: Any
    has_relative_attention_bias: bool = False
    causal: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.SelfAttention = T5Attention(
            self.config,
            has_relative_attention_bias=self.has_relative_attention_bias,
            bidirectional=not self.causal,
            dtype=self.dtype,
        )
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, dtype=self.dtype)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, hidden, *, position_bias, mask_bias, query_positions, cache, deterministic):
        """hidden [batch, q_len, d_model].

        position_bias: the bias of block 0 (relative positions + mask) or None in block 0, which
        computes it from query_positions [q_len] and mask_bias (None or [batch|1, 1, q_len, k_len]).
        Returns (hidden, position_bias, cache).
        """
        if position_bias is None:
            key_length = hidden.shape[1] if cache is None else cache["key"].shape[1]
            position_bias = 0.0 if mask_bias is None else mask_bias
            if self.has_relative_attention_bias:
                position_bias = position_bias + self.SelfAttention.relative_bias(query_positions, key_length)
            elif mask_bias is None:
                position_bias = None
        position = None if cache is None else query_positions[0]
        output, cache = self.SelfAttention(
            self.layer_norm(hidden), bias=position_bias, cache=cache, position=position, deterministic=deterministic
        )
        return hidden + self.dropout(output, deterministic=deterministic), position_bias, cache


class T5CrossAttentionLayer(nn.Module):
    """Pre-norm residual attention over the encoder output (`layer/1` of a decoder block)."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.EncDecAttention = T5Attention(self.config, dtype=self.dtype)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, dtype=self.dtype)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def keys_values(self, encoder_hidden_states):
        return self.EncDecAttention.keys_values(encoder_hidden_states)

    def __call__(self, hidden, *, keys_values, bias, deterministic):
        output, _ = self.EncDecAttention(
            self.layer_norm(hidden), bias=bias, keys_values=keys_values, deterministic=deterministic
        )
        return hidden + self.dropout(output, deterministic=deterministic)


class T5FeedForwardLayer(nn.Module):
    """Pre-norm residual feed-forward sublayer (the last `layer/<j>` of a block)."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.DenseReluDense = T5FeedForward(self.config, dtype=self.dtype)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, dtype=self.dtype)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, hidden, deterministic=True):
        output = self.DenseReluDense(self.layer_norm(hidden), deterministic=deterministic)
        return hidden + self.dropout(output, deterministic=deterministic)


class T5Block(nn.Module):
    """One transformer block: sublayers named "0", "1"(, "2") as in the checkpoints."""

    config: Any
    causal: bool = False
    has_relative_attention_bias: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.self_attention = T5SelfAttentionLayer(
            self.config, self.has_relative_attention_bias, self.causal, dtype=self.dtype, name="0"
        )
        if self.causal:
            self.cross_attention = T5CrossAttentionLayer(self.config, dtype=self.dtype, name="1")
        self.feed_forward = T5FeedForwardLayer(self.config, dtype=self.dtype, name="2" if self.causal else "1")

    def cross_keys_values(self, encoder_hidden_states):
        return self.cross_attention.keys_values(encoder_hidden_states)

    def __call__(
        self, hidden, *, position_bias, mask_bias, query_positions, cross_keys_values, cross_bias, cache, deterministic
    ):
        """Returns (hidden [batch, q_len, d_model], position_bias, cache); see T5SelfAttentionLayer."""
        hidden, position_bias, cache = self.self_attention(
            hidden,
            position_bias=position_bias,
            mask_bias=mask_bias,
            query_positions=query_positions,
            cache=cache,
            deterministic=deterministic,
        )
        if self.causal:
            hidden = self.cross_attention(
                hidden, keys_values=cross_keys_values, bias=cross_bias, deterministic=deterministic
            )
        return self.feed_forward(hidden, deterministic=deterministic), position_bias, cache


class T5BlockEntry(nn.Module):
    """Entry `block/<i>`: checkpoints nest each block one level deeper, as `block/<i>/layer/<j>`."""

    config: Any
    causal: bool = False
    has_relative_attention_bias: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.layer = T5Block(self.config, self.causal, self.has_relative_attention_bias, dtype=self.dtype)

    def cross_keys_values(self, encoder_hidden_states):
        return self.layer.cross_keys_values(encoder_hidden_states)

    def __call__(self, hidden, **kwargs):
        return self.layer(hidden, **kwargs)


class T5Blocks(nn.Module):
    """`block`: the stack's blocks, named "0", "1", ...; block 0 (every block with
    `relative_bias_per_layer`) owns a relative position table."""

    config: Any
    causal: bool = False
    num_layers: int = 1
    relative_bias_per_layer: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.blocks = [
            layer(T5BlockEntry)(
                self.config,
                self.causal,
                has_relative_attention_bias=self.relative_bias_per_layer or i == 0,
                dtype=self.dtype,
                name=str(i),
            )
            for i in range(self.num_layers)
        ]

    def cross_keys_values(self, encoder_hidden_states):
        """-> per block (keys, values), each [batch, source_length, heads, d_kv]."""
        return [block.cross_keys_values(encoder_hidden_states) for block in self.blocks]

    def __call__(self, hidden, *, mask_bias, query_positions, cross_keys_values, cross_bias, caches, deterministic):
        """Run all blocks; caches is None or a list with one {"key", "value"} per block. Returns (hidden, caches)."""
        position_bias = None
        new_caches = []
        for i, block in enumerate(self.blocks):
            if self.relative_bias_per_layer:
                position_bias = None  # each block computes its own from its table
            hidden, position_bias, cache = block(
                hidden,
                position_bias=position_bias,
                mask_bias=mask_bias,
                query_positions=query_positions,
                cross_keys_values=None if cross_keys_values is None else cross_keys_values[i],
                cross_bias=cross_bias,
                cache=None if caches is None else caches[i],
                deterministic=deterministic,
            )
            new_caches.append(cache)
        return hidden, (None if caches is None else new_caches)


class T5Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal, with cross-attention) stack over embedded tokens."""

    config: Any
    causal: bool = False
    num_layers: int = 1
    relative_bias_per_layer: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        self.block = T5Blocks(
            self.config, self.causal, self.num_layers, self.relative_bias_per_layer, dtype=self.dtype
        )
        self.final_layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, dtype=self.dtype)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def cross_keys_values(self, encoder_hidden_states):
        return self.block.cross_keys_values(encoder_hidden_states)

    def __call__(
        self,
        embeddings,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        *,
        caches=None,
        position=None,
        cross_keys_values=None,
        deterministic=True,
    ):
        """embeddings [batch, length, d_model] -> (hidden [batch, length, d_model], caches).

        attention_mask [batch, length] (1 = real token) masks keys of the self-attention; a decoder
        also masks later positions. With `caches` (decoding), length is 1 and the token sits at
        `position`; keys are the cache positions up to it. encoder_attention_mask [batch, source_length].
        """
        length = embeddings.shape[1]
        if caches is None:
            query_positions = jnp.arange(length, dtype=jnp.int32)
            key_ok = None if attention_mask is None else (attention_mask > 0)[:, None, None, :]
            if self.causal:
                causal = (query_positions[None, :] <= query_positions[:, None])[None, None]
                key_ok = causal if key_ok is None else key_ok & causal
        else:
            query_positions = position + jnp.arange(length, dtype=jnp.int32)
            cache_length = caches[0]["key"].shape[1]
            key_ok = (jnp.arange(cache_length) <= query_positions[:, None])[None, None]
        mask_bias = None if key_ok is None else mask_to_bias(key_ok)

        cross_bias = None
        if self.causal:
            if cross_keys_values is None and encoder_hidden_states is not None:
                cross_keys_values = self.cross_keys_values(encoder_hidden_states)
            if encoder_attention_mask is not None:
                cross_bias = mask_to_bias((encoder_attention_mask > 0)[:, None, None, :])

        hidden = self.dropout(embeddings, deterministic=deterministic)
        hidden, caches = self.block(
            hidden,
            mask_bias=mask_bias,
            query_positions=query_positions,
            cross_keys_values=cross_keys_values,
            cross_bias=cross_bias,
            caches=caches,
            deterministic=deterministic,
        )
        hidden = self.final_layer_norm(hidden)
        return self.dropout(hidden, deterministic=deterministic), caches


@dataclass(frozen=True)
class Variant:
    """What sets a T5-family model type apart from T5.

    relative_bias_per_layer: every block owns a relative position table (UMT5), not only block 0.
    separate_lm_head: always an lm_head of its own, whatever the config says (mT5: Transformers 5
    forces its `tie_word_embeddings` to True, yet reads every mT5 checkpoint's lm_head and never
    rescales the decoder output).
    """

    relative_bias_per_layer: bool = False
    separate_lm_head: bool = False


VARIANTS = {
    "t5": Variant(),
    "mt5": Variant(separate_lm_head=True),
    "umt5": Variant(relative_bias_per_layer=True),
}


def ties_output_to_embedding(config) -> bool:
    """Whether logits come from the shared embedding (rescaled by d_model ** -0.5) instead of an lm_head.

    Transformers 4 says so with `tie_word_embeddings`; Transformers 5 forces that to True for the
    T5 family and keeps the checkpoint's setting as `scale_decoder_outputs` (T5, UMT5).
    """
    if VARIANTS[config.model_type].separate_lm_head:
        return False
    return bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))


# Checkpoints of the original T5 release hold a cross-attention position table that no model uses.
UNUSED_PYTORCH_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


class T5ForConditionalGeneration(nn.Module):
    """T5 / mT5 / UMT5 encoder-decoder with a language-model head (the variant follows `config.model_type`);
    `dtype` is the computation dtype (params stay float32)."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        per_layer = VARIANTS[config.model_type].relative_bias_per_layer
        self.shared = nn.Embed(
            config.vocab_size,
            config.d_model,
            embedding_init=nn.initializers.normal(config.initializer_factor),
            dtype=self.dtype,
        )
        self.encoder = T5Stack(config, False, config.num_layers, per_layer, dtype=self.dtype)
        self.decoder = T5Stack(config, True, config.num_decoder_layers, per_layer, dtype=self.dtype)
        if not ties_output_to_embedding(config):
            self.lm_head = nn.Dense(
                config.vocab_size,
                use_bias=False,
                kernel_init=nn.initializers.normal(config.initializer_factor),
                dtype=self.dtype,
            )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        deterministic: bool = True,
    ) -> Output:
        """input_ids/attention_mask [batch, source_length], decoder_input_ids/decoder_attention_mask
        [batch, target_length] -> Output(logits [batch, target_length, vocab] float32)."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (the labels shifted right)")
        encoder_hidden_states = self.encode(input_ids, attention_mask, deterministic=deterministic)
        return self.decode(
            decoder_input_ids,
            encoder_hidden_states,
            attention_mask,
            decoder_attention_mask,
            deterministic=deterministic,
        )

    def encode(self, input_ids, attention_mask=None, deterministic: bool = True):
        """input_ids/attention_mask [batch, source_length] -> encoder_hidden_states [batch, source_length, d_model]."""
        hidden, _ = self.encoder(self.shared(input_ids), attention_mask, deterministic=deterministic)
        return hidden

    def decode(
        self,
        decoder_input_ids,
        encoder_hidden_states,
        encoder_attention_mask=None,
        decoder_attention_mask=None,
        deterministic: bool = True,
    ) -> Output:
        """Teacher-forced decoder: decoder_input_ids [batch, target_length] -> Output(logits [batch, target_length, vocab])."""
        hidden, _ = self.decoder(
            self.shared(decoder_input_ids),
            decoder_attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            deterministic=deterministic,
        )
        return Output(logits=self._logits(hidden))

    def _logits(self, hidden):
        """hidden [..., d_model] -> float32 logits [..., vocab]."""
        if ties_output_to_embedding(self.config):
            # Mesh TensorFlow's rescaling before the projection on the shared embedding.
            return self.shared.attend(hidden * (self.config.d_model**-0.5)).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_decoding_state(self, encoder_hidden_states, encoder_attention_mask=None, *, max_length: int):
        """Decoding state for `decode_step`, computed once per input.

        encoder_hidden_states [batch, source_length, d_model], encoder_attention_mask [batch, source_length].
        Returns {"position": int32 0, "cache": per decoder block {"key", "value"} zeros
        [batch, max_length, heads, d_kv], "encoder": {"keys_values": per block (keys, values) of the
        encoder output, "attention_mask": the encoder mask or None}}. Only "cache" changes from step
        to step (and is reordered by beam search).
        """
        config = self.config
        batch = encoder_hidden_states.shape[0]
        shape = (batch, max_length, config.num_heads, config.d_kv)
        cache = [
            {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
            for _ in range(config.num_decoder_layers)
        ]
        return {
            "position": jnp.zeros((), jnp.int32),
            "cache": cache,
            "encoder": {
                "keys_values": self.decoder.cross_keys_values(encoder_hidden_states),
                "attention_mask": encoder_attention_mask,
            },
        }

    def decode_step(self, token_ids, state):
        """One decoder token per sequence: token_ids [batch] (the token at state["position"]) ->
        (logits [batch, vocab] float32 for the next token, state advanced by one position)."""
        position = state["position"]
        hidden, cache = self.decoder(
            self.shared(token_ids[:, None]),
            encoder_attention_mask=state["encoder"]["attention_mask"],
            caches=state["cache"],
            position=position,
            cross_keys_values=state["encoder"]["keys_values"],
        )
        return self._logits(hidden[:, 0]), {**state, "position": position + 1, "cache": cache}


for _model_type in VARIANTS:
    register_family(_model_type, Family(base_prefix="transformer", skipped_pytorch_keys=UNUSED_PYTORCH_KEYS))
    register(_model_type, "seq2seq-lm")(T5ForConditionalGeneration)
