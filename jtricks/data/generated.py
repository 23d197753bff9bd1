"""Generated datasets for the other tasks: regression, 1-D segmentation, token streams, text.

Each needs no download and, where the generator makes it known, reports the best test
loss any model could reach (``Dataset.loss_floor``), so a run can print its gap to it:

* `regression`: ``y = f(x) + sigma * eps``; the Bayes predictor ``f`` has expected MSE
  ``sigma^2``;
* `tokens`: a first-order Markov chain; the best next-token cross-entropy is its
  entropy rate ``H = -sum_i pi_i sum_j P_ij log P_ij`` (nats per token, ``pi`` stationary);
* `segmentation1d`: no closed form (the noise makes some positions ambiguous): ``None``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jtricks.data.dataset import Dataset
from jtricks.errors import ConfigError, check_int, check_range


def regression(
    num_train: int = 2000,
    num_test: int = 500,
    features: int = 8,
    targets: int = 1,
    noise: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """A smooth non-linear regression: ``x ~ N(0, I_F)``, ``y = tanh(x W / sqrt(F)) V + noise eps``.

    ``W`` is ``(F, 32)`` and ``V`` ``(32, T)`` standard normal scaled by ``1/sqrt(32)``, so
    each target has variance about 0.4 before the noise. ``loss_floor = noise**2``.
    """
    num_train = check_int("num_train", num_train, low=1)
    num_test = check_int("num_test", num_test, low=1)
    features = check_int("features", features, low=1)
    targets = check_int("targets", targets, low=1)
    check_range("noise", noise, low=0.0)
    rng = np.random.default_rng(check_int("seed", seed, low=0))
    w = rng.standard_normal((features, 32)) / np.sqrt(features)
    v = rng.standard_normal((32, targets)) / np.sqrt(32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, features))
        y = np.tanh(x @ w) @ v + noise * rng.standard_normal((n, targets))
        return x.astype(np.float32), y.astype(np.float32)

    (x, y), (xt, yt) = draw(num_train), draw(num_test)
    return Dataset("regression", x, y, xt, yt, targets, task="regression", loss_floor=noise**2)


def _pattern(kind: int, width: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, width)
    return np.sin(2 * np.pi * t) if kind == 1 else 1.0 - np.abs(2 * t - 1)


def segmentation1d(
    num_train: int = 2000,
    num_test: int = 500,
    length: int = 40,
    noise: float = 0.3,
    seed: int = 0,
) -> Dataset:
    """Which positions of a noisy 1-D signal carry a pattern, and which pattern.

    Each signal of ``length`` samples is a slow random drift (a smoothed random walk,
    MNIST-1D's correlated noise) plus white noise of std ``noise``, with two patterns of
    random width 6-12 at random places: a sine period (class 1) and a triangle (class
    2), scaled by a random amplitude in [1, 2]; the other positions are class 0. Targets
    are ``(N, length)`` class indices; three classes.
    """
    num_train = check_int("num_train", num_train, low=1)
    num_test = check_int("num_test", num_test, low=1)
    length = check_int("length", length, low=24)
    check_range("noise", noise, low=0.0)
    rng = np.random.default_rng(check_int("seed", seed, low=0))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        walk = np.cumsum(rng.standard_normal((n, length)), axis=1)
        kernel = np.ones(9) / 9
        drift = np.stack([np.convolve(w, kernel, mode="same") for w in walk]) * 0.15
        x = drift + noise * rng.standard_normal((n, length))
        y = np.zeros((n, length), np.int32)
        for i in range(n):
            for kind in (1, 2):
                width = int(rng.integers(6, 13))
                free = np.flatnonzero(np.convolve(y[i] == 0, np.ones(width), mode="valid") == width)
                if free.size:
                    start = int(rng.choice(free))
                    x[i, start : start + width] += rng.uniform(1, 2) * _pattern(kind, width)
                    y[i, start : start + width] = kind
        return x.astype(np.float32), y

    (x, y), (xt, yt) = draw(num_train), draw(num_test)
    return Dataset("segmentation1d", x, y, xt, yt, 3, task="segmentation")


def _stationary(p: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eig(p.T)
    pi = np.real(vecs[:, np.argmin(np.abs(vals - 1.0))])
    return pi / pi.sum()


def tokens(
    num_train: int = 2000,
    num_test: int = 500,
    seq_len: int = 32,
    vocab: int = 16,
    concentration: float = 0.3,
    seed: int = 0,
) -> Dataset:
    """Sequences of a random first-order Markov chain over ``vocab`` tokens.

    Row ``i`` of the transition matrix is drawn from ``Dirichlet(concentration)`` (small:
    predictable chains); each sequence starts from the stationary distribution ``pi``.
    Inputs are tokens ``0 .. seq_len-1`` of a sequence of ``seq_len + 1``, targets tokens
    ``1 .. seq_len`` (the next token). ``loss_floor`` is the entropy rate (nats/token).
    """
    num_train = check_int("num_train", num_train, low=1)
    num_test = check_int("num_test", num_test, low=1)
    seq_len = check_int("seq_len", seq_len, low=1)
    vocab = check_int("vocab", vocab, low=2)
    check_range("concentration", concentration, low=0.0, low_inclusive=False)
    rng = np.random.default_rng(check_int("seed", seed, low=0))
    p = rng.dirichlet(np.full(vocab, concentration), size=vocab)
    pi = _stationary(p)
    cdf = np.cumsum(p, axis=1)

    def draw(n: int) -> np.ndarray:
        seq = np.empty((n, seq_len + 1), np.int32)
        seq[:, 0] = rng.choice(vocab, size=n, p=pi)
        for t in range(1, seq_len + 1):
            u = rng.random(n)[:, None]
            seq[:, t] = np.minimum((u > cdf[seq[:, t - 1]]).sum(axis=1), vocab - 1)
        return seq

    logs = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    floor = float(-(pi[:, None] * p * logs).sum())
    tr, te = draw(num_train), draw(num_test)
    return Dataset(
        "tokens", tr[:, :-1], tr[:, 1:], te[:, :-1], te[:, 1:], vocab, task="lm", loss_floor=floor
    )


def text(path: str, seq_len: int = 64, test_fraction: float = 0.1) -> Dataset:
    """A file read as bytes (vocabulary 256), cut into windows of ``seq_len + 1`` bytes.

    Windows start every ``seq_len`` bytes; the last ``test_fraction`` of them (the end of
    the file) is the test split, so no test byte is a training target. No floor is known.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"text file {str(p)!r} does not exist or is not a file", param="dataset")
    seq_len = check_int("seq_len", seq_len, low=1)
    check_range(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
    )
    data = np.frombuffer(p.read_bytes(), np.uint8).astype(np.int32)
    windows = (len(data) - 1) // seq_len
    num_test = max(1, round(windows * test_fraction))
    if windows - num_test < 1:
        raise ConfigError(
            f"text file {str(p)!r} has {len(data)} bytes: too short for a training and a test "
            f"window of seq_len={seq_len} (needs at least {2 * seq_len + 1})",
            param="dataset",
        )
    starts = np.arange(windows) * seq_len
    seq = data[starts[:, None] + np.arange(seq_len + 1)]
    tr, te = seq[:-num_test], seq[-num_test:]
    return Dataset(f"text:{p}", tr[:, :-1], tr[:, 1:], te[:, :-1], te[:, 1:], 256, task="lm")
