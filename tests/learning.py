"""What an end-to-end test proves: that fine-tuning learned, not only that a number came out.

Each end-to-end test states its bars (a metric of the script's results file, a threshold, and
which side passes) and shows, in the test itself:

- a trivial predictor computed from the data (majority class, unigram model, constant summary...)
  fails every bar it can be scored on;
- the starting checkpoint, evaluated by the same command without training, fails every bar;
- the trained run passes every bar, and beats the starting checkpoint by the stated margins on the
  loss and the task metric.

A green end-to-end test therefore means the script trained the model in this environment: a run
that skipped training, or a model that had already seen the evaluation data, fails it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter


@dataclasses.dataclass(frozen=True)
class Bar:
    """`metric` (a key of the results file) must reach `threshold`: at least, or at most when
    `lower_is_better`."""

    metric: str
    threshold: float
    lower_is_better: bool = False

    def passes(self, value: float) -> bool:
        return value <= self.threshold if self.lower_is_better else value >= self.threshold

    def __str__(self) -> str:
        return f"{self.metric} {'<=' if self.lower_is_better else '>='} {self.threshold}"


def failed_bars(results: dict, bars: list[Bar]) -> list[str]:
    """The bars that `results` does not pass (a missing metric fails)."""
    return [f"{bar} (got {results.get(bar.metric)})" for bar in bars
            if bar.metric not in results or not bar.passes(results[bar.metric])]


def assert_fine_tuning_learned(
    bars: list[Bar], margins: dict[str, float], *, baseline: dict, starting: dict, trained: dict
) -> None:
    """The three facts every end-to-end test shows (see the module docstring).

    `baseline` holds the trivial predictor's scores under the results file's keys (only those it
    can be scored on, at least one bar's metric); `starting` and `trained` are results files.
    `margins[metric]` is how much better than `starting` the trained run must be on that metric
    (lower for losses, WER and perplexity, higher for the rest, as the metric's bar says).
    """
    record_check(bars, baseline, starting, trained)
    scored = [bar for bar in bars if bar.metric in baseline]
    assert scored, f"the trivial baseline scores none of the bars: {baseline}"
    for bar in scored:
        assert not bar.passes(baseline[bar.metric]), f"a trivial predictor passes {bar}: {baseline}"
    for bar in bars:
        assert not bar.passes(starting[bar.metric]), f"the starting checkpoint already passes {bar}: {starting}"
    failures = failed_bars(trained, bars)
    assert not failures, f"the trained run fails {failures}: {trained}"
    lower_is_better = {bar.metric: bar.lower_is_better for bar in bars}
    for metric, margin in margins.items():
        lower = lower_is_better.get(metric, metric.endswith(("loss", "perplexity", "wer")))
        gain = starting[metric] - trained[metric] if lower else trained[metric] - starting[metric]
        assert gain >= margin, (
            f"{metric}: trained {trained[metric]:.4g} vs starting {starting[metric]:.4g}, "
            f"improvement {gain:.4g} < the required {margin}"
        )


def record_check(bars: list[Bar], baseline: dict, starting: dict, trained: dict) -> None:
    """Append each bar's starting / baseline / trained figures to $FLAX_FINETUNE_LEARNING_REPORT
    (JSON Lines), when set: the table of the closing note and the README comes from there."""
    path = os.environ.get("FLAX_FINETUNE_LEARNING_REPORT")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    with open(path, "a", encoding="utf-8") as stream:
        for bar in bars:
            stream.write(json.dumps({"test": test, "bar": str(bar), "starting": starting.get(bar.metric),
                                     "baseline": baseline.get(bar.metric), "trained": trained.get(bar.metric)}) + "\n")


def evaluation_only(command: list[str]) -> list[str]:
    """The same command line without --do_train: the starting checkpoint evaluated as it is."""
    return [argument for argument in command if argument != "--do_train"]


def text_baselines(tokenizer_folder, train_path, eval_path) -> tuple[float, float]:
    """(accuracy of always the most frequent token, perplexity of a unigram model): trivial token
    predictors made from the training text, scored on the evaluation text (each line tokenized
    without special tokens, which no model is asked to predict)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    train, evaluation = ([tokenizer(line, add_special_tokens=False)["input_ids"] for line in path.read_text().splitlines()]
                         for path in (train_path, eval_path))
    return most_frequent_token_accuracy(train, evaluation), unigram_perplexity(train, evaluation, len(tokenizer))


def unigram_perplexity(train_ids: list[list[int]], eval_ids: list[list[int]], vocab_size: int) -> float:
    """Perplexity on `eval_ids` of a unigram model of `train_ids` (add-one smoothing over the
    vocabulary): the language model that ignores all context."""
    counts = Counter(token for ids in train_ids for token in ids)
    total = sum(counts.values()) + vocab_size
    tokens = [token for ids in eval_ids for token in ids]
    return math.exp(-sum(math.log((counts[token] + 1) / total) for token in tokens) / len(tokens))


def most_frequent_token_accuracy(train_ids: list[list[int]], eval_ids: list[list[int]]) -> float:
    """Accuracy on `eval_ids` of always predicting the training text's most frequent token."""
    most_frequent = Counter(token for ids in train_ids for token in ids).most_common(1)[0][0]
    tokens = [token for ids in eval_ids for token in ids]
    return sum(token == most_frequent for token in tokens) / len(tokens)
