"""What the scripts write loads in Transformers' PyTorch classes and gives the same logits.

Runs where torch is installed (the `torch` nox session: Transformers 5 with CPU torch); elsewhere
it is skipped, except under FLAX_FINETUNE_REQUIRE_TORCH=1 (set by that session), where a missing
torch is an error, so the session can never pass by skipping.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import DATA, MODELS, load_script
from flax_finetune import models

if os.environ.get("FLAX_FINETUNE_REQUIRE_TORCH"):
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.pytorch  # the torch session runs this marker

# fixture model, task, the Transformers PyTorch auto class of that task
CASES = [
    ("tiny-bert", "sequence-classification", "AutoModelForSequenceClassification"),
    ("tiny-bert", "token-classification", "AutoModelForTokenClassification"),
    ("tiny-bert", "question-answering", "AutoModelForQuestionAnswering"),
    ("tiny-bert", "masked-lm", "AutoModelForMaskedLM"),
    ("tiny-roberta", "sequence-classification", "AutoModelForSequenceClassification"),
    ("tiny-roberta", "masked-lm", "AutoModelForMaskedLM"),
    ("tiny-distilbert", "sequence-classification", "AutoModelForSequenceClassification"),
    ("tiny-distilbert", "question-answering", "AutoModelForQuestionAnswering"),
    ("tiny-distilbert", "masked-lm", "AutoModelForMaskedLM"),
    ("tiny-gpt2", "causal-lm", "AutoModelForCausalLM"),
    ("tiny-t5", "seq2seq-lm", "AutoModelForSeq2SeqLM"),
    ("tiny-whisper", "speech-seq2seq", "AutoModelForSpeechSeq2Seq"),
    # the families added by issue 14: each fixture in its main head
    *[(fixture, "masked-lm", "AutoModelForMaskedLM") for fixture in (
        "tiny-xlm-roberta", "tiny-roberta-prelayernorm", "tiny-electra", "tiny-albert", "tiny-roformer",
        "tiny-deberta-v3", "tiny-modernbert")],
    *[(fixture, "seq2seq-lm", "AutoModelForSeq2SeqLM") for fixture in (
        "tiny-bart", "tiny-mbart", "tiny-pegasus", "tiny-marian", "tiny-mt5", "tiny-umt5")],
]


def batch_for(task: str, config) -> dict[str, np.ndarray]:
    """Two right-padded examples (the second shorter) for `task`'s model."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, config.vocab_size, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    if task == "speech-seq2seq":
        features = rng.normal(size=(2, config.num_mel_bins, 2 * config.max_source_positions)).astype(np.float32)
        return {"input_features": features, "decoder_input_ids": ids[:, :6]}
    if task == "seq2seq-lm":
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids, "attention_mask": mask}


def logits_of(output) -> list[np.ndarray]:
    """The logits of a Flax or PyTorch output as numpy arrays (start and end logits for question answering)."""
    names = ("start_logits", "end_logits") if getattr(output, "start_logits", None) is not None else ("logits",)
    arrays = [getattr(output, name) for name in names]
    return [np.asarray(array.detach().numpy() if hasattr(array, "detach") else array) for array in arrays]


def assert_same_logits(model, params, folder, task, auto_class):
    pytorch = getattr(transformers, auto_class).from_pretrained(folder).eval()
    batch = batch_for(task, model.config)
    ours = logits_of(model(params, **batch))
    with torch.no_grad():
        theirs = logits_of(pytorch(**{name: torch.from_numpy(value) for name, value in batch.items()}))
    for mine, reference in zip(ours, theirs):
        if mine.shape[-2] == 12:  # padded positions hold no meaning for token-level outputs
            mine, reference = mine[:, :8], reference[:, :8]
        np.testing.assert_allclose(mine, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture,task,auto_class", CASES, ids=[f"{f}-{t}" for f, t, _ in CASES])
def test_saved_model_gives_our_logits_in_pytorch(fixture, task, auto_class, tmp_path):
    config = models.load_config(str(MODELS / fixture))
    if task in ("sequence-classification", "token-classification"):
        config.num_labels = 3
    model = models.load(str(MODELS / fixture), task, config=config, seed=1)
    model.save(model.params, str(tmp_path))
    assert_same_logits(model, model.params, tmp_path, task, auto_class)


def test_fine_tuned_glue_output_folder_loads_in_pytorch(tmp_path):
    load_script("text-classification/run_flax_glue.py").main([
        "--model_name_or_path", str(MODELS / "tiny-bert"), "--output_dir", str(tmp_path),
        "--train_file", str(DATA / "paraphrase" / "train.csv"),
        "--validation_file", str(DATA / "paraphrase" / "validation.csv"),
        "--max_train_samples", "32", "--num_train_epochs", "1", "--do_train", "--disable_tqdm",
    ])
    reloaded = models.load(str(tmp_path), "sequence-classification")
    assert_same_logits(reloaded, reloaded.params, tmp_path, "sequence-classification", "AutoModelForSequenceClassification")
