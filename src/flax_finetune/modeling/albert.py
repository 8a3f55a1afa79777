"""ALBERT: BERT with narrower embeddings and layers shared across depth.

Parameter trees follow Transformers 4.x (FlaxAlbertFor*). The differences from BERT:

- the embeddings are `config.embedding_size` (E) wide, projected up to the hidden size by
  `encoder/embedding_hidden_mapping_in`;
- there are `num_hidden_groups` groups of `inner_group_num` layers each; the
  `num_hidden_layers` passes go through the groups in order (pass i uses group
  int(i / (num_hidden_layers / num_hidden_groups))), so one group's parameters serve
  several passes (the default: one group of one layer, used at every depth);
- a layer keeps its attention's projections, output dense and LayerNorm in one module
  (`attention`) and names its feed-forward parts `ffn`, `ffn_output`, `full_layer_layer_norm`;
- the pooler is a single dense layer (`pooler`), and the masked-LM head (`predictions`)
  projects to E before the tied decoder.

Shapes: B batch, L sequence length, H hidden size, E embedding size, N heads, D head size
(H = N * D), V vocabulary, C labels.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_finetune.modeling import Family, Output, layer, register, register_family
from flax_finetune.modeling.bert import (
    BertEmbeddings,
    _Encoder,
    _normal,
    _QuestionAnswering,
    activation,
    attend,
    decode_to_vocab,
    default_ids,
    padding_mask,
)

Array = Any


def project_heads(config, dtype: Any, hidden: Array, name: str) -> Array:
    """A dense layer `name` (H -> H) split into heads: [B, L, H] -> [B, L, N, D].

    Call it from a compact method: the caller owns the dense layer (query, key and value of
    ALBERT's and RoFormer's attention)."""
    heads = config.num_attention_heads
    if config.hidden_size % heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {heads}")
    projected = nn.Dense(config.hidden_size, dtype=dtype, kernel_init=_normal(config), name=name)(hidden)
    return projected.reshape(projected.shape[:2] + (heads, -1))


class AlbertAttention(nn.Module):
    """Self-attention, output `dense`, dropout, LayerNorm(x + input), in one module: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        config = self.config
        query, key, value = (project_heads(config, self.dtype, hidden, name) for name in ("query", "key", "value"))
        probs_dropout = nn.Dropout(config.attention_probs_dropout_prob, broadcast_dims=(0, 1))
        context = attend(query, key, value, mask, probs_dropout, deterministic)
        context = context.reshape(context.shape[:2] + (-1,))
        context = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config), name="dense")(context)
        context = nn.Dropout(config.hidden_dropout_prob)(context, deterministic=deterministic)
        return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(context + hidden)


class AlbertLayer(nn.Module):
    """`attention`, then `ffn` -> activation -> `ffn_output` -> dropout -> `full_layer_layer_norm`(x + attended)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        config = self.config
        dense = partial(nn.Dense, dtype=self.dtype, kernel_init=_normal(config))
        attended = AlbertAttention(config, self.dtype, name="attention")(hidden, mask, deterministic)
        expanded = activation(config.hidden_act)(dense(config.intermediate_size, name="ffn")(attended))
        output = nn.Dropout(config.hidden_dropout_prob)(dense(config.hidden_size, name="ffn_output")(expanded),
                                                        deterministic=deterministic)
        norm = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="full_layer_layer_norm")
        return norm(output + attended)


class AlbertLayers(nn.Module):
    """One group's `inner_group_num` layers, named "0", "1", ..., applied in order: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        for index in range(self.config.inner_group_num):
            hidden = layer(AlbertLayer)(self.config, self.dtype, name=str(index))(hidden, mask, deterministic)
        return hidden


class AlbertLayerGroup(nn.Module):
    """Holds a group's layers under the name "albert_layers" (Transformers' nesting)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        return AlbertLayers(self.config, self.dtype, name="albert_layers")(hidden, mask, deterministic)


class AlbertLayerGroups(nn.Module):
    """The `num_hidden_groups` groups ("0", "1", ...) run `num_hidden_layers` times, each group over
    consecutive passes: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        config = self.config
        groups = [AlbertLayerGroup(config, self.dtype, name=str(index)) for index in range(config.num_hidden_groups)]
        passes_per_group = config.num_hidden_layers / config.num_hidden_groups
        for depth in range(config.num_hidden_layers):
            hidden = groups[int(depth / passes_per_group)](hidden, mask, deterministic)  # Transformers' rounding
        return hidden


class AlbertEncoder(nn.Module):
    """`embedding_hidden_mapping_in` (E -> H), then the shared layer groups: [B, L, E] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        config = self.config
        hidden = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config),
                          name="embedding_hidden_mapping_in")(hidden)
        return AlbertLayerGroups(config, self.dtype, name="albert_layer_groups")(hidden, mask, deterministic)


class AlbertModel(nn.Module):
    """The encoder: ids [B, L] -> (hidden states [B, L, H], pooled [B, H] or None).

    `with_pooler` adds `pooler`: tanh(dense(first token)), for the sequence classifier."""

    config: Any
    dtype: Any = jnp.float32
    with_pooler: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        token_type_ids: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        deterministic: bool = True,
    ) -> tuple[Array, Optional[Array]]:
        config = self.config
        embeddings = BertEmbeddings(config, self.dtype, width=config.embedding_size, name="embeddings")
        hidden = embeddings(*default_ids(input_ids, token_type_ids, position_ids), deterministic)
        hidden = AlbertEncoder(config, self.dtype, name="encoder")(hidden, padding_mask(attention_mask), deterministic)
        if not self.with_pooler:
            return hidden, None
        pooler = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config), name="pooler")
        return hidden, jnp.tanh(pooler(hidden[:, 0]))

    def word_embedding(self) -> Array:
        """The input word embedding table [V, E] (for the tied decoder); call after `__call__`."""
        return self.variables["params"]["embeddings"]["word_embeddings"]["embedding"]


class _Albert:
    """Mixin for bert.py's task bases: the encoder is `AlbertModel`, named "albert"."""

    prefix = "albert"

    def encoder(self, with_pooler: bool = False) -> AlbertModel:
        return AlbertModel(self.config, self.dtype, with_pooler=with_pooler, name=self.prefix)


class _AlbertClassification(_Albert, _Encoder):
    """dropout (`classifier_dropout_prob`) -> `classifier`: on the pooled first token (logits [B, C]),
    or with `per_token` on every token (logits [B, L, C]); float32."""

    per_token = False

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        config = self.config
        hidden, pooled = self.encoder(with_pooler=not self.per_token)(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic
        )
        rate = config.hidden_dropout_prob if config.classifier_dropout_prob is None else config.classifier_dropout_prob
        features = nn.Dropout(rate)(hidden if self.per_token else pooled, deterministic=deterministic)
        logits = nn.Dense(config.num_labels, dtype=self.dtype, name="classifier")(features)
        return Output(logits=logits.astype(jnp.float32))


register_family("albert", Family(base_prefix="albert"))


@register("albert", "sequence-classification")
class AlbertForSequenceClassification(_AlbertClassification):
    pass


@register("albert", "token-classification")
class AlbertForTokenClassification(_AlbertClassification):
    per_token = True


@register("albert", "question-answering")
class AlbertForQuestionAnswering(_Albert, _QuestionAnswering):
    pass


class AlbertMLMHead(nn.Module):
    """`dense` (H -> E) -> activation -> `LayerNorm` -> tied (or own `decoder`) projection + `bias`: [B, L, H] -> [B, L, V]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, tied_embedding: Optional[Array]) -> Array:
        config = self.config
        hidden = nn.Dense(config.embedding_size, dtype=self.dtype, name="dense")(hidden)
        hidden = activation(config.hidden_act)(hidden)
        hidden = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(hidden)
        return decode_to_vocab(self, hidden, tied_embedding, config.vocab_size, self.dtype)


@register("albert", "masked-lm")
class AlbertForMaskedLM(_Albert, _Encoder):
    """`predictions` over every token. Logits [B, L, V] (float32); tied to the word embeddings by default."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        encoder = self.encoder()
        hidden, _ = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        logits = AlbertMLMHead(self.config, self.dtype, name="predictions")(hidden, self.tied_embedding(encoder))
        return Output(logits=logits.astype(jnp.float32))
