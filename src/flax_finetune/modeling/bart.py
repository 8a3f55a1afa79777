"""BART, mBART, Pegasus and Marian: one encoder-decoder with the switches that tell them apart.

The parameter trees are those of Transformers 4.x's FlaxBartForConditionalGeneration,
FlaxMBartForConditionalGeneration, FlaxPegasusForConditionalGeneration, FlaxMarianMTModel
and FlaxBartForSequenceClassification (base model "model"):

    model/shared/embedding                    [V, H] token embeddings of both stacks
    model/{encoder,decoder}/embed_positions   [max_position_embeddings + 2, H], learned (BART, mBART)
    model/{encoder,decoder}/layernorm_embedding                           (BART, mBART)
    model/encoder/layers/<i>/{self_attn, self_attn_layer_norm, fc1, fc2, final_layer_norm}
    model/decoder/layers/<i>/{self_attn, self_attn_layer_norm, encoder_attn, encoder_attn_layer_norm,
                              fc1, fc2, final_layer_norm}
    model/{encoder,decoder}/layer_norm        after the last layer        (mBART, Pegasus)
    lm_head/kernel                            [H, V], only without tie_word_embeddings
    final_logits_bias                         [1, V], added to the logits, not trained
    classification_head/{dense, out_proj}     BART sequence classification

What differs between the families (`Variant`): LayerNorm after each residual sub-block (BART,
Marian) or before it with a final LayerNorm per stack (mBART, Pegasus); a LayerNorm over the
embeddings (BART, mBART); learned positions looked up at position + 2 (BART, mBART) or fixed
sinusoids, which are not parameters (Pegasus, Marian). The config says the rest: scale_embedding
(token embeddings times sqrt(H)), activation_function, tie_word_embeddings, and for Marian
share_encoder_decoder_embeddings: without it the stacks have their own
`model/{encoder,decoder}/embed_tokens` (the decoder's of decoder_vocab_size), as in PyTorch.

`final_logits_bias` is a PyTorch buffer: it gets no gradient here (Transformers' Flax BART,
mBART and Pegasus stop it too; its Flax Marian alone trains it).

Besides `__call__` (teacher-forced logits), the conditional-generation module has `encode`,
`init_decoding_state` and `decode_step` (generation.py's contract): the encoder runs once, then one
decoder token per step against a key/value cache. Layer drop is not supported.

Shapes: B batch, S source length, T target length, H d_model, N heads, D head size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_finetune.modeling import Family, Output, layer, register, register_family
from flax_finetune.modeling.bert import activation, attend, padding_mask
from flax_finetune.modeling.generation import update_cache

Array = Any

LEARNED_POSITION_OFFSET = 2
"""BART and mBART look position p up at row p + 2 of their learned table (a fairseq legacy)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """The architecture switches of one family (see the module docstring)."""

    pre_norm: bool  # LayerNorm before each sub-block, and a final `layer_norm` per stack
    embedding_norm: bool  # `layernorm_embedding` after the token + position embeddings
    learned_positions: bool  # learned `embed_positions` (offset 2); else fixed sinusoids


VARIANTS = {
    "bart": Variant(pre_norm=False, embedding_norm=True, learned_positions=True),
    "mbart": Variant(pre_norm=True, embedding_norm=True, learned_positions=True),
    "pegasus": Variant(pre_norm=True, embedding_norm=False, learned_positions=False),
    "marian": Variant(pre_norm=False, embedding_norm=False, learned_positions=False),
}


def variant(config) -> Variant:
    return VARIANTS[config.model_type]


def sinusoidal_positions(length: int, channels: int) -> np.ndarray:
    """Pegasus and Marian positions [length, channels]: sin(p / 10000^(2i / channels)) in the first
    half of the channels, cos in the second (computed in float64, as Transformers does)."""
    exponents = 2 * (np.arange(channels) // 2) / channels
    angles = np.arange(length)[:, None] / np.power(10000, exponents)[None, :]
    half = channels // 2 + channels % 2
    table = np.zeros((length, channels))
    table[:, :half] = np.sin(angles[:, 0::2])
    table[:, half:] = np.cos(angles[:, 1::2])
    return table.astype(np.float32)


def _normal(config):
    return nn.initializers.normal(config.init_std)


def _shared_embeddings(config) -> bool:
    """Whether both stacks use `model/shared` (always but in Marian without share_encoder_decoder_embeddings)."""
    return getattr(config, "share_encoder_decoder_embeddings", True)


def _decoder_vocab_size(config) -> int:
    return getattr(config, "decoder_vocab_size", None) or config.vocab_size


class BartAttention(nn.Module):
    """Multi-head attention with q_proj, k_proj, v_proj, out_proj (all with bias)."""

    config: Any
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        if config.d_model % self.num_heads:
            raise ValueError(f"d_model {config.d_model} is not a multiple of the {self.num_heads} attention heads")
        dense = lambda: nn.Dense(config.d_model, dtype=self.dtype, kernel_init=_normal(config))  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()
        self.dropout = nn.Dropout(config.attention_dropout, broadcast_dims=(0, 1))

    def _split_heads(self, states: Array) -> Array:
        return states.reshape(states.shape[:2] + (self.num_heads, -1))

    def keys_values(self, states: Array) -> tuple[Array, Array]:
        """states [B, L, H] -> (keys, values), each [B, L, N, D]."""
        return self._split_heads(self.k_proj(states)), self._split_heads(self.v_proj(states))

    def __call__(self, hidden, mask, *, keys_values=None, cache=None, position=None, deterministic=True):
        """Attend from hidden [B, Lq, H]; mask boolean, broadcastable to [B, N, Lq, Lk], or None.

        keys_values: precomputed (keys, values) to attend to (cross-attention); None for self-attention.
        cache: {"key", "value"} [B, max_length, N, D]; this call's keys and values are written at
        `position` and the query attends to the whole cache (`mask` says which entries count).
        Returns (output [B, Lq, H], updated cache or None).
        """
        keys, values = self.keys_values(hidden) if keys_values is None else keys_values
        if cache is not None:
            cache = update_cache(cache, keys, values, position)
            keys, values = cache["key"], cache["value"]
        context = attend(self._split_heads(self.q_proj(hidden)), keys, values, mask, self.dropout, deterministic)
        return self.out_proj(context.reshape(context.shape[:2] + (-1,))), cache


class _Layer(nn.Module):
    """What encoder and decoder layers share: residual sub-blocks, pre- or post-LayerNorm, and the MLP."""

    config: Any
    dtype: Any = jnp.float32

    def setup_feed_forward(self, ffn_dim: int):
        config = self.config
        self.fc1 = nn.Dense(ffn_dim, dtype=self.dtype, kernel_init=_normal(config))
        self.fc2 = nn.Dense(config.d_model, dtype=self.dtype, kernel_init=_normal(config))
        self.final_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def residual(self, hidden, norm, block, deterministic):
        """hidden + block(...), with `norm` before the block (pre-norm) or after the sum (post-norm).

        block: [B, L, H] -> ([B, L, H], extra); returns (hidden [B, L, H], extra)."""
        pre_norm = variant(self.config).pre_norm
        output, extra = block(norm(hidden) if pre_norm else hidden)
        hidden = hidden + self.dropout(output, deterministic=deterministic)
        return (hidden if pre_norm else norm(hidden)), extra

    def feed_forward(self, hidden, deterministic):
        def mlp(hidden):
            inner = activation(self.config.activation_function)(self.fc1(hidden))
            return self.fc2(self.activation_dropout(inner, deterministic=deterministic)), None

        return self.residual(hidden, self.final_layer_norm, mlp, deterministic)[0]


class BartEncoderLayer(_Layer):
    """Self-attention and MLP: [B, S, H] -> [B, S, H]."""

    def setup(self):
        self.self_attn = BartAttention(self.config, self.config.encoder_attention_heads, dtype=self.dtype)
        self.self_attn_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.setup_feed_forward(self.config.encoder_ffn_dim)

    def __call__(self, hidden, mask, deterministic=True):
        attention = lambda states: self.self_attn(states, mask, deterministic=deterministic)  # noqa: E731
        hidden, _ = self.residual(hidden, self.self_attn_layer_norm, attention, deterministic)
        return self.feed_forward(hidden, deterministic)


class BartDecoderLayer(_Layer):
    """Causal self-attention, attention over the encoder output, and MLP: [B, T, H] -> [B, T, H]."""

    def setup(self):
        heads = self.config.decoder_attention_heads
        self.self_attn = BartAttention(self.config, heads, dtype=self.dtype)
        self.self_attn_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.encoder_attn = BartAttention(self.config, heads, dtype=self.dtype)
        self.encoder_attn_layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.setup_feed_forward(self.config.decoder_ffn_dim)

    def cross_keys_values(self, encoder_hidden_states):
        return self.encoder_attn.keys_values(encoder_hidden_states)

    def __call__(self, hidden, self_mask, cross_mask, cross_keys_values, cache=None, position=None, deterministic=True):
        """-> (hidden, cache); see BartAttention for cache and position."""

        def self_attention(states):
            return self.self_attn(states, self_mask, cache=cache, position=position, deterministic=deterministic)

        def cross_attention(states):
            return self.encoder_attn(states, cross_mask, keys_values=cross_keys_values, deterministic=deterministic)

        hidden, cache = self.residual(hidden, self.self_attn_layer_norm, self_attention, deterministic)
        hidden, _ = self.residual(hidden, self.encoder_attn_layer_norm, cross_attention, deterministic)
        return self.feed_forward(hidden, deterministic), cache


class BartLayers(nn.Module):
    """`layers` of a stack, named "0", "1", ... (encoder layers, or decoder layers with `decoder`)."""

    config: Any
    decoder: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        layer_class, count = (BartDecoderLayer, config.decoder_layers) if self.decoder else (BartEncoderLayer, config.encoder_layers)
        self.layers = [layer(layer_class)(config, dtype=self.dtype, name=str(index)) for index in range(count)]

    def encode(self, hidden, mask, deterministic):
        for block in self.layers:
            hidden = block(hidden, mask, deterministic)
        return hidden

    def cross_keys_values(self, encoder_hidden_states):
        """-> per decoder layer (keys, values), each [B, S, N, D]."""
        return [block.cross_keys_values(encoder_hidden_states) for block in self.layers]

    def decode(self, hidden, self_mask, cross_mask, cross_keys_values, caches, position, deterministic):
        new_caches = []
        for index, block in enumerate(self.layers):
            cache = None if caches is None else caches[index]
            hidden, cache = block(hidden, self_mask, cross_mask, cross_keys_values[index], cache, position,
                                  deterministic)
            new_caches.append(cache)
        return hidden, (None if caches is None else new_caches)


class BartStack(nn.Module):
    """The encoder (`decoder` False) or the decoder: embeddings, `layers`, final norm.

    shared: the model's shared token embedding module, or None for the stack's own `embed_tokens`.
    """

    config: Any
    shared: Optional[nn.Module] = None
    decoder: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        config, kind = self.config, variant(self.config)
        if self.shared is None:
            vocab = _decoder_vocab_size(config) if self.decoder else config.vocab_size
            self.embed_tokens = nn.Embed(vocab, config.d_model, embedding_init=_normal(config), dtype=self.dtype)
        if kind.learned_positions:
            self.embed_positions = nn.Embed(config.max_position_embeddings + LEARNED_POSITION_OFFSET, config.d_model,
                                            embedding_init=_normal(config), dtype=self.dtype)
        if kind.embedding_norm:
            self.layernorm_embedding = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        if kind.pre_norm:
            self.layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)
        self.layers = BartLayers(config, self.decoder, dtype=self.dtype)
        self.dropout = nn.Dropout(config.dropout)

    def _tokens(self) -> nn.Embed:
        return self.embed_tokens if self.shared is None else self.shared

    def token_embedding(self) -> Array:
        """The stack's token embedding table [V, H] (the tied output projection of the decoder)."""
        return self._tokens().embedding

    def embed(self, input_ids, first_position, deterministic):
        """ids [B, L] at positions first_position, first_position + 1, ... -> [B, L, H]."""
        config, kind = self.config, variant(self.config)
        scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        positions = first_position + jnp.arange(input_ids.shape[1])
        if kind.learned_positions:
            position_embeddings = self.embed_positions(positions + LEARNED_POSITION_OFFSET)
        else:
            table = sinusoidal_positions(config.max_position_embeddings, config.d_model)
            position_embeddings = jnp.take(jnp.asarray(table), positions, axis=0).astype(self.dtype)
        tokens = self._tokens()(input_ids)
        # PyTorch's padding_idx: looking the padding token up (Pegasus' and Marian's decoder start) gives no gradient
        tokens = jnp.where((input_ids == config.pad_token_id)[..., None], jax.lax.stop_gradient(tokens), tokens)
        hidden = tokens * jnp.asarray(scale, self.dtype) + position_embeddings[None]
        if kind.embedding_norm:
            hidden = self.layernorm_embedding(hidden)
        return self.dropout(hidden, deterministic=deterministic)

    def finish(self, hidden):
        return self.layer_norm(hidden) if variant(self.config).pre_norm else hidden

    def encode(self, input_ids, attention_mask, deterministic=True):
        """ids and mask [B, S] -> [B, S, H]."""
        hidden = self.embed(input_ids, 0, deterministic)
        return self.finish(self.layers.encode(hidden, padding_mask(attention_mask), deterministic))

    def cross_keys_values(self, encoder_hidden_states):
        return self.layers.cross_keys_values(encoder_hidden_states)

    def decode(self, input_ids, self_mask, cross_mask, cross_keys_values, *, caches=None, position=0,
               deterministic=True):
        """Decoder ids [B, T] from `position` on -> (hidden [B, T, H], caches or None).

        self_mask: boolean, broadcastable to [B, N, T, T] (or [B, N, 1, max_length] against a cache);
        cross_mask: the encoder's padding mask [B, 1, 1, S] or None."""
        hidden = self.embed(input_ids, position, deterministic)
        hidden, caches = self.layers.decode(hidden, self_mask, cross_mask, cross_keys_values, caches, position,
                                            deterministic)
        return self.finish(hidden), caches


class BartModel(nn.Module):
    """`model`: the shared token embeddings (unless Marian's are separate), the encoder and the decoder."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        shared = None
        if _shared_embeddings(config):
            self.shared = shared = nn.Embed(config.vocab_size, config.d_model, embedding_init=_normal(config),
                                            dtype=self.dtype)
        self.encoder = BartStack(config, shared, decoder=False, dtype=self.dtype)
        self.decoder = BartStack(config, shared, decoder=True, dtype=self.dtype)

    def encode(self, input_ids, attention_mask=None, deterministic=True):
        return self.encoder.encode(jnp.asarray(input_ids, jnp.int32), attention_mask, deterministic)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, deterministic=True):
        """Teacher forcing: -> decoder hidden states [B, T, H]."""
        encoder_hidden_states = self.encode(input_ids, attention_mask, deterministic)
        length = decoder_input_ids.shape[1]
        self_mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if decoder_attention_mask is not None:
            self_mask = self_mask & padding_mask(decoder_attention_mask)
        hidden, _ = self.decoder.decode(
            jnp.asarray(decoder_input_ids, jnp.int32), self_mask, padding_mask(attention_mask),
            self.decoder.cross_keys_values(encoder_hidden_states), deterministic=deterministic,
        )
        return hidden


def shift_tokens_right(input_ids: Array, decoder_start_token_id: int) -> Array:
    """[B, L] -> decoder inputs [B, L]: the start token, then the ids without their last one."""
    start = jnp.full((input_ids.shape[0], 1), decoder_start_token_id, input_ids.dtype)
    return jnp.concatenate([start, input_ids[:, :-1]], axis=1)


class BartForConditionalGeneration(nn.Module):
    """Encoder-decoder with the language-model head; logits [B, T, V] float32."""

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        config = self.config
        self.model = BartModel(config, dtype=self.dtype)
        vocab = _decoder_vocab_size(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Dense(vocab, use_bias=False, dtype=self.dtype, kernel_init=_normal(config))
        self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros, (1, vocab))

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 deterministic: bool = True) -> Output:
        """input_ids, attention_mask [B, S]; decoder_input_ids, decoder_attention_mask [B, T]."""
        if decoder_input_ids is None:
            raise ValueError(f"{self.config.model_type} needs decoder_input_ids (the labels shifted right)")
        hidden = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, deterministic)
        return Output(logits=self._logits(hidden))

    def _logits(self, hidden):
        """[..., H] -> float32 [..., V], final_logits_bias added."""
        if self.config.tie_word_embeddings:
            logits = hidden @ jnp.asarray(self.model.decoder.token_embedding(), self.dtype).T
        else:
            logits = self.lm_head(hidden)
        bias = jax.lax.stop_gradient(self.final_logits_bias[0])
        return (logits + jnp.asarray(bias, self.dtype)).astype(jnp.float32)

    def encode(self, input_ids, attention_mask=None, deterministic: bool = True):
        """input_ids, attention_mask [B, S] -> encoder_hidden_states [B, S, H]."""
        return self.model.encode(input_ids, attention_mask, deterministic)

    def init_decoding_state(self, encoder_hidden_states, encoder_attention_mask=None, *, max_length: int):
        """Decoding state for `decode_step`, computed once per input.

        Returns {"position": int32 0, "cache": per decoder layer {"key", "value"} zeros [B, max_length, N, D],
        "encoder": {"keys_values": per layer (keys, values) of the encoder output, "attention_mask":
        the encoder mask or None}}. Only "cache" changes from step to step (and follows the beams).
        """
        config = self.config
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings {config.max_position_embeddings}")
        heads = config.decoder_attention_heads
        shape = (encoder_hidden_states.shape[0], max_length, heads, config.d_model // heads)
        cache = [{"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}
                 for _ in range(config.decoder_layers)]
        return {
            "position": jnp.zeros((), jnp.int32),
            "cache": cache,
            "encoder": {
                "keys_values": self.model.decoder.cross_keys_values(encoder_hidden_states),
                "attention_mask": encoder_attention_mask,
            },
        }

    def decode_step(self, token_ids, state):
        """token_ids [B] (the tokens at state["position"]) -> (logits [B, V] float32 for the next token,
        the state one position further)."""
        position = state["position"]
        max_length = state["cache"][0]["key"].shape[1]
        self_mask = (jnp.arange(max_length) <= position)[None, None, None, :]
        hidden, cache = self.model.decoder.decode(
            token_ids[:, None], self_mask, padding_mask(state["encoder"]["attention_mask"]),
            state["encoder"]["keys_values"], caches=state["cache"], position=position,
        )
        return self._logits(hidden[:, 0]), {**state, "position": position + 1, "cache": cache}


class BartClassificationHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj: [B, H] -> [B, C]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, deterministic: bool):
        config = self.config
        dropout = nn.Dropout(config.classifier_dropout)
        hidden = dropout(hidden, deterministic=deterministic)
        hidden = jnp.tanh(nn.Dense(config.d_model, dtype=self.dtype, kernel_init=_normal(config), name="dense")(hidden))
        hidden = dropout(hidden, deterministic=deterministic)
        return nn.Dense(config.num_labels, dtype=self.dtype, kernel_init=_normal(config), name="out_proj")(hidden)


class BartForSequenceClassification(nn.Module):
    """The decoder's hidden state at each row's last end-of-sequence token -> `classification_head`.

    The decoder reads the input ids shifted right behind the decoder start token (as Transformers
    does without decoder_input_ids). Each row needs an eos_token_id (the tokenizer appends one);
    a row without one is scored from its first position. Logits [B, C] float32.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 deterministic: bool = True) -> Output:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(input_ids, self.config.decoder_start_token_id)
        hidden = BartModel(self.config, dtype=self.dtype, name="model")(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, deterministic
        )
        is_eos = input_ids == self.config.eos_token_id
        last_eos = input_ids.shape[1] - 1 - jnp.argmax(is_eos[:, ::-1], axis=1)
        last_eos = jnp.where(jnp.any(is_eos, axis=1), last_eos, 0)
        pooled = jnp.take_along_axis(hidden, last_eos[:, None, None], axis=1)[:, 0]
        logits = BartClassificationHead(self.config, self.dtype, name="classification_head")(pooled, deterministic)
        return Output(logits=logits.astype(jnp.float32))


SINUSOID_KEYS = ("encoder.embed_positions.weight", "decoder.embed_positions.weight")


def pegasus_sinusoids(config) -> dict[str, np.ndarray]:
    """The fixed position tables Transformers 5's Pegasus expects in a checkpoint (Marian's does not)."""
    table = sinusoidal_positions(config.max_position_embeddings, config.d_model)
    return {key: table for key in SINUSOID_KEYS}


register_family("bart", Family(base_prefix="model", skipped_pytorch_keys=("encoder.version", "decoder.version")))
register_family("mbart", Family(base_prefix="model"))
register_family("pegasus", Family(base_prefix="model", skipped_pytorch_keys=SINUSOID_KEYS,
                                  pytorch_constants=pegasus_sinusoids))
register_family("marian", Family(base_prefix="model", skipped_pytorch_keys=SINUSOID_KEYS))

for _model_type in VARIANTS:
    register(_model_type, "seq2seq-lm")(BartForConditionalGeneration)
register("bart", "sequence-classification")(BartForSequenceClassification)
