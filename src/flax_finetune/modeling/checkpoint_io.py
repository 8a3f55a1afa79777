"""Parameter trees of this project's Flax models, read from and written to Transformers checkpoint files.

`read_params` reads, in this order of preference, from a model folder:

1. `model.safetensors` (or its shards through `model.safetensors.index.json`): PyTorch layout,
   or Flax layout where the file's metadata says `{"format": "flax"}` (Transformers 4.x Flax
   `save_pretrained(safe_serialization=True)`);
2. `flax_model.msgpack` (or `flax_model.msgpack.index.json`): Flax layout, as Transformers 4.x
   Flax `save_pretrained` writes it;
3. `pytorch_model.bin` (or `pytorch_model.bin.index.json`): PyTorch layout, read with torch.

`write_safetensors` writes `model.safetensors` in the PyTorch layout, which Transformers' PyTorch
classes load, and its 4.x Flax classes too (they convert it without torch).

A Flax path and a PyTorch key name the same parameter by these rules (`pytorch_key`):

- the path's parts joined with "." (a layer index is a part: `encoder/layer/0` <-> `encoder.layer.0`);
- Flax `kernel` <-> PyTorch `weight` with the axes reversed: Dense [in, out] <-> Linear
  [out, in]; Conv [width, in, out] <-> Conv1d [out, in, width]; GPT-2's own FlaxConv1D [out, in]
  <-> its PyTorch Conv1D [in, out];
- Flax `scale` (LayerNorm) and `embedding` (Embed) <-> `weight`, same array;
- any other name (`bias`, T5's LayerNorm `weight`, a masked-LM head's output `bias`) is kept, same array;
- the model type's `Family` (flax_finetune.modeling): a top-level Flax module with another
  PyTorch name (Whisper's output layer: Flax `lm_head`, PyTorch `proj_out`), and the keys a
  family's checkpoints hold for tied parameters or constants, skipped on reading;
- on reading, the `LayerNorm.gamma` / `LayerNorm.beta` of old PyTorch checkpoints mean
  `LayerNorm.weight` / `LayerNorm.bias`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
from flax.core import unfreeze
from flax.serialization import msgpack_restore
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from flax_finetune.errors import InputError
from flax_finetune.modeling import family

FlaxPath = tuple[str, ...]

SAFETENSORS_NAME = "model.safetensors"
FLAX_NAME = "flax_model.msgpack"
PYTORCH_NAME = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"

TIED_PYTORCH_KEYS: tuple[str, ...] = (
    "lm_head.weight",  # GPT-2, T5 v1.0 (tied to the token embedding)
    "proj_out.weight",  # Whisper
    "encoder.embed_tokens.weight",  # T5 (the shared embedding)
    "decoder.embed_tokens.weight",  # T5
    "cls.predictions.decoder.weight",  # BERT masked LM
    "cls.predictions.decoder.bias",  # BERT: the head's own `bias`
    "lm_head.decoder.weight",  # RoBERTa masked LM
    "lm_head.decoder.bias",  # RoBERTa: the head's own `bias`
    "vocab_projector.weight",  # DistilBERT masked LM
)
"""PyTorch keys (ends of keys) a Flax model may lack because it reuses another parameter there.

Such a key is skipped, not reported as unexpected, where the Flax tree has no parameter for it."""

PYTORCH_BUFFERS: tuple[str, ...] = (
    "embeddings.position_ids",  # BERT, RoBERTa, DistilBERT checkpoints from older Transformers
    "attn.bias",  # GPT-2's causal mask
    "attn.masked_bias",  # GPT-2
)
"""Ends of keys that older PyTorch checkpoints hold for buffers, not parameters: skipped on reading."""


class LoadedParams(NamedTuple):
    """What `read_params` found: unpacks as `params, missing, unexpected`."""

    params: dict
    """Nested dict in the Flax layout, numpy float32, for every expected path the checkpoint has."""
    missing: list[FlaxPath]
    """Expected paths the checkpoint lacks (or, with `ignore_mismatched`, has in another shape)."""
    unexpected: list[str]
    """Checkpoint keys, as written in the file, that match no expected path."""


def pytorch_key(path: FlaxPath, model_type: Optional[str] = None) -> str:
    """The PyTorch state-dict key of the Flax parameter at `path`."""
    *modules, leaf = path
    if modules:
        renames = family(model_type).pytorch_renames if model_type else {}
        modules[0] = renames.get(modules[0], modules[0])
    if leaf in ("kernel", "scale", "embedding"):
        leaf = "weight"
    return ".".join([*modules, leaf])


def swap_layout(path: FlaxPath, array: np.ndarray) -> np.ndarray:
    """The array of the parameter at `path` in the other framework's layout (the same rule both ways)."""
    if path[-1] != "kernel":
        return array
    if array.ndim > 3:
        raise ValueError(f"{'/'.join(path)}: no layout rule for a {array.ndim}-d kernel")
    return np.ascontiguousarray(np.transpose(array))


def flax_to_pytorch(params: Any, model_type: Optional[str] = None) -> dict[str, np.ndarray]:
    """A Flax parameter tree as a PyTorch state dict of numpy arrays."""
    return {
        pytorch_key(path, model_type): swap_layout(path, np.asarray(leaf))
        for path, leaf in flatten_dict(unfreeze(params)).items()
    }


def write_safetensors(
    params: Any, folder: str | os.PathLike, model_type: Optional[str] = None, config: Any = None
) -> Path:
    """Write `params` to `folder/model.safetensors` in the PyTorch layout; returns the file's path.

    Tied weights are written once, under the Flax tree's name (e.g. GPT-2's `transformer.wte.weight`,
    no `lm_head.weight`), as Transformers' PyTorch `save_pretrained` does: its classes tie them
    again on loading. With the model's `config`, the family's `pytorch_constants` are written too
    (under the base model's prefix where the parameters have it). The file is replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SAFETENSORS_NAME
    partial = folder / (SAFETENSORS_NAME + ".partial")
    state_dict = flax_to_pytorch(params, model_type)
    declared = family(model_type) if model_type else None
    if config is not None and declared is not None and declared.pytorch_constants is not None:
        prefixed = any(key.startswith(declared.base_prefix + ".") for key in state_dict)
        start = declared.base_prefix + "." if prefixed else ""
        for key, array in declared.pytorch_constants(config).items():
            state_dict[start + key] = np.asarray(array, np.float32)
    save_file(state_dict, str(partial), metadata={"format": "pt"})
    os.replace(partial, target)
    return target


def read_params(
    folder: str | os.PathLike,
    expected: Any,
    base_model_prefix: str,
    model_type: Optional[str] = None,
    ignore_mismatched: bool = False,
) -> LoadedParams:
    """Read the parameters a model with the tree `expected` (arrays or jax.ShapeDtypeStruct) needs from `folder`.

    `base_model_prefix` (e.g. "bert") lets a base-model checkpoint fill a head model's tree
    (its keys get the prefix) and a head model's checkpoint fill a base model's tree (the prefix
    is dropped and the head's keys are unexpected). A shape that differs from the expected one is
    an InputError naming every such key, unless `ignore_mismatched`: then those paths are missing.
    """
    folder = Path(folder)
    shapes = {path: tuple(leaf.shape) for path, leaf in flatten_dict(unfreeze(expected)).items()}
    with _open_checkpoint(folder) as (layout, tensors):
        if layout == "pytorch":
            separator = "."
            path_of = {pytorch_key(path, model_type): path for path in shapes}
        else:
            separator = "/"
            path_of = {"/".join(path): path for path in shapes}
        name_in_model = _prefix_fix(tensors, shapes, base_model_prefix, separator, path_of)

        declared = family(model_type) if model_type else family("")
        skipped = TIED_PYTORCH_KEYS + PYTORCH_BUFFERS + declared.tied_pytorch_keys + declared.skipped_pytorch_keys
        found: dict[FlaxPath, np.ndarray] = {}
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, read_tensor in tensors.items():
            name = name_in_model(_modern_name(key) if layout == "pytorch" else key)
            path = path_of.get(name)
            if path is None:
                if layout != "pytorch" or not _ends_with_any(name, skipped):
                    unexpected.append(key)
                continue
            tensor = read_tensor()
            array = swap_layout(path, tensor) if layout == "pytorch" else tensor
            if array.shape != shapes[path]:
                wanted = shapes[path][::-1] if layout == "pytorch" and path[-1] == "kernel" else shapes[path]
                mismatched.append(f"{key} is {tuple(tensor.shape)} in the checkpoint, {wanted} in the model")
                continue
            found[path] = np.asarray(array, dtype=np.float32)

    if mismatched and not ignore_mismatched:
        raise InputError(
            f"{folder}: shapes differ from the model's (in the checkpoint's layout): {'; '.join(mismatched)}. "
            "To initialise a new head of another size instead, ask for ignore_mismatched"
        )
    missing = sorted(path for path in shapes if path not in found)
    return LoadedParams(unflatten_dict(found), missing, unexpected)


def _prefix_fix(
    tensors: dict, shapes: dict[FlaxPath, tuple], prefix: str, separator: str, path_of: dict[str, FlaxPath]
) -> Callable[[str], str]:
    """How a checkpoint key becomes a key of the model's tree where only one of them has the base-model prefix."""
    model_has_prefix = any(path[0] == prefix for path in shapes)
    checkpoint_has_prefix = any(key.split(separator, 1)[0] == prefix for key in tensors)
    start = prefix + separator
    if model_has_prefix and not checkpoint_has_prefix:
        return lambda key: start + key if start + key in path_of else key
    if checkpoint_has_prefix and not model_has_prefix:
        return lambda key: key[len(start):] if key.startswith(start) else key
    return lambda key: key


def _modern_name(key: str) -> str:
    """The current name of a PyTorch key written by older Transformers (LayerNorm gamma/beta)."""
    for old, new in (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")):
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def _ends_with_any(key: str, ends: tuple[str, ...]) -> bool:
    """Whether `key` is one of `ends` or ends with "." and one of them."""
    return any(key == end or key.endswith("." + end) for end in ends)


def _checkpoint_files(folder: Path) -> tuple[str, list[Path]]:
    """The preferred checkpoint format in `folder` and its file (or shard files)."""
    for name in (SAFETENSORS_NAME, FLAX_NAME, PYTORCH_NAME):
        if (folder / name).is_file():
            return name, [folder / name]
        index = folder / (name + INDEX_SUFFIX)
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return name, [folder / shard for shard in dict.fromkeys(weight_map.values())]
    raise InputError(
        f"{folder}: no checkpoint: expected {SAFETENSORS_NAME}, {FLAX_NAME} or {PYTORCH_NAME} "
        f"(or the {INDEX_SUFFIX} of its shards)"
    )


@contextlib.contextmanager
def _open_checkpoint(folder: Path) -> Iterator[tuple[str, dict[str, Callable[[], np.ndarray]]]]:
    """The checkpoint's layout ("pytorch" or "flax") and a reader of each of its tensors by key.

    Flax-layout keys are the path's parts joined with "/"; a safetensors tensor is read only
    when asked for."""
    name, files = _checkpoint_files(folder)
    for file in files:
        if not file.is_file():
            raise InputError(f"{file}: missing, but its index names it")
    if name == SAFETENSORS_NAME:
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(safe_open(str(file), framework="numpy")) for file in files]
            flax_layout = any((handle.metadata() or {}).get("format") == "flax" for handle in handles)
            tensors = {
                key.replace(".", "/") if flax_layout else key: (lambda handle=handle, key=key: handle.get_tensor(key))
                for handle in handles
                for key in handle.keys()
            }
            yield ("flax" if flax_layout else "pytorch"), tensors
    elif name == FLAX_NAME:
        tensors = {}
        for file in files:
            tree = msgpack_restore(file.read_bytes())
            tensors.update({"/".join(path): _constant(leaf) for path, leaf in flatten_dict(tree).items()})
        yield "flax", tensors
    else:
        tensors = {}
        for file in files:
            tensors.update({key: _constant(array) for key, array in _torch_load(file).items()})
        yield "pytorch", tensors


def _constant(array: Any) -> Callable[[], np.ndarray]:
    """A reader that returns an array already in memory."""
    return lambda: np.asarray(array)


def _torch_load(file: Path) -> dict[str, np.ndarray]:
    """A `pytorch_model.bin` (or shard) as numpy arrays; an InputError where torch is missing."""
    try:
        import torch
    except ImportError:
        raise InputError(
            f"{file}: reading a PyTorch .bin checkpoint needs torch, which is not installed: "
            f"install torch, or convert the checkpoint to {SAFETENSORS_NAME}"
        ) from None
    state_dict = torch.load(file, map_location="cpu", weights_only=True)
    return {key: tensor.detach().float().numpy() for key, tensor in state_dict.items()}
