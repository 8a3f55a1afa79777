"""Pieces shared by the encoder-decoder scripts (T5 span corruption, summarization, speech recognition)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from flax_finetune.errors import InputError


def shift_right(labels: np.ndarray, decoder_start_token_id: int, pad_token_id: int) -> np.ndarray:
    """Decoder inputs for teacher forcing: labels [batch, length] shifted one step right.

    The first position gets the decoder start token; ignored labels (-100)
    become padding.
    """
    shifted = np.empty_like(labels)
    shifted[:, 0] = decoder_start_token_id
    shifted[:, 1:] = labels[:, :-1]
    return np.where(shifted < 0, pad_token_id, shifted)


def decoder_start_token_id(config: Any) -> int:
    """The config's decoder start token, which every encoder-decoder model must name."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise InputError(f"the {config.model_type} config has no decoder_start_token_id: it cannot be trained as a decoder")
    return int(start)


def target_length_limit(requested: int, config: Any) -> int:
    """`requested` target tokens, capped (with a warning) by the decoder's position limit, if it has one."""
    import logging

    limit = getattr(config, "max_target_positions", None)
    if limit is not None and requested > limit:
        logging.getLogger("flax_finetune").warning(
            "%d target tokens exceed the decoder's %d positions: using %d", requested, limit, limit
        )
        return int(limit)
    return requested


def generation_options(model: Any, max_length: int, num_beams: Optional[int]) -> dict:
    """Settings for `Model.generate`: the length limit, and beams (default: the model's own setting)."""
    beams = num_beams if num_beams is not None else (getattr(model.generation_config, "num_beams", None) or 1)
    return {"max_length": max_length, "num_beams": beams}


def decode(tokenizer: Any, ids: np.ndarray) -> list[str]:
    """Token ids [batch, length] (-100 allowed, read as padding) -> stripped texts without special tokens."""
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
