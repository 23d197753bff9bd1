"""Loss functions, numerically stable from logits.

Every loss returns per-example values ``(N,)`` (per position ``(N, *S)`` for
`cross_entropy` and `accuracy` on logits ``(N, *S, C)``: the tasks average positions);
average them yourself (with
weights when batches are padded). All are finite for logits as large as ±1e4:
they work in log-space (log-sum-exp, log-sigmoid), never on saturated probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float | jax.Array = 0.0
) -> jax.Array:
    """Softmax cross-entropy ``-sum_c q_c log softmax(z)_c`` with integer or one-hot labels.

    ``labels`` of shape ``(N,)`` are class indices; of shape ``(N, C)`` they are
    target distributions (one-hot or mixed). With ``label_smoothing = s`` the
    target becomes ``(1 - s) q + s / C``; ``s`` may be a traced scalar (a tuned
    hyper-parameter). Computed as ``logsumexp(z) - <q, z>``.

    References:
      Szegedy et al., "Rethinking the Inception Architecture" (label smoothing), https://arxiv.org/abs/1512.00567
    """
    if labels.shape not in (logits.shape[:-1], logits.shape):
        raise ValueError(
            f"cross_entropy needs labels of shape {logits.shape[:-1]} (class indices) or "
            f"{logits.shape} (distributions) for logits of shape {logits.shape}; got labels "
            f"of shape {labels.shape}"
        )
    traced = isinstance(label_smoothing, jax.core.Tracer)  # a tuned hyper-parameter
    if labels.ndim == logits.ndim - 1 and not traced and label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    num_classes = logits.shape[-1]
    q = (
        jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
        if labels.ndim == logits.ndim - 1
        else labels
    )
    if traced or label_smoothing:
        q = optax.smooth_labels(q, label_smoothing)
    return optax.softmax_cross_entropy(logits, q)


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    gamma: float = 2.0,
    label_smoothing: float | jax.Array = 0.0,
) -> jax.Array:
    """Softmax focal loss ``-sum_c q_c (1 - p_c)^gamma log p_c`` with ``p = softmax(z)``:
    cross-entropy with each class's term scaled down where the model is already
    confident, so rare, hard examples weigh more. ``gamma = 0`` is `cross_entropy`.
    Labels and smoothing as for `cross_entropy`; ``log p`` from log-softmax and ``1 - p``
    as ``-expm1(log p)``, so it stays finite for large logits. (optax has the sigmoid
    form, ``optax.sigmoid_focal_loss``, which the multi-label task uses.)

    References:
      Lin et al., "Focal Loss for Dense Object Detection" (2017), https://arxiv.org/abs/1708.02002
    """
    if labels.shape not in (logits.shape[:-1], logits.shape):
        raise ValueError(
            f"focal_loss needs labels of shape {logits.shape[:-1]} (class indices) or "
            f"{logits.shape} (distributions) for logits of shape {logits.shape}; got labels "
            f"of shape {labels.shape}"
        )
    logp, q = _log_probs_and_targets(logits, labels, label_smoothing)
    return -jnp.sum(q * (-jnp.expm1(logp)) ** gamma * logp, axis=-1)


def generalized_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    q: float = 0.7,
    label_smoothing: float | jax.Array = 0.0,
) -> jax.Array:
    """Generalized cross-entropy ``sum_c t_c (1 - p_c^q) / q`` with ``p = softmax(z)``
    (``(1 - p_y^q) / q`` for a class index ``y``): the negative Box-Cox transform of the
    predicted probability, a loss robust to wrong labels. ``q -> 0`` is cross-entropy;
    ``q = 1`` is the mean absolute error ``1 - p_y``, which bounds the pull of a wrong
    label. Labels and smoothing as for `cross_entropy`; ``p^q`` as ``exp(q log p)``
    from log-softmax.

    References:
      Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks
      with Noisy Labels" (2018), https://arxiv.org/abs/1805.07836
    """
    logp, t = _log_probs_and_targets(logits, labels, label_smoothing)
    return jnp.sum(t * -jnp.expm1(q * logp), axis=-1) / q


def _log_probs_and_targets(
    logits: jax.Array, labels: jax.Array, label_smoothing: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``log softmax(z)`` and the (smoothed) target distribution of class indices or of
    given distributions."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    t = (
        jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype)
        if labels.ndim == logits.ndim - 1
        else labels.astype(logp.dtype)
    )
    return logp, optax.smooth_labels(t, label_smoothing)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]`` from logits, summed over any trailing
    axes; the stable form ``max(z, 0) - z y + log(1 + exp(-|z|))`` (optax).

    ``logits`` and ``labels`` have the same shape, except that ``(N, 1)`` logits take
    ``(N,)`` labels (one binary label per example); any other mismatch is an error, never
    a broadcast.
    """
    labels = shaped_like(labels, logits, "binary_cross_entropy needs labels of the logits'")
    loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
    return loss.reshape(loss.shape[0], -1).sum(axis=-1) if loss.ndim > 1 else loss


def shaped_like(targets: jax.Array, outputs: jax.Array, needs: str) -> jax.Array:
    """``targets`` of ``outputs``' shape: ``(N,)`` targets of ``(N, 1)`` outputs get their
    trailing axis; any other mismatch is a one-line `ValueError` (``needs`` begins it),
    never a broadcast."""
    if targets.shape != outputs.shape and (*targets.shape, 1) == outputs.shape:
        targets = targets[..., None]
    if targets.shape != outputs.shape:
        raise ValueError(
            f"{needs} shape {outputs.shape} (or {outputs.shape[:-1]} for one output); got "
            f"shape {targets.shape}"
        )
    return targets


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error per example, ``mean_j (p_j - t_j)^2`` over trailing axes.
    ``(N, 1)`` predictions take ``(N,)`` targets; any other mismatch is an error, never a
    broadcast."""
    targets = shaped_like(targets, predictions, "mse needs targets of the predictions'")
    err = jnp.square(predictions - targets.astype(predictions.dtype))
    return err.reshape(err.shape[0], -1).mean(axis=-1) if err.ndim > 1 else err


def dice_loss(logits: jax.Array, labels: jax.Array, *, eps: float = 1.0) -> jax.Array:
    """Soft multi-class Dice loss from logits, per example, for class-imbalanced segmentation.

    With ``p = softmax(z)`` over the last (class) axis and ``y`` one-hot
    (integer ``labels`` are one-hot encoded), for each class ``c`` over all other axes:
    ``D_c = (2 sum p_c y_c + eps) / (sum p_c + sum y_c + eps)``; the loss is ``1 - mean_c D_c``.
    It is 0 for a perfect prediction. ``logits`` are ``(N, ..., C)``.

    References:
      Milletari et al., "V-Net" (2016), https://arxiv.org/abs/1606.04797
    """
    num_classes = logits.shape[-1]
    p = jax.nn.softmax(logits, axis=-1)
    y = (
        jax.nn.one_hot(labels, num_classes, dtype=p.dtype)
        if labels.ndim == logits.ndim - 1
        else labels
    )
    axes = tuple(range(1, logits.ndim - 1))
    inter = jnp.sum(p * y, axis=axes)
    total = jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes)
    dice = (2 * inter + eps) / (total + eps)
    return 1.0 - dice.mean(axis=-1)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0/1 correctness of ``argmax(logits) == label`` (argmax of one-hot labels too)."""
    if labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
