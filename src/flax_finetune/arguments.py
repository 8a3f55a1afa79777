"""Command-line arguments: dataclasses with the flag names users of the Transformers examples know.

`parse_args((ModelArguments, DataArguments, TrainingArguments), argv)` turns a
command line (or a single `.json` file of flag values) into one instance per
dataclass. Each dataclass becomes a titled group in `--help`. As with
Transformers' HfArgumentParser, a flag on the command line may be shortened
to any unambiguous prefix (`--dataset_config` for `--dataset_config_name`);
the keys of a JSON file must be spelled out. Only the standard library is
imported here, so `--help` returns at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from flax_finetune.errors import InputError

LATEST_CHECKPOINT = "latest"


def arg(default: Any = dataclasses.MISSING, help: str = "", const: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag with a one-line help.

    With `const`, the flag may also be given without a value, meaning `const`.
    """
    if isinstance(default, (list, dict)):
        kwargs["default_factory"] = lambda: type(default)(default)
    else:
        kwargs["default"] = default
    metadata = {"help": help} if const is dataclasses.MISSING else {"help": help, "const": const}
    return dataclasses.field(metadata=metadata, **kwargs)


def _to_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "y", "t"):
        return True
    if lowered in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unwrap_optional(annotation: Any) -> Any:
    """`Optional[X]` / `X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _add_field(group: argparse._ArgumentGroup, field: dataclasses.Field, annotation: Any) -> None:
    annotation = _unwrap_optional(annotation)
    options: dict[str, Any] = {"help": field.metadata.get("help", "")}
    if "const" in field.metadata:  # the flag may be given without a value
        options.update(nargs="?", const=field.metadata["const"])
    if field.default is not dataclasses.MISSING:
        options["default"] = field.default
    elif field.default_factory is not dataclasses.MISSING:
        options["default"] = field.default_factory()
    else:
        options["required"] = True
    flag = f"--{field.name}"
    if annotation is bool:
        options.update(nargs="?", const=True, type=_to_bool, metavar="BOOL")
        group.add_argument(flag, **options)
        if options.get("default") is True:
            group.add_argument(
                f"--no_{field.name}", dest=field.name, action="store_false",
                help=f"Same as {flag} false.",
            )
        return
    origin = typing.get_origin(annotation)
    if origin is Literal:
        options["choices"] = list(typing.get_args(annotation))
        options["type"] = type(options["choices"][0])
    elif origin in (list, Sequence):
        options["nargs"] = "+"
        options["type"] = typing.get_args(annotation)[0]
    else:
        options["type"] = annotation
    group.add_argument(flag, **options)


def build_parser(
    dataclass_types: Sequence[type],
    description: str | None = None,
    prog: str | None = None,
    allow_abbrev: bool = True,
) -> argparse.ArgumentParser:
    """An argparse parser with one group per dataclass.

    `allow_abbrev`: accept an unambiguous prefix of a flag (argparse's rule, which the original
    examples' HfArgumentParser kept); an ambiguous one is an error naming the candidates.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=allow_abbrev,
    )
    for dataclass_type in dataclass_types:
        title = (dataclass_type.__doc__ or dataclass_type.__name__).strip().splitlines()[0]
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(dataclass_type)
        for field in dataclasses.fields(dataclass_type):
            if field.init:
                _add_field(group, field, hints[field.name])
    return parser


def _shown_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _json_to_argv(path: Path) -> list[str]:
    """A JSON object of flag values -> the equivalent command line."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read arguments from {path}: {error}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a JSON object of flag names and values")
    argv: list[str] = []
    for name, value in values.items():
        if isinstance(value, list):
            argv += [f"--{name}", *map(str, value)]
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    script: str | None = None,
) -> tuple[Any, ...]:
    """Parse `argv` (default: sys.argv[1:]) into one instance of each dataclass.

    A single argument ending in `.json` is read as a JSON object of flag values,
    whose keys must be full flag names (HfArgumentParser rejected other keys).
    On the command line an unambiguous prefix of a flag stands for the flag.
    Unknown flags are an error: a flag that is accepted is always honoured.
    `script` (the script's file) names the program and goes into
    `TrainingArguments.command`, the command line recorded in the model card.
    """
    argv = [str(item) for item in (sys.argv[1:] if argv is None else argv)]  # paths welcome
    from_json = len(argv) == 1 and argv[0].endswith(".json")
    if from_json:
        argv = _json_to_argv(Path(argv[0]))
    prog = Path(script).name if script else None
    parser = build_parser(dataclass_types, description, prog, allow_abbrev=not from_json)
    namespace = vars(parser.parse_args(argv))
    instances = []
    for dataclass_type in dataclass_types:
        names = [field.name for field in dataclasses.fields(dataclass_type) if field.init]
        instance = dataclass_type(**{name: namespace[name] for name in names})
        if hasattr(instance, "command"):
            instance.command = ["python", _shown_path(script or parser.prog), *argv]
        instances.append(instance)
    return tuple(instances)


@dataclasses.dataclass
class ModelArguments:
    """Model: which weights, config and tokenizer to start from."""

    model_name_or_path: Optional[str] = arg(
        None, "Folder or hub name of the pretrained model; omit to train from scratch (with --model_type or --config_name)."
    )
    model_type: Optional[str] = arg(None, "Model type (e.g. bert, gpt2, t5) of a from-scratch model.")
    config_name: Optional[str] = arg(None, "Config folder or name, if not the model's own.")
    config_overrides: Optional[str] = arg(
        None, "Comma-separated key=value settings for a from-scratch config, e.g. n_embd=64,n_layer=2."
    )
    tokenizer_name: Optional[str] = arg(None, "Tokenizer folder or name, if not the model's own.")
    cache_dir: Optional[str] = arg(None, "Where downloads from the hub are cached.")
    use_fast_tokenizer: bool = arg(True, "Use a fast (Rust) tokenizer.")
    model_revision: str = arg("main", "Hub revision (branch, tag or commit) of the model.")
    token: Optional[str] = arg(None, "Hub token for private models.")
    trust_remote_code: bool = arg(
        False, "Let a hub config, tokenizer or --dataset_name loading script run its own code (trusted repositories only)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = arg(
        "float32", "Computation dtype (activations and matrix products); parameters keep --param_dtype."
    )
    param_dtype: Literal["float32", "bfloat16"] = arg(
        "float32", "Dtype of the parameters and of the optimizer state, which follows them: float32 keeps "
        "float32 master weights (also under --dtype bfloat16); bfloat16 halves their memory, at the cost of "
        "updates too small for bfloat16 to register."
    )

    def __post_init__(self):
        if not (self.model_name_or_path or self.model_type or self.config_name):
            raise InputError("give --model_name_or_path, or --model_type / --config_name to train from scratch")
        if not (self.model_name_or_path or self.tokenizer_name):
            raise InputError("a model trained from scratch needs --tokenizer_name")
        if self.config_overrides and self.model_name_or_path:
            raise InputError("--config_overrides applies only to a model trained from scratch (no --model_name_or_path)")

    @property
    def hub_options(self) -> dict:
        """Keyword arguments for Transformers' from_pretrained calls."""
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "token": self.token,
                "trust_remote_code": self.trust_remote_code}


@dataclasses.dataclass
class DataArguments:
    """Data: files (or a hub dataset) and how much of them to use."""

    dataset_name: Optional[str] = arg(None, "Hub dataset name (needs network), instead of local files.")
    dataset_config_name: Optional[str] = arg(None, "Configuration of --dataset_name.")
    train_file: Optional[str] = arg(None, "Training data file.")
    validation_file: Optional[str] = arg(None, "Evaluation data file.")
    test_file: Optional[str] = arg(None, "Prediction data file (--do_predict).")
    max_train_samples: Optional[int] = arg(None, "Use only the first N training examples.")
    max_eval_samples: Optional[int] = arg(None, "Use only the first N evaluation examples.")
    max_predict_samples: Optional[int] = arg(None, "Use only the first N prediction examples.")
    preprocessing_num_workers: Optional[int] = arg(
        None, "Workers for preprocessing: processes for tokenization, threads for audio features.")
    overwrite_cache: bool = arg(False, "Recompute tokenization instead of using the datasets cache.")

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name} must be at least 1")

    def files(self) -> dict[str, tuple[str, Optional[str]]]:
        """{split: (flag, path)} for `data.load_splits`."""
        return {
            "train": ("train_file", self.train_file),
            "validation": ("validation_file", self.validation_file),
            "test": ("test_file", self.test_file),
        }

    @property
    def map_options(self) -> dict:
        """Keyword arguments for `datasets.Dataset.map`."""
        return {"num_proc": self.preprocessing_num_workers, "load_from_cache_file": not self.overwrite_cache}


@dataclasses.dataclass
class TextDataArguments(DataArguments):
    """Data: text files (or a hub dataset)."""

    validation_split_percentage: int = arg(5, "Percent of the training data held out when there is no validation file.")
    keep_linebreaks: bool = arg(True, "Keep the line breaks of .txt files in the text.")


@dataclasses.dataclass
class TrainingArguments:
    """Training: what to run, batch sizes, optimizer, schedule, logging and checkpoints."""

    output_dir: str = arg(help="Where results, logs, checkpoints and the trained model are written.")
    overwrite_output_dir: bool = arg(
        False, "Write into a non-empty --output_dir (only files this script writes are replaced)."
    )
    do_train: bool = arg(False, "Train on the training file.")
    do_eval: bool = arg(False, "Evaluate on the validation file.")
    do_predict: bool = arg(False, "Predict on the test file.")
    per_device_train_batch_size: int = arg(8, "Training batch size per device.")
    per_device_eval_batch_size: int = arg(8, "Evaluation batch size per device.")
    gradient_accumulation_steps: int = arg(1, "Micro batches summed into one optimizer step.")
    learning_rate: float = arg(5e-5, "Peak learning rate (after warmup).")
    weight_decay: float = arg(0.0, "AdamW weight decay (not applied to biases and normalisation weights).")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.999, "AdamW beta2.")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon.")
    adafactor: bool = arg(False, "Use Adafactor instead of AdamW.")
    num_train_epochs: float = arg(3.0, "Training epochs (a fraction trains part of the last epoch).")
    max_steps: int = arg(-1, "If > 0: train this many optimizer steps, overriding --num_train_epochs.")
    warmup_steps: int = arg(0, "Steps of linear warmup from 0 to --learning_rate; then linear decay to 0.")
    logging_steps: int = arg(500, "Log the mean training loss every N steps.")
    eval_steps: Optional[int] = arg(None, "Evaluate every N steps during training (and once at the end).")
    save_steps: int = arg(500, "Save a resumable checkpoint every N steps (0: never).")
    save_total_limit: Optional[int] = arg(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: Optional[str] = arg(
        None, "Resume from this checkpoint or the newest one in this folder; without a value, the newest one "
        "in --output_dir.", const=LATEST_CHECKPOINT,
    )
    seed: int = arg(42, "Seed of initialisation, shuffling and dropout.")
    disable_tqdm: bool = arg(False, "No progress bars (they are off anyway when stderr is not a terminal).")
    compilation_cache_dir: Optional[str] = arg(
        None, "Persistent compilation cache, so a rerun does not compile again (default: $JAX_COMPILATION_CACHE_DIR, "
        "else $XDG_CACHE_HOME or ~/.cache, + flax-finetune/jax); none turns it off."
    )
    report_to: Optional[list[str]] = arg(
        None, "Where metrics go: none, or jsonl and/or tensorboard (default: jsonl, and tensorboard when "
        "tensorboardX is installed)."
    )
    push_to_hub: bool = arg(False, "Upload the output folder (the model, its card and results) to the Hugging Face Hub.")
    hub_model_id: Optional[str] = arg(None, "Hub repository (user/name) to push to (default: the output folder's name).")
    hub_token: Optional[str] = arg(None, "Hub token (default: the logged-in user's, or HF_TOKEN).")
    hub_strategy: Literal["end", "every_save"] = arg(
        "every_save", "Push at the end only, or also at every --save_steps."
    )
    coordinator_address: Optional[str] = arg(
        None, "host:port of process 0 of a multi-process run (jax.distributed); every process gets the same."
    )
    num_processes: Optional[int] = arg(None, "Processes in a multi-process run (default: detected from the cluster).")
    process_id: Optional[int] = arg(None, "This process's index, 0 to --num_processes - 1 (default: detected).")
    gradient_checkpointing: bool = arg(
        False, "Rematerialise every layer: the backward pass recomputes activations instead of storing them "
        "(less memory, about a third more compute)."
    )
    remat_policy: Literal["nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"] = arg(
        "nothing_saveable", "What a rematerialised layer keeps with --gradient_checkpointing: nothing, its matrix "
        "products' outputs, or those without batch dimensions."
    )
    mesh: str = arg(
        "", "Device mesh as axis:size pairs, e.g. data:2,fsdp:4: batches split over all devices, parameters and "
        "optimizer state sharded over fsdp (default: every device on data, plain data parallelism)."
    )
    lora_rank: int = arg(
        0, "LoRA rank r: train low-rank adapters on --lora_target_modules and freeze the base model, saved as a "
        "PEFT adapter (0: train every parameter)."
    )
    lora_alpha: float = arg(16.0, "LoRA alpha: the adapters' output is scaled by alpha / rank.")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA adapters' inputs during training.")
    lora_target_modules: Optional[str] = arg(
        None, "Comma-separated names of the linear layers LoRA adapts, e.g. q_proj,v_proj, or all-linear (every "
        "linear layer but the output head); default: PEFT's choice for the model type."
    )
    merge_lora: bool = arg(False, "With --lora_rank: also save the full model with the adapters merged in.")
    command: list[str] = dataclasses.field(default_factory=list, init=False)  # the command line, for the model card

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be at least 1")
        for name in ("warmup_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must not be negative")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise InputError("--eval_steps must be at least 1")
        if self.num_train_epochs < 0:
            raise InputError("--num_train_epochs must not be negative")
        if self.resume_from_checkpoint == LATEST_CHECKPOINT:
            self.resume_from_checkpoint = self.output_dir
        self._check_lora()

    def _check_lora(self) -> None:
        """LoRA flags: a positive rank, alpha and a dropout rate in [0, 1); the others only with --lora_rank."""
        if self.lora_rank < 0:
            raise InputError("--lora_rank must not be negative (0: no LoRA)")
        if self.lora_rank == 0:
            given = [name for name in ("lora_target_modules", "merge_lora") if getattr(self, name)]
            if given:
                raise InputError(f"--{given[0]} needs --lora_rank (the rank of the LoRA adapters, e.g. 8)")
        if self.lora_alpha <= 0:
            raise InputError("--lora_alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise InputError("--lora_dropout must be in [0, 1)")

    @property
    def distributed(self) -> bool:
        """Whether this run joins a multi-process jax.distributed run."""
        return any(value is not None for value in (self.coordinator_address, self.num_processes, self.process_id))


@dataclasses.dataclass
class Seq2SeqArguments:
    """Sequence to sequence: label smoothing and generation."""

    label_smoothing_factor: float = arg(0.0, "Label smoothing of the training loss (0: none).")
    predict_with_generate: bool = arg(False, "Generate text when evaluating and predicting, and score it.")
    num_beams: Optional[int] = arg(None, "Beams for generation (default: the model's generation config; 1 is greedy).")

    def __post_init__(self):
        if not 0 <= self.label_smoothing_factor < 1:
            raise InputError("--label_smoothing_factor must be in [0, 1)")
        if self.num_beams is not None and self.num_beams < 1:
            raise InputError("--num_beams must be at least 1")
