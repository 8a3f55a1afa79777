"""Decoder-only generation (`generation.generate` through `prefill` / `decode_step`) with GPT-2.

A tiny random GPT-2 (n_embd 32, 2 layers, 4 heads, vocabulary 99) generates from a LEFT-padded
prompt of 6 tokens (6, 4 and 2 real ones): greedy and 4-beam tokens equal Transformers 4.x's
FlaxGPT2LMHeadModel.generate on the same parameters, and greedy tokens equal Transformers'
PyTorch GPT2LMHeadModel.generate on the parameters saved by `Model.save`. `generate` compiles
once per input shape; `Model.generate` takes its end and padding ids from the model's
generation config. The end token of each case is one that these random models generate, so
that rows end at different lengths, some well before the length limit (found by running them).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from family_checks import needs_flax, random_params
from flax_finetune import models
from flax_finetune.modeling import MODULES, generation

pytestmark = pytest.mark.usefixtures("parity_settings")

transformers = pytest.importorskip("transformers")

PAD, BOS = 0, 1
PROMPT_LENGTH, REAL_TOKENS = 6, (6, 4, 2)
MAX_LENGTH = 16
EOS = 86  # greedy: ends row 0 after 8 tokens, row 2 after 2; row 1 never ends
SEED = 2


def gpt2_config():
    return transformers.GPT2Config(
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=BOS, eos_token_id=EOS
    )


_model = {}


def model() -> models.Model:
    """The random GPT-2 of every test (built once): Model with params, and its prompt inputs."""
    if not _model:
        built = models.from_config(gpt2_config(), "causal-lm")
        shapes = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), built.params)
        built.params = random_params(shapes, SEED)
        _model["model"] = built
    return _model["model"]


def prompt() -> dict:
    """Left-padded prompt: input_ids and attention_mask int32 [3, PROMPT_LENGTH]."""
    ids = np.random.default_rng(0).integers(4, 99, size=(len(REAL_TOKENS), PROMPT_LENGTH)).astype(np.int32)
    mask = (np.arange(PROMPT_LENGTH)[None, :] >= PROMPT_LENGTH - np.array(REAL_TOKENS)[:, None]).astype(np.int32)
    return {"input_ids": np.where(mask == 1, ids, PAD).astype(np.int32), "attention_mask": mask}


def own_generate(num_beams: int, **settings) -> np.ndarray:
    gpt2 = model()
    options = {"max_length": MAX_LENGTH, "num_beams": num_beams, "eos_token_id": EOS, "pad_token_id": PAD, **settings}
    return np.asarray(generation.generate(gpt2.module, gpt2.params, prompt(), **options))


def assert_rows_end_differently(sequences: np.ndarray):
    """Rows end (with EOS, or at the length limit) at different lengths, one well before the limit:
    the end handling did run."""
    generated = sequences[:, PROMPT_LENGTH:] == EOS
    ends = np.where(generated.any(axis=1), generated.argmax(axis=1), MAX_LENGTH)
    assert ends.min() < MAX_LENGTH - PROMPT_LENGTH - 1 and len(set(ends)) > 1


@pytest.mark.parity
@needs_flax("FlaxGPT2LMHeadModel")
@pytest.mark.parametrize(
    "num_beams, settings",
    [(1, {"min_length": 9}), (4, {"length_penalty": 1.5, "early_stopping": "never"})],
    ids=["greedy", "beam"],
)
def test_generation_matches_flax_transformers(num_beams, settings):
    gpt2 = model()
    reference = transformers.FlaxGPT2LMHeadModel(gpt2.config, _do_init=False)
    inputs = prompt()

    def reference_generate(params, input_ids, attention_mask):
        return reference.generate(
            input_ids, attention_mask=attention_mask, params=params, max_length=MAX_LENGTH, num_beams=num_beams,
            eos_token_id=EOS, pad_token_id=PAD, **settings,
        ).sequences

    expected = jax.jit(reference_generate)(gpt2.params, inputs["input_ids"], inputs["attention_mask"])
    actual = own_generate(num_beams, **settings)
    assert actual.shape == (len(REAL_TOKENS), MAX_LENGTH)
    np.testing.assert_array_equal(actual[:, :PROMPT_LENGTH], inputs["input_ids"])
    np.testing.assert_array_equal(actual, expected)
    assert_rows_end_differently(actual)


@pytest.mark.pytorch
def test_greedy_matches_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    gpt2 = model()
    gpt2.save(gpt2.params, str(tmp_path))
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    inputs = prompt()
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(inputs["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(inputs["attention_mask"], dtype=torch.long),
            max_length=MAX_LENGTH, do_sample=False, num_beams=1, eos_token_id=EOS, pad_token_id=PAD,
        ).numpy()
    actual = own_generate(1)
    np.testing.assert_array_equal(actual, expected)
    assert_rows_end_differently(actual)


def test_generate_compiles_once_per_shape(monkeypatch):
    gpt2 = model()
    traces = []
    greedy_search = generation._greedy_search
    monkeypatch.setattr(generation, "_greedy_search", lambda *args: traces.append(1) or greedy_search(*args))
    module = MODULES[("gpt2", "causal-lm")](config=gpt2.config)  # a new module: nothing compiled for it yet
    options = dict(max_new_tokens=3, eos_token_id=EOS)
    inputs = prompt()

    first = generation.generate(module, gpt2.params, inputs, **options)
    other_tokens = {**inputs, "input_ids": (inputs["input_ids"] + 1) * inputs["attention_mask"]}
    second = generation.generate(module, gpt2.params, other_tokens, **options)
    assert len(traces) == 1
    assert first.shape == (len(REAL_TOKENS), PROMPT_LENGTH + 3)
    assert not np.array_equal(first, second)
    shorter = {name: value[:, 2:] for name, value in inputs.items()}
    assert generation.generate(module, gpt2.params, shorter, **options).shape == (len(REAL_TOKENS), PROMPT_LENGTH + 1)
    assert len(traces) == 2  # a new prompt length is a new shape


def test_model_generate_reads_the_generation_config(tmp_path):
    """A causal LM gets a generation config from its model config, where padding falls back to the
    end token (as in Transformers), or from the checkpoint's generation_config.json."""
    gpt2 = model()
    assert gpt2.generation_config.eos_token_id == EOS and gpt2.generation_config.pad_token_id is None
    inputs = prompt()
    sequences = np.asarray(gpt2.generate(gpt2.params, inputs, max_length=MAX_LENGTH))
    expected = own_generate(1).copy()  # padded with PAD after the end token
    generated = expected[:, PROMPT_LENGTH:]
    after_end = np.cumsum(generated == EOS, axis=1) - (generated == EOS) > 0
    assert after_end.any()
    expected[:, PROMPT_LENGTH:] = np.where(after_end, EOS, generated)
    np.testing.assert_array_equal(sequences, expected)

    gpt2.save(gpt2.params, str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5, "max_new_tokens": 2, "num_beams": 3}))
    loaded = models.load(str(tmp_path), "causal-lm")
    options = generation.generation_kwargs(loaded.generation_config)
    assert {name: options[name] for name in ("eos_token_id", "max_new_tokens", "num_beams")} == {
        "eos_token_id": 5, "max_new_tokens": 2, "num_beams": 3
    }
    with pytest.raises(ValueError, match="no room"):
        loaded.generate(gpt2.params, {"input_ids": jnp.asarray(inputs["input_ids"])}, max_length=PROMPT_LENGTH)
