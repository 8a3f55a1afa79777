"""This project's own Flax (Linen) models: the architectures and heads the eight scripts use.

Transformers 5 deleted its Flax classes, and Flax T5 in Transformers 4.x
breaks on jax >= 0.10; these implementations replace them. Transformers is
still used for configs, tokenizers, feature extractors and file formats.

Contract (every architecture module fills `MODULES` through `register`):

- `MODULES[(model_type, task)]` is a `flax.linen.Module` class, built as
  `Module(config=<a Transformers config>, dtype=<computation dtype>)`.
- Its parameter tree has exactly the names and shapes of the matching
  Transformers 4.x Flax class's `params` (e.g. FlaxBertForSequenceClassification:
  {"bert": {...}, "classifier": {...}}), so the same parameters (and a
  `flax_model.msgpack` written by Transformers 4.x) work with both.
- `module.apply({"params": params}, <inputs>, deterministic=..., rngs={"dropout": key})`
  takes the inputs the Transformers class takes (input_ids, attention_mask,
  token_type_ids, position_ids, decoder_input_ids, decoder_attention_mask,
  input_features, ...) as keyword arguments and returns an `Output`.
- Tasks: "sequence-classification", "token-classification",
  "question-answering", "masked-lm", "causal-lm", "seq2seq-lm",
  "speech-seq2seq".
"""

from __future__ import annotations

from typing import Any, Optional

import flax

MODULES: dict[tuple[str, str], type] = {}


@flax.struct.dataclass
class Output:
    """What a model returns: the logits of its head (start/end logits for question answering)."""

    logits: Optional[Any] = None
    start_logits: Optional[Any] = None
    end_logits: Optional[Any] = None


def register(model_type: str, task: str):
    """Class decorator: `module` implements `task` for configs of `model_type`."""

    def decorate(module: type) -> type:
        MODULES[(model_type, task)] = module
        return module

    return decorate
