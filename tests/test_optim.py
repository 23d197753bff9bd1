"""Every optimizer and transform against its formula written out in float64 NumPy (T07, T12-T19)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtricks.errors import ConfigError
from jtricks.optim import (
    OPTIMIZERS,
    TRANSFORMS,
    adadelta,
    adagrad,
    adam,
    adamw,
    build_optimizer,
    clip_by_value,
    clip_global_norm,
    clip_global_norm_unit,
    clip_per_leaf_norm,
    current_learning_rate,
    decoupled_weight_decay,
    elastic_net,
    l1,
    l1_prox,
    l2,
    lookahead,
    momentum,
    normalized_sgd,
    rmsprop,
    sgd,
)

ETA, GAMMA, LAM, STEPS = 0.1, 0.9, 0.05, 6
TOL = 1e-10  # float64 agreement


def _params0():
    rng = np.random.default_rng(0)
    return {"b": rng.normal(size=(2,)), "w": rng.normal(size=(3, 2))}


def _grads():
    rng = np.random.default_rng(1)
    return [{"b": rng.normal(size=(2,)), "w": 2 * rng.normal(size=(3, 2))} for _ in range(STEPS)]


def _gnorm(g):
    return np.sqrt(sum(np.sum(v**2) for v in g.values()))


def _run_ref(step: Callable, state0: Callable | None = None):
    """Apply ``w <- step(w, g, state, t)`` leaf-wise in float64; returns params after every step."""
    p = {k: v.copy() for k, v in _params0().items()}
    state = {k: (state0(v) if state0 else None) for k, v in p.items()}
    out = []
    for t, g in enumerate(_grads(), start=1):
        for k in p:
            p[k], state[k] = step(k, p[k], g[k], state[k], t, g)
        out.append({k: v.copy() for k, v in p.items()})
    return out


def _zeros2(v):
    return [np.zeros_like(v), np.zeros_like(v)]


def ref_sgd(k, w, g, s, t, G):
    return w - ETA * g, s


def ref_classic(nesterov):
    def step(k, w, g, v, t, G):
        v = GAMMA * v - ETA * g
        return (w + GAMMA * v - ETA * g if nesterov else w + v), v

    return step


def ref_lr_inside(k, w, g, v, t, G):
    v = GAMMA * v + ETA * g
    return w - v, v


def ref_damped(nesterov):
    def step(k, w, g, v, t, G):
        v = GAMMA * v + (1 - GAMMA) * g
        d = GAMMA * v + (1 - GAMMA) * g if nesterov else v
        return w - ETA * d, v

    return step


def ref_torch(nesterov):
    def step(k, w, g, v, t, G):
        v = GAMMA * v + g
        return w - ETA * (g + GAMMA * v if nesterov else v), v

    return step


def ref_adagrad(eps, in_sqrt):
    def step(k, w, g, r, t, G):
        r = r + g**2
        return w - ETA * (g / np.sqrt(r + eps) if in_sqrt else g / (np.sqrt(r) + eps)), r

    return step


def ref_normalized(k, w, g, s, t, G):
    return w - ETA * g / _gnorm(G), s


def ref_rmsprop(beta, eps, in_sqrt, centered=False, mom=None):
    def step(k, w, g, s, t, G):
        r, m, b = s
        r = beta * r + (1 - beta) * g**2
        m = beta * m + (1 - beta) * g
        var = r - m**2 if centered else r
        d = g / np.sqrt(var + eps) if in_sqrt else g / (np.sqrt(var) + eps)
        if mom is not None:
            b = mom * b + d
            d = b
        return w - ETA * d, (r, m, b)

    return step


def ref_adam(b1, b2, eps, wd=0.0, nesterov=False):
    def step(k, w, g, s, t, G):
        m, v = s
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        mh, vh = m / (1 - b1**t), v / (1 - b2**t)
        if nesterov:  # NAdam (Dozat 2016): the momentum one step ahead
            mh = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        decay = wd * w if k == "w" else 0.0  # default mask: kernels only
        return w - ETA * (mh / (np.sqrt(vh) + eps) + decay), (m, v)

    return step


def ref_adadelta(rho, eps, lr=1.0):
    def step(k, w, g, s, t, G):
        eg, ex = s
        eg = rho * eg + (1 - rho) * g**2
        d = -np.sqrt(ex + eps) / np.sqrt(eg + eps) * g
        ex = rho * ex + (1 - rho) * d**2
        return w + lr * d, (eg, ex)

    return step


def ref_grad_then_sgd(transform_g):
    """A gradient-side transform followed by SGD: ``w <- w - eta T(g)``."""

    def step(k, w, g, s, t, G):
        return w - ETA * transform_g(k, w, g, G), s

    return step


def _kern(k, x):
    return x if k == "w" else 0.0


def ref_soft_threshold(k, w, g, s, t, G):
    w = w - ETA * g
    if k == "w":
        w = np.sign(w) * np.maximum(np.abs(w) - ETA * LAM, 0.0)
    return w, s


def ref_lookahead(k, w, g, s, t, G):
    """Zhang et al. 2019 around PyTorch's momentum: 2 fast steps, then the slow weights
    move halfway to the fast ones and the fast ones restart there; momentum carries on."""
    v, phi = s
    v = GAMMA * v + g
    w = w - ETA * v
    if t % 2 == 0:
        phi = phi + 0.5 * (w - phi)
        w = phi.copy()
    return w, [v, phi]


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], optax.GradientTransformation]
    spec: str  # the same optimizer through the CLI spec language (lr from the spec)
    ref: Callable
    state0: Callable | None = None


def _z(v):
    return np.zeros_like(v)


CASES = [
    Case("sgd", lambda: sgd(ETA), "sgd(lr=0.1)", ref_sgd),
    Case(
        "sgd_momentum",
        lambda: sgd(ETA, momentum=GAMMA),
        "sgd(lr=0.1, momentum=0.9)",
        ref_torch(False),
        _z,
    ),
    Case(
        "sgd_momentum_nesterov",
        lambda: sgd(ETA, GAMMA, nesterov=True),
        "sgd(lr=0.1, momentum=0.9, nesterov=True)",
        ref_torch(True),
        _z,
    ),
    Case(
        "momentum_classic",
        lambda: momentum(ETA, GAMMA),
        "momentum(lr=0.1, gamma=0.9)",
        ref_classic(False),
        _z,
    ),
    Case(
        "momentum_classic_nesterov",
        lambda: momentum(ETA, GAMMA, nesterov=True),
        "momentum(lr=0.1, nesterov=True)",
        ref_classic(True),
        _z,
    ),
    Case(
        "momentum_lr_inside",
        lambda: momentum(ETA, GAMMA, form="lr_inside"),
        "momentum(lr=0.1, form='lr_inside')",
        ref_lr_inside,
        _z,
    ),
    Case(
        "momentum_damped",
        lambda: momentum(ETA, GAMMA, form="damped"),
        "momentum(lr=0.1, form='damped')",
        ref_damped(False),
        _z,
    ),
    Case(
        "momentum_damped_nesterov",
        lambda: momentum(ETA, GAMMA, form="damped", nesterov=True),
        "momentum(lr=0.1, form='damped', nesterov=True)",
        ref_damped(True),
        _z,
    ),
    Case(
        "momentum_torch",
        lambda: momentum(ETA, GAMMA, form="torch"),
        "momentum(lr=0.1, form='torch')",
        ref_torch(False),
        _z,
    ),
    Case(
        "momentum_torch_nesterov",
        lambda: momentum(ETA, GAMMA, form="torch", nesterov=True),
        "momentum(lr=0.1, form='torch', nesterov=True)",
        ref_torch(True),
        _z,
    ),
    Case(
        "adagrad_texts", lambda: adagrad(ETA, 1e-7), "adagrad(lr=0.1)", ref_adagrad(1e-7, True), _z
    ),
    Case(
        "adagrad_torch",
        lambda: adagrad(ETA, 1e-10, eps_in_sqrt=False),
        "adagrad(lr=0.1, eps=1e-10, eps_in_sqrt=False)",
        ref_adagrad(1e-10, False),
        _z,
    ),
    Case("normalized_sgd", lambda: normalized_sgd(ETA), "normalized_sgd(lr=0.1)", ref_normalized),
    Case(
        "rmsprop_texts",
        lambda: rmsprop(ETA, 0.9, 1e-8),
        "rmsprop(lr=0.1)",
        ref_rmsprop(0.9, 1e-8, False),
        lambda v: (_z(v), _z(v), _z(v)),
    ),
    Case(
        "rmsprop_eps_in_sqrt",
        lambda: rmsprop(ETA, 0.9, 1e-8, eps_in_sqrt=True),
        "rmsprop(lr=0.1, eps_in_sqrt=True)",
        ref_rmsprop(0.9, 1e-8, True),
        lambda v: (_z(v), _z(v), _z(v)),
    ),
    Case(
        "rmsprop_centered",
        lambda: rmsprop(ETA, 0.9, 1e-8, centered=True),
        "rmsprop(lr=0.1, centered=True)",
        ref_rmsprop(0.9, 1e-8, False, centered=True),
        lambda v: (_z(v), _z(v), _z(v)),
    ),
    Case(
        "rmsprop_momentum",
        lambda: rmsprop(ETA, 0.9, 1e-8, momentum=0.5),
        "rmsprop(lr=0.1, momentum=0.5)",
        ref_rmsprop(0.9, 1e-8, False, mom=0.5),
        lambda v: (_z(v), _z(v), _z(v)),
    ),
    Case(
        "adam",
        lambda: adam(ETA),
        "adam(lr=0.1)",
        ref_adam(0.9, 0.999, 1e-8),
        lambda v: (_z(v), _z(v)),
    ),
    Case(
        "adamw",
        lambda: adamw(ETA, weight_decay=0.1),
        "adamw(lr=0.1, weight_decay=0.1)",
        ref_adam(0.9, 0.999, 1e-8, wd=0.1),
        lambda v: (_z(v), _z(v)),
    ),
    Case(
        "nadam",
        lambda: adam(ETA, nesterov=True),
        "adam(lr=0.1, nesterov=True)",
        ref_adam(0.9, 0.999, 1e-8, nesterov=True),
        lambda v: (_z(v), _z(v)),
    ),
    Case(
        "nadamw",
        lambda: adamw(ETA, weight_decay=0.1, nesterov=True),
        "adamw(lr=0.1, weight_decay=0.1, nesterov=True)",
        ref_adam(0.9, 0.999, 1e-8, wd=0.1, nesterov=True),
        lambda v: (_z(v), _z(v)),
    ),
    Case(
        "adadelta",
        lambda: adadelta(1.0),
        "adadelta(lr=1.0)",
        ref_adadelta(0.9, 1e-6),
        lambda v: (_z(v), _z(v)),
    ),
    Case(
        "clip_by_value",
        lambda: optax.chain(clip_by_value(0.5), sgd(ETA)),
        "sgd(lr=0.1) | clip_by_value(0.5)",
        ref_grad_then_sgd(lambda k, w, g, G: np.clip(g, -0.5, 0.5)),
    ),
    Case(
        "clip_global_norm",
        lambda: optax.chain(clip_global_norm(1.0), sgd(ETA)),
        "sgd(lr=0.1) | clip_global_norm(1.0)",
        ref_grad_then_sgd(lambda k, w, g, G: g * min(1.0, 1.0 / _gnorm(G))),
    ),
    Case(
        "clip_global_norm_unit",
        lambda: optax.chain(clip_global_norm_unit(1.5), sgd(ETA)),
        "sgd(lr=0.1) | clip_global_norm_unit(1.5)",
        ref_grad_then_sgd(lambda k, w, g, G: g / _gnorm(G) if _gnorm(G) > 1.5 else g),
    ),
    Case(
        "clip_per_leaf_norm",
        lambda: optax.chain(clip_per_leaf_norm(0.5), sgd(ETA)),
        "sgd(lr=0.1) | clip_per_leaf_norm(0.5)",
        ref_grad_then_sgd(lambda k, w, g, G: g * min(1.0, 0.5 / np.linalg.norm(g))),
    ),
    Case(
        "l2",
        lambda: optax.chain(l2(LAM), sgd(ETA)),
        "sgd(lr=0.1) | l2(0.05)",
        ref_grad_then_sgd(lambda k, w, g, G: g + _kern(k, 2 * LAM * w)),
    ),
    Case(
        "l1_subgradient",
        lambda: optax.chain(l1(LAM), sgd(ETA)),
        "sgd(lr=0.1) | l1(0.05)",
        ref_grad_then_sgd(lambda k, w, g, G: g + _kern(k, LAM * np.sign(w))),
    ),
    Case(
        "elastic_net",
        lambda: optax.chain(elastic_net(LAM, 0.3), sgd(ETA)),
        "sgd(lr=0.1) | elastic_net(0.05, 0.3)",
        ref_grad_then_sgd(lambda k, w, g, G: g + _kern(k, LAM * (0.7 * np.sign(w) + 0.6 * w))),
    ),
    Case(
        "weight_decay_decoupled",
        lambda: optax.chain(sgd(ETA), decoupled_weight_decay(LAM, ETA)),
        "sgd(lr=0.1) | weight_decay(0.05)",
        ref_grad_then_sgd(lambda k, w, g, G: g + _kern(k, LAM * w)),
    ),
    Case(
        "lookahead",
        lambda: lookahead(momentum(ETA, GAMMA, form="torch"), sync_period=2, alpha=0.5),
        "momentum(lr=0.1, form='torch') | lookahead(sync_period=2, alpha=0.5)",
        ref_lookahead,
        lambda w: [np.zeros_like(w), w.copy()],
    ),
    Case(
        "l1_proximal",
        lambda: optax.chain(sgd(ETA), l1_prox(LAM, ETA)),
        "sgd(lr=0.1) | l1(0.05, form='proximal')",
        ref_soft_threshold,
    ),
]


def _run_tx(tx: optax.GradientTransformation):
    params = jax.tree.map(jnp.asarray, _params0())
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    out = []
    for g in _grads():
        updates, state = step(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_formula_in_float64(case):
    expect = _run_ref(case.ref, case.state0)
    with jax.enable_x64(True):
        for tx in (case.make(), build_optimizer(case.spec)):
            got = _run_tx(tx)
            for t, (e, g) in enumerate(zip(expect, got, strict=True)):
                for k in e:
                    assert g[k].dtype == jnp.float64
                    np.testing.assert_allclose(
                        g[k], e[k], rtol=TOL, atol=TOL, err_msg=f"{case.id} step {t + 1} {k}"
                    )


def test_every_registered_name_is_in_the_table():
    covered = {c.spec.split("|")[-1].strip().split("(")[0] for c in CASES} | {
        c.spec.split("(")[0] for c in CASES
    }
    assert set(OPTIMIZERS) <= covered and set(TRANSFORMS) <= covered


# --------------------------------------------------------------------------- equivalences


def test_classic_equals_lr_inside_form():
    with jax.enable_x64(True):
        a = _run_tx(momentum(ETA, GAMMA, form="classic"))
        b = _run_tx(momentum(ETA, GAMMA, form="lr_inside"))
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-12, atol=1e-12)


def test_damped_equals_classic_with_scaled_lr():
    beta = 0.8
    with jax.enable_x64(True):
        a = _run_tx(momentum(ETA, beta, form="damped"))
        b = _run_tx(momentum(ETA * (1 - beta), beta, form="classic"))
        c = _run_tx(momentum(ETA, beta, form="torch"))
        d = _run_tx(momentum(ETA, beta, form="classic"))
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-12, atol=1e-12)
    for x, y in zip(c, d, strict=True):  # torch form = classic for a constant learning rate
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-12, atol=1e-12)


def test_elastic_net_endpoints_are_l2_and_l1():
    with jax.enable_x64(True):
        for a, b in [(elastic_net(LAM, 1.0), l2(LAM)), (elastic_net(LAM, 0.0), l1(LAM))]:
            x, y = _run_tx(optax.chain(a, sgd(ETA))), _run_tx(optax.chain(b, sgd(ETA)))
            for u, v in zip(x, y, strict=True):
                for k in u:
                    np.testing.assert_allclose(u[k], v[k], rtol=1e-12, atol=1e-12)


def test_proximal_l1_gives_exact_zeros_and_subgradient_does_not():
    params = {"w": jnp.linspace(-1.0, 1.0, 40).reshape(8, 5), "b": jnp.ones(5)}
    grads = jax.tree.map(jnp.zeros_like, params)
    for tx, expect_zeros in [
        (optax.chain(sgd(0.1), l1_prox(0.5, 0.1)), True),
        (optax.chain(l1(0.5), sgd(0.1)), False),
    ]:
        p, s = params, tx.init(params)
        for _ in range(10):
            u, s = tx.update(grads, s, p)
            p = optax.apply_updates(p, u)
        zeros = int(jnp.sum(p["w"] == 0.0))
        assert (zeros >= 20) == expect_zeros, zeros
        np.testing.assert_array_equal(p["b"], params["b"])  # biases are masked out by default


_DECAY = optax.linear_schedule(ETA, ETA / 10, STEPS)


def _kernels(p):
    return jax.tree.map(lambda x: x.ndim >= 2, p)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: adamw(ETA, weight_decay=0.1),
            lambda: optax.adamw(ETA, weight_decay=0.1, mask=_kernels),
        ),
        # a decaying rate: PyTorch's form (rate outside the velocity) and the texts' part ways
        (lambda: sgd(_DECAY, 0.9), lambda: optax.sgd(_DECAY, 0.9)),
        (lambda: sgd(_DECAY, 0.9, nesterov=True), lambda: optax.sgd(_DECAY, 0.9, nesterov=True)),
        (lambda: adam(ETA, nesterov=True), lambda: optax.nadam(ETA)),
        (
            lambda: adamw(ETA, weight_decay=0.1, nesterov=True),
            lambda: optax.nadamw(ETA, weight_decay=0.1, mask=_kernels),
        ),
    ],
    ids=["adamw", "sgd_momentum", "sgd_nesterov", "nadam", "nadamw"],
)
def test_named_optimizers_equal_optax_s_with_the_same_arguments(ours, theirs):
    with jax.enable_x64(True):
        a = _run_tx(ours())
        b = _run_tx(theirs())
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-12, atol=1e-12)


def test_masks():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    zero = jax.tree.map(jnp.zeros_like, params)
    for mask, decayed in [
        (None, {"w"}),
        ("weights", {"w"}),
        ("all", {"w", "b"}),
        ({"w": False, "b": True}, {"b"}),
    ]:
        tx = l2(0.5, mask=mask)
        u, _ = tx.update(zero, tx.init(params), params)
        assert {k for k in u if float(jnp.abs(u[k]).sum()) > 0} == decayed
    with pytest.raises(ConfigError, match="mask"):
        l2(0.1, mask="biases")


# --------------------------------------------------------------------------- convergence


def quadratic(w):
    """Ill-conditioned quadratic (condition number 100)."""
    return 0.5 * (w[0] ** 2 + 100.0 * w[1] ** 2)


def rosenbrock(w):
    return (1.0 - w[0]) ** 2 + 100.0 * (w[1] - w[0] ** 2) ** 2


CONVERGENCE = {
    # name: (quadratic optimizer, rosenbrock optimizer, rosenbrock steps)
    "sgd": (sgd(0.015), sgd(1e-3), 20000),
    "momentum": (momentum(0.005, 0.9), momentum(2e-4, 0.9), 20000),
    "momentum_damped": (
        momentum(0.05, 0.9, form="damped"),
        momentum(2e-3, 0.9, form="damped"),
        20000,
    ),
    "adagrad": (adagrad(0.5), adagrad(0.5), 20000),
    "normalized_sgd": (
        normalized_sgd(optax.exponential_decay(0.1, 100, 0.6)),
        normalized_sgd(optax.exponential_decay(0.05, 1000, 0.8)),
        20000,
    ),
    "rmsprop": (
        rmsprop(optax.exponential_decay(0.01, 100, 0.8)),
        rmsprop(optax.exponential_decay(3e-3, 1000, 0.8)),
        20000,
    ),
    "adam": (adam(0.05), adam(0.02), 5000),
    "adamw": (adamw(0.05, weight_decay=0.0), adamw(0.02, weight_decay=0.0), 5000),
    "adadelta": (
        adadelta(optax.exponential_decay(1.0, 200, 0.7)),
        adadelta(optax.exponential_decay(3.0, 2000, 0.7)),
        20000,
    ),
}


def _minimise(f, tx, w0, steps):
    def body(carry, _):
        w, s = carry
        g = jax.grad(f)(w)
        u, s = tx.update(g, s, w)
        return (optax.apply_updates(w, u), s), None

    (w, _), _ = jax.jit(lambda w: jax.lax.scan(body, (w, tx.init(w)), None, length=steps))(w0)
    return float(f(w))


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_converges_on_quadratic_and_rosenbrock(name):
    quad_tx, rosen_tx, rosen_steps = CONVERGENCE[name]
    assert _minimise(quadratic, quad_tx, jnp.array([1.0, 1.0]), 2000) < 1e-6
    assert _minimise(rosenbrock, rosen_tx, jnp.array([-1.2, 1.0]), rosen_steps) < 1e-3


# --------------------------------------------------------------------------- jit, dtypes


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_jit_compiles_once_and_keeps_bf16(case):
    params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.ones((2,), jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for tx in (case.make(), build_optimizer(case.spec)):
        _check_jit_and_bf16(tx, params, grads, case.id)


def _check_jit_and_bf16(tx, params, grads, name):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state, u

    p1, s1, _ = step(params, state)
    p2, s2, u2 = step(p1, s1)
    assert step._cache_size() == 1
    for tree in (p2, u2):
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(tree))
    # state leaves shaped like a parameter keep the parameter's dtype
    param_shapes = {(3, 2), (2,)}
    for x in jax.tree.leaves(s2):
        if x.shape in param_shapes:
            assert x.dtype == jnp.bfloat16, name
    assert jax.tree.structure(s1) == jax.tree.structure(s2)


# --------------------------------------------------------------------------- spec language


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "adamx",
            "valid optimizers are: adadelta, adagrad, adam, adamw, momentum, normalized_sgd, rmsprop, sgd",
        ),
        ("adam | clip_norm(1)", "valid transforms are: clip_by_value, clip_global_norm"),
        ("adam(beta=0.9)", "valid arguments are: learning_rate, b1, b2, eps, eps_root, nesterov"),
        ("sgd(nesterov=True)", "nesterov=True looks ahead along the momentum; give momentum"),
        ("sgd(momentum=1.0)", "momentum"),
        ("adam(b1=1.5)", "b1"),
        ("adam | sgd", "exactly one optimizer"),
        ("l2(1e-4)", "no optimizer"),
        ("adam | clip_global_norm(-1)", "max_norm"),
        ("momentum(form='heavy')", "form must be one of classic, lr_inside, damped, torch"),
        ("adam(lr=-1)", "learning_rate"),
        ("adam(lr='fast')", "learning rate must be a number"),
        ("l1(0.1, form='lasso') | sgd", "subgradient"),
        ("adam | l2(0.1, mask='biases')", "mask"),
        ("adam(", "cannot parse"),
        ("adam | lookahead(sync_period=0)", "sync_period must satisfy 1 <= sync_period; got 0"),
        ("adam | lookahead(alpha=1.5)", "alpha"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_optimizer(spec, 0.1)


def test_dict_and_list_specs_equal_the_string():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    grads = jax.tree.map(lambda p: 3 * jnp.ones_like(p), params)
    specs = [
        "adam(lr=1e-2) | clip_global_norm(1.0) | l2(1e-3)",
        [{"name": "adam", "lr": 1e-2}, "clip_global_norm(1.0)", {"name": "l2", "lam": 1e-3}],
        [
            "l2(1e-3)",
            "clip_global_norm(1.0)",
            "adam(lr=1e-2)",
        ],  # order of gradient transforms matters...
    ]
    outs = []
    for spec in specs:
        tx = build_optimizer(spec)
        outs.append(tx.update(grads, tx.init(params), params)[0])
    for k in params:
        np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-6)
        np.testing.assert_allclose(outs[0][k], outs[2][k], rtol=1e-6)
    # gradient transforms keep their written order: l2 then clip differs from clip then l2
    a, b = (
        build_optimizer("sgd(lr=1.0) | clip_global_norm(1.0) | l2(0.5)"),
        build_optimizer("l2(0.5) | clip_global_norm(1.0) | sgd(lr=1.0)"),
    )
    ua = a.update(grads, a.init(params), params)[0]
    ub = b.update(grads, b.init(params), params)[0]
    assert not np.allclose(ua["w"], ub["w"])
    expected = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(2e-3, mask=lambda p: {"w": True, "b": False}),
        optax.adam(1e-2),
    )
    e = expected.update(grads, expected.init(params), params)[0]
    for k in params:
        np.testing.assert_allclose(outs[0][k], e[k], rtol=1e-6)


def test_learning_rate_is_injected_and_readable():
    tx = build_optimizer("sgd", optax.linear_schedule(1.0, 0.0, 10))
    params = {"w": jnp.ones(2)}
    s = tx.init(params)
    for _ in range(3):
        _, s = tx.update(params, s, params)
    np.testing.assert_allclose(current_learning_rate(s), 0.8, rtol=1e-6)
    tx = build_optimizer("adam", 0.5, plateau=True)
    s = optax.tree_utils.tree_set(tx.init(params), plateau_scale=jnp.float32(0.25))
    np.testing.assert_allclose(current_learning_rate(s), 0.125, rtol=1e-6)
    assert current_learning_rate(optax.adam(0.1).init(params)) is None


def test_lookahead_follows_optax_lookahead_on_the_model_s_own_parameters():
    """The second code path: `optax.lookahead` (slow weights in `LookaheadParams`) takes the
    same fast steps; ours, with the slow weights in its state, keeps the model's
    parameters equal to optax's fast ones and its state's ``slow`` to optax's slow ones."""
    from jtricks.optim import lookahead

    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, _params0())
        ours, theirs = lookahead(optax.adam(0.1), 3, 0.4), optax.lookahead(optax.adam(0.1), 3, 0.4)
        pair = optax.LookaheadParams.init_synced(params)
        s_ours, s_theirs = ours.init(params), theirs.init(pair)
        for g in _grads() + _grads():
            g = jax.tree.map(jnp.asarray, g)
            u, s_ours = ours.update(g, s_ours, params)
            params = optax.apply_updates(params, u)
            u, s_theirs = theirs.update(g, s_theirs, pair)
            pair = optax.apply_updates(pair, u)
            for a, b in ((params, pair.fast), (s_ours.slow, pair.slow)):
                for k in a:
                    np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12)
