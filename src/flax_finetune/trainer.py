"""The training loop every script shares: epochs of steps, evaluation, logging, checkpoints.

A script hands the Trainer its task: `loss_fn(params, batch, dropout_rng) ->
(loss_sum, count)` for training and `predict_fn(params, batch) -> {name:
[batch, ...]}` for evaluation. Batches are dicts of [batch, ...] arrays plus
an `example_mask` column ([batch], 1.0 for real rows, 0.0 for padding) that
both functions must honour.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from flax_finetune import data, training
from flax_finetune.checkpoints import CHECKPOINTS, Checkpoints, find_checkpoint
from flax_finetune.errors import InputError, TrainingStopped
from flax_finetune.outputs import OutputDir
from flax_finetune.progress import progress_bar

logger = logging.getLogger(__name__)

EVAL_BATCHES_PER_CALL = 32
# compute_metrics(outputs, split): predict_fn outputs of every row of a split -> {metric: value}
ComputeMetrics = Callable[[Mapping[str, np.ndarray], str], Mapping[str, float]]


def global_batch_size(args) -> int:
    """Examples per optimizer step: per device x devices (of every process) x accumulation steps."""
    return args.per_device_train_batch_size * jax.device_count() * args.gradient_accumulation_steps


def training_steps(args, num_examples: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of `num_examples` training examples."""
    per_epoch = max(1, math.ceil(num_examples / global_batch_size(args)))
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return per_epoch, total


class DivergenceGuard:
    """Stops training at the first step whose loss is not finite.

    Each step's loss is read one step later, while the device already runs
    the next step, so the check never stalls the pipeline; before a
    checkpoint, a log line and the end of training every step is checked.
    """

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.unchecked: list[tuple[int, Mapping[str, jax.Array]]] = []
        self.last_checkpoint: Optional[Path] = None

    def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self.unchecked.append((step, metrics))
        if len(self.unchecked) > 1:
            self._check(self.unchecked[:-1])
            self.unchecked = self.unchecked[-1:]

    def check(self) -> None:
        self._check(self.unchecked)
        self.unchecked = []

    def _check(self, entries) -> None:
        for step, metrics in entries:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                if self.last_checkpoint is None:
                    advice = "no checkpoint was saved before it (see --save_steps)"
                else:
                    advice = (f"the last good checkpoint is {self.last_checkpoint}: resume from it with "
                              f"--resume_from_checkpoint {self.last_checkpoint} and a lower --learning_rate")
                raise TrainingStopped(
                    f"training stopped: the loss became {loss} at step {step} of {self.total_steps}; {advice}"
                )


class Trainer:
    """Runs a task's jitted steps over fixed-shape batches; see the module docstring."""

    def __init__(
        self, args, output: OutputDir, loss_fn: training.LossFn, predict_fn: training.PredictFn, adaptation: Any = None
    ):
        self.args = args
        self.output = output
        self.loss_fn = loss_fn
        # a `lora.Adaptation` (--lora_rank): train adapters on the frozen params instead of the params
        self.adaptation = adaptation
        # with LoRA, the trained tree (adapters and new heads) of the last checkpoint or the end of training
        self.trainable: Any = None
        self.mesh = training.make_mesh(args.mesh)
        self.predict_step = training.make_predict_step(predict_fn, self.mesh)
        # on_save(step, params): called after each checkpoint (the script exports and pushes there)
        self.on_save: Optional[Callable[[int, Any], None]] = None
        # Bars on a terminal; elsewhere (a log file, CI) a log line every --logging_steps instead.
        self.show_bars = not args.disable_tqdm and sys.stderr.isatty()
        self._last_log_time = time.perf_counter()
        # the last training step, once training ran: final evaluations are logged at it
        self.trained_steps: Optional[int] = None

    def _plan(self, num_examples: int, per_device_batch_size: int, micro_batches: int = 1) -> data.BatchPlan:
        return data.BatchPlan(
            num_examples=num_examples,
            micro_batch_size=per_device_batch_size * jax.device_count(),
            micro_batches=micro_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def total_steps(self, num_examples: int) -> tuple[int, int]:
        """(optimizer steps per epoch, total optimizer steps) for a training split."""
        return training_steps(self.args, num_examples)

    def train(
        self,
        params: Any,
        rows: data.Rows,
        eval_rows: Optional[data.Rows] = None,
        compute_metrics: Optional[ComputeMetrics] = None,
    ) -> Any:
        """Train from `params` on `rows`; returns the final params.

        Logs the mean training loss every `logging_steps`, evaluates on
        `eval_rows` every `eval_steps`, saves a resumable checkpoint every
        `save_steps` and resumes from `resume_from_checkpoint`.
        """
        args = self.args
        entered = time.perf_counter()
        plan = self._plan(len(rows), args.per_device_train_batch_size, args.gradient_accumulation_steps)
        data.warn_if_smaller_than_batch(len(rows), plan.global_batch_size, "train")
        steps_per_epoch, total_steps = self.total_steps(len(rows))
        if total_steps <= 0:
            raise InputError("no training steps: raise --num_train_epochs or --max_steps")
        schedule = training.linear_schedule(args.learning_rate, args.warmup_steps, total_steps)
        optimizer = training.make_optimizer(args, schedule)
        loss_fn, frozen, frozen_layout = self.loss_fn, (), None  # frozen: LoRA's base, the step's 4th argument
        if self.adaptation is not None:
            base, params = self.adaptation.split(params, jax.random.PRNGKey(args.seed))
            frozen = (training.shard_params(base, self.mesh),)
            frozen_layout = jax.tree_util.tree_map(lambda leaf: leaf.sharding, frozen[0])
            loss_fn, merge = self.adaptation.loss(self.loss_fn), self.adaptation.merge_step(self.mesh, base, params)

        def full_params(state: training.TrainState) -> Any:
            """The model's parameters at `state` (with LoRA: the base with the adapters merged in)."""
            return merge(frozen[0], state.params) if frozen else state.params

        state = training.init_state(params, optimizer, self.mesh)
        train_step = training.make_train_step(
            loss_fn, optimizer, schedule, self.mesh, args.gradient_accumulation_steps,
            jax.tree_util.tree_map(lambda leaf: leaf.sharding, state),
            args.remat_policy if args.gradient_checkpointing else None, frozen_layout,
        )
        state_bytes, state_bytes_per_device = training.bytes_per_device(state)
        adapter_results = {} if self.adaptation is None else self._log_adaptation(state, frozen[0])
        dropout_rng = jax.random.PRNGKey(args.seed)
        position = {
            "seed": args.seed,
            "steps_per_epoch": steps_per_epoch,
            "global_batch_size": plan.global_batch_size,
        }
        state = self._maybe_resume(state, position)
        checkpoints = (
            Checkpoints(self.output.path / CHECKPOINTS, args.save_total_limit) if args.save_steps > 0 else None
        )

        logger.info(
            "training: %d examples, %d epochs, global batch %d (%d devices x %d x %d accumulation), %d steps; "
            "process %d loads %d of the %d rows of every batch",
            len(rows), math.ceil(total_steps / steps_per_epoch), plan.global_batch_size, jax.device_count(),
            args.per_device_train_batch_size, args.gradient_accumulation_steps, total_steps,
            plan.process_index, plan.global_batch_size // plan.process_count, plan.global_batch_size,
        )
        logger.info("mesh %s: parameters and optimizer state %.1f MB, at most %.1f MB on one device",
                    dict(self.mesh.shape), state_bytes / 1e6, state_bytes_per_device / 1e6)
        step = int(state.step)
        self.output.truncate_log(step)
        first_step, started = step, time.perf_counter()
        self._last_log_time = started
        pending: list[Mapping[str, jax.Array]] = []
        guard = DivergenceGuard(total_steps)
        first_step_seconds = None  # from entering train() to the first step's result: mostly compilation
        input_wait = 0.0  # seconds the loop waited for the next batch (the prefetch thread fell behind)
        try:
            while step < total_steps:
                epoch, offset = divmod(step, steps_per_epoch)
                batches_left = min(steps_per_epoch, offset + total_steps - step)
                with progress_bar(batches_left, offset, f"epoch {epoch + 1}", not self.show_bars) as bar:
                    batches = data.iterate_batches(rows, plan, args.seed, epoch, offset)
                    while True:
                        waited = time.perf_counter()
                        local = next(batches, None)
                        input_wait += time.perf_counter() - waited
                        if local is None:
                            break
                        state, metrics = train_step(state, training.put_batch(local, self.mesh), dropout_rng, *frozen)
                        step += 1
                        if first_step_seconds is None:
                            jax.block_until_ready(metrics)
                            first_step_seconds = time.perf_counter() - entered
                            logger.info("first step done %.2f s after training started (compilation included)",
                                        first_step_seconds)
                        pending.append(metrics)
                        guard.add(step, metrics)
                        bar.update()
                        if step % args.logging_steps == 0 or step == total_steps:
                            guard.check()
                            record = self._log_training(step, step / steps_per_epoch, pending, plan.global_batch_size)
                            bar.set_postfix(loss=f"{record['train_loss']:.4f}", lr=f"{record['learning_rate']:.2e}")
                            if not self.show_bars:
                                logger.info(
                                    "step %d/%d (epoch %.2f): loss %.4f, learning rate %.3g, %.2f steps/s",
                                    step, total_steps, record["epoch"], record["train_loss"],
                                    record["learning_rate"], record["train_steps_per_second"],
                                )
                            pending = []
                        if eval_rows is not None and args.eval_steps and step % args.eval_steps == 0 and step < total_steps:
                            scores = self.evaluate(full_params(state), eval_rows, compute_metrics, split="eval", write=False)
                            self.output.log({"step": step, "epoch": step / steps_per_epoch, **scores})
                        if checkpoints is not None and step % args.save_steps == 0:
                            guard.check()  # a diverged state is never saved
                            checkpoints.save(step, state, {**position, "step": step, "epoch": epoch})
                            guard.last_checkpoint = checkpoints.path(step)
                            if self.on_save is not None and step < total_steps:  # the end of training follows
                                self._keep_trainable(state)
                                self.on_save(step, training.fetch(full_params(state)))
                        if step >= total_steps:
                            break
                    batches.close()
            guard.check()
        finally:
            if checkpoints is not None:
                checkpoints.wait()
                checkpoints.close()
        runtime = time.perf_counter() - started
        logger.info("training took %.1f s, %.1f s of it (%.1f%%) waiting for input batches",
                    runtime, input_wait, 100 * input_wait / max(runtime, 1e-9))
        examples = (step - first_step) * plan.global_batch_size
        self.output.write_results(
            "train",
            {
                "runtime": runtime,
                "samples_per_second": examples / runtime if runtime else 0.0,
                "steps_per_second": (step - first_step) / runtime if runtime else 0.0,
                "steps": step,
                "samples": len(rows),
                "first_step_seconds": first_step_seconds or 0.0,
                "input_wait_seconds": input_wait,
                "input_wait_fraction": input_wait / runtime if runtime else 0.0,
                "state_bytes": state_bytes,
                "state_bytes_per_device": state_bytes_per_device,
                **adapter_results,
            },
        )
        self.trained_steps = step
        self._keep_trainable(state)
        return training.fetch(full_params(state))

    def _keep_trainable(self, state: training.TrainState) -> None:
        """With LoRA: keep the trained tree (adapters, new heads) for saving the adapter."""
        if self.adaptation is not None:
            self.trainable = training.fetch(state.params)

    def _log_adaptation(self, state: training.TrainState, frozen: Any) -> dict:
        """Log LoRA's trainable parameters, their share of all, and the optimizer state's bytes; returns them."""
        trainable, total = self.adaptation.counts(frozen, state.params)
        optimizer_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.opt_state))
        logger.info("LoRA rank %d on %d layers: %d trainable parameters of %d (%.3f%%), optimizer state %.2f MB",
                    self.adaptation.settings.rank, len(self.adaptation.targets), trainable, total,
                    100 * trainable / total, optimizer_bytes / 1e6)
        return {"trainable_parameters": trainable, "all_parameters": total, "optimizer_state_bytes": optimizer_bytes}

    def _log_training(self, step: int, epoch: float, pending: list, global_batch_size: int) -> dict:
        """Mean loss of the steps since the last log line, learning rate, and their throughput."""
        values = jax.device_get(pending)
        now = time.perf_counter()
        seconds = max(now - self._last_log_time, 1e-9)
        self._last_log_time = now
        record = {
            "step": step,
            "epoch": epoch,
            "train_loss": float(np.mean([value["loss"] for value in values])),
            "learning_rate": float(values[-1]["learning_rate"]),
            "train_steps_per_second": len(values) / seconds,
            "train_samples_per_second": len(values) * global_batch_size / seconds,
        }
        self.output.log(record)
        return record

    def _maybe_resume(self, state: training.TrainState, position: dict) -> training.TrainState:
        if not self.args.resume_from_checkpoint:
            return state
        folder, step = find_checkpoint(self.args.resume_from_checkpoint)
        checkpoints = Checkpoints(folder)
        state, saved = checkpoints.restore(step, state)
        checkpoints.close()
        changed = [key for key in position if saved.get(key) != position[key]]
        if changed:
            raise InputError(
                f"--resume_from_checkpoint: the run's {', '.join(changed)} differ from the checkpoint's "
                f"({', '.join(f'{key}={saved.get(key)}' for key in changed)}); resume with the same settings"
            )
        logger.info("resumed from %s at step %d", folder, step)
        return state

    def predict(self, params: Any, rows: data.Rows) -> dict[str, np.ndarray]:
        """`predict_fn` outputs for every row, in dataset order: {name: [num_rows, ...]}."""
        params = training.shard_params(params, self.mesh)
        plan = self._plan(len(rows), self.args.per_device_eval_batch_size)
        order = plan.order(seed=None)[:, 0, :]  # [num_batches, batch]
        per_call = min(plan.num_batches, EVAL_BATCHES_PER_CALL)
        calls = math.ceil(plan.num_batches / per_call)
        padded = np.full((calls * per_call, order.shape[1]), -1, dtype=order.dtype)
        padded[: len(order)] = order
        chunks = []
        with progress_bar(calls, 0, "evaluating", not self.show_bars, leave=False) as bar:
            for chunk in padded.reshape(calls, per_call, -1):
                local = data.gather(rows, plan.local(chunk))
                outputs = self.predict_step(params, training.put_batch(local, self.mesh))
                chunks.append(jax.device_get(outputs))
                bar.update()
        real = padded.reshape(-1) >= 0
        return {
            name: np.concatenate([chunk[name].reshape(-1, *chunk[name].shape[2:]) for chunk in chunks])[real]
            for name in chunks[0]
        }

    def evaluate(
        self, params: Any, rows: data.Rows, compute_metrics: ComputeMetrics, split: str = "eval", write: bool = True
    ) -> dict[str, float]:
        """Metrics on `rows` with `{split}_` keys; written to `{split}_results.json` when `write`."""
        started = time.perf_counter()
        outputs = self.predict(params, rows)
        return self.report(compute_metrics(outputs, split), split, time.perf_counter() - started, len(rows), write)

    def report(
        self, metrics: Mapping[str, float], split: str, runtime: float, samples: int, write: bool = True
    ) -> dict[str, float]:
        """Log `metrics` of a split (with its runtime and size) and write `{split}_results.json`."""
        prefixed = {f"{split}_{name}": value for name, value in {**metrics, "runtime": runtime, "samples": samples}.items()}
        if write:
            self.output.write_results(split, prefixed)
            if self.trained_steps is not None:
                self.output.log({"step": self.trained_steps, **prefixed})
        logger.info("%s: %s", split, ", ".join(f"{k}={v:.4g}" for k, v in prefixed.items()))
        return prefixed
