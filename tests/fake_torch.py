"""A stand-in for the part of PyTorch `benchmarks/baselines/torch_resnet18.py` uses, so CI
(which has no torch) runs that script's own logic: arms, warm-up, repeats, timing and its
result. Tensors carry shapes only (no arithmetic): a layer computes its output shape the
way PyTorch's does, and a module counts its parameters as PyTorch's would, so the test
also checks that the baseline builds jtricks' ResNet-18 (same parameter count)."""

from __future__ import annotations

import contextlib
import types

import numpy as np

__version__ = "fake"
bfloat16, float32, channels_last = "bfloat16", "float32", "channels_last"


class Tensor:
    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)

    def to(self, *args, **kwargs):
        return self

    def __getitem__(self, idx):
        rows = idx.shape[0] if isinstance(idx, Tensor) else len(range(self.shape[0])[idx])
        return Tensor((rows, *self.shape[1:]))

    def permute(self, *dims):
        return Tensor(tuple(self.shape[d] for d in dims))

    def __add__(self, other):
        assert self.shape == other.shape, (self.shape, other.shape)
        return Tensor(self.shape)

    def relu(self):
        return self

    def float(self):
        return self

    def backward(self):
        pass

    def item(self):
        return 0.0


class Generator:
    def __init__(self, device="cpu"):
        self.rng = np.random.default_rng(0)

    def manual_seed(self, seed):
        self.rng = np.random.default_rng(seed)
        return self


def randn(*shape, generator=None):
    return Tensor(shape)


def randint(low, high, shape, generator=None):
    return Tensor(shape)


def randperm(n, device=None):
    return Tensor((n,))


def manual_seed(seed):
    pass


def set_float32_matmul_precision(mode):
    pass


def autocast(device, dtype=None, enabled=True):
    return contextlib.nullcontext()


def compile(fn, mode=None):
    return fn


cuda = types.SimpleNamespace(is_available=lambda: False, synchronize=lambda: None)
backends = types.SimpleNamespace(cudnn=types.SimpleNamespace(benchmark=False))


class Module:
    def __init__(self):
        self.weights: list[int] = []

    def __call__(self, x):
        return self.forward(x)

    def children(self):
        return [v for v in vars(self).values() if isinstance(v, Module)]

    def parameters(self):
        own = list(self.weights)
        return own + [p for child in self.children() for p in child.parameters()]

    def to(self, *args, **kwargs):
        return self

    def train(self):
        return self


class Conv2d(Module):
    def __init__(self, cin, cout, k, stride=1, padding=0, bias=True):
        super().__init__()
        self.cout, self.k, self.stride, self.padding = cout, k, stride, padding
        self.weights = [cin * cout * k * k] + ([cout] if bias else [])

    def forward(self, x):
        n, _, h, w = x.shape
        size = lambda d: (d + 2 * self.padding - self.k) // self.stride + 1  # noqa: E731
        return Tensor((n, self.cout, size(h), size(w)))


class BatchNorm2d(Module):
    def __init__(self, c):
        super().__init__()
        self.weights = [c, c]

    def forward(self, x):
        return x


class ReLU(Module):
    def forward(self, x):
        return x


class AdaptiveAvgPool2d(Module):
    def __init__(self, size):
        super().__init__()

    def forward(self, x):
        return Tensor((x.shape[0], x.shape[1], 1, 1))


class Flatten(Module):
    def forward(self, x):
        return Tensor((x.shape[0], int(np.prod(x.shape[1:]))))


class Linear(Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.weights = [cin * cout, cout]

    def forward(self, x):
        assert x.shape[1] == self.cin, x.shape
        return Tensor((x.shape[0], self.cout))


class Sequential(Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = layers

    def children(self):
        return list(self.layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CrossEntropyLoss:
    def __call__(self, logits, labels):
        assert logits.shape[0] == labels.shape[0], (logits.shape, labels.shape)
        return Tensor(())


class SGD:
    steps = 0

    def __init__(self, params, lr, momentum=0.0, nesterov=False):
        self.params = list(params)

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        SGD.steps += 1


nn = types.SimpleNamespace(
    Module=Module,
    Conv2d=Conv2d,
    BatchNorm2d=BatchNorm2d,
    ReLU=ReLU,
    AdaptiveAvgPool2d=AdaptiveAvgPool2d,
    Flatten=Flatten,
    Linear=Linear,
    Sequential=Sequential,
    CrossEntropyLoss=CrossEntropyLoss,
)
optim = types.SimpleNamespace(SGD=SGD)
