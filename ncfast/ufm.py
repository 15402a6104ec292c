"""The unconstrained feature model (UFM) under the (rescaled) MSE loss, paper convention
(theory.md 3-4): objective, gradient, Hessian-vector and Gauss-Newton products, the closed-form
global minimisers, the optimality certificate, saddles, the zero point and two plain solvers.

Pure PyTorch: float32 or float64 tensors on any device. The model holds no tensors; every
function takes the point (W, H, b) explicitly. Balanced classes, H's columns ordered class by
class (class k, sample i); for ``bias="free"`` b is None everywhere and has no blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import metrics as _metrics
from .stats import ClassStats
from ._ops import loss_dtype, rescaled_mse_logit_grad
from .hessian import _FlatHVP

__all__ = [
    "BIAS_MODES",
    "UFM",
    "Certificate",
    "Minimizer",
    "NegativeCurvature",
    "Saddle",
    "SolverResult",
    "ZeroPoint",
    "certificate",
    "feature_stats",
    "global_minimizer",
    "gradient_descent",
    "lbfgs",
    "mu_minus",
    "mu_plus",
    "negative_curvature_direction",
    "saddle",
    "zero_point",
]

BIAS_MODES = ("unpenalized", "penalized", "free")
_F64 = torch.float64
Params = tuple[Tensor, Tensor, Tensor | None]


def _name(fn: str) -> str:
    return f"ncfast.ufm.{fn}"


def _check_int(op: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_real(op: str, name: str, value: object, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be a finite real number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {value!r}")
    return float(value)


def mu_plus(sigma: float, lambda_W: float, lambda_H: float) -> float:
    """μ_+(σ) = ½[(λ_W+λ_H) + sqrt((λ_W-λ_H)^2 + 4σ^2)] (theory.md 4.5-4.6)."""
    return 0.5 * ((lambda_W + lambda_H) + math.sqrt((lambda_W - lambda_H) ** 2 + 4 * sigma**2))


def mu_minus(sigma: float, lambda_W: float, lambda_H: float) -> float:
    """μ_-(σ) = ½[(λ_W+λ_H) - sqrt((λ_W-λ_H)^2 + 4σ^2)] (theory.md 4.5-4.6)."""
    return 0.5 * ((lambda_W + lambda_H) - math.sqrt((lambda_W - lambda_H) ** 2 + 4 * sigma**2))


class UFM:
    """The UFM objective in the paper convention (theory.md 3.1)::

        R = W H + b 1_N^T - M Y                        (K x N)
        f = 1/(2N) <Ω ⊙ R, R> + (λ_W/2)‖W‖^2 + (λ_H/2)‖H‖^2 + (λ_b/2)‖b‖^2

    with W (K, d), H (d, N), b (K,), N = nK, Y = I_K ⊗ 1_n^T and Ω = α on the true class, 1
    elsewhere. ``bias``: ``"unpenalized"`` (λ_b must be 0), ``"penalized"`` (λ_b > 0) or
    ``"free"`` (b ≡ 0: b is None and λ_b is ignored). ``c = sqrt(n λ_W λ_H)`` controls every
    closed form of theory.md 4.

    Ω is never stored: Ω ⊙ X scales the true-class entry of each column by α (gather/scatter).
    """

    def __init__(
        self,
        K: int,
        d: int,
        n: int,
        lambda_W: float,
        lambda_H: float,
        lambda_b: float = 0.0,
        alpha: float = 1.0,
        M: float = 1.0,
        bias: str = "unpenalized",
    ) -> None:
        op = _name("UFM")
        self.K = _check_int(op, "K", K, 2)
        self.d = _check_int(op, "d", d, 1)
        self.n = _check_int(op, "n", n, 1)
        self.lambda_W = _check_real(op, "lambda_W", lambda_W, positive=True)
        self.lambda_H = _check_real(op, "lambda_H", lambda_H, positive=True)
        self.lambda_b = _check_real(op, "lambda_b", lambda_b, positive=False)
        self.alpha = _check_real(op, "alpha", alpha, positive=True)
        self.M = _check_real(op, "M", M, positive=True)
        if bias not in BIAS_MODES:
            raise ValueError(
                f"{op}: bias must be 'unpenalized', 'penalized' or 'free', got {bias!r}"
            )
        if bias == "penalized" and self.lambda_b <= 0:
            raise ValueError(
                f"{op}: lambda_b must be > 0 when bias='penalized', got {lambda_b!r}"
            )
        if bias == "unpenalized" and self.lambda_b != 0:
            raise ValueError(
                f"{op}: lambda_b must be 0 when bias='unpenalized' (use bias='penalized'), "
                f"got {lambda_b!r}"
            )
        self.bias = bias

    # --- derived constants ----------------------------------------------------------------

    @property
    def N(self) -> int:
        """Total number of samples nK."""
        return self.n * self.K

    @property
    def c(self) -> float:
        """c = sqrt(n λ_W λ_H) (theory.md 1)."""
        return math.sqrt(self.n * self.lambda_W * self.lambda_H)

    @property
    def has_bias(self) -> bool:
        return self.bias != "free"

    @property
    def plain(self) -> bool:
        """Plain MSE: α = M = 1."""
        return self.alpha == 1.0 and self.M == 1.0

    @property
    def _lb(self) -> float:
        """The λ_b that enters f (0 unless the bias is penalised)."""
        return self.lambda_b if self.bias == "penalized" else 0.0

    @property
    def num_params(self) -> int:
        """dK + dN (+ K with a bias)."""
        return self.d * self.K + self.d * self.N + (self.K if self.has_bias else 0)

    def __repr__(self) -> str:
        return (
            f"UFM(K={self.K}, d={self.d}, n={self.n}, lambda_W={self.lambda_W}, "
            f"lambda_H={self.lambda_H}, lambda_b={self.lambda_b}, alpha={self.alpha}, "
            f"M={self.M}, bias={self.bias!r})"
        )

    # --- labels and weights ---------------------------------------------------------------

    def labels(self, device: torch.device | str | None = None) -> Tensor:
        """(N,) int64 labels, class by class: [0]*n + [1]*n + ... ."""
        return torch.arange(self.K, device=device).repeat_interleave(self.n)

    def Y(self, dtype: torch.dtype = _F64, device: torch.device | str | None = None) -> Tensor:
        """The K x N one-hot label matrix I_K ⊗ 1_n^T."""
        return torch.eye(self.K, dtype=dtype, device=device).repeat_interleave(self.n, dim=1)

    def _omega(self, X: Tensor) -> Tensor:
        """Ω ⊙ X for X (..., K, N): the true-class entry of each column times α."""
        if self.alpha == 1.0:
            return X
        idx = self.labels(X.device).expand(*X.shape[:-2], 1, self.N)
        return X.scatter(-2, idx, X.gather(-2, idx) * self.alpha)

    # --- validation -----------------------------------------------------------------------

    def _check_tensor(self, op: str, name: str, x: object, shape: tuple[int, ...]) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must have a floating dtype, got {x.dtype}")
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{op}: {name} must have shape {list(shape)}, got shape {list(x.shape)}"
            )
        return x

    def _check_point(self, op: str, W: Tensor, H: Tensor, b: Tensor | None) -> None:
        K, d, N = self.K, self.d, self.N
        self._check_tensor(op, "W", W, (K, d))
        self._check_tensor(op, "H", H, (d, N))
        if self.has_bias:
            if b is None:
                raise ValueError(f"{op}: b must be a tensor of shape [{K}] (bias={self.bias!r}), "
                                 f"got None")
            self._check_tensor(op, "b", b, (K,))
        elif b is not None:
            raise ValueError(f"{op}: b must be None when bias='free', got a tensor")
        for name, x in (("H", H), ("b", b)):
            if x is not None and (x.dtype != W.dtype or x.device != W.device):
                raise ValueError(
                    f"{op}: {name} must have W's dtype and device ({W.dtype}, {W.device}), "
                    f"got ({x.dtype}, {x.device})"
                )

    def _unpack(self, op: str, params: Sequence[Tensor | None]) -> Params:
        if not isinstance(params, (tuple, list)) or len(params) not in (2, 3):
            raise TypeError(f"{op}: params must be a tuple (W, H) or (W, H, b), got "
                            f"{type(params).__name__}")
        W, H = params[0], params[1]
        b = params[2] if len(params) == 3 else None
        self._check_point(op, W, H, b)
        return W, H, b

    def _unpack_directions(
        self, op: str, directions: Sequence[Tensor | None], W: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """(A, B, c, batched): one direction shaped like (W, H, b) or a batch with a leading
        dimension m on every block."""
        if not isinstance(directions, (tuple, list)) or len(directions) not in (2, 3):
            raise TypeError(f"{op}: directions must be a tuple (A, B) or (A, B, c), got "
                            f"{type(directions).__name__}")
        A, B = directions[0], directions[1]
        c = directions[2] if len(directions) == 3 else None
        if not isinstance(A, Tensor):
            raise TypeError(f"{op}: A must be a tensor, got {type(A).__name__}")
        batched = A.dim() == 3
        lead = (A.shape[0],) if batched else ()
        self._check_tensor(op, "A", A, lead + (self.K, self.d))
        self._check_tensor(op, "B", B, lead + (self.d, self.N))
        if self.has_bias:
            if c is None:
                raise ValueError(f"{op}: c must be a tensor of shape {list(lead + (self.K,))} "
                                 f"(bias={self.bias!r}), got None")
            self._check_tensor(op, "c", c, lead + (self.K,))
        elif c is not None:
            raise ValueError(f"{op}: c must be None when bias='free', got a tensor")
        for name, x in (("A", A), ("B", B), ("c", c)):
            if x is not None and (x.dtype != W.dtype or x.device != W.device):
                raise ValueError(
                    f"{op}: {name} must have W's dtype and device ({W.dtype}, {W.device}), "
                    f"got ({x.dtype}, {x.device})"
                )
        return A, B, c, batched

    # --- objective and derivatives ----------------------------------------------------------

    def residual(self, W: Tensor, H: Tensor, b: Tensor | None = None) -> Tensor:
        """R = W H + b 1^T - M Y (K x N) (theory.md 3.1)."""
        self._check_point(_name("UFM.residual"), W, H, b)
        return self._residual(W, H, b)

    def _residual(self, W: Tensor, H: Tensor, b: Tensor | None) -> Tensor:
        R = W @ H
        if b is not None:
            R = R + b[:, None]
        idx = self.labels(R.device)[None]
        return R.scatter_add(0, idx, torch.full_like(idx, -self.M, dtype=R.dtype))

    def _weighted(self, ZT: Tensor, M: float) -> Tensor:
        """(1/N) Ω ⊙ (Z - M Y) for Z given transposed, ZT (..., N, K): one pass of the fused
        rescaled-MSE backward kernel (the logit gradient of the loss is exactly this weighted
        residual), returned as a (..., K, N) view."""
        lead = ZT.shape[:-2]
        rows = ZT.reshape(-1, self.K)
        labels = self.labels(ZT.device).repeat(rows.shape[0] // self.N)
        scale = torch.full((rows.shape[0],), 0.5 / self.N, dtype=loss_dtype(ZT.dtype),
                           device=ZT.device)
        out = rescaled_mse_logit_grad(scale, rows, labels, self.alpha, M, -100)
        return out.reshape(*lead, self.N, self.K).mT

    def _logits_t(self, W: Tensor, H: Tensor, b: Tensor | None) -> Tensor:
        """Z^T = H^T W^T + 1 b^T (N x K), contiguous for the fused kernel."""
        ZT = H.T @ W.T
        return ZT + b if b is not None else ZT

    def _G(self, W: Tensor, H: Tensor, b: Tensor | None) -> Tensor:
        return self._weighted(self._logits_t(W, H, b), self.M)

    def logit_gradient(self, W: Tensor, H: Tensor, b: Tensor | None = None) -> Tensor:
        """G = (1/N) Ω ⊙ R (K x N), the logit-space gradient (theory.md 3.2)."""
        self._check_point(_name("UFM.logit_gradient"), W, H, b)
        return self._G(W, H, b)

    def objective(self, W: Tensor, H: Tensor, b: Tensor | None = None) -> Tensor:
        """f(W, H, b) as a 0-dim tensor (theory.md 3.1); differentiable by autograd."""
        self._check_point(_name("UFM.objective"), W, H, b)
        R = self._residual(W, H, b)
        f = (self._omega(R) * R).sum() / (2 * self.N)
        f = f + 0.5 * self.lambda_W * (W * W).sum() + 0.5 * self.lambda_H * (H * H).sum()
        if b is not None and self._lb:
            f = f + 0.5 * self._lb * (b * b).sum()
        return f

    def grad(self, W: Tensor, H: Tensor, b: Tensor | None = None) -> Params:
        """(∇_W f, ∇_H f, ∇_b f) in closed form (theory.md 3.2)::

            G = (1/N) Ω ⊙ R,  ∇_W = G H^T + λ_W W,  ∇_H = W^T G + λ_H H,  ∇_b = G 1 + λ_b b

        ∇_b is None when bias='free'.
        """
        self._check_point(_name("UFM.grad"), W, H, b)
        G = self._G(W, H, b)
        gW = G @ H.T + self.lambda_W * W
        gH = W.T @ G + self.lambda_H * H
        gb = None
        if b is not None:
            gb = G.sum(1) + self._lb * b
        return gW, gH, gb

    def _second_order(self, op: str, params, directions, full: bool,
                      G: Tensor | None = None) -> Params:
        W, H, b = self._unpack(op, params)
        A, B, c, batched = self._unpack_directions(op, directions, W)
        if full and G is None:  # the residual at the point, once for all directions of this call
            G = self._G(W, H, b)
        if batched:
            # One direction at a time: plain matrix products beat broadcast batched ones here,
            # and the temporaries stay the size of one direction.
            parts = [self._one_direction(W, H, A[i], B[i], None if c is None else c[i], G)
                     for i in range(A.shape[0])]
            return tuple(None if p[0] is None else torch.stack(p)
                         for p in zip(*parts))  # type: ignore[return-value]
        return self._one_direction(W, H, A, B, c, G)

    def _one_direction(self, W: Tensor, H: Tensor, A: Tensor, B: Tensor, c: Tensor | None,
                       G: Tensor | None) -> Params:
        """The product for one direction; G is None for the Gauss-Newton product."""
        dRT = H.T @ A.T + B.T @ W.T  # dR^T (N, K), the layout of the fused kernel
        if c is not None:
            dRT = dRT + c
        dG = self._weighted(dRT, 0.0)
        hA = dG @ H.T + self.lambda_W * A
        hB = W.T @ dG + self.lambda_H * B
        if G is not None:
            hA = hA + G @ B.T
            hB = hB + A.T @ G
        hc = None
        if c is not None:
            hc = dG.sum(-1) + self._lb * c
        return hA, hB, hc

    def hvp(self, params: Sequence[Tensor | None], directions: Sequence[Tensor | None]) -> Params:
        """∇²f Δ in closed form (theory.md 3.3) at ``params`` = (W, H, b) for Δ = (A, B, c)::

            dR = A H + W B + c 1^T,  dG = (1/N) Ω ⊙ dR
            [W] dG H^T + G B^T + λ_W A,  [H] W^T dG + A^T G + λ_H B,  [b] dG 1 + λ_b c

        ``directions``: one direction shaped like (W, H, b), or a batch, every block with the
        same leading dimension m. G is computed once at the point. c (and the b block) is None
        when bias='free'.
        """
        return self._second_order(_name("UFM.hvp"), params, directions, full=True)

    def hvp_operator(self, params: Sequence[Tensor | None], gauss_newton: bool = False):
        """The HVP (or Gauss-Newton product) at one point as a callable ``directions ->
        product``, with the residual G computed once for every later call: repeated products
        at one point, as Lanczos makes them, then cost the six matrix products of theory.md 3.3
        and one fused weighting pass each. ``.flat(v)`` takes and returns flat vectors
        (:meth:`flatten` layout), for ``ncfast.hessian``; it carries ``n``, ``dtype`` and
        ``device`` (``ncfast.hessian.as_linear_operator`` makes it a SciPy operator)."""
        op = _name("UFM.hvp_operator")
        W, H, b = self._unpack(op, params)
        G = None if gauss_newton else self._G(W, H, b)
        point = (W, H) if b is None else (W, H, b)

        def product(directions: Sequence[Tensor | None]) -> Params:
            return self._second_order(op, point, directions, full=not gauss_newton, G=G)

        def flat(v: Tensor) -> Tensor:
            hA, hB, hc = product(self.unflatten(v))
            return torch.cat([hA.reshape(-1), hB.reshape(-1)] + ([hc] if hc is not None else []))

        product.flat = _FlatHVP(flat, self.num_params, W.dtype, W.device)
        return product

    def gauss_newton(
        self, params: Sequence[Tensor | None], directions: Sequence[Tensor | None]
    ) -> Params:
        """The generalised Gauss-Newton product (theory.md 3.3): :meth:`hvp` without G B^T and
        A^T G. PSD; its quadratic form is the HVP's minus 2<G, A B>. Same batching as hvp."""
        return self._second_order(_name("UFM.gauss_newton"), params, directions, full=False)

    def quadratic_form(
        self, params: Sequence[Tensor | None], directions: Sequence[Tensor | None]
    ) -> Tensor:
        """<Δ, ∇²f Δ> by the formula of theory.md 3.3 (no HVP)::

            (1/N)<Ω ⊙ dR, dR> + 2<G, A B> + λ_W‖A‖^2 + λ_H‖B‖^2 + λ_b‖c‖^2

        A 0-dim tensor for one direction, (m,) for a batch.
        """
        op = _name("UFM.quadratic_form")
        W, H, b = self._unpack(op, params)
        A, B, c, _ = self._unpack_directions(op, directions, W)
        dR = A @ H + W @ B
        if c is not None:
            dR = dR + c[..., :, None]
        G = self._G(W, H, b)
        q = (self._omega(dR) * dR).sum((-2, -1)) / self.N
        q = q + 2 * (G * (A @ B)).sum((-2, -1))
        q = q + self.lambda_W * (A * A).sum((-2, -1)) + self.lambda_H * (B * B).sum((-2, -1))
        if c is not None:
            q = q + self._lb * (c * c).sum(-1)
        return q

    # --- flat views and initialisation ------------------------------------------------------

    def flatten(self, W: Tensor, H: Tensor, b: Tensor | None = None) -> Tensor:
        """Concatenate (W, H, b) into one vector of length :attr:`num_params`."""
        self._check_point(_name("UFM.flatten"), W, H, b)
        parts = [W.reshape(-1), H.reshape(-1)] + ([b] if b is not None else [])
        return torch.cat(parts)

    def unflatten(self, x: Tensor) -> Params:
        """Inverse of :meth:`flatten` (views into x)."""
        op = _name("UFM.unflatten")
        if not isinstance(x, Tensor) or tuple(x.shape) != (self.num_params,):
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{op}: x must have shape [{self.num_params}], got {shape}")
        K, d, N = self.K, self.d, self.N
        W = x[: K * d].view(K, d)
        H = x[K * d : K * d + d * N].view(d, N)
        b = x[K * d + d * N :] if self.has_bias else None
        return W, H, b

    def random_init(
        self,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = _F64,
        device: torch.device | str | None = None,
        scale: float = 0.1,
    ) -> Params:
        """(W, H, b) with i.i.d. N(0, scale^2) entries (b = None when bias='free'), drawn on the
        generator's device (CPU by default) and then moved to ``device``."""
        op = _name("UFM.random_init")
        scale = _check_real(op, "scale", scale, positive=False)
        gdev = generator.device if generator is not None else "cpu"
        draw = lambda *shape: (  # noqa: E731
            scale * torch.randn(*shape, generator=generator, dtype=dtype, device=gdev)
        ).to(device if device is not None else gdev)
        W, H = draw(self.K, self.d), draw(self.d, self.N)
        b = draw(self.K) if self.has_bias else None
        return W, H, b


# --- closed forms (theory.md 4.2) -------------------------------------------------------------


@dataclass
class Minimizer:
    """A global minimiser (W, H, b) from the closed forms of theory.md 4.2, its optimal value
    ``f_star`` (from the closed form, not evaluated) and the case name: ``"A"``, ``"A (zero)"``,
    ``"B (beta=0)"``, ``"B (beta>0)"``, ``"B (zero)"``, ``"C"``, ``"C (zero)"``, ``"D"``,
    ``"D (zero)"``, ``"E"``, ``"E (zero)"`` or ``"F"``. ``Z`` is the K x K convex solution
    W H̄ of Lemma L3."""

    W: Tensor
    H: Tensor
    b: Tensor | None
    f_star: float
    regime: str
    Z: Tensor


def _range_p_basis(K: int, dtype: torch.dtype, device) -> Tensor:
    """K x (K-1) orthonormal basis of range(P) (Helmert-type, exact up to rounding)."""
    E = torch.zeros(K, K - 1, dtype=_F64)
    for j in range(1, K):
        E[:j, j - 1] = 1.0
        E[j, j - 1] = -float(j)
        E[:, j - 1] /= math.sqrt(j * (j + 1))
    return E.to(dtype=dtype, device=device)


def _factor(ufm: UFM, U: Tensor, s: Tensor, Q: Tensor | None) -> tuple[Tensor, Tensor]:
    """W = a U S^{1/2} Q^T, H = (1/a) Q S^{1/2} U^T ⊗ 1_n^T, a = (nλ_H/λ_W)^{1/4} (L3)."""
    r = U.shape[1]
    if Q is None:
        Q = torch.eye(ufm.d, r, dtype=U.dtype, device=U.device)
    a = (ufm.n * ufm.lambda_H / ufm.lambda_W) ** 0.25
    US = U * s.clamp_min(0).sqrt()
    W = a * US @ Q.T
    Hbar = (Q @ US.T) / a
    return W, Hbar.repeat_interleave(ufm.n, dim=1)


def _check_Q(op: str, ufm: UFM, Q: Tensor | None, r: int, dtype, device) -> Tensor | None:
    if Q is None:
        return None
    if not isinstance(Q, Tensor) or tuple(Q.shape) != (ufm.d, r):
        shape = list(Q.shape) if isinstance(Q, Tensor) else type(Q).__name__
        raise ValueError(f"{op}: Q must have shape [d, r] = [{ufm.d}, {r}], got {shape}")
    Q = Q.to(dtype=dtype, device=device)
    err = (Q.T @ Q - torch.eye(r, dtype=dtype, device=device)).abs().max().item() if r else 0.0
    if err > 1e3 * torch.finfo(dtype).eps * max(r, 1):
        raise ValueError(f"{op}: Q must have orthonormal columns, got |Q^T Q - I|_max = {err:.3g}")
    return Q


def global_minimizer(
    ufm: UFM,
    dtype: torch.dtype = _F64,
    device: torch.device | str | None = None,
    Q: Tensor | None = None,
) -> Minimizer:
    """The closed-form global minimiser of theory.md 4.2.

    Cases (names as in theory.md): (A) plain MSE, unpenalised bias, d >= K-1; (B) plain MSE,
    penalised bias (β = 0 needs d >= K-1, β > 0 needs d >= K); (C) plain MSE, bias-free,
    d >= K; (D) rescaled (α, M), unpenalised bias, d >= K-1; (E) rescaled, bias-free, d >= K;
    (F) plain MSE, unpenalised bias, d < K-1, Kc < 1 (Π_d = the first d vectors of the basis
    of range(P) used here). Each has a zero regime (W = H = 0), valid for every d.

    ``Q`` (d, r): optional orthonormal columns for the factorisation of L3 (default: the first
    r columns of I_d); r is the rank of Z*. Raises NotImplementedError for the cases theory.md
    does not give in closed form: penalised bias with α ≠ 1 or M ≠ 1, the rescaled analogue of
    (F), and penalised or bias-free cases whose Z* has rank above d.
    """
    op = _name("global_minimizer")
    if not isinstance(ufm, UFM):
        raise TypeError(f"{op}: ufm must be a ncfast.ufm.UFM, got {type(ufm).__name__}")
    K, d, c = ufm.K, ufm.d, ufm.c
    alpha, M = ufm.alpha, ufm.M
    kw = dict(dtype=dtype, device=device)
    ones = torch.ones(K, **kw)
    E = _range_p_basis(K, dtype, device)
    U = torch.zeros(K, 0, **kw)
    s = torch.zeros(0, **kw)
    b: Tensor | None

    if ufm.bias == "unpenalized":
        x = M - c * (K - 1 + alpha) / alpha
        base = "A" if ufm.plain else "D"
        if x <= 0:
            regime = f"{base} (zero)"
            b = alpha * M / (alpha + K - 1) * ones
            f_star = alpha * (K - 1) * M**2 / (2 * (alpha + K - 1))
        elif d >= K - 1:
            regime = base
            U, s = E, torch.full((K - 1,), x, **kw)
            b = (c + x / K) * ones
            f_star = (K - 1) * c * (M - c * (K - 1 + alpha) / (2 * alpha))
        elif ufm.plain:
            regime = "F"
            U, s = E[:, :d], torch.full((d,), 1 - K * c, **kw)
            b = ones / K
            f_star = (K - 1 - d) / (2 * K) + d * c * (1 - K * c / 2)
        else:
            raise NotImplementedError(
                f"{op}: the rescaled analogue of case (F) (alpha={alpha}, M={M}, unpenalized "
                f"bias, d={d} < K-1={K - 1}, NC regime) has no closed form in theory.md 4.2"
            )
    elif ufm.bias == "penalized":
        if not ufm.plain:
            raise NotImplementedError(
                f"{op}: a penalized bias with rescaled MSE (alpha={alpha}, M={M}) has no closed "
                f"form in theory.md 4.2 (case (B) covers plain MSE only)"
            )
        lb = ufm.lambda_b
        if K * c >= 1:
            regime = "B (zero)"
            b = ones / (K * (1 + lb))
            f_star = (K - 1) / (2 * K) + lb / (2 * K * (1 + lb))
        else:
            beta = max(0.0, 1 - c * K * (1 + lb) / lb)
            need = K if beta > 0 else K - 1
            regime = "B (beta>0)" if beta > 0 else "B (beta=0)"
            if d < need:
                raise NotImplementedError(
                    f"{op}: case {regime} needs d >= {need} in theory.md 4.2, got d={d}; the "
                    f"rank-constrained minimiser is not given in closed form"
                )
            U, s = E, torch.full((K - 1,), 1 - K * c, **kw)
            if beta > 0:
                U = torch.cat([U, ones[:, None] / math.sqrt(K)], 1)
                s = torch.cat([s, torch.full((1,), beta, **kw)])
                b = (c / lb) * ones
                f_star = (K - 1) * c * (1 - K * c / 2) + c - c**2 * K * (1 + lb) / (2 * lb)
            else:
                b = ones / (K * (1 + lb))
                f_star = (K - 1) * c * (1 - K * c / 2) + lb / (2 * K * (1 + lb))
    else:
        base = "C" if ufm.plain else "E"
        b = None
        if c * K >= alpha * M:
            regime = f"{base} (zero)"
            f_star = alpha * M**2 / 2
        else:
            regime = base
            if d < K:
                raise NotImplementedError(
                    f"{op}: case ({base}) (bias-free) needs d >= K={K} in theory.md 4.2, got "
                    f"d={d}; the rank-constrained minimiser is not given in closed form"
                )
            U = torch.eye(K, **kw)
            s = torch.full((K,), M - c * K / alpha, **kw)
            f_star = c * K * (M - c * K / (2 * alpha))

    Qc = _check_Q(op, ufm, Q, U.shape[1], dtype, U.device)
    W, H = _factor(ufm, U, s, Qc)
    Z = (U * s) @ U.T
    return Minimizer(W=W, H=H, b=b, f_star=float(f_star), regime=regime, Z=Z)


# --- certificate and negative curvature (theory.md 4.3-4.4) -----------------------------------


@dataclass
class Certificate:
    """σ_max(G) against sqrt(λ_W λ_H) (theory.md 4.3). ``certified`` is σ_max <= threshold
    (with relative slack ``rtol``); it proves global optimality only at a critical point, so
    ``grad_norm`` (Frobenius norm of the full gradient) is reported alongside."""

    sigma_max: float
    threshold: float
    certified: bool
    grad_norm: float


def certificate(
    ufm: UFM, W: Tensor, H: Tensor, b: Tensor | None = None, rtol: float = 1e-6
) -> Certificate:
    """The global-optimality certificate of theory.md 4.3: at a critical point,
    σ_max(G) <= sqrt(λ_W λ_H) (G = (1/N) Ω ⊙ R) implies a global minimiser; it is also
    necessary when d is at least the rank of the convex solution. At the NC optimum the
    nonzero singular values of G equal the threshold, hence the slack ``rtol``."""
    op = _name("certificate")
    ufm._check_point(op, W, H, b)
    rtol = _check_real(op, "rtol", rtol, positive=False)
    G = ufm._G(W, H, b)
    smax = torch.linalg.matrix_norm(G.to(_F64), ord=2).item()
    thr = math.sqrt(ufm.lambda_W * ufm.lambda_H)
    g = ufm.grad(W, H, b)
    gn = math.sqrt(sum(float((x.to(_F64) ** 2).sum()) for x in g if x is not None))
    return Certificate(sigma_max=smax, threshold=thr, certified=smax <= thr * (1 + rtol),
                       grad_norm=gn)


@dataclass
class NegativeCurvature:
    """The direction Δ = (A, B, c) of theory.md 4.4, its curvature <Δ, ∇²f Δ> computed at the
    point (``curvature``) and predicted, 2(sqrt(λ_W λ_H) - σ_max(G)) (``predicted``), and
    ‖Δ‖^2 = sqrt(λ_H/λ_W) + sqrt(λ_W/λ_H)."""

    direction: Params
    curvature: float
    predicted: float
    sigma_max: float
    norm_sq: float


def negative_curvature_direction(
    ufm: UFM, W: Tensor, H: Tensor, b: Tensor | None = None
) -> NegativeCurvature:
    """Theory.md 4.4: with a unit a in null(W) and (u, v) the top singular pair of -G,

        A = (λ_H/λ_W)^{1/4} u a^T,   B = (λ_W/λ_H)^{1/4} a v^T,   c = 0,

    so that at a critical point (where H^T a = 0 too) dR = 0, A B = u v^T and
    <Δ, ∇²f Δ> = 2(sqrt(λ_W λ_H) - σ_max(G)), negative at every non-global critical point.
    Needs rank W < d (always when d > K); raises ValueError otherwise. The curvature returned
    is evaluated with :meth:`UFM.quadratic_form`, so away from a critical point it can differ
    from ``predicted``.
    """
    op = _name("negative_curvature_direction")
    ufm._check_point(op, W, H, b)
    lw, lh = ufm.lambda_W, ufm.lambda_H
    _, sw, Vh = torch.linalg.svd(W, full_matrices=True)
    tol = max(ufm.K, ufm.d) * torch.finfo(W.dtype).eps * max(float(sw.max()) if sw.numel() else
                                                             0.0, 1.0)
    rank = int((sw > tol).sum())
    if rank >= ufm.d:
        raise ValueError(
            f"{op}: W must have a null space (rank W < d) for the direction of theory.md 4.4, "
            f"got rank {rank} with d={ufm.d}"
        )
    a = Vh[-1]
    G = ufm._G(W, H, b)
    U, sg, Vgh = torch.linalg.svd(-G, full_matrices=False)
    u, v, smax = U[:, 0], Vgh[0], float(sg[0])
    A = (lh / lw) ** 0.25 * torch.outer(u, a)
    B = (lw / lh) ** 0.25 * torch.outer(a, v)
    c = torch.zeros_like(b) if b is not None else None
    direction = (A, B, c)
    q = float(ufm.quadratic_form((W, H, b), direction))
    return NegativeCurvature(
        direction=direction, curvature=q, predicted=2 * (math.sqrt(lw * lh) - smax),
        sigma_max=smax, norm_sq=math.sqrt(lh / lw) + math.sqrt(lw / lh),
    )


# --- saddles and the zero point (theory.md 4.5-4.6) -------------------------------------------


@dataclass
class Saddle:
    """The saddle Z_S of theory.md 4.5: the point (W, H, b), its value ``f``, s = |S|,
    σ_1 = 1/(K sqrt n) (= σ_max(G)), the negative eigenvalue μ_-(σ_1) and its multiplicity
    (K-1-s)(d-s)."""

    W: Tensor
    H: Tensor
    b: Tensor
    f: float
    s: int
    sigma_1: float
    negative_eigenvalue: float
    negative_multiplicity: int


def saddle(
    ufm: UFM,
    S: int | Tensor,
    dtype: torch.dtype = _F64,
    device: torch.device | str | None = None,
) -> Saddle:
    """The saddle family of theory.md 4.5 (plain MSE, bias='unpenalized', Kc < 1)::

        Z_S = (1 - Kc) U_S U_S^T,   b = (1/K) 1,   f_S = (K-1-s)/(2K) + s c (1 - Kc/2)

    factored as in Lemma L3. ``S``: an int s in [0, K-2] (U_S = the first s vectors of a fixed
    orthonormal basis of range(P)) or a K x s tensor U_S with orthonormal columns in range(P).
    Needs d >= s. s = 0 is the zero point.
    """
    op = _name("saddle")
    if not isinstance(ufm, UFM):
        raise TypeError(f"{op}: ufm must be a ncfast.ufm.UFM, got {type(ufm).__name__}")
    if not ufm.plain or ufm.bias != "unpenalized":
        raise NotImplementedError(
            f"{op}: theory.md 4.5 gives the saddle family for plain MSE with an unpenalized "
            f"bias only, got alpha={ufm.alpha}, M={ufm.M}, bias={ufm.bias!r}"
        )
    K, d, c = ufm.K, ufm.d, ufm.c
    if K * c >= 1:
        raise ValueError(f"{op}: the saddle family needs Kc < 1, got Kc = {K * c:.6g}")
    kw = dict(dtype=dtype, device=device)
    if isinstance(S, Tensor):
        if S.dim() != 2 or S.shape[0] != K or S.shape[1] > K - 2:
            raise ValueError(f"{op}: S must have shape [K, s] = [{K}, s] with s <= K-2, "
                             f"got shape {list(S.shape)}")
        US = S.to(**kw)
        s = US.shape[1]
        eps = 1e3 * torch.finfo(dtype).eps * K
        if s and ((US.T @ US - torch.eye(s, **kw)).abs().max() > eps
                  or US.sum(0).abs().max() > eps):
            raise ValueError(f"{op}: S must have orthonormal columns in range(P) "
                             f"(orthogonal to 1)")
    else:
        s = S
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= K - 2:
            raise ValueError(f"{op}: S must be an int in [0, K-2] = [0, {K - 2}] or a K x s "
                             f"tensor, got {S!r}")
        US = _range_p_basis(K, dtype, device)[:, :s]
    if d < s:
        raise ValueError(f"{op}: S needs d >= s, got d={d}, s={s}")
    W, H = _factor(ufm, US, torch.full((s,), 1 - K * c, **kw), None)
    b = torch.full((K,), 1.0 / K, **kw)
    sigma_1 = 1.0 / (K * math.sqrt(ufm.n))
    return Saddle(
        W=W, H=H, b=b, f=(K - 1 - s) / (2 * K) + s * c * (1 - K * c / 2), s=s, sigma_1=sigma_1,
        negative_eigenvalue=mu_minus(sigma_1, ufm.lambda_W, ufm.lambda_H),
        negative_multiplicity=(K - 1 - s) * (d - s),
    )


@dataclass
class ZeroPoint:
    """The zero critical point of theory.md 4.6: W = 0, H = 0, b = 1/(K(1+λ_b)) 1, its value
    ``f`` and the full Hessian spectrum as (eigenvalue, multiplicity) pairs; :meth:`spectrum`
    expands it into a sorted float64 tensor of length dK + dN + K."""

    W: Tensor
    H: Tensor
    b: Tensor
    f: float
    eigenvalues: list[tuple[float, int]] = field(default_factory=list)

    @property
    def lambda_min(self) -> float:
        return min(v for v, m in self.eigenvalues if m > 0)

    def spectrum(self) -> Tensor:
        vals = [torch.full((m,), v, dtype=_F64) for v, m in self.eigenvalues]
        return torch.cat(vals).sort().values


def zero_point(
    ufm: UFM, dtype: torch.dtype = _F64, device: torch.device | str | None = None
) -> ZeroPoint:
    """The zero critical point and its Hessian spectrum (theory.md 4.6; plain MSE, bias
    unpenalised or penalised)::

        σ_1 = 1/(K sqrt n),  σ_K = λ_b/(K sqrt n (1+λ_b))
        μ_±(σ_1) × d(K-1) each,  μ_±(σ_K) × d each,  λ_H × d(N-K),  1 + λ_b × K

    λ_min = μ_-(σ_1) < 0 iff Kc < 1. Raises NotImplementedError for rescaled MSE or
    bias='free' (not given in theory.md 4.6).
    """
    op = _name("zero_point")
    if not isinstance(ufm, UFM):
        raise TypeError(f"{op}: ufm must be a ncfast.ufm.UFM, got {type(ufm).__name__}")
    if not ufm.plain or not ufm.has_bias:
        raise NotImplementedError(
            f"{op}: theory.md 4.6 gives the zero-point spectrum for plain MSE with a bias only, "
            f"got alpha={ufm.alpha}, M={ufm.M}, bias={ufm.bias!r}"
        )
    K, d, n, N = ufm.K, ufm.d, ufm.n, ufm.N
    lw, lh, lb = ufm.lambda_W, ufm.lambda_H, ufm._lb
    kw = dict(dtype=dtype, device=device)
    s1 = 1.0 / (K * math.sqrt(n))
    sK = lb / (K * math.sqrt(n) * (1 + lb))
    eig = [
        (mu_plus(s1, lw, lh), d * (K - 1)), (mu_minus(s1, lw, lh), d * (K - 1)),
        (mu_plus(sK, lw, lh), d), (mu_minus(sK, lw, lh), d),
        (lh, d * (N - K)), (1.0 + lb, K),
    ]
    return ZeroPoint(
        W=torch.zeros(K, d, **kw), H=torch.zeros(d, N, **kw),
        b=torch.full((K,), 1.0 / (K * (1 + lb)), **kw),
        f=(K - 1) / (2 * K) + lb / (2 * K * (1 + lb)), eigenvalues=eig,
    )


# --- class statistics of UFM features, and solvers ---------------------------------------------


def feature_stats(ufm: UFM, H: Tensor) -> ClassStats:
    """Class statistics (theory.md 5.2) of the features H (d, N): an ``ncfast.ClassStats`` in
    float64, ready for ``ncfast.metrics``."""
    op = _name("feature_stats")
    ufm._check_tensor(op, "H", H, (ufm.d, ufm.N))
    stats = ClassStats(ufm.K, ufm.d, device=H.device, dtype=_F64)
    stats.update(H.detach().T.to(_F64), ufm.labels(H.device))
    return stats


def _nc_record(ufm: UFM, W: Tensor, H: Tensor) -> dict[str, float]:
    """NC1 (trace form), NC2 (classifier) and NC3 (gram); NaN where a metric is undefined."""
    stats = feature_stats(ufm, H)
    out: dict[str, float] = {}
    for key, fn in (
        ("nc1_trace", lambda: _metrics.nc1_trace(stats)),
        ("nc2_classifier", lambda: _metrics.nc2_classifier(W.detach())),
        ("nc3_gram", lambda: _metrics.nc3_gram(W.detach(), stats)),
    ):
        try:
            out[key] = fn()
        except ValueError:
            out[key] = math.nan
    return out


@dataclass
class SolverResult:
    """Final point and the recorded path: ``steps`` (iteration index of each record),
    ``objective`` (f at those iterates) and, with ``record_metrics``, ``metrics`` mapping
    ``nc1_trace``, ``nc2_classifier``, ``nc3_gram`` to lists aligned with ``steps``."""

    W: Tensor
    H: Tensor
    b: Tensor | None
    steps: list[int]
    objective: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)

    @property
    def f(self) -> float:
        return self.objective[-1]


def _init(op: str, ufm: UFM, init, generator, dtype, device) -> Params:
    if init is None:
        return ufm.random_init(generator=generator, dtype=dtype, device=device)
    W, H, b = ufm._unpack(op, init)
    return W.detach().clone(), H.detach().clone(), (b.detach().clone() if b is not None else None)


class _Recorder:
    def __init__(self, op: str, ufm: UFM, record_metrics: bool) -> None:
        self.op, self.ufm, self.record_metrics = op, ufm, record_metrics
        self.steps: list[int] = []
        self.objective: list[float] = []
        self.metrics: dict[str, list[float]] = {}

    def __call__(self, step: int, W: Tensor, H: Tensor, b: Tensor | None) -> None:
        f = float(self.ufm.objective(W, H, b))
        if not math.isfinite(f):  # before the metrics, whose inputs are then not finite either
            raise ValueError(f"{self.op}: the objective is {f} at step {step}: the iteration "
                             f"diverged (a gradient-descent lr too large for this UFM?)")
        self.steps.append(step)
        self.objective.append(f)
        if self.record_metrics:
            for k, v in _nc_record(self.ufm, W, H).items():
                self.metrics.setdefault(k, []).append(v)

    def result(self, W: Tensor, H: Tensor, b: Tensor | None) -> SolverResult:
        return SolverResult(W=W, H=H, b=b, steps=self.steps, objective=self.objective,
                            metrics=self.metrics)


def gradient_descent(
    ufm: UFM,
    steps: int,
    lr: float,
    init: Sequence[Tensor | None] | None = None,
    record_every: int = 100,
    record_metrics: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = _F64,
    device: torch.device | str | None = None,
) -> SolverResult:
    """Plain full-batch gradient descent θ <- θ - lr ∇f(θ) with the closed-form gradient
    (theory.md 3.2), from ``init`` = (W, H, b) or a :meth:`UFM.random_init` drawn from
    ``generator``. Records f (and optionally NC1_tr, NC2_W, NC3_gram) at step 0, every
    ``record_every`` steps and at the last step."""
    op = _name("gradient_descent")
    steps = _check_int(op, "steps", steps, 0)
    lr = _check_real(op, "lr", lr, positive=True)
    record_every = _check_int(op, "record_every", record_every, 1)
    W, H, b = _init(op, ufm, init, generator, dtype, device)
    rec = _Recorder(op, ufm, record_metrics)
    rec(0, W, H, b)
    for t in range(1, steps + 1):
        gW, gH, gb = ufm.grad(W, H, b)
        W, H = W - lr * gW, H - lr * gH
        if b is not None:
            b = b - lr * gb
        if t % record_every == 0 or t == steps:
            rec(t, W, H, b)
    return rec.result(W, H, b)


def lbfgs(
    ufm: UFM,
    max_iter: int = 1000,
    init: Sequence[Tensor | None] | None = None,
    tolerance_grad: float = 1e-11,
    history_size: int = 20,
    record_every: int = 1,
    record_metrics: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = _F64,
    device: torch.device | str | None = None,
) -> SolverResult:
    """``torch.optim.LBFGS`` (strong-Wolfe line search) on the flattened parameters, with the
    closed-form gradient, from ``init`` or a random init. Stops after ``max_iter`` iterations or
    when max |∇f| <= ``tolerance_grad`` or an iteration leaves the point unchanged. An iteration
    that lowers f by less than 1e-10 relative while the gradient is not yet small restarts the
    quasi-Newton memory (started next to a saddle, a stale curvature history otherwise keeps
    the steps at ~1e-5 for ever). Records f
    (and optionally the NC metrics) every ``record_every`` iterations and at the end."""
    op = _name("lbfgs")
    max_iter = _check_int(op, "max_iter", max_iter, 0)
    tolerance_grad = _check_real(op, "tolerance_grad", tolerance_grad, positive=False)
    history_size = _check_int(op, "history_size", history_size, 1)
    record_every = _check_int(op, "record_every", record_every, 1)
    W, H, b = _init(op, ufm, init, generator, dtype, device)
    x = ufm.flatten(W, H, b).clone().requires_grad_(False)

    def new_optimizer() -> torch.optim.LBFGS:
        return torch.optim.LBFGS(
            [x], lr=1.0, max_iter=1, max_eval=25, tolerance_grad=tolerance_grad,
            tolerance_change=0.0, history_size=history_size, line_search_fn="strong_wolfe",
        )

    opt = new_optimizer()

    cache: dict[str, Tensor] = {}

    def closure() -> Tensor:
        # LBFGS re-evaluates the point it starts from on every step() call; reuse that value.
        if "x" in cache and torch.equal(cache["x"], x):
            x.grad = cache["g"].clone()
            return cache["f"]
        Wx, Hx, bx = ufm.unflatten(x)
        g = ufm.grad(Wx, Hx, bx)
        x.grad = torch.cat([t.reshape(-1) for t in g if t is not None])
        f = ufm.objective(Wx, Hx, bx)
        cache.update(x=x.detach().clone(), g=x.grad.clone(), f=f)
        return f

    rec = _Recorder(op, ufm, record_metrics)
    rec(0, *ufm.unflatten(x))
    it = 0
    restarted = False
    for it in range(1, max_iter + 1):
        before, f_before = x.clone(), closure().item()
        opt.step(closure)
        f_after = closure().item()  # also the gradient at the new point, for the stopping test
        small_grad = x.grad.abs().max().item() <= tolerance_grad
        stalled = f_before - f_after <= 1e-10 * max(1.0, abs(f_before))
        # No real progress with a nonzero gradient: curvature pairs gathered next to a saddle
        # can leave L-BFGS taking steps of ~1e-5 for ever; restart its memory (once in a row).
        restart = not small_grad and stalled and not restarted
        converged = not restart and (torch.equal(before, x) or small_grad)
        if it % record_every == 0 or converged or it == max_iter:
            rec(it, *ufm.unflatten(x))
        if restart:
            opt, restarted = new_optimizer(), True
            continue
        restarted = False
        if converged:
            break
    W, H, b = (t.clone() if t is not None else None for t in ufm.unflatten(x.detach()))
    return rec.result(W, H, b)
