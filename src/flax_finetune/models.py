"""The model layer: the only place scripts get models, configs and tokenizers from.

`load(name_or_path, task)` returns a `Model` (a callable module, its params
and its config) whatever implements it; today the implementations are
Transformers' Flax classes (Transformers 4.x). `save` writes the
`save_pretrained` folder: config, weights, tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from flax_finetune.errors import InputError

logger = logging.getLogger(__name__)

# task -> the Transformers Flax auto class that implements it
TASK_CLASSES = {
    "sequence-classification": "FlaxAutoModelForSequenceClassification",
    "token-classification": "FlaxAutoModelForTokenClassification",
    "question-answering": "FlaxAutoModelForQuestionAnswering",
    "masked-lm": "FlaxAutoModelForMaskedLM",
    "causal-lm": "FlaxAutoModelForCausalLM",
    "seq2seq-lm": "FlaxAutoModelForSeq2SeqLM",
    "speech-seq2seq": "FlaxAutoModelForSpeechSeq2Seq",
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Model:
    """A Flax model: call it as `model(params, **inputs, dropout_rng=..., train=...)`."""

    implementation: Any
    params: Any
    config: Any

    def __call__(self, params, *args, **kwargs):
        return self.implementation(*args, params=params, **kwargs)

    def save(self, params, directory: str) -> None:
        """Write config and weights in `save_pretrained` layout."""
        import jax

        self.implementation.save_pretrained(directory, params=jax.device_get(params))


def auto_class_for(task: str):
    """The Transformers Flax auto class for `task`; an InputError where Transformers has none."""
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_CLASSES)}")
    import transformers

    auto_class = getattr(transformers, TASK_CLASSES[task], None)
    if auto_class is None:
        raise InputError(
            f"transformers {transformers.__version__} has no Flax model classes "
            f"(they were removed in Transformers 5); install transformers<5 for the {task} models"
        )
    return auto_class


def _jnp_dtype(dtype: str):
    import jax.numpy as jnp

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    return getattr(jnp, dtype)


def _supported_model_types(auto_class) -> list[str]:
    return sorted(config.model_type for config in auto_class._model_mapping.keys())


def load(
    name_or_path: str,
    task: str,
    *,
    config: Any = None,
    dtype: str = "float32",
    seed: int = 0,
    hub: Optional[dict] = None,
) -> Model:
    """Load pretrained weights for `task` from a folder or hub name.

    `config` overrides the checkpoint's config (e.g. a new label count); heads
    the checkpoint does not have are initialised from `seed`. `hub` holds
    cache_dir / revision / token for hub downloads.
    """
    auto_class = auto_class_for(task)
    config = config if config is not None else load_config(name_or_path, hub=hub)
    if type(config) not in auto_class._model_mapping:
        raise InputError(
            f"{name_or_path}: model type {config.model_type!r} has no Flax {task} model; "
            f"supported: {', '.join(_supported_model_types(auto_class))}"
        )
    options = dict(config=config, dtype=_jnp_dtype(dtype), **(hub or {}))
    try:
        try:
            implementation, params = auto_class.from_pretrained(name_or_path, _do_init=False, **options)
        except ValueError as error:
            if "_do_init" not in str(error):
                raise
            # Transformers converts PyTorch-layout weights only into an initialised model: slower, same result.
            implementation = auto_class.from_pretrained(name_or_path, seed=seed, **options)
            return Model(implementation, implementation.params, config)
    except (OSError, ValueError) as error:
        raise InputError(f"--model_name_or_path {name_or_path}: {error}") from None
    return Model(implementation, _initialise(implementation, seed, params), config)


def from_config(config: Any, task: str, *, dtype: str = "float32", seed: int = 0) -> Model:
    """A freshly initialised model (training from scratch)."""
    auto_class = auto_class_for(task)
    if type(config) not in auto_class._model_mapping:
        raise InputError(
            f"model type {config.model_type!r} has no Flax {task} model; "
            f"supported: {', '.join(_supported_model_types(auto_class))}"
        )
    implementation = auto_class.from_config(config, dtype=_jnp_dtype(dtype), _do_init=False)
    return Model(implementation, _initialise(implementation, seed), config)


def _initialise(implementation, seed: int, params=None):
    """Random values for every parameter missing from `params`, in one compiled init.

    Transformers' eager initialisation compiles op by op (seconds even for a
    tiny model); jitting it compiles once. Returns the complete tree.
    """
    import flax
    import jax

    flat = flax.traverse_util.flatten_dict(params or {})
    if params is not None and set(flat) >= set(implementation.required_params):
        return params
    init = jax.jit(implementation.init_weights, static_argnums=1)
    full = init(jax.random.PRNGKey(seed), implementation.input_shape, params)
    return flax.core.unfreeze(full)


def load_config(name_or_path: str, *, hub: Optional[dict] = None, **overrides):
    """AutoConfig from a folder or hub name, with keyword overrides."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(name_or_path, **(hub or {}), **overrides)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load a model config from {name_or_path}: {error}") from None


def new_config(model_type: str, **overrides):
    """A default config of `model_type` (e.g. "gpt2"), for training from scratch."""
    import transformers

    if model_type not in transformers.CONFIG_MAPPING:
        raise InputError(f"--model_type {model_type}: unknown; known types include "
                         f"{', '.join(sorted(transformers.CONFIG_MAPPING.keys())[:40])}, ...")
    return transformers.CONFIG_MAPPING[model_type](**overrides)


def load_tokenizer(name_or_path: str, *, use_fast: bool = True, hub: Optional[dict] = None, **kwargs):
    """AutoTokenizer from a folder or hub name."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path, use_fast=use_fast, **(hub or {}), **kwargs)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load a tokenizer from {name_or_path}: {error}") from None


def load_feature_extractor(name_or_path: str, *, hub: Optional[dict] = None):
    """AutoFeatureExtractor (audio front end) from a folder or hub name."""
    import transformers

    try:
        return transformers.AutoFeatureExtractor.from_pretrained(name_or_path, **(hub or {}))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load a feature extractor from {name_or_path}: {error}") from None
