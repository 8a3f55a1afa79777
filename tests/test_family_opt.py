"""OPT (flax_finetune.modeling.opt): parity, smoke, learning.

Tiny configs: hidden 32, 4 heads, 2 layers. Two layouts: OPT-125m's (pre-LayerNorm, final
LayerNorm, embeddings as wide as the hidden states) and OPT-350m's (post-LayerNorm, no final
LayerNorm, 16-wide word embeddings projected in and out). Parity against FlaxOPTForCausalLM (4.57)
and the PyTorch classes; PyTorch also for what its Flax class does not read (no biases, LayerNorms
without parameters).
"""

from __future__ import annotations

import numpy as np
import pytest

import family_checks
from conftest import MODELS
from test_family_gpt_neo import ONE_BATCH, assert_causal_lm_learns, assert_greedy_matches_flax, own_logits

transformers = pytest.importorskip("transformers")

FIXTURE = MODELS / "tiny-opt"


def tiny_config(**overrides):
    settings = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        bos_token_id=2, eos_token_id=2, pad_token_id=1, num_labels=3,
    )
    return transformers.OPTConfig(**{**settings, **overrides})


CASES = {
    "125m": {},
    "350m": {"do_layer_norm_before": False, "word_embed_proj_dim": 16, "activation_function": "gelu"},
    "untied": {"tie_word_embeddings": False},
}
TRAINED_CASES = ("125m", "350m")  # the untied case compares logits only
TORCH_ONLY_CASES = {"no-bias-no-affine": {"enable_bias": False, "layer_norm_elementwise_affine": False}}


@pytest.fixture
def flax_opt_taking_train(monkeypatch):
    """FlaxOPTForCausalLM names its dropout switch `deterministic`, where the harness (and the other
    Flax classes) say `train`: the same class, with `train` passed on as `deterministic`."""

    class FlaxOPTTakingTrain(transformers.FlaxOPTForCausalLM):
        def __call__(self, *args, train: bool = False, **kwargs):
            return super().__call__(*args, deterministic=not train, **kwargs)

    monkeypatch.setattr(transformers, "FlaxOPTForCausalLM", FlaxOPTTakingTrain)


@pytest.mark.parity
@family_checks.needs_flax("FlaxOPTForCausalLM")
@pytest.mark.usefixtures("parity_settings", "flax_opt_taking_train")
@pytest.mark.parametrize("case", CASES)
def test_causal_lm_matches_flax(case):
    config = tiny_config(**CASES[case])
    figures = family_checks.check_flax_parity("opt", "causal-lm", config, "FlaxOPTForCausalLM",
                                              family_checks.encoder_batches(config), train=case in TRAINED_CASES)
    assert figures["max_logit_error"] <= family_checks.ATOL


@pytest.mark.parity
@family_checks.needs_flax("FlaxOPTForCausalLM")
@pytest.mark.usefixtures("parity_settings")
def test_greedy_generation_matches_flax():
    assert_greedy_matches_flax(tiny_config(**CASES["350m"]), transformers.FlaxOPTForCausalLM, seed=3)


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("case", [*CASES, *TORCH_ONLY_CASES])
def test_causal_lm_matches_pytorch(case, tmp_path):
    config = tiny_config(**{**CASES, **TORCH_ONLY_CASES}[case])
    figures = family_checks.check_pytorch_parity("opt", "causal-lm", config, "OPTForCausalLM",
                                                 family_checks.encoder_batches(config), tmp_path)
    assert figures["max_logit_error"] <= family_checks.ATOL


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
def test_sequence_classification_matches_pytorch(tmp_path):
    config = tiny_config(**CASES["350m"])
    figures = family_checks.check_pytorch_parity("opt", "sequence-classification", config,
                                                 "OPTForSequenceClassification",
                                                 family_checks.encoder_batches(config), tmp_path)
    assert figures["max_logit_error"] <= family_checks.ATOL


def test_causal_lm_smoke(tmp_path):
    family_checks.smoke_losses("causal-lm", FIXTURE, tmp_path, learning_rate=1e-2, extra=ONE_BATCH)


@pytest.mark.family_learning
def test_fine_tuning_lowers_perplexity(tmp_path):
    assert_causal_lm_learns(FIXTURE, tmp_path)


def test_left_padding_changes_nothing():
    """Positions come from the attention mask: a row padded on the left gives the logits of the same
    row padded on the right (the classifier's on its last token, found by pad_token_id as
    Transformers finds it)."""
    config = tiny_config(**CASES["350m"])
    real, mask = family_checks.encoder_batches(config)[0]["input_ids"][:1, :6], [1] * 6
    pad = np.full((1, 4), config.pad_token_id)
    left = {"input_ids": np.concatenate([pad, real], axis=1), "attention_mask": np.array([[0] * 4 + mask])}
    right = {"input_ids": np.concatenate([real, pad], axis=1), "attention_mask": np.array([mask + [0] * 4])}
    for task in ("causal-lm", "sequence-classification"):
        shifted, aligned = own_logits(task, config, left, right)
        np.testing.assert_allclose(shifted[:, 4:] if task == "causal-lm" else shifted,
                                   aligned[:, :6] if task == "causal-lm" else aligned, atol=1e-5)
