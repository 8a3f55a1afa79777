"""The steps every script takes, in order: `Run` carries them.

    run = scripts.start(training_args, model_args)     # logging, output-dir check (nothing written)
    splits = run.load_splits(data_args, extensions)     # files -> datasets, checked
    tokenizer = run.tokenizer(model_args)
    config = run.config(model_args, tokenizer)
    rows = {split: run.tokenize(...)}                   # -> fixed-length numpy rows
    model = run.model(model_args, task, config)
    run.train_evaluate_predict(model, [tokenizer], rows, loss_fn, predict_fn, compute_metrics)

Between those steps a script holds only its task: preprocessing, loss,
metric. Every check on the user's input happens before the output directory
is created (in `Run.trainer`), so a bad input stops the script before
anything is written; scripts import jax only just before `run.model`, so it
stops without waiting for jax either.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from flax_finetune import data
from flax_finetune.errors import InputError
from flax_finetune.outputs import OutputDir

logger = logging.getLogger("flax_finetune")

SPLIT_FLAGS = {"train": "do_train", "validation": "do_eval", "test": "do_predict"}
TEXT_EXTENSIONS = (".txt", ".csv", ".json", ".jsonl")


def text_column(column_names: Sequence[str]) -> str:
    """The column holding the text: `text` when there is one, else the first."""
    return "text" if "text" in column_names else column_names[0]


def consume(splits: dict) -> Iterator[tuple[str, Any]]:
    """(split, raw dataset) pairs, each removed from `splits` as it is handed out: once the caller
    has tokenized a split, nothing holds its raw dataset, and the text's memory-mapped Arrow pages
    leave the process instead of staying through training (tests/test_data_scale.py)."""
    for split in list(splits):
        yield split, splits.pop(split)


def setup_logging() -> None:
    """INFO lines from this package on stderr; quieter third-party libraries."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # libraries that configure the root logger would print every line twice
    for noisy in ("absl", "jax._src.xla_bridge", "datasets", "transformers.modeling_flax_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # datasets' file readers log each failure before raising it; data.load_splits reports it as one line
    for reader in ("csv", "json"):
        logging.getLogger(f"datasets.packaged_modules.{reader}.{reader}").setLevel(logging.CRITICAL)


# Text tokenized per `datasets.map` batch. Larger batches make fewer record batches in the cache
# (see data.rows_per_batch) but cost each worker more memory while it tokenizes one: on the 110 MB
# text of tests/test_data_scale.py a worker peaked at 145 MB with datasets' 1,000 rows (0.3 MB of
# text), 192 MB with 1 MB batches, 257 MB with 2 MB.
TOKENIZE_BATCH_BYTES = 1 << 20


def token_stream(dataset: Any, tokenizer: Any, data_args: Any, add_special_tokens: bool) -> data.TokenStream:
    """The token ids of every text of a split (see `text_column`), concatenated, for scripts that cut
    them into blocks.

    `datasets.map` tokenizes into the dataset's Arrow cache, on --preprocessing_num_workers
    processes with a progress bar; a rerun with the same texts, tokenizer and settings reads the
    cache (--overwrite_cache: tokenize again), and any change to them makes a new cache entry.
    Blocks are then read from the cache, batch by batch (`data.TokenBlocks`).
    """
    import datasets

    column = text_column(dataset.column_names)
    started = time.perf_counter()
    tokenized = dataset.map(
        lambda batch: {"input_ids": tokenizer(
            [str(text) for text in batch[column]], add_special_tokens=add_special_tokens, return_attention_mask=False
        )["input_ids"]},
        batched=True, batch_size=data.rows_per_batch(dataset, TOKENIZE_BATCH_BYTES),
        remove_columns=dataset.column_names, desc="tokenizing",
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        **data_args.map_options,
    )
    stream = data.TokenStream(tokenized)
    seconds = time.perf_counter() - started
    logger.info("tokenized %d texts into %d tokens in %.2f s (%.0f tokens/s, %s)", len(dataset), len(stream), seconds,
                len(stream) / max(seconds, 1e-9), f"{data_args.preprocessing_num_workers or 1} processes")
    return stream


def in_full(stream: Any) -> Any:
    """A `datasets.IterableDataset` read into a `datasets.Dataset` (for splits that are evaluated whole)."""
    import datasets

    return datasets.Dataset.from_list(list(stream))


def streamed_blocks(stream: Any, tokenizer: Any, data_args: Any, training_args: Any, block_size: int) -> data.StreamedBlocks:
    """--streaming training blocks of `block_size` tokens (the tokenizer's special tokens included), as
    many as --max_steps steps take (see `data.StreamedBlocks`)."""
    from flax_finetune.trainer import global_batch_size

    from flax_finetune import instructions

    first = next(iter(stream.take(1)), None)  # a stream's columns may be known only once it is read
    if first is None:
        raise InputError("the training stream holds no text")
    if instructions.row_format(list(first)) is not None:
        raise InputError("--streaming reads plain text; instruction data (prompt / completion, messages) is read "
                         "without --streaming")
    column = text_column(list(first))
    return data.StreamedBlocks(
        stream, column, lambda texts: tokenizer(texts, return_attention_mask=False)["input_ids"], block_size,
        num_blocks=training_args.max_steps * global_batch_size(training_args),
        shuffle_buffer_size=data_args.shuffle_buffer_size,
    )


def max_sequence_length(requested: Optional[int], tokenizer: Any, config: Any) -> int:
    """The sequence length to use: the request, capped by what the model can take (with a warning)."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or 10**9]
    model_limit = int(min(limits))
    if requested is None:
        return model_limit
    if requested > model_limit:
        logger.warning("--max_seq_length %d exceeds the model's maximum %d: using %d", requested, model_limit, model_limit)
        return model_limit
    return requested


def require_columns(dataset: Any, names: Sequence[str], data_args: Any, split: str) -> None:
    """Stop with the columns found when `names` are not all in `dataset`."""
    flag = {"train": "train_file", "validation": "validation_file", "test": "test_file"}[split]
    source = getattr(data_args, flag, None) or f"{data_args.dataset_name} ({split})"
    missing = [name for name in names if name not in dataset.column_names]
    if missing:
        raise InputError(
            f"--{flag} {source}: no column {', '.join(map(repr, missing))}; "
            f"the columns found are {', '.join(dataset.column_names)}"
        )


def require_known_labels(splits: Mapping[str, Any], column: str, known: set, nested: bool = False) -> None:
    """Stop when an evaluation or test split has a label outside `known` (the training labels).

    `nested`: the column holds a list of labels per example (token tags).
    """
    for split in ("validation", "test"):
        if split not in splits or column not in splits[split].column_names:
            continue
        values = splits[split][column]
        seen = {label for row in values for label in row} if nested else set(values)
        unknown = sorted(seen - known, key=str)
        if unknown:
            raise InputError(f"the {split} file has labels not seen in training: {', '.join(map(str, unknown[:10]))}")


def check_training_plan(training_args: Any) -> None:
    """Stop on training flags that cannot run, before any data or model is loaded.

    --do_train needs at least one step: every epoch has at least one, so only
    --num_train_epochs 0 without --max_steps gives none. Its --resume_from_checkpoint
    must name a checkpoint (looked up here, not once the output directory exists).
    """
    if not training_args.do_train:
        return
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise InputError("no training steps: raise --num_train_epochs or --max_steps")
    if training_args.resume_from_checkpoint:
        from flax_finetune.checkpoints import find_checkpoint

        find_checkpoint(training_args.resume_from_checkpoint)


class Run:
    """One script run: its output directory and the shared loading steps."""

    def __init__(self, training_args: Any, model_args: Any):
        setup_logging()
        check_training_plan(training_args)
        self.args = training_args
        self.model_args = model_args
        is_writer = True
        if training_args.distributed:
            from flax_finetune import training

            is_writer = training.initialize_distributed(
                training_args.coordinator_address, training_args.num_processes, training_args.process_id
            ) == 0
        self.output = OutputDir(
            training_args.output_dir,
            overwrite=training_args.overwrite_output_dir or bool(training_args.resume_from_checkpoint),
            is_writer=is_writer,
            report_to=training_args.report_to,
        )
        self.hub = None
        if training_args.push_to_hub and is_writer:
            from flax_finetune.hub import Hub

            self.hub = Hub(self.output.path, training_args.hub_model_id, training_args.hub_token)
            self.hub.connect()
        self.task = ""
        self.data_sources: dict[str, tuple[str, int]] = {}
        self.adaptation = None  # the `lora.Adaptation` of --lora_rank, made with the model

    def load_splits(
        self,
        data_args: Any,
        extensions: Sequence[str],
        json_field: Optional[str] = None,
        hub_split_names: Optional[Mapping[str, str]] = None,
    ) -> dict[str, Any]:
        """The splits the --do_* flags need (validation also for --eval_steps), with --max_*_samples applied.

        With text data arguments (--validation_split_percentage), a missing
        validation split is the last that many percent of the training split
        (which then loses them). `hub_split_names` maps train / validation /
        test to the split names of a --dataset_name that calls them otherwise.
        """
        validation_split_percentage = getattr(data_args, "validation_split_percentage", None)
        keep_linebreaks = getattr(data_args, "keep_linebreaks", True)
        streaming = getattr(data_args, "streaming", False)
        if streaming and self.args.do_train and self.args.max_steps <= 0:
            raise InputError("--streaming needs --max_steps: a stream has no length to count epochs in")
        needed = {split for split, flag in SPLIT_FLAGS.items() if getattr(self.args, flag)}
        if not needed:
            raise InputError("nothing to do: give --do_train, --do_eval or --do_predict")
        held_out = (
            validation_split_percentage is not None
            and "validation" in needed
            and data_args.validation_file is None
            and data_args.train_file is not None
        )
        if held_out and streaming:
            raise InputError("--streaming: give --validation_file (a stream has no percentage to hold out)")
        if held_out:
            needed = (needed - {"validation"}) | {"train"}
        if self.args.do_train and self.args.eval_steps and (data_args.validation_file or data_args.dataset_name):
            needed.add("validation")
        if data_args.dataset_name is None:
            for split in sorted(needed):
                flag, path = data_args.files()[split]
                if path is None:
                    raise InputError(f"--{SPLIT_FLAGS[split]} needs --{flag}")
        files = {split: entry for split, entry in data_args.files().items() if split in needed}
        splits = data.load_splits(
            files,
            extensions=extensions,
            json_field=json_field,
            keep_linebreaks=keep_linebreaks,
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            cache_dir=self.model_args.cache_dir,
            trust_remote_code=self.model_args.trust_remote_code,
            streaming=streaming,
        )
        if data_args.dataset_name is not None:
            names = {split: (hub_split_names or {}).get(split, split) for split in needed}
            splits = {split: splits[name] for split, name in names.items() if name in splits}
            missing = {names[split] for split in needed - set(splits)}
            if missing:
                raise InputError(f"--dataset_name {data_args.dataset_name} has no {', '.join(sorted(missing))} split")
        if held_out:
            splits["train"], splits["validation"] = data.hold_out(splits["train"], validation_split_percentage)
        limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
                  "test": data_args.max_predict_samples}
        splits = {split: data.take_first(dataset, limits[split]) for split, dataset in splits.items()}
        if streaming:  # evaluation needs every example: only training reads a stream
            splits = {split: dataset if split == "train" else in_full(dataset) for split, dataset in splits.items()}
        self.data_sources = {
            split: (data_args.files()[split][1] or f"{data_args.dataset_name} ({split})",
                    len(dataset) if hasattr(dataset, "__len__") else "streamed")
            for split, dataset in splits.items()
        }
        return splits

    def config(self, model_args: Any, tokenizer: Any, **overrides: Any) -> Any:
        """The model config: --config_name, else the model's own, else a new one of --model_type.

        A new config gets the tokenizer's vocabulary size; a loaded one must be
        large enough for every token id the tokenizer can produce.
        """
        from flax_finetune import models

        source = model_args.config_name or model_args.model_name_or_path
        if source:
            config = models.load_config(source, hub=model_args.hub_options, **overrides)
        else:
            config = models.new_config(model_args.model_type, vocab_size=len(tokenizer), **overrides)
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as error:
                raise InputError(f"--config_overrides {model_args.config_overrides}: {error}") from None
        vocab_size = getattr(config, "vocab_size", None)
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise InputError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
                "use the model's own tokenizer or a config with a larger vocab_size"
            )
        return config

    def tokenizer(self, model_args: Any, **kwargs: Any) -> Any:
        """The tokenizer; one without a padding token (GPT-2's, GPT-Neo's, Llama's) pads with its end
        token, as Transformers' examples do: padding is masked out of attention, loss and metrics."""
        from flax_finetune import models

        tokenizer = models.load_tokenizer(
            model_args.tokenizer_name or model_args.model_name_or_path,
            use_fast=model_args.use_fast_tokenizer,
            hub=model_args.hub_options,
            **kwargs,
        )
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            logger.info("the tokenizer has no padding token: padding with its end token %s", tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def tokenize(
        self,
        dataset: Any,
        function: Callable[[dict], dict],
        pad_values: Mapping[str, int],
        length: Optional[int],
        data_args: Any,
    ) -> data.PaddedRows:
        """Map `function` over batches of `dataset` (dropping the raw columns), then pad to fixed length."""
        mapped = dataset.map(function, batched=True, remove_columns=dataset.column_names, **data_args.map_options)
        return data.PaddedRows(mapped, pad_values, length)

    def model(self, model_args: Any, task: str, config: Any) -> Any:
        """Pretrained weights from --model_name_or_path, else a new model from `config`.

        The first step that compiles: the persistent compilation cache is set up here (see `compilation`).
        """
        from flax_finetune import compilation, models

        compilation.enable(self.args.compilation_cache_dir)
        self.task = task
        if model_args.model_name_or_path:
            model = models.load(
                model_args.model_name_or_path, task, config=config, dtype=model_args.dtype,
                seed=self.args.seed, hub=model_args.hub_options,
            )
        else:
            model = models.from_config(config, task, dtype=model_args.dtype, seed=self.args.seed)
        model.params = models.cast_params(model.params, model_args.param_dtype)
        if self.args.lora_rank:
            from flax_finetune import lora

            if not model_args.model_name_or_path:
                raise InputError("--lora_rank adapts a pretrained model: give --model_name_or_path")
            self.adaptation = lora.Adaptation.create(model, task, lora.Settings.from_args(self.args))
        return model

    def trainer(self, loss_fn: Callable, predict_fn: Callable) -> Any:
        """The Trainer for this run; creates the output directory (inputs are all checked by now)."""
        from flax_finetune.trainer import Trainer

        self.output.create(keep_log=bool(self.args.resume_from_checkpoint))
        return Trainer(self.args, self.output, loss_fn, predict_fn, self.adaptation)

    def train_evaluate_predict(
        self,
        model: Any,
        processors: Sequence[Any],
        rows: Mapping[str, data.Rows],
        loss_fn: Callable,
        predict_fn: Callable,
        compute_metrics: Callable,
        write_predictions: Optional[Callable[[Mapping[str, np.ndarray], str], None]] = None,
        test_has_labels: bool = True,
    ) -> Any:
        """What the --do_* flags ask for, in order; returns the final params.

        --do_train trains on rows["train"] (evaluating rows["validation"] every
        --eval_steps) and saves the model with its `processors` (tokenizer,
        feature extractor); --do_eval and --do_predict run
        predict_fn over rows["validation"] / rows["test"], hand the outputs to
        `write_predictions(outputs, split)` and write {split}_results.json
        (for the test split only when it has labels). A trained model gets its
        README.md model card, and with --push_to_hub goes to the hub (also at
        every --save_steps with --hub_strategy every_save).
        """
        trainer = self.trainer(loss_fn, predict_fn)
        params = model.params
        results: dict[str, float] = {}
        try:
            if self.args.do_train:
                if self.hub is not None and self.args.hub_strategy == "every_save":
                    def export_and_push(step: int, params: Any) -> None:
                        self.save_model(model, params, *processors, trainable=trainer.trainable)
                        self.hub.push(f"Training in progress, step {step}")

                    trainer.on_save = export_and_push
                params = trainer.train(params, rows["train"], rows.get("validation"), compute_metrics)
                self.save_model(model, params, *processors, trainable=trainer.trainable)
            final = [("validation", "eval", True)] if self.args.do_eval else []
            final += [("test", "test", test_has_labels)] if self.args.do_predict else []
            for split, prefix, scored in final:
                started = time.perf_counter()
                outputs = trainer.predict(params, rows[split])
                if write_predictions is not None:
                    write_predictions(outputs, prefix)
                if scored:
                    results.update(trainer.report(
                        compute_metrics(outputs, prefix), prefix, time.perf_counter() - started, len(rows[split])
                    ))
            if self.args.do_train:
                self.write_model_card(model, results)
                if self.hub is not None:
                    self.hub.push("End of training")
        finally:
            self.output.close()
        return params

    def write_model_card(self, model: Any, results: Mapping[str, float]) -> None:
        """README.md beside the trained model: task, base model, data, results, command, versions."""
        from flax_finetune.model_card import model_card

        base = self.model_args.model_name_or_path or f"a new {model.config.model_type} model"
        shown = {name: value for name, value in results.items() if not name.endswith(("_runtime", "_samples"))}
        self.output.write_text("README.md", model_card(
            title=self.output.path.resolve().name, task=self.task, base_model=base, data=self.data_sources,
            command=self.args.command, results=shown,
        ))

    def save_model(self, model: Any, params: Any, *processors: Any, trainable: Any = None) -> None:
        """The trained model as a `save_pretrained` folder in --output_dir: config, weights,
        and the tokenizer (and feature extractor) it needs.

        With --lora_rank the weights are the PEFT adapter (`trainable`: adapters and new heads), and
        with --merge_lora also the full model with the adapters merged in (`params`)."""
        directory = str(self.output.path)
        if self.adaptation is None or self.args.merge_lora:
            model.save(params, directory)
        else:
            model.config.save_pretrained(directory)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(directory)
        if self.adaptation is not None:
            self.adaptation.save(directory, trainable, self.model_args.model_name_or_path)
        for processor in processors:
            processor.save_pretrained(directory)
        logger.info("model saved to %s", directory)


def start(training_args: Any, model_args: Any) -> Run:
    return Run(training_args, model_args)
