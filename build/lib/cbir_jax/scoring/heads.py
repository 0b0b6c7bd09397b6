"""Pair heads: every scorer, learned or fixed, maps a (query, gallery) feature pair to a similarity.

Heads broadcast over leading axes: q (..., D) and g (..., D) give (...,). Higher means more similar.
The fixed metrics are heads without parameters, so one evaluation path serves all of them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbir_jax.core.config import HeadRerank
from cbir_jax.core.registry import Registry
from cbir_jax.core.vectors import l2_normalise

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "tanh": jnp.tanh}
EPS = 1e-6  # floor of feature SSIM's data range
SSIM_K1, SSIM_K2 = 0.01, 0.03  # skimage's SSIM constants (cbir_jax/labels/ssim.py is SSIM on images)


def nonnegative_kernel(kernel: jax.Array) -> jax.Array:
    """The weights a monotone layer uses: max(kernel, 0). At a kernel of exactly 0 the gradient is 1/2 (JAX
    splits ties), so a zero-initialised monotone layer can still learn, and a weight pushed below 0 stays 0."""
    return jnp.maximum(kernel, 0.0)


def _nonnegative_lecun(key, shape, dtype=jnp.float32):
    return jnp.abs(nn.initializers.lecun_normal()(key, shape, dtype))


class SignedDense(nn.Module):
    """Dense with weights `sign * max(kernel, 0)`: non-decreasing (+1) or non-increasing (-1) in each input."""

    features: int
    sign: float = 1.0
    kernel_init: Callable = _nonnegative_lecun
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return x @ (self.sign * nonnegative_kernel(kernel)) + bias


MONOTONE_ACTIVATIONS = ("relu", "tanh")


class MLP(nn.Module):
    """Hidden layers then one output unit; the trunk shared by the learned heads.

    `constant_start`: the MLP starts at zero, so a residual head starts exactly at its base metric — the
    output layer starts at zero; or, when `monotone`, the first layer does (with a small positive bias so
    its units pass gradients; a zero monotone output layer would be stuck, max(v, 0) has no gradient below
    0) and the output is measured from that of a zero input.
    `monotone`: every layer is a `SignedDense`, the output one with sign -1, so the output never rises when
    an input rises (with a monotone activation). Layers are named Dense_0, Dense_1, ... either way, so the
    GEMM forms read them alike (`effective_layers`).
    """

    hidden: Sequence[int]
    activation: str = "relu"
    constant_start: bool = False
    monotone: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        zeros = {"kernel_init": nn.initializers.zeros}
        layers = []
        for i, width in enumerate(self.hidden):
            if self.monotone:
                start = {**zeros, "bias_init": nn.initializers.constant(0.1)} if self.constant_start and i == 0 else {}
                layers.append(SignedDense(width, name=f"Dense_{i}", **start))
            else:
                layers.append(nn.Dense(width, name=f"Dense_{i}"))
        name = f"Dense_{len(self.hidden)}"
        if self.monotone:
            layers.append(SignedDense(1, sign=-1.0, name=name))
        else:
            layers.append(nn.Dense(1, name=name, **(zeros if self.constant_start else {})))

        def apply(h):
            for layer in layers[:-1]:
                h = act(layer(h))
            return layers[-1](h)[..., 0]

        if self.monotone and self.constant_start:
            # Measured from a zero input: exactly 0 at the start, and <= 0 always (monotone), so the
            # residual's own bias, not the correction, carries any offset of the target.
            return apply(x) - apply(jnp.zeros(x.shape[-1:], x.dtype))
        return apply(x)


def effective_layers(mlp_params, monotone: bool) -> list[tuple[jax.Array, jax.Array]]:
    """The (weights, bias) each Dense layer of an `MLP` actually applies, in order: what a GEMM form needs."""
    names = sorted(mlp_params, key=lambda s: int(s.rsplit("_", 1)[1]))
    layers = [(mlp_params[n]["kernel"], mlp_params[n]["bias"]) for n in names]
    if not monotone:
        return layers
    signs = [1.0] * (len(layers) - 1) + [-1.0]
    return [(sign * nonnegative_kernel(w), b) for sign, (w, b) in zip(signs, layers)]


class SquaredDifferenceMLP(nn.Module):
    """The seed's head: an MLP on (q - g)**2, symmetric in its two inputs by construction.

    Its first layer is sum_k W_k (q_k - g_k)^2 = sum_k W_k q_k^2 + sum_k W_k g_k^2 - 2 sum_k W_k q_k g_k: a
    per-image term can only be learned together with a pair term of the *opposite* sign. `monotone=True`
    (all weights >= 0, output negated) keeps that pair term a similarity: a larger difference in any
    coordinate never raises the score.
    """

    hidden: Sequence[int]
    activation: str = "relu"
    constant_start: bool = False
    monotone: bool = False

    @nn.compact
    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        return MLP(self.hidden, self.activation, self.constant_start, self.monotone, name="mlp")((q - g) ** 2)


class ConcatMLP(nn.Module):
    """SimNet-style head: an MLP on the concatenated pair [q, g] (free to be non-symmetric)."""

    hidden: Sequence[int]
    activation: str = "relu"
    constant_start: bool = False

    @nn.compact
    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        q, g = jnp.broadcast_arrays(q, g)
        return MLP(self.hidden, self.activation, self.constant_start, name="mlp")(jnp.concatenate([q, g], axis=-1))


def euclidean_distance(q: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.sum((q - g) ** 2, axis=-1), 0.0))


def cosine_similarity(q: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.sum(l2_normalise(q) * l2_normalise(g), axis=-1)


@jax.jit
def ssim_vectors(x: jax.Array, y: jax.Array, data_range: float | jax.Array | None = None) -> jax.Array:
    """Global SSIM between 1-D signals (..., D) and (..., D) -> (...), broadcasting leading dims.

    Definition (one window spanning the whole vector, skimage's sample covariance)::

        mu_x = mean(x), var_x = sum((x - mu_x)^2) / (D - 1), cov = sum((x - mu_x)(y - mu_y)) / (D - 1)
        C1 = (0.01 L)^2, C2 = (0.03 L)^2
        SSIM = (2 mu_x mu_y + C1)(2 cov + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2))

    ``L = data_range`` (scalar or broadcastable to the output). Feature vectors have no natural range,
    so the caller should pass one fixed for the whole dataset (e.g. max - min over all features), or
    labels are not comparable across pairs. ``None`` falls back to the pair's own joint range
    ``max(x, y) - min(x, y)``. Centred two-pass sums keep float32 accurate. Needs D >= 2.
    """
    x, y = jnp.broadcast_arrays(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    d = x.shape[-1]
    if d < 2:
        raise ValueError(f"ssim_vectors needs at least 2 features, got {d}")
    if data_range is None:
        data_range = jnp.maximum(x.max(-1), y.max(-1)) - jnp.minimum(x.min(-1), y.min(-1))
    big_l = jnp.asarray(data_range, jnp.float32)
    mu_x, mu_y = x.mean(-1), y.mean(-1)
    dx, dy = x - mu_x[..., None], y - mu_y[..., None]
    var_x = jnp.sum(dx * dx, -1) / (d - 1)
    var_y = jnp.sum(dy * dy, -1) / (d - 1)
    cov = jnp.sum(dx * dy, -1) / (d - 1)
    c1, c2 = (SSIM_K1 * big_l) ** 2, (SSIM_K2 * big_l) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def feature_ssim(q: jax.Array, g: jax.Array) -> jax.Array:
    """Global SSIM between two feature vectors seen as 1-D signals (`ssim_vectors`).

    The data range L is the pair's joint range, so the score is invariant to a common scale of both
    vectors; floored at EPS so constant vectors give a number, not NaN.
    """
    q, g = jnp.broadcast_arrays(q, g)
    span = jnp.maximum(q.max(-1), g.max(-1)) - jnp.minimum(q.min(-1), g.min(-1))
    return ssim_vectors(q, g, data_range=jnp.maximum(span, EPS))


class FixedMetric(nn.Module):
    """A parameter-free head wrapping a similarity function."""

    fn: Callable[[jax.Array, jax.Array], jax.Array]

    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        return self.fn(q, g)


def _neg_euclidean(q, g):
    return -euclidean_distance(q, g)


def _ssim_over_euclid(q, g):
    # The seed's heuristic: structural similarity per unit of distance.
    return feature_ssim(q, g) / (euclidean_distance(q, g) + 1e-3)


FIXED_METRICS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "euclid": _neg_euclidean,
    "cosine": cosine_similarity,
    "ssim": feature_ssim,
    "ssim_ratio": _ssim_over_euclid,
}


class Residual(nn.Module):
    """A fixed metric plus a learned correction: exp(log_scale) * base(q, g) + bias + correction(q, g).

    The correction starts at zero and the scale at 1, so before training the head ranks exactly like `base`; with best-on-validation selection (cbir_jax/training/selection.py) it then cannot end below
    it on the validation classes. The scale and bias let a regression loss match the target's range
    without spending the correction on it.
    """

    base: str
    correction: nn.Module

    @nn.compact
    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        log_scale = self.param("log_scale", nn.initializers.zeros, ())
        bias = self.param("bias", nn.initializers.zeros, ())
        return jnp.exp(log_scale) * FIXED_METRICS[self.base](q, g) + bias + self.correction(q, g)


def _maybe_residual(cfg, correction_cls, **kwargs) -> nn.Module:
    residual = getattr(cfg, "residual", False)
    inner = correction_cls(hidden=tuple(cfg.hidden), activation=cfg.activation, constant_start=residual, **kwargs)
    if not residual:
        return inner
    base = getattr(cfg, "base", "cosine")
    if base not in FIXED_METRICS:
        raise ValueError(f"head.base={base!r}: valid are {', '.join(sorted(FIXED_METRICS))}")
    return Residual(base=base, correction=inner)


@HEADS.register("mlp")
def _mlp(cfg) -> nn.Module:
    monotone = getattr(cfg, "monotone", False)
    if monotone and cfg.activation not in MONOTONE_ACTIVATIONS:
        raise ValueError(
            f"head.monotone=true needs a monotone activation ({', '.join(MONOTONE_ACTIVATIONS)}), not {cfg.activation!r}"
        )
    return _maybe_residual(cfg, SquaredDifferenceMLP, monotone=monotone)


@HEADS.register("simnet")
def _simnet(cfg) -> nn.Module:
    if getattr(cfg, "monotone", False):
        raise ValueError("head.monotone=true applies to head=mlp (an MLP on (q - g)^2), not to simnet")
    return _maybe_residual(cfg, ConcatMLP)


def _register_fixed(name: str) -> None:
    HEADS.register(name)(lambda cfg=None: FixedMetric(FIXED_METRICS[name]))


for _name in FIXED_METRICS:
    _register_fixed(_name)


def build_head(cfg) -> nn.Module:
    """Builds the head named by `cfg.name` (a HeadConfig)."""
    return HEADS.get(cfg.name)(cfg)


def base_metric(cfg) -> str | None:
    """The fixed metric a learned head equals at initialisation (a residual head's base), or None."""
    if cfg.name == "cosine_residual":
        return "cosine"
    return getattr(cfg, "base", "cosine") if getattr(cfg, "residual", False) and cfg.name in ("mlp", "simnet") else None


def is_learned(name: str) -> bool:
    return name not in FIXED_METRICS


def init_params(head: nn.Module, feature_dim: int, rng: jax.Array):
    """Initial parameters ({} for fixed metrics)."""
    x = jnp.zeros((1, feature_dim), jnp.float32)
    return head.init(rng, x, x).get("params", {})


# --- Heads that start *at* cosine and learn a residual (issue 5) -------------------------------------


class ResidualProjection(nn.Module):
    """e(x) = x + B(A x) with B zero-initialised: the identity map at initialisation."""

    rank: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = l2_normalise(x)
        h = nn.Dense(self.rank, use_bias=False, name="down")(x)
        return x + nn.Dense(x.shape[-1], use_bias=False, kernel_init=nn.initializers.zeros, name="up")(h)


class CosineResidual(nn.Module):
    """cos(e(q), e(g)) with e a `ResidualProjection`: equals cosine at initialisation (see above)."""

    rank: int = 128
    rerank: str = "none"

    def setup(self):
        self.projection = ResidualProjection(self.rank)

    def embed(self, x: jax.Array) -> jax.Array:
        return self.projection(x)

    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        return cosine_similarity(self.embed(q), self.embed(g))


@HEADS.register("cosine_residual")
def _cosine_residual(cfg) -> nn.Module:
    rerank = HeadRerank(getattr(cfg, "rerank", "none"))  # a direct caller's unknown name fails here
    return CosineResidual(rank=getattr(cfg, "rank", 128), rerank=str(rerank))
