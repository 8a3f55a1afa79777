"""Fresh parameters without compiling the whole initialisation as one program.

`jax.jit(module.init)` makes XLA compile a threefry loop per random leaf (BERT-base: ~100 of them,
most of its ~13 s from-config start) and the forward pass `init` runs to create the parameters.
`Initialiser` traces `init` once, prunes the trace to the leaves wanted (which drops the forward
pass, and for a checkpoint with a new head everything but the head), and evaluates it op by op:
every random draw is a call of a jitted `jax.random` function, compiled once per shape and reused
for every leaf of that shape (BERT-base: 7 programs). The draws take their bits from
`hashed_bits` instead of threefry: 4x cheaper to compile and to run, same distributions.
Per-leaf keys are threefry's as before, so a seed gives the same params on every backend.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Collection, Optional

Path = tuple[str, ...]


def _mix(words: Any) -> Any:
    """murmur3's 32-bit finaliser: each input bit flips each output bit with probability ~1/2."""
    import numpy as np

    words = words ^ (words >> 16)
    words = words * np.uint32(0x85EBCA6B)
    words = words ^ (words >> 13)
    words = words * np.uint32(0xC2B2AE35)
    return words ^ (words >> 16)


def hashed_bits(key: Any, bit_width: int, shape: tuple[int, ...]) -> Any:
    """Random bits [*shape] (uint of `bit_width`) for a key (uint32 [2]): a hash of (key, element index)."""
    import numpy as np
    from jax import lax

    words_per_value = 2 if bit_width == 64 else 1
    counter = lax.iota(np.uint32, math.prod(shape) * words_per_value)
    words = _mix(_mix(counter * np.uint32(0x9E3779B9) + key[0]) ^ key[1])
    if bit_width == 64:
        pairs = words.reshape(-1, 2).astype(np.uint64)
        return ((pairs[:, 0] << np.uint64(32)) | pairs[:, 1]).reshape(shape)
    return words.astype(np.dtype(f"uint{bit_width}")).reshape(shape)


@functools.cache
def hashed_prng() -> Any:
    """A JAX PRNG implementation: threefry's keys, seeding, split and fold_in; `hashed_bits`' bits."""
    import jax.extend.random

    threefry = jax.extend.random.threefry_prng_impl
    return jax.extend.random.define_prng_impl(
        key_shape=threefry.key_shape, seed=threefry.seed, split=threefry.split, fold_in=threefry.fold_in,
        random_bits=hashed_bits, name="flax_finetune_hashed_bits", tag="ffhb",
    )


class Initialiser:
    """`init(key)` traced once (key: a threefry PRNGKey, drawing through `hashed_prng`): the params'
    shapes, and the values of any subset of its leaves."""

    def __init__(self, init: Callable[[Any], Any], key: Any):
        import jax

        self.key = key
        self.trace, self.shapes = jax.make_jaxpr(
            lambda key: init(jax.random.wrap_key_data(key, impl=hashed_prng())), return_shape=True
        )(key)
        flat_shapes, _ = jax.tree_util.tree_flatten_with_path(self.shapes)
        self.paths: list[Path] = [tuple(str(entry.key) for entry in path) for path, _ in flat_shapes]

    def values(self, paths: Optional[Collection[Path]] = None) -> dict:
        """The nested params dict of the leaves at `paths` (all when None), on the host."""
        import jax
        from flax.traverse_util import unflatten_dict
        from jax.interpreters import partial_eval

        wanted = [paths is None or path in paths for path in self.paths]
        pruned, key_used = partial_eval.dce_jaxpr(self.trace.jaxpr, wanted)  # keeps every constant
        leaves = jax.device_get(jax.core.eval_jaxpr(pruned, self.trace.consts, *([self.key] if key_used[0] else [])))
        return unflatten_dict(dict(zip([path for path, kept in zip(self.paths, wanted) if kept], leaves)))
