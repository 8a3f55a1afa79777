"""The checks every model family goes through: parity with Transformers, export, and a training smoke.

A family's test file (tests/test_family_<family>.py) calls these with its own tiny configs:

- `check_flax_parity`: the same random parameters in this project's module and in Transformers
  4.x's Flax class give the same tree, the same logits (with and without right padding) and the
  same losses over three AdamW steps. Needs Transformers' Flax classes (`needs_flax`).
- `check_pytorch_parity`: random parameters of this project's module, saved by `Model.save`, load
  in Transformers' PyTorch class with no missing or unexpected key and give the same logits on
  real tokens and the same losses over three AdamW steps (torch.optim.AdamW against optax.adamw,
  which update alike). Needs torch (`needs_torch`; the `torch` nox session sets
  FLAX_FINETUNE_REQUIRE_TORCH, where a missing torch is an error, not a skip).
- `smoke_losses`: the task's script trains the family's fixture model for a few steps on one
  repeated batch and the logged training loss goes down.

The three AdamW steps run for a family's language-model head (`TRAINED_TASKS`; a test can ask for
them elsewhere with `train=True`): the other heads sit on the same backbone, so their logits on
random parameters are what is left to compare, and the steps were most of each check's time.

Each parity check returns its figures (largest logit difference, losses) and appends them to
$FLAX_FINETUNE_PARITY_REPORT (JSON Lines) when that is set: the README's figures come from there.
Shapes: B = 3 rows of L = 10 tokens; padded rows hold 10, 7 and 2 real tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import DATA, adamw_losses, load_script, read_log, skip_where_the_reference_is_broken
from flax_finetune import models
from flax_finetune.modeling import MODULES, checkpoint_io, family

ATOL = RTOL = 1e-5
TRAINED_TASKS = ("masked-lm", "causal-lm", "seq2seq-lm")
BATCH, LENGTH = 3, 10
LENGTHS = (10, 7, 2)
TARGET_LENGTH = 7
TARGET_LENGTHS = (7, 5, 2)
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 0.01


def _transformers():
    return pytest.importorskip("transformers")


def needs_flax(class_name: str):
    """Skip mark for tests that need Transformers' Flax class `class_name` (Transformers 4.x only)."""
    import transformers

    return pytest.mark.skipif(
        not hasattr(transformers, class_name), reason=f"parity needs Transformers' {class_name} (4.x) as the reference"
    )


def needs_config(model_type: str):
    """Skip mark for tests of a family whose config class the installed Transformers lacks (e.g.
    ModernBERT before 4.48): that cell cannot read the family's checkpoints at all."""
    import transformers

    return pytest.mark.skipif(
        model_type not in transformers.CONFIG_MAPPING,
        reason=f"Transformers {transformers.__version__} has no {model_type} config",
    )


def needs_torch():
    """torch; a skip where it is missing (an error under FLAX_FINETUNE_REQUIRE_TORCH). Call it before
    building a config that only a Transformers version with torch (5.x) accepts."""
    if os.environ.get("FLAX_FINETUNE_REQUIRE_TORCH"):
        import torch

        return torch
    return pytest.importorskip("torch")


# --------------------------------------------------------------------------- parameters and batches


def shape_tree(params) -> dict:
    """Flattened path -> shape of a parameter (or shape) tree."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _is_norm_scale(path: tuple) -> bool:
    return path[-1] == "scale" or (path[-1] == "weight" and len(path) > 1 and "norm" in path[-2].lower())


def random_params(tree, seed: int) -> dict:
    """Random float32 values for every leaf of a (shape) tree: N(0, 0.2); norm scales 1 + N(0, 0.1).

    Biases and norm parameters are random too, so a misplaced one shows in the logits."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    values = {}
    for path, leaf in sorted(flat.items()):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        values[path] = jnp.asarray(1.0 + 0.1 * noise if _is_norm_scale(path) else 0.2 * noise)
    return flax.traverse_util.unflatten_dict(values)


def _padding_mask(lengths, length: int) -> np.ndarray:
    return (np.arange(length)[None, :] < np.array(lengths)[:, None]).astype(np.int32)


def _token_ids(rng, config, shape) -> np.ndarray:
    """Ids from 4 up: never a padding, start or end id of the tiny configs."""
    return rng.integers(4, config.vocab_size, size=shape).astype(np.int32)


def encoder_batches(config, token_types: bool = False) -> tuple[dict, dict]:
    """(unmasked, right-padded) inputs: input_ids [B, L] (and attention_mask, token_type_ids)."""
    rng = np.random.default_rng(0)
    input_ids = _token_ids(rng, config, (BATCH, LENGTH))
    mask = _padding_mask(LENGTHS, LENGTH)
    unmasked = {"input_ids": input_ids}
    masked = {"input_ids": np.where(mask == 1, input_ids, config.pad_token_id).astype(np.int32), "attention_mask": mask}
    if token_types:  # two segments
        token_type_ids = (np.arange(LENGTH)[None, :] >= np.array([4, 3, 1])[:, None]).astype(np.int32)
        unmasked["token_type_ids"] = token_type_ids
        masked["token_type_ids"] = token_type_ids * mask
    return unmasked, masked


def seq2seq_batches(config) -> tuple[dict, dict]:
    """(unmasked, right-padded) inputs: input_ids, attention_mask [B, L]; decoder_input_ids,
    decoder_attention_mask [B, 7] (the first decoder token is the decoder start token)."""
    unmasked, masked = encoder_batches(config)
    rng = np.random.default_rng(1)
    decoder_ids = _token_ids(rng, config, (BATCH, TARGET_LENGTH))
    decoder_ids[:, 0] = config.decoder_start_token_id
    decoder_mask = _padding_mask(TARGET_LENGTHS, TARGET_LENGTH)
    unmasked = {**unmasked, "attention_mask": np.ones_like(unmasked["input_ids"]), "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": np.ones_like(decoder_ids)}
    masked = {**masked, "decoder_input_ids": np.where(decoder_mask == 1, decoder_ids, config.pad_token_id).astype(np.int32),
              "decoder_attention_mask": decoder_mask}
    return unmasked, masked


def targets(task: str, config, inputs: dict) -> dict:
    """Random labels for `task_loss`."""
    rng = np.random.default_rng(2)
    if task == "sequence-classification":
        return {"labels": rng.integers(0, config.num_labels, size=(BATCH,))}
    if task == "token-classification":
        return {"labels": rng.integers(0, config.num_labels, size=(BATCH, LENGTH))}
    if task == "question-answering":
        return {"start": rng.integers(0, 3, size=(BATCH,)), "end": rng.integers(0, 3, size=(BATCH,)) + 1}
    if task == "seq2seq-lm":
        return {"labels": rng.integers(0, config.vocab_size, size=inputs["decoder_input_ids"].shape)}
    return {"labels": rng.integers(0, config.vocab_size, size=(BATCH, LENGTH))}


def _token_weights(task: str, inputs: dict, xp) -> Any:
    """1.0 where a token-level loss counts (real tokens), from the inputs' masks."""
    if task == "seq2seq-lm":
        mask = inputs.get("decoder_attention_mask")
        ids = inputs["decoder_input_ids"]
    else:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
    if mask is None:
        return xp.ones(tuple(ids.shape))
    return mask * 1.0


def task_loss(task: str, logits: dict, inputs: dict, target: dict):
    """Mean cross-entropy of a head's outputs (jax): token losses over real tokens only."""
    ce = optax.softmax_cross_entropy_with_integer_labels
    if task == "question-answering":
        return (ce(logits["start_logits"], target["start"]).mean() + ce(logits["end_logits"], target["end"]).mean()) / 2
    if task == "sequence-classification":
        return ce(logits["logits"], target["labels"]).mean()
    weights = _token_weights(task, inputs, jnp)
    return (ce(logits["logits"], target["labels"]) * weights).sum() / weights.sum()


def _torch_task_loss(torch, task: str, logits: dict, inputs: dict, target: dict):
    """`task_loss` in torch, on torch tensors."""
    def ce(scores, labels):
        return torch.nn.functional.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1), reduction="none")

    if task == "question-answering":
        return (ce(logits["start_logits"], target["start"]).mean() + ce(logits["end_logits"], target["end"]).mean()) / 2
    if task == "sequence-classification":
        return ce(logits["logits"], target["labels"]).mean()
    weights = _token_weights(task, inputs, torch).reshape(-1).to(torch.float32)
    return (ce(logits["logits"], target["labels"]) * weights).sum() / weights.sum()


def logit_fields(outputs) -> dict:
    """The logits of an Output, a Transformers Flax output or a PyTorch output, by name."""
    names = ("start_logits", "end_logits") if getattr(outputs, "start_logits", None) is not None else ("logits",)
    return {name: getattr(outputs, name) for name in names}


def _real_token_error(expected: dict, actual: dict, task: str, inputs: dict) -> float:
    """Largest |difference| of the logits, over real tokens only for token-level outputs; asserts the tolerance."""
    weights = np.asarray(_token_weights(task, inputs, np)) > 0
    worst = 0.0
    for name in expected:
        reference, own = np.asarray(expected[name], np.float32), np.asarray(actual[name], np.float32)
        assert own.shape == reference.shape, (name, own.shape, reference.shape)
        if task != "sequence-classification" and own.ndim >= 2 and own.shape[:2] == weights.shape:
            reference, own = reference[weights], own[weights]
        np.testing.assert_allclose(own, reference, atol=ATOL, rtol=RTOL, err_msg=name)
        worst = max(worst, float(np.max(np.abs(own - reference))))
    return worst


def _module(model_type: str, task: str, config):
    models.modules()
    return MODULES[(model_type, task)](config=config)


def _own_logits(module, params, inputs: dict) -> dict:
    return logit_fields(module.apply({"params": params}, **inputs, deterministic=True))


def _jax_inputs(inputs: dict) -> dict:
    return {name: jnp.asarray(value) for name, value in inputs.items()}


def _jax_training_losses(forward, task: str, params, inputs: dict, target: dict) -> list[float]:
    return adamw_losses(lambda p: task_loss(task, forward(p, inputs), inputs, target), params)


def _record(model_type: str, task: str, reference: str, figures: dict) -> None:
    """Append a parity check's figures to $FLAX_FINETUNE_PARITY_REPORT (JSON Lines), when set."""
    path = os.environ.get("FLAX_FINETUNE_PARITY_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"test": test, "model_type": model_type, "task": task, "reference": reference,
                                     **figures}) + "\n")


# --------------------------------------------------------------------------- parity with Transformers' Flax classes


@contextlib.contextmanager
def _runnable_reference(flax_class_name: str):
    """Skip where Transformers' Flax class cannot run on this jax: in Transformers 4.40 some classes
    (RoFormer's attention, several question-answering heads) call Array.split, which jax lacks."""
    try:
        yield
    except AttributeError as error:
        if "has no attribute split" not in str(error) and "has no attribute 'split'" not in str(error):
            raise
        pytest.skip(f"no reference: Transformers' {flax_class_name} calls Array.split, which jax {jax.__version__} lacks")


def check_flax_parity(model_type: str, task: str, config, flax_class_name: str, batches, *, seed: int = 0,
                      train: Optional[bool] = None) -> dict:
    """This project's module against Transformers' Flax class on the same random parameters.

    Asserts the same parameter tree, logits within 1e-5 on every batch of `batches` and (with
    `train`) the same losses over three AdamW steps on the last batch. Returns
    {"max_logit_error": float, "losses": [ours], "reference_losses": [theirs]}."""
    train = task in TRAINED_TASKS if train is None else train
    transformers = _transformers()
    skip_where_the_reference_is_broken(flax_class_name)
    with _runnable_reference(flax_class_name):
        reference = getattr(transformers, flax_class_name)(config, _do_init=False)
        reference_tree = jax.eval_shape(lambda rng: reference.init_weights(rng, (1, 4)), jax.random.PRNGKey(0))
    module = _module(model_type, task, config)
    example = _jax_inputs(batches[-1])
    own_tree = jax.eval_shape(lambda rng: module.init(rng, **example)["params"], jax.random.PRNGKey(0))
    assert shape_tree(own_tree) == shape_tree(reference_tree)
    params = random_params(reference_tree, seed)

    def reference_logits(params, inputs):
        return logit_fields(reference(**inputs, params=params, train=False))

    def own_logits(params, inputs):
        return _own_logits(module, params, inputs)

    worst = 0.0
    for inputs in batches:
        inputs = _jax_inputs(inputs)
        with _runnable_reference(flax_class_name):
            expected = jax.jit(reference_logits)(params, inputs)
        worst = max(worst, _real_token_error(expected, jax.jit(own_logits)(params, inputs), task, inputs))
    figures = {"max_logit_error": worst}
    if train:
        inputs = _jax_inputs(batches[-1])
        target = _jax_inputs(targets(task, config, inputs))
        expected = _jax_training_losses(reference_logits, task, params, inputs, target)
        actual = _jax_training_losses(own_logits, task, params, inputs, target)
        assert expected[-1] < expected[0]  # the steps do train
        np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)
        figures.update(losses=actual, reference_losses=expected)
    _record(model_type, task, flax_class_name, figures)
    return figures


# --------------------------------------------------------------------------- parity with Transformers' PyTorch classes


def check_pytorch_parity(model_type: str, task: str, config, torch_class_name: str, batches, tmp_path: Path, *,
                         seed: int = 0, train: Optional[bool] = None, architecture: Optional[str] = None) -> dict:
    """Random parameters of this project's module, saved by `Model.save`, against Transformers' PyTorch class.

    The saved folder must load with no missing and no unexpected key; logits on real tokens
    within 1e-5 on every batch; with `train`, three AdamW steps give the same losses within 1e-5.
    Returns {"max_logit_error": float, "losses": [ours], "reference_losses": [theirs]}."""
    train = task in TRAINED_TASKS if train is None else train
    torch = needs_torch()
    transformers = _transformers()
    module = _module(model_type, task, config)
    example = _jax_inputs(batches[-1])
    params = random_params(jax.eval_shape(lambda rng: module.init(rng, **example)["params"], jax.random.PRNGKey(0)), seed)
    config.architectures = [architecture or torch_class_name]
    models.Model(module, params, config).save(params, str(tmp_path))
    reference, loading = getattr(transformers, torch_class_name).from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    reference = reference.to(torch.float32).eval()

    def reference_logits(inputs):
        return logit_fields(reference(**{name: torch.from_numpy(np.asarray(value, np.int64)) for name, value in inputs.items()}))

    worst = 0.0
    for inputs in batches:
        with torch.no_grad():
            expected = {name: value.numpy() for name, value in reference_logits(inputs).items()}
        worst = max(worst, _real_token_error(expected, _own_logits(module, params, _jax_inputs(inputs)), task, inputs))
    figures = {"max_logit_error": worst}
    if train:
        inputs = batches[-1]
        target = targets(task, config, inputs)
        actual = _jax_training_losses(lambda p, x: _own_logits(module, p, x), task, params, _jax_inputs(inputs),
                                      _jax_inputs(target))
        _freeze_constants(reference, model_type, config, params)
        expected = _torch_training_losses(torch, reference, task, inputs, target)
        assert expected[-1] < expected[0]  # the steps do train
        np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL)
        figures.update(losses=actual, reference_losses=expected)
    _record(model_type, task, torch_class_name, figures)
    return figures


def _freeze_constants(reference, model_type: str, config, params) -> None:
    """Stop PyTorch from training what this project holds as constants: the family's skipped keys and
    written constants (sinusoidal position tables) that `params` has no parameter for. Transformers 5's
    from_pretrained leaves such tables of RoFormer, Pegasus and Marian trainable, although a freshly
    built model has them frozen. A skipped key that is a parameter here (DeBERTa-v2's absolute
    positions, skipped only for v3 checkpoints) keeps training on both sides."""
    declared = family(model_type)
    ends = declared.skipped_pytorch_keys + tuple(declared.pytorch_constants(config) if declared.pytorch_constants else ())
    ours = set(checkpoint_io.flax_to_pytorch(params, model_type))
    for name, parameter in reference.named_parameters():
        if name not in ours and any(name == end or name.endswith("." + end) for end in ends):
            parameter.requires_grad_(False)


def _torch_training_losses(torch, reference, task: str, inputs: dict, target: dict, steps: int = 3) -> list[float]:
    """Losses of `steps` torch.optim.AdamW steps on one batch (the settings of conftest.adamw_losses)."""
    # eval mode (no dropout) keeps the forward deterministic, as on the Flax side; gradients flow alike
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    tensors = {name: torch.from_numpy(np.asarray(value, np.int64)) for name, value in inputs.items()}
    labels = {name: torch.from_numpy(np.asarray(value, np.int64)) for name, value in target.items()}
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _torch_task_loss(torch, task, logit_fields(reference(**tensors)), tensors, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------- training smoke through the scripts

# task -> (script, the fixture data flags); the data are small slices of the fixture datasets
SMOKE_SCRIPTS = {
    "sequence-classification": ("text-classification/run_flax_glue.py", [
        "--train_file", str(DATA / "paraphrase" / "train.csv"), "--max_seq_length", "64"]),
    "token-classification": ("token-classification/run_flax_ner.py", [
        "--train_file", str(DATA / "entities" / "train.json"), "--max_seq_length", "64"]),
    "question-answering": ("question-answering/run_qa.py", [
        "--train_file", str(DATA / "squad" / "train.json"), "--version_2_with_negative",
        "--max_seq_length", "96", "--doc_stride", "32"]),
    "masked-lm": ("language-modeling/run_mlm_flax.py", [
        "--train_file", str(DATA / "prose" / "train.txt"), "--max_seq_length", "32"]),
    "causal-lm": ("language-modeling/run_clm_flax.py", [
        "--train_file", str(DATA / "prose" / "train.txt"), "--block_size", "32"]),
    "seq2seq-lm": ("summarization/run_summarization_flax.py", [
        "--train_file", str(DATA / "summaries" / "train.json"), "--max_source_length", "64",
        "--max_target_length", "24"]),
}
SMOKE_BATCH = 8
# How far the loss must fall in the smoke, per task: the mean of the last three logged losses must be
# below this fraction of the first. One batch seen again each step is memorised (tiny-bert text
# classification: 0.70 -> 0.12 in 30 steps at 1e-3; a model that learns nothing stays near 0.69),
# except in masked LM, whose script masks other tokens at every step: there the loss falls from about
# ln(vocabulary) (6.2-6.4 for the fixtures) toward the unigram level (measured at 5e-3, mean of the
# last three over the first: tiny-bert 0.63, tiny-roberta 0.71, tiny-modernbert 0.76).
SMOKE_FALL = {"masked-lm": 0.85}
SMOKE_LEARNING_RATE = {"masked-lm": 5e-3}


def smoke_losses(task: str, fixture: Path, tmp_path: Path, *, steps: int = 30, learning_rate: Optional[float] = None,
                 extra: tuple = ()) -> list[float]:
    """Train `fixture` with `task`'s script for `steps` steps on one batch of 8 examples, seen again
    each step (--max_train_samples 8 = one batch per epoch); return the logged training losses.

    Asserts that the script logged one finite loss per step and that the last three average under
    `SMOKE_FALL` of the first (half, for most tasks): the script's inputs, loss, gradients and
    optimizer all work with this family. `learning_rate`: 1e-3 unless the task has its own."""
    learning_rate = learning_rate or SMOKE_LEARNING_RATE.get(task, 1e-3)
    script, data = SMOKE_SCRIPTS[task]
    output = tmp_path / f"smoke-{task}"
    load_script(script).main([
        "--model_name_or_path", str(fixture), "--output_dir", str(output), *data,
        "--do_train", "--max_train_samples", str(SMOKE_BATCH), "--per_device_train_batch_size", str(SMOKE_BATCH),
        "--max_steps", str(steps), "--logging_steps", "1", "--learning_rate", str(learning_rate),
        "--warmup_steps", "0", "--seed", "0", "--report_to", "jsonl", "--disable_tqdm", *extra,
    ])
    losses = [record["train_loss"] for record in read_log(output) if "train_loss" in record]
    assert len(losses) == steps, losses
    assert np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < SMOKE_FALL.get(task, 0.5) * losses[0], losses
    return losses
