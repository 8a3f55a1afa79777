"""The model layer: the only place scripts get models, configs and tokenizers from.

`load(name_or_path, task)` returns a `Model`: one of this project's Flax
modules (`flax_finetune.modeling`), its params and its Transformers config.
Weights are read from `model.safetensors` (PyTorch layout, also sharded),
`flax_model.msgpack` (Transformers 4.x Flax) or `pytorch_model.bin` (with
torch); `Model.save` writes `model.safetensors` in PyTorch layout with
`config.json`, which Transformers' PyTorch classes load. Transformers
provides configs, tokenizers and feature extractors, in every version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from flax_finetune.errors import InputError

logger = logging.getLogger(__name__)

TASKS = (
    "sequence-classification",
    "token-classification",
    "question-answering",
    "masked-lm",
    "causal-lm",
    "seq2seq-lm",
    "speech-seq2seq",
)
DTYPES = ("float32", "bfloat16", "float16")

# files a hub download needs: weights in any supported format, configs, tokenizer and feature extractor
HUB_FILES = ["*.json", "*.safetensors", "*.msgpack", "*.txt", "*.model", "*.bin"]


def modules() -> dict:
    """(model type, task) -> Flax module class, for every architecture this project implements."""
    from flax_finetune import modeling

    modeling.import_all()
    return modeling.MODULES


def base_model_prefix(model_type: str) -> str:
    """The name of `model_type`'s base model in a head model's tree (as in Transformers' checkpoints)."""
    from flax_finetune import modeling

    return modeling.family(model_type).base_prefix


def supported(task: Optional[str] = None) -> list[str]:
    """The model types implemented (for `task`, or for any task)."""
    return sorted({model_type for model_type, implemented in modules() if task in (None, implemented)})


@dataclass
class Model:
    """A Flax module with its params and config.

    Call it as `model(params, input_ids=..., attention_mask=..., dropout_rng=key, train=True)`;
    it returns the module's `Output` (logits, or start/end logits).
    """

    module: Any
    params: Any
    config: Any
    generation_config: Any = None
    missing: tuple = ()
    """Paths of the leaves newly initialised because the checkpoint lacked them (a new head)."""

    def __call__(self, params, *, dropout_rng=None, train: bool = False, **inputs):
        rngs = {"dropout": dropout_rng} if train and dropout_rng is not None else {}
        return self.module.apply({"params": params}, **inputs, deterministic=not train, rngs=rngs)

    def generate(self, params, inputs: dict, **settings):
        """Token ids [batch, max_length] by greedy search (num_beams 1) or beam search, with a key/value cache.

        `inputs`: the encoder's (input_ids and attention_mask [batch, length], or input_features),
        or a causal LM's LEFT-padded prompt (input_ids and attention_mask [batch, prompt_length]);
        a causal LM's sequences start with the prompt. `settings` (max_length or max_new_tokens,
        num_beams; for Whisper also language and task) override the model's generation config,
        which supplies the rest (start and end tokens, padding (the end token where it has none),
        Whisper's forced prefix, length penalty). Traceable: scripts call it inside their jitted
        predict step.
        """
        from flax_finetune.modeling import generation

        options = generation.generation_kwargs(self.generation_config, **settings)
        return generation.generate(self.module, params, inputs, **options)

    def save(self, params, directory: str) -> None:
        """Write `config.json` (and `generation_config.json`) and `model.safetensors` in PyTorch layout."""
        import jax

        from flax_finetune.modeling import checkpoint_io

        self.config.save_pretrained(directory)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)
        checkpoint_io.write_safetensors(jax.device_get(params), directory, self.config.model_type, config=self.config)


def _is_encoder_decoder(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def module_class(config: Any, task: str) -> type:
    """The Flax module implementing `task` for `config`'s architecture; an InputError listing the supported ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    implemented = modules().get((config.model_type, task))
    if implemented is None:
        raise InputError(
            f"model type {config.model_type!r} is not supported for {task}; "
            f"supported: {', '.join(supported(task))}"
        )
    return implemented


def _jnp_dtype(dtype: str):
    import jax.numpy as jnp

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    return getattr(jnp, dtype)


def example_inputs(config: Any, task: str) -> dict:
    """Smallest inputs that build every parameter of a `task` module (shapes only matter)."""
    import jax.numpy as jnp

    tokens = jnp.ones((1, 8), jnp.int32)
    if task == "speech-seq2seq":
        features = jnp.zeros((1, config.num_mel_bins, 2 * config.max_source_positions), jnp.float32)
        return {"input_features": features, "decoder_input_ids": tokens}
    if task == "seq2seq-lm":
        return {"input_ids": tokens, "decoder_input_ids": tokens}
    return {"input_ids": tokens}


def init_function(module: Any, config: Any, task: str):
    """PRNG key -> a freshly initialised params tree (traceable: `jax.eval_shape` gives the shapes;
    `initialisation.Initialiser` computes the values without compiling it as one program)."""
    inputs = example_inputs(config, task)
    return lambda key: module.init(key, **inputs)["params"]


def _generation_config(folder: Optional[Path], config: Any) -> Any:
    """The checkpoint's generation_config.json, else one derived from the model config (its start,
    end and padding ids), for encoder-decoders and architectures with a causal-lm module; else None."""
    if not (_is_encoder_decoder(config) or (config.model_type, "causal-lm") in modules()):
        return None
    import transformers

    if folder is not None and (folder / "generation_config.json").is_file():
        return transformers.GenerationConfig.from_pretrained(folder)
    return transformers.GenerationConfig.from_model_config(config)


def _local_folder(name_or_path: str, hub: Optional[dict]) -> Path:
    """`name_or_path` as a folder: itself, or its hub snapshot (downloaded once into the cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise InputError(f"--model_name_or_path {name_or_path}: no such model folder")
    from huggingface_hub import snapshot_download

    options = hub or {}
    try:
        return Path(snapshot_download(
            name_or_path, allow_patterns=HUB_FILES, cache_dir=options.get("cache_dir"),
            revision=options.get("revision"), token=options.get("token"),
        ))
    except Exception as error:  # noqa: BLE001  (network, auth, missing repo: all mean "cannot get it")
        raise InputError(f"--model_name_or_path {name_or_path}: not a folder, and the hub has none: {error}") from None


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
    the checkpoint does not have are initialised from `seed` (logged), and
    only they: nothing else of the initialisation is computed. `hub` holds
    cache_dir / revision / token for hub downloads.
    """
    import jax

    from flax_finetune.initialisation import Initialiser
    from flax_finetune.modeling import checkpoint_io

    folder = _local_folder(name_or_path, hub)
    config = config if config is not None else load_config(str(folder))
    module = module_class(config, task)(config=config, dtype=_jnp_dtype(dtype))
    initialiser = Initialiser(init_function(module, config, task), jax.random.PRNGKey(seed))
    shapes = initialiser.shapes
    try:
        params, missing, unexpected = checkpoint_io.read_params(
            folder, shapes, base_model_prefix(config.model_type), config.model_type
        )
    except (OSError, ValueError) as error:
        raise InputError(f"--model_name_or_path {name_or_path}: {error}") from None
    if unexpected:
        logger.info("%s: not used by the %s model: %s", name_or_path, task, _summary(unexpected))
    if missing:
        logger.info("%s: newly initialised (not in the checkpoint): %s", name_or_path, _summary(["/".join(p) for p in missing]))
        params = _fill_missing(params, initialiser.values(set(missing)), shapes)
    return Model(module, params, config, _generation_config(folder, config), tuple(missing))


def _summary(names: list[str], shown: int = 8) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _fill_missing(params: dict, initialised: dict, shapes: Any) -> dict:
    """`params` with the leaves it lacks taken from `initialised`, in the order of the `shapes` tree."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    loaded, new = flatten_dict(params), flatten_dict(initialised)
    return unflatten_dict({path: loaded[path] if path in loaded else new[path] for path in flatten_dict(shapes)})


def from_config(config: Any, task: str, *, dtype: str = "float32", seed: int = 0) -> Model:
    """A freshly initialised model (training from scratch); the same params for the same `seed`."""
    import jax

    from flax_finetune.initialisation import Initialiser

    module = module_class(config, task)(config=config, dtype=_jnp_dtype(dtype))
    params = Initialiser(init_function(module, config, task), jax.random.PRNGKey(seed)).values()
    return Model(module, params, config, _generation_config(None, config))


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
        raise InputError(f"--model_type {model_type}: unknown; supported: {', '.join(supported())}")
    if model_type not in supported():
        raise InputError(f"--model_type {model_type}: not implemented here; supported: {', '.join(supported())}")
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


def cast_params(params: Any, param_dtype: str) -> Any:
    """`params` with every floating-point leaf in `param_dtype` ("float32" or "bfloat16"); others unchanged."""
    import jax
    import jax.numpy as jnp

    target = jnp.dtype(param_dtype)

    def cast(leaf):
        return leaf.astype(target) if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != target else leaf

    return jax.tree_util.tree_map(cast, params)
