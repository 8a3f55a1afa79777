"""Rematerialisation (`--gradient_checkpointing`): every family's layers, the same losses and gradients,
less temporary memory.

Each fixture model computes a loss and its gradients with and without `modeling.rematerialised`
(dropout on, same key): they agree to float32 rounding, and the model did build rematerialised
layers. XLA's memory analysis of the gradients of a GPT-2-shaped model at sequence length 1024
shows the temporary memory remat saves (where this jax's CPU compiler keeps remat at all); a
script with `--gradient_checkpointing` logs the losses of the run without it.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, MODELS, read_log
from flax_finetune import arguments, models, modeling
from test_language_modeling import clm

# One fixture per module that builds layers (the others share these modules' layer classes).
FIXTURE_TASKS = {
    "tiny-roberta": "token-classification", "tiny-distilbert": "token-classification", "tiny-electra": "masked-lm",
    "tiny-albert": "masked-lm", "tiny-roformer": "question-answering", "tiny-deberta-v3": "sequence-classification",
    "tiny-modernbert": "masked-lm", "tiny-gpt2": "causal-lm", "tiny-bart": "seq2seq-lm", "tiny-mt5": "seq2seq-lm",
    "tiny-whisper": "speech-seq2seq", "tiny-gemma2": "causal-lm", "tiny-gpt-neo": "causal-lm",
    "tiny-opt": "sequence-classification",
}


def gradients(model, task: str, policy):
    """(loss, gradients) of the mean squared logits, dropout on, under `policy` (None: no remat)."""
    inputs = models.example_inputs(model.config, task)

    def loss(params, rng):
        with modeling.rematerialised(policy) as layers:
            output = model(params, dropout_rng=rng, train=True, **inputs)
        assert policy is None or layers, "the model built no rematerialised layer"
        return sum(jnp.square(logits).mean() for logits in (output.logits, output.start_logits) if logits is not None)

    return jax.jit(jax.value_and_grad(loss))(model.params, jax.random.PRNGKey(1))


@pytest.mark.parity
@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("folder", list(FIXTURE_TASKS))
def test_rematerialised_layers_give_the_same_gradients(folder):
    task = FIXTURE_TASKS[folder]
    model = models.load(str(MODELS / folder), task)
    (loss, grads), (remat_loss, remat_grads) = gradients(model, task, None), gradients(model, task, "nothing_saveable")
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for expected, actual in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(remat_grads)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)


def temporary_bytes(config, task: str, length: int, policy) -> int:
    """XLA's temporary memory for the gradients of a `task` model's mean logit, batch 4 x `length`."""
    module = models.module_class(config, task)(config=config)
    params = jax.eval_shape(models.init_function(module, config, task), jax.random.PRNGKey(0))
    ids = jax.ShapeDtypeStruct((4, length), jnp.int32)

    def loss(params, ids):
        with modeling.rematerialised(policy):
            return module.apply({"params": params}, input_ids=ids, deterministic=True).logits.mean()

    return jax.jit(jax.grad(loss)).lower(params, ids).compile().memory_analysis().temp_size_in_bytes


def compiler_keeps_remat() -> bool:
    """Whether this XLA's CPU compiler keeps `jax.checkpoint` (some drop its barriers and store everything)."""

    def chain(weights, hidden, remat):
        step = lambda weight, hidden: hidden + jnp.tanh(hidden @ weight)  # noqa: E731
        for weight in weights:
            hidden = (jax.checkpoint(step) if remat else step)(weight, hidden)
        return hidden.sum()

    weights = [jax.ShapeDtypeStruct((256, 256), jnp.float32)] * 4
    hidden = jax.ShapeDtypeStruct((1024, 256), jnp.float32)
    sizes = [jax.jit(jax.grad(chain), static_argnums=2).lower(weights, hidden, remat).compile().memory_analysis()
             for remat in (False, True)]
    return None not in sizes and sizes[1].temp_size_in_bytes < sizes[0].temp_size_in_bytes


def test_remat_lowers_temporary_memory():
    """A 4-layer GPT-2 at sequence length 1024 (n_embd 256): remat must at least halve the temporary
    memory (measured with jax 0.12: GPT-2 small, batch 4 x 1024, 12.1 GB -> 1.7 GB)."""
    if not compiler_keeps_remat():
        pytest.skip(f"jax {jax.__version__}'s CPU compiler shows no saving even for a plain jax.checkpoint chain "
                    "(it drops the remat, or reports no temporary memory)")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=1024, vocab_size=512)
    plain = temporary_bytes(config, "causal-lm", 1024, None)
    remat = temporary_bytes(config, "causal-lm", 1024, "nothing_saveable")
    assert remat < 0.5 * plain, (plain, remat)


def test_policies_are_the_flag_choices():
    flag = arguments.TrainingArguments.__dataclass_fields__["remat_policy"]
    assert typing.get_args(typing.get_type_hints(arguments.TrainingArguments)[flag.name]) == modeling.REMAT_POLICIES


def test_gradient_checkpointing_trains_like_the_plain_run(tmp_path):
    def losses(name, *flags):
        output = tmp_path / name
        clm().main(["--model_name_or_path", str(MODELS / "tiny-gpt2"), "--train_file",
                    str(DATA / "prose" / "train.txt"), "--do_train", "--block_size", "32",
                    "--max_train_samples", "8", "--per_device_train_batch_size", "8", "--max_steps", "5",
                    "--logging_steps", "1", "--learning_rate", "1e-3", "--output_dir", str(output),
                    "--report_to", "jsonl", "--disable_tqdm", *flags])
        return [record["train_loss"] for record in read_log(output) if "train_loss" in record]

    np.testing.assert_allclose(losses("remat", "--gradient_checkpointing"), losses("plain"), rtol=1e-5)
