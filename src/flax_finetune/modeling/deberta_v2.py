"""DeBERTa-v2 and DeBERTa-v3 encoders with classification, tagging, span and masked-LM heads.

Transformers never had a Flax DeBERTa-v2, so the parameter names are those of
the PyTorch DebertaV2For* state dicts (through checkpoint_io.pytorch_key):
`deberta/embeddings/...`, `deberta/encoder/layer/0/attention/self/query_proj`,
`deberta/encoder/rel_embeddings`, `pooler/dense`, and the masked-LM head as
`config.legacy` chooses: `cls/predictions/...` (legacy, the default in
Transformers 4.57 and 5) or `lm_predictions/lm_head/...`.

What differs from BERT (the semantics of Transformers' modeling_deberta_v2.py):

- disentangled attention: content-to-content scores plus, with
  `relative_attention`, content-to-position ("c2p") and position-to-content
  ("p2c") scores against a table of relative-position embeddings shared by
  all layers (`rel_embeddings`, LayerNorm-ed where `norm_rel_ebd` says
  "layer_norm"), every term divided by sqrt(head size * (1 + number of
  position terms)); relative distances are log-bucketed beyond
  `position_buckets` / 2 when `position_buckets` > 0; `share_att_key` projects
  the position embeddings with the content query/key projections;
- the attention mask is [query real] x [key real]: a padding query attends to
  nothing, so its scores are all the same large negative and its softmax is
  uniform, as in PyTorch;
- embeddings: absolute positions only with `position_biased_input`, token types
  only with `type_vocab_size` > 0 (DeBERTa-v3 has neither), a bias-free
  `embed_proj` where `embedding_size` differs from `hidden_size`, and padding
  positions zeroed after the LayerNorm; the padding id's embedding row gets no
  gradient from the lookup (PyTorch's `padding_idx`);
- an optional convolution after the first layer (`conv_kernel_size` > 0, odd);
- sequence classification through a ContextPooler (dense + `pooler_hidden_act`
  on the first token).

Shapes: B batch, L sequence length, H hidden size, E embedding size, N heads,
D head size, R = 2 * attention span (rows of the relative-position table),
V vocabulary, C labels.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flax_finetune.errors import InputError
from flax_finetune.modeling import Family, Output, layer, register, register_family
from flax_finetune.modeling.bert import (
    BertIntermediate,
    BertPredictionTransform,
    DenseResidualNorm,
    _Encoder,
    _normal,
    _QuestionAnswering,
    _TokenClassification,
    activation,
    decode_to_vocab,
    default_ids,
)

Array = Any


def _embedding_size(config) -> int:
    return getattr(config, "embedding_size", None) or config.hidden_size


def _position_terms(config) -> list[str]:
    """The relative-position score terms `pos_att_type` asks for: "c2p" and / or "p2c"."""
    return list(config.pos_att_type or [])


def max_relative_positions(config) -> int:
    """The largest relative distance before bucketing (`max_position_embeddings` where unset)."""
    value = getattr(config, "max_relative_positions", -1)
    return value if value >= 1 else config.max_position_embeddings


def attention_span(config) -> int:
    """Half the rows of the relative-position table: `position_buckets`, else `max_relative_positions`."""
    buckets = getattr(config, "position_buckets", -1)
    return buckets if buckets > 0 else max_relative_positions(config)


def log_bucket_positions(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """Relative distances [...] -> buckets: exact within bucket_size / 2, log-spaced beyond (float32, as PyTorch)."""
    sign = np.sign(relative)
    mid = bucket_size // 2
    near = (relative < mid) & (relative > -mid)
    distance = np.where(near, mid - 1, np.abs(relative)).astype(np.float32)
    ratio = np.log(distance / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
    log_position = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(distance <= mid, relative, log_position * sign).astype(np.int64)


def relative_positions(length: int, config) -> np.ndarray:
    """query position - key position [L, L], bucketed where `position_buckets` > 0 (a trace-time constant)."""
    positions = np.arange(length)
    relative = positions[:, None] - positions[None, :]
    buckets = getattr(config, "position_buckets", -1)
    if buckets > 0:
        relative = log_bucket_positions(relative, buckets, max_relative_positions(config))
    return relative


class DebertaV2Embeddings(nn.Module):
    """Word (+ position) (+ token-type) embeddings, `embed_proj`, LayerNorm, padding zeroed: ids [B, L] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, attention_mask, deterministic: bool) -> Array:
        config = self.config
        width = _embedding_size(config)

        def embed(rows: int, name: str) -> nn.Embed:
            return nn.Embed(rows, width, embedding_init=_normal(config), dtype=self.dtype, name=name)

        hidden = embed(config.vocab_size, "word_embeddings")(input_ids)
        if config.pad_token_id is not None:
            is_padding_id = (input_ids == config.pad_token_id)[..., None]
            hidden = jnp.where(is_padding_id, jax.lax.stop_gradient(hidden), hidden)
        if getattr(config, "position_biased_input", True):
            hidden = hidden + embed(config.max_position_embeddings, "position_embeddings")(position_ids)
        if config.type_vocab_size > 0:
            hidden = hidden + embed(config.type_vocab_size, "token_type_embeddings")(token_type_ids)
        if width != config.hidden_size:
            hidden = nn.Dense(
                config.hidden_size, use_bias=False, dtype=self.dtype, kernel_init=_normal(config), name="embed_proj"
            )(hidden)
        hidden = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(hidden)
        hidden = hidden * attention_mask[..., None].astype(hidden.dtype)
        return nn.Dropout(config.hidden_dropout_prob)(hidden, deterministic=deterministic)


class DisentangledSelfAttention(nn.Module):
    """Content and relative-position attention without its output projection: [B, L, H] -> [B, L, N * D].

    `mask` boolean [B, 1, L, L] (True = may attend); `relative` [L, L] relative
    positions; `rel_embeddings` [R, H] or None without `relative_attention`.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, hidden: Array, mask: Array, relative: Array, rel_embeddings: Optional[Array], deterministic: bool
    ) -> Array:
        config = self.config
        heads = config.num_attention_heads
        if config.hidden_size % heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {heads}")
        head_size = getattr(config, "attention_head_size", None) or config.hidden_size // heads
        terms = _position_terms(config)

        def projection(name: str):  # [..., H] -> [..., N, D]
            dense = nn.Dense(heads * head_size, dtype=self.dtype, kernel_init=_normal(config), name=name)
            return lambda states: dense(states).reshape(states.shape[:-1] + (heads, head_size))

        query_proj, key_proj = projection("query_proj"), projection("key_proj")
        query, key, value = query_proj(hidden), key_proj(hidden), projection("value_proj")(hidden)
        scale = jnp.asarray(np.sqrt(np.float32(head_size) * (1 + len(terms))), self.dtype)
        scores = jnp.einsum("bqnd,bknd->bnqk", query, key / scale)  # [B, N, L, L]

        if getattr(config, "relative_attention", False):
            positions = nn.Dropout(config.hidden_dropout_prob)(rel_embeddings, deterministic=deterministic)
            share = getattr(config, "share_att_key", False)
            span = attention_span(config)
            position_scores = 0
            if "c2p" in terms:
                position_key = (key_proj if share else projection("pos_key_proj"))(positions)  # [R, N, D]
                by_distance = jnp.einsum("bqnd,rnd->bnqr", query, position_key)
                index = jnp.clip(relative + span, 0, 2 * span - 1)
                gathered = jnp.take_along_axis(by_distance, index[None, None], axis=-1)
                position_scores = position_scores + gathered / scale
            if "p2c" in terms:
                position_query = (query_proj if share else projection("pos_query_proj"))(positions)  # [R, N, D]
                by_distance = jnp.einsum("bknd,rnd->bnkr", key, position_query)
                index = jnp.clip(-relative + span, 0, 2 * span - 1)
                gathered = jnp.take_along_axis(by_distance, index[None, None], axis=-1)
                position_scores = position_scores + jnp.swapaxes(gathered, -1, -2) / scale
            scores = scores + position_scores

        scores = jnp.where(mask, scores, jnp.finfo(self.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        probs = nn.Dropout(config.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        context = jnp.einsum("bnqk,bknd->bqnd", probs, value)
        return context.reshape(context.shape[:2] + (-1,))


class DebertaV2Attention(nn.Module):
    """Disentangled self-attention, then dense -> dropout -> LayerNorm(x + input): [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, mask, relative, rel_embeddings, deterministic: bool) -> Array:
        context = DisentangledSelfAttention(self.config, self.dtype, name="self")(
            hidden, mask, relative, rel_embeddings, deterministic
        )
        return DenseResidualNorm(self.config, self.dtype, name="output")(context, hidden, deterministic)


class DebertaV2Layer(nn.Module):
    """One layer: attention sub-block, then BERT's feed-forward sub-block: [B, L, H] -> [B, L, H]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, mask, relative, rel_embeddings, deterministic: bool) -> Array:
        attended = DebertaV2Attention(self.config, self.dtype, name="attention")(
            hidden, mask, relative, rel_embeddings, deterministic
        )
        expanded = BertIntermediate(self.config, self.dtype, name="intermediate")(attended)
        return DenseResidualNorm(self.config, self.dtype, name="output")(expanded, attended, deterministic)


class DebertaV2ConvLayer(nn.Module):
    """The convolution added after the first layer: conv over the layer's input, added to its output.

    embedded, first_output [B, L, H]; input_mask [B, L] of 1 / 0. Returns [B, L, H], zero on padding.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embedded: Array, first_output: Array, input_mask: Array, deterministic: bool) -> Array:
        config = self.config
        width = config.conv_kernel_size
        if width % 2 == 0:
            raise InputError(
                f"conv_kernel_size {width}: only odd kernel sizes keep the sequence length "
                "(Transformers' DebertaV2 ConvLayer pads (size - 1) // 2 on each side)"
            )
        real = input_mask[..., None].astype(self.dtype)  # [B, L, 1]
        convolved = nn.Conv(
            config.hidden_size,
            kernel_size=(width,),
            padding=[((width - 1) // 2, (width - 1) // 2)],
            feature_group_count=getattr(config, "conv_groups", 1),
            dtype=self.dtype,
            kernel_init=_normal(config),
            name="conv",
        )(embedded)
        convolved = nn.Dropout(config.hidden_dropout_prob)(convolved * real, deterministic=deterministic)
        convolved = activation(getattr(config, "conv_act", "tanh"))(convolved)
        normed = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(
            first_output + convolved
        )
        return normed * real


class DebertaV2LayerStack(nn.Module):
    """`num_hidden_layers` layers named "0", "1", ...; `conv` (or None) runs after the first."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, mask, relative, rel_embeddings, conv, input_mask, deterministic: bool) -> Array:
        embedded = hidden
        for index in range(self.config.num_hidden_layers):
            hidden = layer(DebertaV2Layer)(self.config, self.dtype, name=str(index))(
                hidden, mask, relative, rel_embeddings, deterministic
            )
            if index == 0 and conv is not None:
                hidden = conv(embedded, hidden, input_mask, deterministic)
        return hidden


class DebertaV2Encoder(nn.Module):
    """The layers (under "layer"), the shared `rel_embeddings` [R, H] with their LayerNorm, the optional `conv`.

    hidden [B, L, H], input_mask [B, L] of 1 / 0 -> [B, L, H].
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, input_mask: Array, deterministic: bool) -> Array:
        config = self.config
        real = input_mask > 0
        mask = real[:, None, :, None] & real[:, None, None, :]  # [B, 1, L, L]: query and key both real
        relative_attention = getattr(config, "relative_attention", False)
        rel_embeddings = None
        if relative_attention:
            rows = 2 * attention_span(config)
            table = nn.Embed(
                rows, config.hidden_size, embedding_init=_normal(config), dtype=self.dtype, name="rel_embeddings"
            )
            rel_embeddings = table(jnp.arange(rows))
        norm_rel_ebd = [part.strip() for part in getattr(config, "norm_rel_ebd", "none").lower().split("|")]
        if "layer_norm" in norm_rel_ebd:
            norm = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")
            if relative_attention:
                rel_embeddings = norm(rel_embeddings)
            else:  # PyTorch holds this LayerNorm unused: create its parameters all the same
                norm(jnp.zeros((1, config.hidden_size), self.dtype))
        has_conv = getattr(config, "conv_kernel_size", 0) > 0
        conv = DebertaV2ConvLayer(config, self.dtype, name="conv") if has_conv else None
        relative = relative_positions(hidden.shape[1], config)
        return DebertaV2LayerStack(config, self.dtype, name="layer")(
            hidden, mask, relative, rel_embeddings, conv, input_mask, deterministic
        )


class DebertaV2Model(nn.Module):
    """The encoder: ids [B, L] -> (hidden states [B, L, H], None), the call shape of bert.BertModel (no pooler)."""

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
        input_ids, token_type_ids, position_ids = default_ids(input_ids, token_type_ids, position_ids)
        attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
        hidden = DebertaV2Embeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, position_ids, attention_mask, deterministic
        )
        return DebertaV2Encoder(self.config, self.dtype, name="encoder")(hidden, attention_mask, deterministic), None

    def word_embedding(self) -> Array:
        """The input word embedding table [V, E] (for the tied output projection); call after `__call__`."""
        return self.variables["params"]["embeddings"]["word_embeddings"]["embedding"]


# --------------------------------------------------------------------------- heads


class _DebertaV2(_Encoder):
    """Base of the task modules: the encoder sits under "deberta"."""

    prefix = "deberta"

    def encoder(self, with_pooler: bool = False) -> DebertaV2Model:
        return DebertaV2Model(self.config, self.dtype, name=self.prefix)


register_family(
    "deberta-v2",
    # DeBERTa-v3 checkpoints keep an absolute position table they do not use (position_biased_input
    # false); Transformers ignores it on loading (`_keys_to_ignore_on_load_unexpected`), and so does this.
    Family(base_prefix="deberta", skipped_pytorch_keys=("embeddings.position_embeddings.weight",)),
)


class ContextPooler(nn.Module):
    """First token -> dropout -> `dense` -> `pooler_hidden_act`: [B, L, H] -> [B, pooler_hidden_size]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool) -> Array:
        config = self.config
        width = getattr(config, "pooler_hidden_size", None) or config.hidden_size
        first = nn.Dropout(config.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
        pooled = nn.Dense(width, dtype=self.dtype, kernel_init=_normal(config), name="dense")(first)
        return activation(config.pooler_hidden_act)(pooled)


@register("deberta-v2", "sequence-classification")
class DebertaV2ForSequenceClassification(_DebertaV2):
    """`pooler` -> dropout (`cls_dropout`, else hidden_dropout_prob) -> `classifier`. Logits [B, C] (float32)."""

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        config = self.config
        hidden, _ = self.encoder()(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        pooled = ContextPooler(config, self.dtype, name="pooler")(hidden, deterministic)
        rate = getattr(config, "cls_dropout", None)
        pooled = nn.Dropout(config.hidden_dropout_prob if rate is None else rate)(pooled, deterministic=deterministic)
        logits = nn.Dense(config.num_labels, dtype=self.dtype, kernel_init=_normal(config), name="classifier")(pooled)
        return Output(logits=logits.astype(jnp.float32))


@register("deberta-v2", "token-classification")
class DebertaV2ForTokenClassification(_DebertaV2, _TokenClassification):
    pass


@register("deberta-v2", "question-answering")
class DebertaV2ForQuestionAnswering(_DebertaV2, _QuestionAnswering):
    pass


class LegacyPredictions(nn.Module):
    """`transform` (to width E), then the word embeddings [V, E] and `bias`: [B, L, H] -> [B, L, V]."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, word_embedding: Array) -> Array:
        config = self.config
        hidden = BertPredictionTransform(config, self.dtype, _embedding_size(config), name="transform")(hidden)
        return decode_to_vocab(self, hidden, word_embedding, config.vocab_size, self.dtype)


class LMPredictionHead(nn.Module):
    """The non-legacy head: `dense` -> `hidden_act` -> `LayerNorm`, then the word embeddings [V, H] and `bias`.

    [B, L, H] -> [B, L, V]; PyTorch keeps dense, LayerNorm and bias side by side in `lm_head`.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, word_embedding: Array) -> Array:
        config = self.config
        hidden = nn.Dense(config.hidden_size, dtype=self.dtype, kernel_init=_normal(config), name="dense")(hidden)
        hidden = activation(config.hidden_act)(hidden)
        hidden = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(hidden)
        return decode_to_vocab(self, hidden, word_embedding, config.vocab_size, self.dtype)


class Holder(nn.Module):
    """Holds one `head` module under `head_name`: the extra level of PyTorch's names (`cls`, `lm_predictions`)."""

    config: Any
    dtype: Any = jnp.float32
    head: Any = None
    head_name: str = ""

    @nn.compact
    def __call__(self, hidden: Array, word_embedding: Array) -> Array:
        return self.head(self.config, self.dtype, name=self.head_name)(hidden, word_embedding)


@register("deberta-v2", "masked-lm")
class DebertaV2ForMaskedLM(_DebertaV2):
    """Scores over the vocabulary for every token. Logits [B, L, V] (float32).

    `config.legacy` (the default) gives the head `cls/predictions` (`transform`,
    `bias`; the output is the word embeddings, untied is refused); otherwise
    `lm_predictions/lm_head` (`dense`, `LayerNorm`, `bias`), whose output is
    always the word embeddings, as PyTorch's DebertaV2ForMaskedLM.
    """

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        encoder = self.encoder()
        hidden, _ = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        if getattr(self.config, "legacy", True):
            if not self.config.tie_word_embeddings:
                raise InputError(
                    "tie_word_embeddings false with the legacy DeBERTa-v2 masked-LM head (legacy true) is not "
                    "supported: its untied decoder has a bias of its own, which no DeBERTa checkpoint uses"
                )
            head = Holder(self.config, self.dtype, LegacyPredictions, "predictions", name="cls")
        else:
            head = Holder(self.config, self.dtype, LMPredictionHead, "lm_head", name="lm_predictions")
        logits = head(hidden, encoder.word_embedding())
        return Output(logits=logits.astype(jnp.float32))
