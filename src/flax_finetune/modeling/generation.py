"""Greedy and beam-search generation with a key/value cache, for encoder-decoder modules (T5,
Whisper, BART...) and decoder-only causal-lm modules (GPT-2, and the families that follow gpt2.py).

A module used here provides, through `module.apply({"params": params}, ..., method=...)`, either

Encoder-decoders:
- `encode(**inputs)` -> encoder_hidden_states [B, S, H];
- `init_decoding_state(encoder_hidden_states, encoder_attention_mask, max_length=...)` -> a
  decoding state: a dict whose "cache" entry (arrays [B, ...]) follows the beams, while
  everything else ("position", "encoder") is the same for every beam of one input;
- `decode_step(token_ids [B], state)` -> (logits [B, V] float32, next state).
The output starts with the decoder start token (a prompt of length P = 1).

Decoder-only (causal-lm) modules, recognised by their `prefill` method:
- `prefill(input_ids [B, P], attention_mask [B, P], *, max_length)` -> (logits [B, V] float32 of
  the last prompt position, state). Prompts are LEFT-padded (attention_mask 0 on the left), as
  Transformers' generate expects for decoder-only models; position ids of real tokens count real
  tokens only (cumsum(mask) - 1, as Transformers). The cache has room for max_length tokens.
- `decode_step(token_ids [B], state)` -> (logits [B, V] float32, next state).
- state, built with `init_state` and advanced with `advance_state` (see gpt2.py's
  `DecoderForCausalLM`, `GPT2Model` and `GPT2Attention`):
    {"index": int32 scalar, the cache slots written so far (the same for every row),
     "cache": {"layers": per layer {"key", "value"} [B, max_length, kv_heads, head_dim],
               "key_mask": bool [B, max_length], False on the prompt's left padding,
               "position": int32 [B], the position id of the row's next token}}.
  Everything under "cache" has a leading batch axis and follows the beams; the module may add
  per-row entries there. A layer writes this call's keys/values with
  `update_cache(layer_cache, keys, values, state["index"])` and attends over the whole cache
  with `cache_inputs(state, L)`'s mask; position ids come from there too. Grouped-query
  attention: the cache holds kv_heads, not query heads (repeat them at attention time).
The output is [B, max_length]: the prompt (padding included), then the generated tokens.
The prompt is prefilled once per input; beam search then repeats its cache for the beams.

`generate` runs one token per step against the key/value cache in a `lax.while_loop`; the
whole of it is one `jax.jit` computation, compiled once per module, options and input shapes.
The tokens are those of Transformers' FlaxGenerationMixin (greedy search and beam search, with
its logits processors for min_length, forced BOS/EOS, suppressed tokens, tokens suppressed at
the first free step, forced decoder ids and n-gram blocking). Those processors see the whole
output, prompt included: min_length and n-gram blocking count the (padded) prompt, as
Transformers' Flax generate does (its min_length also bans EOS at index min_length, one step
longer than PyTorch's); forced decoder ids and begin_suppress_tokens count from the first
generated index.

From a Transformers GenerationConfig:

    options = generation_kwargs(generation_config, max_length=128, num_beams=4)
    sequences = generate(module, params, {"input_ids": ids, "attention_mask": mask}, **options)  # T5, GPT-2
    options = generation_kwargs(generation_config, max_length=225, language="german", task="transcribe")
    sequences = generate(module, params, {"input_features": features}, **options)  # Whisper
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

# Score given to a finished hypothesis in the running set, and to running hypotheses in the finished
# set, so that they are never chosen; also the initial score of the empty beams (as in Transformers).
NEVER = -1.0e7


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Everything `generate` fixes at compile time (hashable: it keys the compiled functions)."""

    max_length: int
    num_beams: int
    decoder_start_token_id: Optional[int]
    eos_token_id: Optional[int]
    pad_token_id: int
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    min_length: int = 0
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: Optional[int] = None
    suppress_tokens: tuple = ()
    begin_suppress_tokens: tuple = ()
    forced_decoder_ids: tuple = ()  # ((position, token), ...)
    no_repeat_ngram_size: int = 0

    def begin_index(self, prompt_length: int) -> int:
        """The output index where `begin_suppress_tokens` are suppressed: the first after the prompt and
        the forced tokens (as Transformers: a forced BOS counts only after a one-token prompt)."""
        index = prompt_length + (prompt_length == 1 and self.forced_bos_token_id is not None)
        if self.forced_decoder_ids:
            index += self.forced_decoder_ids[-1][0]
        return index


def generate(
    module,
    params,
    inputs: dict,
    *,
    max_length: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    num_beams: int = 1,
    decoder_start_token_id: Optional[int] = None,
    eos_token_id: Optional[int],
    pad_token_id: Optional[int] = None,
    length_penalty: float = 1.0,
    early_stopping: Union[bool, str] = False,
    forced_decoder_ids: Optional[Sequence[Sequence[int]]] = None,
    suppress_tokens: Optional[Sequence[int]] = None,
    begin_suppress_tokens: Optional[Sequence[int]] = None,
    min_length: int = 0,
    forced_bos_token_id: Optional[int] = None,
    forced_eos_token_id: Optional[int] = None,
    no_repeat_ngram_size: int = 0,
) -> jax.Array:
    """Generate token ids with an encoder-decoder or decoder-only `module` (see the module docstring).

    inputs: the encoder's keyword inputs, e.g. {"input_ids", "attention_mask"} [batch, source_length]
    for T5 or {"input_features"} for Whisper; a decoder-only module's left-padded prompt
    {"input_ids", "attention_mask"} [batch, prompt_length] (the mask defaults to all ones).
    max_length: length of the returned sequences, prompt (or decoder start token) included;
    max_new_tokens, where given, sets it to the prompt length + max_new_tokens.
    decoder_start_token_id: the first output token of an encoder-decoder (unused by decoder-only ones).
    num_beams: 1 for greedy search, more for beam search (length_penalty divides a finished
    hypothesis' log-probability by its length ** length_penalty; early_stopping True, False or
    "never" as in Transformers).
    forced_decoder_ids: (position, token) pairs; position p forces the token at index p of the
    output (Whisper's e.g. [(1, no_timestamps_id)]). suppress_tokens are never generated;
    begin_suppress_tokens not at the first position after the forced ones.
    no_repeat_ngram_size n > 0: no n tokens (decoder start included) occur twice in a sequence.
    pad_token_id defaults to eos_token_id.

    Returns int32 [batch, max_length]: decoder_start_token_id (or the prompt), the generated tokens,
    and pad_token_id after the end-of-sequence token.
    """
    if isinstance(eos_token_id, (list, tuple)):
        if len(eos_token_id) != 1:
            raise ValueError(f"one eos_token_id is supported, got {eos_token_id}")
        eos_token_id = eos_token_id[0]
    if pad_token_id is None:
        pad_token_id = eos_token_id
    if pad_token_id is None:
        raise ValueError("generation needs a pad_token_id (or an eos_token_id to pad with)")
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    decoder_only = hasattr(module, "prefill")
    if not decoder_only and decoder_start_token_id is None:
        raise ValueError("an encoder-decoder needs a decoder_start_token_id")
    prompt_length = inputs["input_ids"].shape[1] if decoder_only else 1
    if max_new_tokens is not None:
        max_length = prompt_length + max_new_tokens
    if max_length is None:
        raise ValueError("generation needs a max_length or max_new_tokens")
    if max_length <= prompt_length:
        raise ValueError(f"max_length {max_length} leaves no room after a prompt of {prompt_length} tokens")
    options = GenerationOptions(
        max_length=int(max_length),
        num_beams=int(num_beams),
        decoder_start_token_id=None if decoder_only else int(decoder_start_token_id),
        eos_token_id=None if eos_token_id is None else int(eos_token_id),
        pad_token_id=int(pad_token_id),
        length_penalty=float(length_penalty),
        early_stopping=early_stopping,
        min_length=int(min_length or 0),
        forced_bos_token_id=None if forced_bos_token_id is None else int(forced_bos_token_id),
        forced_eos_token_id=None if forced_eos_token_id is None else int(forced_eos_token_id),
        suppress_tokens=tuple(int(t) for t in suppress_tokens or ()),
        begin_suppress_tokens=tuple(int(t) for t in begin_suppress_tokens or ()),
        forced_decoder_ids=tuple((int(p), None if t is None else int(t)) for p, t in forced_decoder_ids or ()),
        no_repeat_ngram_size=int(no_repeat_ngram_size or 0),
    )
    return _compiled(module, options)(params, dict(inputs))


# GenerationConfig fields that are `generate` keyword arguments of the same name.
GENERATE_ARGUMENTS = (
    "max_length",
    "max_new_tokens",
    "num_beams",
    "decoder_start_token_id",
    "eos_token_id",
    "pad_token_id",
    "length_penalty",
    "early_stopping",
    "forced_decoder_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "min_length",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "no_repeat_ngram_size",
)

# GenerationConfig fields that change greedy or beam-search tokens, which `generate` does not do,
# and the value that leaves them off (Transformers' Flax `generate` ignores them silently).
UNSUPPORTED_SETTINGS = {
    "do_sample": False,
    "num_return_sequences": 1,
    "return_timestamps": False,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "sequence_bias": None,
    "force_words_ids": None,
    "constraints": None,
    "min_new_tokens": None,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "guidance_scale": 1.0,
    "stop_strings": None,
}


def generation_kwargs(generation_config, **overrides) -> dict:
    """`generate` keyword arguments from a Transformers GenerationConfig, as Transformers' Flax `generate` reads it.

    overrides replace the config's values (e.g. max_length, num_beams; None ones are ignored); for
    Whisper they may also be `language` ("german", "de" or "<|de|>"), `task` ("transcribe" or "translate") and
    `return_timestamps`. A multilingual Whisper config (is_multilingual) gets the forced prefix of
    Transformers' Flax Whisper: position 1 the language token (None, i.e. detected, without a
    language), 2 the task token, 3 the no-timestamps token. Other configs keep their
    forced_decoder_ids (Whisper English-only: e.g. [[1, no_timestamps_id]]).
    A config's max_new_tokens sets the length (after the prompt, or the decoder start token) unless
    max_length is overridden.

    One-token bad_words_ids (opus-mt's [[pad_token_id]]) join suppress_tokens (Transformers' Flax
    `generate` ignores them; PyTorch's bans them).

    Raises ValueError for what `generate` does not do (UNSUPPORTED_SETTINGS: sampling, timestamps,
    several sequences per input, repetition penalties, bad words of several tokens, forced words,
    diverse or contrastive search...), and for a language or task of a model that is not multilingual.
    """

    overrides = {name: value for name, value in overrides.items() if value is not None}

    def setting(name):
        return overrides.pop(name) if name in overrides else getattr(generation_config, name, None)

    language, task, return_timestamps = setting("language"), setting("task"), setting("return_timestamps")
    values = {name: setting(name) for name in UNSUPPORTED_SETTINGS if name != "return_timestamps"}
    values["return_timestamps"] = return_timestamps
    requested = [f"{name}={values[name]!r}" for name, off in UNSUPPORTED_SETTINGS.items()
                 if values[name] is not None and values[name] != off and (off or values[name])]
    bad_words = setting("bad_words_ids") or []
    if any(len(words) != 1 for words in bad_words):
        requested.append(f"bad_words_ids of several tokens {bad_words!r}")
    if requested:
        raise ValueError(f"generation does not support {', '.join(requested)} (greedy and beam search only)")

    kwargs = {name: getattr(generation_config, name, None) for name in GENERATE_ARGUMENTS}
    if bad_words:  # one-token bad words (Marian's [[pad]]): never generated, as PyTorch's processor has it
        kwargs["suppress_tokens"] = [*(kwargs["suppress_tokens"] or ()), *(words[0] for words in bad_words)]
    if "max_length" in overrides:
        kwargs["max_new_tokens"] = None
    if getattr(generation_config, "is_multilingual", False):
        language_id = None
        if language is not None:
            language_id = _token_id(generation_config.lang_to_id, _whisper_language_token(language))
        kwargs["forced_decoder_ids"] = [
            (1, language_id),
            (2, _token_id(generation_config.task_to_id, task or "transcribe")),
            (3, generation_config.no_timestamps_token_id),
        ]
    elif language is not None or task is not None:
        raise ValueError("language and task need a multilingual Whisper generation config (is_multilingual)")
    kwargs.update(overrides)
    return {name: value for name, value in kwargs.items() if value is not None}


def _token_id(token_ids: dict, name: str) -> int:
    if name not in token_ids:
        raise ValueError(f"{name!r} is not one of this Whisper model's {sorted(token_ids)}")
    return token_ids[name]


def _whisper_language_token(language: str) -> str:
    """"german", "de" or "<|de|>" -> "<|de|>"."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    name = language.lower().strip()
    if name.startswith("<|") and name.endswith("|>"):
        return name
    code = TO_LANGUAGE_CODE.get(name, name)
    if code not in LANGUAGES:
        raise ValueError(f"unknown Whisper language {language!r}")
    return f"<|{code}|>"


# Compiled generation functions, by module identity and options. A module holds a Transformers
# config (unhashable), so entries keep the module itself alive and are matched with `is`.
_CACHE: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
_CACHE_SIZE = 16
_CACHE_LOCK = threading.Lock()


def _compiled(module, options: GenerationOptions):
    """The jitted search (params, inputs) -> sequences for `module` and `options`, built on first use."""
    key = (id(module), options)
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[0] is module:
            _CACHE.move_to_end(key)
            return entry[1]
        search = _greedy_search if options.num_beams == 1 else _beam_search
        function = jax.jit(lambda params, inputs: search(module, params, inputs, options))
        _CACHE[key] = (module, function)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return function


def _start(module, params, inputs, options: GenerationOptions, copies: int):
    """The decoding state and the prompt, each input repeated `copies` times (beams).

    Decoder-only: prefill the prompt (once per input; its beams share the cache), which gives the
    logits of the first token to choose. Encoder-decoder: encode once; the prompt is the decoder
    start token, which the first step feeds (no logits yet: None).
    Returns (step: (token_ids [B * copies], state) -> (logits [B * copies, V], state),
    logits [B * copies, V] for the token at index P or None, the state, prompt int32 [B, P]).
    """
    variables = {"params": params}

    def step(token_ids, state):
        return module.apply(variables, token_ids, state, method=module.decode_step)

    if hasattr(module, "prefill"):
        prompt = jnp.asarray(inputs["input_ids"], jnp.int32)
        attention_mask = inputs.get("attention_mask")
        attention_mask = jnp.ones_like(prompt) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        logits, state = module.apply(
            variables, prompt, attention_mask, max_length=options.max_length, method=module.prefill
        )
        if copies > 1:
            logits = jnp.repeat(logits, copies, axis=0)
            cache = jax.tree_util.tree_map(lambda array: jnp.repeat(array, copies, axis=0), state["cache"])
            state = {**state, "cache": cache}
        return step, logits, state, prompt

    encoder_hidden_states = module.apply(variables, **inputs, method=module.encode)
    batch = encoder_hidden_states.shape[0]
    encoder_attention_mask = inputs.get("attention_mask")
    if copies > 1:
        encoder_hidden_states = jnp.repeat(encoder_hidden_states, copies, axis=0)
        if encoder_attention_mask is not None:
            encoder_attention_mask = jnp.repeat(encoder_attention_mask, copies, axis=0)
    state = module.apply(
        variables,
        encoder_hidden_states,
        encoder_attention_mask,
        max_length=options.max_length,
        method=module.init_decoding_state,
    )
    return step, None, state, jnp.full((batch, 1), options.decoder_start_token_id, jnp.int32)


def _process_scores(scores, sequences, cur_len, options: GenerationOptions, prompt_length: int):
    """Transformers' logits processors, in its order, for the token at index `cur_len`.

    scores [n, vocab] float32 (logits for greedy search, log-probabilities for beam search);
    sequences [n, max_length] the tokens so far (the prompt of `prompt_length` tokens first,
    padding from `cur_len`).
    """
    minus_inf = -jnp.inf

    def only(token):
        """Scores that allow nothing but `token` (0 for it, -inf elsewhere)."""
        return jnp.full_like(scores, minus_inf).at[:, token].set(0.0)

    if options.eos_token_id is not None and options.min_length > 0:
        # Transformers' Flax processor also bans EOS at cur_len == min_length.
        scores = jnp.where(cur_len <= options.min_length, scores.at[:, options.eos_token_id].set(minus_inf), scores)
    if options.forced_bos_token_id is not None:
        scores = jnp.where(cur_len == 1, only(options.forced_bos_token_id), scores)
    if options.forced_eos_token_id is not None:
        scores = jnp.where(cur_len == options.max_length - 1, only(options.forced_eos_token_id), scores)
    if options.suppress_tokens:
        scores = scores.at[:, list(options.suppress_tokens)].set(minus_inf)
    if options.begin_suppress_tokens:
        suppressed = scores.at[:, list(options.begin_suppress_tokens)].set(minus_inf)
        scores = jnp.where(cur_len == options.begin_index(prompt_length), suppressed, scores)
    # forced position p is output index prompt_length + p - 1 (p counts from the decoder start token)
    forced = {prompt_length + position - 1: token for position, token in options.forced_decoder_ids}
    for index, token in forced.items():
        if token is not None and token >= 0:
            scores = jnp.where(cur_len == index, only(token), scores)
    if options.no_repeat_ngram_size > 0:
        scores = _ban_repeated_ngrams(scores, sequences, cur_len, options.no_repeat_ngram_size)
    return scores


def _ban_repeated_ngrams(scores, sequences, cur_len, size: int):
    """-inf for every token that would complete an n-gram (n = `size`) already in `sequences`
    [n, max_length] before `cur_len`: its first size - 1 tokens equal the last size - 1 tokens."""
    windows = sequences.shape[1] - size + 1
    ngrams = jnp.stack([sequences[:, offset : offset + windows] for offset in range(size)], axis=-1)  # [n, W, size]
    prefix = jax.lax.dynamic_slice_in_dim(sequences, cur_len - (size - 1), size - 1, axis=1)  # [n, size - 1]
    seen = jnp.arange(windows) <= cur_len - size  # n-grams wholly before cur_len
    repeats = jnp.all(ngrams[:, :, :-1] == prefix[:, None, :], axis=-1) & seen  # [n, W]
    rows = jnp.arange(sequences.shape[0])[:, None]
    banned = jnp.zeros(scores.shape, jnp.int32).at[rows, ngrams[:, :, -1]].max(repeats.astype(jnp.int32))
    return jnp.where(banned > 0, -jnp.inf, scores)


def _greedy_search(module, params, inputs, options: GenerationOptions):
    """Most likely next token at each step; finished sequences continue with padding."""
    step, logits, state, prompt = _start(module, params, inputs, options, copies=1)
    batch, prompt_length = prompt.shape
    sequences = jnp.full((batch, options.max_length), options.pad_token_id, jnp.int32)
    sequences = sequences.at[:, :prompt_length].set(prompt)

    def choose(cur_len, sequences, finished, logits):
        """Write the token at index `cur_len`: returns (sequences, finished)."""
        scores = _process_scores(logits.astype(jnp.float32), sequences, cur_len, options, prompt_length)
        next_tokens = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        next_tokens = jnp.where(finished, options.pad_token_id, next_tokens)
        if options.eos_token_id is not None:
            finished = finished | (next_tokens == options.eos_token_id)
        return jax.lax.dynamic_update_slice(sequences, next_tokens[:, None], (0, cur_len)), finished

    def not_done(carry):
        cur_len, _, finished, _ = carry
        return (cur_len < options.max_length) & ~jnp.all(finished)

    def advance(carry):
        cur_len, sequences, finished, state = carry
        last_tokens = jax.lax.dynamic_index_in_dim(sequences, cur_len - 1, axis=1, keepdims=False)
        logits, state = step(last_tokens, state)
        return cur_len + 1, *choose(cur_len, sequences, finished, logits), state

    cur_len, finished = jnp.array(prompt_length, jnp.int32), jnp.zeros((batch,), bool)
    carry = (cur_len, sequences, finished, state)
    if logits is not None:  # decoder-only: the prefill's logits choose the first new token
        carry = (cur_len + 1, *choose(cur_len, sequences, finished, logits), state)
    _, sequences, _, _ = jax.lax.while_loop(not_done, advance, carry)
    return sequences


def _gather_beams(tree, beam_indices):
    """Select along axis 1 of every [batch, beams, ...] array: beam_indices [batch, k] -> arrays [batch, k, ...]."""

    def gather(array):
        index = beam_indices.reshape(beam_indices.shape + (1,) * (array.ndim - 2))
        return jnp.take_along_axis(array, index, axis=1)

    return jax.tree_util.tree_map(gather, tree)


def _beam_search(module, params, inputs, options: GenerationOptions):
    """Beam search as Transformers' Flax beam search (itself after Flax's WMT example).

    Keeps `num_beams` running hypotheses and `num_beams` finished ones per input. Each step takes
    the 2 * num_beams best continuations of the running hypotheses; those ending in EOS compete
    (length-penalised: generated tokens only) for the finished set, the others for the running set.
    """
    num_beams, max_length = options.num_beams, options.max_length
    step, logits, state, prompt = _start(module, params, inputs, options, copies=num_beams)
    batch, prompt_length = prompt.shape
    eos = -1 if options.eos_token_id is None else options.eos_token_id
    length_penalty, early_stopping = options.length_penalty, options.early_stopping

    def fold(array):  # [batch, beams, ...] -> [batch * beams, ...]
        return array.reshape((-1,) + array.shape[2:])

    def unfold(array):  # [batch * beams, ...] -> [batch, beams, ...]
        return array.reshape((batch, -1) + array.shape[1:])

    sequences = jnp.full((batch, num_beams, max_length), options.pad_token_id, jnp.int32)
    running_sequences = sequences.at[:, :, :prompt_length].set(prompt[:, None, :])
    # Only the first beam is live at the start, so the first step does not pick the same token k times.
    running_scores = jnp.tile(jnp.array([0.0] + [NEVER] * (num_beams - 1), jnp.float32), (batch, 1))
    finished_scores = jnp.full((batch, num_beams), NEVER, jnp.float32)
    finished = jnp.zeros((batch, num_beams), bool)

    def not_done(carry):
        cur_len, (_, running_scores, _, finished_scores, finished), _ = carry
        # The best running hypothesis, length-penalised as if it ended now (Transformers' heuristic),
        # or at max_length where it may still grow and a longer one scores better.
        if early_stopping == "never" and length_penalty > 0.0:
            generated = max_length - prompt_length
        else:
            # At least 1: before an encoder-decoder's first step the best running score, 0, is not divided by 0.
            generated = jnp.maximum(cur_len - prompt_length, 1)
        best_running = running_scores[:, :1] / (generated**length_penalty)
        worst_finished = jnp.where(finished, jnp.min(finished_scores, axis=1, keepdims=True), NEVER)
        can_improve = jnp.any(best_running > worst_finished)
        all_done = jnp.all(finished) & (early_stopping is True)
        return (cur_len < max_length) & ~all_done & can_improve

    def choose(cur_len, beams, logits, state):
        """Extend the hypotheses `beams` with the token at index `cur_len`; the cache follows them."""
        running_sequences, running_scores, sequences, finished_scores, finished = beams
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        log_probs = unfold(_process_scores(log_probs, fold(running_sequences), cur_len, options, prompt_length))
        vocab = log_probs.shape[-1]
        candidate_scores = (log_probs + running_scores[:, :, None]).reshape(batch, num_beams * vocab)

        # The 2k best continuations: even if k of them end here, k others remain to run on.
        top_scores, top_indices = jax.lax.top_k(candidate_scores, 2 * num_beams)
        source_beams = top_indices // vocab
        top_tokens = (top_indices % vocab).astype(jnp.int32)
        top_sequences = _gather_beams(running_sequences, source_beams)
        top_sequences = jax.lax.dynamic_update_slice(top_sequences, top_tokens[:, :, None], (0, 0, cur_len))
        just_finished = top_tokens == eos

        # Running set: the k best continuations that did not end.
        alive_scores = top_scores + jnp.where(just_finished, NEVER, 0.0)
        keep = jax.lax.top_k(alive_scores, num_beams)[1]
        running_sequences, running_scores = _gather_beams((top_sequences, alive_scores), keep)

        # Finished set: the k best among the finished so far and the continuations that ended here.
        ended_scores = top_scores / ((cur_len + 1 - prompt_length) ** length_penalty)
        batch_full = jnp.all(finished, axis=-1, keepdims=True) & (early_stopping is True)
        ended_scores = ended_scores + jnp.where(~just_finished | batch_full, NEVER, 0.0)
        merged = (
            jnp.concatenate([sequences, top_sequences], axis=1),
            jnp.concatenate([finished_scores, ended_scores], axis=1),
            jnp.concatenate([finished, just_finished], axis=1),
        )
        best = jax.lax.top_k(merged[1], num_beams)[1]
        sequences, finished_scores, finished = _gather_beams(merged, best)

        # The key/value cache follows its hypotheses.
        cache_sources = jnp.take_along_axis(source_beams, keep, axis=1)
        cache = jax.tree_util.tree_map(lambda array: fold(_gather_beams(unfold(array), cache_sources)), state["cache"])
        beams = (running_sequences, running_scores, sequences, finished_scores, finished)
        return cur_len + 1, beams, {**state, "cache": cache}

    def advance(carry):
        cur_len, beams, state = carry
        last_tokens = fold(jax.lax.dynamic_index_in_dim(beams[0], cur_len - 1, axis=2, keepdims=False))
        logits, state = step(last_tokens, state)
        return choose(cur_len, beams, logits, state)

    beams = (running_sequences, running_scores, sequences, finished_scores, finished)
    carry = (jnp.array(prompt_length, jnp.int32), beams, state)
    if logits is not None:  # decoder-only: the prefill's logits choose the first new token
        carry = choose(*carry[:2], logits, state)
    _, (running_sequences, _, sequences, _, finished), _ = jax.lax.while_loop(not_done, advance, carry)
    # An input without any finished hypothesis returns its best running one.
    any_finished = jnp.any(finished, axis=1)
    return jnp.where(any_finished[:, None], sequences[:, 0], running_sequences[:, 0])


def update_cache(cache: dict, keys, values, position) -> dict:
    """Write this step's keys and values [batch, steps, heads, head_dim] into a decoder layer's
    cache {"key", "value"} [batch, max_length, heads, head_dim] at `position`; returns the new cache."""
    start = (0, position, 0, 0)
    return {
        "key": jax.lax.dynamic_update_slice(cache["key"], keys.astype(cache["key"].dtype), start),
        "value": jax.lax.dynamic_update_slice(cache["value"], values.astype(cache["value"].dtype), start),
    }


def init_state(attention_mask, max_length: int, num_layers: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """A decoder-only module's decoding state before its left-padded prompt (see the module docstring).

    attention_mask [B, P] (0 on the left padding). The layers' caches are zeros [B, max_length,
    kv_heads, head_dim] of `dtype`; slots after the prompt are unmasked (the causal rule of
    `cache_inputs` hides them until written). "position" starts at -(padding), so that the
    prompt's real tokens get positions 0, 1, ... (cumsum(mask) - 1, as Transformers).
    """
    batch, prompt_length = attention_mask.shape
    shape = (batch, max_length, kv_heads, head_dim)
    prompt_mask = jnp.asarray(attention_mask) > 0
    key_mask = jnp.ones((batch, max_length), bool).at[:, :prompt_length].set(prompt_mask)
    return {
        "index": jnp.zeros((), jnp.int32),
        "cache": {
            "layers": [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)} for _ in range(num_layers)],
            "key_mask": key_mask,
            "position": jnp.sum(prompt_mask, axis=1, dtype=jnp.int32) - prompt_length,
        },
    }


def cache_inputs(state: dict, length: int):
    """Position ids and attention mask of the next `length` tokens written at state["index"].

    Returns position_ids int32 [B, length] (0 on the prompt's padding) and a boolean mask
    [B, 1, length, max_length] over the cache: slot j is visible to the i-th token when it is not
    padding and j <= index + i.
    """
    cache = state["cache"]
    offsets = jnp.arange(length, dtype=jnp.int32)
    position_ids = jnp.maximum(cache["position"][:, None] + offsets, 0)
    slots = jnp.arange(cache["key_mask"].shape[1])
    causal = slots[None, :] <= state["index"] + offsets[:, None]  # [length, max_length]
    return position_ids, cache["key_mask"][:, None, None, :] & causal[None, None]


def advance_state(state: dict, layers: list, length: int) -> dict:
    """The state after writing `length` tokens: the layers' new caches, index and positions moved on."""
    cache = state["cache"]
    cache = {**cache, "layers": layers, "position": cache["position"] + length}
    return {**state, "index": state["index"] + length, "cache": cache}
