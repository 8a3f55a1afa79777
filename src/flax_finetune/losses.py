"""Loss sums under the (sum, count) contract: every function returns the summed
loss over the items that count and how many there were (see training.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    label_smoothing: float = 0.0,
    per_example: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy summed over weighted items.

    logits: [..., num_classes] (any float dtype; computed in float32);
    labels: [...] integer class ids (negative ids are ignored);
    weights: [...] 1.0 for items that count, 0.0 for padding.
    With `label_smoothing` = e the target puts 1 - e on the label and e spread
    over the other classes, shifted so a perfect prediction scores 0.
    """
    logits = logits.astype(jnp.float32)
    weights = weights * (labels >= 0)
    safe_labels = jnp.where(labels >= 0, labels, 0)
    if label_smoothing:
        num_classes = logits.shape[-1]
        confidence = 1.0 - label_smoothing
        low = label_smoothing / (num_classes - 1)
        targets = jax.nn.one_hot(safe_labels, num_classes) * (confidence - low) + low
        entropy = -(confidence * jnp.log(confidence) + (num_classes - 1) * low * jnp.log(low + 1e-20))
        losses = optax.softmax_cross_entropy(logits, targets) - entropy
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    axes = tuple(range(1, losses.ndim)) if per_example else None
    return jnp.sum(losses * weights, axis=axes), jnp.sum(weights, axis=axes)


def squared_error(
    predictions: jax.Array, targets: jax.Array, weights: jax.Array, per_example: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Squared error summed over weighted items (all arrays one shape); `per_example` as in cross_entropy."""
    errors = (predictions.astype(jnp.float32) - targets.astype(jnp.float32)) ** 2
    axes = tuple(range(1, errors.ndim)) if per_example else None
    return jnp.sum(errors * weights, axis=axes), jnp.sum(weights, axis=axes)


def token_weights(example_mask: jax.Array, token_mask: jax.Array) -> jax.Array:
    """[batch] example mask x [batch, length] token mask -> [batch, length] weights."""
    return example_mask[:, None] * token_mask.astype(jnp.float32)
