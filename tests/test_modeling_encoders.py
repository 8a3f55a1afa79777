"""This project's BERT, RoBERTa, DistilBERT and GPT-2 against Transformers 4.x's Flax classes.

Tiny random configs (hidden 32, 2 layers, 2 heads, vocabulary 99). Parity
tests feed the same random parameters (every leaf random, biases and
LayerNorm scales included) to both implementations and compare logits with
and without a right-padded attention mask, then three AdamW steps. They skip
where Transformers has no Flax classes (Transformers 5); the init/bfloat16 and
dropout tests need only Transformers' configs.

Forward passes run eagerly (JAX caches each operation, and the shapes are the
same across models), training steps are jitted: the file stays well under a
minute on two cores.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import adamw_losses, skip_where_the_reference_is_broken

import flax_finetune.modeling.bert  # noqa: F401  (registers bert, roberta)
import flax_finetune.modeling.distilbert  # noqa: F401
import flax_finetune.modeling.gpt2  # noqa: F401
from flax_finetune.modeling import MODULES, Output

transformers = pytest.importorskip("transformers")

# Only the parity tests need Transformers' Flax classes; the others run with Transformers 5 too.
needs_flax_classes = pytest.mark.skipif(
    not hasattr(transformers, "FlaxBertModel"),
    reason="parity needs Transformers 4.x Flax classes as the reference",
)

pytestmark = pytest.mark.usefixtures("parity_settings")

ATOL = RTOL = 1e-5
BATCH, LENGTH = 3, 10
LENGTHS = (10, 7, 2)  # right padding: the real tokens of each row in the masked batch

TASKS = ("sequence-classification", "token-classification", "question-answering", "masked-lm")

# Transformers' class name fragment for each (model type, task)
HF_PREFIX = {"bert": "FlaxBert", "roberta": "FlaxRoberta", "distilbert": "FlaxDistilBert", "gpt2": "FlaxGPT2"}
HF_SUFFIX = {
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
    "masked-lm": "ForMaskedLM",
    "causal-lm": "LMHeadModel",
}

EXPECTED_TOP_LEVEL = {
    ("bert", "sequence-classification"): {"bert", "classifier"},
    ("bert", "token-classification"): {"bert", "classifier"},
    ("bert", "question-answering"): {"bert", "qa_outputs"},
    ("bert", "masked-lm"): {"bert", "cls"},
    ("roberta", "sequence-classification"): {"roberta", "classifier"},
    ("roberta", "token-classification"): {"roberta", "classifier"},
    ("roberta", "question-answering"): {"roberta", "qa_outputs"},
    ("roberta", "masked-lm"): {"roberta", "lm_head"},
    ("distilbert", "sequence-classification"): {"distilbert", "pre_classifier", "classifier"},
    ("distilbert", "token-classification"): {"distilbert", "classifier"},
    ("distilbert", "question-answering"): {"distilbert", "qa_outputs"},
    ("distilbert", "masked-lm"): {"distilbert", "vocab_transform", "vocab_layer_norm", "vocab_projector"},
    ("gpt2", "causal-lm"): {"transformer"},
}


def tiny_config(model_type: str, task: str, **overrides):
    """A tiny random-model config; num_labels 2 for question answering, 3 otherwise."""
    num_labels = 2 if task == "question-answering" else 3
    if model_type in ("bert", "roberta"):
        config_class = transformers.BertConfig if model_type == "bert" else transformers.RobertaConfig
        options = dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            type_vocab_size=2 if model_type == "bert" else 1,
            layer_norm_eps=1e-3,  # far from the default: a wrong eps shows in the logits
            hidden_act="gelu",
            pad_token_id=0 if model_type == "bert" else 1,
        )
    elif model_type == "distilbert":
        config_class = transformers.DistilBertConfig
        options = dict(
            vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64, pad_token_id=0
        )
    else:
        config_class = transformers.GPT2Config
        options = dict(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_inner=37,
            n_positions=64,
            layer_norm_epsilon=1e-3,
            activation_function="gelu_new",
            pad_token_id=0,
        )
    options.update(overrides)
    return config_class(num_labels=num_labels, **options)


def random_params(tree, seed: int):
    """Random values for every leaf of a shape tree: N(0, 0.2); LayerNorm scales 1 + N(0, 0.1)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    values = {}
    for key, (path, leaf) in zip(keys, sorted(flat.items())):
        noise = jax.random.normal(key, leaf.shape, jnp.float32)
        values[path] = 1.0 + 0.1 * noise if path[-1] == "scale" else 0.2 * noise
    return flax.traverse_util.unflatten_dict(values)


def shape_tree(params) -> dict:
    return {path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def batches(model_type: str, config):
    """(unmasked inputs, right-padded inputs): dicts of [B, L] int32 arrays."""
    rng = np.random.default_rng(0)
    pad = config.pad_token_id
    input_ids = rng.integers(2, config.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)  # no padding id
    unmasked = {"input_ids": input_ids}
    mask = (np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    masked = {"input_ids": np.where(mask == 1, input_ids, pad).astype(np.int32), "attention_mask": mask}
    if model_type == "bert":  # two segments
        token_type_ids = (np.arange(LENGTH)[None, :] >= np.array([4, 3, 1])[:, None]).astype(np.int32)
        unmasked["token_type_ids"] = token_type_ids
        masked["token_type_ids"] = token_type_ids * mask
    return unmasked, masked


def targets(task: str, config, inputs) -> dict:
    """Random labels for `task_loss`."""
    rng = np.random.default_rng(1)
    if task == "sequence-classification":
        return {"labels": rng.integers(0, config.num_labels, size=(BATCH,))}
    if task == "token-classification":
        return {"labels": rng.integers(0, config.num_labels, size=(BATCH, LENGTH))}
    if task == "question-answering":
        return {"start": rng.integers(0, 2, size=(BATCH,)), "end": rng.integers(0, 2, size=(BATCH,)) + 1}
    return {"labels": rng.integers(0, config.vocab_size, size=(BATCH, LENGTH))}


def task_loss(task: str, outputs: dict, inputs: dict, target: dict):
    """Mean cross-entropy of the head's outputs (real tokens only where a mask is given)."""
    ce = optax.softmax_cross_entropy_with_integer_labels
    if task == "question-answering":
        return (ce(outputs["start_logits"], target["start"]).mean() + ce(outputs["end_logits"], target["end"]).mean()) / 2
    if task == "sequence-classification":
        return ce(outputs["logits"], target["labels"]).mean()
    weights = inputs.get("attention_mask", jnp.ones_like(inputs["input_ids"])).astype(jnp.float32)
    logits, labels = outputs["logits"], target["labels"]
    if task == "causal-lm":  # position t predicts token t + 1
        logits, labels, weights = logits[:, :-1], inputs["input_ids"][:, 1:], weights[:, 1:]
    return (ce(logits, labels) * weights).sum() / weights.sum()


def as_dict(outputs) -> dict:
    """Logit fields of an Output or a Transformers output, as float32 arrays."""
    names = ("start_logits", "end_logits") if getattr(outputs, "start_logits", None) is not None else ("logits",)
    return {name: jnp.asarray(getattr(outputs, name), jnp.float32) for name in names}


# (model type, task, config overrides): every registered head, plus untied output projections,
# DistilBERT's sinusoidal positions.
CASES = (
    [(model_type, task, {}) for model_type in ("bert", "roberta", "distilbert") for task in TASKS]
    + [(model_type, "masked-lm", {"tie_word_embeddings": False}) for model_type in ("bert", "roberta", "distilbert")]
    + [("distilbert", "token-classification", {"sinusoidal_pos_embds": True})]
    + [("gpt2", "causal-lm", {}), ("gpt2", "causal-lm", {"tie_word_embeddings": False})]
)


def case_id(case) -> str:
    model_type, task, overrides = case
    return "-".join([model_type, task] + [f"{key}={value}" for key, value in overrides.items()])


class Pair:
    """Transformers' Flax class and this project's module for one case, sharing random parameters."""

    def __init__(self, model_type: str, task: str, overrides: dict):
        self.model_type, self.task = model_type, task
        self.config = tiny_config(model_type, task, **overrides)
        skip_where_the_reference_is_broken(HF_PREFIX[model_type] + HF_SUFFIX[task])
        hf_class = getattr(transformers, HF_PREFIX[model_type] + HF_SUFFIX[task])
        self.reference = hf_class(self.config, _do_init=False)
        self.reference_tree = jax.eval_shape(lambda rng: self.reference.init_weights(rng, (1, 1)), jax.random.PRNGKey(0))
        self.params = random_params(self.reference_tree, seed=len(case_id((model_type, task, overrides))))
        self.module = MODULES[(model_type, task)](config=self.config)

    def reference_outputs(self, params, inputs) -> dict:
        return as_dict(self.reference(**inputs, params=params, train=False))

    def own_outputs(self, params, inputs) -> dict:
        return as_dict(self.module.apply({"params": params}, **inputs, deterministic=True))


_pairs: dict = {}


def pair_for(case) -> Pair:
    """One Pair per case, built once (the forward and training tests share it)."""
    key = case_id(case)
    if key not in _pairs:
        _pairs[key] = Pair(*case)
    return _pairs[key]


def max_error(expected: dict, actual: dict) -> float:
    return max(float(jnp.max(jnp.abs(expected[name] - actual[name]))) for name in expected)


@pytest.mark.parity
@needs_flax_classes
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parameter_tree_matches_transformers(case):
    pair = pair_for(case)
    own_tree = jax.eval_shape(
        lambda rng: pair.module.init(rng, input_ids=jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )
    assert set(own_tree) == {"params"}
    assert shape_tree(own_tree["params"]) == shape_tree(pair.reference_tree)


@pytest.mark.parity
@needs_flax_classes
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_match_transformers(case):
    pair = pair_for(case)
    unmasked, masked = batches(pair.model_type, pair.config)
    for inputs in (unmasked, masked):
        expected = pair.reference_outputs(pair.params, inputs)
        actual = pair.own_outputs(pair.params, inputs)
        assert expected.keys() == actual.keys()
        for name in expected:
            assert actual[name].dtype == jnp.float32
            np.testing.assert_allclose(actual[name], expected[name], atol=ATOL, rtol=RTOL, err_msg=name)


# Training: one case per architecture, covering pooler, classifier head, span head and tied output embeddings.
TRAINING_CASES = [
    ("bert", "sequence-classification", {}),
    ("roberta", "masked-lm", {}),
    ("distilbert", "question-answering", {}),
    ("gpt2", "causal-lm", {}),
]


def train_losses(forward, task: str, params, inputs: dict, target: dict) -> list[float]:
    """Losses of three AdamW steps on the same batch, starting from `params`."""
    return adamw_losses(lambda p: task_loss(task, forward(p, inputs), inputs, target), params)


@pytest.mark.parity
@needs_flax_classes
@pytest.mark.parametrize("case", TRAINING_CASES, ids=case_id)
def test_training_losses_match_transformers(case):
    pair = pair_for(case)
    _, inputs = batches(pair.model_type, pair.config)
    inputs = {name: jnp.asarray(value) for name, value in inputs.items()}
    target = {name: jnp.asarray(value) for name, value in targets(pair.task, pair.config, inputs).items()}
    expected = train_losses(pair.reference_outputs, pair.task, pair.params, inputs, target)
    actual = train_losses(pair.own_outputs, pair.task, pair.params, inputs, target)
    assert expected[-1] < expected[0]  # the steps do train
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- without Transformers' Flax classes


def test_every_expected_module_is_registered():
    assert set(EXPECTED_TOP_LEVEL) <= set(MODULES)


@pytest.mark.parametrize("key", sorted(EXPECTED_TOP_LEVEL), ids="-".join)
def test_init_tree_and_bfloat16_forward(key):
    model_type, task = key
    config = tiny_config(model_type, task)
    unmasked, masked = batches(model_type, config)
    params = MODULES[key](config=config).init(jax.random.PRNGKey(0), **masked)["params"]
    assert set(params) == EXPECTED_TOP_LEVEL[key]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}

    outputs = MODULES[key](config=config, dtype=jnp.bfloat16).apply({"params": params}, **masked)
    assert isinstance(outputs, Output)
    fields = as_dict(outputs)
    expected_shape = {
        "sequence-classification": (BATCH, config.num_labels),
        "token-classification": (BATCH, LENGTH, config.num_labels),
        "question-answering": (BATCH, LENGTH),
        "masked-lm": (BATCH, LENGTH, config.vocab_size),
        "causal-lm": (BATCH, LENGTH, config.vocab_size),
    }[task]
    for name, value in fields.items():
        assert value.shape == expected_shape, name
        assert bool(jnp.all(jnp.isfinite(value))), name


@pytest.mark.parametrize("model_type,task", [("bert", "token-classification"), ("distilbert", "masked-lm"), ("gpt2", "causal-lm")])
def test_dropout_follows_config_rates(model_type, task):
    """deterministic=False draws from rngs["dropout"]; with every rate 0 it changes nothing."""
    zero_rates = {
        "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        "distilbert": dict(dropout=0.0, attention_dropout=0.0),
        "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    }[model_type]
    _, masked = batches(model_type, tiny_config(model_type, task))
    module = MODULES[(model_type, task)](config=tiny_config(model_type, task))
    params = module.init(jax.random.PRNGKey(0), **masked)["params"]

    def logits(config, deterministic, seed=0):
        module = MODULES[(model_type, task)](config=config)
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        return module.apply({"params": params}, **masked, deterministic=deterministic, rngs=rngs).logits

    default = tiny_config(model_type, task)
    evaluation = logits(default, True)
    training = logits(default, False)
    assert not np.allclose(training, evaluation)
    np.testing.assert_array_equal(training, logits(default, False))  # same key, same mask
    assert not np.allclose(training, logits(default, False, seed=1))
    without_dropout = tiny_config(model_type, task, **zero_rates)
    np.testing.assert_allclose(logits(without_dropout, False), evaluation, atol=1e-6)
