"""GPT-Neo with its language-modelling (task "causal-lm") and sequence-classification heads.

Parameter trees follow Transformers 4.x (FlaxGPTNeoForCausalLM): a pre-LayerNorm decoder under
"transformer" (GPT-2's layout with Dense projections: `attn/attention/{q,k,v,out}_proj`,
`mlp/{c_fc,c_proj}`). With `config.tie_word_embeddings` (the default) the output projection is the
token embedding table and the tree has no `lm_head`. No Flax class has the classifier: its `score`
(Dense without bias) maps onto PyTorch's GPTNeoForSequenceClassification.

Numerics as Transformers: attention scores are NOT scaled by 1/sqrt(head size); layers alternate
global and local attention as `config.attention_layers` says, a local layer's query seeing only the
`window_size` latest positions up to itself.

`SelfAttention`, `DecoderLayerStack`, `decoder_inputs`, `last_token` and the two head classes
(`DecoderForCausalLM`, with `prefill` / `decode_step` for generation.py's key/value-cache
generation, and `DecoderForSequenceClassification`) are shared with opt.py.

Shapes: B batch, L sequence length, H hidden size, N heads, D head size, V vocabulary, C labels.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_finetune.modeling import Family, Output, generation, layer, register, register_family
from flax_finetune.modeling.bert import activation, attend
from flax_finetune.modeling.gpt2 import DecoderForCausalLM, decoder_inputs

Array = Any


def within_window(query_slots: Array, key_count: int, window: int) -> Array:
    """Boolean [1, 1, Lq, Lk]: the query at slot i may see key slot j when i - j < window (a local layer's reach).

    Slots count from the sequence's (or the cache's) start, left padding included, as Transformers'
    GPT-Neo counts them."""
    distance = query_slots[:, None] - jnp.arange(key_count)[None, :]
    return (distance < window)[None, None]


def last_token(hidden: Array, input_ids: Array, attention_mask: Optional[Array], pad_token_id: Optional[int]) -> Array:
    """The hidden state of each row's last real token: [B, L, H] -> [B, H].

    As Transformers' *ForSequenceClassification: the rightmost token that is not `pad_token_id`
    (left or right padding alike; where the padding id is also the end id, a closing end token
    counts as padding too). Without a `pad_token_id`, where Transformers takes the last position
    (and refuses batches of several rows), the last position whose attention_mask is 1.
    """
    if pad_token_id is not None:
        real = input_ids != pad_token_id
    elif attention_mask is not None:
        real = attention_mask > 0
    else:
        real = jnp.ones(input_ids.shape, bool)
    index = jnp.argmax(jnp.where(real, jnp.arange(input_ids.shape[-1]), -1), axis=-1)  # [B]
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class SelfAttention(nn.Module):
    """Multi-head self-attention with `{q,k,v,out}_proj` Dense layers: [B, L, H] -> ([B, L, H], cache).

    `scaled`: scores divided by sqrt(D) (OPT, most models) or not (GPT-Neo). `mask` boolean,
    broadcastable to [B, N, L, K]. With a layer `cache` ({"key", "value"} [B, max_length, N, D])
    the keys and values are written at slot `index` and the queries attend over the whole cache
    (K = max_length); the updated cache is returned (None without one).
    """

    hidden_size: int
    heads: int
    init_std: float
    attention_dropout: float
    projection_bias: bool = True
    output_bias: bool = True
    scaled: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool, cache=None, index=None):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden size {self.hidden_size} is not a multiple of {self.heads} heads")
        dense = partial(nn.Dense, self.hidden_size, dtype=self.dtype, kernel_init=nn.initializers.normal(self.init_std))

        def project(name: str) -> Array:  # [B, L, H] -> [B, L, N, D]
            projected = dense(use_bias=self.projection_bias, name=name)(hidden)
            return projected.reshape(projected.shape[:2] + (self.heads, -1))

        query, key, value = project("q_proj"), project("k_proj"), project("v_proj")
        if not self.scaled:  # `attend` divides by sqrt(D): as Transformers' Flax GPT-Neo, multiply first
            query = query * jnp.sqrt(query.shape[-1]).astype(self.dtype)
        if cache is not None:
            cache = generation.update_cache(cache, key, value, index)
            key, value = cache["key"], cache["value"]
        probs_dropout = nn.Dropout(self.attention_dropout, broadcast_dims=(0, 1))  # one mask for all rows and heads
        context = attend(query, key, value, mask, probs_dropout, deterministic)
        context = context.reshape(context.shape[:2] + (-1,))
        return dense(use_bias=self.output_bias, name="out_proj")(context), cache


class DecoderLayerStack(nn.Module):
    """`len(masks)` layers of `layer_class`, named "0", "1", ...; layer i attends with masks[i].

    Each layer is called as layer(hidden, mask, deterministic, cache, index) -> (hidden, cache),
    built through `modeling.layer` (rematerialised under `--gradient_checkpointing`).
    Returns ([B, L, H], the layers' new caches, or None without `caches`).
    """

    layer_class: type
    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, masks: list, deterministic: bool, caches=None, index=None):
        new_caches = []
        for number, mask in enumerate(masks):
            cache = None if caches is None else caches[number]
            hidden, cache = layer(self.layer_class)(self.config, self.dtype, name=str(number))(
                hidden, mask, deterministic, cache, index
            )
            new_caches.append(cache)
        return hidden, (None if caches is None else new_caches)


class GPTNeoAttention(nn.Module):
    """GPT-Neo's attention wrapper (the tree's `attn/attention` level), residual dropout after it."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool, cache=None, index=None):
        config = self.config
        hidden, cache = SelfAttention(
            config.hidden_size, config.num_heads, config.initializer_range, config.attention_dropout,
            projection_bias=False, scaled=False, dtype=self.dtype, name="attention",
        )(hidden, mask, deterministic, cache, index)
        return nn.Dropout(config.resid_dropout)(hidden, deterministic=deterministic), cache


class GPTNeoMLP(nn.Module):
    """`c_fc` -> activation -> `c_proj` -> dropout: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        config = self.config
        inner = config.intermediate_size if config.intermediate_size is not None else 4 * config.hidden_size
        dense = partial(nn.Dense, dtype=self.dtype, kernel_init=nn.initializers.normal(config.initializer_range))
        hidden = activation(config.activation_function)(dense(inner, name="c_fc")(hidden))
        hidden = dense(config.hidden_size, name="c_proj")(hidden)
        return nn.Dropout(config.resid_dropout)(hidden, deterministic=deterministic)


class GPTNeoBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.)): [B, L, H] -> ([B, L, H], cache)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool, cache=None, index=None):
        norm = partial(nn.LayerNorm, epsilon=self.config.layer_norm_epsilon, dtype=self.dtype)
        attended, cache = GPTNeoAttention(self.config, self.dtype, name="attn")(
            norm(name="ln_1")(hidden), mask, deterministic, cache, index
        )
        hidden = hidden + attended
        return hidden + GPTNeoMLP(self.config, self.dtype, name="mlp")(norm(name="ln_2")(hidden), deterministic), cache


class GPTNeoModel(nn.Module):
    """The decoder: ids [B, L] -> (final-LayerNorm hidden states [B, L, H], decoding state or None).

    With a decoding `state` (generation.py's), position ids and masks come from it, the keys and
    values go to its cache, and the advanced state is returned. `segment_ids` [B, L] keep packed
    examples apart (gpt2.same_segment).
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
        embed = partial(nn.Embed, features=config.hidden_size, dtype=self.dtype,
                        embedding_init=nn.initializers.normal(config.initializer_range))
        hidden = embed(config.vocab_size, name="wte")(input_ids) + embed(config.max_position_embeddings, name="wpe")(
            jnp.asarray(position_ids, jnp.int32)
        )
        hidden = nn.Dropout(config.embed_dropout)(hidden, deterministic=deterministic)
        first_slot = 0 if state is None else state["index"]
        local = mask & within_window(first_slot + jnp.arange(length), mask.shape[-1], config.window_size)
        masks = [local if kind == "local" else mask for kind in config.attention_layers]
        caches, index = (None, None) if state is None else (state["cache"]["layers"], state["index"])
        hidden, caches = DecoderLayerStack(GPTNeoBlock, config, self.dtype, name="h")(
            hidden, masks, deterministic, caches, index
        )
        if state is not None:
            state = generation.advance_state(state, caches, length)
        return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(hidden), state

    def token_embedding(self) -> Array:
        """The token embedding table `wte` [V, H]; call after `__call__`."""
        return self.variables["params"]["wte"]["embedding"]


class DecoderForSequenceClassification(nn.Module):
    """A decoder with a `score` Dense (no bias) on its last real token (see `last_token`): logits [B, C]."""

    config: Any
    dtype: Any = jnp.float32
    base_class: ClassVar[type]
    base_name: ClassVar[str]
    init_std_name: ClassVar[str] = "initializer_range"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True) -> Output:
        config = self.config
        hidden, _ = self.base_class(config, self.dtype, name=self.base_name)(
            input_ids, attention_mask, position_ids, deterministic
        )
        pooled = last_token(hidden, jnp.asarray(input_ids), attention_mask, config.pad_token_id)
        init = nn.initializers.normal(getattr(config, self.init_std_name))
        logits = nn.Dense(config.num_labels, use_bias=False, dtype=self.dtype, kernel_init=init, name="score")(pooled)
        return Output(logits=logits.astype(jnp.float32))


# older PyTorch checkpoints hold each layer's causal mask as buffers
register_family("gpt_neo", Family(base_prefix="transformer",
                                  skipped_pytorch_keys=("attn.attention.bias", "attn.attention.masked_bias")))


@register("gpt_neo", "causal-lm")
class GPTNeoForCausalLM(DecoderForCausalLM):
    """GPT-Neo language model (FlaxGPTNeoForCausalLM's tree)."""

    base_class = GPTNeoModel
    base_name = "transformer"


@register("gpt_neo", "sequence-classification")
class GPTNeoForSequenceClassification(DecoderForSequenceClassification):
    """GPT-Neo classifier (PyTorch GPTNeoForSequenceClassification's names)."""

    base_class = GPTNeoModel
    base_name = "transformer"
