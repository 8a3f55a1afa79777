"""GPT-2 with its language-modelling head (task "causal-lm").

Parameter trees follow Transformers 4.x (FlaxGPT2LMHeadModel): a pre-LayerNorm
decoder under "transformer" whose projections are "Conv1D" layers, stored as
kernel [out, in] (the transpose of a Dense kernel) plus bias. With
`config.tie_word_embeddings` (the default) the output projection is the token
embedding table and the tree has no `lm_head`.

Numerics as Transformers' Flax class: attention scaled by 1/sqrt(head size);
`scale_attn_weights`, `scale_attn_by_inverse_layer_idx` and
`reorder_and_upcast_attn` are not read (that class ignores them too).

Shapes: B batch, L sequence length, H hidden size (`n_embd`), N heads,
D head size, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_finetune.modeling import Family, Output, register, register_family
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
    """Causal multi-head self-attention (`c_attn` -> attend -> `c_proj` -> dropout): [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
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
        # one dropout mask for every row and head, as Transformers' Flax GPT-2 (and a third of the cost)
        probs_dropout = nn.Dropout(config.attn_pdrop, broadcast_dims=(0, 1))
        context = attend(query, key, value, mask, probs_dropout, deterministic)
        context = context.reshape(context.shape[:2] + (-1,))
        context = Conv1D(config.hidden_size, self.dtype, stddev, name="c_proj")(context)
        return nn.Dropout(config.resid_pdrop)(context, deterministic=deterministic)


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
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.)): [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
        eps = self.config.layer_norm_epsilon
        normed = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="ln_1")(hidden)
        hidden = hidden + GPT2Attention(self.config, self.dtype, name="attn")(normed, mask, deterministic)
        normed = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="ln_2")(hidden)
        return hidden + GPT2MLP(self.config, self.dtype, name="mlp")(normed, deterministic)


class GPT2BlockStack(nn.Module):
    """`n_layer` blocks named "0", "1", ...: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool) -> Array:
        for index in range(self.config.num_hidden_layers):
            hidden = GPT2Block(self.config, self.dtype, name=str(index))(hidden, mask, deterministic)
        return hidden


def causal_mask(length: int, attention_mask: Optional[Array]) -> Array:
    """Boolean [B or 1, 1, L, L]: query i may attend key j when j <= i and key j is not padding."""
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask > 0)[:, None, None, :]
    return mask


class GPT2Model(nn.Module):
    """The decoder: ids [B, L] -> final-LayerNorm hidden states [B, L, H]."""

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
        config = self.config
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        init = nn.initializers.normal(config.initializer_range)
        hidden = nn.Embed(config.vocab_size, config.hidden_size, embedding_init=init, dtype=self.dtype, name="wte")(
            input_ids
        ) + nn.Embed(
            config.max_position_embeddings, config.hidden_size, embedding_init=init, dtype=self.dtype, name="wpe"
        )(jnp.asarray(position_ids, jnp.int32))
        hidden = nn.Dropout(config.embd_pdrop)(hidden, deterministic=deterministic)
        mask = causal_mask(input_ids.shape[-1], attention_mask)
        hidden = GPT2BlockStack(config, self.dtype, name="h")(hidden, mask, deterministic)
        return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(hidden)

    def token_embedding(self) -> Array:
        """The token embedding table `wte` [V, H]; call after `__call__`."""
        return self.variables["params"]["wte"]["embedding"]


register_family("gpt2", Family(base_prefix="transformer"))


@register("gpt2", "causal-lm")
class GPT2LMHeadModel(nn.Module):
    """GPT-2 language model: `Module(config=..., dtype=...)`.

    Inputs: input_ids [B, L]; optional attention_mask [B, L] (1 = token,
    0 = padding) and position_ids [B, L] (default 0..L-1). Logits [B, L, V]
    (float32); position t scores the token at t + 1.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True) -> Output:
        config = self.config
        transformer = GPT2Model(config, self.dtype, name="transformer")
        hidden = transformer(input_ids, attention_mask, position_ids, deterministic)
        if config.tie_word_embeddings:
            logits = hidden @ jnp.asarray(transformer.token_embedding(), self.dtype).T
        else:
            logits = nn.Dense(
                config.vocab_size,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=nn.initializers.normal(config.initializer_range),
                name="lm_head",
            )(hidden)
        return Output(logits=logits.astype(jnp.float32))
