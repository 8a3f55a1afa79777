"""Decoders with Llama's architecture: Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma 2.

One implementation; the config's model type (`VARIANTS`) and values switch what differs:

- llama: RMSNorm before each sub-block, rotary positions (`rope_theta`; rope scaling "default",
  "linear", "dynamic" or "llama3", others refused), a SiLU-gated MLP, grouped-query attention
  (`num_key_value_heads`), optional `attention_bias` / `mlp_bias`;
- mistral: every layer sees only the last `sliding_window` keys;
- qwen2: biased q/k/v projections (o_proj unbiased); sliding layers where `layer_types` say so;
- qwen3: an RMSNorm over each query and key head (`q_norm`, `k_norm`) before the rotation;
- gemma: RMSNorm scaling by (1 + weight) in float32, embeddings times sqrt(H), a GeLU-tanh gate;
- gemma2: gemma plus RMSNorm after attention and around the MLP, scores scaled by
  `query_pre_attn_scalar` ** -0.5 and soft-capped (`attn_logit_softcapping`), final logits
  soft-capped (`final_logit_softcapping`), sliding and global layers alternating (`layer_types`).

Sliding window: query i sees key j when i - sliding_window < j <= i, as Transformers 5's PyTorch
classes (Transformers 4.x's Flax Mistral lets one key more through: j >= i - sliding_window).

Parameter trees are Transformers 4.57's FlaxLlamaForCausalLM / FlaxMistralForCausalLM /
FlaxGemmaForCausalLM (base model "model"); Qwen's and Gemma 2's extra parts and the
classification head have their PyTorch names:

    model/embed_tokens/embedding                                    [V, H]
    model/layers/<i>/input_layernorm/weight                         [H]
    model/layers/<i>/self_attn/{q,k,v,o}_proj/{kernel,bias}         bias: attention_bias, Qwen2's q/k/v
    model/layers/<i>/self_attn/{q,k}_norm/weight                    [D] (qwen3)
    model/layers/<i>/post_attention_layernorm/weight                [H]
    model/layers/<i>/{pre,post}_feedforward_layernorm/weight        [H] (gemma2)
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel
    model/norm/weight                                               [H]
    lm_head/kernel                                                  [H, V] unless tie_word_embeddings
    score/kernel                                                    [H, C] (sequence classification)

(The Flax Llama and Mistral classes keep an lm_head even when `tie_word_embeddings` is set; here
a tied model has none, as in PyTorch.)

Besides `__call__`, the causal LM has `prefill` and `decode_step` (see generation.py) for
generation with a key/value cache of `num_key_value_heads` heads.

Shapes: B batch, L sequence length, H hidden size, N query heads, K key/value heads, D head
size, M cache length, V vocabulary, C labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_finetune.modeling import Family, Output, generation, layer, register, register_family
from flax_finetune.modeling.bert import activation
from flax_finetune.modeling.gpt2 import same_segment

Array = Any


@dataclass(frozen=True)
class Variant:
    """What a model type changes in the shared decoder (the rest is read from its config)."""

    qkv_bias: bool = False
    """q/k/v projections always biased and o_proj never (Qwen2); otherwise all four follow `attention_bias`."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before the rotation (Qwen3)."""
    gemma: bool = False
    """RMSNorm by (1 + weight), embeddings times sqrt(H), activation from `hidden_activation` (Gemma)."""
    sandwich_norms: bool = False
    """RMSNorm of the attention output and around the MLP (Gemma 2)."""


VARIANTS = {
    "llama": Variant(),
    "mistral": Variant(),
    "qwen2": Variant(qkv_bias=True),
    "qwen3": Variant(qk_norm=True),
    "gemma": Variant(gemma=True),
    "gemma2": Variant(gemma=True, sandwich_norms=True),
}

SLIDING, FULL = "sliding_attention", "full_attention"
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def head_size(config) -> int:
    """D: the config's `head_dim` where it has one, else H / N."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types(config) -> list[str]:
    """Each layer's attention, SLIDING or FULL: the config's `layer_types` (Transformers >= 4.53),
    else what older configs of the model type mean (Mistral: all sliding when `sliding_window` is
    set; Qwen: sliding from `max_window_layers` on with `use_sliding_window`; Gemma 2: alternating)."""
    count = config.num_hidden_layers
    declared = getattr(config, "layer_types", None)
    if declared:
        return list(declared)[:count]
    window = getattr(config, "sliding_window", None)
    if config.model_type == "gemma2":
        return [SLIDING if index % 2 == 0 else FULL for index in range(count)]
    if config.model_type == "mistral" and window:
        return [SLIDING] * count
    if config.model_type in ("qwen2", "qwen3") and window and getattr(config, "use_sliding_window", False):
        return [SLIDING if index >= config.max_window_layers else FULL for index in range(count)]
    return [FULL] * count


def rope_parameters(config) -> dict:
    """The config's rotary settings in Transformers 5's form: {"rope_type", "rope_theta", ...}.

    Reads `rope_parameters` (Transformers 5) or `rope_scaling` + `rope_theta` (4.x); a type
    other than ROPE_TYPES is a ValueError."""
    parameters = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    parameters.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    kind = parameters.setdefault("rope_type", parameters.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"{config.model_type}: rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    return parameters


def inverse_frequencies(config) -> np.ndarray:
    """Rotary inverse frequencies [D / 2] float32, computed as Transformers' PyTorch classes do
    (float32 throughout) for the "default", "linear", "llama3" types and for "dynamic" within
    `max_position_embeddings` (`rotary_tables` stretches it beyond)."""
    parameters = rope_parameters(config)
    dim = head_size(config)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inverse = (np.float32(1.0) / np.float32(parameters["rope_theta"]) ** exponents).astype(np.float32)
    kind = parameters["rope_type"]
    if kind == "linear":
        return (inverse / np.float32(parameters["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = parameters["factor"]
        low, high = parameters["low_freq_factor"], parameters["high_freq_factor"]
        context = parameters.get("original_max_position_embeddings") or config.max_position_embeddings
        wavelength = np.float32(2 * math.pi) / inverse
        scaled = np.where(wavelength > context / low, inverse / np.float32(factor), inverse)
        smooth = (np.float32(context) / wavelength - np.float32(low)) / np.float32(high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelength < context / high) & ~(wavelength > context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inverse


def rotary_tables(config, position_ids: Array) -> tuple[Array, Array]:
    """cos and sin [B, L, D] float32 of the rotation at `position_ids` [B, L].

    Dynamic NTK scaling ("dynamic") stretches the base when the largest position reaches past
    `max_position_embeddings`, as Transformers' PyTorch classes do for each forward call."""
    parameters = rope_parameters(config)
    positions = jnp.asarray(position_ids, jnp.float32)
    inverse = jnp.asarray(inverse_frequencies(config))
    if parameters["rope_type"] == "dynamic":
        dim = head_size(config)
        longest = jnp.maximum(jnp.max(positions) + 1, config.max_position_embeddings)
        factor = parameters["factor"]
        base = parameters["rope_theta"] * (factor * longest / config.max_position_embeddings - (factor - 1)) ** (
            dim / (dim - 2))
        inverse = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions[..., None] * inverse  # [B, L, D / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate(states: Array, cos: Array, sin: Array) -> Array:
    """Apply the rotation to queries or keys [B, L, heads, D] (cos, sin [B, L, D])."""
    half = states.shape[-1] // 2
    rotated_half = jnp.concatenate([-states[..., half:], states[..., :half]], axis=-1)
    return (states * cos[:, :, None] + rotated_half * sin[:, :, None]).astype(states.dtype)


def attention_mask_over(query_slots: Array, key_valid: Array, window: Optional[int]) -> Array:
    """Boolean [B, 1, Lq, Lk]: the query at slot query_slots[q] ([Lq]) sees key slot k (0..Lk-1)
    when k <= that slot, key_valid[b, k] ([B, Lk], not padding) and, with a `window`, k > slot - window."""
    key_slots = jnp.arange(key_valid.shape[-1])
    visible = key_slots[None, :] <= query_slots[:, None]
    if window:
        visible &= key_slots[None, :] > query_slots[:, None] - window
    return visible[None, None] & (key_valid > 0)[:, None, None, :]


def grouped_attention(query: Array, key: Array, value: Array, mask: Array, *, scale: float,
                      softcap: Optional[float], probs_dropout: nn.Dropout, deterministic: bool) -> Array:
    """Grouped-query attention: query [B, Lq, N, D] against key, value [B, Lk, K, D] (query head h
    uses key/value head h // (N / K)); mask boolean [B, 1, Lq, Lk]. Scores times `scale`, soft-capped
    to (-softcap, softcap) by tanh where set, masked with the dtype's most negative value, softmax
    in float32. Returns [B, Lq, N, D]."""
    batch, length, heads, depth = query.shape
    groups = heads // key.shape[2]
    query = query.reshape(batch, length, key.shape[2], groups, depth)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", query, key).astype(jnp.float32) * scale  # [B, K, N / K, Lq, Lk]
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(query.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(query.dtype)
    probs = probs_dropout(probs, deterministic=deterministic)
    context = jnp.einsum("bkgqs,bskd->bqkgd", probs, value)
    return context.reshape(batch, length, heads, depth)


def soft_cap(values: Array, cap: Optional[float]) -> Array:
    """cap * tanh(values / cap) where `cap` is set (Gemma 2's logits), else `values`."""
    return jnp.tanh(values / cap) * cap if cap else values


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, in float32: [..., F] -> [..., F].

    Llama: weight * normed (weights start at 1); Gemma (`offset`): normed * (1 + weight) (weights
    start at 0), multiplied before the cast to `dtype`, as Transformers."""

    eps: float
    offset: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("weight", init, (hidden.shape[-1],))
        values = jnp.asarray(hidden, jnp.float32)
        normed = values / jnp.sqrt(jnp.mean(values**2, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + weight)).astype(self.dtype)
        return jnp.asarray(weight, self.dtype) * normed.astype(self.dtype)


def _norm(config, dtype: Any, name: str) -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, VARIANTS[config.model_type].gemma, dtype, name=name)


def _dense(config, features: int, use_bias: bool, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


class DecoderAttention(nn.Module):
    """Self-attention with rotary positions and grouped key/value heads: [B, L, H] -> [B, L, H].

    With `cache` ({"key", "value"} [B, M, K, D]) the step's keys and values are written at
    `write_index` and the queries attend over the whole cache; returns (output, the new cache)."""

    config: Any
    window: Optional[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, rotary, mask, deterministic: bool, cache=None, write_index=None):
        config, variant = self.config, VARIANTS[self.config.model_type]
        heads, kv_heads, depth = config.num_attention_heads, config.num_key_value_heads, head_size(config)
        bias = getattr(config, "attention_bias", False)
        qkv_bias, out_bias = (True, False) if variant.qkv_bias else (bias, bias)

        def project(name: str, count: int) -> Array:  # [B, L, H] -> [B, L, count, D]
            projected = _dense(config, count * depth, qkv_bias, self.dtype, name)(hidden)
            return projected.reshape(projected.shape[:2] + (count, depth))

        query, key, value = project("q_proj", heads), project("k_proj", kv_heads), project("v_proj", kv_heads)
        if variant.qk_norm:
            query, key = _norm(config, self.dtype, "q_norm")(query), _norm(config, self.dtype, "k_norm")(key)
        query, key = rotate(query, *rotary), rotate(key, *rotary)
        if cache is not None:
            cache = generation.update_cache(cache, key, value, write_index)
            key, value = cache["key"], cache["value"]
        scalar = getattr(config, "query_pre_attn_scalar", None) or depth
        context = grouped_attention(
            query, key, value, mask, scale=scalar**-0.5, softcap=getattr(config, "attn_logit_softcapping", None),
            probs_dropout=nn.Dropout(config.attention_dropout), deterministic=deterministic)
        output = _dense(config, config.hidden_size, out_bias, self.dtype, "o_proj")(
            context.reshape(context.shape[:2] + (heads * depth,)))
        return output, cache


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)): [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        config = self.config
        if VARIANTS[config.model_type].gemma:  # Gemma's legacy "gelu" means the tanh approximation
            name = getattr(config, "hidden_activation", None) or config.hidden_act
            name = "gelu_pytorch_tanh" if name == "gelu" else name
        else:
            name = config.hidden_act
        bias = getattr(config, "mlp_bias", False)
        gate = _dense(config, config.intermediate_size, bias, self.dtype, "gate_proj")(hidden)
        up = _dense(config, config.intermediate_size, bias, self.dtype, "up_proj")(hidden)
        return _dense(config, config.hidden_size, bias, self.dtype, "down_proj")(activation(name)(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP sub-blocks with residuals (Gemma 2: each output normalised too)."""

    config: Any
    window: Optional[int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, rotary, mask, deterministic: bool, cache=None, write_index=None):
        config, sandwich = self.config, VARIANTS[self.config.model_type].sandwich_norms
        attention = DecoderAttention(config, self.window, self.dtype, name="self_attn")
        attended, cache = attention(_norm(config, self.dtype, "input_layernorm")(hidden), rotary, mask, deterministic,
                                    cache, write_index)
        if sandwich:
            attended = _norm(config, self.dtype, "post_attention_layernorm")(attended)
        hidden = hidden + attended
        mlp_input = _norm(config, self.dtype, "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm")
        fed = GatedMLP(config, self.dtype, name="mlp")(mlp_input(hidden))
        if sandwich:
            fed = _norm(config, self.dtype, "post_feedforward_layernorm")(fed)
        return hidden + fed, cache


class DecoderLayers(nn.Module):
    """`num_hidden_layers` layers named "0", "1", ...; layer i uses masks[layer_types[i]].

    With `caches` (a list, one {"key", "value"} per layer) returns the updated list, else None."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, rotary, masks, deterministic: bool, caches=None, write_index=None):
        window = getattr(self.config, "sliding_window", None)
        updated = []
        for index, kind in enumerate(layer_types(self.config)):
            block = layer(DecoderLayer)(self.config, window if kind == SLIDING else None, self.dtype, name=str(index))
            hidden, cache = block(hidden, rotary, masks[kind], deterministic,
                                  None if caches is None else caches[index], write_index)
            updated.append(cache)
        return hidden, (None if caches is None else updated)


class DecoderModel(nn.Module):
    """The decoder: ids [B, L] -> (final-norm hidden states [B, L, H], decoding state or None).

    Without a decoding `state`, token l is slot l and attention_mask [B, L] marks the real
    tokens (position ids 0..L-1 in every row where not given, as Transformers, padding or not);
    segment_ids [B, L] keep packed examples apart (gpt2.same_segment). With generation.py's
    `state`, the tokens are written to its cache at slots state["index"].., their position ids
    come from it, and the advanced state is returned."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 state: Optional[dict] = None, segment_ids=None):
        config = self.config
        length = input_ids.shape[-1]
        if state is None:
            key_valid = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
            slots, caches, write_index = jnp.arange(length), None, None
        else:
            position_ids, _ = generation.cache_inputs(state, length)
            key_valid, write_index = state["cache"]["key_mask"], state["index"]
            slots, caches = write_index + jnp.arange(length), state["cache"]["layers"]
        embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=self.dtype,
                         embedding_init=nn.initializers.normal(config.initializer_range), name="embed_tokens")
        hidden = embed(jnp.asarray(input_ids, jnp.int32))
        if VARIANTS[config.model_type].gemma:
            hidden = hidden * jnp.asarray(config.hidden_size**0.5, self.dtype)
        window = getattr(config, "sliding_window", None)
        masks = {FULL: attention_mask_over(slots, key_valid, None), SLIDING: attention_mask_over(slots, key_valid, window)}
        if segment_ids is not None:
            masks = {kind: mask & same_segment(segment_ids) for kind, mask in masks.items()}
        hidden, caches = DecoderLayers(config, self.dtype, name="layers")(
            hidden, rotary_tables(config, position_ids), masks, deterministic, caches, write_index)
        if state is not None:
            state = generation.advance_state(state, caches, length)
        return _norm(config, self.dtype, "norm")(hidden), state

    def token_embedding(self) -> Array:
        """The token embedding table [V, H]; call after `__call__`."""
        return self.variables["params"]["embed_tokens"]["embedding"]


class LlamaForCausalLM(nn.Module):
    """Language model of every model type in `VARIANTS`: `Module(config=..., dtype=...)`.

    Inputs: input_ids [B, L]; optional attention_mask [B, L] (1 = token, 0 = padding),
    position_ids [B, L] and segment_ids [B, L] (packed examples, see gpt2.same_segment; give
    position_ids restarting at 0 per example with them). Logits [B, L, V] float32 (Gemma 2:
    soft-capped); position t scores the
    token at t + 1. The output projection is the token embedding with `tie_word_embeddings`.
    `prefill` and `decode_step` serve generation.py (decoder-only contract).
    """

    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.model = DecoderModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config, self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 segment_ids=None) -> Output:
        hidden, _ = self.model(input_ids, attention_mask, position_ids, deterministic, segment_ids=segment_ids)
        return Output(logits=self._logits(hidden))

    def prefill(self, input_ids, attention_mask, *, max_length: int):
        """The left-padded prompt input_ids, attention_mask [B, P] into a cache for max_length tokens
        of num_key_value_heads heads: (logits [B, V] float32 of the last prompt position, state)."""
        config = self.config
        state = generation.init_state(attention_mask, max_length, config.num_hidden_layers,
                                      config.num_key_value_heads, head_size(config), self.dtype)
        hidden, state = self.model(input_ids, state=state)
        return self._logits(hidden[:, -1]), state

    def decode_step(self, token_ids, state):
        """One token per row, token_ids [B] -> (logits [B, V] float32 of the next token, next state)."""
        hidden, state = self.model(token_ids[:, None], state=state)
        return self._logits(hidden[:, 0]), state

    def _logits(self, hidden: Array) -> Array:
        """Hidden states [..., H] -> float32 logits [..., V] (soft-capped where the config says)."""
        if self.config.tie_word_embeddings:
            logits = hidden @ jnp.asarray(self.model.token_embedding(), self.dtype).T
        else:
            logits = self.lm_head(hidden)
        return soft_cap(logits.astype(jnp.float32), getattr(self.config, "final_logit_softcapping", None))


class LlamaForSequenceClassification(nn.Module):
    """Sequence classifier of every model type in `VARIANTS`: logits [B, C] float32 of the last real token.

    The last real token is found as Transformers' PyTorch classes find it: the rightmost token
    that is not `pad_token_id` (left or right padding alike; where the padding id is also the end
    id, a closing end token counts as padding there too). Without a `pad_token_id` it is the
    rightmost position the attention mask marks (Transformers refuses batches of more than one).
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True) -> Output:
        config = self.config
        hidden, _ = DecoderModel(config, self.dtype, name="model")(input_ids, attention_mask, position_ids,
                                                                    deterministic)
        logits = _dense(config, config.num_labels, False, self.dtype, "score")(hidden)  # [B, L, C]
        if config.pad_token_id is not None:
            real = input_ids != config.pad_token_id
        else:
            real = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask > 0
        last = jnp.argmax(jnp.arange(input_ids.shape[-1]) * real, axis=-1)
        return Output(logits=jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0].astype(jnp.float32))


for _model_type in VARIANTS:  # each has a *ForSequenceClassification class in Transformers' PyTorch
    register_family(_model_type, Family(base_prefix="model"))
    register(_model_type, "causal-lm")(LlamaForCausalLM)
    register(_model_type, "sequence-classification")(LlamaForSequenceClassification)
