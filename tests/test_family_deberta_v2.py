"""DeBERTa-v2 / DeBERTa-v3 (model_type deberta-v2): parity with PyTorch, checkpoints, the tiny fixture, training.

No Flax DeBERTa-v2 ever existed, so parity is against Transformers' PyTorch classes only. Two
tiny configurations cover the switches: a v3 one (relative attention with log buckets, p2c and
c2p through the shared content projections, LayerNorm-ed relative embeddings, no absolute
positions, no token types) and a v2 one (no buckets, a short relative range, separate position
projections, absolute positions and token types, embeddings narrower than the hidden size, the
convolution after the first layer). Rows of 10 tokens reach the log buckets (beyond 2) and the
clipped distances (beyond 6).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import family_checks
from conftest import MODELS
from flax_finetune import models
from flax_finetune.errors import InputError
from flax_finetune.modeling import checkpoint_io
from flax_finetune.modeling.deberta_v2 import log_bucket_positions
from test_text_classification import assert_paraphrase_learned

transformers = pytest.importorskip("transformers")

FIXTURE = MODELS / "tiny-deberta-v3"
TORCH_CLASSES = {
    "sequence-classification": "DebertaV2ForSequenceClassification",
    "token-classification": "DebertaV2ForTokenClassification",
    "question-answering": "DebertaV2ForQuestionAnswering",
    "masked-lm": "DebertaV2ForMaskedLM",
}
V3 = dict(
    relative_attention=True, position_buckets=4, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
    share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
)
V2 = dict(
    relative_attention=True, position_buckets=-1, max_relative_positions=6, pos_att_type=["p2c", "c2p"],
    share_att_key=False, position_biased_input=True, type_vocab_size=2, embedding_size=24, conv_kernel_size=3,
)


def tiny_config(variant: dict, task: str = "masked-lm", **overrides):
    settings = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, hidden_act="gelu", pooler_hidden_act="tanh", layer_norm_eps=1e-3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        num_labels=2 if task == "question-answering" else 3,
    )
    return transformers.DebertaV2Config(**{**settings, **variant, **overrides})


def parameter_shapes(config, task: str):
    """The parameter tree of this project's `task` module for `config`, as shapes (nothing compiled)."""
    module = models.module_class(config, task)(config=config)
    return module, jax.eval_shape(models.init_function(module, config, task), jax.random.PRNGKey(0))


def random_model(config, task: str):
    module, shapes = parameter_shapes(config, task)
    return module, family_checks.random_params(shapes, seed=0)


# --------------------------------------------------------------------------- parity with Transformers' PyTorch classes


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("variant, task, overrides", [
    (V3, "sequence-classification", {}),
    (V3, "token-classification", {}),
    (V3, "question-answering", {}),
    (V3, "masked-lm", {}),  # legacy head: cls/predictions
    (V3, "masked-lm", {"legacy": False}),  # lm_predictions/lm_head
    (V2, "sequence-classification", {}),
    (V2, "token-classification", {}),
    (V2, "masked-lm", {}),  # the legacy transform narrows to embedding_size
], ids=["v3-seq", "v3-token", "v3-qa", "v3-mlm", "v3-mlm-new-head", "v2-seq", "v2-token", "v2-mlm"])
def test_matches_transformers_pytorch(variant, task, overrides, tmp_path):
    config = tiny_config(variant, task, **overrides)
    batches = family_checks.encoder_batches(config, token_types=config.type_vocab_size > 0)
    family_checks.check_pytorch_parity("deberta-v2", task, config, TORCH_CLASSES[task], batches, tmp_path)


def test_log_buckets_match_pytorch():
    """make_log_bucket_position(arange(-20, 21), bucket_size=8, max_position=32), computed by PyTorch."""
    expected = [-7, -7, -7, -7, -7, -6, -6, -6, -6, -6, -6, -6, -6, -5, -5, -5, -4, -3, -2, -1, 0,
                1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7]
    np.testing.assert_array_equal(log_bucket_positions(np.arange(-20, 21), 8, 32), expected)


# --------------------------------------------------------------------------- checkpoints


def test_head_checkpoint_fills_other_heads_and_skips_the_unused_position_table(tmp_path):
    """A v2 masked-LM checkpoint (with absolute positions) read by a v3-like classifier: the encoder
    is filled, the unused position table is skipped, and only the new head is missing."""
    source = tiny_config(V3, position_biased_input=True)
    module, params = random_model(source, "masked-lm")
    models.Model(module, params, source).save(params, str(tmp_path))
    target = tiny_config(V3)
    _, shapes = parameter_shapes(target, "sequence-classification")
    _, missing, unexpected = checkpoint_io.read_params(tmp_path, shapes, "deberta", "deberta-v2")
    assert sorted("/".join(path) for path in missing) == [
        "classifier/bias", "classifier/kernel", "pooler/dense/bias", "pooler/dense/kernel"]
    assert unexpected == [
        "cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.weight"]


@pytest.mark.parametrize("task, overrides, message", [
    ("token-classification", {"conv_kernel_size": 4}, "conv_kernel_size 4: only odd"),
    ("masked-lm", {"tie_word_embeddings": False}, "tie_word_embeddings false with the legacy"),
])
def test_configurations_pytorch_cannot_match_are_refused(task, overrides, message):
    with pytest.raises(InputError, match=message):
        models.from_config(tiny_config(V2, **overrides), task)


# --------------------------------------------------------------------------- the tiny fixture


def test_fixture_has_deberta_v3_tokens_and_configuration():
    tokenizer = models.load_tokenizer(str(FIXTURE))
    config = models.load_config(str(FIXTURE))
    special_ids = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id]
    assert special_ids == [0, 1, 2, 3]
    assert tokenizer.mask_token == "[MASK]" and tokenizer.mask_token_id == len(tokenizer) - 1 == config.vocab_size - 1
    encoded = tokenizer("the cat [MASK]", "sat")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == [
        "[CLS]", "▁the", "▁", "c", "a", "t", "[MASK]", "[SEP]", "▁", "s", "a", "t", "[SEP]"]
    assert encoded["token_type_ids"] == [0] * 8 + [1] * 5
    assert (config.type_vocab_size, config.position_biased_input, config.share_att_key) == (0, False, True)


# --------------------------------------------------------------------------- training through the scripts


# Masked LM chooses new tokens every step, so memorising 8 blocks of 32 tokens stays near their unigram
# entropy (measured on tiny-deberta-v3: 7.36 -> 6.3 at 1e-3, 4.2 at 1e-2, 30 steps); the first 12 tokens
# of 8 templated lines, 30% of them chosen, are learnt: 7.32 -> 2.9 (last three) at 5e-3.
SMOKE_SETTINGS = {
    "sequence-classification": {},
    "token-classification": {},
    "question-answering": {},
    "masked-lm": dict(
        learning_rate=5e-3, extra=("--line_by_line", "--max_seq_length", "12", "--mlm_probability", "0.3")
    ),
}


@pytest.mark.parametrize("task", list(SMOKE_SETTINGS))
def test_script_training_smoke(task, tmp_path):
    family_checks.smoke_losses(task, FIXTURE, tmp_path, **SMOKE_SETTINGS[task])


@pytest.mark.family_learning
def test_fine_tuning_learns_sentence_pairs(tmp_path):
    assert_paraphrase_learned(tmp_path, "tiny-deberta-v3")
