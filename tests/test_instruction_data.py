"""Instruction data for run_clm_flax (flax_finetune.instructions): loss masks, packing without
attention across examples, chat templates, and an end-to-end run that learns a lookup."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from conftest import DATA, FIXTURES, MODELS, read_log, read_results
from learning import Bar, assert_fine_tuning_learned, evaluation_only, unigram_perplexity
from test_language_modeling import clm

pytest.importorskip("transformers")

INSTRUCTIONS = DATA / "instructions"
CHAT_TEMPLATE = ("{% for message in messages %}<|endoftext|>{{ message['role'] }}:{{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}")
CONVERSATION = [
    {"role": "system", "content": " answer briefly"},
    {"role": "user", "content": " who fixed the old bicycle?"},
    {"role": "assistant", "content": " the farmer"},
    {"role": "user", "content": " and the blue door?"},
    {"role": "assistant", "content": " my uncle"},
]


def tokenizer(folder="tiny-gpt2"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODELS / folder)


def chat_tokenizer(tmp_path):
    """tiny-gpt2's tokenizer, copied, with CHAT_TEMPLATE in its tokenizer_config.json."""
    folder = tmp_path / "chat-tokenizer"
    shutil.copytree(MODELS / "tiny-gpt2", folder, ignore=shutil.ignore_patterns("model.safetensors"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return folder


def test_packing_puts_short_examples_in_one_block_and_restarts_positions(package_log):
    from flax_finetune import instructions

    def example(first, length, targets):
        return np.arange(first, first + length, dtype=np.int32), np.asarray(targets, np.int32)

    short, other, long = example(10, 3, [0, 1, 1]), example(20, 4, [1, 1, 1, 1]), example(30, 10, [1] * 10)
    packed = instructions.pack([short, other, long], block_size=8, pad_id=99)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22, 23, 99], list(range(30, 38))]
    assert packed["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))]
    # an example's first token has nothing before it in its example: never a target
    assert packed["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 1, 1, 0], [0] + [1] * 7]
    assert packed["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 8]
    assert "1 of 3 examples are longer than --block_size 8: cut to it" in package_log.text
    unpacked = instructions.pack([short, other], block_size=8, pad_id=99, packing=False)
    assert unpacked["segment_ids"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("folder", ["tiny-gpt2", "tiny-llama", "tiny-mistral", "tiny-gpt-neo", "tiny-opt"])
def test_packed_examples_get_the_logits_they_get_alone(folder, parity_settings):
    """Two examples in one block with segment_ids and restarting position_ids: each gets the
    logits it gets alone (a right-padded row without segment_ids, today's path) within 1e-5;
    without segment_ids the second example would see the first."""
    import jax

    from flax_finetune import models

    model = models.load(str(MODELS / folder), "causal-lm")
    run = jax.jit(lambda **inputs: model(model.params, **inputs).logits[0])
    rng = np.random.default_rng(0)
    first, second = (rng.integers(3, model.config.vocab_size, size=length, dtype=np.int32) for length in (6, 7))
    block = np.zeros((1, 16), np.int32)
    block[0, :13] = np.concatenate([first, second])
    segment_ids = np.asarray([[1] * 6 + [2] * 7 + [0] * 3], np.int32)
    position_ids = np.asarray([list(range(6)) + list(range(7)) + [0] * 3], np.int32)
    attention_mask = (segment_ids > 0).astype(np.int32)
    packed = run(input_ids=block, attention_mask=attention_mask, segment_ids=segment_ids, position_ids=position_ids)
    for ids, where in ((first, slice(0, 6)), (second, slice(6, 13))):
        row, mask = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)
        row[0, : len(ids)], mask[0, : len(ids)] = ids, 1
        alone = run(input_ids=row, attention_mask=mask)[: len(ids)]
        np.testing.assert_allclose(packed[where], alone, atol=1e-5, rtol=0)
    across = run(input_ids=block, attention_mask=attention_mask, segment_ids=np.sign(segment_ids),
                 position_ids=position_ids)
    assert np.abs(np.asarray(across[6:13]) - np.asarray(packed[6:13])).max() > 1e-3


def test_loss_mask_covers_exactly_the_completion_and_the_end_token():
    from flax_finetune import instructions

    for folder in ("tiny-gpt2", "tiny-llama"):  # byte-level BPE without BOS; sentencepiece with one
        tok = tokenizer(folder)
        (ids, mask), = instructions.prompt_completion_examples(["Who fixed the old bicycle?"], [" the farmer."], tok)
        prompt = tok("Who fixed the old bicycle?")["input_ids"]
        assert ids[: len(prompt)].tolist() == prompt and ids[-1] == tok.eos_token_id
        assert mask.tolist() == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        assert tok.decode(ids[mask == 1], skip_special_tokens=True).strip() == "the farmer."
    (_, everything), = instructions.examples({"prompt": ["a"], "completion": [" b"]}, instructions.PROMPT_COMPLETION,
                                             tok, completion_only_loss=False)
    assert everything.all()


def test_chat_template_marks_exactly_the_assistant_turns(tmp_path):
    pytest.importorskip("jinja2")  # Transformers renders chat templates with it
    from transformers import AutoTokenizer

    from flax_finetune import instructions

    tok = AutoTokenizer.from_pretrained(chat_tokenizer(tmp_path))
    (ids, mask), = instructions.chat_examples([CONVERSATION], tok)
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    runs = np.flatnonzero(np.diff(mask)) + 1  # where the mask changes
    marked = [tok.decode(tokens) for tokens, flags in zip(np.split(ids, runs), np.split(mask, runs)) if flags[0]]
    assert marked == [" the farmer\n", " my uncle\n"]  # each assistant turn to its end-of-turn newline


def test_chat_messages_train_through_the_script(tmp_path):
    """`messages` rows (the fixture's prompts as user turns, completions as assistant turns) with a
    --tokenizer_name that has a chat template: the script trains on them and the loss falls."""
    pytest.importorskip("jinja2")
    rows = [json.loads(line) for line in (INSTRUCTIONS / "train.jsonl").read_text().splitlines()[:96]]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": " " + row["prompt"]},
                                                      {"role": "assistant", "content": row["completion"]}]}) + "\n"
                             for row in rows))
    output = tmp_path / "chat"
    clm().main([
        "--model_name_or_path", str(MODELS / "tiny-gpt2"), "--tokenizer_name", str(chat_tokenizer(tmp_path)),
        "--train_file", str(chats), "--validation_file", str(chats), "--do_train", "--do_eval",
        "--block_size", "64", "--per_device_train_batch_size", "8", "--max_steps", "30", "--learning_rate", "5e-3",
        "--logging_steps", "5", "--output_dir", str(output), "--disable_tqdm",
    ])
    losses = [record["train_loss"] for record in read_log(output) if "train_loss" in record]
    assert losses[-1] < 0.6 * losses[0], losses
    assert read_results(output)["eval_perplexity"] < 20


def test_messages_without_a_chat_template_or_half_a_prompt_are_input_errors():
    from flax_finetune import instructions
    from flax_finetune.errors import InputError

    with pytest.raises(InputError, match="no chat template: give `prompt` and `completion` columns"):
        instructions.chat_examples([CONVERSATION], tokenizer())
    with pytest.raises(InputError, match="no 'completion' column"):
        instructions.row_format(["prompt", "id"])
    assert instructions.row_format(["text", "id"]) is None


def test_instruction_fixture_is_deterministic_and_validation_prompts_are_new(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    sys.modules.pop("make_instructions", None)
    import make_instructions

    monkeypatch.setattr(make_instructions, "DATA", tmp_path)
    make_instructions.main()
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / "instructions" / name).read_bytes() == (INSTRUCTIONS / name).read_bytes()
    train, validation = ({json.loads(line)["prompt"] for line in (INSTRUCTIONS / name).read_text().splitlines()}
                         for name in ("train.jsonl", "validation.jsonl"))
    assert len(validation) == 48 and not validation & train


BARS = [Bar("eval_perplexity", 1.2, lower_is_better=True)]


def instruction_command(output_dir, *extra):
    return [
        "--model_name_or_path", str(MODELS / "tiny-gpt2"),
        "--train_file", str(INSTRUCTIONS / "train.jsonl"),
        "--validation_file", str(INSTRUCTIONS / "validation.jsonl"),
        "--do_train", "--do_eval",
        "--block_size", "64",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--num_train_epochs", "4",
        "--learning_rate", "5e-3",
        "--warmup_steps", "10",
        "--logging_steps", "10",
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
        "--disable_tqdm",
        *extra,
    ]


def completion_unigram_perplexity() -> float:
    """Perplexity of a unigram model of the training completions (with their end token) on the
    validation completions: the scored tokens, predicted without looking at the prompt."""
    tok = tokenizer()

    def completions(name):
        rows = [json.loads(line) for line in (INSTRUCTIONS / name).read_text().splitlines()]
        return [tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for row in rows]

    return unigram_perplexity(completions("train.jsonl"), completions("validation.jsonl"), len(tok))


def test_fine_tuning_learns_the_lookup_on_completion_tokens(tmp_path):
    """The validation prompts combine verbs and times with things as training never does: a low
    completion-only perplexity means the model learned which thing decides the owner."""
    clm().main(evaluation_only(instruction_command(tmp_path / "start")))
    clm().main(instruction_command(tmp_path / "trained"))
    assert_fine_tuning_learned(BARS, {"eval_loss": 2.0}, baseline={"eval_perplexity": completion_unigram_perplexity()},
                               starting=read_results(tmp_path / "start"), trained=read_results(tmp_path / "trained"))
    losses = [record["train_loss"] for record in read_log(tmp_path / "trained") if "train_loss" in record]
    assert losses[-1] < 0.2 * losses[0], losses


def test_packed_rows_read_from_the_tokenized_table_equal_the_packing_in_memory():
    import datasets

    from flax_finetune import instructions

    examples = [(np.arange(1, 4, dtype=np.int32), np.array([0, 1, 1], np.int32)),
                (np.zeros(0, np.int32), np.zeros(0, np.int32)),  # empty: dropped
                (np.arange(10, 20, dtype=np.int32), np.ones(10, np.int32)),  # longer than a block: cut
                (np.arange(30, 32, dtype=np.int32), np.array([1, 1], np.int32)),
                (np.arange(40, 43, dtype=np.int32), np.array([0, 0, 1], np.int32))]
    table = datasets.Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in examples],
                                        "loss_mask": [mask.tolist() for _, mask in examples]})
    for packing in (True, False):
        expected = instructions.pack(examples, block_size=8, pad_id=99, packing=packing)
        rows = instructions.PackedRows(table, block_size=8, pad_id=99, packing=packing)
        assert len(rows) == len(expected["input_ids"])
        order = np.arange(len(rows))[::-1]
        taken = rows.take(order)
        for name, column in expected.items():
            np.testing.assert_array_equal(taken[name], column[order], err_msg=f"{name}, packing {packing}")
