"""Shared machinery for the Flax fine-tuning example scripts.

The flow every script follows: command-line arguments -> dataset -> fixed-shape
batches -> jitted train/eval steps -> metrics -> results files. Importing this
package is cheap; JAX, Transformers and datasets are imported by the modules
that need them, so `--help` stays fast.
"""

from flax_finetune.errors import InputError

__all__ = ["InputError"]
__version__ = "0.1.0"
