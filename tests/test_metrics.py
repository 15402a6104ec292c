"""NC metrics (ncfast.metrics) against ncfast.reference and direct float64 formulas written out
here (theory.md 5 and the fixtures of 7.6); errors for empty classes and bad shapes."""

import dataclasses
import math
import re
import statistics

import pytest
import torch

from ncfast import metrics, reference

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_data(counts, d, seed, spread=3.0, noise=1.0):
    """Features (N, d) float64 around random class means, labels shuffled; counts may hold 0."""
    g = gen(seed)
    K = len(counts)
    centres = spread * torch.randn(K, d, generator=g, dtype=F64)
    labels = torch.repeat_interleave(torch.arange(K), torch.tensor(counts))
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    features = centres[labels] + noise * torch.randn(labels.numel(), d, generator=g, dtype=F64)
    return features, labels


# --- direct formulas, one class and one pair at a time -----------------------------------------


def direct(features, labels, K, global_mean="weighted"):
    """μ_k, μ_G, Σ_W, Σ_B, v_k by explicit loops over the present classes (theory.md 5.2)."""
    h = features.to(F64)
    present = [k for k in range(K) if (labels == k).any()]
    mus = {k: h[labels == k].mean(0) for k in present}
    if global_mean == "weighted":
        mu_g = h.mean(0)
    else:
        mu_g = sum(mus.values()) / len(present)
    d = h.shape[1]
    sw = torch.zeros(d, d, dtype=F64)
    var = {}
    for k in present:
        c = h[labels == k] - mus[k]
        sw += c.T @ c
        var[k] = (c**2).sum().item() / c.shape[0]
    sw /= h.shape[0]
    sb = sum(torch.outer(mus[k] - mu_g, mus[k] - mu_g) for k in present) / len(present)
    return dict(present=present, mus=mus, mu_g=mu_g, sw=sw, sb=sb, var=var)


def direct_etf(A):
    K = A.shape[0]
    P = torch.eye(K, dtype=F64) - torch.full((K, K), 1.0 / K, dtype=F64)
    return torch.linalg.norm(A / torch.linalg.norm(A) - P / math.sqrt(K - 1)).item()


def pair_cosines(V):
    K = V.shape[0]
    return [
        (V[k] @ V[l] / (V[k].norm() * V[l].norm())).item()
        for k in range(K) for l in range(K) if k != l
    ]


def simplex_etf(K, d, seed):
    """K x d simplex ETF with unit rows: sqrt(K/(K-1)) P U^T, U d x K with orthonormal columns."""
    U, _ = torch.linalg.qr(torch.randn(d, K, generator=gen(seed), dtype=F64))
    P = torch.eye(K, dtype=F64) - 1.0 / K
    return math.sqrt(K / (K - 1)) * P @ U.T


# --- the oracle itself --------------------------------------------------------------------------


def test_reference_class_stats_match_loops():
    h, y = make_data([7, 3, 0, 12, 5], d=6, seed=1)
    s = reference.class_stats(h, y, 5)
    want = direct(h, y, 5)
    assert s.counts.tolist() == [7, 3, 0, 12, 5]
    for k in want["present"]:
        torch.testing.assert_close(s.means[k], want["mus"][k], rtol=1e-13, atol=1e-13)
        assert s.class_variances()[k].item() == pytest.approx(want["var"][k], rel=1e-12)
    torch.testing.assert_close(s.sigma_w(), want["sw"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(s.global_mean("weighted"), want["mu_g"], rtol=1e-13, atol=1e-13)
    unweighted = direct(h, y, 5, "unweighted")["mu_g"]
    torch.testing.assert_close(s.global_mean("unweighted"), unweighted, rtol=1e-13, atol=1e-13)
    assert isinstance(s, metrics.ClassStatistics)


# --- theory.md 7.6 fixtures ---------------------------------------------------------------------


def collapsed_etf(K=10, d=16, n=5, lam_w=5e-3, lam_h=5e-3):
    """Fixture 1: H = H̄ (x) 1_n^T with H̄ = sqrt(λ_W/(nλ_H)) W^T, W a simplex ETF."""
    W = simplex_etf(K, d, seed=2)
    Hbar = math.sqrt(lam_w / (n * lam_h)) * W.T  # d x K
    labels = torch.arange(K).repeat(n)  # interleaved classes
    return W, Hbar.T[labels], labels


def test_fixture1_collapsed_etf_all_zero():
    W, h, y = collapsed_etf()
    b = torch.randn(10, generator=gen(3), dtype=F64) * 0.05  # small: argmax stays the class
    s = reference.class_stats(h, y, 10, weight=W, bias=b)
    m = metrics.all_metrics(s, weight=W, bias=b)
    values = m.as_dict()
    assert set(values) == {
        "nc1", "nc1_trace", "nc2_means", "equinorm_means", "equiangularity_means",
        "max_angle_means", "cdnv", "nc2_classifier", "equinorm_classifier",
        "equiangularity_classifier", "max_angle_classifier", "nc3_gram", "nc3_dual",
        "bias_norm", "nc4",
    }
    values.pop("bias_norm")  # ‖W μ_G + b‖ = ‖b‖ here: not an NC metric
    for name, value in values.items():
        assert isinstance(value, float), name
        assert abs(value) <= 1e-12, (name, value)
    assert m.bias_norm == pytest.approx(b.norm().item(), rel=1e-12)
    # the standalone functions agree
    for value in (metrics.nc1(s), metrics.nc1_trace(s), metrics.nc2_means(s), metrics.cdnv(s),
                  metrics.nc2_classifier(W), metrics.nc3_gram(W, s), metrics.nc3_dual(W, s),
                  metrics.nc4(s), metrics.equinorm(W), metrics.max_angle(W)):
        assert abs(value) <= 1e-12


def test_fixture2_orthogonal_frame():
    K = 10
    W = torch.eye(K, dtype=F64)
    assert metrics.nc2_classifier(W) <= 1e-12
    uncentred = metrics.etf_distance(W @ W.T)
    assert uncentred == pytest.approx(0.320364, abs=1e-6)
    assert uncentred == pytest.approx(math.sqrt(2 - 2 * math.sqrt((K - 1) / K)), rel=1e-12)
    # NC3 with means at the orthogonal frame too: only the centred W sees the ETF
    y = torch.arange(K).repeat(4)
    s = reference.class_stats(torch.eye(K, dtype=F64)[y], y, K)
    assert metrics.nc3_gram(W, s) <= 1e-12
    assert metrics.nc3_dual(W, s) <= 1e-12
    assert metrics.nc3_dual(W, s, centred=False) == pytest.approx(uncentred, rel=1e-12)
    assert metrics.nc3_dual(W, s, centred=False, squared=True) == pytest.approx(
        uncentred**2, rel=1e-12
    )


@pytest.fixture(scope="module")
def conditioning_stats():
    """Fixture 3 (theory.md 5.8): K=10, d=512, n=500, class-mean entries N(0,1), within-class
    std 0.5, features stored in float32."""
    K, d, n = 10, 512, 500
    g = gen(0)
    y = torch.arange(K).repeat_interleave(n)
    h = torch.randn(K, d, generator=g, dtype=F64)[y] + 0.5 * torch.randn(K * n, d, generator=g,
                                                                         dtype=F64)
    return reference.class_stats(h.to(torch.float32), y, K)


def test_fixture3_sigma_b_conditioning(conditioning_stats):
    s = conditioning_stats
    value = metrics.nc1(s)
    # The value depends on the draw (about ±3% over seeds; its expectation is near
    # σ^2 (K-1)/(d-K) = 4.48e-3); theory.md quotes 4.49e-3 for its own draw.
    assert value == pytest.approx(4.49e-3, rel=1e-2)
    assert value == pytest.approx(reference.nc1_pinv(s), rel=1e-10)


def test_fixture3_float32_stats(conditioning_stats):
    """Statistics held in float32 (as a float32 accumulator would) still give the float64 answer
    to float32 accuracy: the rank cut never inverts Σ_B's rounding noise."""
    s = conditioning_stats
    s32 = reference.ReferenceClassStats(
        num_classes=s.num_classes, dim=s.dim, counts=s.counts, means=s.means.float(),
        within_cov=s.within_cov.float(), variances=s.variances.float(),
        total_mean=s.total_mean.float(),
    )
    assert metrics.nc1(s32) == pytest.approx(metrics.nc1(s), rel=1e-4)
    assert metrics.nc1_trace(s32) == pytest.approx(metrics.nc1_trace(s), rel=1e-5)


class ShiftedGlobalMean:
    """Stats whose global mean is off by a tiny vector, as a separately accumulated float32
    sum would be: M_c then has a spurious K-th direction that the rank-(K-1) cut must drop."""

    def __init__(self, stats, shift):
        self._stats, self._shift = stats, shift

    def __getattr__(self, name):
        return getattr(self._stats, name)

    def global_mean(self, kind="weighted"):
        return self._stats.global_mean(kind) + self._shift


def test_nc1_rank_cut_drops_a_spurious_direction():
    h, y = make_data([9, 31, 4, 17, 12], d=8, seed=4)
    s = reference.class_stats(h, y, 5)
    shifted = ShiftedGlobalMean(s, 1e-5 * torch.randn(8, generator=gen(4), dtype=F64))
    assert isinstance(shifted, metrics.ClassStatistics)
    # with this shift M_c has full rank K: inverting all K eigenvalues would be far off
    Mc = s.means - shifted.global_mean()
    g = torch.linalg.eigvalsh(Mc @ Mc.T)
    assert g[0] > 1e-12 * g[-1]
    assert metrics.nc1(shifted) == pytest.approx(reference.nc1_pinv(shifted), rel=1e-10)
    assert metrics.nc1(shifted) == pytest.approx(metrics.nc1(s), rel=1e-3)


# --- each metric against its direct formula -----------------------------------------------------

CASES = {  # name -> (class counts, d, seed)
    "K5-d8-balanced": ([20, 20, 20, 20, 20], 8, 20),
    "K5-d8-unbalanced": ([9, 31, 4, 17, 12], 8, 21),
    "K5-d3-unbalanced": ([9, 31, 4, 17, 12], 3, 22),  # d < K-1: Σ_B has full rank d
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def data(request):
    counts, d, seed = CASES[request.param]
    h, y = make_data(counts, d, seed=seed)
    return h, y, len(counts)


@pytest.mark.parametrize("global_mean", ["weighted", "unweighted"])
def test_nc1_and_trace_vs_direct(data, global_mean):
    h, y, K = data
    s = reference.class_stats(h, y, K)
    want = direct(h, y, K, global_mean)
    sb_pinv = torch.linalg.pinv(want["sb"], rtol=1e-9, hermitian=True)
    nc1_direct = (torch.trace(want["sw"] @ sb_pinv) / K).item()
    assert metrics.nc1(s, global_mean=global_mean) == pytest.approx(nc1_direct, rel=1e-10)
    tr = (torch.trace(want["sw"]) / torch.trace(want["sb"])).item()
    assert metrics.nc1_trace(s, global_mean=global_mean) == pytest.approx(tr, rel=1e-12)
    if global_mean == "weighted":
        assert metrics.nc1(s) == pytest.approx(reference.nc1_pinv(s), rel=1e-10)
    assert nc1_direct > 1e-3  # not a collapsed case


@pytest.mark.parametrize("global_mean", ["weighted", "unweighted"])
def test_nc2_nc3_angles_vs_direct(data, global_mean):
    h, y, K = data
    d = h.shape[1]
    W = torch.randn(K, d, generator=gen(5), dtype=F64)
    s = reference.class_stats(h, y, K)
    want = direct(h, y, K, global_mean)
    Mc = torch.stack([want["mus"][k] - want["mu_g"] for k in range(K)], 1)  # d x K
    Wc = W - W.mean(0)

    assert metrics.nc2_classifier(W) == pytest.approx(direct_etf(Wc @ Wc.T), rel=1e-12)
    assert metrics.nc2_means(s, global_mean) == pytest.approx(direct_etf(Mc.T @ Mc), rel=1e-12)
    assert metrics.nc3_gram(W, s, global_mean) == pytest.approx(direct_etf(Wc @ Mc), rel=1e-12)
    for centred, Wx in ((True, Wc), (False, W)):
        dual = torch.linalg.norm(Wx.T / torch.linalg.norm(Wx) - Mc / torch.linalg.norm(Mc))
        got = metrics.nc3_dual(W, s, centred=centred, global_mean=global_mean)
        assert got == pytest.approx(dual.item(), rel=1e-12)
        got2 = metrics.nc3_dual(W, s, centred=centred, squared=True, global_mean=global_mean)
        assert got2 == pytest.approx(dual.item() ** 2, rel=1e-12)

    for V in (Wc, Mc.T):
        norms = [v.norm().item() for v in V]
        assert metrics.equinorm(V) == pytest.approx(
            statistics.stdev(norms) / statistics.mean(norms), rel=1e-12
        )
        cos = pair_cosines(V)
        assert len(cos) == K * (K - 1)
        assert metrics.equiangularity(V) == pytest.approx(statistics.stdev(cos), rel=1e-10)
        mean_dev = sum(abs(c + 1 / (K - 1)) for c in cos) / len(cos)
        assert metrics.max_angle(V) == pytest.approx(mean_dev, rel=1e-12)

    m = metrics.all_metrics(s, weight=W, global_mean=global_mean)
    assert m.nc1 == metrics.nc1(s, global_mean)
    assert m.nc1_trace == metrics.nc1_trace(s, global_mean)
    assert m.nc2_means == metrics.nc2_means(s, global_mean)
    assert m.nc2_classifier == pytest.approx(metrics.nc2_classifier(W), rel=1e-14)
    assert m.nc3_gram == metrics.nc3_gram(W, s, global_mean)
    assert m.nc3_dual == metrics.nc3_dual(W, s, global_mean=global_mean)
    assert m.equinorm_means == pytest.approx(metrics.equinorm(Mc.T), rel=1e-12)
    assert m.equiangularity_classifier == pytest.approx(metrics.equiangularity(Wc), rel=1e-12)
    assert m.max_angle_means == pytest.approx(metrics.max_angle(Mc.T), rel=1e-12)
    assert m.cdnv == metrics.cdnv(s)
    assert m.bias_norm == metrics.bias_norm(W, None, s, global_mean)
    assert m.nc4 is None  # the stats were gathered without a classifier


def test_metrics_without_weight_are_none():
    h, y = make_data([6, 6, 6], d=4, seed=6)
    m = metrics.all_metrics(reference.class_stats(h, y, 3))
    for name in ("nc2_classifier", "equinorm_classifier", "equiangularity_classifier",
                 "max_angle_classifier", "nc3_gram", "nc3_dual", "bias_norm", "nc4"):
        assert getattr(m, name) is None, name
    assert m.nc1 > 0 and m.cdnv > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.nc1 = 0.0


@pytest.mark.parametrize("global_mean", ["weighted", "unweighted"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_bias_norm_vs_direct(global_mean, with_bias):
    h, y = make_data([9, 31, 4, 17, 12], d=6, seed=7)
    s = reference.class_stats(h, y, 5)
    g = gen(8)
    W = torch.randn(5, 6, generator=g, dtype=F64)
    b = torch.randn(5, generator=g, dtype=F64) if with_bias else None
    mu_g = direct(h, y, 5, global_mean)["mu_g"]
    want = sum(((W[k] @ mu_g).item() + (b[k].item() if with_bias else 0.0)) ** 2
               for k in range(5)) ** 0.5
    assert metrics.bias_norm(W, b, s, global_mean) == pytest.approx(want, rel=1e-12)
    assert metrics.all_metrics(s, W, b, global_mean).bias_norm == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("counts", [[5, 8, 3, 11, 6, 9, 4], [40] * 3], ids=["K7", "K3"])
def test_cdnv_tiled_vs_double_loop(counts):
    K = len(counts)
    h, y = make_data(counts, d=5, seed=9, spread=1.0)
    s = reference.class_stats(h, y, K)
    want = direct(h, y, K)
    total = 0.0
    for k in range(K):
        for l in range(K):
            if k != l:
                dist2 = ((want["mus"][k] - want["mus"][l]) ** 2).sum().item()
                total += (want["var"][k] + want["var"][l]) / (2 * dist2)
    loop = total / (K * (K - 1))
    untiled = metrics.cdnv(s)
    assert untiled == pytest.approx(loop, rel=1e-12)
    for tile in (1, 2, 3, K):
        assert metrics.cdnv(s, tile=tile) == pytest.approx(untiled, rel=1e-13)


def test_nc4_vs_direct_count():
    K, d = 6, 5
    h, y = make_data([10, 14, 7, 12, 9, 8], d=d, seed=10, spread=1.0)
    g = gen(11)
    W = torch.randn(K, d, generator=g, dtype=F64)
    b = torch.randn(K, generator=g, dtype=F64)
    s = reference.class_stats(h, y, K, weight=W, bias=b)
    want = direct(h, y, K)
    mismatches = 0
    for i in range(h.shape[0]):
        dists = [((h[i] - want["mus"][k]) ** 2).sum().item() for k in range(K)]
        logits = [(W[k] @ h[i] + b[k]).item() for k in range(K)]
        mismatches += dists.index(min(dists)) != logits.index(max(logits))
    assert 0 < mismatches < h.shape[0]
    assert metrics.nc4(s) == mismatches / h.shape[0]
    assert metrics.all_metrics(s, W, b).nc4 == mismatches / h.shape[0]


def test_nc4_needs_counts():
    h, y = make_data([5, 5, 5], d=4, seed=12)
    s = reference.class_stats(h, y, 3)
    msg = "ncfast.metrics.nc4: stats carry no NC4 count (nc4_mismatches / nc4_total are missing"
    with pytest.raises(ValueError, match=re.escape(msg)):
        metrics.nc4(s)


# --- empty classes and classes= -----------------------------------------------------------------

EMPTY_COUNTS = [6, 9, 5, 0, 8, 7, 11, 0]  # classes 3 and 7 empty
PRESENT = [0, 1, 2, 4, 5, 6]


@pytest.fixture(scope="module")
def with_empty():
    """Stats with empty classes 3 and 7, and the same data relabelled 0..5 without them."""
    h, y = make_data(EMPTY_COUNTS, d=7, seed=13)
    g = gen(14)
    W = torch.randn(8, 7, generator=g, dtype=F64)
    b = torch.randn(8, generator=g, dtype=F64)
    compact = torch.tensor([PRESENT.index(k) if k in PRESENT else -1 for k in range(8)])[y]
    return dict(
        s=reference.class_stats(h, y, 8), W=W, b=b,
        compact=reference.class_stats(h, compact, 6), Wc=W[PRESENT], bc=b[PRESENT], h=h, y=y,
    )


EMPTY_CALLS = {
    "nc1": lambda e, **kw: metrics.nc1(e["s"], **kw),
    "nc1_trace": lambda e, **kw: metrics.nc1_trace(e["s"], **kw),
    "nc2_means": lambda e, **kw: metrics.nc2_means(e["s"], **kw),
    "nc3_gram": lambda e, **kw: metrics.nc3_gram(e["W"], e["s"], **kw),
    "nc3_dual": lambda e, **kw: metrics.nc3_dual(e["W"], e["s"], **kw),
    "cdnv": lambda e, **kw: metrics.cdnv(e["s"], **kw),
    "all_metrics": lambda e, **kw: metrics.all_metrics(e["s"], e["W"], e["b"], **kw),
    "bias_norm": lambda e, **kw: metrics.bias_norm(e["W"], e["b"], e["s"], "unweighted", **kw),
}


@pytest.mark.parametrize("name", list(EMPTY_CALLS))
def test_empty_classes_are_named(with_empty, name):
    msg = f"ncfast.metrics.{name}: classes [3, 7] have no samples; pass classes=... or fill them"
    with pytest.raises(metrics.EmptyClassError, match=re.escape(msg)) as info:
        EMPTY_CALLS[name](with_empty)
    assert info.value.classes == [3, 7]
    assert isinstance(info.value, ValueError)
    # a selection that still holds an empty class names only that one
    with pytest.raises(metrics.EmptyClassError, match=re.escape("classes [7] have no samples")):
        EMPTY_CALLS[name](with_empty, classes=[0, 1, 7])


def test_bias_norm_allows_empty_classes_with_weighted_mean(with_empty):
    e = with_empty
    want = torch.linalg.norm(e["W"] @ e["h"].mean(0) + e["b"]).item()
    assert metrics.bias_norm(e["W"], e["b"], e["s"]) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "classes",
    [torch.tensor(PRESENT), PRESENT, torch.tensor([k in PRESENT for k in range(8)]),
     torch.tensor(PRESENT, dtype=torch.int32)],
    ids=["tensor", "list", "mask", "int32"],
)
@pytest.mark.parametrize("global_mean", ["weighted", "unweighted"])
def test_classes_leaving_out_empty_equals_compact(with_empty, classes, global_mean):
    e = with_empty
    got = metrics.all_metrics(e["s"], e["W"], e["b"], global_mean, classes=classes).as_dict()
    want = metrics.all_metrics(e["compact"], e["Wc"], e["bc"], global_mean).as_dict()
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(want[name], rel=1e-10, abs=1e-14), name
    assert got["nc1"] > 1e-3
    assert metrics.nc1(e["s"], global_mean, classes=classes) == pytest.approx(
        metrics.nc1(e["compact"], global_mean), rel=1e-10
    )
    assert metrics.bias_norm(e["W"], e["b"], e["s"], global_mean, classes=classes) == (
        pytest.approx(metrics.bias_norm(e["Wc"], e["bc"], e["compact"], global_mean), rel=1e-12)
    )


def test_classes_any_subset_where_sigma_w_allows(with_empty):
    """nc1_trace, nc2_means and cdnv restrict to any subset exactly (they need no pooled Σ_W);
    nc1 refuses to leave out a class that has samples."""
    e = with_empty
    keep = [1, 4, 6]
    mask = torch.isin(e["y"], torch.tensor(keep))
    relabel = torch.tensor([keep.index(k) if k in keep else -1 for k in range(8)])
    sub = reference.class_stats(e["h"][mask], relabel[e["y"][mask]], 3)
    for gm in ("weighted", "unweighted"):
        assert metrics.nc1_trace(e["s"], gm, classes=keep) == pytest.approx(
            metrics.nc1_trace(sub, gm), rel=1e-12)
        assert metrics.nc2_means(e["s"], gm, classes=keep) == pytest.approx(
            metrics.nc2_means(sub, gm), rel=1e-10)
    assert metrics.cdnv(e["s"], classes=keep) == pytest.approx(metrics.cdnv(sub), rel=1e-12)
    msg = ("ncfast.metrics.nc1: classes leaves out classes [0, 2, 5] that have samples; the "
           "pooled Σ_W covers every sample")
    with pytest.raises(ValueError, match=re.escape(msg)):
        metrics.nc1(e["s"], classes=keep)


# --- argument errors ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    h, y = make_data([4, 5, 6, 7, 8], d=8, seed=15)
    return reference.class_stats(h, y, 5)


def W_(*shape):
    return torch.randn(*shape, generator=gen(16), dtype=F64)


P = "ncfast.metrics."
ARG_ERRORS = {
    "nc3_gram-W-cols": (
        lambda s: metrics.nc3_gram(W_(5, 7), s), ValueError,
        "nc3_gram: W must have shape [num_classes, dim] = [5, 8] to match the stats, "
        "got shape [5, 7]"),
    "nc3_dual-W-rows": (
        lambda s: metrics.nc3_dual(W_(4, 8), s), ValueError,
        "nc3_dual: W must have shape [num_classes, dim] = [5, 8] to match the stats, "
        "got shape [4, 8]"),
    "bias_norm-W-1d": (
        lambda s: metrics.bias_norm(W_(8), None, s), ValueError,
        "bias_norm: W must have shape [num_classes, dim] = [5, 8] to match the stats, "
        "got shape [8]"),
    "bias_norm-b-len": (
        lambda s: metrics.bias_norm(W_(5, 8), W_(4), s), ValueError,
        "bias_norm: b must have shape [num_classes] = [5] to match the stats, got shape [4]"),
    "bias_norm-b-2d": (
        lambda s: metrics.bias_norm(W_(5, 8), W_(5, 1), s), ValueError,
        "bias_norm: b must have shape [num_classes] = [5] to match the stats, "
        "got shape [5, 1]"),
    "all_metrics-weight": (
        lambda s: metrics.all_metrics(s, W_(8, 5)), ValueError,
        "all_metrics: weight must have shape [num_classes, dim] = [5, 8] to match the stats, "
        "got shape [8, 5]"),
    "all_metrics-bias": (
        lambda s: metrics.all_metrics(s, W_(5, 8), W_(6)), ValueError,
        "all_metrics: bias must have shape [num_classes] = [5] to match the stats, "
        "got shape [6]"),
    "all_metrics-bias-alone": (
        lambda s: metrics.all_metrics(s, bias=W_(5)), ValueError,
        "all_metrics: bias was given without weight"),
    "nc3_gram-W-not-tensor": (
        lambda s: metrics.nc3_gram([[1.0] * 8] * 5, s), TypeError,
        "nc3_gram: W must be a tensor, got list"),
    "nc3_gram-W-complex": (
        lambda s: metrics.nc3_gram(W_(5, 8).to(torch.complex128), s), TypeError,
        "nc3_gram: W must have a real numeric dtype, got torch.complex128"),
    "nc2_classifier-1-row": (
        lambda s: metrics.nc2_classifier(W_(1, 8)), ValueError,
        "nc2_classifier: W must be 2-D (classes, dim) with at least 2 rows, got shape [1, 8]"),
    "etf_distance-not-square": (
        lambda s: metrics.etf_distance(W_(3, 4)), ValueError,
        "etf_distance: A must be square (K, K) with K >= 2, got shape [3, 4]"),
    "etf_distance-zero": (
        lambda s: metrics.etf_distance(torch.zeros(3, 3)), ValueError,
        "etf_distance: A must not be zero (its Frobenius norm is 0)"),
    "equiangularity-zero-row": (
        lambda s: metrics.equiangularity(torch.cat([W_(2, 3), torch.zeros(1, 3, dtype=F64)])),
        ValueError, "equiangularity: vectors rows [2] have norm 0; their angles are undefined"),
    "nc1-global_mean": (
        lambda s: metrics.nc1(s, global_mean="median"), ValueError,
        "nc1: global_mean must be 'weighted' or 'unweighted', got 'median'"),
    "nc1-classes-range": (
        lambda s: metrics.nc1(s, classes=[0, 5, -1]), ValueError,
        "nc1: classes must be in [0, 5), got [5, -1]"),
    "nc1-classes-repeat": (
        lambda s: metrics.nc1(s, classes=[0, 1, 1]), ValueError,
        "nc1: classes must not repeat, got [1] more than once"),
    "nc2_means-one-class": (
        lambda s: metrics.nc2_means(s, classes=[2]), ValueError,
        "nc2_means: needs at least 2 classes, got 1"),
    "nc1-classes-float": (
        lambda s: metrics.nc1(s, classes=[0.0, 1.0]), ValueError,
        "nc1: classes must be a 1-D integer tensor of class indices, got 1-D torch.float32 "
        "tensor"),
    "nc1-classes-mask-length": (
        lambda s: metrics.nc1(s, classes=torch.ones(4, dtype=torch.bool)), ValueError,
        "nc1: classes given as a boolean mask must have shape [5], got shape [4]"),
    "cdnv-tile": (
        lambda s: metrics.cdnv(s, tile=0), ValueError, "cdnv: tile must be an int >= 1, got 0"),
    "nc1-not-stats": (
        lambda s: metrics.nc1(torch.zeros(3)), TypeError,
        "nc1: stats must follow ncfast.metrics.ClassStatistics (no attribute 'num_classes'), "
        "got Tensor"),
}


@pytest.mark.parametrize("name", list(ARG_ERRORS))
def test_argument_errors(small, name):
    call, exc, msg = ARG_ERRORS[name]
    with pytest.raises(exc, match="^" + re.escape(P + msg) + "$"):
        call(small)


def test_coincident_means_are_reported():
    y = torch.arange(3).repeat(4)
    h = torch.randn(12, 4, generator=gen(17), dtype=F64)
    h[y == 2] = h[y == 0]  # classes 0 and 2 share their samples, hence their mean
    s = reference.class_stats(h, y, 3)
    with pytest.raises(ValueError, match=re.escape("cdnv: classes [0, 2] have the same mean")):
        metrics.cdnv(s)


def test_all_metrics_reports_undefined_metrics_by_name_when_asked():
    y = torch.arange(3).repeat(4)
    h = torch.randn(12, 4, generator=gen(17), dtype=F64)
    h[y == 2] = h[y == 0]
    s = reference.class_stats(h, y, 3)
    W = torch.randn(3, 4, generator=gen(18), dtype=F64)
    with pytest.raises(ValueError, match=re.escape("classes [0, 2] have the same mean")):
        metrics.all_metrics(s, W)
    m = metrics.all_metrics(s, W, undefined="none")
    assert m.cdnv is None and set(m.undefined) == {"cdnv"}
    assert "classes [0, 2] have the same mean" in m.undefined["cdnv"]
    assert isinstance(m.nc1, float) and isinstance(m.nc3_dual, float)
    assert "undefined" not in m.as_dict()
    with pytest.raises(ValueError, match=r"undefined must be 'raise' or 'none', got 'skip'"):
        metrics.all_metrics(s, W, undefined="skip")
