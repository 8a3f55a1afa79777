"""ELECTRA: BERT's encoder with factorised embeddings, and classification, tagging, span and masked-LM heads.

Parameter trees follow Transformers 4.x (FlaxElectraFor*), whose names are those of the
PyTorch ElectraFor* classes. The encoder is bert.py's: embeddings `config.embedding_size`
wide (E), projected up to the hidden size H by `embeddings_project` where E != H (the small
discriminators: E 128, H 256), then post-LayerNorm layers; no pooler. Position ids count
from 0 as in BERT.

Heads: the sequence classifier is RoBERTa's head with the exact GELU instead of tanh; token
classification and question answering are BERT's; the masked-LM head is the generator's
(`generator_predictions`, `generator_lm_head`), so a discriminator checkpoint fills
everything but that head, and a generator checkpoint fills it too.

Shapes: B batch, L sequence length, H hidden size, E embedding size, V vocabulary, C labels.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from flax_finetune.modeling import Family, Output, register, register_family
from flax_finetune.modeling.bert import (
    Array,
    BertPredictionTransform,
    RobertaForSequenceClassification,
    _Encoder,
    _normal,
    _QuestionAnswering,
    _TokenClassification,
    decode_to_vocab,
)

register_family(
    "electra",
    # the masked-LM output projection is the word embedding table (tie_word_embeddings, the default)
    Family(base_prefix="electra", tied_pytorch_keys=("generator_lm_head.weight",)),
)


class _Electra:
    """Mixin: the encoder is named "electra", has factorised embeddings, BERT's positions and no pooler."""

    prefix = "electra"
    roberta = False
    factorised_embeddings = True


@register("electra", "sequence-classification")
class ElectraForSequenceClassification(_Electra, RobertaForSequenceClassification):
    """RoBERTa's `classifier` (dense, out_proj) on the first token with the exact GELU. Logits [B, C] (float32)."""

    classifier_activation = "gelu"


@register("electra", "token-classification")
class ElectraForTokenClassification(_Electra, _TokenClassification):
    pass


@register("electra", "question-answering")
class ElectraForQuestionAnswering(_Electra, _QuestionAnswering):
    pass


class TiedVocabularyProjection(nn.Module):
    """[B, L, E] @ word embeddings [V, E].T + own `bias` [V] -> [B, L, V] (the tied `generator_lm_head`)."""

    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, tied_embedding: Array) -> Array:
        return decode_to_vocab(self, hidden, tied_embedding, self.vocab_size, self.dtype)


@register("electra", "masked-lm")
class ElectraForMaskedLM(_Electra, _Encoder):
    """The generator's head over every token. Logits [B, L, V] (float32).

    With `config.tie_word_embeddings` (the default) the output projection is the word
    embedding table and `generator_lm_head` owns only its bias; without, it is a Dense [E, V].
    """

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, deterministic: bool = True
    ) -> Output:
        config = self.config
        encoder = self.encoder()
        hidden, _ = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        # dense -> exact GELU -> LayerNorm, [B, L, H] -> [B, L, E]: the exact GELU whatever `hidden_act` says, as
        # Transformers' PyTorch class has it (its 4.x Flax class reads `hidden_act`, "gelu" in ELECTRA's configs)
        predictions = BertPredictionTransform(
            config, self.dtype, config.embedding_size, "gelu", name="generator_predictions"
        )
        hidden = predictions(hidden)
        tied: Optional[Array] = self.tied_embedding(encoder)
        if tied is None:
            head = nn.Dense(config.vocab_size, dtype=self.dtype, kernel_init=_normal(config), name="generator_lm_head")
            logits = head(hidden)
        else:
            logits = TiedVocabularyProjection(config.vocab_size, self.dtype, name="generator_lm_head")(hidden, tied)
        return Output(logits=logits.astype(jnp.float32))
