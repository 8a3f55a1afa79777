"""Loading files and cutting them into fixed-shape batches."""

from __future__ import annotations

import itertools
import threading
import time
import types

import numpy as np
import pytest

from flax_finetune import data
from flax_finetune.arguments import ModelArguments
from flax_finetune.errors import InputError


def test_an_epoch_visits_every_example_once_and_pads_the_last_batch():
    plan = data.BatchPlan(num_examples=10, micro_batch_size=4)
    order = plan.order(seed=3, epoch=0)
    assert order.shape == (3, 1, 4)
    flat = order.reshape(-1)
    assert sorted(flat[flat >= 0].tolist()) == list(range(10))
    assert flat[-2:].tolist() == [-1, -1]


def test_shuffling_is_a_function_of_seed_and_epoch():
    plan = data.BatchPlan(num_examples=50, micro_batch_size=5)
    assert np.array_equal(plan.order(7, 0), plan.order(7, 0))
    assert not np.array_equal(plan.order(7, 0), plan.order(7, 1))
    assert not np.array_equal(plan.order(7, 0), plan.order(8, 0))
    assert plan.order(None).reshape(-1).tolist() == list(range(50))


def test_processes_split_every_micro_batch_between_them():
    single = data.BatchPlan(num_examples=24, micro_batch_size=8, micro_batches=2)
    batch = single.order(seed=1)[0]
    shares = [
        data.BatchPlan(24, 8, micro_batches=2, process_index=index, process_count=2).local(batch) for index in (0, 1)
    ]
    assert shares[0].shape == (2, 4)
    assert np.array_equal(np.concatenate(shares, axis=1), batch)


def test_gather_masks_padding_and_keeps_shapes():
    rows = data.ArrayRows({"ids": np.arange(12).reshape(6, 2), "label": np.arange(6)})
    batch = data.gather(rows, np.array([[4, -1, 0]]))
    assert batch["ids"].shape == (1, 3, 2)
    assert batch["example_mask"].tolist() == [[1.0, 0.0, 1.0]]
    assert batch["label"][0, 0] == 4 and batch["label"][0, 2] == 0


def test_dataset_smaller_than_a_batch_is_one_padded_batch(package_log):
    plan = data.BatchPlan(num_examples=3, micro_batch_size=8)
    assert plan.num_batches == 1
    data.warn_if_smaller_than_batch(3, 8, "train")
    assert "fewer than one global batch" in package_log.text


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def test_loads_csv_json_lines_and_text(tmp_path):
    splits = data.load_splits(
        {
            "train": ("train_file", write(tmp_path / "t.csv", "a,label\nhello,x\nworld,y\n")),
            "validation": ("validation_file", write(tmp_path / "v.jsonl", '{"a": "hi", "label": "x"}\n')),
            "test": ("test_file", write(tmp_path / "p.txt", "one line\nanother\n")),
        },
        extensions=(".csv", ".jsonl", ".txt"),
    )
    assert splits["train"]["a"] == ["hello", "world"]
    assert splits["validation"]["label"] == ["x"]
    assert splits["test"]["text"] == ["one line\n", "another\n"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "no such file"),
        ("data.parquet", "x", "unsupported extension '.parquet'; use one of .csv, .json"),
        ("empty.csv", "", "the file is empty"),
        ("header_only.csv", "a,label\n", "holds no examples"),
        ("latin1.csv", "a,label\ncaf\xe9,x\n".encode("latin-1"), "not valid UTF-8"),
    ],
)
def test_bad_files_stop_with_one_clear_message(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    with pytest.raises(InputError, match=message) as error:
        data.load_splits({"train": ("train_file", str(path))}, extensions=(".csv", ".json"))
    assert str(error.value).startswith(f"--train_file {path}")
    assert "\n" not in str(error.value)


def test_hold_out_takes_the_last_percent():
    import datasets

    dataset = datasets.Dataset.from_dict({"text": [str(i) for i in range(20)]})
    train, validation = data.hold_out(dataset, 10)
    assert train["text"] == [str(i) for i in range(18)]
    assert validation["text"] == ["18", "19"]
    with pytest.raises(InputError):
        data.hold_out(dataset, 0)


def test_trust_remote_code_reaches_the_dataset_loader_only_when_given(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(kwargs) or {"train": [1]})
    for trusted in (True, False):
        data.load_splits({}, extensions=(".csv",), dataset_name="someone/dataset", trust_remote_code=trusted)
    assert calls[0]["trust_remote_code"] is True and "trust_remote_code" not in calls[1]
    assert ModelArguments(model_name_or_path="m", trust_remote_code=True).hub_options["trust_remote_code"] is True


def test_training_batches_are_made_ahead_in_order_and_errors_arrive_at_their_batch():
    made = []

    def items():
        for number in range(5):
            if number == 3:
                raise InputError("row 3 is broken")
            made.append(number)
            yield number

    batches = data.prefetched(items(), depth=2)
    assert next(batches) == 0
    deadline = time.monotonic() + 5
    while len(made) < 3 and time.monotonic() < deadline:  # the thread runs ahead of the consumer
        time.sleep(0.01)
    assert made == [0, 1, 2]
    assert [next(batches), next(batches)] == [1, 2]
    with pytest.raises(InputError, match="row 3"):
        next(batches)


def test_leaving_a_prefetched_loop_early_stops_its_thread():
    batches = data.prefetched(iter(range(1000)), depth=2)
    assert next(batches) == 0
    batches.close()
    deadline = time.monotonic() + 5
    while any(thread.name == "prefetch" for thread in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(thread.name == "prefetch" for thread in threading.enumerate())


def test_computed_rows_compute_when_taken_and_keep_only_what_the_budget_holds():
    calls = []

    def features(row):
        calls.append(row)
        return np.full((2, 3), row, np.float32)  # 24 bytes

    rows = data.ComputedRows({"labels": np.arange(10) * 10}, "features", features, workers=2, cache_bytes=3 * 24)
    assert calls == []  # nothing is computed up front
    batch = data.gather(rows, np.array([[4, 1, -1]]))
    assert batch["features"].shape == (1, 3, 2, 3)
    assert batch["features"][0, :, 0, 0].tolist() == [4, 1, 4] and batch["labels"].tolist() == [[40, 10, 40]]
    assert sorted(calls) == [1, 4]  # the padding row repeats row 4 without computing it again
    data.gather(rows, np.array([1, 4, 7, 8]))
    assert sorted(calls) == [1, 4, 7, 8]  # 1 and 4 were kept; the budget then held one more row
    data.gather(rows, np.array([7, 8]))
    assert len(rows.cache) == 3 and len(calls) == 5  # one of 7 and 8 (whichever thread came second) again


TOKENIZED_BATCHES: list[int] = []  # a module list, not tokenizer state: datasets hashes the tokenizer for its cache key


class WordLengthTokenizer:
    """Tokenizer stand-in: a word's id is its length plus `offset`; records each batch it tokenizes."""

    def __init__(self, offset: int):
        self.offset = offset

    def __call__(self, texts, add_special_tokens=True, return_attention_mask=False):
        TOKENIZED_BATCHES.append(len(texts))
        return {"input_ids": [[self.offset + len(word) for word in text.split()] for text in texts]}


def test_tokenized_text_is_cached_keyed_by_the_tokenizer_and_read_per_block(tmp_path):
    import datasets

    from flax_finetune import scripts

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {number} has some words\n" for number in range(50)))
    split = datasets.load_dataset("text", data_files=str(corpus), split="train")

    def tokenize(tokenizer, overwrite_cache=False):
        options = types.SimpleNamespace(preprocessing_num_workers=None, map_options={
            "num_proc": None, "load_from_cache_file": not overwrite_cache})
        TOKENIZED_BATCHES.clear()
        stream = scripts.token_stream(split, tokenizer, options, add_special_tokens=True)
        return stream.read(0, len(stream)), bool(TOKENIZED_BATCHES)

    first, tokenized = tokenize(WordLengthTokenizer(0))
    assert tokenized and len(first) == 50 * 5 and first[:5].tolist() == [4, 1, 3, 4, 5]
    again, tokenized = tokenize(WordLengthTokenizer(0))
    assert not tokenized and np.array_equal(again, first)  # the rerun read the cache
    other, tokenized = tokenize(WordLengthTokenizer(100))
    assert tokenized and np.array_equal(other, first + 100)  # another tokenizer is never served stale ids
    _, tokenized = tokenize(WordLengthTokenizer(0), overwrite_cache=True)
    assert tokenized

    stream = data.TokenStream(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6, 7, 8]]}))
    blocks = data.TokenBlocks(stream, width=4, pad_id=0, prefix=[9], suffix=[], special_tokens_mask=True)
    taken = blocks.take(np.array([2, 0]))
    assert len(blocks) == 3 and taken["input_ids"].tolist() == [[9, 7, 8, 0], [9, 1, 2, 3]]
    assert taken["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert taken["special_tokens_mask"].tolist() == [[1, 0, 0, 1], [1, 0, 0, 0]]
    assert len(data.TokenBlocks(stream, width=3, pad_id=0, drop_last=True)) == 2


def test_a_stream_is_shared_between_processes_ordered_by_the_seed_and_read_again_when_it_ends():
    import datasets

    texts = datasets.Dataset.from_dict({"text": [str(number) for number in range(20)]}).to_iterable_dataset(num_shards=4)
    two_tokens = lambda batch: [[int(text), int(text)] for text in batch]  # noqa: E731
    blocks = data.StreamedBlocks(texts, "text", two_tokens, block_size=4, num_blocks=16, shuffle_buffer_size=8)

    def read(seed, process, batches=8):
        plan = data.BatchPlan(num_examples=16, micro_batch_size=2, process_index=process, process_count=2)
        return [batch["input_ids"][0, 0, ::2].tolist() for batch in itertools.islice(blocks.batches(plan, seed), batches)]

    first, second = read(None, 0), read(None, 1)
    one_pass = sorted(number for pair in first[:5] + second[:5] for number in pair)
    assert one_pass == list(range(20))  # the two shares are disjoint and make up the stream
    assert first[5:] == first[:3]  # 10 texts of its own are 5 blocks: then the next pass
    assert read(1, 0) == read(1, 0) != read(2, 0)
    plan = data.BatchPlan(num_examples=16, micro_batch_size=2)
    whole = list(data.iterate_batches(blocks, plan, seed=1))
    resumed = list(data.iterate_batches(blocks, plan, seed=1, start=6))
    assert len(whole) == 8 and len(resumed) == 2 and whole[0]["input_ids"].shape == (1, 2, 4)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(whole[6:], resumed))


def test_padded_rows_are_read_from_the_table_per_batch_as_the_in_memory_padding_made_them():
    import datasets

    split = datasets.Dataset.from_dict({
        "input_ids": [[5, 6, 7], [8], list(range(1, 12))], "labels": [1, 0, 1], "score": [0.5, 1.5, 2.5],
    }).select([2, 0, 1])  # a selection, as --max_train_samples makes
    rows = data.PaddedRows(split, {"input_ids": 0}, length=None)
    assert len(rows) == 3 and rows.widths == {"input_ids": 16}  # the longest row, 11, rounded up to 8
    taken = rows.take(np.array([1, 0]))
    assert taken["input_ids"].tolist() == [[5, 6, 7] + [0] * 13, list(range(1, 12)) + [0] * 5]
    assert taken["labels"].tolist() == [1, 1] and taken["score"].tolist() == [0.5, 2.5]
    assert data.PaddedRows(split, {"input_ids": -1}, length=2).take(np.array([0, 2]))["input_ids"].tolist() == [
        [1, 2], [8, -1]]
