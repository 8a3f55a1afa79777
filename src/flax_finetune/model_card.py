"""The README.md model card written next to a trained model: what it is and how it was made."""

from __future__ import annotations

import datetime
import platform
import shlex
from importlib.metadata import PackageNotFoundError, version
from typing import Mapping, Sequence

SECRET_FLAGS = ("--hub_token", "--token")
LIBRARIES = ("flax-finetune", "jax", "jaxlib", "flax", "optax", "transformers", "datasets", "tokenizers", "numpy")


def shown_command(command: Sequence[str]) -> str:
    """The command line, shell-quoted, with token values hidden."""
    shown = list(command)
    for index, word in enumerate(shown):
        if word in SECRET_FLAGS and index + 1 < len(shown):
            shown[index + 1] = "<hidden>"
        elif word.startswith(tuple(f"{flag}=" for flag in SECRET_FLAGS)):
            shown[index] = word.split("=", 1)[0] + "=<hidden>"
    return " ".join(shlex.quote(word) for word in shown)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def model_card(
    *,
    title: str,
    task: str,
    base_model: str,
    data: Mapping[str, tuple[str, int]],
    command: Sequence[str],
    results: Mapping[str, float],
    date: datetime.date | None = None,
) -> str:
    """Markdown with front matter for the Hub: task, base model, data, results, command, versions, date.

    data: {split: (file or dataset, examples)}; results: {eval_accuracy: 0.9, ...}.
    """
    date = date or datetime.date.today()
    lines = [
        "---",
        "library_name: flax",
        f"base_model: {base_model}",
        f"tags: [flax, {task}, flax-finetune]",
        "---",
        "",
        f"# {title}",
        "",
        f"`{base_model}` fine-tuned for **{task}** with the Flax scripts of flax-finetune, on {date.isoformat()}.",
        "",
        "## Data",
        "",
        "| split | source | examples |",
        "| --- | --- | --- |",
        *(f"| {split} | `{source}` | {count} |" for split, (source, count) in data.items()),
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |"
          for name, value in results.items()),
        "",
        "## How it was trained",
        "",
        "```bash",
        shown_command(command),
        "```",
        "",
        "| library | version |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in library_versions().items()),
        "",
    ]
    return "\n".join(lines)
