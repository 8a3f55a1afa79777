"""RoFormer: BERT's encoder with rotary positions instead of position embeddings.

Parameter trees follow Transformers 4.x (FlaxRoFormerFor*), whose names are those of the
PyTorch RoFormerFor* classes. The differences from BERT:

- no position embeddings: every layer rotates each query and key (and value, with
  `config.rotary_value`) by its position, in pairs of features (2k, 2k + 1) by the angle
  position / 10000^(2k / D). The sine and cosine table is a constant, not a parameter;
  PyTorch checkpoints hold it as `roformer.encoder.embed_positions.weight`: skipped on reading,
  written on saving (with the config) so that the PyTorch class finds every key;
- the embeddings are `config.embedding_size` (E) wide, projected up to the hidden size by
  `embeddings_project` where E != H (PyTorch's layout; 4.x's Flax classes have no projection
  and only allow E == H), and the masked-LM transform projects back down to E;
- the sequence classifier is RoBERTa's head with the config's activation instead of tanh.

Shapes: B batch, L sequence length, H hidden size, E embedding size, N heads, D head size
(H = N * D), V vocabulary, C labels.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flax_finetune.modeling import Family, Output, layer, register, register_family
from flax_finetune.modeling.albert import project_heads
from flax_finetune.modeling.bert import (
    BertIntermediate,
    BertMaskedLMHead,
    DenseResidualNorm,
    RobertaClassificationHead,
    _Encoder,
    _normal,
    _QuestionAnswering,
    _TokenClassification,
    attend,
    default_ids,
    padding_mask,
)
from flax_finetune.modeling.distilbert import sinusoidal_positions

Array = Any


def rotary_table(config) -> np.ndarray:
    """Transformers' sinusoidal table [max_position_embeddings, D]: the sines of each position's angles,
    then their cosines (PyTorch keeps it as `encoder.embed_positions.weight`)."""
    head_size = config.hidden_size // config.num_attention_heads
    if head_size % 2:
        raise ValueError(f"rotary positions need an even head size, got {head_size}")
    interleaved = sinusoidal_positions(config.max_position_embeddings, head_size)  # sin, cos, sin, cos, ...
    return np.concatenate([interleaved[:, 0::2], interleaved[:, 1::2]], axis=-1)


def rotary_angles(config, position_ids: Array, dtype: Any) -> tuple[Array, Array]:
    """sin and cos [B, L, 1, D/2] of the angles of positions [B, L]."""
    table = jnp.asarray(rotary_table(config), dtype)[position_ids][:, :, None, :]
    return jnp.split(table, 2, axis=-1)


def rotate_pairs(states: Array, sin: Array, cos: Array) -> Array:
    """Rotate each pair of features (2k, 2k + 1) of states [B, L, N, D] by angle k: [B, L, N, D]."""
    swapped = jnp.stack([-states[..., 1::2], states[..., 0::2]], axis=-1).reshape(states.shape)
    return states * jnp.repeat(cos, 2, axis=-1) + swapped * jnp.repeat(sin, 2, axis=-1)


class RoFormerSelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions, without its output projection: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], position_ids: Array, deterministic: bool) -> Array:
        config = self.config
        query, key, value = (project_heads(config, self.dtype, hidden, name) for name in ("query", "key", "value"))
        sin, cos = rotary_angles(config, position_ids, self.dtype)
        query, key = rotate_pairs(query, sin, cos), rotate_pairs(key, sin, cos)
        if config.rotary_value:
            value = rotate_pairs(value, sin, cos)
        probs_dropout = nn.Dropout(config.attention_probs_dropout_prob, broadcast_dims=(0, 1))
        context = attend(query, key, value, mask, probs_dropout, deterministic)
        return context.reshape(context.shape[:2] + (-1,))


class RoFormerAttention(nn.Module):
    """`self` (rotary self-attention), then `output` (dense, dropout, LayerNorm(x + input)): [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], position_ids: Array, deterministic: bool) -> Array:
        context = RoFormerSelfAttention(self.config, self.dtype, name="self")(hidden, mask, position_ids, deterministic)
        return DenseResidualNorm(self.config, self.dtype, name="output")(context, hidden, deterministic)


class RoFormerLayer(nn.Module):
    """BERT's layer with rotary attention: `attention`, `intermediate`, `output`."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], position_ids: Array, deterministic: bool) -> Array:
        attended = RoFormerAttention(self.config, self.dtype, name="attention")(hidden, mask, position_ids, deterministic)
        expanded = BertIntermediate(self.config, self.dtype, name="intermediate")(attended)
        return DenseResidualNorm(self.config, self.dtype, name="output")(expanded, attended, deterministic)


class RoFormerLayerStack(nn.Module):
    """`num_hidden_layers` layers, named "0", "1", ...: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], position_ids: Array, deterministic: bool) -> Array:
        for index in range(self.config.num_hidden_layers):
            hidden = layer(RoFormerLayer)(self.config, self.dtype, name=str(index))(
                hidden, mask, position_ids, deterministic
            )
        return hidden


class RoFormerEncoder(nn.Module):
    """Holds the layer stack under the name "layer" (Transformers' nesting)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], position_ids: Array, deterministic: bool) -> Array:
        return RoFormerLayerStack(self.config, self.dtype, name="layer")(hidden, mask, position_ids, deterministic)


class RoFormerEmbeddings(nn.Module):
    """Word + token-type embeddings (no positions), LayerNorm, dropout: ids [B, L] -> [B, L, E]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
        config = self.config
        embed = partial(nn.Embed, features=config.embedding_size, embedding_init=_normal(config), dtype=self.dtype)
        hidden = (embed(config.vocab_size, name="word_embeddings")(input_ids)
                  + embed(config.type_vocab_size, name="token_type_embeddings")(token_type_ids))
        hidden = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(hidden)
        return nn.Dropout(config.hidden_dropout_prob)(hidden, deterministic=deterministic)


class RoFormerModel(nn.Module):
    """The encoder: ids [B, L] -> (hidden states [B, L, H], None: no pooler).

    position_ids [B, L] (default 0, 1, ...) pick the rotary angles."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        token_type_ids: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        deterministic: bool = True,
    ) -> tuple[Array, None]:
        config = self.config
        input_ids, token_type_ids, position_ids = default_ids(input_ids, token_type_ids, position_ids)
        hidden = RoFormerEmbeddings(config, self.dtype, name="embeddings")(input_ids, token_type_ids, deterministic)
        if config.embedding_size != config.hidden_size:
            hidden = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config),
                              name="embeddings_project")(hidden)
        encoder = RoFormerEncoder(config, self.dtype, name="encoder")
        return encoder(hidden, padding_mask(attention_mask), position_ids, deterministic), None

    def word_embedding(self) -> Array:
        """The input word embedding table [V, E] (for the tied decoder); call after `__call__`."""
        return self.variables["params"]["embeddings"]["word_embeddings"]["embedding"]


class _RoFormer:
    """Mixin for bert.py's task bases: the encoder is `RoFormerModel`, named "roformer"."""

    prefix = "roformer"

    def encoder(self, with_pooler: bool = False) -> RoFormerModel:
        return RoFormerModel(self.config, self.dtype, name=self.prefix)


register_family(
    "roformer",
    Family(
        base_prefix="roformer",
        skipped_pytorch_keys=("encoder.embed_positions.weight",),
        pytorch_constants=lambda config: {"encoder.embed_positions.weight": rotary_table(config)},
    ),
)


@register("roformer", "sequence-classification")
class RoFormerForSequenceClassification(_RoFormer, _Encoder):
    """`classifier` (dense, config activation, out_proj) on the first token. Logits [B, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        hidden, _ = self.encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        head = RobertaClassificationHead(self.config, self.dtype, activation_name=self.config.hidden_act,
                                         name="classifier")
        return Output(logits=head(hidden, deterministic).astype(jnp.float32))


@register("roformer", "token-classification")
class RoFormerForTokenClassification(_RoFormer, _TokenClassification):
    pass


@register("roformer", "question-answering")
class RoFormerForQuestionAnswering(_RoFormer, _QuestionAnswering):
    pass


@register("roformer", "masked-lm")
class RoFormerForMaskedLM(_RoFormer, _Encoder):
    """`cls` head over every token. Logits [B, L, V] (float32); tied to the word embeddings by default."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        encoder = self.encoder()
        hidden, _ = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        head = BertMaskedLMHead(self.config, self.dtype, width=self.config.embedding_size, name="cls")
        logits = head(hidden, self.tied_embedding(encoder))
        return Output(logits=logits.astype(jnp.float32))
