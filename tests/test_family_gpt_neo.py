"""GPT-Neo (flax_finetune.modeling.gpt_neo): parity, smoke, learning.

Tiny configs: hidden 32, 4 heads, layers global then local with a window of 4, shorter than the
batches' 10 tokens and the generated 16, so that the local layer's reach shows in the logits and
in the key/value cache; unscaled attention scores as GPT-Neo has them. Parity against
FlaxGPTNeoForCausalLM (4.57) and the PyTorch classes; greedy generation from left-padded prompts
(test_generation_decoder's) against FlaxGPTNeoForCausalLM.generate.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import family_checks
from conftest import DATA, MODELS, read_results
from flax_finetune import models
from flax_finetune.modeling import checkpoint_io
from learning import assert_fine_tuning_learned, evaluation_only, text_baselines
from test_generation_decoder import MAX_LENGTH, PROMPT_LENGTH, prompt
from test_language_modeling import BARS, clm, clm_command

transformers = pytest.importorskip("transformers")

FIXTURE = MODELS / "tiny-gpt-neo"
WINDOW = 4


def tiny_config(**overrides):
    settings = dict(
        vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=WINDOW, intermediate_size=37, max_position_embeddings=64, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=3,
    )
    return transformers.GPTNeoConfig(**{**settings, **overrides})


CASES = {"tied": {}, "untied-relu": {"tie_word_embeddings": False, "activation_function": "relu"}}
TRAINED_CASES = ("tied",)  # three AdamW steps per family are enough: the other cases compare logits only


@pytest.mark.parity
@family_checks.needs_flax("FlaxGPTNeoForCausalLM")
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("case", CASES)
def test_causal_lm_matches_flax(case):
    config = tiny_config(**CASES[case])
    figures = family_checks.check_flax_parity("gpt_neo", "causal-lm", config, "FlaxGPTNeoForCausalLM",
                                              family_checks.encoder_batches(config), train=case in TRAINED_CASES)
    assert figures["max_logit_error"] <= family_checks.ATOL


def assert_greedy_matches_flax(config, flax_class, seed: int) -> np.ndarray:
    """Model.generate's greedy tokens [3, MAX_LENGTH] equal those of Transformers' Flax `flax_class`
    on the same random parameters, from test_generation_decoder's left-padded prompt; returns them."""
    reference = flax_class(config, _do_init=False)
    shapes = jax.eval_shape(lambda rng: reference.init_weights(rng, (1, 4)), jax.random.PRNGKey(0))
    params = family_checks.random_params(shapes, seed)
    inputs = prompt()
    expected = jax.jit(lambda params, ids, mask: reference.generate(
        ids, attention_mask=mask, params=params, max_length=MAX_LENGTH, num_beams=1).sequences
    )(params, inputs["input_ids"], inputs["attention_mask"])
    model = models.from_config(config, "causal-lm")
    actual = np.asarray(model.generate(params, inputs, max_length=MAX_LENGTH, num_beams=1))
    np.testing.assert_array_equal(actual[:, :PROMPT_LENGTH], inputs["input_ids"])
    np.testing.assert_array_equal(actual, expected)
    return actual


@pytest.mark.parity
@family_checks.needs_flax("FlaxGPTNeoForCausalLM")
@pytest.mark.usefixtures("parity_settings")
def test_greedy_generation_matches_flax():
    assert_greedy_matches_flax(tiny_config(), transformers.FlaxGPTNeoForCausalLM, seed=3)


@pytest.mark.pytorch
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("task, torch_class", [("causal-lm", "GPTNeoForCausalLM"),
                                               ("sequence-classification", "GPTNeoForSequenceClassification")])
def test_matches_pytorch(task, torch_class, tmp_path):
    config = tiny_config()
    figures = family_checks.check_pytorch_parity("gpt_neo", task, config, torch_class,
                                                 family_checks.encoder_batches(config), tmp_path)
    assert figures["max_logit_error"] <= family_checks.ATOL


def assert_causal_lm_learns(fixture, tmp_path) -> None:
    """`fixture` (random weights) through test_language_modeling's run_clm_flax command (block 128,
    2 epochs): perplexity below GPT-2's bar, which the starting checkpoint and a unigram model of
    the training text fail."""
    def command(output_dir):
        arguments = clm_command(output_dir)
        arguments[arguments.index("--model_name_or_path") + 1] = str(fixture)
        return arguments

    clm().main(evaluation_only(command(tmp_path / "start")))
    clm().main(command(tmp_path / "trained"))
    _, unigram = text_baselines(fixture, DATA / "prose" / "train.txt", DATA / "prose" / "validation.txt")
    assert_fine_tuning_learned(BARS, {"eval_loss": 2.0}, baseline={"eval_perplexity": unigram},
                               starting=read_results(tmp_path / "start"), trained=read_results(tmp_path / "trained"))


@pytest.mark.family_learning
def test_fine_tuning_lowers_perplexity(tmp_path):
    assert_causal_lm_learns(FIXTURE, tmp_path)


# the smoke's 8 prose lines make 21 blocks of 32 tokens (3 batches); 3 lines make the one repeated batch it means
ONE_BATCH = ("--max_train_samples", "3")


def test_causal_lm_smoke(tmp_path):
    family_checks.smoke_losses("causal-lm", FIXTURE, tmp_path, learning_rate=1e-2, extra=ONE_BATCH)


def own_logits(task: str, config, *batches: dict, seed: int = 4) -> list[np.ndarray]:
    """Our `task` module's logits on each of `batches` (one shape: one compilation), random parameters from `seed`."""
    module = models.module_class(config, task)(config=config)
    shapes = jax.eval_shape(lambda rng: module.init(rng, **batches[0])["params"], jax.random.PRNGKey(0))
    params = family_checks.random_params(shapes, seed)
    apply = jax.jit(lambda inputs: module.apply({"params": params}, **inputs).logits)
    return [np.asarray(apply(inputs)) for inputs in batches]


def test_classifier_without_pad_id_reads_the_mask():
    """With no pad_token_id (GPT-Neo's default, where Transformers takes the last position and
    refuses batches), each right-padded row is scored at its last real token: other padding
    tokens change nothing."""
    config = tiny_config(pad_token_id=None)
    _, padded = family_checks.encoder_batches(tiny_config())
    repadded = {**padded, "input_ids": np.where(padded["attention_mask"] == 1, padded["input_ids"], 7)}
    first, second = own_logits("sequence-classification", config, padded, repadded)
    np.testing.assert_allclose(first, second, atol=1e-6)
    last_position = own_logits("sequence-classification", config, {"input_ids": repadded["input_ids"]})[0]
    assert np.abs(last_position - second).max(axis=1)[1:].min() > 1e-3  # padded rows' last positions score otherwise


def test_old_checkpoints_causal_mask_buffers_are_skipped(tmp_path):
    """EleutherAI's GPT-Neo checkpoints hold each layer's `attn.attention.bias` / `masked_bias`
    buffers: skipped on reading, neither unexpected nor in the tree."""
    from safetensors.numpy import load_file, save_file

    model = models.load(str(FIXTURE), "causal-lm")
    model.save(model.params, str(tmp_path))
    tensors = load_file(tmp_path / "model.safetensors")
    for layer in range(model.config.num_layers):
        tensors[f"transformer.h.{layer}.attn.attention.bias"] = np.tril(np.ones((1, 1, 4, 4), np.float32))
        tensors[f"transformer.h.{layer}.attn.attention.masked_bias"] = np.array(-1e9, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    params, missing, unexpected = checkpoint_io.read_params(tmp_path, model.params, "transformer", "gpt_neo")
    assert not missing and not unexpected
    assert family_checks.shape_tree(params) == family_checks.shape_tree(model.params)


def test_sequence_classification_smoke(tmp_path):
    """The GLUE script on a tokenizer without a padding token: it pads with the end token."""
    family_checks.smoke_losses("sequence-classification", FIXTURE, tmp_path)
