"""DistilBERT with classification, tagging, span and masked-LM heads.

Parameter trees follow Transformers 4.x (FlaxDistilBertFor*). DistilBERT is a
post-LayerNorm encoder like BERT, without token types or pooler; its
LayerNorms use eps 1e-12 (the config has no field for it), and positions are
learned or, with `config.sinusoidal_pos_embds`, fixed sinusoids (no
parameters).

Shapes: B batch, L sequence length, H `config.dim`, N heads, D head size,
V vocabulary, C labels.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flax_finetune.modeling import Family, Output, layer, register, register_family
from flax_finetune.modeling.bert import activation, attend, decode_to_vocab, padding_mask

Array = Any

LAYER_NORM_EPS = 1e-12  # fixed in DistilBERT


def _normal(config):
    return nn.initializers.normal(stddev=config.initializer_range)


def sinusoidal_positions(num_positions: int, dim: int) -> np.ndarray:
    """Fixed position encodings [num_positions, dim]: sin on even features, cos on odd ones."""
    positions = np.arange(num_positions)[:, None]
    pair = np.arange(dim)[None, :] // 2
    angles = positions / np.power(10000.0, 2 * pair / np.float32(dim))
    table = np.where(np.arange(dim)[None, :] % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


class DistilBertEmbeddings(nn.Module):
    """Word + position embeddings, LayerNorm, dropout: ids [B, L] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, position_ids: Array, deterministic: bool) -> Array:
        config = self.config
        hidden = nn.Embed(
            config.vocab_size, config.dim, embedding_init=_normal(config), dtype=self.dtype, name="word_embeddings"
        )(input_ids)
        if config.sinusoidal_pos_embds:
            table = jnp.asarray(sinusoidal_positions(config.max_position_embeddings, config.dim), self.dtype)
            hidden = hidden + table[position_ids]
        else:
            hidden = hidden + nn.Embed(
                config.max_position_embeddings,
                config.dim,
                embedding_init=_normal(config),
                dtype=self.dtype,
                name="position_embeddings",
            )(position_ids)
        hidden = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="LayerNorm")(hidden)
        return nn.Dropout(config.dropout)(hidden, deterministic=deterministic)


class DistilBertSelfAttention(nn.Module):
    """Multi-head self-attention with `q_lin`, `k_lin`, `v_lin`, `out_lin`: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        config = self.config
        if config.dim % config.n_heads:
            raise ValueError(f"dim {config.dim} is not a multiple of n_heads {config.n_heads}")

        def dense(name: str) -> nn.Dense:
            return nn.Dense(config.dim, dtype=self.dtype, kernel_init=_normal(config), name=name)

        def heads(states: Array) -> Array:  # [B, L, H] -> [B, L, N, D]
            return states.reshape(states.shape[:2] + (config.n_heads, -1))

        context = attend(
            heads(dense("q_lin")(hidden)),
            heads(dense("k_lin")(hidden)),
            heads(dense("v_lin")(hidden)),
            mask,
            nn.Dropout(config.attention_dropout),
            deterministic,
        )
        return dense("out_lin")(context.reshape(context.shape[:2] + (-1,)))


class DistilBertFeedForward(nn.Module):
    """`lin1` -> config activation -> `lin2` -> dropout: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        config = self.config
        hidden = nn.Dense(config.hidden_dim, dtype=self.dtype, kernel_init=_normal(config), name="lin1")(hidden)
        hidden = activation(config.activation)(hidden)
        hidden = nn.Dense(config.dim, dtype=self.dtype, kernel_init=_normal(config), name="lin2")(hidden)
        return nn.Dropout(config.dropout)(hidden, deterministic=deterministic)


class DistilBertBlock(nn.Module):
    """One post-LayerNorm transformer block: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        attended = DistilBertSelfAttention(self.config, self.dtype, name="attention")(hidden, mask, deterministic)
        hidden = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="sa_layer_norm")(attended + hidden)
        fed = DistilBertFeedForward(self.config, self.dtype, name="ffn")(hidden, deterministic)
        return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="output_layer_norm")(fed + hidden)


class DistilBertBlockStack(nn.Module):
    """`n_layers` blocks named "0", "1", ...: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        for index in range(self.config.n_layers):
            hidden = layer(DistilBertBlock)(self.config, self.dtype, name=str(index))(hidden, mask, deterministic)
        return hidden


class DistilBertTransformer(nn.Module):
    """Holds the block stack under the name "layer" (Transformers' nesting)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        return DistilBertBlockStack(self.config, self.dtype, name="layer")(hidden, mask, deterministic)


class DistilBertModel(nn.Module):
    """The encoder: ids [B, L] (and optional attention_mask [B, L]) -> hidden states [B, L, H]."""

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
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        hidden = DistilBertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids, jnp.asarray(position_ids, jnp.int32), deterministic
        )
        return DistilBertTransformer(self.config, self.dtype, name="transformer")(
            hidden, padding_mask(attention_mask), deterministic
        )

    def word_embedding(self) -> Array:
        """The input word embedding table [V, H]; call after `__call__`."""
        return self.variables["params"]["embeddings"]["word_embeddings"]["embedding"]


class _DistilBertTask(nn.Module):
    """Base of the task modules: `Module(config=..., dtype=...)`, the encoder under "distilbert".

    Inputs: input_ids [B, L]; optional attention_mask [B, L] and position_ids
    [B, L]. `token_type_ids` is accepted and ignored: DistilBERT has no
    segment embeddings.
    """

    config: Any
    dtype: Any = jnp.float32

    def encode(self, input_ids, attention_mask, position_ids, deterministic: bool) -> tuple[DistilBertModel, Array]:
        encoder = DistilBertModel(self.config, self.dtype, name="distilbert")
        return encoder, encoder(input_ids, attention_mask, position_ids, deterministic)


register_family("distilbert", Family(base_prefix="distilbert"))


@register("distilbert", "sequence-classification")
class DistilBertForSequenceClassification(_DistilBertTask):
    """First token -> `pre_classifier` -> ReLU -> dropout -> `classifier`. Logits [B, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        config = self.config
        _, hidden = self.encode(input_ids, attention_mask, position_ids, deterministic)
        pooled = nn.Dense(config.dim, dtype=self.dtype, kernel_init=_normal(config), name="pre_classifier")(
            hidden[:, 0]
        )
        pooled = nn.Dropout(config.seq_classif_dropout)(nn.relu(pooled), deterministic=deterministic)
        logits = nn.Dense(config.num_labels, dtype=self.dtype, name="classifier")(pooled)
        return Output(logits=logits.astype(jnp.float32))


@register("distilbert", "token-classification")
class DistilBertForTokenClassification(_DistilBertTask):
    """dropout -> `classifier` on every token. Logits [B, L, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        _, hidden = self.encode(input_ids, attention_mask, position_ids, deterministic)
        hidden = nn.Dropout(self.config.dropout)(hidden, deterministic=deterministic)
        logits = nn.Dense(self.config.num_labels, dtype=self.dtype, name="classifier")(hidden)
        return Output(logits=logits.astype(jnp.float32))


@register("distilbert", "question-answering")
class DistilBertForQuestionAnswering(_DistilBertTask):
    """dropout (`qa_dropout`) -> `qa_outputs` on every token. start_logits, end_logits [B, L] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        if self.config.num_labels != 2:
            raise ValueError(f"question answering needs config.num_labels == 2, got {self.config.num_labels}")
        _, hidden = self.encode(input_ids, attention_mask, position_ids, deterministic)
        hidden = nn.Dropout(self.config.qa_dropout)(hidden, deterministic=deterministic)
        logits = nn.Dense(2, dtype=self.dtype, name="qa_outputs")(hidden).astype(jnp.float32)
        return Output(start_logits=logits[..., 0], end_logits=logits[..., 1])


class VocabBias(nn.Module):
    """The tied projector: hidden [B, L, H] @ embedding.T + own `bias` -> [B, L, V]."""

    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, tied_embedding: Array) -> Array:
        return decode_to_vocab(self, hidden, tied_embedding, self.vocab_size, self.dtype)


@register("distilbert", "masked-lm")
class DistilBertForMaskedLM(_DistilBertTask):
    """`vocab_transform` -> activation -> `vocab_layer_norm` -> `vocab_projector`. Logits [B, L, V] (float32).

    With `config.tie_word_embeddings` (the default) `vocab_projector` holds
    only a bias and projects with the word embeddings; otherwise it is a full
    dense layer (kernel [H, V], bias).
    """

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        config = self.config
        encoder, hidden = self.encode(input_ids, attention_mask, position_ids, deterministic)
        hidden = nn.Dense(config.dim, dtype=self.dtype, kernel_init=_normal(config), name="vocab_transform")(hidden)
        hidden = activation(config.activation)(hidden)
        hidden = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="vocab_layer_norm")(hidden)
        if config.tie_word_embeddings:
            logits = VocabBias(config.vocab_size, self.dtype, name="vocab_projector")(hidden, encoder.word_embedding())
        else:
            logits = nn.Dense(
                config.vocab_size, dtype=self.dtype, kernel_init=_normal(config), name="vocab_projector"
            )(hidden)
        return Output(logits=logits.astype(jnp.float32))
