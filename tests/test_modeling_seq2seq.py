"""This project's T5 and Whisper, and its generation, against Transformers 4.x's Flax classes.

Tiny random configs (d_model 32, 1-2 layers per stack, 4 heads, vocabulary 99): T5 v1.0 (ReLU,
tied embeddings), T5 v1.1 (gated GELU, separate lm_head) and Whisper. Both implementations get
the same random parameters (every leaf random, norms included) and are compared on logits, with
and without right padding, on three AdamW steps (T5 v1.1, Whisper), and on the tokens of greedy
and beam search (Whisper with a forced prefix, suppressed tokens and tokens suppressed at the
first free step), through `generation_kwargs` from a GenerationConfig as the scripts use it.
`generate` must compile once per input shape. The whole module skips where Transformers has no
Flax classes (Transformers 5).

Compilation is most of the cost: everything is jitted (cheaper than dispatching each operation),
without most XLA optimizations, and parameters are drawn with NumPy. The file stays within a
minute on two cores. Matrix products run at full float32 precision, also on accelerators.
"""

from __future__ import annotations

import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import adamw_losses

import flax_finetune.modeling.t5  # noqa: F401  (registers t5)
import flax_finetune.modeling.whisper  # noqa: F401  (registers whisper)
from flax_finetune.modeling import MODULES, generation

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("parity_settings")]

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FlaxT5ForConditionalGeneration"):
    pytest.skip("parity needs Transformers 4.x Flax classes as the reference", allow_module_level=True)

ATOL = RTOL = 1e-5
BATCH = 3
SOURCE_LENGTHS = (9, 6, 3)  # right padding: the real tokens of each row of a padded batch
TARGET_LENGTHS = (7, 5, 2)
SOURCE_LENGTH, TARGET_LENGTH = SOURCE_LENGTHS[0], TARGET_LENGTHS[0]
PAD, EOS = 0, 1
WHISPER_START = 3
# End-of-sequence tokens that these random models do generate, so that generated sequences end at
# different lengths, some before the length limit and some not at all (found by running them).
T5_GREEDY_EOS, T5_BEAM_EOS, WHISPER_EOS = 13, 56, 29


def t5_config(version: str):
    """T5 v1.0 (ReLU, tied embeddings) or v1.1 (gated GELU, lm_head, fewer encoder than decoder blocks)."""
    v1_0 = version == "v1.0"
    return transformers.T5Config(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_heads=4,
        num_layers=2 if v1_0 else 1,
        num_decoder_layers=2,
        # Few buckets, short range: the 9-token inputs reach the logarithmic buckets and the last one.
        relative_attention_num_buckets=8,
        relative_attention_max_distance=6,
        feed_forward_proj="relu" if v1_0 else "gated-gelu",
        tie_word_embeddings=v1_0,
        layer_norm_epsilon=1e-3,  # far from the default: a wrong epsilon shows in the logits
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )


def whisper_config():
    return transformers.WhisperConfig(
        vocab_size=99,
        num_mel_bins=8,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_source_positions=16,
        max_target_positions=24,
        tie_word_embeddings=True,
        decoder_start_token_id=WHISPER_START,
        bos_token_id=WHISPER_START,
        pad_token_id=PAD,
        eos_token_id=WHISPER_EOS,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )


CASES = {
    "t5-v1.0": ("t5", "seq2seq-lm", lambda: t5_config("v1.0"), "FlaxT5ForConditionalGeneration"),
    "t5-v1.1": ("t5", "seq2seq-lm", lambda: t5_config("v1.1"), "FlaxT5ForConditionalGeneration"),
    "whisper": ("whisper", "speech-seq2seq", whisper_config, "FlaxWhisperForConditionalGeneration"),
}


def random_params(tree, seed: int):
    """Random values for every leaf of a shape tree: N(0, 0.2); norm scales 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    values = {}
    for path, leaf in sorted(flat.items()):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_scale = path[-1] == "scale" or (path[-1] == "weight" and "layer_norm" in path[-2])
        values[path] = jnp.asarray(1.0 + 0.1 * noise if is_scale else 0.2 * noise)
    return flax.traverse_util.unflatten_dict(values)


def shape_tree(params) -> dict:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def right_padding_mask(lengths, width: int) -> np.ndarray:
    return (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int32)


class Pair:
    """Transformers' Flax class and this project's module for one case, sharing random parameters.

    `batches` are (unpadded, padded) dicts of the inputs both take: the encoder's ("input_ids" and
    "attention_mask" [batch, source], or "input_features" [batch, mel, frames]) and the decoder's
    ("decoder_input_ids", "decoder_attention_mask" [batch, target]).
    """

    def __init__(self, name: str):
        model_type, task, make_config, reference_class = CASES[name]
        self.name, self.model_type = name, model_type
        self.config = make_config()
        self.reference = getattr(transformers, reference_class)(self.config, _do_init=False)
        self.reference_tree = jax.eval_shape(self._reference_init, jax.random.PRNGKey(0))
        self.params = random_params(self.reference_tree, seed=sum(map(ord, name)))
        self.module = MODULES[(model_type, task)](config=self.config)
        self.batches = self._batches()

    def _reference_init(self, rng):
        if self.model_type == "whisper":
            return self.reference.init_weights(rng, (1, self.config.num_mel_bins, 2 * self.config.max_source_positions))
        return self.reference.init_weights(rng, (1, 1))

    def _batches(self):
        rng = np.random.default_rng(0)
        vocab = self.config.vocab_size
        decoder_input_ids = rng.integers(2, vocab, size=(BATCH, TARGET_LENGTH)).astype(np.int32)
        decoder_mask = right_padding_mask(TARGET_LENGTHS, TARGET_LENGTH)
        if self.model_type == "whisper":
            features = rng.standard_normal((BATCH, self.config.num_mel_bins, 2 * self.config.max_source_positions))
            unpadded = {"input_features": features.astype(np.float32)}
            padded = dict(unpadded)
        else:
            input_ids = rng.integers(2, vocab, size=(BATCH, SOURCE_LENGTH)).astype(np.int32)
            mask = right_padding_mask(SOURCE_LENGTHS, SOURCE_LENGTH)
            unpadded = {"input_ids": input_ids}
            padded = {"input_ids": np.where(mask == 1, input_ids, PAD).astype(np.int32), "attention_mask": mask}
        unpadded["decoder_input_ids"] = decoder_input_ids
        padded["decoder_input_ids"] = np.where(decoder_mask == 1, decoder_input_ids, PAD).astype(np.int32)
        padded["decoder_attention_mask"] = decoder_mask
        return unpadded, padded

    def reference_logits(self, params, inputs):
        return self.reference(**inputs, params=params, train=False).logits

    def own_logits(self, params, inputs):
        return self.module.apply({"params": params}, **inputs, deterministic=True).logits

    def encoder_inputs(self, inputs: dict) -> dict:
        return {name: value for name, value in inputs.items() if not name.startswith("decoder_")}


_pairs: dict = {}


def pair_for(name: str) -> Pair:
    """One Pair per case, built once (the tests of a case share it)."""
    if name not in _pairs:
        _pairs[name] = Pair(name)
    return _pairs[name]


@pytest.mark.parametrize("name", CASES)
def test_parameter_tree_matches_transformers(name):
    pair = pair_for(name)
    unpadded, _ = pair.batches
    own_tree = jax.eval_shape(lambda rng: pair.module.init(rng, **unpadded), jax.random.PRNGKey(0))
    assert set(own_tree) == {"params"}
    assert shape_tree(own_tree["params"]) == shape_tree(pair.reference_tree)


def logits_of_batches(logits_fn, params, batches):
    """logits_fn(params, inputs) for each batch, in one compiled program."""
    return jax.jit(lambda params, batches: [logits_fn(params, inputs) for inputs in batches])(params, batches)


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name):
    pair = pair_for(name)
    expected_logits = logits_of_batches(pair.reference_logits, pair.params, pair.batches)
    actual_logits = logits_of_batches(pair.own_logits, pair.params, pair.batches)
    for expected, actual in zip(expected_logits, actual_logits, strict=True):
        assert actual.dtype == jnp.float32
        assert actual.shape == (BATCH, TARGET_LENGTH, pair.config.vocab_size)
        np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)


def train_losses(logits_fn, params, inputs: dict) -> list[float]:
    """Losses of three AdamW steps on the same padded batch: cross-entropy of the next decoder token."""
    labels = jnp.roll(inputs["decoder_input_ids"], -1, axis=1)
    weights = jnp.asarray(inputs["decoder_attention_mask"], jnp.float32).at[:, -1].set(0.0)

    def loss_fn(params):
        token_losses = optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, inputs), labels)
        return (token_losses * weights).sum() / weights.sum()

    return adamw_losses(loss_fn, params)


@pytest.mark.parametrize("name", ["t5-v1.1", "whisper"])
def test_training_losses_match_transformers(name):
    pair = pair_for(name)
    _, padded = pair.batches
    inputs = {key: jnp.asarray(value) for key, value in padded.items()}
    expected = train_losses(pair.reference_logits, pair.params, inputs)
    actual = train_losses(pair.own_logits, pair.params, inputs)
    assert expected[-1] < expected[0]  # the steps do train
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- generation

MAX_LENGTH = 12


def t5_generation_config(version: str, eos_token_id: int):
    generation_config = transformers.GenerationConfig.from_model_config(t5_config(version))
    generation_config.eos_token_id = eos_token_id
    return generation_config


def whisper_generation_config(multilingual: bool):
    """Whisper generation settings shaped as the hub's configs, with token ids of the tiny vocabulary.

    English-only: the forced prefix is given as forced_decoder_ids. Multilingual: language and task
    tokens come from lang_to_id/task_to_id, and the no-timestamps token follows them. The
    suppressed token 16 and the end token (suppressed at the first free position, as in Whisper's
    configs) would otherwise be generated there.
    """
    settings = dict(
        decoder_start_token_id=WHISPER_START,
        eos_token_id=WHISPER_EOS,
        pad_token_id=PAD,
        suppress_tokens=[16, 20],
        begin_suppress_tokens=[WHISPER_EOS, 23],
    )
    if multilingual:
        settings.update(
            is_multilingual=True,
            lang_to_id={"<|en|>": 10, "<|de|>": 11},
            task_to_id={"transcribe": 12, "translate": 13},
            no_timestamps_token_id=14,
        )
    else:
        settings.update(forced_decoder_ids=[[1, 14]])
    return transformers.GenerationConfig(**settings)


# (case, num_beams, generation config, generate() keyword arguments for both implementations)
GENERATION_CASES = {
    "t5-v1.1-greedy": ("t5-v1.1", 1, lambda: t5_generation_config("v1.1", T5_GREEDY_EOS), {}),
    "t5-v1.0-beam": (
        "t5-v1.0",
        3,
        lambda: t5_generation_config("v1.0", T5_BEAM_EOS),
        {"length_penalty": 1.5, "early_stopping": "never"},
    ),
    "whisper-greedy": ("whisper", 1, lambda: whisper_generation_config(multilingual=False), {}),
    "whisper-beam": (
        "whisper",
        3,
        lambda: whisper_generation_config(multilingual=True),
        {"language": "<|de|>", "task": "translate", "length_penalty": 0.6, "early_stopping": True},
    ),
}


@pytest.mark.parametrize("generation_case", GENERATION_CASES)
def test_generation_matches_transformers(generation_case):
    name, num_beams, make_generation_config, extra = GENERATION_CASES[generation_case]
    pair = pair_for(name)
    _, padded = pair.batches
    inputs = pair.encoder_inputs(padded)
    generation_config = make_generation_config()

    def reference_generate(params, inputs):
        return pair.reference.generate(
            **inputs,
            params=params,
            generation_config=copy.deepcopy(generation_config),  # Flax Whisper writes its forced prefix into it
            max_length=MAX_LENGTH,
            num_beams=num_beams,
            **extra,
        ).sequences

    expected = jax.jit(reference_generate)(pair.params, inputs)
    options = generation.generation_kwargs(generation_config, max_length=MAX_LENGTH, num_beams=num_beams, **extra)
    actual = generation.generate(pair.module, pair.params, inputs, **options)
    assert actual.shape == (BATCH, MAX_LENGTH)
    np.testing.assert_array_equal(actual, expected)
    assert np.any(actual == generation_config.eos_token_id)  # the end-of-sequence handling did run


def test_generate_compiles_once_per_shape(monkeypatch):
    pair = pair_for("t5-v1.1")
    traces = []
    greedy_search = generation._greedy_search
    monkeypatch.setattr(generation, "_greedy_search", lambda *args: traces.append(1) or greedy_search(*args))
    module = MODULES[("t5", "seq2seq-lm")](config=pair.config)  # a new module: nothing compiled for it yet
    options = dict(max_length=6, decoder_start_token_id=PAD, eos_token_id=EOS)
    _, padded = pair.batches
    inputs = pair.encoder_inputs(padded)

    first = generation.generate(module, pair.params, inputs, **options)
    other_tokens = {**inputs, "input_ids": (inputs["input_ids"] + 1) * inputs["attention_mask"]}
    second = generation.generate(module, pair.params, other_tokens, **options)
    assert len(traces) == 1
    assert not np.array_equal(first, second)
    generation.generate(module, pair.params, {name: value[:2] for name, value in inputs.items()}, **options)
    assert len(traces) == 2  # a new batch size is a new shape


def test_generation_kwargs_build_whisper_prefix():
    english = generation.generation_kwargs(whisper_generation_config(multilingual=False), max_length=9)
    assert english["forced_decoder_ids"] == [[1, 14]]
    assert english["begin_suppress_tokens"] == [WHISPER_EOS, 23]
    assert english["max_length"] == 9
    multilingual = whisper_generation_config(multilingual=True)
    german = generation.generation_kwargs(multilingual, language="german", task="translate")
    assert german["forced_decoder_ids"] == [(1, 11), (2, 13), (3, 14)]
    detected = generation.generation_kwargs(multilingual)
    assert detected["forced_decoder_ids"] == [(1, None), (2, 12), (3, 14)]
    with pytest.raises(ValueError, match="timestamps"):
        generation.generation_kwargs(multilingual, return_timestamps=True)
