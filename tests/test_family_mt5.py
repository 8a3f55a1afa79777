"""mT5 and UMT5 (conditional generation): parity, generation, the tiny fixtures and a training smoke.

Both are this project's T5 module configured by model type (flax_finetune.modeling.t5.VARIANTS):
mT5 is T5 v1.1 with its own lm_head; UMT5 gives every block its own relative position table.
Parity: mT5 against Transformers 4.x's FlaxMT5ForConditionalGeneration (logits, AdamW steps,
greedy and beam tokens), both against the PyTorch classes (logits, AdamW steps; UMT5's greedy
tokens against PyTorch's generate). The tiny configs have a few buckets and a short range, so
that the 10-token rows reach the logarithmic buckets and the last one.
"""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest

import family_checks
from conftest import MODELS, read_results
from flax_finetune import models
from flax_finetune.modeling import generation
from learning import assert_fine_tuning_learned, evaluation_only
from test_summarization import BARS, summarization, summarization_command, trivial_summary_scores

transformers = pytest.importorskip("transformers")

PAD, EOS = 0, 1
MAX_LENGTH = 12
# End-of-sequence tokens that the random models do generate, so that sequences end at different
# lengths, some before the length limit and some not at all (found by running them).
MT5_GREEDY_EOS, MT5_BEAM_EOS, UMT5_GREEDY_EOS = 30, 30, 93


def tiny_config(model_type: str, **overrides):
    """A tiny mT5 / UMT5 config: gated GELU, separate lm_head, one encoder and two decoder blocks for
    mT5 (as T5 v1.1 allows), two and two for UMT5 (so that a second block's own table counts)."""
    config_class = {"mt5": transformers.MT5Config, "umt5": transformers.UMT5Config}[model_type]
    settings = dict(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_heads=4,
        num_layers=1 if model_type == "mt5" else 2,
        num_decoder_layers=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        layer_norm_epsilon=1e-3,  # far from the default: a wrong epsilon shows in the logits
        dropout_rate=0.0,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    return config_class(**{**settings, **overrides})


def random_model(model_type: str, config, seed: int = 0):
    """This project's module for `config` with random parameters (family_checks.random_params)."""
    module = models.module_class(config, "seq2seq-lm")(config=config)
    shapes = jax.eval_shape(models.init_function(module, config, "seq2seq-lm"), jax.random.PRNGKey(0))
    return module, family_checks.random_params(shapes, seed)


def encoder_inputs(batch: dict) -> dict:
    return {name: value for name, value in batch.items() if not name.startswith("decoder_")}


# --------------------------------------------------------------------------- parity with Transformers' Flax mT5


@pytest.mark.parity
@family_checks.needs_flax("FlaxMT5ForConditionalGeneration")
@pytest.mark.usefixtures("parity_settings")
def test_mt5_matches_transformers_flax():
    config = tiny_config("mt5")
    family_checks.check_flax_parity(
        "mt5", "seq2seq-lm", config, "FlaxMT5ForConditionalGeneration", family_checks.seq2seq_batches(config)
    )


@pytest.mark.parity
@family_checks.needs_flax("FlaxMT5ForConditionalGeneration")
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("num_beams, eos_token_id, extra", [
    (1, MT5_GREEDY_EOS, {}),
    (3, MT5_BEAM_EOS, {"length_penalty": 1.5, "early_stopping": "never"}),
])
def test_mt5_generation_matches_transformers_flax(num_beams, eos_token_id, extra):
    config = tiny_config("mt5")
    module, params = random_model("mt5", config)
    reference = transformers.FlaxMT5ForConditionalGeneration(config, _do_init=False)
    _, padded = family_checks.seq2seq_batches(config)
    inputs = encoder_inputs(padded)
    generation_config = transformers.GenerationConfig.from_model_config(config)
    generation_config.eos_token_id = eos_token_id

    def reference_generate(params, inputs):
        return reference.generate(**inputs, params=params, generation_config=copy.deepcopy(generation_config),
                                  max_length=MAX_LENGTH, num_beams=num_beams, **extra).sequences

    expected = jax.jit(reference_generate)(params, inputs)
    options = generation.generation_kwargs(generation_config, max_length=MAX_LENGTH, num_beams=num_beams, **extra)
    actual = generation.generate(module, params, inputs, **options)
    np.testing.assert_array_equal(actual, expected)
    finished = np.any(np.asarray(actual) == eos_token_id, axis=1)
    assert finished.any() and not finished.all()  # some rows end early, some run to the limit


# --------------------------------------------------------------------------- parity with Transformers' PyTorch classes

TORCH_CLASSES = {"mt5": "MT5ForConditionalGeneration", "umt5": "UMT5ForConditionalGeneration"}


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("model_type, overrides", [
    ("mt5", {}),
    ("umt5", {}),
    ("umt5", {"tie_word_embeddings": True}),  # shared embedding as output layer, rescaled
])
def test_matches_transformers_pytorch(model_type, overrides, tmp_path):
    config = tiny_config(model_type, **overrides)
    family_checks.check_pytorch_parity(
        model_type, "seq2seq-lm", config, TORCH_CLASSES[model_type], family_checks.seq2seq_batches(config), tmp_path
    )


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
def test_umt5_greedy_tokens_match_pytorch_generate(tmp_path):
    torch = family_checks.needs_torch()
    config = tiny_config("umt5", eos_token_id=UMT5_GREEDY_EOS)
    module, params = random_model("umt5", config)
    models.Model(module, params, config).save(params, str(tmp_path))
    reference = transformers.UMT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    _, padded = family_checks.seq2seq_batches(config)
    inputs = encoder_inputs(padded)
    with torch.no_grad():
        expected = reference.generate(
            **{name: torch.from_numpy(np.asarray(value, np.int64)) for name, value in inputs.items()},
            max_length=MAX_LENGTH, num_beams=1, do_sample=False,
        ).numpy()
    model = models.load(str(tmp_path), "seq2seq-lm")
    actual = np.asarray(model.generate(model.params, inputs, max_length=MAX_LENGTH, num_beams=1))
    # PyTorch stops once every row has ended; the rest of ours is padding
    np.testing.assert_array_equal(actual[:, : expected.shape[1]], expected)
    assert np.all(actual[:, expected.shape[1]:] == PAD)
    finished = np.any(actual == UMT5_GREEDY_EOS, axis=1)
    assert finished.any() and not finished.all()


# --------------------------------------------------------------------------- the tiny fixtures

FIXTURES = {"mt5": "tiny-mt5", "umt5": "tiny-umt5"}


@pytest.mark.parametrize("model_type", FIXTURES)
def test_fixture_loads_with_its_tokenizer_and_every_weight(model_type, package_log):
    """The fixture's tokenizer (saved as T5TokenizerFast; Transformers 5 loads UMT5's as its generic
    TokenizersBackend) encodes as its tokenizer.json says, and every parameter comes from the file
    (in Transformers 5, too, where the config claims tied embeddings)."""
    from tokenizers import Tokenizer

    folder = MODELS / FIXTURES[model_type]
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5TokenizerFast"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Ada met Hugo at the harbour."
    ids = tokenizer(text)["input_ids"]
    assert ids == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    assert ids[-1] == EOS and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Ada met Hugo at the harbour."
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 3

    model = models.load(str(folder), "seq2seq-lm")
    assert model.config.model_type == model_type
    assert "newly initialised" not in package_log.text and "not used by" not in package_log.text
    assert model.params["lm_head"]["kernel"].shape == (model.config.d_model, model.config.vocab_size)
    second_block = model.params["encoder"]["block"]["1"]["layer"]["0"]["SelfAttention"]
    assert ("relative_attention_bias" in second_block) == (model_type == "umt5")


@pytest.mark.parametrize("model_type", FIXTURES)
def test_summarization_smoke_trains(model_type, tmp_path):
    family_checks.smoke_losses("seq2seq-lm", MODELS / FIXTURES[model_type], tmp_path)


# --------------------------------------------------------------------------- learning check

# From random weights, 15 epochs at a higher learning rate than the pretrained tiny-t5's 20 at 2e-3
# (measured: ROUGE-1 94-96, ROUGE-2 88-91 on the test split).
FROM_SCRATCH = ("--num_train_epochs=15", "--learning_rate=5e-3", "--max_target_length=24")


@pytest.mark.family_learning
@pytest.mark.parametrize("model_type", FIXTURES)
def test_fine_tuning_from_scratch_learns_to_summarize(model_type, tmp_path):
    """The summarization test's bars, trivial summaries and margins, for a randomly initialised fixture."""
    model = ("--model_name_or_path", str(MODELS / FIXTURES[model_type]))
    command = [*summarization_command(tmp_path / "trained", *model), *FROM_SCRATCH]
    summarization().main(evaluation_only([*summarization_command(tmp_path / "start", *model), *FROM_SCRATCH]))
    summarization().main(command)

    test = read_results(tmp_path / "trained", "test")
    assert_fine_tuning_learned(BARS, {"test_loss": 1.0, "test_rouge1": 20, "test_rouge2": 20},
                               baseline=trivial_summary_scores(), starting=read_results(tmp_path / "start", "test"),
                               trained=test)
    predictions = (tmp_path / "trained" / "generated_predictions.txt").read_text().splitlines()
    assert len(predictions) == 16 and all(" met " in line for line in predictions)
