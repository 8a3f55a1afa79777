"""Training-step benchmark: how fast the example scripts' training step runs on this machine.

    python benchmarks/bench.py [--quick] [--output DIR] [--dtype float32 bfloat16]
                               [--reference-dtype float32] [--only bert,gpt2,t5,llama] [--backend cpu|cuda|tpu]

Every measurement runs in a process of its own, so each has its own start-up
cost and its own peak memory, and no process holds the accelerator while
another one runs:

- the matmul peak of each dtype: a jitted N x N matmul, best of several timed
  repeats after a warm-up; the ceiling that model FLOPs utilisation (MFU) is
  measured against;
- per case and dtype, the training step of this project, built as the scripts
  build it: `models.from_config`, `training.make_optimizer` with the scripts'
  default arguments, `training.make_train_step` over `training.data_mesh`,
  batches cut by `data.BatchPlan` / `data.iterate_batches` from
  `data.ArrayRows` and placed by `training.put_batch`, the loss of the
  script, and the Trainer's loop (each step's loss read one step late by
  `trainer.DivergenceGuard`);
- beside it, where Transformers still has Flax classes (4.x), the reference:
  a plain `jax.jit` step of optax adamw over the Transformers Flax class, on
  the same config and the same batches.

Models are random-initialised and data is synthetic (full-length rows of
random token ids): nothing is downloaded. The first step (compiled ahead of
time, so compilation is timed apart) is the warm-up; its duration sets how
many steps are timed: enough to fill `TIMED_SECONDS` (at least
`MIN_TIMED_STEPS`, at most `MAX_TIMED_STEPS`), so a 20-second CPU step is
timed once and a 50-millisecond GPU step 20 times. The reference runs in
float32 only unless `--reference-dtype` asks for more; the bfloat16 question
is this project's bfloat16 against its own float32. `--quick` uses tiny
configs, for the test.

`--backend` runs every measurement on that JAX platform (JAX_PLATFORMS) and
fails one whose JAX fell back to another; on cuda and tpu the default dtype
is bfloat16, and the reference runs in it too.

Written to --output: bench.json (every figure, per-step times included) and
bench.md (the tables, also printed).

The scale case (`SCALE_CASES`: a Llama-shaped model of about 100M parameters)
runs in processes of their own over `SCALE_DEVICES` devices (on CPU, emulated
with XLA_FLAGS=--xla_force_host_platform_device_count, sharing the real cores),
once per `LAYOUTS` entry: data parallel, FSDP, FSDP with rematerialised layers.
Besides speed it reports the parameter and optimizer bytes each device holds
(`training.bytes_per_device`) and XLA's memory analysis of the compiled step
per device. The step is compiled for the state's shapes and shardings before
the state exists: on CPU, a layout whose arrays would not fit in the host's
available memory is reported from its memory analysis and not run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

NATIVE = "flax_finetune"
REFERENCE = "transformers"
DTYPES = ("float32", "bfloat16", "float16")
SEED = 42
MIN_TIMED_STEPS = 1
MAX_TIMED_STEPS = 20
TIMED_SECONDS = 5.0
SLOW_INPUT_FRACTION = 0.1  # a step is input-bound when building its batch took more than this share of it
MATMUL_REPEATS = 5
MATMUL_REPEAT_SECONDS = 0.2  # each timed matmul repeat runs back-to-back calls for at least this long
# the compiled FLOP count is trusted unless it is off the analytic count by more than this factor
# (an XLA backend that cannot see inside a library call counts too little)
FLOPS_AGREEMENT = 2.0
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "transformers", "numpy")
# --backend (a JAX_PLATFORMS value) -> what jax.default_backend() says there
BACKENDS = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}
ACCELERATOR_DTYPE = "bfloat16"  # what the matrix units of GPUs and TPUs are built for
SCALE_DEVICES = 8  # devices of the scale case (emulated on CPU)
# scale-case layout -> (--mesh, --remat_policy or None); "data:1" puts every device on the fsdp axis
LAYOUTS = {"data": ("", None), "fsdp": ("data:1", None), "fsdp+remat": ("data:1", "nothing_saveable")}
# a CPU layout runs only if its devices' arrays (XLA's memory analysis) fit in this share of the available
# memory: the process needs about 1.1x more (measured: the fsdp Llama case, 10.9 GiB by the analysis, peaked at
# 12.1 GiB RSS), and a shared machine keeps some for the others
HOST_MEMORY_SHARE = 0.7


@dataclasses.dataclass(frozen=True)
class Shape:
    """Per-device batch size (as --per_device_train_batch_size) and token lengths of one example."""

    batch_size: int
    source_length: int
    target_length: int = 0  # decoder tokens (seq2seq only)

    @property
    def tokens_per_example(self) -> int:
        return self.source_length + self.target_length


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked training step: the script it stands for, its model, its batch shape."""

    name: str
    script: str
    task: str
    model_type: str
    reference_class: str  # the Transformers 4.x Flax class of the same model
    config: dict
    shape: Shape
    quick_config: dict
    quick_shape: Shape

    def sizes(self, quick: bool) -> tuple[dict, Shape]:
        return (self.quick_config, self.quick_shape) if quick else (self.config, self.shape)


CASES = {
    "bert": Case(
        "bert", "run_flax_glue", "sequence-classification", "bert", "FlaxBertForSequenceClassification",
        config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    vocab_size=30522, num_labels=2),
        shape=Shape(batch_size=16, source_length=128),
        quick_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          vocab_size=512, num_labels=2),
        quick_shape=Shape(batch_size=4, source_length=32),
    ),
    "gpt2": Case(
        "gpt2", "run_clm_flax", "causal-lm", "gpt2", "FlaxGPT2LMHeadModel",
        config=dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
        shape=Shape(batch_size=1, source_length=512),
        quick_config=dict(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=64),
        quick_shape=Shape(batch_size=2, source_length=64),
    ),
    "t5": Case(
        "t5", "run_summarization_flax", "seq2seq-lm", "t5", "FlaxT5ForConditionalGeneration",
        config=dict(d_model=512, num_layers=6, num_decoder_layers=6, d_ff=2048, num_heads=8, d_kv=64,
                    vocab_size=32128, decoder_start_token_id=0),
        shape=Shape(batch_size=4, source_length=512, target_length=128),
        quick_config=dict(d_model=64, num_layers=2, num_decoder_layers=2, d_ff=128, num_heads=2, d_kv=32,
                          vocab_size=512, decoder_start_token_id=0),
        quick_shape=Shape(batch_size=2, source_length=64, target_length=16),
    ),
}


SCALE_CASES = {
    "llama": Case(
        "llama", "run_clm_flax", "causal-lm", "llama", "FlaxLlamaForCausalLM",
        # 100M parameters: 24.6M in the tied embedding, 6.3M in each of 12 layers
        config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                    intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True),
        shape=Shape(batch_size=1, source_length=512),
        quick_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=True),
        quick_shape=Shape(batch_size=1, source_length=32),
    ),
}
ALL_CASES = {**CASES, **SCALE_CASES}


def log(label: str, message: str) -> None:
    print(f"[{label}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the task: data, inputs, loss


def synthetic_rows(case: Case, config: Any, shape: Shape, num_rows: int):
    """`data.ArrayRows` of random tokens, with the columns and dtypes the case's script tokenizes to.

    Token columns are int32 [num_rows, length] with full-length attention
    masks (padded to max length, or packed blocks); class labels are int64
    [num_rows], as the classification script reads them.
    """
    from flax_finetune import data, seq2seq

    generator = np.random.default_rng(SEED)

    def tokens(length: int) -> np.ndarray:
        return generator.integers(0, config.vocab_size, (num_rows, length), dtype=np.int32)

    columns = {"input_ids": tokens(shape.source_length),
               "attention_mask": np.ones((num_rows, shape.source_length), np.int32)}
    if case.task == "sequence-classification":
        columns["token_type_ids"] = np.zeros((num_rows, shape.source_length), np.int32)
        columns["labels"] = generator.integers(0, config.num_labels, num_rows, dtype=np.int64)
    elif case.task == "seq2seq-lm":
        columns["labels"] = tokens(shape.target_length)
        columns["decoder_input_ids"] = seq2seq.shift_right(
            columns["labels"], seq2seq.decoder_start_token_id(config), config.pad_token_id
        )
    return data.ArrayRows(columns)


MODEL_INPUT_COLUMNS = {
    "sequence-classification": ("input_ids", "attention_mask", "token_type_ids"),
    "causal-lm": ("input_ids", "attention_mask"),
    "seq2seq-lm": ("input_ids", "attention_mask", "decoder_input_ids"),
}


def model_inputs(task: str, batch: dict) -> dict:
    """The model inputs the case's script passes, from a batch of [batch, ...] columns."""
    inputs = {name: batch[name] for name in MODEL_INPUT_COLUMNS[task]}
    if task == "seq2seq-lm":
        inputs["decoder_attention_mask"] = batch["labels"] >= 0
    return inputs


def task_loss(task: str, logits_of: Callable) -> Callable:
    """The script's `loss_fn(params, batch, dropout_rng) -> (loss_sum, count)` over `logits_of(params, batch, rng)`."""
    from flax_finetune import losses

    def loss_fn(params, batch, dropout_rng):
        logits = logits_of(params, batch, dropout_rng)
        if task == "sequence-classification":
            loss_sums, counts = losses.cross_entropy(logits, batch["labels"], batch["example_mask"], per_example=True)
        elif task == "causal-lm":
            weights = losses.token_weights(batch["example_mask"], batch["attention_mask"][:, 1:])
            loss_sums, counts = losses.cross_entropy(
                logits[:, :-1], batch["input_ids"][:, 1:], weights, per_example=True
            )
        else:
            weights = losses.token_weights(batch["example_mask"], batch["labels"] >= 0)
            loss_sums, counts = losses.cross_entropy(logits, batch["labels"], weights, per_example=True)
        return loss_sums.sum(), counts.sum()

    return loss_fn


def analytic_train_flops(case: Case, config: Any, shape: Shape) -> float:
    """Training FLOPs of one example: 3 x forward (forward + backward), with

    forward = 2 x (matmul weights each token passes through) x tokens + 4 x layers x Lq x Lk x attention width
    (the scores and the weighted sum of attention). Embedding lookups are free; tied output heads count.
    """
    length = shape.source_length
    if case.task == "sequence-classification":
        width, layers = config.hidden_size, config.num_hidden_layers
        weights_per_token = layers * (4 * width * width + 2 * width * config.intermediate_size)
        forward = (2 * weights_per_token * length + 4 * layers * length * length * width
                   + 2 * (width * width + width * config.num_labels))  # pooler and classifier, once per example
    elif case.model_type == "llama":
        width, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or width // config.num_attention_heads
        query, key_value = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        # query, key, value and output projections; gate, up and down projections; the output head
        weights_per_token = layers * (2 * width * query + 2 * width * key_value + 3 * width * inner) + width * config.vocab_size
        forward = 2 * weights_per_token * length + 4 * layers * length * length * query
    elif case.task == "causal-lm":
        width, layers = config.n_embd, config.n_layer
        inner = config.n_inner or 4 * width
        weights_per_token = layers * (4 * width * width + 2 * width * inner) + width * config.vocab_size
        forward = 2 * weights_per_token * length + 4 * layers * length * length * width
    else:
        width, attention = config.d_model, config.num_heads * config.d_kv
        feed_forward = (3 if config.is_gated_act else 2) * width * config.d_ff
        encoder, decoder, target = config.num_layers, config.num_decoder_layers, shape.target_length
        weights_per_source_token = encoder * (4 * width * attention + feed_forward) + decoder * 2 * width * attention
        weights_per_target_token = decoder * (6 * width * attention + feed_forward) + width * config.vocab_size
        forward = (2 * (weights_per_source_token * length + weights_per_target_token * target)
                   + 4 * attention * (encoder * length * length + decoder * (target * target + target * length)))
    return 3.0 * forward


# --------------------------------------------------------------------------- the two training steps


@dataclasses.dataclass
class TrainingSetup:
    """A jitted `step(state, device_batch, *extra_args) -> (state, {"loss": ...})` ready to run.

    The step compiles for `state_shapes` (shapes, dtypes, shardings); `make_state()` makes the state.
    """

    jitted_step: Any
    state_shapes: Any
    make_state: Callable[[], Any]
    extra_args: tuple
    put_batch: Callable[[dict], Any]  # host batch {name: [1, batch, ...]} -> what the step takes
    param_count: int


def count_params(params: Any) -> int:
    import jax

    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))


def shapes_of(tree: Any) -> Any:
    """The shapes, dtypes and shardings of a tree of arrays."""
    import jax

    return jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), tree)


def native_setup(case: Case, config: Any, dtype: str, total_steps: int, layout: str = "data") -> TrainingSetup:
    """This project's step, made as `Trainer.train` makes it, with the scripts' default training arguments,
    over the mesh and remat policy of `layout` (see `LAYOUTS`)."""
    import jax

    from flax_finetune import models, training
    from flax_finetune.arguments import TrainingArguments

    mesh_spec, remat_policy = LAYOUTS[layout]
    args = TrainingArguments(output_dir=os.devnull, max_steps=total_steps)
    mesh = training.make_mesh(mesh_spec)
    model = models.from_config(config, case.task, dtype=dtype, seed=args.seed)
    schedule = training.linear_schedule(args.learning_rate, args.warmup_steps, total_steps)
    optimizer = training.make_optimizer(args, schedule)

    def logits_of(params, batch, dropout_rng):
        return model(params, dropout_rng=dropout_rng, train=True, **model_inputs(case.task, batch)).logits

    # the shapes of init_state's state (tracing allocates nothing) and where it puts each array
    state_shapes = jax.eval_shape(functools.partial(training.init_state, optimizer=optimizer, mesh=mesh), model.params)
    state_layout = training.state_shardings(state_shapes, mesh)
    step = training.make_train_step(task_loss(case.task, logits_of), optimizer, schedule, mesh, micro_batches=1,
                                    state_layout=state_layout, remat_policy=remat_policy)
    return TrainingSetup(
        jitted_step=step,
        state_shapes=jax.tree_util.tree_map(
            lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
            state_shapes, state_layout,
        ),
        make_state=functools.partial(training.init_state, model.params, optimizer, mesh),
        extra_args=(jax.random.PRNGKey(args.seed),),
        put_batch=lambda local: training.put_batch(local, mesh),
        param_count=count_params(model.params),
    )


def reference_setup(case: Case, config: Any, dtype: str, total_steps: int) -> TrainingSetup:
    """A plain jitted adamw step over the Transformers Flax class (float32 weights, `dtype` computation).

    Data parallel like the native step: batches split over all devices, parameters on every device.
    """
    import jax
    import jax.numpy as jnp
    import optax
    import transformers
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from flax_finetune.arguments import TrainingArguments

    args = TrainingArguments(output_dir=os.devnull, max_steps=total_steps)
    model = getattr(transformers, case.reference_class)(config, seed=args.seed, dtype=getattr(jnp, dtype))
    optimizer = optax.adamw(
        optax.linear_schedule(args.learning_rate, 0.0, total_steps),
        b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon, weight_decay=args.weight_decay,
    )

    def logits_of(params, batch, dropout_rng):
        return model(**model_inputs(case.task, batch), params=params, dropout_rng=dropout_rng, train=True).logits

    loss_fn = task_loss(case.task, logits_of)

    def step(state, batch):
        dropout_rng, next_rng = jax.random.split(state["rng"])

        def mean_loss(params):
            loss_sum, count = loss_fn(params, batch, dropout_rng)
            return loss_sum / jnp.maximum(count, 1)

        loss, grads = jax.value_and_grad(mean_loss)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "rng": next_rng}, {"loss": loss}

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    params = jax.device_put(model.params, NamedSharding(mesh, PartitionSpec()))
    batch_split = NamedSharding(mesh, PartitionSpec("data"))
    state = {"params": params, "opt_state": jax.jit(optimizer.init)(params), "rng": jax.random.PRNGKey(args.seed)}
    return TrainingSetup(
        jitted_step=jax.jit(step, donate_argnums=0),
        state_shapes=shapes_of(state),
        make_state=lambda: state,
        extra_args=(),
        put_batch=lambda local: jax.device_put({name: value[0] for name, value in local.items()}, batch_split),
        param_count=count_params(params),
    )


# --------------------------------------------------------------------------- measurements (child processes)


def compiled_flops(compiled: Any) -> Optional[float]:
    """FLOPs of one call from XLA's cost analysis of the compiled step; None where the backend gives none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (backends without a cost model raise different errors)
        return None
    if isinstance(analysis, list):  # older jax: one dict per executable
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops", 0.0)
    return float(flops) if flops > 0 else None


def compiled_memory(compiled: Any) -> dict:
    """XLA's memory analysis of the compiled step, bytes on one device: its arguments (state and batch),
    outputs, outputs that reuse donated argument buffers (alias), and temporaries (activations kept for
    the backward pass, gradients, gathered FSDP shards, ...: everything live only during the step).
    None where the backend gives no analysis."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (backends without one raise different errors)
        analysis = None
    fields = ("argument", "output", "alias", "temp")
    return {f"{field}_bytes_per_device": getattr(analysis, f"{field}_size_in_bytes", None) for field in fields}


class TooLargeForHost(Exception):
    """The step's arrays on this process's CPU devices would not fit in the host's available memory:
    why, and the figures measured before the refusal."""

    def __init__(self, reason: str, figures: dict):
        super().__init__(reason)
        self.reason, self.figures = reason, figures


def available_host_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    values = {line.split(":")[0]: line.split()[1] for line in lines if ":" in line}
    return int(values["MemAvailable"]) * 1024 if "MemAvailable" in values else None


def host_shortfall(memory: dict) -> Optional[str]:
    """Why the step cannot run here where, on CPU, the local devices' arguments, outputs and temporaries
    need more than HOST_MEMORY_SHARE of the available host memory (a shared machine is never pushed out
    of it); None where it fits or nothing is known."""
    import jax

    if jax.default_backend() != "cpu" or None in memory.values():
        return None
    per_device = sum(memory[f"{field}_bytes_per_device"] for field in ("argument", "output", "temp"))
    needed = (per_device - memory["alias_bytes_per_device"]) * jax.local_device_count()
    available = available_host_bytes()
    if available is None or needed <= HOST_MEMORY_SHARE * available:
        return None
    return (f"not run: needs {needed / 2**30:.1f} GiB on {jax.local_device_count()} CPU devices (XLA's memory "
            f"analysis), more than {HOST_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available")


def peak_memory() -> dict:
    """Peak resident memory of this process and, where the backend reports it, peak device memory (MiB)."""
    import jax

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    stats = jax.local_devices()[0].memory_stats() or {}
    device_peak = stats.get("peak_bytes_in_use")
    return {
        "peak_rss_mib": rss_bytes / 2**20,
        "device_peak_mib": device_peak / 2**20 if device_peak is not None else None,
    }


def time_steps(setup: TrainingSetup, batches: Iterator[dict], spawned_at: float, label: str) -> dict:
    """Compile, run the first step, then time steps in the Trainer's loop; returns the timings.

    step_seconds[k] runs from the end of step k - 1 to the end of step k while
    the host already builds the next batch, as in training; input_seconds[k]
    is the host time to gather batch k and put it on the devices. The number
    of timed steps follows from the first step's duration (see the module
    docstring).
    """
    import jax

    from flax_finetune import training
    from flax_finetune.trainer import DivergenceGuard

    first_batch = setup.put_batch(next(batches))
    started = time.perf_counter()
    compiled = setup.jitted_step.lower(setup.state_shapes, first_batch, *setup.extra_args).compile()
    compile_seconds = time.perf_counter() - started
    memory = compiled_memory(compiled)
    shortfall = host_shortfall(memory)
    if shortfall:
        raise TooLargeForHost(shortfall, {"compile_seconds": compile_seconds, **memory})
    state = setup.make_state()
    state_bytes, state_bytes_per_device = training.bytes_per_device(state)
    log(label, f"compiled in {compile_seconds:.1f} s; first step")
    started = time.perf_counter()
    state, metrics = compiled(state, first_batch, *setup.extra_args)
    jax.block_until_ready(metrics)
    first_step_seconds = time.perf_counter() - started
    time_to_first_step = time.time() - spawned_at
    timed_steps = min(MAX_TIMED_STEPS, max(MIN_TIMED_STEPS, math.ceil(TIMED_SECONDS / first_step_seconds)))
    log(label, f"first step done {time_to_first_step:.1f} s after the process started; timing {timed_steps} steps")

    guard = DivergenceGuard(timed_steps)
    step_ends = [time.perf_counter()]
    input_seconds = []
    for step in range(1, timed_steps + 1):
        began = time.perf_counter()
        batch = setup.put_batch(next(batches))
        input_seconds.append(time.perf_counter() - began)
        state, metrics = compiled(state, batch, *setup.extra_args)
        guard.add(step, metrics)  # waits for the previous step's loss
        if step > 1:
            step_ends.append(time.perf_counter())
    guard.check()
    step_ends.append(time.perf_counter())
    step_seconds = np.diff(step_ends).tolist()
    log(label, f"{len(step_seconds)} steps timed, {np.mean(step_seconds) * 1e3:.1f} ms each")
    return {
        "compile_seconds": compile_seconds,
        "first_step_seconds": first_step_seconds,
        "time_to_first_step_seconds": time_to_first_step,
        "timed_steps": len(step_seconds),
        "timed_seconds": step_ends[-1] - step_ends[0],
        "step_seconds": step_seconds,
        "input_seconds": input_seconds,
        "slow_input_steps": int(sum(
            inputs > SLOW_INPUT_FRACTION * seconds for inputs, seconds in zip(input_seconds, step_seconds)
        )),
        "final_loss": float(metrics["loss"]),
        "compiled_flops_per_step": compiled_flops(compiled),
        "state_bytes": state_bytes,
        "state_bytes_per_device": state_bytes_per_device,
        **memory,
    }


@dataclasses.dataclass
class PreparedRun:
    """A case's step, ready to compile, with the synthetic batches it runs on."""

    setup: TrainingSetup
    config: Any
    shape: Shape
    plan: Any  # data.BatchPlan
    batches: Iterator[dict]


def prepare_run(case: Case, implementation: str, dtype: str, quick: bool, total_steps: int,
                layout: str = "data") -> PreparedRun:
    """Model, optimizer, step and `total_steps` batches of synthetic rows for one (case, implementation, dtype)
    (this project's step over the mesh of `layout`; the reference is always data parallel)."""
    import jax

    from flax_finetune import data, models

    overrides, shape = case.sizes(quick)
    config = models.new_config(case.model_type, **overrides)
    if implementation == NATIVE:
        setup = native_setup(case, config, dtype, total_steps, layout)
    else:
        setup = reference_setup(case, config, dtype, total_steps)
    plan = data.BatchPlan(
        num_examples=total_steps * shape.batch_size * jax.device_count(),
        micro_batch_size=shape.batch_size * jax.device_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    rows = synthetic_rows(case, config, shape, plan.num_examples)
    return PreparedRun(setup, config, shape, plan, data.iterate_batches(rows, plan, seed=SEED))


def training_job(case: Case, implementation: str, dtype: str, quick: bool, spawned_at: float,
                 layout: str = "data") -> dict:
    """Timings, FLOP counts and memory of one (case, implementation, dtype, layout) in this process."""
    import jax

    label = f"{case.name} {implementation} {dtype}" + ("" if layout == "data" else f" {layout}")
    log(label, f"building the model and optimizer ({jax.device_count()} {jax.default_backend()} devices)")
    run = prepare_run(case, implementation, dtype, quick, total_steps=1 + MAX_TIMED_STEPS, layout=layout)
    description = {
        "param_count": run.setup.param_count,
        "device_count": jax.device_count(),
        # on CPU every device of the process computes on the same cores: one matmul peak for all
        "peak_devices": 1 if jax.default_backend() == "cpu" else jax.device_count(),
        "global_batch_size": run.plan.global_batch_size,
        "analytic_flops_per_step": analytic_train_flops(case, run.config, run.shape) * run.plan.global_batch_size,
    }
    try:
        timings = time_steps(run.setup, run.batches, spawned_at, label)
    except TooLargeForHost as refusal:
        log(label, refusal.reason)
        return {**description, **refusal.figures, "status": "skipped", "reason": refusal.reason}
    return {**description, **timings, **peak_memory()}


def matmul_job(dtypes: list[str], quick: bool) -> dict:
    """Best achieved matmul GFLOP/s of one device per dtype, with the machine's description."""
    import jax
    import jax.numpy as jnp

    device = jax.local_devices()[0]
    size = 256 if quick else (2048 if device.platform == "cpu" else 4096)
    matmul = jax.jit(jnp.matmul)
    peaks = {}
    for dtype in dtypes:
        keys = jax.random.split(jax.random.PRNGKey(SEED))
        left, right = (jax.random.normal(key, (size, size), getattr(jnp, dtype)) for key in keys)
        matmul(left, right).block_until_ready()  # compiles
        started = time.perf_counter()
        matmul(left, right).block_until_ready()
        calls = max(1, round(MATMUL_REPEAT_SECONDS / (time.perf_counter() - started)))
        best = float("inf")
        for _ in range(MATMUL_REPEATS):
            started = time.perf_counter()
            for _ in range(calls):
                product = matmul(left, right)
            product.block_until_ready()
            best = min(best, (time.perf_counter() - started) / calls)
        peaks[dtype] = {"gflops": 2 * size**3 / best / 1e9, "size": size, "calls_per_repeat": calls}
        log("matmul peak", f"{dtype}: {peaks[dtype]['gflops']:.1f} GFLOP/s ({size} x {size})")
    return {
        "peaks": peaks,
        "machine": {
            "backend": jax.default_backend(),
            "device_kind": device.device_kind,
            "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": installed_versions(),
        },
    }


def installed_versions() -> dict:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------- orchestration (parent process)


def child_environment(backend: Optional[str], cpu_devices: Optional[int] = None) -> dict:
    """The environment of a measurement: offline, on `backend`, with `cpu_devices` emulated CPU devices if given."""
    environment = dict(os.environ)
    for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}.items():
        environment.setdefault(name, value)
    if backend:
        environment["JAX_PLATFORMS"] = backend
    if cpu_devices:
        environment["XLA_FLAGS"] = (
            f"{environment.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}".strip()
        )
    return environment


def run_child(job_arguments: list[str], backend: Optional[str], cpu_devices: Optional[int] = None) -> dict:
    """Run this file as `--job ...` in a new process, echoing its progress; its result, or why it failed."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, __file__, *job_arguments, "--result", str(result), "--spawned-at", repr(time.time()),
                   *(["--backend", backend] if backend else [])]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                   env=child_environment(backend, cpu_devices))
        last_lines = collections.deque(maxlen=10)
        for line in process.stderr:
            sys.stderr.write(line)
            last_lines.append(line)
        code = process.wait()
        if code == 0 and result.exists():
            return {"status": "ok", **json.loads(result.read_text())}
        return {"status": "failed", "reason": f"exit code {code}: {''.join(last_lines).strip()[-1500:]}"}


def reference_unavailable() -> Optional[str]:
    """Why the Transformers Flax reference cannot run here, or None when it can."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "transformers is not installed"
    if int(version.split(".")[0]) >= 5:
        return f"Transformers {version} has no Flax model classes"
    return None


def add_utilisation(run: dict, peaks: dict) -> None:
    """Throughputs and MFU of a finished run, against the matmul peak of its dtype on all its devices
    (on CPU, devices of one process share the cores: one peak for all of them). MFU counts model FLOPs:
    a rematerialised step's recomputation is not counted (its MFU uses the analytic count)."""
    seconds_per_step = run["timed_seconds"] / run["timed_steps"]
    run["step_ms"] = seconds_per_step * 1e3
    run["examples_per_second"] = run["global_batch_size"] / seconds_per_step
    run["tokens_per_second"] = run["examples_per_second"] * run["tokens_per_example"]
    compiled, analytic = run["compiled_flops_per_step"], run["analytic_flops_per_step"]
    # a sharded program's cost analysis counts one device's share
    compiled_total = compiled * run["device_count"] if compiled else None
    agrees = compiled_total and 1 / FLOPS_AGREEMENT <= compiled_total / analytic <= FLOPS_AGREEMENT
    recomputes = LAYOUTS[run.get("layout", "data")][1] is not None
    use_compiled = agrees and not recomputes
    run["flops_source"] = "compiled" if use_compiled else "analytic"
    peak = peaks.get(run["dtype"], {}).get("gflops")
    ceiling = peak * 1e9 * run["peak_devices"] * seconds_per_step if peak else None
    run["mfu"] = (compiled_total if use_compiled else analytic) / ceiling if ceiling else None
    run["mfu_analytic"] = analytic / ceiling if ceiling else None


def ratios(runs: list[dict]) -> list[dict]:
    """Throughput ratios: this project over the reference (same case and dtype), each dtype over float32."""
    throughput = {(run["case"], run["implementation"], run["dtype"]): run["examples_per_second"]
                  for run in runs if run["status"] == "ok" and run["case"] in CASES}
    found = []
    for (case, implementation, dtype), value in throughput.items():
        if implementation == NATIVE and (case, REFERENCE, dtype) in throughput:
            found.append({"case": case, "dtype": dtype, "compared": f"{NATIVE} / {REFERENCE}",
                          "ratio": value / throughput[(case, REFERENCE, dtype)]})
        if dtype != "float32" and (case, implementation, "float32") in throughput:
            found.append({"case": case, "implementation": implementation, "compared": f"{dtype} / float32",
                          "ratio": value / throughput[(case, implementation, "float32")]})
    return found


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown_report(report: dict) -> str:
    """bench.md: the machine, matmul peaks, one row per training run, ratios, and notes."""
    machine = report["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items() if version)
    peaks = report["matmul_peak"]
    ok = [run for run in report["runs"] if run["status"] == "ok" and "layout" not in run]
    scale = [run for run in report["runs"] if "layout" in run]
    parts = [
        "# Training-step benchmark",
        f"{report['created']}; {machine.get('backend', '?')} backend, {machine.get('device_count', '?')} x "
        f"{machine.get('device_kind', '?')}, {machine.get('cpu_count', '?')} CPUs; {versions}"
        + f"; the whole benchmark took {report['elapsed_seconds'] / 60:.1f} min"
        + ("; **--quick (tiny configs)**" if report["quick"] else ""),
        "## Matmul peak (one device)",
        markdown_table(["dtype", "size", "GFLOP/s"],
                       [[dtype, f"{peak['size']}", number(peak["gflops"])] for dtype, peak in peaks.items()]),
    ]
    if ok:
        parts += ["## Training steps", markdown_table(
            ["case", "implementation", "dtype", "batch", "examples/s", "tokens/s", "step ms", "MFU",
             "FLOPs from", "MFU (analytic)", "compile s", "first step s", "slow-input steps", "peak RSS MiB"],
            [[run["case"], run["implementation"], run["dtype"], str(run["global_batch_size"]),
              number(run["examples_per_second"], 2), number(run["tokens_per_second"], 0), number(run["step_ms"]),
              number(run["mfu"], 3), run["flops_source"], number(run["mfu_analytic"], 3),
              number(run["compile_seconds"]), number(run["time_to_first_step_seconds"]),
              f"{run['slow_input_steps']} of {run['timed_steps']}", number(run["peak_rss_mib"], 0)]
             for run in ok],
        )]
    if report["ratios"]:
        parts += ["## Throughput ratios", markdown_table(
            ["case", "compared", "dtype or implementation", "ratio"],
            [[entry["case"], entry["compared"], entry.get("dtype") or entry["implementation"],
              number(entry["ratio"], 2)] for entry in report["ratios"]],
        )]
    if scale:
        parts += [f"## Scale: data parallel, FSDP, FSDP + remat ({scale[0]['case']}, {scale[0]['dtype']})",
                  scale_table(scale)]
    notes = [f"- {run['case']} {run['implementation']} {run['dtype']} {run.get('layout', '')}: {run['status']}: "
             f"{run['reason']}" for run in report["runs"] if run["status"] != "ok"]
    if report["matmul_failure"]:
        notes.insert(0, f"- matmul peak: failed, so no MFU: {report['matmul_failure']}")
    parts += ["## Notes", "\n".join(notes + [
        "- tokens/s counts source and target tokens; batch is the global batch (per-device batch x devices).",
        "- MFU: model FLOPs per step / step time / (matmul peak of the dtype x devices; on CPU, where the "
        "devices of a process share the cores, x 1). FLOPs from: XLA's cost "
        "analysis of the compiled step where it agrees with the analytic count within 2x, else the analytic "
        "count (3 x forward; forward = 2 x matmul weights per token x tokens + attention).",
        "- Scale: per device, params + optimizer is the parameter and optimizer-state bytes the device holds "
        "(read from the arrays' shardings); temporary is XLA's memory analysis of the compiled step "
        "(temp_size_in_bytes: activations kept for the backward pass, gradients, gathered FSDP shards, "
        "everything live only within the step), beside its argument bytes (state and batch). On CPU the "
        "devices are emulated (XLA_FLAGS=--xla_force_host_platform_device_count) and share the machine's "
        "cores, so MFU there is measured against ONE device's matmul peak (the whole machine); a "
        "remat step's MFU counts model FLOPs only (the analytic count, recomputation excluded).",
        f"- slow-input steps: timed steps whose host input time (gather + device put) exceeded "
        f"{SLOW_INPUT_FRACTION:.0%} of the step. first step s: from the process start, model init and "
        "compilation included.",
    ])]
    return "\n\n".join(parts) + "\n"


def mebibytes(value: Optional[float]) -> str:
    return number(None if value is None else value / 2**20, 1)


def scale_table(runs: list[dict]) -> str:
    """One row per layout of the scale case: speed, and memory per device."""
    rows = []
    for run in runs:
        ok = run["status"] == "ok"
        state = (f"{mebibytes(run['state_bytes_per_device'])} of {mebibytes(run['state_bytes'])}" if ok else "-")
        rows.append([
            run["layout"], str(run.get("device_count", "-")),
            "-" if "param_count" not in run else f"{run['param_count'] / 1e6:.1f}M",
            str(run.get("global_batch_size", "-")) + f" x {run['tokens_per_example']}",
            number(run.get("tokens_per_second"), 0), number(run.get("step_ms"), 0), number(run.get("mfu"), 3),
            state, mebibytes(run.get("temp_bytes_per_device")), mebibytes(run.get("argument_bytes_per_device")),
            number(run.get("compile_seconds")), number(run.get("peak_rss_mib"), 0),
            "ok" if ok else run["status"],
        ])
    return markdown_table(
        ["layout", "devices", "params", "batch x tokens", "tokens/s", "step ms", "MFU",
         "params + optimizer MiB per device (of all)", "temporary MiB per device", "arguments MiB per device",
         "compile s", "peak RSS MiB (all devices)", "status"],
        rows,
    )


def run_all(args: argparse.Namespace) -> int:
    """Run every measurement in its own process, write bench.json and bench.md, print the table."""
    started = time.perf_counter()
    cases = [CASES[name] for name in args.only if name in CASES]
    scale_cases = [SCALE_CASES[name] for name in args.only if name in SCALE_CASES]
    quick = ["--quick"] if args.quick else []
    unavailable = reference_unavailable()
    combinations = [(case, implementation, dtype) for case in cases for dtype in args.dtype
                    for implementation in (NATIVE, REFERENCE)
                    if implementation == NATIVE or dtype in args.reference_dtype]
    total = (1 + sum(1 for _, implementation, _ in combinations if implementation == NATIVE or not unavailable)
             + len(scale_cases) * len(LAYOUTS))
    log("bench", f"1 of {total}: matmul peak")
    matmul = run_child(["--job", "matmul", "--dtype", *args.dtype, *quick], args.backend)
    runs, position = [], 1
    for case, implementation, dtype in combinations:
        _, shape = case.sizes(args.quick)
        description = {"case": case.name, "script": case.script, "implementation": implementation, "dtype": dtype,
                       "batch_size": shape.batch_size, "source_length": shape.source_length,
                       "target_length": shape.target_length, "tokens_per_example": shape.tokens_per_example}
        if implementation == REFERENCE and unavailable:
            runs.append({**description, "status": "skipped", "reason": unavailable})
            continue
        position += 1
        log("bench", f"{position} of {total}: {case.name} ({case.script}), {implementation}, {dtype}")
        run = {**description, **run_child(
            ["--job", "train", "--case", case.name, "--implementation", implementation, "--dtype", dtype, *quick],
            args.backend,
        )}
        if run["status"] == "ok":
            add_utilisation(run, matmul.get("peaks", {}))
        runs.append(run)
    for case in scale_cases:
        _, shape = case.sizes(args.quick)
        for layout in LAYOUTS:
            position += 1
            log("bench", f"{position} of {total}: {case.name} ({case.script}) on {SCALE_DEVICES} devices, {layout}")
            run = {"case": case.name, "script": case.script, "implementation": NATIVE, "dtype": args.dtype[0],
                   "layout": layout, "batch_size": shape.batch_size, "source_length": shape.source_length,
                   "target_length": shape.target_length, "tokens_per_example": shape.tokens_per_example}
            run.update(run_child(["--job", "train", "--case", case.name, "--implementation", NATIVE,
                                  "--dtype", args.dtype[0], "--layout", layout, *quick],
                                 args.backend, cpu_devices=SCALE_DEVICES))
            if run["status"] == "ok":
                add_utilisation(run, matmul.get("peaks", {}))
            runs.append(run)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "quick": args.quick,
        "machine": matmul.get("machine", {}),
        "matmul_peak": matmul.get("peaks", {}),
        "matmul_failure": matmul.get("reason"),
        "runs": runs,
        "ratios": ratios(runs),
        "elapsed_seconds": time.perf_counter() - started,
    }
    write_report(args.output, "bench", report, markdown_report(report))
    failed = matmul["status"] != "ok" or any(run["status"] == "failed" for run in runs)
    return 1 if failed else 0


def write_report(output: Path, stem: str, report: dict, table: str) -> None:
    """`report` to output/<stem>.json and its Markdown `table` to output/<stem>.md (also printed)."""
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / f"{stem}.md").write_text(table)
    print(table)
    log(stem, f"written: {output / (stem + '.json')}, {output / (stem + '.md')}")


def run_job(args: argparse.Namespace) -> None:
    """Child side: one measurement, its result written to --result as JSON."""
    if args.backend:
        import jax

        if jax.default_backend() != BACKENDS[args.backend]:
            raise SystemExit(f"--backend {args.backend}: JAX runs on {jax.default_backend()}")
    if args.job == "matmul":
        result = matmul_job(args.dtype, args.quick)
    else:
        result = training_job(ALL_CASES[args.case], args.implementation, args.dtype[0], args.quick, args.spawned_at,
                              args.layout)
    Path(args.result).write_text(json.dumps(result))


def case_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(ALL_CASES)}")
    return names


def parse_arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny configs: a smoke test of the harness.")
    parser.add_argument("--output", type=Path, default=Path("reports/bench"),
                        help="Folder for bench.json and bench.md (default: reports/bench).")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES,
                        help="Computation dtypes to measure (weights stay float32; default: float32 and bfloat16, "
                             f"{ACCELERATOR_DTYPE} on cuda and tpu).")
    parser.add_argument("--reference-dtype", nargs="+", choices=DTYPES,
                        help="Dtypes (of those in --dtype) at which the Transformers reference runs too "
                             f"(default: float32, {ACCELERATOR_DTYPE} on cuda and tpu, when measured).")
    parser.add_argument("--backend", choices=list(BACKENDS),
                        help="JAX platform of every measurement (default: the one JAX picks); a run that JAX "
                             "puts elsewhere fails.")
    parser.add_argument("--only", type=case_names, default=list(ALL_CASES),
                        help=f"Comma-separated cases to run (default: {','.join(ALL_CASES)}; "
                             f"{','.join(SCALE_CASES)}: the scale case, on {SCALE_DEVICES} devices in each of "
                             f"{', '.join(LAYOUTS)}, in the first --dtype).")
    # one measurement in a child process (set by run_child)
    parser.add_argument("--job", choices=("matmul", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(ALL_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=list(LAYOUTS), default="data", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", choices=(NATIVE, REFERENCE), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    accelerator = args.backend in ("cuda", "tpu")
    if args.dtype is None:
        args.dtype = [ACCELERATOR_DTYPE] if accelerator else ["float32", "bfloat16"]
    if args.reference_dtype is None:
        reference = ACCELERATOR_DTYPE if accelerator else "float32"
        args.reference_dtype = [dtype for dtype in (reference,) if dtype in args.dtype]
    unmeasured = [dtype for dtype in args.reference_dtype if dtype not in args.dtype]
    if unmeasured:
        parser.error(f"--reference-dtype {' '.join(unmeasured)}: not in --dtype {' '.join(args.dtype)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_arguments(argv)
    if args.job:
        run_job(args)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
