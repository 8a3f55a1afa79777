"""Fresh parameters (`flax_finetune.initialisation`): deterministic for a seed, drawn from the
distributions the modules ask for, and only the leaves wanted are computed."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax.traverse_util import flatten_dict

from conftest import MODELS
from flax_finetune import models
from flax_finetune.initialisation import Initialiser, hashed_prng

TINY_BERT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def test_a_seed_gives_the_same_params_and_another_seed_other_params():
    config = transformers.BertConfig(**TINY_BERT)
    first, again, other = (flatten_dict(models.from_config(config, "masked-lm", seed=seed).params)
                           for seed in (0, 0, 1))
    for path, value in first.items():
        np.testing.assert_array_equal(again[path], value, err_msg="/".join(path))
    embedding = ("bert", "embeddings", "word_embeddings", "embedding")
    assert not np.allclose(other[embedding], first[embedding])


def test_params_follow_the_initialisers_of_the_module():
    """BERT: weights normal(0, initializer_range), biases 0, LayerNorm scales 1; each layer its own draw."""
    config = transformers.BertConfig(**TINY_BERT, initializer_range=0.05)
    params = flatten_dict(models.from_config(config, "masked-lm", seed=0).params)
    for path in [("bert", "embeddings", "word_embeddings", "embedding"),
                 ("bert", "encoder", "layer", "0", "intermediate", "dense", "kernel")]:
        values = np.asarray(params[path], np.float64)
        assert abs(values.mean()) < 0.002 and abs(values.std() - 0.05) < 0.0015, (path, values.mean(), values.std())
        kurtosis = np.mean((values - values.mean()) ** 4) / values.var() ** 2
        assert abs(kurtosis - 3) < 0.15, (path, kurtosis)  # normal, not uniform (1.8) or heavy-tailed
    np.testing.assert_array_equal(params[("bert", "encoder", "layer", "0", "output", "dense", "bias")], 0)
    np.testing.assert_array_equal(params[("bert", "embeddings", "LayerNorm", "scale")], 1)
    query = [np.ravel(params[("bert", "encoder", "layer", layer, "attention", "self", "query", "kernel")])
             for layer in ("0", "1")]
    assert abs(np.corrcoef(*query)[0, 1]) < 0.02


def test_hashed_bits_are_balanced_and_independent_across_keys():
    keys = [jax.random.wrap_key_data(jax.random.PRNGKey(seed), impl=hashed_prng()) for seed in (0, 1)]
    bits = [np.asarray(jax.random.bits(key, (1 << 16,), jnp.uint32)) for key in keys]
    ones_per_bit = ((bits[0][:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
    assert np.all(np.abs(ones_per_bit - 0.5) < 0.01), ones_per_bit
    uniform = [np.asarray(jax.random.uniform(key, (1 << 16,))) for key in keys]
    assert abs(np.corrcoef(*uniform)[0, 1]) < 0.02
    assert abs(np.corrcoef(uniform[0][:-1], uniform[0][1:])[0, 1]) < 0.02  # neighbours independent


def test_op_by_op_values_equal_one_compiled_program():
    config = transformers.BertConfig(**TINY_BERT)
    init = models.init_function(models.module_class(config, "question-answering")(config=config), config,
                                "question-answering")
    key = jax.random.PRNGKey(7)
    compiled = flatten_dict(jax.jit(lambda key: init(jax.random.wrap_key_data(key, impl=hashed_prng())))(key))
    for path, value in flatten_dict(Initialiser(init, key).values()).items():
        np.testing.assert_allclose(value, compiled[path], rtol=1e-6, atol=1e-7, err_msg="/".join(path))


class Recorded(nn.Module):
    """A body and a head whose initialisers, and the forward pass, record that they ran."""

    log: Callable[[str], None]

    def record(self, name, value):
        def run(argument):
            self.log(name)
            return np.asarray(argument)

        return jax.pure_callback(run, jax.ShapeDtypeStruct(value.shape, value.dtype), value)

    def recorded_init(self, name):
        return lambda key, shape, dtype=jnp.float32: self.record(name, jax.random.normal(key, shape, dtype))

    @nn.compact
    def __call__(self, inputs):
        hidden = nn.Dense(4, kernel_init=self.recorded_init("body"), name="body")(inputs)
        return self.record("forward", nn.Dense(2, kernel_init=self.recorded_init("head"), name="head")(hidden))


def test_only_the_leaves_asked_for_are_computed():
    calls = []
    module = Recorded(calls.append)
    initialiser = Initialiser(lambda key: module.init(key, jnp.ones((1, 3)))["params"], jax.random.PRNGKey(0))
    assert calls == []  # tracing runs nothing
    head = initialiser.values({("head", "kernel"), ("head", "bias")})
    assert calls == ["head"]
    assert set(flatten_dict(head)) == {("head", "kernel"), ("head", "bias")}
    everything = initialiser.values()
    assert sorted(calls) == ["body", "head", "head"]  # never the forward pass
    np.testing.assert_array_equal(everything["head"]["kernel"], head["head"]["kernel"])


def test_a_head_missing_from_the_checkpoint_gets_the_values_of_a_new_model():
    config = models.load_config(str(MODELS / "tiny-bert"), num_labels=3)
    loaded = models.load(str(MODELS / "tiny-bert"), "sequence-classification", config=config, seed=5)
    new = models.from_config(config, "sequence-classification", seed=5)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(loaded.params["classifier"][name], new.params["classifier"][name])
    assert not np.allclose(loaded.params["bert"]["embeddings"]["word_embeddings"]["embedding"],
                           new.params["bert"]["embeddings"]["word_embeddings"]["embedding"])
