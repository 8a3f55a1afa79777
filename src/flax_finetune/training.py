"""Train state, optimizer, schedule, and the sharded jitted steps.

The loss contract: a task's `loss_fn(params, batch, dropout_rng)` returns
`(loss_sum, count)`: the summed loss over the real (unmasked) items of the
batch and how many there were. The step differentiates the sum and divides by
the total count, so padding never counts and every task, device count and
gradient-accumulation setting averages the same way.

Steps are `jax.jit` functions over a two-axis ("data", "fsdp") device mesh
(`--mesh`, default: every device on "data"). Batches are sharded along their
batch dimension over both axes. Parameters and optimizer state are sharded over
"fsdp" (each array along its largest dimension that the axis divides, replicated
where none does) and replicated over "data": with fsdp = 1 this is plain data
parallelism, with data = 1 it is fully sharded data parallelism (FSDP); XLA
inserts the gathers and reductions. The state's buffers are donated. No `pmap`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_finetune.errors import InputError

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


MESH_AXES = ("data", "fsdp")


def mesh_shape(spec: str, device_count: int) -> dict[str, int]:
    """`--mesh` ("data:2,fsdp:4", "fsdp:8", or "" for every device on "data") -> {axis: size}.

    An axis left out gets the devices the others leave; the sizes must multiply to `device_count`.
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (item.strip() for item in spec.split(","))):
        name, _, size = part.partition(":")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in sizes:
            raise InputError(f"--mesh {spec}: write axis:size pairs, e.g. data:2,fsdp:4 (axes: {', '.join(MESH_AXES)})")
        sizes[name] = int(size)
    given = int(np.prod(list(sizes.values()), dtype=int))
    missing = [name for name in MESH_AXES if name not in sizes]
    if missing and device_count % given == 0:
        sizes[missing[0]] = device_count // given
    sizes = {name: sizes.get(name, 1) for name in MESH_AXES}
    if int(np.prod(list(sizes.values()))) != device_count:
        raise InputError(f"--mesh {spec}: the axis sizes must multiply to the {device_count} devices of this run")
    return sizes


def make_mesh(spec: str = "") -> Mesh:
    """The ("data", "fsdp") mesh of `--mesh` over all devices of all processes (fsdp neighbours adjacent)."""
    sizes = mesh_shape(spec, jax.device_count())
    devices = np.asarray(jax.devices()).reshape([sizes[name] for name in MESH_AXES])
    return Mesh(devices, MESH_AXES)


def data_mesh() -> Mesh:
    """All devices of all processes on the "data" axis (fsdp = 1)."""
    return make_mesh("")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [micro_batches, batch, ...] stack: the batch axis split over every device."""
    return NamedSharding(mesh, PartitionSpec(None, MESH_AXES))


def fsdp_axis(shape: tuple, fsdp_size: int) -> Optional[int]:
    """The axis an array of `shape` is split along over `fsdp_size` devices: its largest dimension that
    the size divides (the first of equals); None (replicated) where none does or the size is 1."""
    divisible = [axis for axis, length in enumerate(shape) if fsdp_size > 1 and length % fsdp_size == 0]
    return max(divisible, key=lambda axis: (shape[axis], -axis)) if divisible else None


def state_sharding(mesh: Mesh, shape: tuple) -> NamedSharding:
    """Where one parameter or optimizer-state array of `shape` lives (see `fsdp_axis`)."""
    axis = fsdp_axis(shape, mesh.shape["fsdp"])
    return replicated(mesh) if axis is None else NamedSharding(mesh, PartitionSpec(*[None] * axis, "fsdp"))


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """`state_sharding` of every leaf of `tree` (arrays or shape structs)."""
    return jax.tree_util.tree_map(lambda leaf: state_sharding(mesh, tuple(np.shape(leaf))), tree)


def bytes_per_device(tree: Any) -> tuple[int, int]:
    """(bytes of `tree` in all, the most bytes any one device holds), read from the arrays' shardings."""
    total, per_device = 0, {}
    for leaf in jax.tree_util.tree_leaves(tree):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return total, max(per_device.values(), default=0)


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


def place(tree: Any, shardings: Any) -> Any:
    """Every leaf of `tree` laid out as the matching leaf of `shardings` over the devices of every process.

    Across processes each one contributes its parts of its own copy, which must be equal
    (the same checkpoint and seed give the same parameters everywhere).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(leaf, sharding):
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of `tree` on every device of the mesh (of every process)."""
    return place(tree, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))


def shard_params(tree: Any, mesh: Mesh) -> Any:
    """Parameters laid out as training keeps them (`state_sharding`)."""
    return place(tree, state_shardings(tree, mesh))


def fetch(tree: Any) -> Any:
    """`tree` readable by this process in full (for saving): sharded arrays of several processes are
    gathered; in one process the arrays are returned as they are (reading them gathers)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


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
    state_layout: Any = None,
    remat_policy: Optional[str] = None,
    frozen_layout: Any = None,
) -> Callable:
    """Jitted `(state, stacked_batch, rng) -> (state, metrics)`.

    `state_layout`: the TrainState's shardings (default: replicated); the new state keeps them.
    `remat_policy`: rematerialise every model layer with this policy (`modeling.REMAT_POLICIES`):
    the backward pass recomputes the layers' activations instead of storing them.
    `frozen_layout`: the shardings of parameters that are not trained (LoRA's base model): the step
    then takes them as a fourth argument, `(state, stacked_batch, rng, frozen)`, and passes them to
    `loss_fn(params, batch, rng, frozen)`; an argument, not a constant of the compiled program.

    `stacked_batch` leaves are [micro_batches, batch, ...]. Gradients of the
    loss sums are summed over the micro batches and divided by the total
    count: gradient accumulation gives the same update as one big batch.
    Each micro batch gets its own dropout key, folded from (rng, step, index).
    """
    grad_fn = jax.value_and_grad(rematerialised(loss_fn, remat_policy), has_aux=True)

    def step(state: TrainState, batch: Batch, rng: jax.Array, *frozen):
        step_rng = jax.random.fold_in(rng, state.step)
        if micro_batches == 1:
            (loss_sum, count), grads = grad_fn(state.params, {k: v[0] for k, v in batch.items()}, step_rng, *frozen)
        else:
            def accumulate(carry, indexed):
                index, micro_batch = indexed
                (micro_loss, micro_count), micro_grads = grad_fn(
                    state.params, micro_batch, jax.random.fold_in(step_rng, index), *frozen
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

    layout = replicated(mesh) if state_layout is None else state_layout
    frozen_shardings = () if frozen_layout is None else (frozen_layout,)
    return jax.jit(
        step,
        in_shardings=(layout, stacked_batch_sharding(mesh), replicated(mesh), *frozen_shardings),
        out_shardings=(layout, replicated(mesh)),
        donate_argnums=0,
    )


def rematerialised(loss_fn: LossFn, policy: Optional[str]) -> LossFn:
    """`loss_fn` with the model's layers rematerialised under `policy` (unchanged for None); an
    InputError where the model has no rematerialisable layers."""
    if policy is None:
        return loss_fn
    from flax_finetune import modeling

    def loss(params, batch, rng, *frozen):
        with modeling.rematerialised(policy) as layers:
            result = loss_fn(params, batch, rng, *frozen)
        if not layers:
            raise InputError("--gradient_checkpointing: this model has no layers to rematerialise")
        return result

    return loss


def make_predict_step(predict_fn: PredictFn, mesh: Mesh) -> Callable:
    """Jitted `(params, stacked_batches) -> outputs`, one call for a stack of eval batches.

    `stacked_batches` leaves are [num_batches, batch, ...]; the batches run one
    after another inside the call (memory of one batch), which saves a host
    round trip per batch. Params come laid out by `shard_params`, batches by
    `put_batch` (the call keeps their shardings). Outputs are [num_batches,
    batch, ...], replicated so every process can read them.
    """

    def predict(params, batches):
        return jax.lax.map(lambda batch: predict_fn(params, batch), batches)

    return jax.jit(predict, out_shardings=replicated(mesh))


def init_state(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The TrainState at step 0, laid out by `state_shardings` (optimizer initialised on device, compiled once)."""

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    params = shard_params(params, mesh)
    layout = state_shardings(jax.eval_shape(init, params), mesh)
    return jax.jit(init, out_shardings=layout)(params)
