"""LoRA (low-rank adaptation, `--lora_rank`) for every model of this package, saved as a PEFT adapter.

A targeted linear layer (Flax `nn.Dense`, kernel [in, out]; GPT-2's `Conv1D`, kernel [out, in])
computes `layer(x) + scale * dropout(x) @ a @ b` with `a` [in, r], `b` [r, out], scale = alpha / r.
The base parameters stay frozen; `a` starts as PEFT's default lora_A (kaiming-uniform with
a = sqrt(5): uniform in +-1/sqrt(in)) and `b` as zeros, so training starts from the base model.
Layers the checkpoint lacked (a new classification head) train in full: PEFT's `modules_to_save`.

The trainable tree is {"adapters": {<module path>: {"a", "b"}}, "params": {<new heads' leaves>}} ("params"
only where there are new heads):
the train state, optimizer state and checkpoints hold only it; the frozen base goes into the
jitted step as an argument (`training.make_train_step(..., frozen_layout=...)`). The model's own
code is unchanged: `applied` intercepts the targeted layers' `__call__` (`nn.intercept_methods`),
which matches the layer by its scope path, the same under `nn.remat`. Evaluation uses the merged
parameters (kernel + scale * a @ b, exact without dropout).

Saved (`Adaptation.save`) as PEFT does: `adapter_config.json` and `adapter_model.safetensors` with
keys `base_model.model.<PyTorch module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r], and a new
head's weights under `base_model.model.<PyTorch key>`; `PeftModel.from_pretrained` loads them onto
the Transformers model.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from flax_finetune.errors import InputError

ModulePath = tuple[str, ...]

ALL_LINEAR = "all-linear"

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("t5", "mt5", "umt5"), ("q", "v")),
    "gpt2": ("c_attn",),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "roberta-prelayernorm", "electra", "albert", "roformer"),
                    ("query", "value")),
    "deberta-v2": ("query_proj", "value_proj"),
    "distilbert": ("q_lin", "v_lin"),
    "modernbert": ("Wqkv",),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt_neo", "opt", "bart", "mbart",
                     "marian", "pegasus", "whisper"), ("q_proj", "v_proj")),
}
"""Layers adapted when --lora_target_modules is not given: PEFT 0.21's defaults
(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), and the same choice for the model types it lacks."""

PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM", "speech-seq2seq": "SEQ_2_SEQ_LM",
    "sequence-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS", "question-answering": "QUESTION_ANS",
}
"""PEFT's task type per task (the PeftModel class that loads the adapter); masked LM has none."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DROPOUT_STREAM = 0x10AA  # folded into the step's dropout key: the adapters' dropout masks differ from the model's


@dataclass(frozen=True)
class Settings:
    """The --lora_* flags."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[str] = None  # comma list, ALL_LINEAR, or None (`DEFAULT_TARGETS`)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_args(cls, args: Any) -> "Settings":
        return cls(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)


@dataclass(frozen=True)
class Layer:
    """A linear layer of the model: its sizes and whether its kernel is [out, in] (PEFT's fan_in_fan_out)."""

    features_in: int
    features_out: int
    transposed: bool


def _linear_classes() -> tuple[type, ...]:
    from flax_finetune.modeling.gpt2 import Conv1D

    return (nn.Dense, Conv1D)


def linear_layers(model: Any, task: str) -> dict[ModulePath, Layer]:
    """Every linear layer the model calls, by module path (one shape-only forward pass that records them)."""
    from flax_finetune import models
    from flax_finetune.modeling.gpt2 import Conv1D

    linear = _linear_classes()
    found: dict[ModulePath, Layer] = {}

    def record(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, linear):
            inputs = args[0] if args else kwargs["inputs"]
            found[tuple(context.module.path)] = Layer(
                inputs.shape[-1], output.shape[-1], isinstance(context.module, Conv1D)
            )
        return output

    inputs = models.example_inputs(model.config, task)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda params: model(params, **inputs), model.params)
    return found


def _dotted(path: ModulePath) -> str:
    return ".".join(path)


def pytorch_module(path: ModulePath, model_type: str) -> str:
    """The PyTorch name of the module at `path` (the family's renames applied), as PEFT names modules."""
    from flax_finetune.modeling.checkpoint_io import pytorch_key

    return pytorch_key(path + ("bias",), model_type)[: -len(".bias")]


def _matches(path: ModulePath, name: str) -> bool:
    """PEFT's rule for a target name: the module's dotted name is it or ends with "." + it."""
    dotted = _dotted(path)
    return dotted == name or dotted.endswith("." + name)


def _head_modules(missing: list[ModulePath], base_prefix: str) -> tuple[ModulePath, ...]:
    """The modules that hold the leaves the checkpoint lacked (PEFT's modules_to_save): a top-level head
    such as "score" or "classifier" as a whole; inside the base model, the leaf's own module."""
    modules = {path[:1] if path[0] != base_prefix else path[:-1] for path in missing}
    return tuple(sorted(modules))


def _inside(path: tuple, modules: tuple[ModulePath, ...]) -> bool:
    return any(path[: len(module)] == module for module in modules)


@dataclass
class Adaptation:
    """The LoRA layout of one model: which layers get adapters, which heads train in full."""

    settings: Settings
    targets: dict[ModulePath, Layer]
    heads: tuple[ModulePath, ...]
    target_names: tuple[str, ...]  # adapter_config's target_modules: the names asked for, or full PyTorch names
    model_type: str
    task: str

    @classmethod
    def create(cls, model: Any, task: str, settings: Settings) -> "Adaptation":
        """Resolve the settings' target names on `model` (a `models.Model`); an InputError for names
        that match no linear layer, or a model type without default targets."""
        from flax_finetune import models

        model_type = model.config.model_type
        heads = _head_modules(list(model.missing), models.base_model_prefix(model_type))
        layers = {path: layer for path, layer in linear_layers(model, task).items() if not _inside(path, heads)}
        choices = ", ".join(sorted({path[-1] for path in layers}))
        spec = settings.target_modules
        if spec is not None and spec.strip().lower() == ALL_LINEAR:
            vocab_size = getattr(model.config, "vocab_size", None)
            targets = {path: layer for path, layer in layers.items() if layer.features_out != vocab_size}
            names = tuple(pytorch_module(path, model_type) for path in targets)  # as PEFT resolves all-linear
            return cls(settings, targets, heads, names, model_type, task)
        if spec is None:
            if model_type not in DEFAULT_TARGETS:
                raise InputError(
                    f"--lora_rank: no default target modules for model type {model_type!r}: give "
                    f"--lora_target_modules (names of its linear layers: {choices}, or {ALL_LINEAR})"
                )
            names = DEFAULT_TARGETS[model_type]
        else:
            names = tuple(name.strip() for name in spec.split(",") if name.strip())
        unmatched = [name for name in names if not any(_matches(path, name) for path in layers)]
        if unmatched or not names:
            raise InputError(
                f"--lora_target_modules {spec or ','.join(names)}: {', '.join(unmatched) or 'no name'} matches no "
                f"linear layer of this {model_type} model; its linear layers are named {choices} (or give {ALL_LINEAR})"
            )
        targets = {path: layer for path, layer in layers.items() if any(_matches(path, name) for name in names)}
        return cls(settings, targets, heads, names, model_type, task)

    # ---- parameter trees

    def init_adapters(self, key: jax.Array) -> dict:
        """{module path: {"a": [in, r] kaiming-uniform, "b": [r, out] zeros}} (float32), one key per layer."""
        rank, flat = self.settings.rank, {}
        for index, (path, layer) in enumerate(sorted(self.targets.items())):
            bound = 1.0 / math.sqrt(layer.features_in)
            flat[path + ("a",)] = jax.random.uniform(
                jax.random.fold_in(key, index), (layer.features_in, rank), jnp.float32, -bound, bound
            )
            flat[path + ("b",)] = jnp.zeros((rank, layer.features_out), jnp.float32)
        return unflatten_dict(flat)

    def split(self, params: Any, key: jax.Array) -> tuple[dict, dict]:
        """(frozen base params, trainable tree with new adapters and the heads' leaves)."""
        flat = flatten_dict(unfreeze(params))
        frozen = {path: leaf for path, leaf in flat.items() if not _inside(path, self.heads)}
        heads = {path: leaf for path, leaf in flat.items() if _inside(path, self.heads)}
        trainable = {"adapters": self.init_adapters(key)}
        if heads:  # no empty subtree: optax's masks drop it
            trainable["params"] = unflatten_dict(heads)
        return unflatten_dict(frozen), trainable

    def full_params(self, frozen: Any, trainable: Mapping) -> dict:
        """The model's parameter tree: the frozen base with the trained heads (adapters not folded in)."""
        return unflatten_dict({**flatten_dict(unfreeze(frozen)), **flatten_dict(unfreeze(trainable.get("params", {})))})

    def merged(self, frozen: Any, trainable: Mapping) -> dict:
        """The full parameter tree with every adapter folded into its kernel: kernel + scale * a @ b
        (transposed for an [out, in] kernel). The model gives the adapted outputs with no interception."""
        flat = flatten_dict(self.full_params(frozen, trainable))
        adapters = trainable["adapters"]
        for path, layer in self.targets.items():
            kernel = flat[path + ("kernel",)]
            delta = self.settings.scale * _adapter(adapters, path, "a") @ _adapter(adapters, path, "b")
            flat[path + ("kernel",)] = (kernel + (delta.T if layer.transposed else delta)).astype(kernel.dtype)
        return unflatten_dict(flat)

    def loss(self, loss_fn: Callable) -> Callable:
        """`loss_fn(params, batch, rng)` as `(trainable, batch, rng, frozen) -> (loss_sum, count)`, the adapters
        applied through `applied` (with dropout from `rng`)."""

        def adapted_loss(trainable, batch, rng, frozen):
            with applied(self, trainable["adapters"], jax.random.fold_in(rng, DROPOUT_STREAM)):
                return loss_fn(self.full_params(frozen, trainable), batch, rng)

        return adapted_loss

    def merge_step(self, mesh: Any, frozen: Any, trainable: Any) -> Callable:
        """Jitted `merged` for trees like `frozen` and `trainable`, its output laid out as training lays out
        parameters (`training.state_shardings`)."""
        from flax_finetune import training

        layout = training.state_shardings(jax.eval_shape(self.merged, frozen, trainable), mesh)
        return jax.jit(self.merged, out_shardings=layout)

    def counts(self, frozen: Any, trainable: Any) -> tuple[int, int]:
        """(trainable parameters, all parameters including the adapters)."""
        trained = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(trainable))
        return trained, trained + sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(frozen))

    # ---- PEFT files

    def peft_config(self, base_model_name_or_path: Optional[str]) -> dict:
        """PEFT's LoraConfig as `save_pretrained` writes it (the fields this adapter needs)."""
        alpha = self.settings.alpha
        return {
            "peft_type": "LORA",
            "task_type": PEFT_TASK_TYPES.get(self.task),
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.settings.rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": self.settings.dropout,
            "target_modules": list(self.target_names),
            "modules_to_save": [pytorch_module(head, self.model_type) for head in self.heads] or None,
            "fan_in_fan_out": any(layer.transposed for layer in self.targets.values()),
            "bias": "none",
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
        }

    def peft_tensors(self, trainable: Any) -> dict[str, np.ndarray]:
        """The adapter's tensors under PEFT's names, in PyTorch layout (float32)."""
        from flax_finetune.modeling.checkpoint_io import pytorch_key, swap_layout

        tensors = {}
        for path in self.targets:
            module = PEFT_PREFIX + pytorch_module(path, self.model_type)
            tensors[module + ".lora_A.weight"] = np.asarray(_adapter(trainable["adapters"], path, "a"), np.float32).T
            tensors[module + ".lora_B.weight"] = np.asarray(_adapter(trainable["adapters"], path, "b"), np.float32).T
        for path, leaf in flatten_dict(unfreeze(trainable.get("params", {}))).items():
            tensors[PEFT_PREFIX + pytorch_key(path, self.model_type)] = swap_layout(path, np.asarray(leaf, np.float32))
        return {key: np.ascontiguousarray(value) for key, value in tensors.items()}

    def save(self, directory: str, trainable: Any, base_model_name_or_path: Optional[str]) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` into `directory`."""
        from safetensors.numpy import save_file

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.peft_tensors(jax.device_get(trainable)), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = self.peft_config(base_model_name_or_path)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _adapter(adapters: Mapping, path: ModulePath, name: str) -> jax.Array:
    node = adapters
    for part in path:
        node = node[part]
    return node[name]


@contextlib.contextmanager
def applied(adaptation: Adaptation, adapters: Mapping, dropout_rng: Optional[jax.Array] = None) -> Iterator[None]:
    """Within: every targeted layer's output gains scale * dropout(x) @ a @ b, computed in the layer's
    dtype. Dropout (rate `settings.dropout`) needs `dropout_rng`; each layer folds its path into it."""
    scale, rate = adaptation.settings.scale, adaptation.settings.dropout
    linear = _linear_classes()

    def add_adapter(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, linear):
            return output
        path = tuple(context.module.path)
        if path not in adaptation.targets:
            return output
        inputs = args[0] if args else kwargs["inputs"]
        dtype = output.dtype
        if rate > 0 and dropout_rng is not None:
            key = jax.random.fold_in(dropout_rng, zlib.crc32(_dotted(path).encode()))
            keep = jax.random.bernoulli(key, 1.0 - rate, inputs.shape)
            inputs = jnp.where(keep, inputs / (1.0 - rate), 0)
        a, b = (_adapter(adapters, path, name).astype(dtype) for name in ("a", "b"))
        return output + (scale * (jnp.asarray(inputs, dtype) @ a @ b)).astype(dtype)

    with nn.intercept_methods(add_adapter):
        yield
