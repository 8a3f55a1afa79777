"""Evaluation outside the model: how long the scripts' post-processing and metrics take.

    python benchmarks/postprocessing.py [--windows 1000] [--repeats 3] [--command [--max_steps N]]

Prints, best of --repeats after a warm-up call, the seconds of:

- QA post-processing of --windows windows (run_qa.py's `answer_all`: n-best
  span search, null scores and n-best probabilities) over random logits of
  384-token windows, 12 windows per question, as SQuAD v2 with the
  script's defaults (n_best_size 20, max_answer_length 30);
- QA scoring of those answers (squad.squad_v2);
- NER label alignment (run_flax_ner.py's `align_labels`) and entity scores
  (entities.entity_scores) of 2,000 sentences of 30 words;
- ROUGE (rouge.rouge_with_sentence_split, stemming as the summarization
  script does) and WER (wer.word_error_rate) of 500 predictions of 60 words
  against their references.

With --command it also runs the original Transformers Flax test's QA command
line (tests/test_upstream_command_lines.py, `--eval_steps 2`) as a process on
`long_context_squad`: 62 questions whose long contexts make 753 windows of
the tiny BERT's tokens (256 at most, stride 128), used as training and
evaluation file as the original test did with its SQuAD sample: 1131 steps and
565 evaluations (--max_steps stops it sooner). Its wall and CPU seconds and
the mean seconds of one evaluation are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QA_SCRIPT = ROOT / "examples" / "question-answering" / "run_qa.py"
NER_SCRIPT = ROOT / "examples" / "token-classification" / "run_flax_ner.py"
SQUAD_TRAIN = ROOT / "fixtures" / "data" / "squad" / "train.json"
TINY_BERT = ROOT / "fixtures" / "models" / "tiny-bert"
QUESTIONS = 62
PARAGRAPHS_PER_CONTEXT = 24  # about 1,600 tiny-BERT tokens: 12 windows of 256 (its limit) with stride 128
WINDOW_LENGTH = 384
WINDOWS_PER_QUESTION = 12


def load_script(path: Path):
    """An example script as a module (they are files, not a package)."""
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        sys.modules[path.stem] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[path.stem])
    return sys.modules[path.stem]


def long_context_squad() -> dict:
    """SQuAD v2 flat records: 62 questions (one in three unanswerable) on contexts of 24
    consecutive paragraphs of the fixture's training file, each question from one of them."""
    articles = json.loads(SQUAD_TRAIN.read_text())["data"]
    paragraphs = [paragraph for article in articles for paragraph in article["paragraphs"]]
    records = []
    for index in range(QUESTIONS):
        first, asked = (index * 7) % len(paragraphs), (index * 5) % PARAGRAPHS_PER_CONTEXT
        chosen = [paragraphs[(first + k) % len(paragraphs)] for k in range(PARAGRAPHS_PER_CONTEXT)]
        offset = sum(len(paragraph["context"]) + 1 for paragraph in chosen[:asked])  # joined by spaces
        if index % 3 == 2:  # a question about a paragraph the context lacks
            qa, answers = paragraphs[(first + PARAGRAPHS_PER_CONTEXT + index) % len(paragraphs)]["qas"][0], []
        else:
            qa = chosen[asked]["qas"][index % len(chosen[asked]["qas"])]
            answers = qa["answers"]
        records.append({
            "id": f"long-{index}",
            "title": f"long {index}",
            "context": " ".join(paragraph["context"] for paragraph in chosen),
            "question": qa["question"],
            "answers": {
                "text": [answer["text"] for answer in answers],
                "answer_start": [answer["answer_start"] + offset for answer in answers],
            },
        })
    return {"data": records}


def best_seconds(function, repeats: int) -> float:
    """The fastest of `repeats` calls of `function()`, in seconds, after one untimed call (imports;
    caches such as ROUGE's stems, warm from the second evaluation of a run on)."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def qa_workload(windows: int, rng: np.random.Generator):
    """(ids, contexts, features, outputs) of `windows` windows, 12 per question, shaped as run_qa.py's:
    384 tokens, the context from token 20 to the last but one, random logits."""
    questions = -(-windows // WINDOWS_PER_QUESTION)
    context = " ".join(f"word{index}" for index in range(4000))
    tokens = np.arange(20, WINDOW_LENGTH - 1)
    first_characters = (np.arange(windows) % WINDOWS_PER_QUESTION)[:, None] * 1500 + 6 * (tokens - 20)
    offset_start = np.full((windows, WINDOW_LENGTH), -1, np.int64)
    offset_end = np.full((windows, WINDOW_LENGTH), -1, np.int64)
    offset_start[:, tokens], offset_end[:, tokens] = first_characters, first_characters + 5
    features = {
        "example_index": np.arange(windows) // WINDOWS_PER_QUESTION,
        "cls_index": np.zeros(windows, np.int64),
        "offset_start": offset_start,
        "offset_end": offset_end,
    }
    outputs = {
        "start_logits": rng.normal(size=(windows, WINDOW_LENGTH)).astype(np.float32),
        "end_logits": rng.normal(size=(windows, WINDOW_LENGTH)).astype(np.float32),
    }
    return [f"q{index}" for index in range(questions)], [context] * questions, features, outputs


def bench_qa(windows: int, repeats: int, rng: np.random.Generator) -> dict[str, float]:
    from flax_finetune import squad

    script = load_script(QA_SCRIPT)
    ids, contexts, features, outputs = qa_workload(windows, rng)
    args = script.QuestionAnsweringDataArguments(version_2_with_negative=True)
    answers = {}

    def postprocess():
        answers.update(script.answer_all(outputs, features, ids, contexts, args)[0])

    seconds = best_seconds(postprocess, repeats)
    references = {question_id: [] for question_id in ids}
    return {
        f"qa post-processing, {windows} windows": seconds,
        f"qa squad_v2 scores, {len(ids)} questions": best_seconds(lambda: squad.squad_v2(answers, references), repeats),
    }


def bench_ner(repeats: int, rng: np.random.Generator) -> dict[str, float]:
    from flax_finetune import entities

    script = load_script(NER_SCRIPT)
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    sentences, words, tokens = 2000, 30, 48
    word_ids = [[None] + sorted(rng.integers(0, words, tokens - 2).tolist()) + [None] for _ in range(sentences)]
    word_labels = rng.integers(0, len(names), (sentences, words)).tolist()
    inside_of = {1: 2, 3: 4, 5: 6}
    references = [[names[label] for label in labels] for labels in word_labels]
    predictions = [[names[label] for label in rng.integers(0, len(names), words)] for _ in range(sentences)]
    return {
        f"ner align_labels, {sentences} sentences": best_seconds(
            lambda: [script.align_labels(ids, labels, True, inside_of) for ids, labels in zip(word_ids, word_labels)],
            repeats,
        ),
        f"ner entity_scores, {sentences} sentences": best_seconds(
            lambda: entities.entity_scores(references, predictions), repeats
        ),
    }


def bench_text(repeats: int, rng: np.random.Generator) -> dict[str, float]:
    from flax_finetune import rouge, wer

    vocabulary = [f"token{index}" for index in range(300)]
    pairs, words = 500, 60

    def text():
        chosen = rng.choice(vocabulary, words)
        return " ".join(f"{word}." if index % 15 == 14 else word for index, word in enumerate(chosen))

    predictions, references = [text() for _ in range(pairs)], [text() for _ in range(pairs)]
    return {
        f"rouge_with_sentence_split, {pairs} pairs": best_seconds(
            lambda: rouge.rouge_with_sentence_split(predictions, references), repeats
        ),
        f"word_error_rate, {pairs} pairs": best_seconds(lambda: wer.word_error_rate(predictions, references), repeats),
    }


def qa_command(folder: Path, max_steps: int) -> dict[str, float]:
    """The original test's QA command line on `long_context_squad`, as a process: its wall and
    CPU seconds, and the mean eval_runtime (model part and metrics) of its evaluations."""
    data = folder / "long_context_squad.json"
    data.write_text(json.dumps(long_context_squad()))
    command = [
        sys.executable, str(QA_SCRIPT), "--model_name_or_path", str(TINY_BERT), "--version_2_with_negative",
        "--train_file", str(data), "--validation_file", str(data), "--output_dir", str(folder / "out"),
        "--overwrite_output_dir", "--num_train_epochs=3", "--warmup_steps=2", "--do_train", "--do_eval",
        "--logging_steps", "2", "--eval_steps", "2", "--learning_rate=2e-4", "--per_device_train_batch_size=2",
        "--per_device_eval_batch_size=1", "--disable_tqdm", *(["--max_steps", str(max_steps)] if max_steps else []),
    ]
    started, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    records = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record["eval_runtime"] for record in records if "eval_runtime" in record]
    steps = f"{max_steps} steps" if max_steps else "all 1131 steps"
    return {
        f"qa command line ({steps}, --eval_steps 2), wall": wall,
        f"qa command line ({steps}), CPU (user + system)": (
            after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        ),
        f"qa command line, mean of {len(evaluations)} evaluations (753 windows)": float(np.mean(evaluations)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1000, help="QA windows post-processed")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest is printed")
    parser.add_argument("--command", action="store_true", help="also run the original test's QA command line")
    parser.add_argument("--max_steps", type=int, default=0, help="with --command: stop it after this many steps")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    rng = np.random.default_rng(0)
    timings = {
        **bench_qa(args.windows, args.repeats, rng),
        **bench_ner(args.repeats, rng),
        **bench_text(args.repeats, rng),
    }
    if args.command:
        with tempfile.TemporaryDirectory() as folder:
            timings.update(qa_command(Path(folder), args.max_steps))
    width = max(map(len, timings))
    for name, seconds in timings.items():
        print(f"{name:<{width}}  {seconds:8.3f} s")


if __name__ == "__main__":
    main()
