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
    """Settings for `Model.generate`: the length limit, and beams (default: the model's own setting).

    The model's generation config gives the rest (see generation.generation_kwargs): one that asks
    for what generation does not do (sampling, repetition penalties...) is an InputError here,
    before any training, rather than at the first evaluation.
    """
    from flax_finetune.modeling import generation

    beams = num_beams if num_beams is not None else (getattr(model.generation_config, "num_beams", None) or 1)
    options = {"max_length": max_length, "num_beams": beams}
    try:
        generation.generation_kwargs(model.generation_config, **options)
    except ValueError as error:
        raise InputError(f"the model's generation config: {error}") from None
    return options


def decode(tokenizer: Any, ids: np.ndarray) -> list[str]:
    """Token ids [batch, length] (-100 allowed, read as padding) -> stripped texts without special tokens."""
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def language_settings(tokenizer: Any, source_lang: Optional[str], target_lang: Optional[str],
                      forced_bos_token: Optional[str] = None) -> dict:
    """Apply --source_lang / --target_lang / --forced_bos_token to a multilingual tokenizer.

    mBART-style tokenizers (`src_lang` / `tgt_lang`, e.g. en_XX, de_DE) get the codes and add them
    to the ids. Where the labels end with the target code (mBART), that code is the decoder start,
    as mBART's own shift; where they begin with it (mBART-50), it is forced as the first generated
    token. Marian tokenizers of several target languages (`supported_language_codes`, e.g. >>fr<<)
    get the target code before every document. `forced_bos_token` (upstream's translation flag)
    names a token forced as the first generated one.

    Returns {"decoder_start_token_id", "forced_bos_token_id", "source_prefix"} where they apply.
    Raises InputError for a code the tokenizer does not know, or codes for one without any.
    """
    settings: dict = {}
    if forced_bos_token is not None:
        settings["forced_bos_token_id"] = _known_token(tokenizer, forced_bos_token, "--forced_bos_token")
    if source_lang is None and target_lang is None:
        return settings
    codes = _language_codes(tokenizer)
    if not codes:
        raise InputError(f"--source_lang / --target_lang: the {type(tokenizer).__name__} tokenizer has no language codes")
    if hasattr(tokenizer, "tgt_lang"):
        for flag, code in (("--source_lang", source_lang), ("--target_lang", target_lang)):
            if code is not None and code not in codes:
                raise InputError(f"{flag} {code}: not one of this tokenizer's language codes: {', '.join(codes)}")
        if source_lang is not None:
            tokenizer.src_lang = source_lang
        if target_lang is not None:
            tokenizer.tgt_lang = target_lang
            code_id = tokenizer.convert_tokens_to_ids(target_lang)
            labels = tokenizer(text_target="a")["input_ids"]
            if labels[-1] == code_id:
                settings["decoder_start_token_id"] = code_id
            elif labels[0] == code_id:
                settings.setdefault("forced_bos_token_id", code_id)
        return settings
    if source_lang is not None:
        raise InputError("--source_lang: Marian tokenizers take the target language only (--target_lang)")
    token = f">>{target_lang}<<"
    if token not in codes:
        raise InputError(f"--target_lang {target_lang}: not one of this tokenizer's languages: {', '.join(codes)}")
    settings["source_prefix"] = token + " "
    return settings


def _language_codes(tokenizer: Any) -> list[str]:
    """The tokenizer's language codes: mBART's (lang_code_to_id, or the additional special tokens
    of a tokenizer with tgt_lang), Marian's (supported_language_codes); [] if none."""
    if hasattr(tokenizer, "tgt_lang"):
        codes = getattr(tokenizer, "lang_code_to_id", None) or getattr(tokenizer, "additional_special_tokens", [])
        return list(codes)
    return list(getattr(tokenizer, "supported_language_codes", None) or [])


def _known_token(tokenizer: Any, token: str, flag: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise InputError(f"{flag} {token}: not a token of this tokenizer")
    return int(token_id)
