"""OPT with its language-modelling (task "causal-lm") and sequence-classification heads.

Parameter trees follow Transformers 4.x (FlaxOPTForCausalLM): the decoder under "model/decoder",
`lm_head` only with untied embeddings. No Flax class has the classifier: its `score` (Dense without
bias) maps onto PyTorch's OPTForSequenceClassification.

Architecture as Transformers (PyTorch and Flax):
- learned positions with an offset of 2: a token's position is (number of real tokens up to it) - 1,
  from the attention mask (padding gets -1), looked up at position + 2;
- token embeddings of width `word_embed_proj_dim` P, projected to the hidden size H and back
  (`project_in`, `project_out`, no bias) where P != H (OPT-350m);
- `do_layer_norm_before`: pre-LayerNorm (and a final LayerNorm, unless `_remove_final_layer_norm`)
  or post-LayerNorm (OPT-350m); LayerNorm epsilon 1e-5; `layer_norm_elementwise_affine` False
  drops the LayerNorms' parameters, `enable_bias` False the projections' biases (PyTorch reads
  both; Transformers' Flax class ignores them).

Shapes: B batch, L sequence length, H hidden size, P `word_embed_proj_dim`, V vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_finetune.modeling import Family, generation, register, register_family
from flax_finetune.modeling.bert import activation
from flax_finetune.modeling.gpt_neo import (
    DecoderForCausalLM,
    DecoderForSequenceClassification,
    DecoderLayerStack,
    SelfAttention,
    decoder_inputs,
)

Array = Any

POSITION_OFFSET = 2
"""OPT's learned position table has two rows before position 0 (fairseq's padding positions)."""


def _layer_norm(config, dtype: Any, name: str) -> nn.LayerNorm:
    affine = getattr(config, "layer_norm_elementwise_affine", True)
    return nn.LayerNorm(epsilon=1e-5, use_bias=affine, use_scale=affine, dtype=dtype, name=name)


class OPTDecoderLayer(nn.Module):
    """Self-attention and feed-forward sub-blocks, each LayerNorm before (pre) or after (post) it:
    [B, L, H] -> ([B, L, H], cache) (see `SelfAttention` for the cache)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Array, deterministic: bool, cache=None, index=None):
        config = self.config
        before = config.do_layer_norm_before
        bias = getattr(config, "enable_bias", True)
        dropout = partial(nn.Dropout(config.dropout), deterministic=deterministic)
        dense = partial(nn.Dense, use_bias=bias, dtype=self.dtype, kernel_init=nn.initializers.normal(config.init_std))

        norm = _layer_norm(config, self.dtype, "self_attn_layer_norm")
        attended, cache = SelfAttention(
            config.hidden_size, config.num_attention_heads, config.init_std, config.attention_dropout,
            projection_bias=bias, output_bias=bias, dtype=self.dtype, name="self_attn",
        )(norm(hidden) if before else hidden, mask, deterministic, cache, index)
        hidden = hidden + dropout(attended)
        if not before:
            hidden = norm(hidden)

        norm = _layer_norm(config, self.dtype, "final_layer_norm")
        expanded = activation(config.activation_function)(dense(config.ffn_dim, name="fc1")(
            norm(hidden) if before else hidden
        ))
        hidden = hidden + dropout(dense(config.hidden_size, name="fc2")(expanded))
        return (hidden if before else norm(hidden)), cache


class OPTDecoder(nn.Module):
    """The decoder: ids [B, L] -> (hidden states [B, L, P], decoding state or None).

    With a decoding `state` (generation.py's), position ids and the mask come from it, the keys
    and values go to its cache, and the advanced state is returned. `segment_ids` [B, L] keep
    packed examples apart (gpt2.same_segment); give position_ids restarting per example with them.
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
            real = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
            position_ids = jnp.cumsum(real, axis=-1) * real - 1
        position_ids, mask = decoder_inputs(length, attention_mask, position_ids, state, segment_ids)
        init = nn.initializers.normal(config.init_std)
        projected = config.word_embed_proj_dim != config.hidden_size
        project = partial(nn.Dense, use_bias=False, dtype=self.dtype)
        hidden = nn.Embed(config.vocab_size, config.word_embed_proj_dim, embedding_init=init, dtype=self.dtype,
                          name="embed_tokens")(input_ids)
        if projected:
            hidden = project(config.hidden_size, name="project_in")(hidden)
        hidden = hidden + nn.Embed(
            config.max_position_embeddings + POSITION_OFFSET, config.hidden_size, embedding_init=init,
            dtype=self.dtype, name="embed_positions",
        )(jnp.asarray(position_ids, jnp.int32) + POSITION_OFFSET)
        caches, index = (None, None) if state is None else (state["cache"]["layers"], state["index"])
        hidden, caches = DecoderLayerStack(OPTDecoderLayer, config, self.dtype, name="layers")(
            hidden, [mask] * config.num_hidden_layers, deterministic, caches, index
        )
        if state is not None:
            state = generation.advance_state(state, caches, length)
        if config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False):
            hidden = _layer_norm(config, self.dtype, "final_layer_norm")(hidden)
        if projected:
            hidden = project(config.word_embed_proj_dim, name="project_out")(hidden)
        return hidden, state


class OPTModel(nn.Module):
    """The base model (the tree's "model" level holds only "decoder"): ids [B, L] -> ([B, L, P], state)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True, state=None,
                 segment_ids=None):
        return OPTDecoder(self.config, self.dtype, name="decoder")(
            input_ids, attention_mask, position_ids, deterministic, state, segment_ids
        )

    def token_embedding(self) -> Array:
        """The token embedding table `embed_tokens` [V, P]; call after `__call__`."""
        return self.variables["params"]["decoder"]["embed_tokens"]["embedding"]


register_family("opt", Family(base_prefix="model"))


@register("opt", "causal-lm")
class OPTForCausalLM(DecoderForCausalLM):
    """OPT language model (FlaxOPTForCausalLM's tree)."""

    base_class = OPTModel
    base_name = "model"
    init_std_name = "init_std"


@register("opt", "sequence-classification")
class OPTForSequenceClassification(DecoderForSequenceClassification):
    """OPT classifier (PyTorch OPTForSequenceClassification's names)."""

    base_class = OPTModel
    base_name = "model"
    init_std_name = "init_std"
