"""The denominators of model FLOPs utilisation (MFU): datasheet peaks of the devices the
benchmarks have met, and this machine's measured matmul rate.

``PEAK_FLOPS[(kind, precision)]`` holds dense (no sparsity) tensor-core FLOP/s from the
vendors' datasheets (SXM parts): H100 and H200 989.4e12 in bf16 and 494.7e12 in TF32, the
rate float32 matrix products get under jax's default matmul precision on these GPUs.
A device not listed has no datasheet MFU. `matmul_flops` measures the best rate of a few
large products in a dtype, a ceiling that a real program can approach on any device,
the CPU included. `lowered_flops` counts a program's FLOPs, the MFU numerator.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

PEAK_FLOPS = {
    ("H100", "float32"): 494.7e12,
    ("H100", "bf16"): 989.4e12,
    ("H200", "float32"): 494.7e12,
    ("H200", "bf16"): 989.4e12,
}


def peak_flops(device_kind: str, precision: str) -> float | None:
    """Datasheet peak for a JAX ``device_kind`` such as ``"NVIDIA H200"`` or ``"NVIDIA H100
    80GB HBM3"`` (PCIe parts, which run lower, are not matched), or None."""
    if "pcie" in device_kind.lower():
        return None
    for (kind, prec), value in PEAK_FLOPS.items():
        if prec == precision and kind.lower() in device_kind.lower().split():
            return value
    return None


def lowered_flops(lowered: Any) -> float | None:
    """FLOPs of one call of a program, from XLA's cost analysis of its *lowered*
    (unoptimised) module, ``jax.jit(f).lower(...)``; ``None`` where the backend has no cost
    analysis.

    New here: the count comes from the module before XLA's GPU passes, which turn every
    convolution into a cuDNN custom call that the compiled module's cost analysis does not
    count (it reported 10.7 GFLOP for a ResNet-18 step of about a TFLOP). A convolution
    counts 2 FLOPs per multiply-add over the taps that meet the input (padding excluded);
    a matrix product ``2 m n k``; element-wise operations one each.
    """
    try:
        cost = lowered.cost_analysis()
    except Exception:  # backend dependent: best effort
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float((cost or {}).get("flops", 0.0))
    return flops if flops > 0 else None


def matmul_flops(dtype=jnp.float32, n: int = 2048, repeats: int = 7) -> float:
    """This device's matmul rate in FLOP/s: the best of ``repeats`` ``n x n`` products in
    ``dtype`` (the highest rate seen, so a floor derived from it is the lowest)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(mm(a, a))
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
