"""ELECTRA: parity with Transformers' Flax and PyTorch classes, discriminator checkpoints, the fixture, training.

Tiny configs: embeddings 16 wide under a hidden size of 32 (so `embeddings_project` counts), two
token types, a LayerNorm epsilon far from the default; one more masked-LM case with equal widths
(no projection) and an output projection of its own (`tie_word_embeddings` off). Batches are
passed padded first, unpadded last: the AdamW steps run on the last one, because PyTorch's
embedding never updates the padding token's row (`padding_idx`) while the question-answering
loss reaches padded positions.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

import family_checks
from conftest import MODELS
from flax_finetune import models
from flax_finetune.modeling import checkpoint_io
from test_family_roberta_variants import HEADS, PARITY_SEED, SMOKE_RATES, TASKS
from test_text_classification import assert_paraphrase_learned

transformers = pytest.importorskip("transformers")

FIXTURE = MODELS / "tiny-electra"
UNTIED_SAME_WIDTH = dict(embedding_size=32, tie_word_embeddings=False)
CASES = [
    *[pytest.param(task, {}, id=task) for task in TASKS],
    pytest.param("masked-lm", UNTIED_SAME_WIDTH, id="masked-lm-untied-same-width"),
]


def tiny_config(task: str, **overrides):
    """A tiny ELECTRA config; num_labels 2 for question answering, 3 otherwise."""
    settings = dict(
        vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        num_labels=2 if task == "question-answering" else 3,
    )
    return transformers.ElectraConfig(**{**settings, **overrides})


def batches(config):
    """The harness's two batches with two segments, padded first: training runs on the last (unpadded)."""
    return family_checks.encoder_batches(config, token_types=True)[::-1]


@pytest.mark.parity
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("task, overrides", CASES)
def test_matches_transformers_flax(task, overrides):
    flax_class = "FlaxElectra" + HEADS[task]
    if not hasattr(transformers, flax_class):
        pytest.skip(f"parity needs Transformers' {flax_class} (4.x) as the reference")
    config = tiny_config(task, **overrides)
    figures = family_checks.check_flax_parity("electra", task, config, flax_class, batches(config), seed=PARITY_SEED)
    assert figures["max_logit_error"] <= 1e-5


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("task, overrides", CASES)
def test_matches_transformers_pytorch(task, overrides, tmp_path):
    config = tiny_config(task, **overrides)
    figures = family_checks.check_pytorch_parity("electra", task, config, "Electra" + HEADS[task], batches(config),
                                                 tmp_path, seed=PARITY_SEED)
    assert figures["max_logit_error"] <= 1e-5


def test_embeddings_are_projected_only_where_narrower():
    narrow = models.from_config(tiny_config("token-classification"), "token-classification").params["electra"]
    same = models.from_config(tiny_config("token-classification", embedding_size=32), "token-classification")
    assert narrow["embeddings"]["word_embeddings"]["embedding"].shape == (99, 16)
    assert narrow["embeddings_project"]["kernel"].shape == (16, 32)
    assert "embeddings_project" not in same.params["electra"] and "pooler" not in narrow


def discriminator_checkpoint(folder, config) -> dict:
    """Write a discriminator-style checkpoint (ElectraForPreTraining's keys: the encoder and
    `discriminator_predictions`) to `folder`; returns its encoder tree."""
    encoder = family_checks.random_params(
        models.from_config(config, "token-classification").params["electra"], seed=3)
    tensors = {f"electra.{key}": value for key, value in checkpoint_io.flax_to_pytorch(encoder).items()}
    rng = np.random.default_rng(4)
    tensors["discriminator_predictions.dense.weight"] = rng.standard_normal((32, 32)).astype(np.float32)
    tensors["discriminator_predictions.dense.bias"] = np.zeros(32, np.float32)
    tensors["discriminator_predictions.dense_prediction.weight"] = rng.standard_normal((1, 32)).astype(np.float32)
    tensors["discriminator_predictions.dense_prediction.bias"] = np.zeros(1, np.float32)
    config.architectures = ["ElectraForPreTraining"]
    config.save_pretrained(folder)
    save_file(tensors, str(folder / checkpoint_io.SAFETENSORS_NAME), metadata={"format": "pt"})
    return encoder


@pytest.mark.parametrize("task, new_head", [
    ("sequence-classification", "classifier/dense/bias"),
    ("masked-lm", "generator_lm_head/bias, generator_predictions/LayerNorm/bias"),
])
def test_discriminator_checkpoint_fills_the_encoder(task, new_head, tmp_path, package_log):
    """A discriminator checkpoint gives every head its whole encoder; its replaced-token head goes
    unused and the task head (the generator's, for masked LM) is initialised."""
    encoder = discriminator_checkpoint(tmp_path, tiny_config(task))
    model = models.load(str(tmp_path), task)
    loaded, expected = (family_checks.shape_tree(tree) for tree in (model.params["electra"], encoder))
    assert loaded == expected
    np.testing.assert_array_equal(model.params["electra"]["embeddings_project"]["kernel"],
                                  encoder["embeddings_project"]["kernel"])
    assert f"newly initialised (not in the checkpoint): {new_head}" in package_log.text
    unused = next(line for line in package_log.text.splitlines() if "not used by" in line).split(" model: ")[1]
    assert sorted(unused.split(", ")) == [f"discriminator_predictions.{name}" for name in (
        "dense.bias", "dense.weight", "dense_prediction.bias", "dense_prediction.weight")]


def test_fixture_has_electra_tokens_and_configuration():
    tokenizer = models.load_tokenizer(str(FIXTURE))
    config = models.load_config(str(FIXTURE))
    # Transformers 5 loads ELECTRA's WordPiece tokenizer as BERT's, the same class under its name
    assert type(tokenizer).__name__ in ("ElectraTokenizerFast", "BertTokenizer")
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    encoded = tokenizer("Hello there", "again")
    assert encoded["input_ids"][0] == tokenizer.cls_token_id and encoded["input_ids"].count(tokenizer.sep_token_id) == 2
    assert encoded["token_type_ids"][-1] == 1
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == "hello there again"
    assert (config.embedding_size, config.hidden_size) == (16, 32)
    assert config.pad_token_id == tokenizer.pad_token_id and config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("task", TASKS)
def test_script_training_smoke(task, tmp_path):
    family_checks.smoke_losses(task, FIXTURE, tmp_path, learning_rate=SMOKE_RATES.get(task))


@pytest.mark.family_learning
def test_fine_tuning_learns_sentence_pairs(tmp_path):
    assert_paraphrase_learned(tmp_path, "tiny-electra", learning_rate="1e-3")
