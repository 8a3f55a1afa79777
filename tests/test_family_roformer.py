"""RoFormer: parity with Transformers' Flax and PyTorch classes, the tiny fixture, training smokes, learning.

Transformers 4.x's Flax RoFormer has no `embeddings_project` and so only allows embeddings as wide
as the hidden size: the Flax parity configs have both 32 wide, with and without rotary values. The
PyTorch parity configs have embeddings 24 wide (projected up to 32, and the masked-LM transform
projecting back down to 24) and rotary values. Batches are passed padded first, unpadded last:
the AdamW steps run on the unpadded one, because PyTorch's embedding never updates the padding
token's row (`padding_idx`) and the question-answering loss reaches padded positions.
"""

from __future__ import annotations

import numpy as np
import pytest

import family_checks
from conftest import MODELS
from flax_finetune import models
from flax_finetune.modeling import checkpoint_io
from flax_finetune.modeling.roformer import rotary_table
from test_family_albert import HEADS, TASKS, batches  # the same heads, batches and batch order
from test_text_classification import assert_paraphrase_learned

transformers = pytest.importorskip("transformers")

FIXTURE = MODELS / "tiny-roformer"
NARROW_EMBEDDINGS = dict(embedding_size=24, rotary_value=True)


def tiny_config(task: str, **overrides):
    """A tiny RoFormer config (head size 8: four rotary pairs); num_labels 2 for question answering, 3 otherwise."""
    settings = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-3,  # far from the default: a wrong epsilon shows in the logits
        num_labels=2 if task == "question-answering" else 3,
    )
    return transformers.RoFormerConfig(**{**settings, **overrides})


@pytest.mark.parity
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("task, overrides", [
    *[(task, {}) for task in TASKS],
    ("masked-lm", {"rotary_value": True}),
])
def test_matches_transformers_flax(task, overrides):
    flax_class = "FlaxRoFormer" + HEADS[task]
    if not hasattr(transformers, flax_class):
        pytest.skip(f"parity needs Transformers' {flax_class} (4.x) as the reference")
    config = tiny_config(task, **overrides)
    figures = family_checks.check_flax_parity("roformer", task, config, flax_class, batches(config))
    assert figures["max_logit_error"] <= 1e-5


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("task", TASKS)
def test_matches_transformers_pytorch(task, tmp_path):
    config = tiny_config(task, **NARROW_EMBEDDINGS)
    figures = family_checks.check_pytorch_parity("roformer", task, config, "RoFormer" + HEADS[task],
                                                 batches(config), tmp_path)
    assert figures["max_logit_error"] <= 1e-5


@pytest.mark.pytorch
def test_position_table_is_the_pytorch_one_and_reads_back(tmp_path):
    """The sinusoidal table written on saving is the one PyTorch's RoFormer makes; a PyTorch
    checkpoint, which holds it, loads here with no unexpected key."""
    pytest.importorskip("torch")
    config = tiny_config("masked-lm", **NARROW_EMBEDDINGS)
    reference = transformers.RoFormerForMaskedLM(config)
    expected = reference.roformer.encoder.embed_positions.create_weight().numpy()
    np.testing.assert_allclose(rotary_table(config), expected, atol=1e-7)
    reference.save_pretrained(tmp_path)
    shapes = models.from_config(config, "masked-lm").params
    _, missing, unexpected = checkpoint_io.read_params(tmp_path, shapes, "roformer", "roformer")
    assert not missing and not unexpected


def test_rotary_positions_are_relative():
    """Rotary attention sees only relative positions: shifting every position by the same amount leaves
    the logits unchanged, while reversing the tokens (negating the offsets) changes them."""
    config = tiny_config("token-classification")
    module = models.module_class(config, "token-classification")(config=config)
    params = family_checks.random_params(models.from_config(config, "token-classification").params, seed=0)
    input_ids = family_checks.encoder_batches(config)[0]["input_ids"]
    positions = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)

    def logits(ids, position_ids):
        return np.asarray(module.apply({"params": params}, ids, position_ids=position_ids).logits)

    np.testing.assert_allclose(logits(input_ids, positions + 7), logits(input_ids, positions), atol=1e-4)
    assert np.abs(logits(input_ids[:, ::-1], positions)[:, ::-1] - logits(input_ids, positions)).max() > 0.1


def test_fixture_has_wordpiece_tokens_and_narrow_embeddings():
    tokenizer = models.load_tokenizer(str(FIXTURE))
    config = models.load_config(str(FIXTURE))
    assert type(tokenizer).__name__ in ("BertTokenizerFast", "BertTokenizer")  # Transformers 4.x, 5
    ids = tokenizer("Hello there", "again")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
    assert (config.model_type, config.embedding_size, config.hidden_size, config.rotary_value) == ("roformer", 32, 64, True)
    assert config.pad_token_id == tokenizer.pad_token_id and config.vocab_size == len(tokenizer)


# Masked LM draws new masks every step: short lines and more masks make the batch memorisable.
SMOKE_SETTINGS = {
    "masked-lm": dict(learning_rate=5e-3, extra=("--line_by_line", "--max_seq_length", "12", "--mlm_probability", "0.3")),
}


@pytest.mark.parametrize("task", TASKS)
def test_script_training_smoke(task, tmp_path):
    family_checks.smoke_losses(task, FIXTURE, tmp_path, **SMOKE_SETTINGS.get(task, {}))


@pytest.mark.family_learning
def test_fine_tuning_learns_sentence_pairs(tmp_path):
    assert_paraphrase_learned(tmp_path, "tiny-roformer")
