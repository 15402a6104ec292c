"""Hessian spectra over any Hessian-vector product (theory.md 3.3, 4.6-4.8): Lanczos with full
reorthogonalisation, the Hutch++ trace estimator, stochastic Lanczos quadrature densities, and
the HVP of a real network's loss over a fixed batch (torch.func forward-over-reverse).

Conventions shared by every function here:

- An HVP is any callable ``hvp(v) -> Tensor`` that maps a flat vector of length n to the flat
  vector A v, for a symmetric A (n x n). It is called with one vector at a time.
- The working dtype and device come from ``like`` when given; otherwise from ``hvp.dtype`` and
  ``hvp.device`` when the callable has them (the one returned by :func:`network_hvp` does);
  otherwise torch's default dtype on the CPU.
- Randomness (start vectors, probes) comes only from ``generator`` (a ``torch.Generator``, on
  any device: numbers are drawn on its device and moved), or from torch's global generator
  when it is None. Same generator state, same HVP: same result.
- Small dense work (tridiagonal eigenproblems, traces) is done on the host in float64.
- Errors name the function, the argument, the rule and the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "LanczosResult",
    "NetworkOperator",
    "as_linear_operator",
    "hutchpp",
    "lanczos",
    "network_hvp",
    "network_operator",
    "slq_density",
]

HVP = Callable[[Tensor], Tensor]
WHICH = ("both", "largest", "smallest")
BN_MODES = ("eval", "batch")
_F64 = torch.float64


def _name(fn: str) -> str:
    return f"ncfast.hessian.{fn}"


# --- validation -------------------------------------------------------------------------------


def _check_int(op: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def _check_hvp(op: str, hvp: object) -> None:
    if not callable(hvp):
        raise TypeError(f"{op}: hvp must be callable, got {type(hvp).__name__}")


def _check_generator(op: str, generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def _resolve_like(op: str, hvp: object, like: object) -> tuple[torch.dtype, torch.device]:
    if like is not None:
        if not isinstance(like, Tensor):
            raise TypeError(f"{op}: like must be a tensor or None, got {type(like).__name__}")
        if not like.dtype.is_floating_point:
            raise TypeError(f"{op}: like must have a floating dtype, got {like.dtype}")
        return like.dtype, like.device
    dtype, device = getattr(hvp, "dtype", None), getattr(hvp, "device", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and device is not None:
        return dtype, torch.device(device)
    return torch.get_default_dtype(), torch.device("cpu")


def _apply(op: str, hvp: HVP, v: Tensor, n: int) -> Tensor:
    """One HVP, with its output checked (metadata only: no host synchronisation)."""
    out = hvp(v)
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: hvp must return a tensor, got {type(out).__name__}")
    if out.shape != (n,):
        raise ValueError(f"{op}: hvp must return a tensor of shape [{n}], got {list(out.shape)}")
    if out.device != v.device:
        raise ValueError(
            f"{op}: hvp must return a tensor on the input's device ({v.device}), got {out.device}"
        )
    return out.to(v.dtype)


# --- random vectors ---------------------------------------------------------------------------


def _gaussian(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, device=generator.device, generator=generator).to(device)


def _rademacher(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                generator: torch.Generator | None) -> Tensor:
    where = device if generator is None else generator.device
    bits = torch.randint(0, 2, shape, device=where, generator=generator)
    return (2 * bits - 1).to(device=device, dtype=dtype)


# --- Lanczos ----------------------------------------------------------------------------------


def _default_tol(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps ** (2 / 3)


def _lanczos_run(op: str, hvp: HVP, q0: Tensor, num_iter: int, tol: float,
                 check_every: int) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """Lanczos with two passes of classical Gram-Schmidt against every previous vector.

    q0 must have unit norm. Returns (V, alpha, beta, m, breakdown): V (num_iter + 1, n) holds the
    Lanczos vectors as rows (those after a breakdown are zero), alpha (m,) and beta (m,) the
    tridiagonal in float64 on the host, where beta[m - 1] is the norm of the final residual.

    Nothing in the loop reads a value back to the host: alpha and beta stay device tensors, and
    a breakdown (beta_j <= tol * ‖A q_j‖) zeroes every later vector
    instead of branching, so later steps compute hvp(0) = 0 and leave the Krylov basis alone.
    Every ``check_every`` steps (0: never) one boolean is read back to stop early; the host
    finds the breakdown step once, at the end.
    """
    n = q0.shape[0]
    dtype, device = q0.dtype, q0.device
    V = torch.zeros(num_iter + 1, n, dtype=dtype, device=device)
    V[0] = q0
    alpha = torch.zeros(num_iter, dtype=dtype, device=device)
    beta = torch.zeros(num_iter, dtype=dtype, device=device)
    broken = torch.zeros(num_iter, dtype=torch.bool, device=device)
    alive = torch.ones((), dtype=torch.bool, device=device)
    tiny = torch.finfo(dtype).tiny
    steps = num_iter
    for j in range(num_iter):
        w = _apply(op, hvp, V[j], n)
        wnorm = torch.linalg.vector_norm(w)
        basis = V[: j + 1]
        # Two classical Gram-Schmidt passes ("twice is enough"): the first removes alpha_j q_j,
        # beta_{j-1} q_{j-1} and the rounding leaked onto older vectors, the second cleans up.
        h1 = basis @ w
        w = w - basis.T @ h1
        h2 = basis @ w
        w = w - basis.T @ h2
        a = h1[j] + h2[j]
        b = torch.linalg.vector_norm(w)
        stop = b <= tol * wnorm
        alive = alive & ~stop
        alpha[j] = a
        beta[j] = b
        broken[j] = stop
        V[j + 1] = torch.where(alive, w / b.clamp_min(tiny), torch.zeros_like(w))
        if check_every and (j + 1) % check_every == 0 and j + 1 < num_iter:
            if not bool(alive):  # the one host read, every check_every steps
                steps = j + 1
                break
    alpha_h = alpha[:steps].to("cpu", _F64)
    beta_h = beta[:steps].to("cpu", _F64)
    hits = torch.nonzero(broken[:steps].cpu()).flatten()
    m = int(hits[0]) + 1 if hits.numel() else steps
    _check_finite(op, alpha_h[:m], beta_h[:m])
    return V, alpha_h[:m], beta_h[:m], m, bool(hits.numel())


def _check_finite(op: str, *coefficients: Tensor) -> None:
    """A NaN or Inf from the HVP would reach eigh (LinAlgError) or the result: name it."""
    bad = ~torch.stack([torch.isfinite(c) for c in coefficients]).all(0)
    if bool(bad.any()):
        step = int(bad.nonzero()[0]) + 1
        raise ValueError(f"{op}: hvp must return finite values, got NaN or Inf by product "
                         f"{step} (check the operator at this point, e.g. a loss that "
                         f"overflows)")


def _tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    off = beta[: alpha.numel() - 1]
    return torch.diag(alpha) + torch.diag(off, 1) + torch.diag(off, -1)


@dataclass(frozen=True)
class LanczosResult:
    """Output of :func:`lanczos`.

    Attributes:
        eigenvalues: (r,) float64 on the CPU, ascending: the selected Ritz values.
        eigenvectors: (n, r) Ritz vectors, unit norm, in the working dtype and device; column i
            belongs to ``eigenvalues[i]``.
        residuals: (r,) float64 on the CPU: the Lanczos estimates ``beta_m |s_{m,i}|`` of
            ``‖A y_i - θ_i y_i‖``; exact up to rounding while the basis stays orthonormal, which
            full reorthogonalisation ensures.
        num_iter: Lanczos steps kept (= the size m of the tridiagonal matrix).
        breakdown: True when an invariant subspace was found (the run stopped at ``num_iter``).
        alpha, beta: the tridiagonal, float64 on the CPU: diagonal (m,), and (m,) with
            ``beta[:m-1]`` off the diagonal and ``beta[m-1]`` the final residual norm.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_iter: int
    breakdown: bool
    alpha: Tensor
    beta: Tensor


def lanczos(
    hvp: HVP,
    n: int,
    k: int,
    *,
    which: str = "both",
    num_iter: int | None = None,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
    tol: float | None = None,
    check_every: int = 16,
) -> LanczosResult:
    r"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Starts from a Gaussian vector drawn from ``generator``, runs m = ``num_iter`` steps of
    Lanczos, reorthogonalising every new vector against all previous ones (two passes of
    classical Gram-Schmidt, each two matrix products), and solves the m x m tridiagonal
    eigenproblem on the host in float64.

    Args:
        hvp: the operator, ``hvp(v) -> A v`` on flat vectors of length n (A symmetric).
        n: the dimension (>= 1). k: how many Ritz values to return at each selected end
            (1 <= k <= n).
        which: ``"largest"`` (the k algebraically largest), ``"smallest"`` (the k smallest) or
            ``"both"`` (the union of the two: up to 2k values).
        num_iter: Lanczos steps m, k <= m <= n; default ``min(n, max(3k, 64))``. Extreme
            eigenvalues converge first; interior ones need larger m.
        like: a tensor giving the working dtype and device (see the module docstring).
        generator: source of the start vector.
        tol: breakdown threshold: the run stops at step j when ``beta_j <= tol * ‖A q_j‖``,
            i.e. when all but a fraction tol of A q_j lies in the Krylov basis already (the new
            direction is rounding). Default ``eps ** (2/3)`` of the working dtype (3.7e-11 in
            float64, 2.4e-5 in float32). The test is relative to ‖A q_j‖ rather than ‖A‖ so
            that a bulk of small eigenvalues far below ‖A‖ is not taken for a breakdown. A
            breakdown missed (noise above tol) is harmless: the reorthogonalised noise is just
            one more orthonormal direction, and beta_j ~ 0 decouples the tridiagonal.
        check_every: the loop reads back one boolean every ``check_every`` steps to stop early
            after a breakdown; ``0`` never reads anything back before the end (steps after a
            breakdown then cost an HVP of the zero vector each).

    Host synchronisation: none per step. alpha and beta are device tensors until the end, when
    the tridiagonal moves to the host in float64 (one transfer), plus one boolean every
    ``check_every`` steps.

    Breakdown (an invariant subspace: beta_j ~ 0) ends the run early, and the tridiagonal is
    cut at that step; its Ritz values are then eigenvalues of A to rounding. If fewer than k
    steps were made, fewer than k values are returned. A single start vector sees each
    distinct eigenvalue once: a repeated eigenvalue appears once among the Ritz values, and
    eigenvalues whose eigenspace is orthogonal to the start vector are not seen at all.

    Memory: (m + 1) x n for the basis. Deterministic given the generator state and the HVP.

    Returns a :class:`LanczosResult`.
    """
    op = _name("lanczos")
    _check_hvp(op, hvp)
    n = _check_int(op, "n", n, 1)
    k = _check_int(op, "k", k, 1)
    if k > n:
        raise ValueError(f"{op}: k must be <= n ({n}), got {k}")
    if which not in WHICH:
        raise ValueError(f"{op}: which must be 'both', 'largest' or 'smallest', got {which!r}")
    if num_iter is None:
        num_iter = min(n, max(3 * k, 64))
    num_iter = _check_int(op, "num_iter", num_iter, k)
    if num_iter > n:
        raise ValueError(f"{op}: num_iter must be <= n ({n}), got {num_iter}")
    check_every = _check_int(op, "check_every", check_every, 0)
    _check_generator(op, generator)
    dtype, device = _resolve_like(op, hvp, like)
    if tol is None:
        tol = _default_tol(dtype)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < math.inf:
        raise ValueError(f"{op}: tol must be a finite number >= 0, got {tol!r}")

    q0 = _gaussian((n,), dtype, device, generator)
    q0 = q0 / torch.linalg.vector_norm(q0)
    V, alpha, beta, m, broke = _lanczos_run(op, hvp, q0, num_iter, float(tol), check_every)
    theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta))
    r = min(k, m)
    chosen: list[int] = []
    if which in ("smallest", "both"):
        chosen += range(r)
    if which in ("largest", "both"):
        chosen += range(m - r, m)
    idx = torch.tensor(sorted(set(chosen)), dtype=torch.long)
    S_sel = S[:, idx]
    vectors = V[:m].T @ S_sel.to(device=device, dtype=dtype)
    residuals = beta[m - 1].abs() * S_sel[m - 1].abs()
    return LanczosResult(
        eigenvalues=theta[idx],
        eigenvectors=vectors,
        residuals=residuals,
        num_iter=m,
        breakdown=broke,
        alpha=alpha,
        beta=beta,
    )


# --- Hutch++ ----------------------------------------------------------------------------------


def hutchpp(
    hvp: HVP,
    n: int,
    num_queries: int,
    *,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> float:
    r"""Hutch++ estimate of tr(A) (Meyer, Musco, Musco & Woodruff 2021), Rademacher probes.

    With s = min(num_queries // 3, n) and g = num_queries - 2s (for num_queries >= 3)::

        Q = orth(A S),  S (n x s) Rademacher
        tr(A) ~ tr(Qᵀ A Q) + (1/g) tr(Gᵀ P A P G),  P = I - Q Qᵀ,  G (n x g) Rademacher

    It uses exactly 2s + g = num_queries HVPs. The first term is exact on the range of A S, so
    for A of rank r and s >= r (num_queries >= 3r) the estimate is exact up to rounding; the
    second is Hutchinson's estimator on what the sketch missed, unbiased. Deterministic given
    the generator state and the HVP; one host read at the end.

    Args:
        hvp: the operator (A symmetric), on flat vectors of length n.
        n: the dimension (>= 1). num_queries: the HVP budget (>= 3).
        like: a tensor giving the working dtype and device. generator: source of the probes.

    Returns the estimate as a Python float.
    """
    op = _name("hutchpp")
    _check_hvp(op, hvp)
    n = _check_int(op, "n", n, 1)
    num_queries = _check_int(op, "num_queries", num_queries, 3)
    _check_generator(op, generator)
    dtype, device = _resolve_like(op, hvp, like)

    s = min(num_queries // 3, n)
    g = num_queries - 2 * s
    S = _rademacher((n, s), dtype, device, generator)
    G = _rademacher((n, g), dtype, device, generator)

    def apply_cols(X: Tensor) -> Tensor:
        return torch.stack([_apply(op, hvp, X[:, i].contiguous(), n) for i in range(X.shape[1])], 1)

    Q, _ = torch.linalg.qr(apply_cols(S))
    top = torch.sum(Q * apply_cols(Q))
    PG = G - Q @ (Q.T @ G)
    rest = torch.sum(PG * apply_cols(PG)) / g
    estimate = float((top.to(_F64) + rest.to(_F64)).cpu())
    if not math.isfinite(estimate):
        raise ValueError(f"{op}: hvp must return finite values, got an estimate of {estimate} "
                         f"(check the operator at this point, e.g. a loss that overflows)")
    return estimate


# --- stochastic Lanczos quadrature ------------------------------------------------------------


def slq_density(
    hvp: HVP,
    n: int,
    *,
    num_probes: int,
    num_iter: int,
    grid: Tensor | int | None = None,
    sigma: float | None = None,
    like: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Spectral density of A by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019).

    For each of ``num_probes`` Rademacher probes v (normalised, q = v / √n), ``num_iter`` Lanczos
    steps (fully reorthogonalised) give the Gauss quadrature nodes θ_i and weights τ_i = s_{1,i}²
    (eigenvalues and squared first eigenvector components of the tridiagonal). The density is::

        ρ(t) = (1 / num_probes) Σ_probes Σ_i τ_i N(t; θ_i, σ²)

    It integrates to 1 (Σ τ_i = 1), and its mean Σ τ_i θ_i = qᵀ A q averages to tr(A)/n
    (Hutchinson's estimator divided by n). A probe that breaks down early uses the nodes it has.

    Args:
        hvp: the operator (A symmetric), on flat vectors of length n.
        n: the dimension (>= 1). num_probes: >= 1. num_iter: Lanczos steps per probe, 1..n.
        grid: where to evaluate ρ: a 1-D tensor of points, or an int number of points (>= 2),
            or None (2001). A generated grid spans [θ_min - 5σ, θ_max + 5σ] over all nodes.
        sigma: the Gaussian broadening (> 0); default 1% of the nodes' range (of
            max(|θ|) when the range is zero, 1 when all nodes are zero).
        like: a tensor giving the working dtype and device. generator: source of the probes.

    Returns (grid, density): float64 CPU tensors of the same shape (1-D).
    Deterministic given the generator state and the HVP; one host read per probe.
    """
    op = _name("slq_density")
    _check_hvp(op, hvp)
    n = _check_int(op, "n", n, 1)
    num_probes = _check_int(op, "num_probes", num_probes, 1)
    num_iter = _check_int(op, "num_iter", num_iter, 1)
    if num_iter > n:
        raise ValueError(f"{op}: num_iter must be <= n ({n}), got {num_iter}")
    num_points = 2001
    if isinstance(grid, Tensor):
        if grid.dim() != 1 or grid.numel() < 1 or not grid.dtype.is_floating_point:
            raise ValueError(
                f"{op}: grid must be a non-empty 1-D floating tensor, got shape "
                f"{list(grid.shape)} and dtype {grid.dtype}"
            )
    elif grid is not None:
        num_points = _check_int(op, "grid", grid, 2)
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
            0 < sigma < math.inf
        ):
            raise ValueError(f"{op}: sigma must be a finite number > 0, got {sigma!r}")
    _check_generator(op, generator)
    dtype, device = _resolve_like(op, hvp, like)
    tol = _default_tol(dtype)

    nodes, weights = [], []
    for _ in range(num_probes):
        q0 = _rademacher((n,), dtype, device, generator) / math.sqrt(n)
        _, alpha, beta, _, _ = _lanczos_run(op, hvp, q0, num_iter, tol, 16)
        theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta))
        nodes.append(theta)
        weights.append(S[0] ** 2)
    theta = torch.cat(nodes)
    tau = torch.cat(weights) / num_probes

    lo, hi = float(theta.min()), float(theta.max())
    if sigma is None:
        width = hi - lo if hi > lo else max(abs(lo), abs(hi))
        sigma = 0.01 * width if width > 0 else 1.0
    if isinstance(grid, Tensor):
        points = grid.detach().to("cpu", _F64)
    else:
        points = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=_F64)
    z = (points[:, None] - theta[None, :]) / sigma
    density = (torch.exp(-0.5 * z * z) @ tau) / (sigma * math.sqrt(2 * math.pi))
    return points, density


# --- network HVP and Gauss-Newton products ----------------------------------------------------


class _FlatHVP:
    """hvp(v) on flat vectors; carries ``n``, ``dtype`` and ``device`` for the spectral tools
    and the adapters (``ncfast.integrations``)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], n: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self._fn = fn
        self.n = n
        self.dtype = dtype
        self.device = device

    def __call__(self, v: Tensor) -> Tensor:
        return self._fn(v)


CURVATURES = ("hessian", "gauss_newton")


class NetworkOperator(_FlatHVP):
    """What :func:`network_operator` returns: ``op(v)`` is the curvature-vector product on flat
    (n,) vectors; ``n``, ``dtype``, ``device``, ``curvature`` and ``unflatten(flat)`` (a
    name -> tensor dict of views shaped like the selected parameters) describe it."""

    def __init__(self, fn, n, dtype, device, curvature: str,
                 unflatten: Callable[[Tensor], dict[str, Tensor]]) -> None:
        super().__init__(fn, n, dtype, device)
        self.curvature = curvature
        self.unflatten = unflatten

    def __repr__(self) -> str:
        return f"NetworkOperator({self.curvature}, n={self.n}, dtype={self.dtype}, " \
               f"device={self.device})"


def _select(op: str, model: nn.Module, params) -> list[str]:
    """The names of the parameters to differentiate (see :func:`network_operator`)."""
    named = dict(model.named_parameters())
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
    else:
        if isinstance(params, (str, nn.Parameter, Tensor)):
            raise TypeError(
                f"{op}: params must be an iterable of names or parameters, got "
                f"{type(params).__name__}"
            )
        by_id = {id(p): name for name, p in named.items()}
        wanted = set()
        for item in params:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(f"{op}: params must name parameters of model, got {item!r}")
                wanted.add(item)
            elif isinstance(item, Tensor) and id(item) in by_id:
                wanted.add(by_id[id(item)])
            else:
                raise ValueError(
                    f"{op}: params must hold names or parameters of model, got "
                    f"{type(item).__name__}"
                )
        names = [name for name in named if name in wanted]
    if not names:
        raise ValueError(f"{op}: params must select at least one parameter, got none")
    return names


def _batch(op: str, item: object) -> tuple[tuple, object]:
    """A data item (inputs, targets) as (positional inputs, targets)."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        got = f"{type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) \
            else type(item).__name__
        raise ValueError(f"{op}: every batch must be a pair (inputs, targets), got {got}")
    inputs, targets = item
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), targets


def _rows(targets: object) -> int:
    if isinstance(targets, Tensor) and targets.dim() > 0:
        return targets.shape[0]
    return len(targets)  # type: ignore[arg-type]


def _check_network_args(op: str, model, loss_fn, bn_mode) -> None:
    """The arguments network_operator and network_hvp share, checked before any product."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable, got {type(loss_fn).__name__}")
    if bn_mode not in BN_MODES:
        raise ValueError(f"{op}: bn_mode must be 'eval' or 'batch', got {bn_mode!r}")


def network_operator(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    *,
    curvature: str = "hessian",
    params: Iterable[str | nn.Parameter] | None = None,
    bn_mode: str = "eval",
) -> NetworkOperator:
    r"""The Hessian (or generalised Gauss-Newton) of a network's loss averaged over a data set,
    as a product with flat vectors, never the dense matrix.

    ``data`` is re-iterable (a ``DataLoader``, or a list of batches) and yields
    ``(inputs, targets)``; ``inputs`` is a tensor or a tuple/list of positional inputs. Every
    product makes one pass over it, moving each batch to the parameters' device. The
    operator is

    .. math:: A = \sum_b \frac{n_b}{N} A_b, \qquad N = \sum_b n_b,

    where A_b is the curvature of ``loss_fn(model(*inputs_b), targets_b)`` and n_b the batch's
    number of targets (its first dimension). **Per-batch weighting:** with a loss that is a
    *mean* over its batch (the default of torch's losses and ncfast's), A is therefore the
    curvature of the mean loss over the whole data set, whatever the batch sizes (a short
    last batch counts for its samples, not as a full batch); in BatchNorm ``"eval"`` mode it
    equals the one-batch operator of the whole data set to rounding. With a *sum* loss A is
    a size-weighted average of per-batch sums, which depends on the batching: use a mean.
    In ``bn_mode="batch"`` each batch is normalised with its own statistics, so A depends on
    how the data are batched: use a loader without shuffling for a reproducible operator.

    ``curvature``:

    - ``"hessian"``: ∇²L(θ) v, forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``):
      one forward and one backward pass with tangents per batch.
    - ``"gauss_newton"``: the generalised Gauss-Newton product Jᵀ H_z J v, with J the Jacobian
      of the model's output z = model(inputs) with respect to θ and H_z the Hessian of
      ``loss_fn`` with respect to z: J v by forward mode, H_z (J v) by forward-over-reverse on
      the loss alone, Jᵀ(...) by a vector-Jacobian product. Positive semi-definite for a loss
      convex in z (MSE, cross-entropy); the Hessian minus the terms with the model's second
      derivatives. The model must return one tensor.

    θ is the flat vector of the selected parameters (``params``: names or Parameter objects,
    default every parameter with ``requires_grad``, in ``named_parameters()`` order), captured
    (detached) now; later changes to the model are not seen. The other parameters and the
    buffers are constants. BatchNorm: ``bn_mode="eval"`` (default) runs the whole model in
    eval mode (running statistics, no dropout); ``"batch"`` normalises with each batch's
    statistics and neither reads nor updates the running buffers (see :func:`network_hvp`).
    Module training flags are restored after every product, also on error.

    Returns a :class:`NetworkOperator`: ``op(v)`` for flat (n,) vectors in the parameters'
    dtype and device; :func:`lanczos`, :func:`hutchpp` and :func:`slq_density` take it
    directly (it carries ``dtype`` and ``device``), and
    :func:`ncfast.integrations.as_linear_operator` makes it a SciPy ``LinearOperator``.
    Deterministic as far as the model's ops and the loader's order are.
    """
    op = _name("network_operator")
    _check_network_args(op, model, loss_fn, bn_mode)
    if curvature not in CURVATURES:
        raise ValueError(f"{op}: curvature must be 'hessian' or 'gauss_newton', got "
                         f"{curvature!r}")
    # an Iterator is used up by one pass; iter(data) itself would start a loader's workers
    if not isinstance(data, Iterable) or isinstance(data, Iterator):
        raise TypeError(f"{op}: data must be re-iterable (a DataLoader or a list of batches), "
                        f"got {type(data).__name__}")
    return _network_operator(op, model, loss_fn, data, curvature, params, bn_mode)


def _network_operator(op, model, loss_fn, data, curvature, params, bn_mode) -> NetworkOperator:
    named = dict(model.named_parameters())
    names = _select(op, model, params)
    selected = [named[name] for name in names]
    dtypes = {p.dtype for p in selected}
    devices = {p.device for p in selected}
    if len(dtypes) != 1 or not selected[0].dtype.is_floating_point:
        got = sorted(map(str, dtypes))
        raise ValueError(f"{op}: parameters must share one floating dtype, got {got}")
    if len(devices) != 1:
        raise ValueError(f"{op}: parameters must share one device, got {sorted(map(str, devices))}")
    dtype, device = selected[0].dtype, selected[0].device

    shapes = [p.shape for p in selected]
    sizes = [p.numel() for p in selected]
    n = sum(sizes)
    theta0 = torch.cat([p.detach().reshape(-1) for p in selected])
    constants = {name: p.detach() for name, p in named.items() if name not in set(names)}

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        if not isinstance(flat, Tensor) or flat.shape != (n,):
            got = list(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__
            raise ValueError(f"{op}: a flat vector must have shape [{n}], got {got}")
        return {name: part.view(shape) for name, part, shape in
                zip(names, torch.split(flat, sizes), shapes)}

    # In "batch" mode BatchNorm must not read or write its running buffers: they are passed as
    # None (copies cannot be used: an in-place update of a captured tensor is not allowed inside
    # a torch.func transform).
    overrides: dict[str, Tensor | None] = dict(constants)
    bn_modules = [(prefix, m) for prefix, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if bn_mode == "batch":
        for prefix, m in bn_modules:
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(m, buf, None) is not None:
                    overrides[f"{prefix}.{buf}" if prefix else buf] = None

    def scalar(value: object) -> Tensor:
        if not isinstance(value, Tensor) or value.numel() != 1:
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{op}: loss_fn must return a scalar tensor, got {got}")
        return value.reshape(())

    def product(args: tuple, targets, v: Tensor) -> Tensor:
        def outputs(flat: Tensor) -> Tensor:
            return torch.func.functional_call(model, {**overrides, **unflatten(flat)}, args)

        if curvature == "hessian":
            grad = torch.func.grad(lambda flat: scalar(loss_fn(outputs(flat), targets)))
            return torch.func.jvp(grad, (theta0,), (v,))[1]
        z, jv = torch.func.jvp(outputs, (theta0,), (v,))
        if not isinstance(z, Tensor):
            raise ValueError(f"{op}: curvature='gauss_newton' needs a model that returns one "
                             f"tensor, got {type(z).__name__}")
        grad_z = torch.func.grad(lambda out: scalar(loss_fn(out, targets)))
        hjv = torch.func.jvp(grad_z, (z.detach(),), (jv,))[1]
        return torch.func.vjp(outputs, theta0)[1](hjv)[0]

    def apply(v: Tensor) -> Tensor:
        if not isinstance(v, Tensor) or v.shape != (n,):
            got = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{op}: the vector must have shape [{n}], got {got}")
        v = v.to(device=device, dtype=dtype)
        flags = [(m, m.training) for m in model.modules()]
        total = torch.zeros(n, dtype=dtype, device=device)
        rows = 0
        try:
            model.eval()
            if bn_mode == "batch":
                for _, m in bn_modules:
                    m.train()
            for item in data:
                args, targets = _batch(op, item)
                args = tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)
                if isinstance(targets, Tensor):
                    targets = targets.to(device)
                n_b = _rows(targets)
                total.add_(product(args, targets, v), alpha=n_b)
                rows += n_b
        finally:
            for m, flag in flags:
                m.training = flag
        if rows == 0:
            raise ValueError(f"{op}: data yielded no samples")
        return total / rows

    return NetworkOperator(apply, n, dtype, device, curvature, unflatten)


def network_hvp(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor | Sequence[Tensor],
    targets: Tensor,
    *,
    params: Iterable[str | nn.Parameter] | None = None,
    bn_mode: str = "eval",
) -> tuple[Callable[[Tensor], Tensor], int, Callable[[Tensor], dict[str, Tensor]]]:
    r"""Hessian-vector product of ``loss_fn(model(*inputs), targets)`` over one fixed batch,
    with respect to (a subset of) the model's parameters, flattened: :func:`network_operator`
    over the single batch ``(inputs, targets)`` (its Hessian; over a DataLoader, or the
    Gauss-Newton product, use :func:`network_operator` itself).

    The loss is a function L(θ) of the flat parameter vector θ (the selected parameters in
    ``named_parameters()`` order, each flattened); the others, and the buffers, are constants.
    ``hvp(v) = ∇²L(θ₀) v`` is computed forward-over-reverse,
    ``torch.func.jvp(torch.func.grad(L), (θ₀,), (v,))``, through
    ``torch.func.functional_call``: one forward and one backward pass with tangents, never
    the dense Hessian. θ₀ is captured (detached) when ``network_hvp`` is called; later changes
    to the model's parameters are not seen.

    BatchNorm (every ``torch.nn.modules.batchnorm._BatchNorm``) is handled explicitly, so that
    L is a deterministic function of θ and no module state changes:

    - ``bn_mode="eval"`` (default): the whole model runs in eval mode, so BatchNorm normalises
      with its running statistics (constants) and dropout is off. This is the Hessian of the
      loss the model computes at test time.
    - ``bn_mode="batch"``: BatchNorm normalises with the statistics of this batch (the training
      loss's Hessian, which couples the samples of the batch); the rest of the model (dropout
      included) runs in eval mode. The running buffers are passed to ``functional_call`` as
      None, so they are neither read nor updated.

    Each module's training flag is set for the duration of one ``hvp`` call and restored
    afterwards (also on error); parameters, buffers and flags are as they were.

    Args:
        model: the network. Its selected parameters must share one floating dtype and device.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        inputs: a tensor, or a tuple/list of positional inputs to the model.
        targets: passed to ``loss_fn`` as is.
        params: the parameters to differentiate, as names (from ``named_parameters()``) or
            Parameter objects; default every parameter with ``requires_grad``.
        bn_mode: ``"eval"`` or ``"batch"`` (above).

    Returns ``(hvp, n, unflatten)``: ``hvp`` (a :class:`NetworkOperator`) maps a flat (n,)
    vector in the parameters' dtype and device to the flat (n,) product (it also has ``dtype``
    and ``device`` attributes, which :func:`lanczos`, :func:`hutchpp` and :func:`slq_density`
    use when ``like`` is None); n is the number of selected parameters; ``unflatten(flat)``
    gives a name -> tensor dict of views shaped like the parameters. Deterministic as far as
    the model's ops are.
    """
    op = _name("network_hvp")
    _check_network_args(op, model, loss_fn, bn_mode)
    hvp = _network_operator(op, model, loss_fn, [(inputs, targets)], "hessian", params, bn_mode)
    return hvp, hvp.n, hvp.unflatten


from .integrations.scipy import as_linear_operator  # noqa: E402  (re-exported: users look here)
