"""ncfast.hessian: Lanczos against torch.linalg.eigh, Hutch++ against exact traces, the SLQ
density's mass and mean, and the network HVP against a dense double-backward Hessian (float64);
argument errors and their messages."""

import copy
import re

import pytest
import torch
from torch import nn

from ncfast import hessian

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sym_with_spectrum(eigenvalues, seed):
    """Q diag(λ) Qᵀ with a random orthogonal Q (float64)."""
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    return (Q * eigenvalues) @ Q.T


def matvec(A):
    return lambda v: A @ v


# --- Lanczos ----------------------------------------------------------------------------------

SPECTRA = {
    # name: (n, eigenvalues, num_iter)
    "gaussian-n50": (50, lambda g: torch.randn(50, generator=g, dtype=F64), 50),
    "mixed-sign-n120": (120, lambda g: torch.cat([
        -torch.tensor([5.0, 4.0, 3.2], dtype=F64),
        torch.rand(114, generator=g, dtype=F64),
        torch.tensor([9.0, 12.0, 20.0], dtype=F64)]), 70),
    "wigner-n200": (200, None, 120),
}


def spectrum(name):
    n, make, _ = SPECTRA[name]
    g = gen(7)
    if make is None:  # a Wigner matrix: semicircle spectrum, negative half included
        X = torch.randn(n, n, generator=g, dtype=F64)
        return (X + X.T) / (2 * n) ** 0.5
    return sym_with_spectrum(make(g), seed=11)


@pytest.mark.parametrize("name", list(SPECTRA))
def test_lanczos_matches_eigh(name):
    n, _, num_iter = SPECTRA[name]
    A = spectrum(name)
    exact = torch.linalg.eigvalsh(A)
    norm = exact.abs().max()
    k = 3
    res = hessian.lanczos(matvec(A), n, k, num_iter=num_iter, like=A, generator=gen(1))
    assert res.eigenvalues.shape == (2 * k,) and res.eigenvectors.shape == (n, 2 * k)
    assert res.eigenvalues.dtype == F64 and res.eigenvectors.dtype == F64
    expect = torch.cat([exact[:k], exact[-k:]])
    torch.testing.assert_close(res.eigenvalues, expect, rtol=0, atol=1e-8 * norm)
    # Ritz pairs are eigenpairs: true residuals small, and the reported estimates agree.
    Y, theta = res.eigenvectors, res.eigenvalues
    true_res = torch.linalg.vector_norm(A @ Y - Y * theta, dim=0)
    assert true_res.max() < 1e-4 * norm
    torch.testing.assert_close(res.residuals, true_res, rtol=1e-3, atol=1e-10 * norm)
    torch.testing.assert_close(Y.T @ Y, torch.eye(2 * k, dtype=F64), rtol=0, atol=1e-10)
    # with num_iter = n the Krylov space is all of R^n: the last step is a breakdown.
    assert res.num_iter == num_iter and res.breakdown == (num_iter == n)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_which(which):
    A = spectrum("mixed-sign-n120")
    exact = torch.linalg.eigvalsh(A)
    res = hessian.lanczos(matvec(A), 120, 2, which=which, num_iter=70, like=A, generator=gen(2))
    expect = exact[-2:] if which == "largest" else exact[:2]
    torch.testing.assert_close(res.eigenvalues, expect, rtol=0, atol=1e-8 * 20)


def test_lanczos_is_deterministic_given_the_generator():
    A = spectrum("gaussian-n50")
    a = hessian.lanczos(matvec(A), 50, 2, num_iter=20, like=A, generator=gen(3))
    b = hessian.lanczos(matvec(A), 50, 2, num_iter=20, like=A, generator=gen(3))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.alpha, b.alpha)


def test_lanczos_repeated_eigenvalue_breaks_down():
    # 12 distinct eigenvalues, the top one 40 times: the Krylov space of one start vector has
    # dimension 12, so the run breaks down there (in floating point, rounding amplified by
    # small betas may add a step or two: a copy of the repeated value) instead of running on.
    distinct = torch.tensor([-2.0, -1.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 7.0],
                            dtype=F64)
    lam = torch.cat([distinct[:-1], distinct[-1].repeat(40)])
    A = sym_with_spectrum(lam, seed=3)
    res = hessian.lanczos(matvec(A), 51, 3, num_iter=40, like=A, generator=gen(4),
                          check_every=4)
    assert res.breakdown and 12 <= res.num_iter <= 14
    theta = res.eigenvalues
    torch.testing.assert_close(theta[:3], distinct[:3], rtol=0, atol=1e-10)
    torch.testing.assert_close(theta[-1], distinct[-1], rtol=0, atol=1e-10)
    # every Ritz value is an eigenvalue of A (the tridiagonal is exact on an invariant space)
    assert (theta[:, None] - distinct[None, :]).abs().min(1).values.max() < 1e-8
    Y = res.eigenvectors
    assert torch.linalg.vector_norm(A @ Y - Y * theta, dim=0).max() < 1e-8


@pytest.mark.parametrize("check_every", [0, 1, 5])
def test_lanczos_low_rank_breaks_down(check_every):
    # rank 6: the Krylov space is range(A) plus the start vector's null-space part (dim 7).
    n, r = 80, 6
    B = torch.randn(n, r, generator=gen(5), dtype=F64)
    A = B @ B.T
    exact = torch.linalg.eigvalsh(A)
    res = hessian.lanczos(matvec(A), n, 3, which="largest", num_iter=30, like=A,
                          generator=gen(6), check_every=check_every)
    assert res.breakdown and res.num_iter == r + 1
    assert res.alpha.shape == (r + 1,)
    torch.testing.assert_close(res.eigenvalues, exact[-3:], rtol=1e-12, atol=0)
    smallest = hessian.lanczos(matvec(A), n, 1, which="smallest", num_iter=30, like=A,
                               generator=gen(6), check_every=check_every)
    assert abs(float(smallest.eigenvalues[0])) < 1e-10 * float(exact[-1])


def test_lanczos_zero_operator():
    res = hessian.lanczos(lambda v: torch.zeros_like(v), 10, 2, num_iter=5,
                          like=torch.empty(0, dtype=F64), generator=gen(0))
    assert res.breakdown and res.num_iter == 1
    assert res.eigenvalues.tolist() == [0.0]


# --- Hutch++ ----------------------------------------------------------------------------------


def test_hutchpp_decaying_spectrum():
    n = 150
    lam = torch.exp(-torch.arange(n, dtype=F64) / 4)  # PSD, fast decay
    A = sym_with_spectrum(lam, seed=8)
    trace = float(lam.sum())
    errors = [abs(hessian.hutchpp(matvec(A), n, 30, like=A, generator=gen(s)) - trace) / trace
              for s in range(5)]
    assert max(errors) < 0.03, errors


def test_hutchpp_beats_nothing_on_a_flat_spectrum_but_is_unbiased_ish():
    # Flat spectrum: the sketch captures little, and the estimate is Hutchinson's; it must still
    # land near the trace on average over seeds.
    n = 100
    A = sym_with_spectrum(1.0 + torch.rand(n, generator=gen(9), dtype=F64), seed=9)
    trace = float(torch.trace(A))
    mean = sum(hessian.hutchpp(matvec(A), n, 30, like=A, generator=gen(s)) for s in range(10)) / 10
    assert abs(mean - trace) / trace < 0.02


@pytest.mark.parametrize("num_queries", [18, 19, 20, 40])
def test_hutchpp_exact_for_low_rank(num_queries):
    # rank r and num_queries // 3 >= r: the sketch spans range(A), so the estimate is exact.
    n, r = 90, 6
    B = torch.randn(n, r, generator=gen(10), dtype=F64)
    A = B @ B.T
    calls = []

    def hvp(v):
        calls.append(1)
        return A @ v

    est = hessian.hutchpp(hvp, n, num_queries, like=A, generator=gen(11))
    assert abs(est - float(torch.trace(A))) < 1e-10 * float(torch.trace(A))
    assert len(calls) == num_queries


def test_hutchpp_not_exact_below_rank():
    # The previous test can fail: with a sketch smaller than the rank the estimate is off.
    n, r = 90, 12
    B = torch.randn(n, r, generator=gen(10), dtype=F64)
    A = B @ B.T
    est = hessian.hutchpp(matvec(A), n, 9, like=A, generator=gen(11))
    assert abs(est - float(torch.trace(A))) > 1e-6 * float(torch.trace(A))


# --- SLQ --------------------------------------------------------------------------------------


def test_slq_density_mass_and_mean():
    n = 200
    lam = torch.cat([4.0 + 2.0 * torch.rand(n - 4, generator=gen(12), dtype=F64),
                     torch.tensor([-1.0, 0.0, 9.0, 12.0], dtype=F64)])
    A = sym_with_spectrum(lam, seed=12)
    grid, rho = hessian.slq_density(matvec(A), n, num_probes=20, num_iter=40, like=A,
                                    generator=gen(13))
    assert grid.dtype == F64 and grid.shape == rho.shape and (rho >= 0).all()
    assert abs(float(torch.trapezoid(rho, grid)) - 1) < 1e-3
    mean = float(torch.trapezoid(grid * rho, grid))
    assert abs(mean - float(lam.mean())) / float(lam.mean()) < 0.01
    # the support reaches the extreme eigenvalues (nodes converge to them)
    assert grid[0] < -1.0 < 12.0 < grid[-1]


def test_slq_density_finds_few_distinct_eigenvalues():
    # Three distinct eigenvalues (multiplicities 20, 60, 20): 3 quadrature nodes per probe are
    # exact, so the density is three bumps with masses close to 0.2, 0.6, 0.2.
    lam = torch.cat([torch.full((20,), -1.0), torch.full((60,), 2.0), torch.full((20,), 5.0)])
    A = sym_with_spectrum(lam.to(F64), seed=14)
    grid = torch.linspace(-3, 7, 4001, dtype=F64)
    g, rho = hessian.slq_density(matvec(A), 100, num_probes=30, num_iter=10, grid=grid,
                                 sigma=0.1, like=A, generator=gen(15))
    assert torch.equal(g, grid)
    for centre, mass in ((-1.0, 0.2), (2.0, 0.6), (5.0, 0.2)):
        window = (grid - centre).abs() < 1.0
        got = float(torch.trapezoid(rho[window], grid[window]))
        assert abs(got - mass) < 0.05, (centre, got)
        peak = grid[window][rho[window].argmax()]
        assert abs(float(peak) - centre) < 0.01


# --- network HVP ------------------------------------------------------------------------------


def make_mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(6, 3)).to(F64)
    with torch.no_grad():  # non-trivial running statistics, so "eval" and "batch" differ
        model.train()
        for _ in range(3):
            model(torch.randn(16, 4, dtype=F64) * 2 + 1)
    return model


def batch(seed):
    g = gen(seed)
    return torch.randn(12, 4, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)


def dense_hessian(model, x, y, bn_mode, names=None):
    """Double backward on the model's own parameters (a deep copy), row by row."""
    m = copy.deepcopy(model)
    m.eval()
    if bn_mode == "batch":
        m[1].train()
    params = [p for name, p in m.named_parameters() if names is None or name in names]
    loss = nn.functional.cross_entropy(m(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(g[i], params,
                                                                   retain_graph=True)])
            for i in range(g.numel())]
    return torch.stack(rows)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()])


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_network_hvp_matches_dense_hessian(bn_mode, training):
    model = make_mlp(0)
    model.train(training)
    x, y = batch(1)
    before = snapshot(model)
    hvp, n, unflatten = hessian.network_hvp(model, nn.functional.cross_entropy, x, y,
                                            bn_mode=bn_mode)
    assert n == sum(p.numel() for p in model.parameters()) == 63
    Hd = dense_hessian(model, x, y, bn_mode)
    torch.testing.assert_close(Hd, Hd.T, rtol=0, atol=1e-12)
    V = torch.randn(n, 6, generator=gen(2), dtype=F64)
    Hv = torch.stack([hvp(V[:, i]) for i in range(6)], 1)
    torch.testing.assert_close(Hv, Hd @ V, rtol=0, atol=1e-10)

    after = snapshot(model)
    assert after[1] == before[1]  # every module's training flag
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value), key  # parameters and BN running stats

    parts = unflatten(torch.arange(n, dtype=F64))
    assert list(parts) == [name for name, _ in model.named_parameters()]
    assert parts["0.weight"].shape == (6, 4) and parts["4.bias"].tolist() == [60.0, 61.0, 62.0]


@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_lanczos_on_network_hvp(bn_mode):
    # dtype/device come from the callable (no like=); the extremes match the dense Hessian's.
    model = make_mlp(5)
    x, y = batch(6)
    hvp, n, _ = hessian.network_hvp(model, nn.functional.cross_entropy, x, y, bn_mode=bn_mode)
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y, bn_mode))
    res = hessian.lanczos(hvp, n, 2, num_iter=n, generator=gen(2))
    assert res.eigenvectors.dtype == F64
    torch.testing.assert_close(res.eigenvalues, torch.cat([exact[:2], exact[-2:]]),
                               rtol=0, atol=1e-9 * float(exact.abs().max()))


def test_network_hvp_modes_differ():
    # The two BatchNorm modes are different functions: the test above can tell them apart.
    model = make_mlp(0)
    x, y = batch(1)
    e = torch.eye(63, dtype=F64)[5]
    hv_eval = hessian.network_hvp(model, nn.functional.cross_entropy, x, y)[0](e)
    hv_batch = hessian.network_hvp(model, nn.functional.cross_entropy, x, y,
                                   bn_mode="batch")[0](e)
    assert (hv_eval - hv_batch).abs().max() > 1e-4


def test_network_hvp_parameter_subset():
    model = make_mlp(3)
    x, y = batch(4)
    names = ["0.weight", "4.bias"]
    for params in (names, [model[0].weight, model[4].bias]):
        hvp, n, unflatten = hessian.network_hvp(model, nn.functional.cross_entropy, x, y,
                                                params=params)
        assert n == 24 + 3
        Hd = dense_hessian(model, x, y, "eval", names=set(names))
        V = torch.randn(n, 5, generator=gen(7), dtype=F64)
        Hv = torch.stack([hvp(V[:, i]) for i in range(5)], 1)
        torch.testing.assert_close(Hv, Hd @ V, rtol=0, atol=1e-10)
        assert list(unflatten(torch.zeros(n, dtype=F64))) == names


def test_network_hvp_restores_flags_on_error():
    model = make_mlp(0)
    model.train()
    model[3].eval()  # mixed flags must come back as they were
    x, y = batch(1)
    before = snapshot(model)[1]

    def bad_loss(out, target):
        raise RuntimeError("boom")

    hvp, n, _ = hessian.network_hvp(model, bad_loss, x, y, bn_mode="batch")
    with pytest.raises(RuntimeError, match="boom"):
        hvp(torch.zeros(n, dtype=F64))
    assert snapshot(model)[1] == before


# --- network operators over a DataLoader -----------------------------------------------------


def loader_of(x, y, batch_size):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                       batch_size=batch_size)


def dense_gauss_newton(model, x, y):
    """Jᵀ H_z J of the mean cross-entropy, eval mode, from dense Jacobians (float64)."""
    m = copy.deepcopy(model).eval()
    names = [name for name, _ in m.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    sizes = [p.numel() for p in m.parameters()]
    shapes = [p.shape for p in m.parameters()]

    def out(flat):
        parts = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return torch.func.functional_call(m, parts, (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(out, theta)  # (B*K, n)
    z = out(theta).detach()
    Hz = torch.autograd.functional.hessian(
        lambda zz: nn.functional.cross_entropy(zz.view(len(y), -1), y), z)
    return J.T @ Hz @ J


def stacked(op, V):
    return torch.stack([op(V[:, i]) for i in range(V.shape[1])], 1)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_loader_operator_is_the_whole_data_sets_mean_loss_curvature(curvature):
    # Uneven batches (5, 5, 2): each counts for its samples, so in eval mode the average is
    # the curvature of the mean loss over all 12 samples.
    model = make_mlp(8)
    x, y = batch(9)
    op = hessian.network_operator(model, nn.functional.cross_entropy, loader_of(x, y, 5),
                                  curvature=curvature)
    assert (op.n, op.dtype, op.curvature) == (63, F64, curvature)
    dense = dense_hessian(model, x, y, "eval") if curvature == "hessian" \
        else dense_gauss_newton(model, x, y)
    V = torch.randn(63, 4, generator=gen(10), dtype=F64)
    torch.testing.assert_close(stacked(op, V), dense @ V, rtol=0, atol=1e-10)
    if curvature == "gauss_newton":  # PSD, and not the Hessian
        assert torch.linalg.eigvalsh(dense)[0] > -1e-12
        assert (dense - dense_hessian(model, x, y, "eval")).abs().max() > 1e-3


def test_loader_operator_in_batch_mode_weights_each_batch_by_its_samples():
    model = make_mlp(11)
    x, y = batch(12)
    op = hessian.network_operator(model, nn.functional.cross_entropy, loader_of(x, y, 8),
                                  bn_mode="batch")
    want = (8 * dense_hessian(model, x[:8], y[:8], "batch")
            + 4 * dense_hessian(model, x[8:], y[8:], "batch")) / 12
    V = torch.randn(63, 3, generator=gen(13), dtype=F64)
    torch.testing.assert_close(stacked(op, V), want @ V, rtol=0, atol=1e-10)


def test_lanczos_and_slq_over_a_loader():
    # A smaller network (n = 26) keeps the number of products (each a pass over the loader) low.
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x, y = torch.randn(12, 4, generator=gen(15), dtype=F64), torch.arange(12) % 2
    op = hessian.network_operator(model, nn.functional.cross_entropy, loader_of(x, y, 7))
    names = [name for name, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def mean_loss(flat):
        parts = dict(zip(names, torch.split(flat, [p.numel() for p in model.parameters()])))
        parts = {k: v.view(dict(model.named_parameters())[k].shape) for k, v in parts.items()}
        return nn.functional.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(mean_loss, theta))
    res = hessian.lanczos(op, op.n, 2, num_iter=op.n, generator=gen(16))
    torch.testing.assert_close(res.eigenvalues, torch.cat([exact[:2], exact[-2:]]),
                               rtol=0, atol=1e-9 * float(exact.abs().max()))
    probes = 6
    grid, rho = hessian.slq_density(op, op.n, num_probes=probes, num_iter=op.n,
                                    generator=gen(17))
    assert abs(float(torch.trapezoid(rho, grid)) - 1) < 1e-3
    # The density's mean is the average of qᵀAq over unit probes: tr(A)/n within its spread,
    # Var(qᵀAq) = 2 (mean(λ²) - mean(λ)²) / (n + 2) for q uniform on the sphere.
    mean = float(torch.trapezoid(grid * rho, grid))
    spread = (2 * float((exact ** 2).mean() - exact.mean() ** 2) / (op.n + 2) / probes) ** 0.5
    assert abs(mean - float(exact.mean())) < 4 * spread
    assert 4 * spread < float(exact.abs().max())  # the check is not vacuous


# --- argument errors --------------------------------------------------------------------------

A10 = torch.eye(10, dtype=F64)


def mv(v):
    return A10 @ v


ERRORS = [
    (lambda: hessian.lanczos(mv, 10, 0), ValueError,
     "ncfast.hessian.lanczos: k must be >= 1, got 0"),
    (lambda: hessian.lanczos(mv, 10, 11), ValueError,
     "ncfast.hessian.lanczos: k must be <= n (10), got 11"),
    (lambda: hessian.lanczos(mv, 0, 1), ValueError,
     "ncfast.hessian.lanczos: n must be >= 1, got 0"),
    (lambda: hessian.lanczos(mv, 10, 3, num_iter=2), ValueError,
     "ncfast.hessian.lanczos: num_iter must be >= 3, got 2"),
    (lambda: hessian.lanczos(mv, 10, 3, num_iter=11), ValueError,
     "ncfast.hessian.lanczos: num_iter must be <= n (10), got 11"),
    (lambda: hessian.lanczos(mv, 10, 2, which="top"), ValueError,
     "ncfast.hessian.lanczos: which must be 'both', 'largest' or 'smallest', got 'top'"),
    (lambda: hessian.lanczos(mv, 10, 2.0), TypeError,
     "ncfast.hessian.lanczos: k must be an int, got float"),
    (lambda: hessian.lanczos(mv, 10, 2, tol=-1.0), ValueError,
     "ncfast.hessian.lanczos: tol must be a finite number >= 0, got -1.0"),
    (lambda: hessian.lanczos(mv, 10, 2, generator=1), TypeError,
     "ncfast.hessian.lanczos: generator must be a torch.Generator or None, got int"),
    (lambda: hessian.lanczos(3, 10, 2), TypeError,
     "ncfast.hessian.lanczos: hvp must be callable, got int"),
    (lambda: hessian.lanczos(lambda v: v[:5], 10, 2, like=A10), ValueError,
     "ncfast.hessian.lanczos: hvp must return a tensor of shape [10], got [5]"),
    (lambda: hessian.hutchpp(mv, 10, 2, like=A10), ValueError,
     "ncfast.hessian.hutchpp: num_queries must be >= 3, got 2"),
    (lambda: hessian.slq_density(mv, 10, num_probes=0, num_iter=3), ValueError,
     "ncfast.hessian.slq_density: num_probes must be >= 1, got 0"),
    (lambda: hessian.slq_density(mv, 10, num_probes=1, num_iter=11), ValueError,
     "ncfast.hessian.slq_density: num_iter must be <= n (10), got 11"),
    (lambda: hessian.slq_density(mv, 10, num_probes=1, num_iter=3, sigma=0.0), ValueError,
     "ncfast.hessian.slq_density: sigma must be a finite number > 0, got 0.0"),
    (lambda: hessian.network_hvp(make_mlp(0), nn.functional.cross_entropy, *batch(0),
                                 bn_mode="train"), ValueError,
     "ncfast.hessian.network_hvp: bn_mode must be 'eval' or 'batch', got 'train'"),
    (lambda: hessian.network_hvp(make_mlp(0), nn.functional.cross_entropy, *batch(0),
                                 params=["nope"]), ValueError,
     "ncfast.hessian.network_hvp: params must name parameters of model, got 'nope'"),
    (lambda: hessian.network_hvp(make_mlp(0), nn.functional.cross_entropy, *batch(0),
                                 params=[]), ValueError,
     "ncfast.hessian.network_hvp: params must select at least one parameter, got none"),
    (lambda: hessian.network_hvp(make_mlp(0), nn.functional.cross_entropy, *batch(0))[0](
        torch.zeros(5, dtype=F64)), ValueError,
     "ncfast.hessian.network_hvp: the vector must have shape [63], got [5]"),
    (lambda: hessian.network_operator(make_mlp(0), nn.functional.cross_entropy,
                                      iter([batch(0)])), TypeError,
     "ncfast.hessian.network_operator: data must be re-iterable (a DataLoader or a list of "
     "batches), got list_iterator"),
    (lambda: hessian.network_operator(make_mlp(0), nn.functional.cross_entropy, [batch(0)],
                                      curvature="fisher"), ValueError,
     "ncfast.hessian.network_operator: curvature must be 'hessian' or 'gauss_newton', got "
     "'fisher'"),
    (lambda: hessian.network_operator(make_mlp(0), nn.functional.cross_entropy,
                                      [batch(0)[0]])(torch.zeros(63, dtype=F64)), ValueError,
     "ncfast.hessian.network_operator: every batch must be a pair (inputs, targets), got "
     "Tensor"),
    (lambda: hessian.network_operator(make_mlp(0), nn.functional.cross_entropy,
                                      [])(torch.zeros(63, dtype=F64)), ValueError,
     "ncfast.hessian.network_operator: data yielded no samples"),
]


def test_network_operator_passes_over_the_data_once_per_product_only():
    """Building the operator must not iterate the data (a DataLoader's iter() starts its
    workers); each product is one pass."""
    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    op = hessian.network_operator(make_mlp(0), nn.functional.cross_entropy, Counted([batch(0)]))
    assert Counted.passes == 0
    op(torch.zeros(op.n, dtype=F64))
    assert Counted.passes == 1


@pytest.mark.parametrize("call,kind,message", ERRORS,
                         ids=[m.split(": ")[1][:40] for _, _, m in ERRORS])
def test_argument_errors(call, kind, message):
    with pytest.raises(kind, match="^" + re.escape(message) + "$"):
        call()


# --- an operator that produces NaN or Inf (issue 11): a ValueError naming it, not LinAlgError


def poisoned(A, value, after):
    """A @ v, except that every product from the ``after``-th on holds ``value`` in entry 0."""
    calls = [0]

    def hvp(v):
        calls[0] += 1
        out = A @ v
        if calls[0] >= after:
            out = out.clone()
            out[0] = value
        return out
    return hvp


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("after", [1, 4])
@pytest.mark.parametrize("call", [
    lambda hvp: hessian.lanczos(hvp, 30, k=2, num_iter=10, like=torch.zeros(1, dtype=F64),
                                generator=gen(0)),
    lambda hvp: hessian.slq_density(hvp, 30, num_probes=2, num_iter=8,
                                    like=torch.zeros(1, dtype=F64), generator=gen(0)),
], ids=["lanczos", "slq_density"])
def test_non_finite_hvp_is_a_value_error_naming_the_product(call, value, after):
    A = spectrum("gaussian-n50")[:30, :30]
    with pytest.raises(ValueError, match=rf"hvp must return finite values, got NaN or Inf by "
                                         rf"product {after} \(check the operator"):
        call(poisoned(A, value, after))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_hvp_in_hutchpp_is_a_value_error(value):
    A = spectrum("gaussian-n50")
    with pytest.raises(ValueError, match=r"ncfast.hessian.hutchpp: hvp must return finite "
                                         r"values, got an estimate of (nan|inf|-inf)"):
        hessian.hutchpp(poisoned(A, value, 2), 50, 9, like=torch.zeros(1, dtype=F64),
                        generator=gen(0))
