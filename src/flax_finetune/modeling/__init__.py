"""This project's own Flax (Linen) models: the architectures and heads the eight scripts use.

Transformers 5 deleted its Flax classes, and Flax T5 in Transformers 4.x
breaks on jax >= 0.10; these implementations replace them. Transformers is
still used for configs, tokenizers, feature extractors and file formats.

Contract (every architecture module fills `MODULES` through `register`):

- `MODULES[(model_type, task)]` is a `flax.linen.Module` class, built as
  `Module(config=<a Transformers config>, dtype=<computation dtype>)`.
- Its parameter tree has exactly the names and shapes of the matching
  Transformers 4.x Flax class's `params` (e.g. FlaxBertForSequenceClassification:
  {"bert": {...}, "classifier": {...}}), so the same parameters (and a
  `flax_model.msgpack` written by Transformers 4.x) work with both.
- `module.apply({"params": params}, <inputs>, deterministic=..., rngs={"dropout": key})`
  takes the inputs the Transformers class takes (input_ids, attention_mask,
  token_type_ids, position_ids, decoder_input_ids, decoder_attention_mask,
  input_features, ...) as keyword arguments and returns an `Output`.
- Tasks: "sequence-classification", "token-classification",
  "question-answering", "masked-lm", "causal-lm", "seq2seq-lm",
  "speech-seq2seq".
- `FAMILIES[model_type]` (filled through `register_family`) says how the family's
  checkpoints name things: the base model's name in head trees and the PyTorch
  names that differ from the Flax tree's.

Every module of this package except the shared machinery (`SHARED_MODULES`)
is an architecture module; `import_all()` imports them, so adding a family is
adding a module.

Rematerialisation: every architecture builds its repeated layers through
`layer(LayerClass)`, so that under `rematerialised(policy)` (which the training
step enters for `--gradient_checkpointing`) each layer's activations are
recomputed in the backward pass instead of stored. A layer's flags (arguments
named in `STATIC_LAYER_ARGUMENTS`, such as `deterministic`) are static there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import flax
import flax.linen as nn

MODULES: dict[tuple[str, str], type] = {}

SHARED_MODULES = frozenset({"checkpoint_io", "generation"})
"""Modules of this package that hold shared machinery, not an architecture."""


@dataclass(frozen=True)
class Family:
    """How one model type's Hub checkpoints relate to this project's parameter trees.

    base_prefix: the base model's name in a head model's tree ("bert", "roberta", "model", ...),
        so that a base-model checkpoint fills a head model and the other way round.
    pytorch_renames: top-level Flax module name -> its PyTorch name (Whisper: lm_head -> proj_out).
    tied_pytorch_keys: ends of PyTorch keys a checkpoint may hold for a parameter the Flax tree
        shares with another (a tied output projection): skipped on reading, not unexpected.
    skipped_pytorch_keys: ends of PyTorch keys that are buffers or constants here (fixed sinusoidal
        positions, rotary caches): skipped on reading.
    pytorch_constants: config -> {PyTorch key below the base model: array}, constants that are no
        parameters here but that Transformers' PyTorch class reports missing when a checkpoint lacks
        them (Pegasus' sinusoidal positions): written with the parameters when the config is known.
    """

    base_prefix: str
    pytorch_renames: Mapping[str, str] = field(default_factory=dict)
    tied_pytorch_keys: tuple[str, ...] = ()
    skipped_pytorch_keys: tuple[str, ...] = ()
    pytorch_constants: Optional[Callable[[Any], Mapping[str, Any]]] = None


FAMILIES: dict[str, Family] = {}


def register_family(model_type: str, family: Family) -> None:
    """Declare how `model_type`'s checkpoints are named (see `Family`)."""
    FAMILIES[model_type] = family


def family(model_type: str) -> Family:
    """The registered `Family` of `model_type`; a family with no base prefix where none is registered."""
    import_all()
    return FAMILIES.get(model_type, Family(base_prefix=""))


def import_all() -> None:
    """Import every architecture module of this package (each registers its modules and families)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in SHARED_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


@flax.struct.dataclass
class Output:
    """What a model returns: the logits of its head (start/end logits for question answering)."""

    logits: Optional[Any] = None
    start_logits: Optional[Any] = None
    end_logits: Optional[Any] = None


def register(model_type: str, task: str):
    """Class decorator: `module` implements `task` for configs of `model_type`."""

    def decorate(module: type) -> type:
        MODULES[(model_type, task)] = module
        return module

    return decorate


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
"""What a rematerialised layer keeps from its forward pass (`jax.checkpoint_policies`): nothing (least
memory), the outputs of its matrix products, or those without batch dimensions (the weights' products)."""

# Layer arguments that are Python flags, not arrays: static in the rematerialised call.
STATIC_LAYER_ARGUMENTS = frozenset({"deterministic", "layer_index", "is_sliding", "causal"})

_remat: contextvars.ContextVar[Optional[tuple[str, list]]] = contextvars.ContextVar("remat", default=None)


@contextlib.contextmanager
def rematerialised(policy: Optional[str]) -> Iterator[list]:
    """Within: layers built through `layer` are rematerialised with `policy` (None: not at all).

    Yields the list of layer classes rematerialised so far, so that a caller can tell a model
    without rematerialisable layers from one that has them."""
    if policy is not None and policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; known: {', '.join(REMAT_POLICIES)}")
    built: list = []
    token = _remat.set(None if policy is None else (policy, built))
    try:
        yield built
    finally:
        _remat.reset(token)


def layer(layer_class: type) -> type:
    """`layer_class`, or its rematerialised version inside `rematerialised(policy)` (same parameters)."""
    setting = _remat.get()
    if setting is None:
        return layer_class
    policy, built = setting
    built.append(layer_class)
    return _rematerialised_class(layer_class, policy)


@functools.lru_cache(maxsize=None)
def _rematerialised_class(layer_class: type, policy: str) -> type:
    """A subclass of `layer_class` whose `__call__` runs under `nn.remat`, its flags (positional or
    keyword) static. Parameters and submodule names are those of `layer_class`."""
    import jax

    signature = inspect.signature(layer_class.__call__)

    def run(module, flags, arguments):
        return layer_class.__call__(module, **arguments, **dict(flags))

    checkpointed = nn.remat(run, policy=getattr(jax.checkpoint_policies, policy), static_argnums=(1,))

    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(name, {}))
        del named["self"]
        flags = tuple(sorted((name, value) for name, value in named.items() if name in STATIC_LAYER_ARGUMENTS))
        arguments = {name: value for name, value in named.items() if name not in STATIC_LAYER_ARGUMENTS}
        return checkpointed(self, flags, arguments)

    return type(layer_class.__name__, (layer_class,), {"__call__": __call__, "__module__": layer_class.__module__})
