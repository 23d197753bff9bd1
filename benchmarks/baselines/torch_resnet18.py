"""PyTorch baseline for the train-step figures: the CIFAR-style ResNet-18 that
`jtricks.nn.resnet18` builds, trained with the same rule (SGD, Nesterov momentum 0.9),
eager and under `torch.compile`, on the same shape of synthetic data.

The architecture mirrors jtricks': a 3x3 stem convolution (64 channels) with BatchNorm and
ReLU, four stages of two basic blocks (64/128/256/512 channels; the first block of each
later stage has stride 2 and a 1x1 projection shortcut with BatchNorm), global average
pooling and a linear head; convolutions followed by BatchNorm have no bias. With
``--precision bf16`` the forward and backward pass run under
``torch.autocast(dtype=torch.bfloat16)`` with float32 master weights, as jtricks' bf16
does.

What makes it a baseline a PyTorch expert would accept (each a documented PyTorch
performance recipe; `baselines/README.md` says what the first GPU run showed):

* every batch reaches the model channels-last, the layout cuDNN's bf16 and TF32
  convolutions run fastest in: the data live on the device as ``(N, H, W, C)`` and a
  gathered batch is viewed as ``(N, C, H, W)`` with channels-last strides (no copy);
* ``torch.backends.cudnn.benchmark = True`` (cuDNN times its algorithms once per shape)
  and TF32 for float32 matrix products (``torch.set_float32_matmul_precision("high")``),
  the precision jax uses for float32 on these GPUs by default;
* ``compile`` compiles the forward pass *and the loss* as one graph (``torch.compile``,
  default mode), so the autocast casts and the loss fuse with the network (an earlier
  version of this script compiled the model alone); ``compile_graphs`` does the same
  with ``mode="reduce-overhead"``, which replays the compiled forward and backward as
  CUDA graphs, so a step whose kernels are small no longer waits for the host to launch
  them one by one (the remedy PyTorch documents for launch-bound steps);
* the optimizer is ``torch.optim.SGD`` with its multi-tensor (``foreach``) update,
  PyTorch's default on CUDA.

Arms: ``eager`` (the usual PyTorch loop), ``compile`` and ``compile_graphs`` (above).
Each arm is warmed up (compilation and cuDNN autotuning excluded), then each repeat
times ``--epochs`` epochs of ``--steps-per-epoch`` steps on batches gathered from a
device-resident tensor by a fresh permutation; medians over ``--repeats``; arms
alternate. A failing arm (e.g. no C++ compiler for the inductor on a CPU) is recorded
with its error and the other arms still run.

    python benchmarks/baselines/torch_resnet18.py --batch-size 512 --precision bf16
    python benchmarks/baselines/torch_resnet18.py --widths 4,8,8,8 --shape 8,8,3 \\
        --batch-size 4 --steps-per-epoch 2 --repeats 1       # a toy size on the CPU

``--flops-per-step F`` (e.g. XLA's cost analysis of the same step, as the GPU suite passes)
adds each arm's achieved TFLOP/s and, with ``--peak-tflops``, its model FLOPs utilisation.
Without torch installed it prints ``{"skipped": ...}`` and exits 0.

Prints JSON (one object) then a short table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

ARMS = ("eager", "compile", "compile_graphs")


def _block(nn, cin: int, cout: int, stride: int):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.n1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.n2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = self.n1(self.c1(x)).relu()
            y = self.n2(self.c2(y))
            return (y + (x if self.short is None else self.short(x))).relu()

    return Block()


def resnet18(nn, in_channels: int, num_classes: int, widths=(64, 128, 256, 512)):
    """The CIFAR-style ResNet-18 of `jtricks.nn.resnet18` as a `torch.nn.Module`."""
    layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])]
    layers.append(nn.ReLU())
    cin = widths[0]
    for i, w in enumerate(widths):
        for j in range(2):
            layers.append(_block(nn, cin, w, 2 if i > 0 and j == 0 else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="32,32,3", help="H,W,C of one example")
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="bf16", choices=("float32", "bf16"))
    p.add_argument("--arms", default="eager,compile")
    p.add_argument("--flops-per-step", type=float, default=None)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",")]
    for a in args.arms:
        if a not in ARMS:
            p.error(f"--arms: unknown {a!r}; valid: {', '.join(ARMS)}")
    return args


def _emit(result: dict, json_out: str | None) -> dict:
    print(json.dumps(result))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def make_arm(torch, arm: str, args: argparse.Namespace, dev: str, data) -> Callable[[], float]:
    """``run() -> seconds`` of one arm: ``args.epochs`` epochs of SGD with Nesterov momentum
    on ResNet-18, eager or `torch.compile`d (``compile_graphs``: with CUDA graphs)."""
    x_nhwc, y = data
    c, B, spe = x_nhwc.shape[-1], args.batch_size, args.steps_per_epoch
    n = B * spe
    widths = tuple(int(s) for s in args.widths.split(","))
    loss_fn = torch.nn.CrossEntropyLoss()
    bf16 = args.precision == "bf16"
    torch.manual_seed(0)
    model = resnet18(torch.nn, c, args.num_classes, widths)
    model = model.to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def forward_loss(xb, yb):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            return loss_fn(model(xb).float(), yb)

    fwd = forward_loss
    if arm == "compile":
        fwd = torch.compile(forward_loss)
    elif arm == "compile_graphs":
        fwd = torch.compile(forward_loss, mode="reduce-overhead")

    def step(idx):
        xb = x_nhwc[idx].permute(0, 3, 1, 2)  # (N, C, H, W) view, channels-last strides
        loss = fwd(xb, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def run() -> float:
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(args.epochs):
            perm = torch.randperm(n, device=dev)
            for i in range(spe):
                loss = step(perm[i * B : (i + 1) * B])
        loss.item()
        sync()
        return time.perf_counter() - t

    return run


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    try:
        import torch
    except ImportError as e:
        return _emit({"benchmark": "torch_resnet18", "skipped": f"torch: {e}"}, args.json_out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    h, w, c = (int(s) for s in args.shape.split(","))
    widths = tuple(int(s) for s in args.widths.split(","))
    B, spe = args.batch_size, args.steps_per_epoch
    n = B * spe
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_nhwc = torch.randn(n, h, w, c, generator=gen).to(dev)  # rows gather channels-last
    y = torch.randint(0, args.num_classes, (n,), generator=gen).to(dev)
    data = (x_nhwc, y)
    runs, errors, warm = {}, {}, {}
    for arm in args.arms:
        try:
            runs[arm] = make_arm(torch, arm, args, dev, data)
            warm[arm] = runs[arm]()  # warm-up: compilation and cuDNN autotuning
        except Exception as e:  # an arm that cannot run here is reported, not fatal
            errors[arm] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            runs.pop(arm, None)
    times: dict[str, list[float]] = {a: [] for a in runs}
    for _ in range(args.repeats):
        for a, run in runs.items():
            times[a].append(run())
    images = args.epochs * spe * B
    ips = {a: images / statistics.median(v) for a, v in times.items()}
    result = {
        "benchmark": "torch_resnet18",
        "shape": [h, w, c],
        "widths": list(widths),
        "batch_size": B,
        "precision": args.precision,
        "images_per_repeat": images,
        "repeats": args.repeats,
        "images_per_s": ips,
        "warmup_s": warm,
        "seconds": times,
        "errors": errors,
        "environment": {
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        },
    }
    if args.flops_per_step:
        tflops = {a: args.flops_per_step * v / B / 1e12 for a, v in ips.items()}
        result["tflops"] = tflops
        if args.peak_tflops:
            result["mfu"] = {a: v / args.peak_tflops for a, v in tflops.items()}
    _emit(result, args.json_out)
    print(f"\ntorch ResNet-18 {result['shape']} batch {B} {args.precision} on {dev}")
    for a, v in ips.items():
        print(f"{a:<10}{v:>14,.0f} images/s")
    for a, e in errors.items():
        print(f"{a:<10}failed: {e}")
    return result


if __name__ == "__main__":
    main()
