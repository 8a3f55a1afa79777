"""Instruction data for causal language models: examples with a loss mask, packed into blocks.

Two row formats (JSON Lines; prompt / completion also CSV):

- `prompt` and `completion` (strings): the model reads prompt + completion + the end token. The
  prompt is tokenized with the tokenizer's special tokens (a BOS where it adds one), the
  completion without, and the two are joined as they are: put the separating space or newline
  in one of the texts. Loss targets: the completion's tokens and the end token.
- `messages` (a list of {"role", "content"}): the conversation rendered with the tokenizer's chat
  template (`apply_chat_template`, tokenized without adding special tokens, as Transformers
  does). Loss targets: the assistant turns, each from where the template's generation prompt
  ends to where the turn ends (its end-of-turn marker included, so the model learns to stop).

Finding the assistant turns: for assistant message i the template renders the conversation
prefix messages[:i] with the generation prompt, and messages[:i + 1]; both must be prefixes of the
whole rendered conversation (else an InputError names the row), and the characters between
their ends are the turn. Tokens are mapped to characters with the fast tokenizer's offsets: a
token is a target when its first character lies inside a turn. Working on characters instead of
token counts keeps the spans right where the tokenizer merges across a turn boundary.

`pack` puts the examples, in order, into rows of --block_size tokens (a new row when the next
example does not fit; an example longer than a row is cut to it) with `segment_ids` (1, 2, ...
per example in a row, 0 = padding) and `position_ids` restarting at 0 per example, so that with
the models' segment masks (modeling/gpt2.same_segment) each example is computed as if alone.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from flax_finetune.errors import InputError

logger = logging.getLogger("flax_finetune")

PROMPT_COMPLETION, MESSAGES = "prompt/completion", "messages"

Example = tuple[np.ndarray, np.ndarray]
"""Token ids [T] int32 and loss mask [T] int32 (1 = the token is a loss target)."""


def row_format(column_names: Sequence[str]) -> Optional[str]:
    """MESSAGES, PROMPT_COMPLETION, or None for text data (today's concatenated blocks)."""
    if "messages" in column_names:
        return MESSAGES
    halves = {"prompt", "completion"}
    found = halves & set(column_names)
    if found == halves:
        return PROMPT_COMPLETION
    if found:
        (present,), (missing,) = found, halves - found
        raise InputError(f"the data has a {present!r} column but no {missing!r} column: "
                         "give both (or a `messages` or `text` column)")
    return None


def splits_format(splits: Mapping[str, Any]) -> Optional[str]:
    """The one row format (see `row_format`) of every split; an InputError when they differ."""
    formats = {split: row_format(dataset.column_names) for split, dataset in splits.items()
               if dataset.column_names is not None}  # a stream may not know its columns before it is read
    if len(set(formats.values())) > 1:
        found = ", ".join(f"{split}: {kind or 'text'}" for split, kind in formats.items())
        raise InputError(f"the data files have different formats ({found}): give every split the same columns")
    return next(iter(formats.values()), None)


def examples(dataset: Any, kind: str, tokenizer: Any, completion_only_loss: bool) -> list[Example]:
    """Tokenized examples of a split (or of a batch of its rows) in format `kind`, each with its loss
    mask (with `completion_only_loss` False every token of the example is a target)."""
    if kind == PROMPT_COMPLETION:
        tokenized = prompt_completion_examples(dataset["prompt"], dataset["completion"], tokenizer)
    else:
        tokenized = chat_examples(dataset["messages"], tokenizer)
    if not completion_only_loss:
        tokenized = [(ids, np.ones_like(mask)) for ids, mask in tokenized]
    return tokenized


def tokenized_split(dataset: Any, kind: str, tokenizer: Any, completion_only_loss: bool, data_args: Any):
    """`examples` of a `datasets.Dataset` written by `datasets.map` into its Arrow cache (input_ids and
    loss_mask columns; --preprocessing_num_workers, reused by a rerun with the same inputs)."""
    import datasets

    def tokenize(batch):
        tokenized = examples(batch, kind, tokenizer, completion_only_loss)
        return {"input_ids": [ids for ids, _ in tokenized], "loss_mask": [mask for _, mask in tokenized]}

    ids = datasets.Sequence(datasets.Value("int32"))
    return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenizing",
                       features=datasets.Features({"input_ids": ids, "loss_mask": ids}), **data_args.map_options)


def prompt_completion_examples(prompts: Sequence[str], completions: Sequence[str], tokenizer: Any) -> list[Example]:
    """prompt + completion + end token per row; the completion and the end token are the targets."""
    def ids(texts, special):
        return tokenizer([str(text) for text in texts], add_special_tokens=special,
                         return_attention_mask=False)["input_ids"]

    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    tokenized = []
    for prompt, completion in zip(ids(prompts, True), ids(completions, False)):
        completion = completion + end
        mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(completion), np.int32)])
        tokenized.append((np.asarray(prompt + completion, np.int32), mask))
    return tokenized


def chat_examples(conversations: Sequence[Any], tokenizer: Any) -> list[Example]:
    """Each conversation rendered with the chat template; its assistant turns are the targets
    (found as the module docstring says)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("the data has a `messages` column but the tokenizer has no chat template: give "
                         "`prompt` and `completion` columns (or a `text` column) instead, or a --tokenizer_name "
                         "whose tokenizer has a chat template")
    if importlib.util.find_spec("jinja2") is None:
        raise InputError("`messages` data needs jinja2 to render the chat template: pip install jinja2")
    if not tokenizer.is_fast:
        raise InputError("`messages` data needs a fast tokenizer (its character offsets mark the assistant turns)")
    texts, spans = zip(*(assistant_spans(messages, tokenizer, row) for row, messages in enumerate(conversations)))
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False)
    tokenized = []
    for ids, offsets, turns in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
        starts = np.asarray(offsets, np.int64).reshape(-1, 2)[:, 0]  # [T] first character of each token
        turns = np.asarray(turns, np.int64).reshape(-1, 2)  # [S, 2] character spans
        inside = (starts[:, None] >= turns[None, :, 0]) & (starts[:, None] < turns[None, :, 1])
        tokenized.append((np.asarray(ids, np.int32), inside.any(axis=1).astype(np.int32)))
    return tokenized


def assistant_spans(messages: Any, tokenizer: Any, row: int) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span [start, end) of each assistant turn in it)."""
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise InputError(f"`messages` row {row}: expected a list of {{\"role\", \"content\"}} objects "
                         f"(JSON Lines), got {type(messages).__name__}")

    def render(turns, generation_prompt=False):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(messages[:index], True), render(messages[: index + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise InputError(f"`messages` row {row}: the chat template renders the conversation up to turn {index} "
                             "differently from the whole conversation, so its assistant turns cannot be located")
        spans.append((len(before), len(through)))
    return text, spans


def packing_plan(lengths: np.ndarray, block_size: int, packing: bool = True) -> tuple[np.ndarray, ...]:
    """(row, offset in the row, segment number) of each example of `lengths` tokens (cut to
    `block_size`), placed greedily in order: a new row when the next one does not fit (each
    example in a row of its own without `packing`). Each [examples] int64."""
    lengths = np.minimum(lengths, block_size)
    rows, offsets, segments = (np.zeros(len(lengths), np.int64) for _ in range(3))
    row, filled, segment = 0, 0, 0
    for index, length in enumerate(lengths):  # a loop over examples; tokens are placed in bulk
        if index and (not packing or filled + length > block_size):
            row, filled, segment = row + 1, 0, 0
        rows[index], offsets[index], segments[index] = row, filled, segment + 1
        filled, segment = filled + length, segment + 1
    return rows, offsets, segments


def place(tokenized: Sequence[Example], rows: np.ndarray, offsets: np.ndarray, segments: np.ndarray,
          num_rows: int, block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """Examples placed at their (row, offset, segment) of `packing_plan`: input_ids, attention_mask
    (1 = token), segment_ids (1, 2, ... per example, 0 = padding), position_ids (0, 1, ... per
    example) and loss_mask (1 = target; never an example's first token), each [num_rows, block_size]
    int32."""
    lengths = np.asarray([min(len(ids), block_size) for ids, _ in tokenized], np.int64)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # [N] place in its example
    slots = np.repeat(rows * block_size + offsets, lengths) + within  # [N] flat slot of every kept token
    columns = {name: np.zeros(num_rows * block_size, np.int32)
               for name in ("input_ids", "attention_mask", "segment_ids", "position_ids", "loss_mask")}
    columns["input_ids"][:] = pad_id
    if len(lengths):
        columns["input_ids"][slots] = np.concatenate([ids[:block_size] for ids, _ in tokenized])
        columns["loss_mask"][slots] = np.concatenate([mask[:block_size] for _, mask in tokenized]) * (within > 0)
        columns["attention_mask"][slots] = 1
        columns["segment_ids"][slots] = np.repeat(segments, lengths)
        columns["position_ids"][slots] = within
    return {name: column.reshape(num_rows, block_size) for name, column in columns.items()}


def pack(tokenized: Sequence[Example], block_size: int, pad_id: int, packing: bool = True) -> dict[str, np.ndarray]:
    """Examples -> rows of `block_size` tokens, greedily in order (one example per row without `packing`):
    the columns of `place`. An example longer than a row is cut to it (logged); empty ones are dropped."""
    tokenized = [(ids, mask) for ids, mask in tokenized if len(ids)]
    lengths = np.asarray([len(ids) for ids, _ in tokenized], np.int64)
    log_cut(lengths, block_size)
    rows, offsets, segments = packing_plan(lengths, block_size, packing)
    return place(tokenized, rows, offsets, segments, int(rows[-1]) + 1 if len(rows) else 1, block_size, pad_id)


def log_cut(lengths: np.ndarray, block_size: int) -> None:
    cut = int((lengths > block_size).sum())
    if cut:
        logger.info("%d of %d examples are longer than --block_size %d: cut to it", cut, len(lengths), block_size)


class PackedRows:
    """The packed rows of `pack`, made when a batch takes them from a tokenized split's Arrow table
    (`tokenized_split`): only the packing plan (three integers an example) is held in memory."""

    def __init__(self, tokenized: Any, block_size: int, pad_id: int, packing: bool = True):
        import pyarrow.compute as pc

        from flax_finetune.data import arrow_table

        self.table = arrow_table(tokenized)
        lengths = pc.list_value_length(self.table.column("input_ids")).to_numpy(zero_copy_only=False)
        self.examples = np.flatnonzero(lengths > 0)  # empty examples are dropped
        log_cut(lengths[self.examples], block_size)
        self.rows, self.offsets, self.segments = packing_plan(lengths[self.examples], block_size, packing)
        self.block_size, self.pad_id = block_size, pad_id
        self.length = int(self.rows[-1]) + 1 if len(self.rows) else 1

    def __len__(self) -> int:
        return self.length

    def take(self, indices: np.ndarray, epoch: int = 0) -> dict[str, np.ndarray]:
        import pyarrow as pa

        wanted = np.asarray(indices, np.int64)
        first, last = np.searchsorted(self.rows, wanted, "left"), np.searchsorted(self.rows, wanted, "right")
        chosen = np.concatenate([np.arange(a, b) for a, b in zip(first, last)]).astype(np.int64)  # plan entries
        taken = self.table.take(pa.array(self.examples[chosen]))
        ids, masks = (taken.column(name).to_pylist() for name in ("input_ids", "loss_mask"))
        tokenized = [(np.asarray(i, np.int32), np.asarray(m, np.int32)) for i, m in zip(ids, masks)]
        rows = np.repeat(np.arange(len(wanted)), last - first)  # each example's row among the taken ones
        return place(tokenized, rows, self.offsets[chosen], self.segments[chosen], len(wanted), self.block_size,
                     self.pad_id)
