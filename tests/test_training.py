"""The training machinery on a toy model: loss contract, accumulation, schedule, decay mask, compile once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_finetune import data, losses, training
from flax_finetune.errors import InputError
from flax_finetune.arguments import TrainingArguments
from flax_finetune.outputs import OutputDir
from flax_finetune.trainer import Trainer


def toy_params(features=3, classes=2):
    rng = np.random.default_rng(0)
    return {"dense": {"kernel": jnp.asarray(rng.normal(size=(features, classes)), jnp.float32),
                      "bias": jnp.zeros((classes,), jnp.float32)}}


def toy_loss(params, batch, dropout_rng):
    logits = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
    return losses.cross_entropy(logits, batch["y"], batch["example_mask"])


def toy_rows(n=10, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return data.ArrayRows({"x": x, "y": (x[:, 0] > 0).astype(np.int32)})


def args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  learning_rate=0.1, num_train_epochs=2, logging_steps=1, save_steps=0, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def test_padding_rows_do_not_change_loss_or_gradients():
    rows = toy_rows(3)
    params = toy_params()
    real = data.gather(rows, np.array([0, 1, 2]))
    padded = data.gather(rows, np.array([0, 1, 2, -1, -1]))
    assert padded["example_mask"].tolist() == [1, 1, 1, 0, 0]

    def mean_loss(p, batch):
        loss_sum, count = toy_loss(p, batch, None)
        return loss_sum / count

    for expected, actual in zip(
        jax.tree_util.tree_leaves(jax.value_and_grad(mean_loss)(params, real)),
        jax.tree_util.tree_leaves(jax.value_and_grad(mean_loss)(params, padded)),
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_loss_is_averaged_over_items_not_batches():
    """Two batches with 1 and 3 real tokens weigh each token equally (sum / count)."""
    logits = jnp.zeros((2, 3, 4))
    labels = jnp.zeros((2, 3), jnp.int32)
    weights = jnp.array([[1, 0, 0], [1, 1, 1]], jnp.float32)
    loss_sum, count = losses.cross_entropy(logits, labels, weights)
    assert float(count) == 4
    np.testing.assert_allclose(float(loss_sum / count), np.log(4), rtol=1e-6)
    per_example_sum, per_example_count = losses.cross_entropy(logits, labels, weights, per_example=True)
    assert per_example_count.tolist() == [1, 3]
    np.testing.assert_allclose(per_example_sum, np.log(4) * np.array([1, 3]), rtol=1e-6)


def test_label_smoothing_scores_a_perfect_prediction_zero():
    logits = jnp.log(jnp.array([[0.05, 0.9, 0.05]]))  # exactly the smoothed target of label 1
    loss_sum, _ = losses.cross_entropy(logits, jnp.array([1]), jnp.ones(1), label_smoothing=0.1)
    np.testing.assert_allclose(float(loss_sum), 0.0, atol=1e-5)
    worse, _ = losses.cross_entropy(logits, jnp.array([0]), jnp.ones(1), label_smoothing=0.1)
    assert float(worse) > 1.0


def test_gradient_accumulation_matches_one_big_batch():
    mesh = training.data_mesh()
    schedule = training.linear_schedule(0.1, 0, 10)
    optimizer = training.make_optimizer(args("unused"), schedule)
    rows = toy_rows(8)
    batch = data.gather(rows, np.arange(8)[None, :])  # [1, 8]
    split = data.gather(rows, np.arange(8).reshape(2, 4))  # [2, 4]
    split["example_mask"][1, 3] = 0.0  # uneven counts: 4 + 3 real rows
    batch["example_mask"][0, 7] = 0.0
    rng = jax.random.PRNGKey(0)
    one = training.make_train_step(toy_loss, optimizer, schedule, mesh, micro_batches=1)
    two = training.make_train_step(toy_loss, optimizer, schedule, mesh, micro_batches=2)
    state_one, metrics_one = one(training.init_state(toy_params(), optimizer, mesh), training.put_batch(batch, mesh), rng)
    state_two, metrics_two = two(training.init_state(toy_params(), optimizer, mesh), training.put_batch(split, mesh), rng)
    np.testing.assert_allclose(metrics_two["loss"], metrics_one["loss"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state_one.params), jax.tree_util.tree_leaves(state_two.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    schedule = training.linear_schedule(1.0, warmup_steps=4, total_steps=12)
    values = [float(schedule(step)) for step in range(13)]
    np.testing.assert_allclose(values[:5], [0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(values[4:], np.linspace(1.0, 0.0, 9), atol=1e-6)
    no_warmup = training.linear_schedule(2.0, warmup_steps=0, total_steps=4)
    np.testing.assert_allclose([float(no_warmup(s)) for s in range(5)], [2, 1.5, 1, 0.5, 0], atol=1e-6)


def test_decay_mask_skips_biases_and_normalisation_weights():
    bert_like = {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": 1}, "LayerNorm": {"scale": 1, "bias": 1}},
            "encoder": {"layer": {"0": {"attention": {"self": {"query": {"kernel": 1, "bias": 1}}}}}},
        },
        "classifier": {"kernel": 1, "bias": 1},
    }
    mask = training.decay_mask(bert_like)
    assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"] is True
    assert mask["bert"]["embeddings"]["LayerNorm"] == {"scale": False, "bias": False}
    assert mask["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"] == {"kernel": True, "bias": False}
    assert mask["classifier"] == {"kernel": True, "bias": False}
    gpt2_like = {"transformer": {"h": {"0": {"ln_1": {"scale": 1, "bias": 1}, "mlp": {"c_fc": {"kernel": 1}}}},
                                 "ln_f": {"scale": 1}}}
    mask = training.decay_mask(gpt2_like)
    assert mask["transformer"]["h"]["0"]["ln_1"] == {"scale": False, "bias": False}
    assert mask["transformer"]["ln_f"]["scale"] is False
    assert mask["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"] is True
    t5_like = {"encoder": {"final_layer_norm": {"weight": 1}, "block": {"0": {"layer": {"0": {"layer_norm": {"weight": 1}}}}}}}
    mask = training.decay_mask(t5_like)
    assert mask["encoder"]["final_layer_norm"]["weight"] is False
    assert mask["encoder"]["block"]["0"]["layer"]["0"]["layer_norm"]["weight"] is False


def test_weight_decay_leaves_biases_alone():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    optimizer = training.make_optimizer(args("unused", weight_decay=0.5), training.linear_schedule(1.0, 0, 100))
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0.0


def test_each_step_function_compiles_once(tmp_path):
    """10 rows in batches of 4: the last batch is partial, yet train and predict each trace once."""
    traces = {"loss": 0, "predict": 0}

    def counting_loss(params, batch, rng):
        traces["loss"] += 1
        return toy_loss(params, batch, rng)

    def counting_predict(params, batch):
        traces["predict"] += 1
        return {"predictions": jnp.argmax(batch["x"] @ params["dense"]["kernel"], -1), "labels": batch["y"]}

    output = OutputDir(str(tmp_path), overwrite=False)
    output.create()
    trainer = Trainer(args(tmp_path, eval_steps=2), output, counting_loss, counting_predict)
    rows = toy_rows(10)
    accuracy = lambda outputs, split: {"accuracy": float(np.mean(outputs["predictions"] == outputs["labels"]))}
    params = trainer.train(toy_params(), rows, eval_rows=toy_rows(7, seed=2), compute_metrics=accuracy)
    trainer.evaluate(params, toy_rows(7, seed=2), accuracy)
    assert traces == {"loss": 1, "predict": 1}
    outputs = trainer.predict(params, toy_rows(7, seed=2))
    assert outputs["predictions"].shape == (7,)  # padding rows removed, dataset order kept
    np.testing.assert_array_equal(outputs["labels"], toy_rows(7, seed=2).columns["y"])


def test_training_learns_the_toy_task_and_logs_every_step(tmp_path):
    output = OutputDir(str(tmp_path), overwrite=False)
    output.create()
    predict = lambda params, batch: {"predictions": jnp.argmax(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"], -1),
                                     "labels": batch["y"]}
    trainer = Trainer(args(tmp_path, num_train_epochs=20, learning_rate=0.3), output, toy_loss, predict)
    accuracy = lambda outputs, split: {"accuracy": float(np.mean(outputs["predictions"] == outputs["labels"]))}
    params = trainer.train(toy_params(), toy_rows(64))
    assert trainer.evaluate(params, toy_rows(64, seed=5), accuracy)["eval_accuracy"] >= 0.9
    steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "train_loss" in line]
    assert len(steps) == 20 * 16  # 64 rows / batch 4 = 16 steps per epoch, --logging_steps 1


def test_zero_training_steps_is_an_input_error(tmp_path):
    from flax_finetune.errors import InputError

    output = OutputDir(str(tmp_path), overwrite=False)
    trainer = Trainer(args(tmp_path, num_train_epochs=0), output, toy_loss, lambda p, b: {})
    with pytest.raises(InputError, match="no training steps"):
        trainer.train(toy_params(), toy_rows(4))


def test_mesh_flag_names_axis_sizes_and_fills_the_missing_one():
    assert training.mesh_shape("", 8) == {"data": 8, "fsdp": 1}
    assert training.mesh_shape("fsdp:8", 8) == {"data": 1, "fsdp": 8}
    assert training.mesh_shape("data:2", 8) == {"data": 2, "fsdp": 4}
    assert training.mesh_shape("data:2,fsdp:4", 8) == {"data": 2, "fsdp": 4}
    for wrong in ("data:3", "fsdp:2,data:2", "tensor:8", "data", "data:0,fsdp:8", "data:2,data:4"):
        with pytest.raises(InputError, match="--mesh"):
            training.mesh_shape(wrong, 8)


def test_state_is_split_over_fsdp_along_its_largest_divisible_axis():
    assert training.fsdp_axis((64, 32), 4) == 0
    assert training.fsdp_axis((30, 32), 4) == 1  # 30 is larger but not divisible
    assert training.fsdp_axis((32, 32), 4) == 0
    assert training.fsdp_axis((37,), 4) is None and training.fsdp_axis((), 4) is None
    assert training.fsdp_axis((64, 32), 1) is None


def test_time_spent_waiting_for_input_is_measured(tmp_path):
    """Rows that take 0.1 s to load make the step (microseconds) wait for them; rows in memory do not."""
    import json
    import time

    class SlowRows:
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def take(self, indices, epoch=0):
            time.sleep(0.1)
            return self.rows.take(indices, epoch)

    fractions = {}
    for name, rows in {"slow": SlowRows(toy_rows(32)), "in memory": toy_rows(32)}.items():
        output = OutputDir(str(tmp_path / name), overwrite=False)
        output.create()
        Trainer(args(tmp_path / name, num_train_epochs=1, logging_steps=8), output, toy_loss,
                lambda p, b: {}).train(toy_params(), rows)
        results = json.loads((tmp_path / name / "train_results.json").read_text())
        fractions[name] = results["train_input_wait_fraction"]
        if name == "slow":
            assert results["train_input_wait_seconds"] >= 8 * 0.1 * 0.5  # 8 batches, up to 2 made ahead
    assert fractions["slow"] > 0.3 > fractions["in memory"]
