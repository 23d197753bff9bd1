"""On-device data augmentation: pure, keyed, per-example functions applied with `vmap`
inside the jitted train step, in training only.

Every augmentation is a factory returning ``fn(key, x) -> x`` for ONE example
(images ``(H, W, C)``, 1-D signals ``(L,)`` or ``(L, C)``); shape and dtype are
kept, and strength 0 is the identity. `compose` chains them (each gets its own
key); the train step vmaps a chain over the batch. Mixup and cutmix act on whole
batches and mix the labels too (`mix_batch`), returning soft labels that
`jtricks.losses.cross_entropy` accepts.

From the CLI: ``--augment "shift(3) | noise(0.05)"``.

References:
  Zhang et al., "mixup" (2018), https://arxiv.org/abs/1710.09412; Yun et al., "CutMix" (2019),
  https://arxiv.org/abs/1905.04899; DeVries & Taylor, "Cutout" (2017), https://arxiv.org/abs/1708.04552
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jtricks.errors import ConfigError, check_int, check_range
from jtricks.spec import build_from_registry, split_pipeline

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _check_image(x: jax.Array, name: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} expects one image (H, W, C); got shape {x.shape}")


# ----------------------------------------------------------------------------- images


def hflip(p: float = 0.5) -> Augment:
    """Mirror the image left-right with probability ``p``."""
    check_range("p", p, low=0.0, high=1.0)

    def fn(key, x):
        _check_image(x, "hflip")
        return jnp.where(jax.random.bernoulli(key, p), x[:, ::-1, :], x)

    fn.geometric = True  # an index move: applies to dense targets with the same key
    return fn


def _shift_image(x: jax.Array, dy: jax.Array, dx: jax.Array, fill: float) -> jax.Array:
    h, w = x.shape[:2]
    pad = max(h, w)
    padded = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    return jax.lax.dynamic_slice(padded, (pad - dy, pad - dx, 0), x.shape)


def translate(max_pixels: int = 2, fill: float = 0.0) -> Augment:
    """Shift by integers ``dy, dx`` uniform in ``[-max_pixels, max_pixels]``; uncovered pixels get ``fill``."""
    check_int("max_pixels", max_pixels, low=0)

    def fn(key, x):
        _check_image(x, "translate")
        dy, dx = jax.random.randint(key, (2,), -max_pixels, max_pixels + 1)
        return _shift_image(x, dy, dx, fill)

    fn.geometric = True  # an index move: applies to dense targets with the same key
    return fn


def random_crop(padding: int = 4, fill: float = 0.0) -> Augment:
    """Pad by ``padding`` on every side with ``fill``, then crop back to the original size at a
    uniformly random offset (the CIFAR recipe). Every output pixel comes from the padded image."""
    check_int("padding", padding, low=0)

    def fn(key, x):
        _check_image(x, "random_crop")
        padded = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)), constant_values=fill)
        oy, ox = jax.random.randint(key, (2,), 0, 2 * padding + 1)
        return jax.lax.dynamic_slice(padded, (oy, ox, 0), x.shape)

    fn.geometric = True  # an index move: applies to dense targets with the same key
    return fn


def rotate(max_degrees: float = 10.0, fill: float = 0.0) -> Augment:
    """Rotate about the centre by an angle uniform in ``[-max_degrees, max_degrees]``, sampling
    with bilinear interpolation (`jax.scipy.ndimage.map_coordinates`, order 1); pixels from
    outside the image get ``fill``. An angle ``a`` here equals ``scipy.ndimage.rotate(x, -a,
    reshape=False, order=1)`` away from the border."""
    check_range("max_degrees", max_degrees, low=0.0, high=180.0)

    def fn(key, x):
        _check_image(x, "rotate")
        h, w, c = x.shape
        theta = jnp.deg2rad(jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees))
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        yy, xx = jnp.meshgrid(
            jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
        )
        cos, sin = jnp.cos(theta), jnp.sin(theta)
        src_y = (
            cos * (yy - cy) - sin * (xx - cx) + cy
        )  # inverse map: output pixel <- source location
        src_x = sin * (yy - cy) + cos * (xx - cx) + cx
        channels = [
            jax.scipy.ndimage.map_coordinates(
                x[..., i].astype(jnp.float32), [src_y, src_x], order=1, mode="constant", cval=fill
            )
            for i in range(c)
        ]
        return jnp.stack(channels, axis=-1).astype(x.dtype)

    return fn


def cutout(size: int = 8, fill: float = 0.0) -> Augment:
    """Set a ``size x size`` square at a uniformly random centre (clipped at the border) to ``fill``."""
    check_int("size", size, low=0)

    def fn(key, x):
        _check_image(x, "cutout")
        h, w, _ = x.shape
        cy, cx = jax.random.randint(key, (2,), 0, jnp.array([h, w]))
        yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        inside = (
            (jnp.abs(yy - cy) * 2 < size) & (jnp.abs(xx - cx) * 2 < size)
            if size > 0
            else jnp.zeros((h, w), bool)
        )
        return jnp.where(inside[..., None], jnp.asarray(fill, x.dtype), x)

    return fn


def brightness(delta: float = 0.1) -> Augment:
    """Add one offset uniform in ``[-delta, delta]`` to every pixel."""
    check_range("delta", delta, low=0.0)

    def fn(key, x):
        return x + jax.random.uniform(key, (), minval=-delta, maxval=delta).astype(x.dtype)

    return fn


def contrast(strength: float = 0.2) -> Augment:
    """Scale deviations from the image mean by a factor uniform in ``[1 - strength, 1 + strength]``."""
    check_range("strength", strength, low=0.0, high=1.0)

    def fn(key, x):
        f = jax.random.uniform(key, (), minval=1 - strength, maxval=1 + strength).astype(x.dtype)
        m = jnp.mean(x)
        return (x - m) * f + m

    return fn


# ----------------------------------------------------------------------------- any shape


def noise(std: float = 0.05) -> Augment:
    """Add i.i.d. Gaussian noise ``N(0, std^2)`` to every entry (images or signals)."""
    check_range("std", std, low=0.0)

    def fn(key, x):
        return x + std * jax.random.normal(key, x.shape, x.dtype)

    return fn


def scale(strength: float = 0.1) -> Augment:
    """Multiply the whole example by a factor uniform in ``[1 - strength, 1 + strength]`` (amplitude scaling)."""
    check_range("strength", strength, low=0.0, high=1.0)

    def fn(key, x):
        return x * jax.random.uniform(key, (), minval=1 - strength, maxval=1 + strength).astype(
            x.dtype
        )

    return fn


# ----------------------------------------------------------------------------- 1-D signals


def shift(max_shift: int = 3, *, mode: str = "circular") -> Augment:
    """Shift a signal along its first axis by an integer uniform in ``[-max_shift, max_shift]``:
    ``mode="circular"`` wraps around, ``mode="zero"`` pads with zeros."""
    check_int("max_shift", max_shift, low=0)
    if mode not in ("circular", "zero"):
        raise ConfigError(f"mode must be 'circular' or 'zero'; got {mode!r}", param="mode")

    def fn(key, x):
        s = jax.random.randint(key, (), -max_shift, max_shift + 1)
        rolled = jnp.roll(x, s, axis=0)
        if mode == "circular":
            return rolled
        idx = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
        valid = (idx - s >= 0) & (idx - s < x.shape[0])
        return jnp.where(valid, rolled, jnp.zeros_like(x))

    fn.geometric = True  # an index move: applies to dense targets with the same key
    return fn


def time_stretch(max_factor: float = 0.1) -> Augment:
    """Resample a signal (first axis) stretched about its centre by ``1 + u``, ``u`` uniform in
    ``[-max_factor, max_factor]``, with linear interpolation; samples from outside the signal are 0."""
    check_range("max_factor", max_factor, low=0.0, high=0.9)

    def fn(key, x):
        n = x.shape[0]
        f = 1.0 + jax.random.uniform(key, (), minval=-max_factor, maxval=max_factor)
        c = (n - 1) / 2.0
        src = (jnp.arange(n, dtype=jnp.float32) - c) / f + c
        flat = x.reshape(n, -1).astype(jnp.float32)
        out = jax.vmap(
            lambda col: jnp.interp(src, jnp.arange(n, dtype=jnp.float32), col, left=0.0, right=0.0),
            in_axes=1,
            out_axes=1,
        )(flat)
        return out.reshape(x.shape).astype(x.dtype)

    return fn


def trend(strength: float = 0.5) -> Augment:
    """Add a random linear trend (baseline drift) along the first axis:
    ``x_t + c * (t / (n - 1) - 1/2)`` for ``t = 0 .. n - 1``, one ``c`` uniform in
    ``[-strength, strength]`` per example, the same ramp in every channel.

    New here (not in optax or the catalogue's list): the "shear" nuisance of MNIST-1D's
    generator (``x - c * linspace(-0.5, 0.5, n)``), so the model learns to ignore it. The
    ramp has mean 0, so the signal's mean is kept.

    References:
      Greydanus, "Scaling down deep learning with MNIST-1D" (the shear transform),
      https://arxiv.org/abs/2011.14439
    """
    check_range("strength", strength, low=0.0)

    def fn(key, x):
        n = x.shape[0]
        c = jax.random.uniform(key, (), minval=-strength, maxval=strength)
        ramp = jnp.linspace(-0.5, 0.5, n) if n > 1 else jnp.zeros((1,))
        return x + (c * ramp).reshape((n,) + (1,) * (x.ndim - 1)).astype(x.dtype)

    return fn


# ----------------------------------------------------------------------------- composition


def compose(*augments: Augment | Sequence[Augment]) -> Augment:
    """Apply ``augments`` in order, each with its own key ``fold_in(key, i)``: given as
    arguments, ``compose(shift(2), noise(0.1))`` (as `optax.chain`), or as one list
    (as torchvision's ``Compose``).

    Raises:
      TypeError: an augmentation that is not a callable ``(key, x) -> x``."""
    if len(augments) == 1 and isinstance(augments[0], list | tuple):
        augments = augments[0]
    augments = list(augments)
    for i, aug in enumerate(augments):
        if not callable(aug):
            raise TypeError(
                f"compose: augmentation {i} is {aug!r}, not a callable (key, x) -> x such "
                "as jtricks.data.augment.shift(2)"
            )

    def fn(key, x):
        for i, aug in enumerate(augments):
            x = aug(jax.random.fold_in(key, i), x)
        return x

    fn.parts = augments
    return fn


def _move_like(aug: Augment, key: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """Apply the index move ``aug`` to a target ``t`` of fewer axes than the input (e.g. an
    image's ``(H, W)`` class map): trailing axes are added, then removed."""
    extra = ndim - t.ndim
    moved = aug(key, t.reshape(t.shape + (1,) * extra).astype(jnp.float32))
    moved = moved.reshape(t.shape)
    return jnp.round(moved).astype(t.dtype) if jnp.issubdtype(t.dtype, jnp.integer) else moved


def augment_jointly(
    augment: Augment, key: jax.Array, x: jax.Array, targets: Sequence[jax.Array]
) -> tuple[jax.Array, list[jax.Array]]:
    """Augment one example ``x`` and move its dense ``targets`` (a class map, a mask) with it.

    Every part of the pipeline transforms ``x`` as `augment` would (same keys); the
    geometric parts (``hflip``, ``translate``, ``random_crop``, ``shift``: pure index moves
    whose random draw depends only on the key) also transform each target, so labels stay
    on their positions. Photometric parts (noise, brightness, ...) leave targets alone.
    Positions filled from outside the input get the pipeline's ``fill`` (0 by default):
    transform a mask of ones to drop them from the loss.

    New here: optax and Flax have no augmentation; this is the joint-transform rule of
    segmentation pipelines (e.g. torchvision's ``transforms.v2`` on masks).
    """
    parts = getattr(augment, "parts", None)
    steps = (
        [(augment, key)]
        if parts is None
        else [(part, jax.random.fold_in(key, i)) for i, part in enumerate(parts)]
    )
    targets = list(targets)
    for part, k in steps:
        if getattr(part, "geometric", False):
            targets = [_move_like(part, k, t, x.ndim) for t in targets]
        elif getattr(part, "parts", None) is not None:  # a nested pipeline
            x, targets = augment_jointly(part, k, x, targets)
            continue
        x = part(k, x)
    return x, targets


def apply_batch(augment: Augment, key: jax.Array, x: jax.Array) -> jax.Array:
    """Deprecated (removed from the documented API on 2026-12-02, kept for one minor
    version): a per-example augmentation applied to a batch ``(N, ...)``, one key per
    example, as ``jax.vmap(augment)(jax.random.split(key, len(x)), x)``; the train step
    does this itself (``fit(augment=...)``)."""
    warnings.warn(
        "jtricks.data.augment.apply_batch is deprecated and will be removed in jtricks "
        "0.2: write jax.vmap(augment)(jax.random.split(key, len(x)), x), or pass "
        "augment= to fit",
        DeprecationWarning,
        stacklevel=2,
    )
    return jax.vmap(augment)(jax.random.split(key, x.shape[0]), x)


PROPOSALS = 16
"""Marsaglia-Tsang proposals drawn at once per Gamma sample (`beta`): each is accepted with
probability >= 0.95, so all 16 are rejected with probability < 0.05^16 ~ 2e-21."""


def _log_gamma(key: jax.Array, a: float) -> jax.Array:
    """``log g`` for ``g ~ Gamma(a, 1)``: Marsaglia & Tsang's squeeze-free method on
    ``PROPOSALS`` proposals at once (the first accepted one is kept), with the boost
    ``Gamma(a) = Gamma(a + 1) U^(1/a)`` for ``a < 1``, in log space so that small
    shapes do not underflow."""
    shape = a + 1.0 if a < 1 else a
    d = shape - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    k_norm, k_accept, k_boost = jax.random.split(key, 3)
    x = jax.random.normal(k_norm, (PROPOSALS,))
    v = jnp.maximum((1.0 + c * x) ** 3, jnp.finfo(jnp.float32).tiny)
    log_u = jnp.log(jax.random.uniform(k_accept, (PROPOSALS,), minval=jnp.finfo(jnp.float32).tiny))
    accepted = ((1.0 + c * x) > 0) & (log_u < 0.5 * x**2 + d - d * v + d * jnp.log(v))
    i = jnp.where(accepted.any(), jnp.argmax(accepted), PROPOSALS - 1)
    log_g = jnp.log(d * v[i])
    if a < 1:
        boost = jax.random.uniform(k_boost, minval=jnp.finfo(jnp.float32).tiny)
        log_g = log_g + jnp.log(boost) / a
    return log_g


def beta(key: jax.Array, a: float, b: float) -> jax.Array:
    """One sample of ``Beta(a, b)`` as ``g_a / (g_a + g_b)`` for independent ``g ~ Gamma``:
    ``sigmoid(log g_a - log g_b)``, exact but for an event of probability < 1e-20.

    New here: `jax.random.beta` draws its Gammas by rejection in a `while` loop whose trip
    count XLA cannot know, so every mixup step would wait on the host for each loop's
    test on an accelerator; this sampler draws a fixed number of proposals (no loop).

    References:
      Marsaglia & Tsang, "A Simple Method for Generating Gamma Variables" (ACM TOMS 2000).
    """
    k_a, k_b = jax.random.split(key)
    return jax.nn.sigmoid(_log_gamma(k_a, a) - _log_gamma(k_b, b))


def mix_batch(
    key: jax.Array,
    x: jax.Array,
    y: jax.Array,
    num_classes: int,
    *,
    kind: str = "mixup",
    alpha: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Mixup or cutmix over a batch: each example is mixed with a random partner of the batch,
    ``lam ~ Beta(alpha, alpha)`` (one per batch, `beta`: no loop in the compiled step).

    * mixup: ``x = lam x_i + (1 - lam) x_j``;
    * cutmix (images): a box covering ``1 - lam`` of the area is pasted from ``x_j``; ``lam`` is
      then the exact kept fraction.

    Returns ``(x, soft_labels)`` with ``soft_labels = lam onehot(y_i) + (1 - lam) onehot(y_j)``.
    """
    if kind not in ("mixup", "cutmix"):
        raise ConfigError(f"kind must be 'mixup' or 'cutmix'; got {kind!r}", param="kind")
    k_lam, k_perm, k_box = jax.random.split(key, 3)
    lam = beta(k_lam, alpha, alpha)
    perm = jax.random.permutation(k_perm, x.shape[0])
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) if y.ndim == 1 else y
    if kind == "mixup":
        xm = lam * x + (1 - lam) * x[perm]
    else:
        if x.ndim != 4:
            raise ValueError(f"cutmix expects images (N, H, W, C); got shape {x.shape}")
        h, w = x.shape[1:3]
        rh, rw = jnp.sqrt(1 - lam) * h, jnp.sqrt(1 - lam) * w
        cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([h, w])
        y0, y1 = jnp.clip(cy - rh / 2, 0, h), jnp.clip(cy + rh / 2, 0, h)
        x0, x1 = jnp.clip(cx - rw / 2, 0, w), jnp.clip(cx + rw / 2, 0, w)
        yy, xx = jnp.arange(h)[:, None] + 0.5, jnp.arange(w)[None, :] + 0.5
        box = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        xm = jnp.where(box[None, :, :, None], x[perm], x)
        lam = 1 - jnp.mean(box.astype(jnp.float32))
    return xm.astype(x.dtype), lam * onehot + (1 - lam) * onehot[perm]


_FOR_IMAGES = (hflip, translate, random_crop, rotate, cutout, brightness, contrast)
_FOR_ANY_INPUT = (noise, scale, shift, time_stretch, trend)
AUGMENTATIONS: dict[str, Callable[..., Augment]] = {
    f.__name__: f for f in (*_FOR_IMAGES, *_FOR_ANY_INPUT)
}


def build_augment(spec: str) -> Augment:
    """Build a per-example pipeline from ``"shift(3) | noise(0.05)"``.

    Raises:
      ConfigError: unknown name (listing the valid ones) or a bad strength.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            f"augment must be a spec such as 'shift(3) | noise(0.05)'; got {spec!r}",
            param="augment",
        )
    return compose(
        [
            build_from_registry(part, AUGMENTATIONS, what="augment")
            for part in split_pipeline(spec, what="augment")
        ]
    )
