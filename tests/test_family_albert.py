"""ALBERT: parity with Transformers' Flax and PyTorch classes, the tiny fixture, training smokes, learning.

Two tiny configs, both with embeddings narrower than the hidden size (24 vs 32, so the
embedding-to-hidden mapping and the masked-LM head's projection to the embedding width count):
SHARED, ALBERT's default of one group of one layer used at both depths; GROUPED, two groups of
two layers over three passes, so passes 0 and 1 reuse group 0 and pass 2 uses group 1
(Transformers' int(i / (layers / groups))). Batches are passed padded first, unpadded last: the
AdamW steps run on the unpadded one, because PyTorch's embedding never updates the padding
token's row (`padding_idx`) and the question-answering loss reaches padded positions. The seeds
are ones whose random parameters the three steps do train (the harness asserts it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import family_checks
from conftest import MODELS
from flax_finetune import models
from test_text_classification import assert_paraphrase_learned

transformers = pytest.importorskip("transformers")

FIXTURE = MODELS / "tiny-albert"
TASKS = ("sequence-classification", "token-classification", "question-answering", "masked-lm")
HEADS = {
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
    "masked-lm": "ForMaskedLM",
}
GROUPED = dict(num_hidden_groups=2, inner_group_num=2, num_hidden_layers=3)


def tiny_config(task: str, **overrides):
    """A tiny ALBERT config; num_labels 2 for question answering, 3 otherwise."""
    settings = dict(
        vocab_size=99, embedding_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        layer_norm_eps=1e-3,  # far from the default: a wrong epsilon shows in the logits
        num_labels=2 if task == "question-answering" else 3,
    )
    return transformers.AlbertConfig(**{**settings, **overrides})


def batches(config):
    """The harness's two batches with two segments, padded first: training runs on the last (unpadded)."""
    return family_checks.encoder_batches(config, token_types=True)[::-1]


@pytest.mark.parity
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("task, overrides, seed", [
    *[(task, {}, 1) for task in TASKS],
    ("masked-lm", GROUPED, 0),
])
def test_matches_transformers_flax(task, overrides, seed):
    flax_class = "FlaxAlbert" + HEADS[task]
    if not hasattr(transformers, flax_class):
        pytest.skip(f"parity needs Transformers' {flax_class} (4.x) as the reference")
    config = tiny_config(task, **overrides)
    figures = family_checks.check_flax_parity("albert", task, config, flax_class, batches(config), seed=seed)
    assert figures["max_logit_error"] <= 1e-5


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("task, seed", [(task, 1 if task == "token-classification" else 0) for task in TASKS])
def test_matches_transformers_pytorch(task, seed, tmp_path):
    config = tiny_config(task, **GROUPED)
    figures = family_checks.check_pytorch_parity("albert", task, config, "Albert" + HEADS[task], batches(config),
                                                 tmp_path, seed=seed)
    assert figures["max_logit_error"] <= 1e-5


def test_classifier_dropout_is_albert_classifier_dropout_prob():
    """The classifiers drop out at `classifier_dropout_prob` (ALBERT's own setting), not at `hidden_dropout_prob`
    (0 here, as in albert-base-v2's config)."""
    task = "sequence-classification"
    inputs = {"input_ids": jnp.asarray(family_checks.encoder_batches(tiny_config(task))[0]["input_ids"])}

    def changed_by_dropout(**rates) -> bool:
        model = models.from_config(tiny_config(task, **rates), task)
        trained = model(model.params, **inputs, train=True, dropout_rng=jax.random.PRNGKey(0)).logits
        return not np.allclose(trained, model(model.params, **inputs).logits)

    assert changed_by_dropout(classifier_dropout_prob=0.5)
    assert not changed_by_dropout(classifier_dropout_prob=0.0)


def test_fixture_has_albert_tokens_and_configuration():
    tokenizer = models.load_tokenizer(str(FIXTURE))
    config = models.load_config(str(FIXTURE))
    assert type(tokenizer).__name__ in ("AlbertTokenizerFast", "AlbertTokenizer")  # Transformers 4.x, 5
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    ids = tokenizer("Hello there", "again")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
    assert tokenizer.tokenize("Hello")[0].startswith("▁") and tokenizer.decode(ids, skip_special_tokens=True) == "hello there again"
    assert (config.embedding_size, config.hidden_size, config.num_hidden_groups) == (32, 64, 1)
    assert config.pad_token_id == tokenizer.pad_token_id and config.vocab_size == len(tokenizer)


# One shared layer learns its batch more slowly than BERT's two (at 1e-3 text classification only
# reaches 0.35 from 0.69 in the 30 steps). Masked LM draws new masks every step: short lines and
# more masks make the batch memorisable.
SMOKE_SETTINGS = {
    "sequence-classification": dict(learning_rate=3e-3),
    "token-classification": dict(learning_rate=3e-3),
    "question-answering": dict(learning_rate=3e-3),
    "masked-lm": dict(learning_rate=1e-2, extra=("--line_by_line", "--max_seq_length", "12", "--mlm_probability", "0.3")),
}


@pytest.mark.parametrize("task", TASKS)
def test_script_training_smoke(task, tmp_path):
    family_checks.smoke_losses(task, FIXTURE, tmp_path, **SMOKE_SETTINGS[task])


@pytest.mark.family_learning
def test_fine_tuning_learns_sentence_pairs(tmp_path):
    assert_paraphrase_learned(tmp_path, "tiny-albert")
