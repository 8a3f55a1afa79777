"""Train state, optimizer, schedule, and the sharded jitted steps.

The loss contract: a task's `loss_fn(params, batch, dropout_rng)` returns
`(loss_sum, count)`: the summed loss over the real (unmasked) items of the
batch and how many there were. The step differentiates the sum and divides by
the total count, so padding never counts and every task, device count and
gradient-accumulation setting averages the same way.

Steps are `jax.jit` functions over a one-axis ("data") device mesh: batches are
sharded along their batch dimension, the state is replicated, and the state's
buffers are donated. No `pmap`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], "tuple[jax.Array, jax.Array]"]
PredictFn = Callable[[Any, Batch], Mapping[str, jax.Array]]


@flax.struct.dataclass
class TrainState:
    """Everything a step updates: step counter, parameters, optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def data_mesh() -> Mesh:
    """All devices of all processes on one "data" axis."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [micro_batches, batch, ...] stack: split along the batch axis."""
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def initialize_distributed(coordinator_address, num_processes, process_id) -> int:
    """Join a multi-process run (jax.distributed; CPU processes talk over gloo). Returns this process's index.

    Values left None are detected from the cluster environment (SLURM, Open MPI, TPU pods, Kubernetes).
    """
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # jax releases before the option need no setting
        pass
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logger.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())
    return jax.process_index()


def put_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a [micro_batches, batch, ...] stack -> global sharded arrays.

    With several processes, process p's rows are columns [p * local, (p + 1) * local)
    of every micro batch, which the mesh places on p's own devices.
    """
    sharding = stacked_batch_sharding(mesh)
    if jax.process_count() == 1:
        return {name: jax.device_put(value, sharding) for name, value in local.items()}
    offset = jax.process_index() * next(iter(local.values())).shape[1]

    def global_array(value: np.ndarray) -> jax.Array:
        shape = (value.shape[0], value.shape[1] * jax.process_count(), *value.shape[2:])

        def local_part(index):
            rows = index[1]
            return value[(index[0], slice(rows.start - offset, rows.stop - offset), *index[2:])]

        return jax.make_array_from_callback(shape, sharding, local_part)

    return {name: global_array(value) for name, value in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of `tree` on every device of the mesh (of every process).

    Across processes each one contributes its own copy, which must be equal
    (the same checkpoint and seed give the same parameters everywhere).
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(put, tree)


def is_decayed(path: tuple[str, ...]) -> bool:
    """Weight decay applies to weights, not to biases or normalisation parameters."""
    names = [str(name).lower() for name in path]
    if names[-1] == "bias":
        return False
    return not any("norm" in name or name.startswith("ln_") or name == "ln_f" for name in names[:-1])


def decay_mask(params: Any) -> Any:
    """A tree of booleans, True where weight decay applies (see `is_decayed`)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return flax.traverse_util.unflatten_dict({path: is_decayed(path) for path in flat})


def linear_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """0 -> learning_rate over `warmup_steps`, then linearly to 0 at `total_steps`."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def make_optimizer(args, schedule: optax.Schedule) -> optax.GradientTransformation:
    """adamw with the decay mask (or Adafactor with `--adafactor`)."""
    if args.adafactor:
        return optax.adafactor(learning_rate=schedule)
    return optax.adamw(
        learning_rate=schedule,
        b1=args.adam_beta1,
        b2=args.adam_beta2,
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        mask=decay_mask,
    )


def masked_mean_loss(loss_sum: jax.Array, count: jax.Array) -> jax.Array:
    return loss_sum / jnp.maximum(count, 1)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    micro_batches: int,
) -> Callable:
    """Jitted `(state, stacked_batch, rng) -> (state, metrics)`.

    `stacked_batch` leaves are [micro_batches, batch, ...]. Gradients of the
    loss sums are summed over the micro batches and divided by the total
    count: gradient accumulation gives the same update as one big batch.
    Each micro batch gets its own dropout key, folded from (rng, step, index).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        if micro_batches == 1:
            (loss_sum, count), grads = grad_fn(state.params, {k: v[0] for k, v in batch.items()}, step_rng)
        else:
            def accumulate(carry, indexed):
                index, micro_batch = indexed
                (micro_loss, micro_count), micro_grads = grad_fn(
                    state.params, micro_batch, jax.random.fold_in(step_rng, index)
                )
                grads, loss_sum, count = carry
                return (jax.tree_util.tree_map(jnp.add, grads, micro_grads), loss_sum + micro_loss, count + micro_count), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (grads, loss_sum, count), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(micro_batches), batch)
            )
        grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": masked_mean_loss(loss_sum, count), "learning_rate": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(
        step,
        in_shardings=(replicated(mesh), stacked_batch_sharding(mesh), replicated(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0,
    )


def make_predict_step(predict_fn: PredictFn, mesh: Mesh) -> Callable:
    """Jitted `(params, stacked_batches) -> outputs`, one call for a stack of eval batches.

    `stacked_batches` leaves are [num_batches, batch, ...]; the batches run one
    after another inside the call (memory of one batch), which saves a host
    round trip per batch. Outputs are [num_batches, batch, ...], replicated so
    every process can read them.
    """

    def predict(params, batches):
        return jax.lax.map(lambda batch: predict_fn(params, batch), batches)

    return jax.jit(
        predict,
        in_shardings=(replicated(mesh), stacked_batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def init_state(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """A replicated TrainState at step 0 (optimizer initialised on device, compiled once)."""

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return jax.jit(init, out_shardings=replicated(mesh))(replicate(params, mesh))
