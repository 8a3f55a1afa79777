"""LoRA (`--lora_rank`): adapter sizes, the intercepted forward pass, training only the adapters,
the scripts' PEFT-format output, and (torch session) PEFT loading that output with the same logits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA, MODELS, load_script, read_log, read_results
from flax_finetune import arguments, lora, losses, modeling, models, training
from flax_finetune.errors import InputError


@pytest.fixture(scope="module")
def llama():
    return models.load(str(MODELS / "tiny-llama"), "causal-lm")


def random_adapters(adaptation: lora.Adaptation, params, seed: int = 1) -> tuple[dict, dict]:
    """(frozen, trainable) with every adapter's b random too (at init b is zero, which hides errors)."""
    frozen, trainable = adaptation.split(params, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(trainable["adapters"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    trainable["adapters"] = jax.tree_util.tree_unflatten(
        tree, [leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    )
    return frozen, trainable


@pytest.mark.parametrize("flags, message", [
    (["--merge_lora"], "--merge_lora needs --lora_rank"),
    (["--lora_target_modules", "q_proj"], "--lora_target_modules needs --lora_rank"),
    (["--lora_rank", "-1"], "--lora_rank must not be negative"),
    (["--lora_rank", "8", "--lora_dropout", "1"], "--lora_dropout must be in"),
    (["--lora_rank", "8", "--lora_alpha", "0"], "--lora_alpha must be positive"),
])
def test_bad_lora_flags_are_input_errors(flags, message):
    with pytest.raises(InputError, match=message):
        arguments.parse_args([arguments.TrainingArguments], ["--output_dir", "out", *flags])


def test_target_names_that_match_no_layer_are_input_errors(llama):
    with pytest.raises(InputError, match=r"qq_proj matches no linear layer.*named .*down_proj.*q_proj"):
        lora.Adaptation.create(llama, "causal-lm", lora.Settings(4, target_modules="q_proj,qq_proj"))


def test_targets_default_to_peft_choice_and_all_linear_skips_the_output_head(llama):
    default = lora.Adaptation.create(llama, "causal-lm", lora.Settings(4))
    assert {path[-1] for path in default.targets} == {"q_proj", "v_proj"}
    assert len(default.targets) == 2 * llama.config.num_hidden_layers
    every = lora.Adaptation.create(llama, "causal-lm", lora.Settings(4, target_modules="all-linear"))
    assert {path[-1] for path in every.targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    assert len(every.targets) == 7 * llama.config.num_hidden_layers  # no lm_head


def test_trainable_parameters_and_optimizer_state_are_the_adapters_only(llama):
    rank = 4
    adaptation = lora.Adaptation.create(llama, "causal-lm", lora.Settings(rank, target_modules="q_proj,v_proj,down_proj"))
    frozen, trainable = adaptation.split(llama.params, jax.random.PRNGKey(0))
    expected = sum(rank * (layer.features_in + layer.features_out) for layer in adaptation.targets.values())
    trained, total = adaptation.counts(frozen, trainable)
    assert trained == expected
    assert total == expected + sum(leaf.size for leaf in jax.tree_util.tree_leaves(llama.params))
    args = arguments.parse_args([arguments.TrainingArguments], ["--output_dir", "out"])[0]
    schedule = training.linear_schedule(1e-3, 0, 10)
    state = training.init_state(trainable, training.make_optimizer(args, schedule), training.data_mesh())
    optimizer_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.opt_state))
    assert 2 * 4 * expected <= optimizer_bytes <= 2 * 4 * expected + 64  # AdamW's mu and nu, plus step counters


@pytest.mark.usefixtures("parity_settings")
@pytest.mark.parametrize("policy", [None, "nothing_saveable"])
def test_adapted_forward_equals_merged_parameters_and_starts_at_the_base(llama, policy):
    """The layers are found by their scope path also inside rematerialised layers."""
    adaptation = lora.Adaptation.create(llama, "causal-lm", lora.Settings(4, alpha=8, target_modules="all-linear"))
    inputs = {"input_ids": jnp.asarray(np.arange(24).reshape(2, 12) % llama.config.vocab_size, jnp.int32)}

    @jax.jit
    def adapted_logits(frozen, trainable):
        with modeling.rematerialised(policy) as layers, lora.applied(adaptation, trainable["adapters"]):
            logits = llama(adaptation.full_params(frozen, trainable), **inputs).logits
        assert policy is None or layers
        return logits

    @jax.jit
    def logits(params):
        return llama(params, **inputs).logits

    base = logits(llama.params)
    at_init = adapted_logits(*adaptation.split(llama.params, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(at_init, base)
    frozen, trainable = random_adapters(adaptation, llama.params)
    adapted = adapted_logits(frozen, trainable)
    assert float(jnp.abs(adapted - base).max()) > 1e-2
    np.testing.assert_allclose(logits(adaptation.merged(frozen, trainable)), adapted, atol=1e-5)


@pytest.mark.usefixtures("parity_settings")
def test_training_moves_only_the_adapters_and_lowers_the_loss(llama):
    """The base goes into the step as an argument and comes out unchanged; merging changes only the targets."""
    adaptation = lora.Adaptation.create(llama, "causal-lm", lora.Settings(8, alpha=16, dropout=0.1))
    ids = np.arange(4 * 16).reshape(1, 4, 16) % 50 + 3

    def loss_fn(params, batch, rng):
        logits = llama(params, input_ids=batch["input_ids"], dropout_rng=rng, train=True).logits
        labels = batch["input_ids"][:, 1:]
        return losses.cross_entropy(logits[:, :-1], labels, jnp.ones(labels.shape))

    mesh = training.data_mesh()
    base, trainable = adaptation.split(llama.params, jax.random.PRNGKey(0))
    frozen = training.shard_params(base, mesh)
    args = SimpleNamespace(adafactor=False, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0)
    schedule = training.linear_schedule(1e-2, 0, 100)
    optimizer = training.make_optimizer(args, schedule)
    state = training.init_state(trainable, optimizer, mesh)
    step = training.make_train_step(
        adaptation.loss(loss_fn), optimizer, schedule, mesh, 1, jax.tree_util.tree_map(lambda leaf: leaf.sharding, state),
        frozen_layout=jax.tree_util.tree_map(lambda leaf: leaf.sharding, frozen),
    )
    batch = training.put_batch({"input_ids": ids.astype(np.int32)}, mesh)
    trained_losses = []
    for _ in range(8):
        state, metrics = step(state, batch, jax.random.PRNGKey(3), frozen)
        trained_losses.append(float(metrics["loss"]))
    assert trained_losses[-1] < trained_losses[0] - 0.1
    merged = jax.tree_util.tree_map(np.asarray, adaptation.merge_step(mesh, frozen, state.params)(frozen, state.params))
    for path, leaf in jax.tree_util.tree_leaves_with_path(llama.params):
        names = tuple(key.key for key in path)
        changed = not np.array_equal(leaf, _leaf(merged, names))
        assert changed == (names[:-1] in adaptation.targets), names
        np.testing.assert_array_equal(_leaf(jax.device_get(frozen), names), leaf)


def _leaf(tree, names):
    for name in names:
        tree = tree[name]
    return np.asarray(tree)


def clm_lora(output_dir, *flags):
    return [
        "--model_name_or_path", str(MODELS / "tiny-llama"),
        "--train_file", str(DATA / "prose" / "train.txt"),
        "--do_train",
        "--block_size", "64",
        "--per_device_train_batch_size", "4",
        "--max_steps", "24",
        "--learning_rate", "2e-2",
        "--logging_steps", "4",
        "--lora_rank", "8",
        "--lora_target_modules", "all-linear",
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
        "--disable_tqdm",
        *flags,
    ]


def test_clm_script_trains_saves_and_resumes_a_peft_adapter(tmp_path, llama):
    from safetensors.numpy import load_file

    script = load_script("language-modeling/run_clm_flax.py")
    first = tmp_path / "first"
    script.main(clm_lora(first, "--merge_lora", "--save_steps", "12", "--do_eval", "--eval_steps", "12",
                         "--validation_file", str(DATA / "prose" / "validation.txt"), "--max_eval_samples", "8"))
    evaluated = [record["eval_loss"] for record in read_log(first) if "eval_loss" in record]
    assert len(evaluated) == 2 and evaluated[-1] < np.log(llama.config.vocab_size)  # at step 12 and at the end
    train_losses = [record["train_loss"] for record in read_log(first) if "train_loss" in record]
    assert train_losses[-1] < train_losses[0] - 0.1
    results = read_results(first, "train")
    layers = llama.config.num_hidden_layers
    # rank 8 on q, o: 64 -> 64; k, v: 64 -> 32 (2 key/value heads of 16); gate, up: 64 -> 128; down: 128 -> 64
    per_layer = 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert results["train_trainable_parameters"] == layers * per_layer
    assert results["train_optimizer_state_bytes"] <= 2 * 4 * layers * per_layer + 64
    config = json.loads((first / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], len(config["target_modules"])) == (
        "LORA", "CAUSAL_LM", 8, 7 * layers)
    adapter = load_file(first / "adapter_model.safetensors")
    assert adapter["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 8)
    assert len(adapter) == 2 * 7 * layers
    # --merge_lora: the full model, which scored the evaluation
    merged = models.load(str(first), "causal-lm")
    delta = merged.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] - \
        llama.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    a, b = (adapter[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{name}.weight"] for name in "AB")
    np.testing.assert_allclose(delta, (16 / 8) * (b @ a).T, atol=1e-6)

    resumed = tmp_path / "resumed"
    # jaxlib 0.4.26 can crash running a resumed step read back from the persistent cache
    script.main(clm_lora(resumed, "--resume_from_checkpoint", str(first / "checkpoints" / "checkpoint_12"),
                         "--compilation_cache_dir", "none"))
    assert not (resumed / "model.safetensors").exists()
    again = load_file(resumed / "adapter_model.safetensors")
    for key, value in adapter.items():
        np.testing.assert_allclose(again[key], value, atol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------- PEFT round trip (torch session)

TORCH_CLASSES = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification"}


@pytest.mark.pytorch
@pytest.mark.parametrize("folder, task, targets", [
    ("tiny-llama", "causal-lm", "q_proj,v_proj,down_proj"),
    ("tiny-gpt2", "causal-lm", "c_attn,c_fc"),  # Conv1D: PEFT's fan_in_fan_out
    ("tiny-roberta", "sequence-classification", None),  # a new head: PEFT's modules_to_save
])
def test_peft_loads_the_adapter_with_our_logits(tmp_path, folder, task, targets):
    from family_checks import needs_torch

    torch = needs_torch()
    peft = pytest.importorskip("peft")
    import transformers
    from safetensors.numpy import load_file

    model = models.load(str(MODELS / folder), task)
    adaptation = lora.Adaptation.create(model, task, lora.Settings(4, alpha=8, target_modules=targets))
    frozen, trainable = random_adapters(adaptation, model.params)
    adaptation.save(str(tmp_path / "adapter"), trainable, str(MODELS / folder))
    merged = adaptation.merged(frozen, trainable)
    model.save(merged, str(tmp_path / "merged"))
    ids = np.arange(20).reshape(2, 10) % 40 + 3
    ours = np.asarray(model(merged, input_ids=jnp.asarray(ids, jnp.int32)).logits)

    base = getattr(transformers, TORCH_CLASSES[task]).from_pretrained(MODELS / folder, torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = adapted(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    unloaded = {key: value.numpy() for key, value in adapted.merge_and_unload().state_dict().items()}
    written = load_file(tmp_path / "merged" / "model.safetensors")
    for key, value in written.items():
        np.testing.assert_allclose(unloaded[key], value, atol=1e-5, err_msg=key)
