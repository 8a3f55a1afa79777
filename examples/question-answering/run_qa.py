#!/usr/bin/env python
"""Fine-tune a Flax model for extractive question answering (SQuAD v1.1 and v2.0).

Data: JSON in the official nested SQuAD layout (data[].paragraphs[].qas[]) or
as flat records (id, title, context, question, answers{text, answer_start})
under a `data` field, or JSON Lines of flat records. Long contexts are split
into windows of --max_seq_length tokens overlapping by --doc_stride; answers
are the best-scoring spans of at most --max_answer_length tokens among the
--n_best_size best starts and ends, mapped back to the context's characters.
With --version_2_with_negative a question may have no answer: the empty
answer wins when its score beats the best span's by more than
--null_score_diff_threshold. Exact match and F1 follow the official SQuAD
v1.1 / v2.0 scripts. Writes eval_results.json (eval_exact, eval_f1, and for
v2 eval_HasAns_* and eval_NoAns_*), and {eval,test}_predictions.json,
{eval,test}_nbest_predictions.json and (v2) {eval,test}_null_odds.json.

    python examples/question-answering/run_qa.py \\
        --model_name_or_path fixtures/models/tiny-bert --output_dir out --version_2_with_negative \\
        --train_file fixtures/data/squad/train.json --validation_file fixtures/data/squad/validation.json \\
        --do_train --do_eval
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from flax_finetune import scripts
from flax_finetune.arguments import DataArguments, ModelArguments, TrainingArguments, arg, parse_args
from flax_finetune.errors import InputError, run_cli


@dataclasses.dataclass
class QuestionAnsweringDataArguments(DataArguments):
    """Data: SQuAD-style files (or a hub dataset), windows and answer search."""

    max_seq_length: int = arg(384, "Tokens per window (question and context).")
    doc_stride: int = arg(128, "Tokens shared by consecutive windows of a long context.")
    pad_to_max_length: bool = arg(
        False, "Pad every window to --max_seq_length (default: to the longest of each split, rounded up to 8)."
    )
    version_2_with_negative: bool = arg(False, "SQuAD v2: some questions have no answer.")
    null_score_diff_threshold: float = arg(0.0, "v2: answer nothing when the empty answer's score beats the best span's by more.")
    n_best_size: int = arg(20, "Best start and end positions searched, and answers listed per question.")
    max_answer_length: int = arg(30, "Longest answer, in tokens.")

    def __post_init__(self):
        super().__post_init__()
        if self.doc_stride >= self.max_seq_length:
            raise InputError("--doc_stride must be smaller than --max_seq_length")


def flatten_squad(dataset):
    """Official nested SQuAD rows (title, paragraphs) -> one row per question; flat rows pass through."""
    if "paragraphs" not in dataset.column_names:
        return dataset

    def explode(batch):
        rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
        titles = batch["title"] if "title" in batch else [""] * len(batch["paragraphs"])
        for title, paragraphs in zip(titles, batch["paragraphs"]):
            for paragraph in paragraphs:
                for qa in paragraph["qas"]:
                    answers = qa.get("answers") or []
                    rows["id"].append(str(qa["id"]))
                    rows["title"].append(title)
                    rows["context"].append(paragraph["context"])
                    rows["question"].append(qa["question"])
                    rows["answers"].append({"text": [a["text"] for a in answers],
                                            "answer_start": [int(a["answer_start"]) for a in answers]})
        return rows

    return dataset.map(explode, batched=True, remove_columns=dataset.column_names)


def check_answers(dataset, flag: str, unanswerable_allowed: bool) -> None:
    """Stop when an answer's text is not found at its answer_start in the context, or when
    a question has no answer without --version_2_with_negative."""
    for row in dataset:
        if not row["answers"]["text"] and not unanswerable_allowed:
            raise InputError(
                f"--{flag}: question {row['id']} has no answer; SQuAD v2 data needs --version_2_with_negative"
            )
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            if row["context"][start : start + len(text)] != text:
                found = row["context"][start : start + len(text)]
                raise InputError(
                    f"--{flag}: question {row['id']}: answer {text!r} is not at answer_start {start} "
                    f"of its context (found {found!r})"
                )


def answer_positions(offsets, sequence_ids, context_id: int, cls_index: int, answers: dict) -> tuple[int, int]:
    """Token (start, end) of the first answer inside this window's context, else (cls, cls)."""
    if not answers["text"]:
        return cls_index, cls_index
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context_tokens = [index for index, sequence in enumerate(sequence_ids) if sequence == context_id]
    first, last = context_tokens[0], context_tokens[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return cls_index, cls_index
    start = next(index for index in range(first, last + 1) if offsets[index][1] > start_char)
    end = next(index for index in range(last, first - 1, -1) if offsets[index][0] < end_char)
    return start, end


def span_candidates(outputs: dict, features: dict, args: QuestionAnsweringDataArguments) -> dict[str, np.ndarray]:
    """Every allowed span of every window, best first within each question.

    outputs: start_logits, end_logits [windows, length]; features: example_index,
    cls_index [windows], offset_start, offset_end [windows, length] (-1 outside the
    context). Each window's n_best_size best starts and ends are paired at once
    ([windows, n_best_size**2]); a span must lie in the context, end at or after its
    start and be at most max_answer_length tokens. Returns per span ([spans]):
    example, rank (0 = the question's best), first_character, last_character
    (exclusive), start_logit and end_logit (float64), sorted by question, then by
    score; equal scores keep the order of windows, starts, then ends.
    """
    start_logits, end_logits = np.asarray(outputs["start_logits"]), np.asarray(outputs["end_logits"])
    offset_start, offset_end = np.asarray(features["offset_start"]), np.asarray(features["offset_end"])
    example_index = np.asarray(features["example_index"], np.int64)
    starts = np.argsort(start_logits, axis=-1)[:, ::-1][:, : args.n_best_size]  # [windows, n]
    ends = np.argsort(end_logits, axis=-1)[:, ::-1][:, : args.n_best_size]
    pair_starts = np.repeat(starts, ends.shape[1], axis=1)  # [windows, n * n], start-major as nested loops
    pair_ends = np.tile(ends, (1, starts.shape[1]))
    first_character = np.take_along_axis(offset_start, pair_starts, axis=1)
    last_character = np.take_along_axis(offset_end, pair_ends, axis=1)
    allowed = (
        (first_character >= 0) & (last_character >= 0) & (pair_ends >= pair_starts)
        & (pair_ends - pair_starts + 1 <= args.max_answer_length)
    )
    windows, pairs = np.nonzero(allowed)  # row-major: windows, then pairs in loop order
    span_starts, span_ends = pair_starts[windows, pairs], pair_ends[windows, pairs]
    start_scores = start_logits[windows, span_starts].astype(np.float64)
    end_scores = end_logits[windows, span_ends].astype(np.float64)
    order = np.lexsort((-(start_scores + end_scores), example_index[windows]))  # stable: ties keep loop order
    examples = example_index[windows[order]]
    question_starts = np.searchsorted(examples, examples)  # first position of each span's question
    return {
        "example": examples,
        "rank": np.arange(len(order)) - question_starts,
        "first_character": first_character[windows, pairs][order],
        "last_character": last_character[windows, pairs][order],
        "start_logit": start_scores[order],
        "end_logit": end_scores[order],
    }


def null_scores(outputs: dict, features: dict, questions: int) -> np.ndarray:
    """[questions] the lowest start + end logit at [CLS] over each question's windows (inf: no window)."""
    windows = np.arange(len(features["cls_index"]))
    cls_index = np.asarray(features["cls_index"], np.int64)
    start_logits, end_logits = np.asarray(outputs["start_logits"]), np.asarray(outputs["end_logits"])
    per_window = start_logits[windows, cls_index] + end_logits[windows, cls_index]  # in the logits' dtype
    lowest = np.full(questions, np.inf)
    np.minimum.at(lowest, np.asarray(features["example_index"], np.int64), per_window.astype(np.float64))
    return lowest


def answer_all(outputs: dict, features: dict, ids: list, contexts: list, args: QuestionAnsweringDataArguments):
    """{id: answer}, {id: n-best list}, {id: null-score difference or None} of every question.

    The n-best list holds the n_best_size best spans (text, start_logit,
    end_logit, probability); with --version_2_with_negative the empty answer
    joins it with half the null score as each logit, after the spans of an
    equal score. See span_candidates for the arrays' shapes.
    """
    spans = span_candidates(outputs, features, args)
    kept = spans["rank"] < args.n_best_size
    by_question: list[list[list]] = [[] for _ in ids]  # (first, last character, start, end logit) best first
    columns = ("example", "first_character", "last_character", "start_logit", "end_logit")
    for example, *span in zip(*(spans[name][kept].tolist() for name in columns)):
        by_question[example].append(span)
    nulls = null_scores(outputs, features, len(ids)).tolist() if args.version_2_with_negative else None
    answers, nbests, null_odds = {}, {}, {}
    for question, (question_id, context) in enumerate(zip(ids, contexts)):
        candidates = [{"text": context[first:last], "start_logit": start_logit, "end_logit": end_logit}
                      for first, last, start_logit, end_logit in by_question[question]]
        best_span = candidates[0] if candidates else None
        if args.version_2_with_negative:
            half = nulls[question] / 2
            place = sum(candidate["start_logit"] + candidate["end_logit"] >= half + half for candidate in candidates)
            candidates.insert(place, {"text": "", "start_logit": half, "end_logit": half})
        nbest = candidates[: args.n_best_size] or [{"text": "", "start_logit": 0.0, "end_logit": 0.0}]
        scores = np.array([candidate["start_logit"] + candidate["end_logit"] for candidate in nbest])
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        nbests[question_id] = [{**candidate, "probability": float(p)} for candidate, p in zip(nbest, probabilities)]
        answers[question_id], null_odds[question_id] = (best_span["text"] if best_span else ""), None
        if args.version_2_with_negative and best_span is not None:
            null_odds[question_id] = nulls[question] - (best_span["start_logit"] + best_span["end_logit"])
            if null_odds[question_id] > args.null_score_diff_threshold:
                answers[question_id] = ""
    return answers, nbests, null_odds


def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, QuestionAnsweringDataArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=(".json", ".jsonl"), json_field="data")

    from flax_finetune import data, squad

    splits = {split: flatten_squad(dataset) for split, dataset in splits.items()}
    for split, dataset in splits.items():
        scripts.require_columns(dataset, ["id", "context", "question"] + (["answers"] if split != "test" else []),
                                data_args, split)
        if "answers" in dataset.column_names:
            flag, path = data_args.files()[split]
            check_answers(dataset, f"{flag} {path or data_args.dataset_name}", data_args.version_2_with_negative)
    tokenizer = run.tokenizer(model_args)
    if not tokenizer.is_fast:
        raise InputError("question answering needs a fast tokenizer (it maps tokens back to characters)")
    config = run.config(model_args, tokenizer)
    max_length = scripts.max_sequence_length(data_args.max_seq_length, tokenizer, config)
    question_first = tokenizer.padding_side == "right"
    context_id = 1 if question_first else 0
    input_names = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask", "token_type_ids")]

    def windows(batch, indices):
        """Tokenized windows of a batch of questions, with answer positions and offsets back into the context."""
        questions = [question.lstrip() for question in batch["question"]]
        pair = (questions, batch["context"]) if question_first else (batch["context"], questions)
        encoded = tokenizer(
            *pair, truncation="only_second" if question_first else "only_first", max_length=max_length,
            stride=data_args.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
        )
        features = {name: encoded[name] for name in input_names}
        features.update(start_positions=[], end_positions=[], example_index=[], cls_index=[], offset_start=[], offset_end=[])
        for window, example in enumerate(encoded["overflow_to_sample_mapping"]):
            sequence_ids, offsets = encoded.sequence_ids(window), encoded["offset_mapping"][window]
            ids = encoded["input_ids"][window]
            cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            answers = batch["answers"][example] if "answers" in batch else {"text": []}
            start, end = answer_positions(offsets, sequence_ids, context_id, cls_index, answers)
            in_context = [sequence == context_id for sequence in sequence_ids]
            features["start_positions"].append(start)
            features["end_positions"].append(end)
            features["example_index"].append(indices[example])
            features["cls_index"].append(cls_index)
            features["offset_start"].append([o[0] if keep else -1 for o, keep in zip(offsets, in_context)])
            features["offset_end"].append([o[1] if keep else -1 for o, keep in zip(offsets, in_context)])
        return features

    pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": tokenizer.pad_token_type_id,
                  "offset_start": -1, "offset_end": -1}
    length = max_length if data_args.pad_to_max_length else None
    rows = {}
    for split, dataset in splits.items():
        mapped = dataset.map(windows, batched=True, with_indices=True, remove_columns=dataset.column_names,
                             **data_args.map_options)
        rows[split] = data.PaddedRows(mapped, pad_values, length)

    import jax.numpy as jnp

    from flax_finetune import losses

    model = run.model(model_args, "question-answering", config)

    def span_logits(params, batch, **kwargs):
        outputs = model(params, **{name: batch[name] for name in input_names}, **kwargs)
        return outputs.start_logits.astype(jnp.float32), outputs.end_logits.astype(jnp.float32)

    def loss_fn(params, batch, dropout_rng):
        start_logits, end_logits = span_logits(params, batch, dropout_rng=dropout_rng, train=True)
        start_loss, count = losses.cross_entropy(start_logits, batch["start_positions"], batch["example_mask"])
        end_loss, _ = losses.cross_entropy(end_logits, batch["end_positions"], batch["example_mask"])
        return (start_loss + end_loss) / 2, count

    def predict_fn(params, batch):
        start_logits, end_logits = span_logits(params, batch, train=False)
        return {"start_logits": start_logits, "end_logits": end_logits}

    # per split, read once rather than at every evaluation: (ids, contexts) and {id: gold answers}
    examples = {split: splits[name] for split, name in (("eval", "validation"), ("test", "test")) if name in splits}
    questions = {split: (list(dataset["id"]), list(dataset["context"])) for split, dataset in examples.items()}
    references = {
        split: {question_id: list(answers["text"]) for question_id, answers in zip(dataset["id"], dataset["answers"])}
        for split, dataset in examples.items() if "answers" in dataset.column_names
    }

    def answers_of(outputs, split):
        """answer_all over the windows of a split ("eval" or "test")."""
        windows = rows["validation" if split == "eval" else "test"]
        features = windows.take(np.arange(len(windows)))
        return answer_all(outputs, features, *questions[split], data_args)

    def compute_metrics(outputs, split):
        answers, _, _ = answers_of(outputs, split)
        if data_args.version_2_with_negative:
            return squad.squad_v2(answers, references[split])
        scores = squad.squad_v1(answers, references[split])
        return {"exact": scores["exact_match"], "f1": scores["f1"]}

    def write_predictions(outputs, split):
        answers, nbests, null_odds = answers_of(outputs, split)
        run.output.write_text(f"{split}_predictions.json", json.dumps(answers, indent=2) + "\n")
        run.output.write_text(f"{split}_nbest_predictions.json", json.dumps(nbests, indent=2) + "\n")
        if data_args.version_2_with_negative:
            run.output.write_text(f"{split}_null_odds.json", json.dumps(null_odds, indent=2) + "\n")

    test_has_labels = "test" in splits and "answers" in splits["test"].column_names
    run.train_evaluate_predict(
        model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics, write_predictions, test_has_labels
    )


if __name__ == "__main__":
    run_cli(main)
