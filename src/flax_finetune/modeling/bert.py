"""BERT and RoBERTa encoders with classification, tagging, span and masked-LM heads.

Parameter trees follow Transformers 4.x (FlaxBertFor*/FlaxRobertaFor*), so a
`flax_model.msgpack` written by those classes loads unchanged. RoBERTa is the
same encoder with two differences: position ids start after the padding id
(padding tokens keep the padding position), and its sequence-classification
and masked-LM heads have their own layouts. XLM-RoBERTa is RoBERTa under
another model type. RoBERTa-PreLayerNorm (FlaxRobertaPreLayerNormFor*) is
RoBERTa with each sub-block's LayerNorm moved before it and one more LayerNorm
after the last layer (`pre_layer_norm`). ELECTRA (electra.py) reuses the
encoder with embeddings narrower than it (`factorised_embeddings`).

Shapes: B batch, L sequence length, H hidden size, N heads, D head size
(H = N * D), V vocabulary, C labels.

The small building blocks here (`activation`, `attend`, `padding_mask`,
`decode_to_vocab`) are shared with distilbert.py and gpt2.py.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_finetune.modeling import Family, Output, layer, register, register_family

Array = Any


# --------------------------------------------------------------------------- shared blocks


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": partial(jax.nn.gelu, approximate=False),  # exact, through erf
    "gelu_new": partial(jax.nn.gelu, approximate=True),  # tanh approximation (GPT-2)
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation a config names (`hidden_act`, `activation`, `activation_function`)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}") from None


def padding_mask(attention_mask: Optional[Array]) -> Optional[Array]:
    """[B, L] of 1 (attend) / 0 (padding) -> boolean [B, 1, 1, L] over keys, or None."""
    if attention_mask is None:
        return None
    return (attention_mask > 0)[:, None, None, :]


def attend(
    query: Array,
    key: Array,
    value: Array,
    mask: Optional[Array],
    probs_dropout: nn.Dropout,
    deterministic: bool,
) -> Array:
    """Scaled dot-product attention.

    query [B, Lq, N, D], key and value [B, Lk, N, D]; mask boolean,
    broadcastable to [B, N, Lq, Lk] (True = may attend) or None.
    Masked scores become the dtype's most negative value before the softmax
    (an additive large negative, as Transformers does); the softmax runs in
    float32. Returns [B, Lq, N, D].
    """
    dtype = query.dtype
    query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
    scores = jnp.einsum("bqnd,bknd->bnqk", query, key)  # [B, N, Lq, Lk]
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    probs = probs_dropout(probs, deterministic=deterministic)
    return jnp.einsum("bnqk,bknd->bqnd", probs, value)


def decode_to_vocab(
    owner: nn.Module,
    hidden: Array,
    tied_embedding: Optional[Array],
    vocab_size: int,
    dtype: Any,
    kernel_init: Callable = nn.initializers.lecun_normal(),
) -> Array:
    """Hidden states [..., H] -> vocabulary scores [..., V], plus a `bias` [V].

    Call it from a compact method of `owner`, which receives the parameters.
    With `tied_embedding` ([V, H], the input word embeddings) the projection is
    `hidden @ embedding.T` and the module owns only `bias`; without it, the
    module also owns a `decoder` kernel [H, V] (Transformers 4.x's layout).
    """
    if tied_embedding is not None:
        scores = hidden @ jnp.asarray(tied_embedding, dtype).T
    else:
        scores = nn.Dense(vocab_size, use_bias=False, dtype=dtype, kernel_init=kernel_init, name="decoder")(hidden)
    bias = owner.param("bias", nn.initializers.zeros, (vocab_size,))
    return scores + jnp.asarray(bias, dtype)


def _normal(config) -> Callable:
    return nn.initializers.normal(stddev=config.initializer_range)


def _classifier_dropout(config) -> float:
    rate = getattr(config, "classifier_dropout", None)
    return config.hidden_dropout_prob if rate is None else rate


def _split_span_logits(logits: Array, num_labels: int) -> Output:
    """[B, L, 2] -> Output(start_logits [B, L], end_logits [B, L]) in float32."""
    if num_labels != 2:
        raise ValueError(f"question answering needs config.num_labels == 2 (start, end), got {num_labels}")
    logits = logits.astype(jnp.float32)
    return Output(start_logits=logits[..., 0], end_logits=logits[..., 1])


# --------------------------------------------------------------------------- encoder


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout: ids [B, L] -> [B, L, E].

    E is `width`, by default the hidden size H.
    """

    config: Any
    dtype: Any = jnp.float32
    width: Optional[int] = None

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool) -> Array:
        config = self.config
        features = self.width or config.hidden_size
        embed = partial(nn.Embed, features=features, embedding_init=_normal(config), dtype=self.dtype)
        hidden = (
            embed(config.vocab_size, name="word_embeddings")(input_ids)
            + embed(config.type_vocab_size, name="token_type_embeddings")(token_type_ids)
            + embed(config.max_position_embeddings, name="position_embeddings")(position_ids)
        )
        hidden = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(hidden)
        return nn.Dropout(config.hidden_dropout_prob)(hidden, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention without its output projection: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        config = self.config
        heads = config.num_attention_heads
        if config.hidden_size % heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {heads}")

        def project(name: str) -> Array:  # [B, L, H] -> [B, L, N, D]
            projected = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config), name=name)(hidden)
            return projected.reshape(projected.shape[:2] + (heads, -1))

        context = attend(
            project("query"),
            project("key"),
            project("value"),
            mask,
            nn.Dropout(config.attention_probs_dropout_prob, broadcast_dims=(0, 1)),  # one mask for all rows and heads
            deterministic,
        )
        return context.reshape(context.shape[:2] + (-1,))


def _layer_norm(config, dtype: Any) -> nn.LayerNorm:
    """The LayerNorm every sub-block uses, named "LayerNorm" as in Transformers."""
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name="LayerNorm")


class DenseResidualNorm(nn.Module):
    """dense -> dropout -> + residual, then LayerNorm unless `pre_layer_norm`: the end of both sub-blocks of a layer.

    Post-LayerNorm (BERT) normalises the sum here; pre-LayerNorm normalises each sub-block's input instead.
    """

    config: Any
    dtype: Any = jnp.float32
    pre_layer_norm: bool = False

    @nn.compact
    def __call__(self, hidden: Array, residual: Array, deterministic: bool) -> Array:
        config = self.config
        hidden = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config), name="dense")(hidden)
        hidden = nn.Dropout(config.hidden_dropout_prob)(hidden, deterministic=deterministic) + residual
        return hidden if self.pre_layer_norm else _layer_norm(config, self.dtype)(hidden)


class BertAttention(nn.Module):
    """Self-attention sub-block: [B, L, H] -> [B, L, H]; LayerNorm after it, or before it with `pre_layer_norm`."""

    config: Any
    dtype: Any = jnp.float32
    pre_layer_norm: bool = False

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        normed = _layer_norm(self.config, self.dtype)(hidden) if self.pre_layer_norm else hidden
        context = BertSelfAttention(self.config, self.dtype, name="self")(normed, mask, deterministic)
        output = DenseResidualNorm(self.config, self.dtype, self.pre_layer_norm, name="output")
        return output(context, hidden, deterministic)


class BertIntermediate(nn.Module):
    """Feed-forward expansion with the config's activation: [B, L, H] -> [B, L, intermediate_size].

    With `pre_layer_norm` its input is normalised first (the feed-forward sub-block's LayerNorm).
    """

    config: Any
    dtype: Any = jnp.float32
    pre_layer_norm: bool = False

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        config = self.config
        if self.pre_layer_norm:
            hidden = _layer_norm(config, self.dtype)(hidden)
        hidden = nn.Dense(config.intermediate_size, dtype=self.dtype, kernel_init=_normal(config), name="dense")(
            hidden
        )
        return activation(config.hidden_act)(hidden)


class BertLayer(nn.Module):
    """One transformer layer: attention sub-block, then feed-forward sub-block."""

    config: Any
    dtype: Any = jnp.float32
    pre_layer_norm: bool = False

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        blocks = (self.config, self.dtype, self.pre_layer_norm)
        attended = BertAttention(*blocks, name="attention")(hidden, mask, deterministic)
        expanded = BertIntermediate(*blocks, name="intermediate")(attended)
        return DenseResidualNorm(*blocks, name="output")(expanded, attended, deterministic)


class BertLayerStack(nn.Module):
    """`num_hidden_layers` layers, named "0", "1", ...: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32
    pre_layer_norm: bool = False

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        for index in range(self.config.num_hidden_layers):
            hidden = layer(BertLayer)(self.config, self.dtype, self.pre_layer_norm, name=str(index))(
                hidden, mask, deterministic
            )
        return hidden


class BertEncoder(nn.Module):
    """Holds the layer stack under the name "layer" (Transformers' nesting)."""

    config: Any
    dtype: Any = jnp.float32
    pre_layer_norm: bool = False

    @nn.compact
    def __call__(self, hidden: Array, mask: Optional[Array], deterministic: bool) -> Array:
        stack = BertLayerStack(self.config, self.dtype, self.pre_layer_norm, name="layer")
        return stack(hidden, mask, deterministic)


class BertPooler(nn.Module):
    """tanh(dense(first token)): [B, L, H] -> [B, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        dense = nn.Dense(self.config.hidden_size, dtype=self.dtype, kernel_init=_normal(self.config), name="dense")
        return jnp.tanh(dense(hidden[:, 0]))


def default_ids(input_ids: Array, token_type_ids: Optional[Array], position_ids: Optional[Array]):
    """int32 (input_ids, token_type_ids, position_ids) [B, L]; segment 0 and positions 0, 1, ... where not given."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    return input_ids, jnp.asarray(token_type_ids, jnp.int32), jnp.asarray(position_ids, jnp.int32)


def roberta_position_ids(input_ids: Array, padding_idx: int) -> Array:
    """RoBERTa positions [B, L]: padding_idx + 1, + 2, ... over real tokens; padding_idx on padding."""
    is_token = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(is_token, axis=1) * is_token + padding_idx


class BertModel(nn.Module):
    """The encoder: ids [B, L] -> (hidden states [B, L, H], pooled [B, H] or None).

    `roberta` switches the default position ids to RoBERTa's; `with_pooler`
    adds the pooler (the BERT sequence classifier uses it); `pre_layer_norm`
    normalises each sub-block's input and adds a final `LayerNorm` after the
    last layer (RoBERTa-PreLayerNorm); `factorised_embeddings` makes the
    embeddings `config.embedding_size` wide, projected up to H by
    `embeddings_project` where the widths differ (ELECTRA).
    """

    config: Any
    dtype: Any = jnp.float32
    with_pooler: bool = False
    roberta: bool = False
    pre_layer_norm: bool = False
    factorised_embeddings: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Optional[Array] = None,
        token_type_ids: Optional[Array] = None,
        position_ids: Optional[Array] = None,
        deterministic: bool = True,
    ) -> tuple[Array, Optional[Array]]:
        if position_ids is None and self.roberta:
            position_ids = roberta_position_ids(jnp.asarray(input_ids, jnp.int32), self.config.pad_token_id)
        config = self.config
        width = config.embedding_size if self.factorised_embeddings else config.hidden_size
        hidden = BertEmbeddings(config, self.dtype, width, name="embeddings")(
            *default_ids(input_ids, token_type_ids, position_ids), deterministic
        )
        if width != config.hidden_size:
            hidden = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config),
                              name="embeddings_project")(hidden)
        hidden = BertEncoder(config, self.dtype, self.pre_layer_norm, name="encoder")(
            hidden, padding_mask(attention_mask), deterministic
        )
        if self.pre_layer_norm:
            hidden = _layer_norm(config, self.dtype)(hidden)
        pooled = BertPooler(self.config, self.dtype, name="pooler")(hidden) if self.with_pooler else None
        return hidden, pooled

    def word_embedding(self) -> Array:
        """The input word embedding table [V, H] (for tied output projections); call after `__call__`."""
        return self.variables["params"]["embeddings"]["word_embeddings"]["embedding"]


# --------------------------------------------------------------------------- heads


class _Encoder(nn.Module):
    """Base of the task modules: `Module(config=..., dtype=...)`; the encoder sits under `prefix`."""

    config: Any
    dtype: Any = jnp.float32

    prefix = "bert"  # the name of the encoder in the parameter tree
    roberta = False  # see BertModel for these switches
    pre_layer_norm = False
    factorised_embeddings = False

    def encoder(self, with_pooler: bool = False) -> BertModel:
        return BertModel(
            self.config,
            self.dtype,
            with_pooler=with_pooler,
            roberta=self.roberta,
            pre_layer_norm=self.pre_layer_norm,
            factorised_embeddings=self.factorised_embeddings,
            name=self.prefix,
        )

    def tied_embedding(self, encoder: BertModel) -> Optional[Array]:
        return encoder.word_embedding() if self.config.tie_word_embeddings else None


class _SequenceClassification(_Encoder):
    """BERT: pooler -> dropout -> `classifier`. Logits [B, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        _, pooled = self.encoder(with_pooler=True)(
            input_ids, attention_mask, token_type_ids, position_ids, deterministic
        )
        pooled = nn.Dropout(_classifier_dropout(self.config))(pooled, deterministic=deterministic)
        logits = nn.Dense(self.config.num_labels, dtype=self.dtype, name="classifier")(pooled)
        return Output(logits=logits.astype(jnp.float32))


class _TokenClassification(_Encoder):
    """dropout -> `classifier` on every token. Logits [B, L, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        hidden, _ = self.encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        hidden = nn.Dropout(_classifier_dropout(self.config))(hidden, deterministic=deterministic)
        logits = nn.Dense(self.config.num_labels, dtype=self.dtype, name="classifier")(hidden)
        return Output(logits=logits.astype(jnp.float32))


class _QuestionAnswering(_Encoder):
    """`qa_outputs` on every token (no dropout). start_logits, end_logits [B, L] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        hidden, _ = self.encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        logits = nn.Dense(self.config.num_labels, dtype=self.dtype, name="qa_outputs")(hidden)
        return _split_span_logits(logits, self.config.num_labels)


register_family("bert", Family(base_prefix="bert"))
register_family("roberta", Family(base_prefix="roberta"))
register_family("xlm-roberta", Family(base_prefix="roberta"))
register_family("roberta-prelayernorm", Family(base_prefix="roberta_prelayernorm"))


@register("bert", "sequence-classification")
class BertForSequenceClassification(_SequenceClassification):
    pass


@register("bert", "token-classification")
class BertForTokenClassification(_TokenClassification):
    pass


@register("bert", "question-answering")
class BertForQuestionAnswering(_QuestionAnswering):
    pass


class BertPredictionTransform(nn.Module):
    """dense -> activation -> LayerNorm: [B, L, H] -> [B, L, W].

    W is `width` (default H), the activation `activation_name` (default the config's
    `hidden_act`); ELECTRA's generator head is this transform to its embedding width with GELU.
    """

    config: Any
    dtype: Any = jnp.float32
    width: Optional[int] = None
    activation_name: Optional[str] = None

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        hidden = nn.Dense(self.width or self.config.hidden_size, dtype=self.dtype, name="dense")(hidden)
        hidden = activation(self.activation_name or self.config.hidden_act)(hidden)
        return _layer_norm(self.config, self.dtype)(hidden)


class BertPredictions(nn.Module):
    """`transform` (to `width`, default H: RoFormer's narrow embeddings), then the tied (or own
    `decoder`) projection and `bias`: [B, L, H] -> [B, L, V]."""

    config: Any
    dtype: Any = jnp.float32
    width: Optional[int] = None

    @nn.compact
    def __call__(self, hidden: Array, tied_embedding: Optional[Array]) -> Array:
        hidden = BertPredictionTransform(self.config, self.dtype, width=self.width, name="transform")(hidden)
        return decode_to_vocab(self, hidden, tied_embedding, self.config.vocab_size, self.dtype)


class BertMaskedLMHead(nn.Module):
    """Holds `predictions` (Transformers' `cls` nesting)."""

    config: Any
    dtype: Any = jnp.float32

    width: Optional[int] = None

    @nn.compact
    def __call__(self, hidden: Array, tied_embedding: Optional[Array]) -> Array:
        return BertPredictions(self.config, self.dtype, width=self.width, name="predictions")(hidden, tied_embedding)


@register("bert", "masked-lm")
class BertForMaskedLM(_Encoder):
    """`cls` head over every token. Logits [B, L, V] (float32).

    With `config.tie_word_embeddings` (the default) the output projection is
    the word embedding table and the tree has no decoder kernel.
    """

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        encoder = self.encoder()
        hidden, _ = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        logits = BertMaskedLMHead(self.config, self.dtype, name="cls")(hidden, self.tied_embedding(encoder))
        return Output(logits=logits.astype(jnp.float32))


# --------------------------------------------------------------------------- RoBERTa


class _Roberta:
    """Mixin: the encoder is named "roberta", has no pooler, and counts positions RoBERTa's way."""

    prefix = "roberta"
    roberta = True


class RobertaClassificationHead(nn.Module):
    """First token -> dropout -> dense -> `activation_name` -> dropout -> `out_proj`: [B, L, H] -> [B, C].

    RoBERTa's activation is tanh; ELECTRA's head is the same with the exact GELU.
    """

    config: Any
    dtype: Any = jnp.float32
    activation_name: str = "tanh"

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        config = self.config
        dropout = nn.Dropout(_classifier_dropout(config))
        hidden = dropout(hidden[:, 0], deterministic=deterministic)
        hidden = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config), name="dense")(hidden)
        hidden = dropout(activation(self.activation_name)(hidden), deterministic=deterministic)
        return nn.Dense(config.num_labels, dtype=self.dtype, kernel_init=_normal(config), name="out_proj")(hidden)


@register("xlm-roberta", "sequence-classification")
@register("roberta", "sequence-classification")
class RobertaForSequenceClassification(_Roberta, _Encoder):
    """`classifier` (dense, out_proj) on the first token. Logits [B, C] (float32)."""

    classifier_activation = "tanh"  # the head's activation between its two layers

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        hidden, _ = self.encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        head = RobertaClassificationHead(self.config, self.dtype, self.classifier_activation, name="classifier")
        logits = head(hidden, deterministic)
        return Output(logits=logits.astype(jnp.float32))


@register("xlm-roberta", "token-classification")
@register("roberta", "token-classification")
class RobertaForTokenClassification(_Roberta, _TokenClassification):
    pass


@register("xlm-roberta", "question-answering")
@register("roberta", "question-answering")
class RobertaForQuestionAnswering(_Roberta, _QuestionAnswering):
    pass


class RobertaLMHead(nn.Module):
    """dense -> exact GELU -> `layer_norm` -> tied (or own `decoder`) projection + `bias`: [B, L, H] -> [B, L, V].

    RoBERTa's LM head always uses the exact GELU, whatever `hidden_act` says.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, tied_embedding: Optional[Array]) -> Array:
        config = self.config
        hidden = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config), name="dense")(hidden)
        hidden = activation("gelu")(hidden)
        hidden = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="layer_norm")(hidden)
        return decode_to_vocab(self, hidden, tied_embedding, config.vocab_size, self.dtype, _normal(config))


@register("xlm-roberta", "masked-lm")
@register("roberta", "masked-lm")
class RobertaForMaskedLM(_Roberta, _Encoder):
    """`lm_head` over every token. Logits [B, L, V] (float32); tied to the word embeddings by default."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        encoder = self.encoder()
        hidden, _ = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        logits = RobertaLMHead(self.config, self.dtype, name="lm_head")(hidden, self.tied_embedding(encoder))
        return Output(logits=logits.astype(jnp.float32))


# --------------------------------------------------------------------------- RoBERTa-PreLayerNorm


class _RobertaPreLayerNorm:
    """Mixin: RoBERTa's encoder and heads, pre-LayerNorm, named "roberta_prelayernorm"."""

    prefix = "roberta_prelayernorm"
    pre_layer_norm = True


@register("roberta-prelayernorm", "sequence-classification")
class RobertaPreLayerNormForSequenceClassification(_RobertaPreLayerNorm, RobertaForSequenceClassification):
    pass


@register("roberta-prelayernorm", "token-classification")
class RobertaPreLayerNormForTokenClassification(_RobertaPreLayerNorm, RobertaForTokenClassification):
    pass


@register("roberta-prelayernorm", "question-answering")
class RobertaPreLayerNormForQuestionAnswering(_RobertaPreLayerNorm, RobertaForQuestionAnswering):
    pass


@register("roberta-prelayernorm", "masked-lm")
class RobertaPreLayerNormForMaskedLM(_RobertaPreLayerNorm, RobertaForMaskedLM):
    pass
