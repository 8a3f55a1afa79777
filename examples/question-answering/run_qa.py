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
from typing import Optional

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


def best_answers(example: dict, windows: list[tuple[np.ndarray, ...]], args: QuestionAnsweringDataArguments):
    """(answer text, n-best list, null-score difference) of one question.

    windows: (start_logits, end_logits, offset_start, offset_end, cls_index)
    per window; offsets are -1 outside the context.
    """
    candidates, null_score = [], None
    for start_logits, end_logits, offset_start, offset_end, cls_index in windows:
        window_null = float(start_logits[cls_index] + end_logits[cls_index])
        null_score = window_null if null_score is None else min(null_score, window_null)
        starts = np.argsort(start_logits)[::-1][: args.n_best_size]
        ends = np.argsort(end_logits)[::-1][: args.n_best_size]
        for start in starts:
            for end in ends:
                if offset_start[start] < 0 or offset_end[end] < 0 or end < start:
                    continue
                if end - start + 1 > args.max_answer_length:
                    continue
                candidates.append({
                    "text": example["context"][offset_start[start] : offset_end[end]],
                    "start_logit": float(start_logits[start]),
                    "end_logit": float(end_logits[end]),
                })
    candidates.sort(key=lambda candidate: candidate["start_logit"] + candidate["end_logit"], reverse=True)
    best_span = candidates[0] if candidates else None
    if args.version_2_with_negative:
        candidates.append({"text": "", "start_logit": null_score / 2, "end_logit": null_score / 2})
        candidates.sort(key=lambda candidate: candidate["start_logit"] + candidate["end_logit"], reverse=True)
    nbest = candidates[: args.n_best_size] or [{"text": "", "start_logit": 0.0, "end_logit": 0.0}]
    scores = np.array([c["start_logit"] + c["end_logit"] for c in nbest])
    probabilities = np.exp(scores - scores.max())
    probabilities /= probabilities.sum()
    nbest = [{**candidate, "probability": float(p)} for candidate, p in zip(nbest, probabilities)]
    if not args.version_2_with_negative:
        return (best_span["text"] if best_span else ""), nbest, None
    if best_span is None:
        return "", nbest, None
    difference = null_score - (best_span["start_logit"] + best_span["end_logit"])
    return ("" if difference > args.null_score_diff_threshold else best_span["text"]), nbest, difference


def main(argv=None):
    model_args, data_args, training_args = parse_args(
        (ModelArguments, QuestionAnsweringDataArguments, TrainingArguments), argv, __doc__, __file__
    )
    run = scripts.start(training_args, model_args)
    splits = run.load_splits(data_args, extensions=(".json", ".jsonl"), json_field="data")

    from flax_finetune import squad

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
        rows[split] = scripts.pad_rows(mapped, pad_values, length)

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

    examples = {"eval": splits.get("validation"), "test": splits.get("test")}

    def answer_all(outputs, split):
        """{id: answer}, {id: n-best}, {id: null-score difference} for every question of a split."""
        features = rows["validation" if split == "eval" else "test"].columns
        by_example: dict[int, list] = {}
        for window, example in enumerate(features["example_index"]):
            by_example.setdefault(int(example), []).append((
                outputs["start_logits"][window], outputs["end_logits"][window],
                features["offset_start"][window], features["offset_end"][window], int(features["cls_index"][window]),
            ))
        answers, nbests, null_odds = {}, {}, {}
        for index, example in enumerate(examples[split]):
            text, nbest, difference = best_answers(example, by_example.get(index, []), data_args)
            answers[example["id"]], nbests[example["id"]], null_odds[example["id"]] = text, nbest, difference
        return answers, nbests, null_odds

    def compute_metrics(outputs, split):
        answers, _, _ = answer_all(outputs, split)
        references = {example["id"]: list(example["answers"]["text"]) for example in examples[split]}
        if data_args.version_2_with_negative:
            return squad.squad_v2(answers, references)
        scores = squad.squad_v1(answers, references)
        return {"exact": scores["exact_match"], "f1": scores["f1"]}

    def write_predictions(outputs, split):
        answers, nbests, null_odds = answer_all(outputs, split)
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
