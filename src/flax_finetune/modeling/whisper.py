"""Whisper for conditional generation (speech recognition).

The parameter tree is that of Transformers 4.x `FlaxWhisperForConditionalGeneration`:

    model/encoder/{conv1, conv2}                    Conv1D front end (kernel 3; conv2 with stride 2), GELU
    model/encoder/embed_positions/embedding         [max_source_positions, d_model], sinusoids, not trained
    model/encoder/layers/<i>/{self_attn, self_attn_layer_norm, fc1, fc2, final_layer_norm}
    model/encoder/layer_norm
    model/decoder/embed_tokens/embedding            [vocab, d_model]
    model/decoder/embed_positions/embedding         [max_target_positions, d_model], learned
    model/decoder/layers/<i>/{self_attn, self_attn_layer_norm, encoder_attn, encoder_attn_layer_norm,
                              fc1, fc2, final_layer_norm}
    model/decoder/layer_norm
    lm_head/kernel                                  only when embeddings are not tied

Attention projections are q_proj, k_proj (no bias), v_proj and out_proj.

Besides `__call__` (teacher-forced logits), the module has `encode`, `decode`,
`init_decoding_state` and `decode_step`, used through `module.apply(..., method=...)`,
so that generation (see `generation.py`) runs the encoder once and then one decoder
token per step against a key/value cache.

Unlike the Transformers Flax class, attention dropout is applied in training (that class
never applies it), and layer drop (`encoder_layerdrop`/`decoder_layerdrop`) is not supported.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import Family, Output, layer, register, register_family
from .generation import update_cache

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.swish,
    "swish": nn.swish,
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "tanh": jnp.tanh,
}

# Additive bias for a masked attention position (scores are computed in float32).
MASKED = float(jnp.finfo(jnp.float32).min)


def sinusoidal_init(key, shape, dtype=jnp.float32):
    """Whisper's encoder positions [length, channels]: sin of position * timescale, then cos."""
    del key  # deterministic
    length, channels = shape
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even number of channels, got {channels}")
    half = channels // 2
    inverse_timescales = jnp.exp(-(math.log(10000) / (half - 1)) * jnp.arange(half))
    angles = jnp.arange(length)[:, None] * inverse_timescales[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1).astype(dtype)


class WhisperAttention(nn.Module):
    """Multi-head scaled dot-product attention (self- or cross-attention)."""

    config: Any
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        d_model = self.config.d_model
        if d_model % self.num_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of the {self.num_heads} attention heads")
        self.head_dim = d_model // self.num_heads

        def dense(use_bias):
            init = nn.initializers.normal(self.config.init_std)
            return nn.Dense(d_model, use_bias=use_bias, kernel_init=init, dtype=self.dtype)

        self.q_proj = dense(True)
        self.k_proj = dense(False)
        self.v_proj = dense(True)
        self.out_proj = dense(True)
        self.dropout = nn.Dropout(self.config.attention_dropout, broadcast_dims=(0, 1))

    def _split_heads(self, states):
        return states.reshape(states.shape[:2] + (self.num_heads, self.head_dim))

    def keys_values(self, states):
        """states [batch, length, d_model] -> (keys, values), each [batch, length, heads, head_dim]."""
        return self._split_heads(self.k_proj(states)), self._split_heads(self.v_proj(states))

    def __call__(self, hidden, *, bias=None, keys_values=None, cache=None, position=None, deterministic=True):
        """Attend from hidden [batch, q_len, d_model].

        bias: float32, broadcastable to [batch, heads, q_len, k_len], or None.
        keys_values: precomputed (keys, values) to attend to (cross-attention); None for self-attention.
        cache: {"key", "value"} [batch, max_length, heads, head_dim] of a decoding state; this call's
        keys and values are written at `position` and the query attends to the whole cache.
        Returns (output [batch, q_len, d_model], updated cache or None).
        """
        query = self._split_heads(self.q_proj(hidden))
        query = query / jnp.sqrt(self.head_dim).astype(query.dtype)
        keys, values = self.keys_values(hidden) if keys_values is None else keys_values
        if cache is not None:
            cache = update_cache(cache, keys, values, position)
            keys, values = cache["key"], cache["value"]
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, keys).astype(jnp.float32)
        if bias is not None:
            scores = scores + bias
        weights = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
        weights = self.dropout(weights, deterministic=deterministic)
        output = jnp.einsum("bhqk,bkhd->bqhd", weights, values)
        output = output.reshape(output.shape[:2] + (self.num_heads * self.head_dim,))
        return self.out_proj(output), cache


class _WhisperLayer(nn.Module):
    """What encoder and decoder layers share: the pre-norm residual MLP (final_layer_norm, fc1, act, fc2)."""

    config: Any
    dtype: Any = jnp.float32

    def setup_feed_forward(self, ffn_dim: int):
        init = nn.initializers.normal(self.config.init_std)
        self.fc1 = nn.Dense(ffn_dim, kernel_init=init, dtype=self.dtype)
        self.fc2 = nn.Dense(self.config.d_model, kernel_init=init, dtype=self.dtype)
        self.final_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.activation = ACTIVATIONS[self.config.activation_function]
        self.activation_dropout = nn.Dropout(self.config.activation_dropout)
        self.dropout = nn.Dropout(self.config.dropout)

    def feed_forward(self, hidden, deterministic):
        """hidden [..., d_model] -> hidden + MLP(norm(hidden))."""
        inner = self.activation(self.fc1(self.final_layer_norm(hidden)))
        inner = self.fc2(self.activation_dropout(inner, deterministic=deterministic))
        return hidden + self.dropout(inner, deterministic=deterministic)


class WhisperEncoderLayer(_WhisperLayer):
    """Pre-norm self-attention and MLP."""

    def setup(self):
        config = self.config
        self.self_attn = WhisperAttention(config, config.encoder_attention_heads, dtype=self.dtype)
        self.self_attn_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.setup_feed_forward(config.encoder_ffn_dim)

    def __call__(self, hidden, deterministic=True):
        """hidden [batch, frames, d_model] -> same shape."""
        output, _ = self.self_attn(self.self_attn_layer_norm(hidden), deterministic=deterministic)
        hidden = hidden + self.dropout(output, deterministic=deterministic)
        return self.feed_forward(hidden, deterministic)


class WhisperDecoderLayer(_WhisperLayer):
    """Pre-norm causal self-attention, attention over the encoder output, and MLP."""

    def setup(self):
        config = self.config
        self.self_attn = WhisperAttention(config, config.decoder_attention_heads, dtype=self.dtype)
        self.self_attn_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.encoder_attn = WhisperAttention(config, config.decoder_attention_heads, dtype=self.dtype)
        self.encoder_attn_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.setup_feed_forward(config.decoder_ffn_dim)

    def cross_keys_values(self, encoder_hidden_states):
        return self.encoder_attn.keys_values(encoder_hidden_states)

    def __call__(self, hidden, *, self_bias, cross_keys_values, cache=None, position=None, deterministic=True):
        """hidden [batch, length, d_model] -> (hidden, cache); see WhisperAttention for cache/position."""
        output, cache = self.self_attn(
            self.self_attn_layer_norm(hidden),
            bias=self_bias,
            cache=cache,
            position=position,
            deterministic=deterministic,
        )
        hidden = hidden + self.dropout(output, deterministic=deterministic)
        output, _ = self.encoder_attn(
            self.encoder_attn_layer_norm(hidden), keys_values=cross_keys_values, deterministic=deterministic
        )
        hidden = hidden + self.dropout(output, deterministic=deterministic)
        return self.feed_forward(hidden, deterministic), cache


class WhisperEncoderLayers(nn.Module):
    """`layers` of the encoder, named "0", "1", ..."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.layers = [
            layer(WhisperEncoderLayer)(self.config, dtype=self.dtype, name=str(i)) for i in range(self.config.encoder_layers)
        ]

    def __call__(self, hidden, deterministic=True):
        for block in self.layers:
            hidden = block(hidden, deterministic=deterministic)
        return hidden


class WhisperDecoderLayers(nn.Module):
    """`layers` of the decoder, named "0", "1", ..."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.layers = [
            layer(WhisperDecoderLayer)(self.config, dtype=self.dtype, name=str(i)) for i in range(self.config.decoder_layers)
        ]

    def cross_keys_values(self, encoder_hidden_states):
        """-> per layer (keys, values), each [batch, frames, heads, head_dim]."""
        return [block.cross_keys_values(encoder_hidden_states) for block in self.layers]

    def __call__(self, hidden, *, self_bias, cross_keys_values, caches=None, position=None, deterministic=True):
        new_caches = []
        for i, block in enumerate(self.layers):
            hidden, cache = block(
                hidden,
                self_bias=self_bias,
                cross_keys_values=cross_keys_values[i],
                cache=None if caches is None else caches[i],
                position=position,
                deterministic=deterministic,
            )
            new_caches.append(cache)
        return hidden, (None if caches is None else new_caches)


class WhisperEncoder(nn.Module):
    """Log-mel features [batch, num_mel_bins, 2 * max_source_positions] -> [batch, max_source_positions, d_model]."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        init = nn.initializers.normal(config.init_std)
        self.conv1 = nn.Conv(config.d_model, kernel_size=(3,), padding=1, kernel_init=init, dtype=self.dtype)
        self.conv2 = nn.Conv(
            config.d_model, kernel_size=(3,), strides=2, padding=1, kernel_init=init, dtype=self.dtype
        )
        self.embed_positions = nn.Embed(
            config.max_source_positions, config.d_model, embedding_init=sinusoidal_init, dtype=self.dtype
        )
        self.layers = WhisperEncoderLayers(config, dtype=self.dtype)
        self.layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.dropout = nn.Dropout(config.dropout)

    def __call__(self, input_features, deterministic=True):
        config = self.config
        expected = (config.num_mel_bins, 2 * config.max_source_positions)
        if tuple(input_features.shape[1:]) != expected:
            raise ValueError(
                f"Whisper expects input_features of shape [batch, {expected[0]}, {expected[1]}] "
                f"(num_mel_bins, 2 * max_source_positions), got {list(input_features.shape)}"
            )
        frames = jnp.transpose(input_features, (0, 2, 1))  # [batch, time, mel]
        hidden = nn.gelu(self.conv1(frames), approximate=False)
        hidden = nn.gelu(self.conv2(hidden), approximate=False)
        positions = self.embed_positions(jnp.arange(config.max_source_positions))
        hidden = hidden + jax.lax.stop_gradient(positions)  # the sinusoids are not trained
        hidden = self.dropout(hidden, deterministic=deterministic)
        return self.layer_norm(self.layers(hidden, deterministic=deterministic))


class WhisperDecoder(nn.Module):
    """Token and learned position embeddings, causal layers over the encoder output, final norm."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        self.embed_tokens = nn.Embed(config.vocab_size, config.d_model, dtype=self.dtype)
        self.embed_positions = nn.Embed(config.max_target_positions, config.d_model, dtype=self.dtype)
        self.layers = WhisperDecoderLayers(config, dtype=self.dtype)
        self.layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.dropout = nn.Dropout(config.dropout)

    def cross_keys_values(self, encoder_hidden_states):
        return self.layers.cross_keys_values(encoder_hidden_states)

    def __call__(
        self,
        input_ids,
        position_ids,
        self_bias,
        *,
        encoder_hidden_states=None,
        cross_keys_values=None,
        caches=None,
        position=None,
        deterministic=True,
    ):
        """input_ids/position_ids [batch, length] -> (hidden [batch, length, d_model], caches).

        self_bias: float32 bias of the self-attention, [batch|1, 1, length, key_length].
        Give either encoder_hidden_states or their precomputed per-layer cross_keys_values.
        """
        if cross_keys_values is None:
            cross_keys_values = self.cross_keys_values(encoder_hidden_states)
        hidden = self.embed_tokens(input_ids) + self.embed_positions(position_ids)
        hidden = self.dropout(hidden, deterministic=deterministic)
        hidden, caches = self.layers(
            hidden,
            self_bias=self_bias,
            cross_keys_values=cross_keys_values,
            caches=caches,
            position=position,
            deterministic=deterministic,
        )
        return self.layer_norm(hidden), caches


class WhisperModel(nn.Module):
    """`model`: holds the encoder and the decoder."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = WhisperEncoder(self.config, dtype=self.dtype)
        self.decoder = WhisperDecoder(self.config, dtype=self.dtype)


register_family("whisper", Family(base_prefix="model", pytorch_renames={"lm_head": "proj_out"}))


@register("whisper", "speech-seq2seq")
class WhisperForConditionalGeneration(nn.Module):
    """Whisper encoder-decoder with a language-model head; `dtype` is the computation dtype (params stay float32)."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.model = WhisperModel(self.config, dtype=self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                self.config.vocab_size,
                use_bias=False,
                kernel_init=nn.initializers.normal(self.config.init_std),
                dtype=self.dtype,
            )

    def __call__(
        self,
        input_features,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        decoder_position_ids=None,
        attention_mask=None,
        deterministic: bool = True,
    ) -> Output:
        """input_features [batch, num_mel_bins, 2 * max_source_positions], decoder_input_ids/
        decoder_attention_mask [batch, target_length] -> Output(logits [batch, target_length, vocab] float32).

        attention_mask (of the features) is accepted and ignored, as Whisper attends to every frame.
        """
        if decoder_input_ids is None:
            raise ValueError("Whisper needs decoder_input_ids (the labels shifted right)")
        encoder_hidden_states = self.encode(input_features, deterministic=deterministic)
        return self.decode(
            decoder_input_ids,
            encoder_hidden_states,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            deterministic=deterministic,
        )

    def encode(self, input_features, attention_mask=None, deterministic: bool = True):
        """input_features [batch, num_mel_bins, 2 * max_source_positions] -> [batch, max_source_positions, d_model].

        attention_mask is accepted and ignored."""
        del attention_mask
        return self.model.encoder(input_features, deterministic=deterministic)

    def decode(
        self,
        decoder_input_ids,
        encoder_hidden_states,
        encoder_attention_mask=None,
        decoder_attention_mask=None,
        decoder_position_ids=None,
        deterministic: bool = True,
    ) -> Output:
        """Teacher-forced decoder: decoder_input_ids [batch, target_length] -> Output(logits [batch, target_length, vocab]).

        Positions default to the count of real tokens before each one (mask.cumsum - 1; -1, i.e. the
        last position, on padding), or to 0..target_length-1 without a mask. encoder_attention_mask is ignored.
        """
        del encoder_attention_mask
        batch, length = decoder_input_ids.shape
        if decoder_position_ids is None:
            if decoder_attention_mask is not None:
                decoder_position_ids = jnp.cumsum(decoder_attention_mask, axis=-1) * decoder_attention_mask - 1
            else:
                decoder_position_ids = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if decoder_attention_mask is not None:
            allowed = allowed & (decoder_attention_mask > 0)[:, None, None, :]
        hidden, _ = self.model.decoder(
            decoder_input_ids,
            decoder_position_ids,
            jnp.where(allowed, 0.0, MASKED).astype(jnp.float32),
            encoder_hidden_states=encoder_hidden_states,
            deterministic=deterministic,
        )
        return Output(logits=self._logits(hidden))

    def _logits(self, hidden):
        """hidden [..., d_model] -> float32 logits [..., vocab]."""
        if self.config.tie_word_embeddings:
            return self.model.decoder.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_decoding_state(self, encoder_hidden_states, encoder_attention_mask=None, *, max_length: int):
        """Decoding state for `decode_step`, computed once per input.

        encoder_hidden_states [batch, frames, d_model] (encoder_attention_mask is ignored).
        Returns {"position": int32 0, "cache": per decoder layer {"key", "value"} zeros
        [batch, max_length, heads, head_dim], "encoder": {"keys_values": per layer (keys, values) of
        the encoder output}}. Only "cache" changes from step to step (and is reordered by beam search).
        """
        del encoder_attention_mask
        config = self.config
        if max_length > config.max_target_positions:
            raise ValueError(f"max_length {max_length} exceeds max_target_positions {config.max_target_positions}")
        heads = config.decoder_attention_heads
        shape = (encoder_hidden_states.shape[0], max_length, heads, config.d_model // heads)
        cache = [
            {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
            for _ in range(config.decoder_layers)
        ]
        keys_values = self.model.decoder.cross_keys_values(encoder_hidden_states)
        return {"position": jnp.zeros((), jnp.int32), "cache": cache, "encoder": {"keys_values": keys_values}}

    def decode_step(self, token_ids, state):
        """One decoder token per sequence: token_ids [batch] (the token at state["position"]) ->
        (logits [batch, vocab] float32 for the next token, state advanced by one position)."""
        position = state["position"]
        max_length = state["cache"][0]["key"].shape[1]
        self_bias = jnp.where(jnp.arange(max_length) <= position, 0.0, MASKED).astype(jnp.float32)
        hidden, cache = self.model.decoder(
            token_ids[:, None],
            jnp.full((1, 1), position, jnp.int32),
            self_bias[None, None, None, :],
            cross_keys_values=state["encoder"]["keys_values"],
            caches=state["cache"],
            position=position,
        )
        return self._logits(hidden[:, 0]), {**state, "position": position + 1, "cache": cache}
