"""The UFM (ncfast.ufm) against torch.func, central differences, dense Hessians and the closed
forms and worked examples of theory.md 3-4 and 7; float64, seeded; errors for bad input."""

import math

import pytest
import torch

from ncfast import metrics
from ncfast import ufm as U

F64 = torch.float64
MODES = [
    pytest.param(dict(bias="unpenalized"), id="unpen"),
    pytest.param(dict(bias="penalized", lambda_b=0.03), id="pen"),
    pytest.param(dict(bias="free"), id="free"),
]
SCALES = [pytest.param((1.0, 1.0), id="a1M1"), pytest.param((3.0, 2.5), id="a3M2.5")]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def small(mode, am, K=3, d=4, n=2):
    return U.UFM(K, d, n, 0.02, 0.05, alpha=am[0], M=am[1], **mode)


def direction(u, seed, batch=()):
    g = gen(seed)
    A = torch.randn(*batch, u.K, u.d, generator=g, dtype=F64)
    B = torch.randn(*batch, u.d, u.N, generator=g, dtype=F64)
    c = torch.randn(*batch, u.K, generator=g, dtype=F64) if u.has_bias else None
    return A, B, c


def flat_f(u):
    return lambda x: u.objective(*u.unflatten(x))


def flat(u, *blocks):
    return torch.cat([t.reshape(-1) for t in blocks if t is not None])


def dense_hessian(u, W, H, b):
    return torch.func.hessian(flat_f(u))(u.flatten(W, H, b))


def dot(xs, ys):
    return sum((x * y).sum() for x, y in zip(xs, ys) if x is not None)


# --- derivatives (theory.md 3.2-3.3) ----------------------------------------------------------


@pytest.mark.parametrize("am", SCALES)
@pytest.mark.parametrize("mode", MODES)
def test_grad_matches_autograd(mode, am):
    u = small(mode, am)
    W, H, b = u.random_init(gen(1), scale=0.7)
    x = u.flatten(W, H, b)
    ref = torch.func.grad(flat_f(u))(x)
    torch.testing.assert_close(flat(u, *u.grad(W, H, b)), ref, rtol=1e-12, atol=1e-14)
    assert (u.grad(W, H, b)[2] is None) == (mode["bias"] == "free")


@pytest.mark.parametrize("am", SCALES)
@pytest.mark.parametrize("mode", MODES)
def test_hvp_matches_jvp_of_grad_and_central_differences(mode, am):
    u = small(mode, am)
    W, H, b = u.random_init(gen(2), scale=0.7)
    A, B, c = direction(u, 3)
    hv = flat(u, *u.hvp((W, H, b), (A, B, c)))
    x, v = u.flatten(W, H, b), flat(u, A, B, c)
    _, ref = torch.func.jvp(torch.func.grad(flat_f(u)), (x,), (v,))
    torch.testing.assert_close(hv, ref, rtol=1e-10, atol=1e-12)
    eps = 1e-5
    gp = flat(u, *u.grad(*u.unflatten(x + eps * v)))
    gm = flat(u, *u.grad(*u.unflatten(x - eps * v)))
    fd = (gp - gm) / (2 * eps)
    assert (fd - hv).norm() <= 1e-6 * hv.norm()


@pytest.mark.parametrize("am", SCALES)
@pytest.mark.parametrize("mode", MODES)
def test_batched_hvp_and_ggn_equal_per_direction(mode, am):
    u = small(mode, am)
    p = u.random_init(gen(4), scale=0.7)
    A, B, c = direction(u, 5, batch=(3,))
    for fn in (u.hvp, u.gauss_newton):
        batched = fn(p, (A, B, c))
        for i in range(3):
            one = fn(p, (A[i], B[i], c[i] if c is not None else None))
            for x, y in zip(batched, one):
                if y is None:
                    assert x is None
                else:
                    torch.testing.assert_close(x[i], y, rtol=1e-13, atol=1e-15)
    q = u.quadratic_form(p, (A, B, c))
    assert q.shape == (3,)


@pytest.mark.parametrize("am", SCALES)
@pytest.mark.parametrize("mode", MODES)
def test_quadratic_form_and_gauss_newton(mode, am):
    u = small(mode, am)
    W, H, b = u.random_init(gen(6), scale=0.7)
    G = u.logit_gradient(W, H, b)
    for seed in range(7, 12):
        A, B, c = direction(u, seed)
        d = (A, B, c)
        hv = u.hvp((W, H, b), d)
        q = u.quadratic_form((W, H, b), d)
        torch.testing.assert_close(q, dot(d, hv), rtol=1e-12, atol=1e-14)
        gn = u.gauss_newton((W, H, b), d)
        qg = dot(d, gn)
        assert qg > 0  # PSD (strictly: λ_W, λ_H > 0)
        torch.testing.assert_close(qg, q - 2 * (G * (A @ B)).sum(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gn[0], hv[0] - G @ B.T, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gn[1], hv[1] - A.T @ G, rtol=1e-12, atol=1e-14)
    # the GGN matrix itself is PSD: build it from the batched products on a basis
    eye = torch.eye(u.num_params, dtype=F64)
    basis = [u.unflatten(e) for e in eye]
    cols = u.gauss_newton((W, H, b), tuple(
        torch.stack([bb[i] for bb in basis]) if basis[0][i] is not None else None
        for i in range(3)))
    Gmat = torch.cat([t.reshape(u.num_params, -1) for t in cols if t is not None], 1)
    torch.testing.assert_close(Gmat, Gmat.T, rtol=1e-12, atol=1e-14)
    assert torch.linalg.eigvalsh(Gmat).min() > 0


def test_float32_matches_float64():
    u = U.UFM(4, 5, 3, 0.01, 0.02, alpha=2.0, M=1.5)
    p64 = u.random_init(gen(0))
    p32 = tuple(t.float() for t in p64)
    assert u.objective(*p32).dtype == torch.float32
    torch.testing.assert_close(u.objective(*p32).double(), u.objective(*p64), rtol=1e-5, atol=0)
    for x, y in zip(u.grad(*p32), u.grad(*p64)):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-6)


# --- closed-form minimisers (theory.md 4.2, 7.1) ----------------------------------------------

K10 = dict(K=10, d=16, n=50)
FIXTURES = [  # theory.md 7.1
    ("A", dict(**K10, lambda_W=5e-4, lambda_H=5e-4), 0.0312573052),
    ("B (beta=0)", dict(**K10, lambda_W=5e-4, lambda_H=5e-4, lambda_b=5e-4, bias="penalized"),
     0.0312822927),
    ("A", dict(**K10, lambda_W=5e-3, lambda_H=5e-3), 0.2619480515),
    ("B (beta=0)", dict(**K10, lambda_W=5e-3, lambda_H=5e-3, lambda_b=5e-3, bias="penalized"),
     0.2621968078),
    ("C", dict(**K10, lambda_W=5e-3, lambda_H=5e-3, bias="free"), 0.2910533906),
    ("D", dict(**K10, lambda_W=5e-3, lambda_H=5e-3, alpha=5), 0.3024480515),
    ("D", dict(**K10, lambda_W=5e-3, lambda_H=5e-3, M=5), 1.5347402577),
    ("D", dict(**K10, lambda_W=5e-3, lambda_H=5e-3, alpha=15, M=30), 9.5369415460),
    ("B (zero)", dict(K=4, d=6, n=5, lambda_W=0.2, lambda_H=0.2, lambda_b=0.1,
                      bias="penalized"), 0.3863636364),
    ("A", dict(K=4, d=3, n=5, lambda_W=5e-3, lambda_H=5e-3), 0.0327910197),
    ("F", dict(K=5, d=2, n=4, lambda_W=5e-3, lambda_H=5e-3), 0.2195),
    ("B (beta>0)", dict(K=4, d=6, n=5, lambda_W=5e-3, lambda_H=5e-3, lambda_b=1.0,
                        bias="penalized"), 0.0434713595),
]


def fixture_id(f):
    return f"{f[0]}-" + "-".join(f"{k}={v}" for k, v in f[1].items() if k not in ("K", "d"))


@pytest.mark.parametrize("regime,kw,f_ref", FIXTURES, ids=[fixture_id(f) for f in FIXTURES])
def test_global_minimizer_worked_examples(regime, kw, f_ref):
    u = U.UFM(**kw)
    m = U.global_minimizer(u)
    assert m.regime == regime
    assert abs(m.f_star - f_ref) <= 6e-11
    assert abs(u.objective(m.W, m.H, m.b).item() - m.f_star) <= 1e-13
    g = u.grad(m.W, m.H, m.b)
    assert max(t.abs().max().item() for t in g if t is not None) <= 1e-9
    torch.testing.assert_close(m.W @ m.H[:, :: u.n], m.Z, rtol=0, atol=1e-12)  # W H̄ = Z*
    # balancedness (L2) and, at the convex solution, the certificate (4.3)
    bal = u.lambda_W * m.W.T @ m.W - u.lambda_H * m.H @ m.H.T
    assert bal.abs().max() <= 1e-12
    cert = U.certificate(u, m.W, m.H, m.b)
    assert cert.certified == (regime != "F")


ZERO_AND_SMALL = [  # every case, small sizes, for L-BFGS from random starts
    ("A", dict(K=4, d=5, n=3, lambda_W=5e-3, lambda_H=1e-2)),
    ("A (zero)", dict(K=4, d=5, n=3, lambda_W=0.3, lambda_H=0.2)),
    ("B (beta=0)", dict(K=4, d=5, n=3, lambda_W=5e-3, lambda_H=1e-2, lambda_b=0.02,
                        bias="penalized")),
    ("B (beta>0)", dict(K=4, d=6, n=5, lambda_W=5e-3, lambda_H=5e-3, lambda_b=1.0,
                        bias="penalized")),
    ("B (zero)", dict(K=4, d=6, n=5, lambda_W=0.2, lambda_H=0.2, lambda_b=0.1,
                      bias="penalized")),
    ("C", dict(K=4, d=5, n=3, lambda_W=5e-3, lambda_H=1e-2, bias="free")),
    ("C (zero)", dict(K=4, d=5, n=3, lambda_W=0.3, lambda_H=0.2, bias="free")),
    ("D", dict(K=4, d=5, n=3, lambda_W=5e-3, lambda_H=1e-2, alpha=3.0, M=2.5)),
    ("D (zero)", dict(K=4, d=5, n=3, lambda_W=0.5, lambda_H=0.5, alpha=1.5, M=0.5)),
    ("E", dict(K=4, d=5, n=3, lambda_W=5e-3, lambda_H=1e-2, alpha=3.0, M=2.5, bias="free")),
    ("E (zero)", dict(K=4, d=5, n=3, lambda_W=0.5, lambda_H=0.5, alpha=1.5, M=0.5,
                      bias="free")),
    ("F", dict(K=5, d=2, n=4, lambda_W=5e-3, lambda_H=5e-3)),
]


@pytest.mark.parametrize("regime,kw", ZERO_AND_SMALL, ids=[r for r, _ in ZERO_AND_SMALL])
def test_global_minimizer_matches_lbfgs(regime, kw):
    u = U.UFM(**kw)
    m = U.global_minimizer(u)
    assert m.regime == regime
    g = u.grad(m.W, m.H, m.b)
    assert max(t.abs().max().item() for t in g if t is not None) <= 1e-9
    assert abs(u.objective(m.W, m.H, m.b).item() - m.f_star) <= 1e-13
    for seed in (0, 1):
        r = U.lbfgs(u, max_iter=1500, generator=gen(seed), tolerance_grad=1e-11)
        assert r.objective[-1] == pytest.approx(m.f_star, rel=1e-8, abs=1e-12)
        assert r.objective[0] > r.objective[-1]


def test_derived_constants_k10():
    """theory.md 7.1 derived constants and 7.2 / 5.6 assertions at the closed form."""
    for lam, c, rho, wf, sv, h2, (lt, lo), (b0, b1), (bn0, bn1) in [
        (5e-4, 0.0035355339, 6.82106781, 61.38961031, 2.61171741, 0.12277922,
         (0.96818019, 0.00353553), (0.1, 0.09995002), (0.31622777, 0.31606973)),
        (5e-3, 0.0353553391, 4.57106781, 41.13961031, 2.13800557, 0.08227922,
         (0.68180195, 0.03535534), (0.1, 0.09950249), (0.31622777, 0.31465449)),
    ]:
        u = U.UFM(**K10, lambda_W=lam, lambda_H=lam)
        m = U.global_minimizer(u)
        assert u.c == pytest.approx(c, abs=1e-10)
        ev = torch.linalg.eigvalsh(m.W @ m.W.T)
        assert ev[0].abs() <= 1e-12 and torch.allclose(ev[1:], torch.full((9,), rho, dtype=F64), atol=1e-8)
        assert (m.W**2).sum().item() == pytest.approx(wf, abs=1e-7)
        assert (m.H**2).sum().item() == pytest.approx(wf, abs=1e-7)
        sw = torch.linalg.svdvals(m.W)
        assert torch.allclose(sw[:9], torch.full((9,), sv, dtype=F64), atol=1e-8)
        assert torch.allclose((m.H**2).sum(0), torch.full((u.N,), h2, dtype=F64), atol=1e-8)
        logits = m.W @ m.H + m.b[:, None]
        Y = u.Y().bool()
        assert torch.allclose(logits[Y], torch.tensor(lt, dtype=F64), atol=1e-8)
        assert torch.allclose(logits[~Y], torch.tensor(lo, dtype=F64), atol=1e-8)
        # self-duality h_{k,i} = sqrt(λ_W/(nλ_H)) w_k (NC3) and every NC metric at 0
        k = math.sqrt(u.lambda_W / (u.n * u.lambda_H))
        torch.testing.assert_close(m.H, k * m.W.T.repeat_interleave(u.n, 1), rtol=0,
                                   atol=1e-12)
        stats = U.feature_stats(u, m.H)
        assert metrics.nc1_trace(stats) <= 1e-14
        assert metrics.nc2_classifier(m.W) <= 1e-7  # unsquared distance: ~sqrt(eps)
        assert metrics.nc3_gram(m.W, stats) <= 1e-7
        assert metrics.bias_norm(m.W, m.b, stats) == pytest.approx(bn0, abs=1e-8)
        assert m.b[0].item() == pytest.approx(b0, abs=1e-8)
        up = U.UFM(**K10, lambda_W=lam, lambda_H=lam, lambda_b=lam, bias="penalized")
        mp = U.global_minimizer(up)
        assert mp.b[0].item() == pytest.approx(b1, abs=1e-8)
        assert metrics.bias_norm(mp.W, mp.b, U.feature_stats(up, mp.H)) == pytest.approx(
            bn1, abs=1e-8)


def test_large_lambda_b_is_not_an_etf():
    u = U.UFM(4, 6, 5, 5e-3, 5e-3, lambda_b=1.0, bias="penalized")
    m = U.global_minimizer(u)
    ev = torch.linalg.eigvalsh(m.W @ m.W.T)
    torch.testing.assert_close(ev, torch.tensor([2.036068, 2.136068, 2.136068, 2.136068],
                                                dtype=F64), rtol=0, atol=1e-6)
    assert torch.allclose(m.b, torch.full((4,), 0.01118034, dtype=F64), atol=1e-8)
    logits = m.W @ m.H + m.b[:, None]
    Y = u.Y().bool()
    assert torch.allclose(logits[Y], torch.tensor(0.95527864, dtype=F64), atol=1e-8)
    assert logits[~Y].abs().max() <= 1e-12
    assert metrics.nc2_classifier(m.W) <= 1e-7
    assert metrics.etf_distance(m.W @ m.W.T) > 1e-2


def test_global_minimizer_rotation_and_uncovered_cases():
    u = U.UFM(4, 6, 3, 5e-3, 1e-2)
    Q, _ = torch.linalg.qr(torch.randn(6, 3, generator=gen(0), dtype=F64))
    m = U.global_minimizer(u, Q=Q)
    assert abs(u.objective(m.W, m.H, m.b).item() - m.f_star) <= 1e-13
    torch.testing.assert_close(m.W @ m.W.T, U.global_minimizer(u).W @ U.global_minimizer(u).W.T)
    with pytest.raises(NotImplementedError, match=r"rescaled analogue of case \(F\)"):
        U.global_minimizer(U.UFM(5, 2, 4, 5e-3, 5e-3, alpha=2.0))
    with pytest.raises(NotImplementedError, match="penalized bias with rescaled"):
        U.global_minimizer(U.UFM(4, 6, 3, 5e-3, 5e-3, lambda_b=0.1, bias="penalized", M=2.0))
    with pytest.raises(NotImplementedError, match=r"needs d >= K=4"):
        U.global_minimizer(U.UFM(4, 3, 3, 5e-3, 5e-3, bias="free"))
    with pytest.raises(NotImplementedError, match=r"B \(beta>0\) needs d >= 4"):
        U.global_minimizer(U.UFM(4, 3, 5, 5e-3, 5e-3, lambda_b=1.0, bias="penalized"))


# --- certificate, zero point, saddles, negative curvature (theory.md 4.3-4.6, 7.3) -------------


def test_certificate_small_d_counter_example():
    u = U.UFM(5, 2, 4, 5e-3, 5e-3)
    m = U.global_minimizer(u)
    cert = U.certificate(u, m.W, m.H, m.b)
    assert cert.sigma_max == pytest.approx(0.1, rel=1e-12)
    assert cert.threshold == pytest.approx(0.005, rel=1e-12)
    assert not cert.certified and cert.grad_norm <= 1e-12


@pytest.mark.parametrize("K,n,lw,lh,lmin,curv", [
    (10, 50, 5e-4, 5e-4, -0.0136421356, -0.0272842712),
    (10, 50, 5e-3, 5e-3, -0.0091421356, -0.0182842712),
    (4, 3, 1e-2, 2e-2, -0.1294241439, -0.2603908633),
])
def test_zero_point_table_7_3(K, n, lw, lh, lmin, curv):
    u = U.UFM(K, K + 2, n, lw, lh)
    z = U.zero_point(u)
    assert z.lambda_min == pytest.approx(lmin, abs=1e-10)
    cert = U.certificate(u, z.W, z.H, z.b)
    assert not cert.certified and cert.grad_norm <= 1e-15
    assert cert.sigma_max == pytest.approx(1 / (K * math.sqrt(n)), rel=1e-12)
    nc = U.negative_curvature_direction(u, z.W, z.H, z.b)
    assert nc.curvature == pytest.approx(curv, abs=1e-10)
    assert nc.predicted == pytest.approx(curv, abs=1e-10)
    assert dot(nc.direction, nc.direction).item() == pytest.approx(nc.norm_sq, rel=1e-12)


@pytest.mark.parametrize("lambda_b,bias", [(0.0, "unpenalized"), (0.3, "penalized")])
def test_zero_point_full_spectrum_vs_dense_hessian(lambda_b, bias):
    u = U.UFM(4, 6, 3, 1e-2, 2e-2, lambda_b=lambda_b, bias=bias)
    z = U.zero_point(u)
    assert u.objective(z.W, z.H, z.b).item() == pytest.approx(z.f, abs=1e-15)
    assert max(t.abs().max().item() for t in u.grad(z.W, z.H, z.b)) <= 1e-15
    ev = torch.linalg.eigvalsh(dense_hessian(u, z.W, z.H, z.b))
    spec = z.spectrum()
    assert spec.numel() == u.num_params
    torch.testing.assert_close(ev, spec, rtol=0, atol=1e-12)


def test_saddles_table_7_3():
    u = U.UFM(4, 7, 3, 1e-2, 2e-2)
    for s, count in ((0, 21), (1, 12), (2, 5)):
        sd = U.saddle(u, s)
        assert sd.negative_multiplicity == count
        assert sd.negative_eigenvalue == pytest.approx(-0.1294241439, abs=1e-10)
        assert u.objective(sd.W, sd.H, sd.b).item() == pytest.approx(sd.f, abs=1e-14)
        assert max(t.abs().max().item() for t in u.grad(sd.W, sd.H, sd.b)) <= 1e-12
        ev = torch.linalg.eigvalsh(dense_hessian(u, sd.W, sd.H, sd.b))
        neg = ev[ev < -1e-9]
        assert neg.numel() == count
        torch.testing.assert_close(neg, torch.full((count,), sd.negative_eigenvalue,
                                                   dtype=F64), rtol=0, atol=1e-10)
        cert = U.certificate(u, sd.W, sd.H, sd.b)
        assert not cert.certified
        assert cert.sigma_max == pytest.approx(sd.sigma_1, rel=1e-10)
        nc = U.negative_curvature_direction(u, sd.W, sd.H, sd.b)
        assert nc.curvature == pytest.approx(2 * (math.sqrt(2e-4) - sd.sigma_1), abs=1e-12)
        assert nc.curvature == pytest.approx(nc.predicted, abs=1e-12)
        # dR = 0 along the direction: the quadratic form is GGN-free
        A, B, c = nc.direction
        gn = u.gauss_newton((sd.W, sd.H, sd.b), nc.direction)
        qg = dot(nc.direction, gn).item()
        assert qg == pytest.approx(u.lambda_W * (A**2).sum().item()
                                   + u.lambda_H * (B**2).sum().item(), rel=1e-10)


def test_saddle_escape_and_gradient_descent():
    u = U.UFM(4, 6, 3, 1e-2, 2e-2)
    f_star = U.global_minimizer(u).f_star
    sd = U.saddle(u, 1)
    g = gen(3)
    init = tuple(t + 1e-6 * torch.randn(t.shape, generator=g, dtype=F64)
                 for t in (sd.W, sd.H, sd.b))
    gd = U.gradient_descent(u, 4000, 1.0, init=init, record_every=500, record_metrics=True)
    assert gd.objective[0] == pytest.approx(sd.f, abs=1e-9)
    assert gd.steps[0] == 0 and gd.steps[-1] == 4000 and len(gd.steps) == len(gd.objective)
    assert gd.objective[-1] == pytest.approx(f_star, rel=1e-6)
    assert set(gd.metrics) == {"nc1_trace", "nc2_classifier", "nc3_gram"}
    assert all(len(v) == len(gd.steps) for v in gd.metrics.values())
    assert gd.metrics["nc2_classifier"][-1] <= 1e-3 and gd.metrics["nc3_gram"][-1] <= 1e-3


def test_gradient_descent_from_random_init_collapses():
    u = U.UFM(4, 5, 3, 5e-3, 5e-3, lambda_b=5e-3, bias="penalized")
    m = U.global_minimizer(u)
    r = U.gradient_descent(u, 3000, 1.0, generator=gen(0), record_every=1000,
                           record_metrics=True)
    assert r.steps == [0, 1000, 2000, 3000]
    assert all(a >= b for a, b in zip(r.objective, r.objective[1:]))
    assert r.objective[-1] == pytest.approx(m.f_star, rel=1e-7)
    assert r.metrics["nc1_trace"][-1] < 1e-6 < r.metrics["nc1_trace"][0]


def test_hessian_at_optimum_7_4():
    u = U.UFM(4, 6, 3, 1e-2, 2e-2, alpha=5.0, M=2.0)
    m = U.global_minimizer(u)
    ev = torch.linalg.eigvalsh(dense_hessian(u, m.W, m.H, m.b))
    assert ev.min() >= -1e-10
    assert int((ev.abs() < 1e-9).sum()) == 12
    for value, mult in ((1.620993, 8), (0.420248, 16), (0.03, 9), (0.01, 3), (0.02, 27)):
        assert int(((ev - value).abs() < 1e-6).sum()) >= mult, value


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,msg", [
    (dict(d=0), r"ncfast.ufm.UFM: d must be an int >= 1, got 0"),
    (dict(K=1), r"K must be an int >= 2, got 1"),
    (dict(n=0), r"n must be an int >= 1, got 0"),
    (dict(lambda_W=-1e-3), r"lambda_W must be > 0, got -0.001"),
    (dict(lambda_H=0.0), r"lambda_H must be > 0, got 0.0"),
    (dict(lambda_b=-1.0, bias="penalized"), r"lambda_b must be >= 0, got -1.0"),
    (dict(bias="penalized"), r"lambda_b must be > 0 when bias='penalized', got 0.0"),
    (dict(lambda_b=0.1), r"lambda_b must be 0 when bias='unpenalized'"),
    (dict(alpha=0.0), r"alpha must be > 0, got 0.0"),
    (dict(M=-2.0), r"M must be > 0, got -2.0"),
    (dict(bias="none"), r"bias must be 'unpenalized', 'penalized' or 'free', got 'none'"),
])
def test_constructor_errors(kw, msg):
    args = dict(K=3, d=4, n=2, lambda_W=1e-2, lambda_H=1e-2) | kw
    with pytest.raises(ValueError, match=msg):
        U.UFM(**args)


def test_shape_errors():
    u = U.UFM(3, 4, 2, 1e-2, 1e-2)
    W, H, b = u.random_init(gen(0))
    with pytest.raises(ValueError, match=r"ncfast.ufm.UFM.objective: W must have shape "
                                         r"\[3, 4\], got shape \[4, 3\]"):
        u.objective(W.T, H, b)
    with pytest.raises(ValueError, match=r"ncfast.ufm.UFM.grad: H must have shape \[4, 6\]"):
        u.grad(W, H[:, :5], b)
    with pytest.raises(ValueError, match=r"ncfast.ufm.UFM.grad: b must be a tensor"):
        u.grad(W, H, None)
    A, B, c = direction(u, 1)
    with pytest.raises(ValueError, match=r"ncfast.ufm.UFM.hvp: B must have shape \[4, 6\]"):
        u.hvp((W, H, b), (A, B.T, c))
    with pytest.raises(ValueError, match=r"ncfast.ufm.UFM.hvp: c must have shape \[2, 3\]"):
        A2, B2, _ = direction(u, 2, batch=(2,))
        u.hvp((W, H, b), (A2, B2, c))
    with pytest.raises(ValueError, match=r"H must have W's dtype"):
        u.objective(W, H.float(), b)
    uf = U.UFM(3, 4, 2, 1e-2, 1e-2, bias="free")
    with pytest.raises(ValueError, match=r"b must be None when bias='free'"):
        uf.objective(W, H, b)
    with pytest.raises(ValueError, match=r"W must have a null space"):
        U.negative_curvature_direction(U.UFM(3, 2, 2, 1e-2, 1e-2),
                                       *U.UFM(3, 2, 2, 1e-2, 1e-2).random_init(gen(0)))
    with pytest.raises(NotImplementedError, match="zero-point spectrum"):
        U.zero_point(uf)
    with pytest.raises(ValueError, match=r"S must be an int in \[0, K-2\]"):
        U.saddle(u, 2)


@pytest.mark.parametrize("bias", ["unpenalized", "free"])
def test_hvp_operator_reuses_the_point_and_matches_hvp(bias):
    u = U.UFM(4, 6, 3, 5e-3, 5e-3, alpha=3.0, M=2.5, bias=bias)
    gen = torch.Generator().manual_seed(11)
    point = u.random_init(gen)
    direction = u.random_init(gen)
    params = point if bias != "free" else point[:2]
    dirs = direction if bias != "free" else direction[:2]
    op = u.hvp_operator(params)
    for got, want in zip(op(dirs), u.hvp(params, dirs)):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    flat_v = u.flatten(*direction) if bias != "free" else u.flatten(*direction[:2])
    expected = u.flatten(*[t for t in u.hvp(params, dirs) if t is not None])
    torch.testing.assert_close(op.flat(flat_v), expected, rtol=1e-12, atol=1e-14)
    gn = u.hvp_operator(params, gauss_newton=True)
    for got, want in zip(gn(dirs), u.gauss_newton(params, dirs)):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("s", [0, 1, 2])
def test_lbfgs_escapes_saddles(s):
    # theory.md 4.5's escape test: from Z_S plus a 1e-6 perturbation, L-BFGS reaches f*.
    u = U.UFM(4, 6, 3, 1e-2, 2e-2)
    f_star = U.global_minimizer(u).f_star
    sad = U.saddle(u, s)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        init = tuple(t + 1e-6 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
                     for t in (sad.W, sad.H, sad.b))
        result = U.lbfgs(u, max_iter=600, init=init)
        assert result.objective[-1] == pytest.approx(f_star, rel=1e-9), seed


@pytest.mark.parametrize("max_iter", [1, 3])
def test_lbfgs_records_its_last_iterate_also_after_a_restart(max_iter):
    """Next to a saddle the iteration stalls and restarts the memory; when that is the last
    one, the path must still end at the point returned (res.f is f there)."""
    u = U.UFM(4, 6, 3, 1e-2, 2e-2)
    s = U.saddle(u, 1)
    g = gen(0)
    init = [t + 1e-6 * torch.randn(t.shape, generator=g, dtype=t.dtype) if t is not None
            else None for t in (s.W, s.H, s.b)]
    r = U.lbfgs(u, max_iter=max_iter, init=init)
    assert r.steps[-1] == max_iter
    assert r.f == float(u.objective(r.W, r.H, r.b))


def test_gradient_descent_that_diverges_says_so():
    """It surfaced as ClassStats' 'features must be finite' from the recorded metrics."""
    u = U.UFM(4, 6, 3, 1e2, 2e-2)
    with pytest.raises(ValueError, match=r"^ncfast.ufm.gradient_descent: the objective is "
                                         r"(inf|nan) at step \d+: the iteration diverged"):
        U.gradient_descent(u, steps=200, lr=0.5, record_every=50, record_metrics=True,
                           generator=gen(0))
