"""GPT-2 with its language-modelling head (task "causal-lm").

Parameter trees follow Transformers 4.x (FlaxGPT2LMHeadModel): a pre-LayerNorm
decoder under "transformer" whose projections are "Conv1D" layers, stored as
kernel [out, in] (the transpose of a Dense kernel) plus bias. With
`config.tie_word_embeddings` (the default) the output projection is the token
embedding table and the tree has no `lm_head`.

Generation (`generation.generate`): `prefill` and `decode_step` write keys and values into a
cache per layer, as generation.py's module docstring describes. `decoder_inputs` and
`DecoderForCausalLM` (the language-model head over any decoder with GPT2Model's interface, with
`prefill` / `decode_step`) serve the other decoder families too.

Numerics as Transformers' Flax class: attention scaled by 1/sqrt(head size);
`scale_attn_weights`, `scale_attn_by_inverse_layer_idx` and
`reorder_and_upcast_attn` are not read (that class ignores them too).

Shapes: B batch, L sequence length, H hidden size (`n_embd`), N heads,
D head size, V vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_finetune.modeling import Family, Output, generation, layer, register, register_family
from flax_finetune.modeling.bert import activation, attend

Array = Any


class Conv1D(nn.Module):
    """GPT-2's linear layer: [..., in] -> [..., features], kernel stored as [features, in]."""

    features: int
    dtype: Any = jnp.float32
    stddev: float = 0.02

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.normal(self.stddev), (self.features, inputs.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        inputs = jnp.asarray(inputs, self.dtype)
        return inputs @ jnp.asarray(kernel, self.dtype).T + jnp.asarray(bias, self.dtype)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention (`c_attn` -> attend -> `c_proj` -> dropout): [B, L, H] -> [B, L, H].

    With a layer `cache` ({"key", "value"} [B, max_length, N, D]) the keys and values are written
    at `index` and the queries attend over the whole cache (`mask` [B, 1, L, max_length]).
    Returns (output, the updated cache or None).
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool, cache=None, index=None):
        config = self.config
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"n_embd {config.hidden_size} is not a multiple of n_head {config.num_attention_heads}"
            )
        stddev = config.initializer_range
        qkv = Conv1D(3 * config.hidden_size, self.dtype, stddev, name="c_attn")(hidden)  # [B, L, 3H]
        query, key, value = (
            part.reshape(part.shape[:2] + (config.num_attention_heads, -1)) for part in jnp.split(qkv, 3, axis=-1)
        )
        if cache is not None:
            cache = generation.update_cache(cache, key, value, index)
            key, value = cache["key"], cache["value"]
        # one dropout mask for every row and head, as Transformers' Flax GPT-2 (and a third of the cost)
        probs_dropout = nn.Dropout(config.attn_pdrop, broadcast_dims=(0, 1))
        context = attend(query, key, value, mask, probs_dropout, deterministic)
        context = context.reshape(context.shape[:2] + (-1,))
        context = Conv1D(config.hidden_size, self.dtype, stddev, name="c_proj")(context)
        return nn.Dropout(config.resid_pdrop)(context, deterministic=deterministic), cache


class GPT2MLP(nn.Module):
    """`c_fc` -> activation -> `c_proj` -> dropout: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        config = self.config
        inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        hidden = Conv1D(inner, self.dtype, config.initializer_range, name="c_fc")(hidden)
        hidden = activation(config.activation_function)(hidden)
        hidden = Conv1D(config.hidden_size, self.dtype, config.initializer_range, name="c_proj")(hidden)
        return nn.Dropout(config.resid_pdrop)(hidden, deterministic=deterministic)


class GPT2Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.)): [B, L, H] -> ([B, L, H], cache)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool, cache=None, index=None):
        eps = self.config.layer_norm_epsilon
        normed = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="ln_1")(hidden)
        attended, cache = GPT2Attention(self.config, self.dtype, name="attn")(normed, mask, deterministic, cache, index)
        hidden = hidden + attended
        normed = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="ln_2")(hidden)
        return hidden + GPT2MLP(self.config, self.dtype, name="mlp")(normed, deterministic), cache


class GPT2BlockStack(nn.Module):
    """`n_layer` blocks named "0", "1", ...: [B, L, H] -> ([B, L, H], per-layer caches or None)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool, caches=None, index=None):
        new_caches = []
        for number in range(self.config.num_hidden_layers):
            cache = None if caches is None else caches[number]
            block = layer(GPT2Block)(self.config, self.dtype, name=str(number))
            hidden, cache = block(hidden, mask, deterministic, cache, index)
            new_caches.append(cache)
        return hidden, (None if caches is None else new_caches)


def same_segment(segment_ids: Array) -> Array:
    """Boolean [B, 1, L, L]: query i may attend key j when both lie in the same packed example.

    segment_ids [B, L]: 1, 2, ... numbers the examples packed into a row, 0 marks padding (which
    attends to nothing). Shared by every causal-LM family: with it, each example of a packed row
    gets the logits it would get alone (given position ids that restart per example)."""
    segment_ids = jnp.asarray(segment_ids)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids > 0)[:, None, :])[:, None]


def causal_mask(length: int, attention_mask: Optional[Array], segment_ids: Optional[Array] = None) -> Array:
    """Boolean [B or 1, 1, L, L]: query i may attend key j when j <= i, key j is not padding and,
    with `segment_ids` [B, L], both lie in the same example (`same_segment`)."""
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask > 0)[:, None, None, :]
    if segment_ids is not None:
        mask = mask & same_segment(segment_ids)
    return mask


def decoder_inputs(length: int, attention_mask: Optional[Array], position_ids: Array, state: Optional[dict],
                   segment_ids: Optional[Array] = None):
    """Position ids [B, L] and attention mask (boolean [B or 1, 1, L, K]) of a decoder's L tokens.

    Without a decoding `state`: the given position ids and the causal mask over the L tokens
    (K = L), within each example where `segment_ids` [B, L] are given. With one (generation.py's):
    positions and mask over the whole cache (K = max_length) from `generation.cache_inputs`."""
    if state is None:
        return position_ids, causal_mask(length, attention_mask, segment_ids)
    return generation.cache_inputs(state, length)


class GPT2Model(nn.Module):
    """The decoder: ids [B, L] -> (final-LayerNorm hidden states [B, L, H], decoding state or None).

    With a decoding `state` (generation.py's), position ids and the mask come from it, the
    tokens are written to its cache, and the advanced state is returned. `segment_ids` [B, L]
    keep packed examples from attending to each other (see `same_segment`).
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        deterministic: bool = True,
        state: Optional[dict] = None,
        segment_ids: Optional[Array] = None,
    ):
        config = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        length = input_ids.shape[-1]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        position_ids, mask = decoder_inputs(length, attention_mask, position_ids, state, segment_ids)
        init = nn.initializers.normal(config.initializer_range)
        hidden = nn.Embed(config.vocab_size, config.hidden_size, embedding_init=init, dtype=self.dtype, name="wte")(
            input_ids
        ) + nn.Embed(
            config.max_position_embeddings, config.hidden_size, embedding_init=init, dtype=self.dtype, name="wpe"
        )(jnp.asarray(position_ids, jnp.int32))
        hidden = nn.Dropout(config.embd_pdrop)(hidden, deterministic=deterministic)
        caches, index = (None, None) if state is None else (state["cache"]["layers"], state["index"])
        hidden, caches = GPT2BlockStack(config, self.dtype, name="h")(hidden, mask, deterministic, caches, index)
        if state is not None:
            state = generation.advance_state(state, caches, length)
        return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(hidden), state

    def token_embedding(self) -> Array:
        """The token embedding table `wte` [V, H]; call after `__call__`."""
        return self.variables["params"]["wte"]["embedding"]


register_family("gpt2", Family(base_prefix="transformer"))


class DecoderForCausalLM(nn.Module):
    """A decoder (`base_class`, named `base_name`) with a language-modelling head: `Module(config=..., dtype=...)`.

    Inputs: input_ids [B, L]; optional attention_mask [B, L] (1 = token, 0 = padding),
    position_ids [B, L] and segment_ids [B, L] (packed examples, see `same_segment`; give
    position_ids restarting at 0 per example with them). Logits [B, L, V] (float32); position t
    scores the token at t + 1. With
    `config.tie_word_embeddings` the projection is the base's token embedding table (its
    `token_embedding()`), else an `lm_head` Dense without bias. `prefill` and `decode_step`
    serve `generation.generate`; the base takes GPT2Model's arguments (a decoding `state`
    included) and its config names its layer count `num_hidden_layers`.
    """

    config: Any
    dtype: Any = jnp.float32
    base_class: ClassVar[type]
    base_name: ClassVar[str]
    init_std_name: ClassVar[str] = "initializer_range"

    def setup(self):
        config = self.config
        setattr(self, self.base_name, self.base_class(config, self.dtype))  # named after the attribute
        if not config.tie_word_embeddings:
            init = nn.initializers.normal(getattr(config, self.init_std_name))
            self.lm_head = nn.Dense(config.vocab_size, use_bias=False, dtype=self.dtype, kernel_init=init)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 segment_ids=None) -> Output:
        hidden, _ = getattr(self, self.base_name)(input_ids, attention_mask, position_ids, deterministic,
                                                   segment_ids=segment_ids)
        return Output(logits=self._logits(hidden))

    def prefill(self, input_ids, attention_mask, *, max_length: int):
        """The left-padded prompt input_ids/attention_mask [B, P] into a cache for max_length tokens:
        (logits [B, V] float32 of the last prompt position, decoding state)."""
        config = self.config
        heads = config.num_attention_heads
        state = generation.init_state(
            attention_mask, max_length, config.num_hidden_layers, heads, config.hidden_size // heads, self.dtype
        )
        hidden, state = getattr(self, self.base_name)(input_ids, state=state)
        return self._logits(hidden[:, -1]), state

    def decode_step(self, token_ids, state):
        """One token per row, token_ids [B] -> (logits [B, V] float32 of the next token, next state)."""
        hidden, state = getattr(self, self.base_name)(token_ids[:, None], state=state)
        return self._logits(hidden[:, 0]), state

    def _logits(self, hidden: Array) -> Array:
        """hidden [..., H] -> float32 logits [..., V]."""
        if self.config.tie_word_embeddings:
            embedding = getattr(self, self.base_name).token_embedding()
            return (hidden @ jnp.asarray(embedding, self.dtype).T).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)


@register("gpt2", "causal-lm")
class GPT2LMHeadModel(DecoderForCausalLM):
    """GPT-2 language model (FlaxGPT2LMHeadModel's tree); see DecoderForCausalLM."""

    base_class = GPT2Model
    base_name = "transformer"
