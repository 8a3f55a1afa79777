"""Datasets in, fixed-shape batches out.

`load_splits` reads local csv / json / jsonl / txt files (or a hub dataset when
online) through `datasets`, with one clear `InputError` for each way a file
can be wrong. `BatchPlan` cuts a split into batches of one fixed shape: the
last batch is padded with masked rows instead of dropped, so evaluation sees
every example and each jitted step compiles once. Shuffling is a pure
function of (seed, epoch), so a resumed run sees the same order. Training
batches are made `PREFETCH` ahead in a background thread, so the host loads the
next ones while the device runs the current step.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np

from flax_finetune.errors import InputError

logger = logging.getLogger(__name__)

BUILDER_BY_EXTENSION = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}
EXAMPLE_MASK = "example_mask"
ROW = "__row__"  # ComputedRows' column of stored row numbers
PREFETCH = 2  # training batches made ahead of the step that runs
COMPUTED_CACHE_BYTES = 2**30  # what ComputedRows keeps of a split's computed rows


def _builder_for(path: Path, flag: str, extensions: Sequence[str]) -> str:
    if not path.is_file():
        raise InputError(f"--{flag} {path}: no such file")
    if path.suffix.lower() not in extensions:
        raise InputError(
            f"--{flag} {path}: unsupported extension {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(extensions)}"
        )
    if path.stat().st_size == 0:
        raise InputError(f"--{flag} {path}: the file is empty")
    return BUILDER_BY_EXTENSION[path.suffix.lower()]


# datasets' text reader splits each chunk into Python strings, and the memory they leave behind
# grew with the file: with its 10 MB default the process's RSS after loading was 148 MB for 11 MB
# of text and 200 MB for 110 MB; with 1 MB chunks 121 and 122 MB (benchmarks/data_scale.py's text,
# 2026-11-30).
TEXT_CHUNK_BYTES = 1 << 20


def load_splits(
    files: Mapping[str, tuple[str, Optional[str]]],
    *,
    extensions: Sequence[str] = (".csv", ".json", ".jsonl"),
    json_field: Optional[str] = None,  # the top-level key holding the records of .json files
    keep_linebreaks: bool = True,
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    trust_remote_code: bool = False,
    streaming: bool = False,
):
    """Load each split that has a file into a `datasets.Dataset` (an `IterableDataset` with `streaming`).

    `files` maps a split name to (flag name, path or None), e.g.
    `{"train": ("train_file", args.train_file)}`; the flag name is used in
    error messages. With `dataset_name`, the splits come from that dataset
    instead (hub or local loading script, run only with `trust_remote_code`). Returns {split: Dataset}.
    """
    import datasets

    if not sys.stderr.isatty():  # bars for long preparation on a terminal; not in logs
        datasets.utils.logging.disable_progress_bar()
    if dataset_name is not None:
        try:
            remote_code = {"trust_remote_code": True} if trust_remote_code else {}  # datasets 4 dropped scripts
            loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, streaming=streaming,
                                           **remote_code)
        except Exception as error:  # hub, network and script errors all mean the same to the user
            raise InputError(f"--dataset_name {dataset_name}: cannot load it ({type(error).__name__}: {error})") from None
        return dict(loaded)
    splits = {}
    for split, (flag, path) in files.items():
        if path is None:
            continue
        builder = _builder_for(Path(path), flag, extensions)
        options = {"field": json_field} if Path(path).suffix.lower() == ".json" and json_field else {}
        if builder == "text":
            options.update(keep_linebreaks=keep_linebreaks, chunksize=TEXT_CHUNK_BYTES)
        try:
            splits[split] = datasets.load_dataset(
                builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir, streaming=streaming, **options
            )
        except Exception as error:  # malformed CSV/JSON, bad encoding: name the file, not the library frame
            cause = error.__cause__ or error.__context__ or error
            if isinstance(cause, UnicodeDecodeError) or isinstance(error, UnicodeDecodeError):
                raise InputError(f"--{flag} {path}: the file is not valid UTF-8 text") from None
            if "corresponds to no data" in str(error):  # datasets' words for a file with a header and no rows
                raise InputError(f"--{flag} {path}: the file holds no examples") from None
            raise InputError(f"--{flag} {path}: cannot read it as {builder} ({type(cause).__name__}: {cause})") from None
        if not streaming and len(splits[split]) == 0:
            raise InputError(f"--{flag} {path}: the file holds no examples")
    return splits


def require_columns(dataset, names: Sequence[str], flag: str) -> None:
    """Stop with the list of columns found when one of `names` is missing."""
    missing = [name for name in names if name not in dataset.column_names]
    if missing:
        raise InputError(
            f"--{flag}: no column {', '.join(map(repr, missing))}; "
            f"the columns found are {', '.join(dataset.column_names)}"
        )


def hold_out(dataset, percentage: int):
    """(first 100 - percentage %, last percentage %) of `dataset`; each keeps at least one example."""
    if not 0 < percentage < 100:
        raise InputError(f"--validation_split_percentage {percentage}: must be between 1 and 99")
    if len(dataset) < 2:
        raise InputError("the training file is too small to hold out a validation split; give --validation_file")
    held = min(len(dataset) - 1, max(1, round(len(dataset) * percentage / 100)))
    cut = len(dataset) - held
    return dataset.select(range(cut)), dataset.select(range(cut, len(dataset)))


def take_first(dataset, max_samples: Optional[int]):
    """The first `max_samples` examples (all of them when None), of a dataset or a stream."""
    if max_samples is not None and not hasattr(dataset, "__len__"):
        return dataset.take(max_samples)
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))


class Rows(Protocol):
    """Anything that returns a dict of numpy columns for a 1-D array of row indices.

    `epoch` lets rows that are made fresh each time (random masking, span
    corruption) differ between epochs while staying a pure function of
    (indices, epoch); evaluation always asks for epoch 0.
    """

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray, epoch: int) -> Mapping[str, np.ndarray]: ...


class ArrayRows:
    """Rows held in memory as equal-length numpy columns."""

    def __init__(self, columns: Mapping[str, np.ndarray]):
        lengths = {len(column) for column in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: {lengths}")
        self.columns = dict(columns)
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def take(self, indices: np.ndarray, epoch: int = 0) -> dict[str, np.ndarray]:
        return {name: column[indices] for name, column in self.columns.items()}


class MappedRows:
    """Rows whose columns a function makes from stored rows at load time.

    `function(columns, indices, epoch) -> columns` gets the stored columns of
    the rows at `indices` ([n, ...] each) and returns the columns a step sees.
    """

    def __init__(self, rows: Rows, function: Callable[[Mapping[str, np.ndarray], np.ndarray, int], dict]):
        self.rows = rows
        self.function = function

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: np.ndarray, epoch: int = 0) -> dict[str, np.ndarray]:
        return self.function(self.rows.take(indices, epoch), indices, epoch)


class ComputedRows:
    """Rows with one column computed per row when a batch takes it, and kept up to a memory budget.

    A split then costs its small columns, what `compute` reads from (file names, a memory-mapped
    Arrow table) and at most `cache_bytes` of computed rows, whatever its size: Whisper's log-mel
    features are 0.96 MB per clip, 27 GB for 28k clips. Rows computed while the budget lasts are
    kept (a fixture-sized split is computed once); the others are computed again at each take.
    `compute(row) -> array` (one shape for every row) runs on `workers` threads; it must be a pure
    function of the row number.
    """

    def __init__(self, columns: Mapping[str, np.ndarray], name: str, compute: Callable[[int], np.ndarray],
                 workers: Optional[int] = None, cache_bytes: int = COMPUTED_CACHE_BYTES):
        self.rows = ArrayRows({**columns, ROW: np.arange(len(next(iter(columns.values()))))})
        self.name = name
        self.compute = compute
        self.workers = max(1, workers or 1)
        self.cache: dict[int, np.ndarray] = {}
        self.cache_bytes_left = cache_bytes
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, row: int) -> np.ndarray:
        """The computed column of one row, from the cache or computed (and cached while the budget lasts)."""
        value = self.cache.get(row)
        if value is None:
            value = self.compute(row)
            with self._lock:
                if value.nbytes <= self.cache_bytes_left and row not in self.cache:
                    self.cache[row] = value
                    self.cache_bytes_left -= value.nbytes
        return value

    def take(self, indices: np.ndarray, epoch: int = 0) -> dict[str, np.ndarray]:
        columns = self.rows.take(indices, epoch)
        rows, where = np.unique(columns.pop(ROW), return_inverse=True)  # padding repeats a row: computed once
        if self.workers == 1 or len(rows) == 1:
            computed = [self.row(int(row)) for row in rows]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"compute-{self.name}")
            computed = list(self._pool.map(self.row, map(int, rows)))
        return {self.name: np.stack(computed)[where.reshape(-1)], **columns}


def arrow_table(dataset):
    """The pyarrow table behind a `datasets.Dataset` (memory-mapped where datasets cached it); a
    selection of rows (`select`, `--max_*_samples`) is written out first, so rows are table rows."""
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
    return dataset.data.table


def rows_per_batch(dataset, batch_bytes: int) -> int:
    """Rows of `dataset` holding about `batch_bytes` of its Arrow data (at least one).

    Each batch that `datasets.map` writes is one record batch of the cache file, and opening the
    file touches every record batch's pages: with datasets' 1,000 rows a batch (372 record
    batches), a 110 MB text's token cache added 23 MB to the RSS of the process reading it, with
    1 MB batches of text (110 record batches) 7 MB.
    """
    table = dataset.data
    return max(1, int(batch_bytes * table.num_rows / max(table.nbytes, 1)))


class TokenStream:
    """The token ids of every text of a tokenized split, concatenated, read where they lie.

    The ids stay in the dataset's Arrow table (a memory-mapped cache file when `datasets.map`
    wrote one): `read` copies out only the span asked for, so a corpus costs no memory of its
    own however large it is. `dataset` has a list-of-integers column `column`.
    """

    def __init__(self, dataset, column: str = "input_ids"):
        self.pieces = [chunk.flatten().to_numpy(zero_copy_only=False)
                       for chunk in arrow_table(dataset).column(column).chunks]
        self.starts = np.cumsum([0] + [len(piece) for piece in self.pieces])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Token ids [start, stop) of the stream (fewer at its end), int32."""
        stop = min(stop, len(self))
        parts, piece = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            offset = start - self.starts[piece]
            taken = self.pieces[piece][offset : offset + stop - start]
            parts.append(taken)
            start += len(taken)
            piece += 1
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


class TokenBlocks:
    """Rows cut from a `TokenStream`: block i holds tokens [i * content, (i + 1) * content),
    framed by `prefix` and `suffix` (a tokenizer's special tokens), in rows of `width`.

    Columns: input_ids and attention_mask [n, width], and with `special_tokens_mask` also
    special_tokens_mask (1 on the frame and padding). The last, shorter block is padded with
    `pad_id` (attention 0), or dropped with `drop_last` (every row then full). Rows are made when
    a batch takes them, so only the stream's token ids ever hold the split.
    """

    def __init__(self, stream: TokenStream, width: int, pad_id: int, prefix: Sequence[int] = (),
                 suffix: Sequence[int] = (), drop_last: bool = False, special_tokens_mask: bool = False):
        self.stream, self.width, self.pad_id = stream, width, pad_id
        self.prefix, self.suffix = np.asarray(prefix, np.int32), np.asarray(suffix, np.int32)
        self.content = width - len(self.prefix) - len(self.suffix)
        if self.content < 1:
            raise InputError(f"a block of {width} tokens has no room left beside its special tokens")
        self.special_tokens_mask = special_tokens_mask
        self.length = len(stream) // self.content if drop_last else max(1, -(-len(stream) // self.content))

    def __len__(self) -> int:
        return self.length

    def take(self, indices: np.ndarray, epoch: int = 0) -> dict[str, np.ndarray]:
        input_ids = np.full((len(indices), self.width), self.pad_id, np.int32)
        attention_mask = np.zeros((len(indices), self.width), np.int32)
        special = np.ones((len(indices), self.width), np.int32)
        for row, index in enumerate(indices):
            chunk = self.stream.read(int(index) * self.content, (int(index) + 1) * self.content)
            ids = np.concatenate([self.prefix, chunk, self.suffix])
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            special[row, len(self.prefix) : len(self.prefix) + len(chunk)] = 0
        columns = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.special_tokens_mask:
            columns["special_tokens_mask"] = special
        return columns


class PaddedRows:
    """Rows of a tokenized `datasets.Dataset`, read from its Arrow table when a batch takes them.

    Sequence columns (those in `pad_values`) are right-padded with their pad value (and cut) to
    `length`, or to the longest row of the split rounded up to a multiple of 8 (read from the
    table's list lengths: no row is decoded for it); the other columns are as stored. The split
    stays in the table (a memory-mapped cache file where `datasets.map` wrote one).
    """

    def __init__(self, dataset, pad_values: Mapping[str, int], length: Optional[int] = None):
        import pyarrow.compute as pc

        self.table = arrow_table(dataset)
        self.pad_values = pad_values
        self.widths = {}
        for name in self.table.column_names:
            if name in pad_values:
                longest = pc.max(pc.list_value_length(self.table.column(name))).as_py() or 1
                self.widths[name] = length if length is not None else -(-longest // 8) * 8

    def __len__(self) -> int:
        return self.table.num_rows

    def take(self, indices: np.ndarray, epoch: int = 0) -> dict[str, np.ndarray]:
        import pyarrow as pa

        taken = self.table.take(pa.array(np.asarray(indices, np.int64)))
        return {name: self._column(name, taken.column(name).combine_chunks()) for name in taken.column_names}

    def _column(self, name: str, column) -> np.ndarray:
        """One column of taken rows as numpy: [n, width] int32 for a sequence column, else [n, ...]."""
        import pyarrow.compute as pc

        if name not in self.widths:
            try:
                return column.to_numpy(zero_copy_only=False)
            except (NotImplementedError, TypeError):  # nested values: as the lists they are
                return np.asarray(column.to_pylist())
        width = self.widths[name]
        lengths = np.minimum(pc.list_value_length(column).to_numpy(zero_copy_only=False), width)
        starts = column.offsets.to_numpy()[:-1] - column.offsets[0].as_py()
        values = column.flatten().to_numpy(zero_copy_only=False)
        padded = np.full((len(column), width), self.pad_values[name], np.int32)
        for row, (start, count) in enumerate(zip(starts, lengths)):
            padded[row, :count] = values[start : start + count]
        return padded


class StreamedBlocks:
    """Training blocks made from a stream of texts as training goes: tokenized, concatenated and cut
    into `block_size` blocks, batch by batch, so nothing of the corpus is prepared up front.

    `texts`: a `datasets.IterableDataset` with a `column` of texts; `tokenize(texts) -> token id
    lists`. Its length is the blocks `num_steps` steps of `global_batch_size` take (a stream has no
    length of its own); the stream starts again (its next epoch) when it ends first. The order is a
    function of the seed (a buffer of `shuffle_buffer_size` texts shuffles the stream), each
    process reads its own share of the stream (`datasets.distributed.split_dataset_by_node`), and
    a resumed run reads and skips the batches before its step.
    """

    def __init__(self, texts, column: str, tokenize: Callable[[list], list], block_size: int, num_blocks: int,
                 shuffle_buffer_size: int = 10_000, texts_per_call: int = 1000):
        self.texts, self.column, self.tokenize = texts, column, tokenize
        self.block_size, self.num_blocks = block_size, num_blocks
        self.shuffle_buffer_size, self.texts_per_call = shuffle_buffer_size, texts_per_call

    def __len__(self) -> int:
        return self.num_blocks

    def _share(self, seed: Optional[int], epoch: int, plan: "BatchPlan"):
        from datasets.distributed import split_dataset_by_node

        texts = self.texts if seed is None else self.texts.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
        texts = split_dataset_by_node(texts, rank=plan.process_index, world_size=plan.process_count)
        texts.set_epoch(epoch)
        return texts

    def _blocks(self, seed: Optional[int], epoch: int, plan: "BatchPlan") -> Iterator[np.ndarray]:
        """Full blocks of this process's share, pass after pass ([block_size] int32 each)."""
        pending = np.zeros(0, np.int32)
        for passes in itertools.count(epoch):
            found = False
            examples = iter(self._share(seed, passes, plan))
            while batch := [example[self.column] for example in itertools.islice(examples, self.texts_per_call)]:
                found = True
                ids = self.tokenize([str(text) for text in batch])
                pending = np.concatenate([pending, np.fromiter(itertools.chain.from_iterable(ids), np.int32)])
                usable = len(pending) // self.block_size * self.block_size
                yield from pending[:usable].reshape(-1, self.block_size)
                pending = pending[usable:]
            if not found:
                raise InputError("the training stream holds no text")

    def batches(self, plan: "BatchPlan", seed: Optional[int], epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """This process's part of each batch ([micro_batches, local batch, block_size] columns), from batch
        `start` on (the batches before it are read and skipped)."""
        local = plan.micro_batch_size // plan.process_count
        shape = (plan.micro_batches, local, self.block_size)
        blocks = self._blocks(seed, epoch, plan)
        for number in itertools.count():
            rows = list(itertools.islice(blocks, plan.micro_batches * local))
            if number >= start:
                input_ids = np.stack(rows).reshape(shape)
                yield {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
                       EXAMPLE_MASK: np.ones(shape[:2], np.float32)}


def as_rows(dataset, columns: Sequence[str]) -> ArrayRows:
    """Tokenized `datasets.Dataset` columns (fixed length per row) as numpy rows."""
    table = dataset.with_format("numpy", columns=list(columns))[:]
    return ArrayRows({name: np.asarray(table[name]) for name in columns})


@dataclass(frozen=True)
class BatchPlan:
    """How a split is cut into fixed-shape batches, and which rows this process loads.

    A global batch holds `micro_batches * micro_batch_size` rows, laid out as
    [micro_batches, micro_batch_size]; the micro batches are the gradient
    accumulation steps. Each process loads the columns
    [process_index * local:(process_index + 1) * local] of every micro batch,
    so its rows land on its own devices.
    """

    num_examples: int
    micro_batch_size: int
    micro_batches: int = 1
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.micro_batch_size % self.process_count:
            raise ValueError("the micro batch must divide evenly among processes")

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches

    @property
    def num_batches(self) -> int:
        return max(1, math.ceil(self.num_examples / self.global_batch_size))

    def order(self, seed: Optional[int], epoch: int = 0) -> np.ndarray:
        """Row indices of one epoch, [num_batches, micro_batches, micro_batch_size]; -1 pads.

        Shuffled from (seed, epoch) when seed is given, else in dataset order.
        """
        if seed is None:
            indices = np.arange(self.num_examples)
        else:
            indices = np.random.default_rng([seed, epoch]).permutation(self.num_examples)
        padded = np.full(self.num_batches * self.global_batch_size, -1, dtype=np.int64)
        padded[: self.num_examples] = indices
        return padded.reshape(self.num_batches, self.micro_batches, self.micro_batch_size)

    def local(self, batch_indices: np.ndarray) -> np.ndarray:
        """This process's share of one batch: [micro_batches, micro_batch_size // process_count]."""
        width = self.micro_batch_size // self.process_count
        return batch_indices[:, self.process_index * width : (self.process_index + 1) * width]


def gather(rows: Rows, indices: np.ndarray, epoch: int = 0) -> dict[str, np.ndarray]:
    """Load the rows at `indices` (any shape, -1 = padding) with an `example_mask` column.

    Padding rows repeat a real row, so every column keeps a valid value, and get
    mask 0. Returns columns of shape indices.shape + row shape.
    """
    flat = indices.reshape(-1)
    mask = flat >= 0
    fetched = rows.take(np.where(mask, flat, flat[mask][0] if mask.any() else 0), epoch)
    batch = {name: np.asarray(column).reshape(indices.shape + np.shape(column)[1:]) for name, column in fetched.items()}
    batch[EXAMPLE_MASK] = mask.reshape(indices.shape).astype(np.float32)
    return batch


def iterate_batches(rows: Rows, plan: BatchPlan, seed: Optional[int], epoch: int = 0, start: int = 0) -> Iterator[dict]:
    """This process's part of each batch of one epoch, from batch `start` on."""
    if isinstance(rows, StreamedBlocks):
        return prefetched(itertools.islice(rows.batches(plan, seed, epoch, start), plan.num_batches - start))
    order = plan.order(seed, epoch)
    return prefetched(gather(rows, plan.local(batch_indices), epoch) for batch_indices in order[start:])


def prefetched(items: Iterator, depth: int = PREFETCH) -> Iterator:
    """`items` in order, made up to `depth` ahead by a background thread.

    An exception raised making an item is raised here, at that item. Closing the returned
    generator (a loop left early) stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as error:  # handed to the consumer, raised there
            offer((done, error))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()

    def consume():
        try:
            while True:
                item, error = ready.get()
                if error is not None:
                    raise error
                if item is done:
                    return
                yield item
        finally:
            stop.set()

    return consume()


def warn_if_smaller_than_batch(num_examples: int, global_batch_size: int, split: str) -> None:
    if num_examples < global_batch_size:
        logger.warning(
            "the %s split has %d examples, fewer than one global batch of %d: "
            "it runs as one padded batch whose extra rows are masked out",
            split, num_examples, global_batch_size,
        )
