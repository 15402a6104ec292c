"""The metrics of the NC literature's reference code beyond NC1-NC4 (theory.md 5.10-5.12): CDNV
with a distance exponent, GNC2, the interference grid, per-class duality vectors, UNC3, NC5, the
cosine margin, nearest-class-mean accuracy and the nuclear/Frobenius ratio, each against a
float64 two-pass reference written out here from the features, on collapsed, unbalanced and
one-sample-class data, from streamed and merged statistics."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import ncfast
from ncfast import metrics, reference

F64 = torch.float64
DATA = {  # class counts; "collapsed": within-class spread 1e-6 of the means' scale
    "collapsed": ([6, 6, 6, 6, 6, 6], 1e-6),
    "unbalanced": ([40, 3, 17, 90, 8, 25], 0.7),
    "one-sample-class": ([1, 12, 1, 30, 5, 9], 0.7),
}


def make(name, d=7, seed=0):
    counts, noise = DATA[name]
    g = torch.Generator().manual_seed(seed)
    K = len(counts)
    centres = 2.0 * torch.randn(K, d, generator=g, dtype=F64) + 0.5
    labels = torch.repeat_interleave(torch.arange(K), torch.tensor(counts))
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    h = centres[labels] + noise * torch.randn(labels.numel(), d, generator=g, dtype=F64)
    W = torch.randn(K, d, generator=g, dtype=F64)
    ood = 0.3 * torch.randn(50, d, generator=g, dtype=F64) + torch.randn(d, generator=g,
                                                                        dtype=F64)
    return h, labels, W, ood


def streamed(h, y, K):
    """ClassStats in float64 over batches of 7, in two halves merged (exact across merge)."""
    halves = []
    for part in (slice(0, len(y) // 2), slice(len(y) // 2, None)):
        s = ncfast.ClassStats(K, h.shape[1], dtype=F64)
        for i in range(0, len(y[part]), 7):
            s.update(h[part][i:i + 7], y[part][i:i + 7])
        halves.append(s)
    return halves[0].merge(halves[1])


# --- the two-pass references ---------------------------------------------------------------------

def two_pass(h, y, K):
    means = torch.stack([h[y == k].mean(0) for k in range(K)])
    v = torch.stack([((h[y == k] - means[k]) ** 2).sum(1).mean() for k in range(K)])
    return means, h.mean(0), v


def pairs(K):
    return [(k, l) for k in range(K) for l in range(k + 1, K)]


def ref_cdnv(means, v, p):
    return sum(((v[k] + v[l]) / 2 / ((means[k] - means[l]).norm() ** 2) ** p).item()
               for k, l in pairs(len(means))) / len(pairs(len(means)))


def ref_gnc2(means, mu_g):
    U = F.normalize(means - mu_g, dim=1)
    dist = torch.tensor([(U[k] - U[l]).norm().item() for k, l in pairs(len(U))], dtype=F64)
    s = U.shape[1] - 2
    values = {"distance": dist, "log": torch.log(1 / dist), "riesz": dist ** (-s)}
    return {name: (x.mean().item(), x.var(unbiased=False).item()) for name, x in values.items()}


def ref_margins(h, y, W, mu_g, official):
    Wc = W - W.mean(0)
    x = h if official else h - mu_g
    num = x @ (W if official else Wc).T
    cos = num / ((h - mu_g).norm(dim=1)[:, None] * Wc.norm(dim=1)[None, :])
    true = cos.gather(1, y[:, None]).squeeze(1)
    others = cos.masked_fill(F.one_hot(y, W.shape[0]).bool(), -math.inf).max(1).values
    return true - others


def ref_nf(h, y, K, centred, classes):
    out = []
    for k in classes:
        X = h[y == k]
        if centred:
            X = X - X.mean(0)
        out.append((torch.linalg.svdvals(X).sum() / torch.linalg.matrix_norm(X)).item())
    return sum(out) / len(out)


@pytest.fixture(params=list(DATA), ids=list(DATA))
def case(request):
    h, y, W, ood = make(request.param)
    K = int(y.max()) + 1
    return dict(name=request.param, h=h, y=y, W=W, ood=ood, K=K, stats=streamed(h, y, K),
                ref=two_pass(h, y, K))


# --- pairs of classes -----------------------------------------------------------------------

@pytest.mark.parametrize("tile", [2, None], ids=["tile-2", "tile-auto"])
def test_cdnv_with_exponent_and_gnc2_match_two_pass(case, tile):
    means, mu_g, v = case["ref"]
    s = case["stats"]
    for p in (1.0, 2.0, 0.5):
        assert metrics.cdnv(s, tile=tile, distance_exponent=p) == pytest.approx(
            ref_cdnv(means, v, p), rel=1e-9, abs=1e-300), p
    got = metrics.gnc2(s, tile=tile)
    for name, (mean, var) in ref_gnc2(means, mu_g).items():
        assert got[name].mean == pytest.approx(mean, rel=1e-9), name
        assert got[name].variance == pytest.approx(var, rel=1e-7, abs=1e-14 * mean**2), name


@pytest.mark.parametrize("cosine", [False, True], ids=["inner", "cosine"])
def test_interference_grid_tiles_match_two_pass(case, cosine):
    means, mu_g, _ = case["ref"]
    X = means - mu_g
    if cosine:
        X = F.normalize(X, dim=1)
    want = X @ X.T
    grid = metrics.interference_grid(case["stats"], tile=4, cosine=cosine, dtype=F64)
    torch.testing.assert_close(grid, want, rtol=1e-10, atol=1e-12)
    blocks = list(metrics.interference_tiles(case["stats"], tile=4, cosine=cosine))
    assert [r0 for r0, _ in blocks] == [0, 4] and blocks[0][1].shape == (4, case["K"])


def test_riesz_energy_beyond_float64_is_kept_in_scale():
    """d = 600, two classes with nearly the same direction: ‖u_k - u_l‖^-(d-2) overflows
    float64. A smaller s gives the right mean and variance (both far beyond float64's range
    for the raw squares); the reference's s = d - 2 gives inf, not NaN."""
    d = 600
    g = torch.Generator().manual_seed(4)
    v, w, a, b = 3 * F.normalize(torch.randn(4, d, generator=g, dtype=F64), dim=1)
    means = torch.stack([v + 0.05 * a, v + 0.05 * b, -v, w, -w])
    labels = torch.arange(5).repeat(2)
    h = means[labels] + 0.01 * torch.randn(10, d, generator=g, dtype=F64)
    s = reference.class_stats(h, labels, 5)
    got = metrics.gnc2(s, kernels="riesz", riesz_s=150.0, tile=2)["riesz"]
    U = F.normalize(s.means - s.global_mean(), dim=1)
    dist = torch.stack([(U[k] - U[l]).norm() for k, l in pairs(5)])
    want = dist ** -150.0
    assert 1e100 < want.max() < 1e150
    assert got.mean == pytest.approx(want.mean().item(), rel=1e-9)
    assert got.variance == pytest.approx(want.var(unbiased=False).item(), rel=1e-7)
    assert metrics.gnc2(s, kernels="riesz")["riesz"] == (math.inf, math.inf)  # s = 598


def test_riesz_kernel_at_s_zero_is_one_as_in_the_reference_library():
    """s = 0 (the default at d = 2): the reference library's sign(s) is copysign(1, s), so the
    kernel is r^0 = 1 for every pair (theory.md 5.10), never 0; -0.0 is the same s."""
    h, y, _, _ = make("unbalanced", d=2)
    assert metrics.gnc2(reference.class_stats(h, y, 6), kernels="riesz")["riesz"] == (1.0, 0.0)
    s = reference.class_stats(*make("unbalanced")[:2], 6)
    for zero in (0.0, -0.0, 0):
        assert metrics.gnc2(s, kernels="riesz", riesz_s=zero)["riesz"] == (1.0, 0.0), zero


# --- the classifier against the class means, and NC5 -------------------------------------------

def test_class_vectors_unc3_and_nc5_match_two_pass(case):
    means, mu_g, _ = case["ref"]
    s, W = case["stats"], case["W"]
    Mc = means - mu_g
    dots = (W * Mc).sum(1)
    cosines = F.cosine_similarity(W, Mc, dim=1)
    torch.testing.assert_close(metrics.class_similarities(W, s), dots, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics.class_similarities(W, s, cosine=True), cosines,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics.class_distances(W, s),
                               (F.normalize(W, dim=1) - F.normalize(Mc, dim=1)).norm(dim=1),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics.class_distances(W, s, normalized=False),
                               (W - Mc).norm(dim=1), rtol=1e-10, atol=1e-12)
    assert metrics.unc3(W, s) == pytest.approx(dots.var().item(), rel=1e-9)
    assert metrics.unc3(W, s, cosine=True) == pytest.approx(cosines.var().item(), rel=1e-9)

    ood = case["ood"]
    first, second = metrics.FeatureMean(ood.shape[1]), metrics.FeatureMean(ood.shape[1])
    first.update(ood[:13])
    second.update(ood[13:])
    ood_mean = first.merge(second).mean
    torch.testing.assert_close(ood_mean, ood.mean(0), rtol=1e-13, atol=1e-14)
    want = F.cosine_similarity(means, ood.mean(0)[None], dim=1).abs().mean().item()
    assert metrics.nc5(s, ood_mean) == pytest.approx(want, rel=1e-10)
    want = F.cosine_similarity(Mc, (ood.mean(0) - mu_g)[None], dim=1).abs().mean().item()
    assert metrics.nc5(s, ood_mean, centred=True) == pytest.approx(want, rel=1e-10)


# --- the second pass over the samples -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["centred", "official"])
def test_per_sample_stats_match_two_pass_across_merge(case, kind):
    h, y, W, K = case["h"], case["y"], case["W"], case["K"]
    means, mu_g, _ = case["ref"]
    s = case["stats"]
    parts = []
    for part in (slice(0, 10), slice(10, None)):
        p = metrics.PerSampleStats(s, W, class_scatter=True, margin=kind, keep_margins=True,
                                   margin_bins=40, dtype=F64)
        for i in range(0, len(y[part]), 9):
            p.update(h[part][i:i + 9], y[part][i:i + 9])
        parts.append(p)
    p = parts[0].merge(parts[1])
    want = ref_margins(h, y, W, mu_g, official=kind == "official")
    assert p.count == len(y)
    assert p.cosine_margin() == pytest.approx(want.mean().item(), rel=1e-10, abs=1e-13)
    torch.testing.assert_close(p.margins(), want.sort().values, rtol=1e-10, atol=1e-13)
    edges, counts = p.margin_histogram()
    want_counts = torch.bincount(((want + 2) * 10).floor().long().clamp(0, 39), minlength=40)
    assert counts.tolist() == want_counts.tolist() and edges[0] == -2 and edges[-1] == 2
    nearest = torch.cdist(h, means).argmin(1)
    assert p.ncc_accuracy() == pytest.approx((nearest == y).double().mean().item())
    assert p.nf_ratio(centred=False) == pytest.approx(
        ref_nf(h, y, K, False, range(K)), rel=1e-7)
    spread = [k for k in range(K) if (y == k).sum() > 1]
    assert p.nf_ratio(classes=spread) == pytest.approx(ref_nf(h, y, K, True, spread), rel=1e-6)
    single = [k for k in range(K) if (y == k).sum() == 1]
    if single:
        with pytest.raises(ValueError, match=re.escape(
                f"nf_ratio: classes {single} have no spread; their ratio is undefined")):
            p.nf_ratio()
    else:
        assert p.nf_ratio() == pytest.approx(ref_nf(h, y, K, True, range(K)), rel=1e-6)


def test_float32_state_matches_the_float64_reference():
    h, y, W, _ = make("unbalanced", d=32)
    s = ncfast.ClassStats(6, 32)
    s.update(h.float(), y)
    p = metrics.PerSampleStats(s, W.float(), class_scatter=True)
    p.update(h.float(), y)
    ref = reference.class_stats(h, y, 6)
    want = ref_margins(h, y, W, ref.global_mean(), official=False).mean().item()
    assert p.cosine_margin() == pytest.approx(want, rel=1e-5)
    assert p.nf_ratio() == pytest.approx(ref_nf(h, y, 6, True, range(6)), rel=1e-5)
    assert metrics.gnc2(s)["log"].mean == pytest.approx(metrics.gnc2(ref)["log"].mean, rel=1e-5)


def test_float32_nearest_means_under_a_large_common_offset():
    """Nearest class means about μ_G: about the origin, float32 rounding of ||μ_k||^2 - 2 h.μ_k
    (0.3 at offset 100, d = 256) swamped the classes' distances and NCC accuracy read 0.34."""
    g = torch.Generator().manual_seed(0)
    K, d, n = 10, 256, 40
    centres = 0.05 * torch.randn(K, d, generator=g, dtype=F64)
    y = torch.arange(K).repeat_interleave(n)
    h = (100.0 + centres[y] + 0.01 * torch.randn(K * n, d, generator=g, dtype=F64)).float()
    s = ncfast.ClassStats(K, d)
    s.update(h, y)
    p = metrics.PerSampleStats(s)
    p.update(h, y)
    nearest = torch.cdist(h.double(), reference.class_stats(h, y, K).means).argmin(1)
    assert p.ncc_accuracy() == (nearest == y).double().mean().item() == 1.0


def test_collapsed_simplex_etf_values():
    """Features on a simplex ETF, W the centred means: uniform pairs (zero variance), perfect
    duality (UNC3 = 0, distances 0), margin K/(K-1), NCC exact, rank-one classes."""
    K, d, n = 5, 8, 3
    U, _ = torch.linalg.qr(torch.randn(d, K, generator=torch.Generator().manual_seed(1),
                                       dtype=F64))
    etf = math.sqrt(K / (K - 1)) * (torch.eye(K, dtype=F64) - 1.0 / K) @ U.T
    y = torch.arange(K).repeat(n)
    h = etf[y]
    s = reference.class_stats(h, y, K)
    g = metrics.gnc2(s)
    assert g["distance"].mean == pytest.approx(math.sqrt(2 * K / (K - 1)), rel=1e-12)
    for name in g:
        assert g[name].variance == pytest.approx(0.0, abs=1e-12), name
    assert metrics.unc3(etf, s) == pytest.approx(0.0, abs=1e-14)
    assert metrics.class_distances(etf, s).abs().max().item() < 1e-12
    p = metrics.PerSampleStats(s, etf, class_scatter=True, dtype=F64)
    p.update(h, y)
    assert p.cosine_margin() == pytest.approx(K / (K - 1), rel=1e-12)
    assert p.ncc_accuracy() == 1.0
    assert p.nf_ratio(centred=False) == pytest.approx(1.0, rel=1e-12)


# --- errors ---------------------------------------------------------------------------------------

def test_bad_batch_leaves_the_second_pass_state_as_it_was():
    h, y, W, _ = make("unbalanced")
    s = reference.class_stats(h, y, 6)
    p = metrics.PerSampleStats(s, W, class_scatter=True, keep_margins=True, dtype=F64)
    p.update(h[:20], y[:20])
    before = (p.cosine_margin(), p.ncc_accuracy(), p.nf_ratio(centred=False), p.count)
    bad = y[20:30].clone()
    bad[3] = 6
    with pytest.raises(ValueError, match=re.escape("PerSampleStats.update: labels must be in "
                                                   "[0, 6), got 6")):
        p.update(h[20:30], bad)
    nan = h[20:30].clone()
    nan[2, 1] = math.nan
    with pytest.raises(ValueError, match="features must be finite, got a NaN or Inf in row 2"):
        p.update(nan, y[20:30])
    assert (p.cosine_margin(), p.ncc_accuracy(), p.nf_ratio(centred=False), p.count) == before
    assert p.margins().numel() == 20


def _nf_ratio(stats, classes):
    h, y, _, _ = make("unbalanced")
    p = metrics.PerSampleStats(stats, class_scatter=True, dtype=F64)
    p.update(h, y)
    return p.nf_ratio(classes=classes)


_NF = "ncfast.metrics.PerSampleStats.nf_ratio: classes must "
ERRORS = {
    # nf_ratio's classes follow the metrics' rules (a -1 was read as the last class, a 6 or a
    # repeat was an IndexError or counted twice, an empty selection gave NaN)
    "nf-negative": (lambda s, W: _nf_ratio(s, [0, -1]), ValueError, _NF + "be in [0, 6), got [-1]"),
    "nf-too-large": (lambda s, W: _nf_ratio(s, [6]), ValueError, _NF + "be in [0, 6), got [6]"),
    "nf-repeat": (lambda s, W: _nf_ratio(s, [2, 2]), ValueError,
                  _NF + "not repeat, got [2] more than once"),
    "nf-float": (lambda s, W: _nf_ratio(s, [0.5]), ValueError,
                 _NF + "be a 1-D integer tensor of class indices, got 1-D torch.float32 tensor"),
    "nf-empty": (lambda s, W: _nf_ratio(s, []), ValueError, _NF + "select at least one class"),
    "gnc2-kernel": (lambda s, W: metrics.gnc2(s, kernels=("cosine",)), ValueError,
                    "ncfast.metrics.gnc2: kernels must be a non-empty subset of ['distance', "
                    "'log', 'riesz'], got ['cosine']"),
    "gnc2-tile": (lambda s, W: metrics.gnc2(s, tile=0), ValueError,
                  "ncfast.metrics.gnc2: tile must be an int >= 1, got 0"),
    # a NaN exponent gave a Riesz energy of -inf with a variance of -inf; a string was read
    "gnc2-riesz-nan": (lambda s, W: metrics.gnc2(s, riesz_s=math.nan), ValueError,
                       "ncfast.metrics.gnc2: riesz_s must be a finite number or None (d - 2), "
                       "got nan"),
    "gnc2-riesz-str": (lambda s, W: metrics.gnc2(s, riesz_s="2"), ValueError,
                       "ncfast.metrics.gnc2: riesz_s must be a finite number or None (d - 2), "
                       "got '2'"),
    "nc5-nan": (lambda s, W: metrics.nc5(s, torch.full((7,), math.nan)), ValueError,
                "ncfast.metrics.nc5: ood_mean must be finite, got a NaN or Inf"),  # it was NaN
    "cdnv-exponent": (lambda s, W: metrics.cdnv(s, distance_exponent=0), ValueError,
                      "ncfast.metrics.cdnv: distance_exponent must be a finite number > 0, "
                      "got 0"),
    "nc5-shape": (lambda s, W: metrics.nc5(s, torch.ones(3)), ValueError,
                  "ncfast.metrics.nc5: ood_mean must have shape [dim] = [7], got shape [3]"),
    "nc5-zero": (lambda s, W: metrics.nc5(s, torch.zeros(7)), ValueError,
                 "ncfast.metrics.nc5: the OOD mean is zero; its direction is undefined"),
    "unc3-weight": (lambda s, W: metrics.unc3(W[:, :3], s), ValueError,
                    "ncfast.metrics.unc3: W must have shape [num_classes, dim] = [6, 7] to "
                    "match the stats, got shape [6, 3]"),
    "margin-kind": (lambda s, W: metrics.PerSampleStats(s, W, margin="raw"), ValueError,
                    "ncfast.metrics.PerSampleStats: margin must be 'centred' or 'official', "
                    "got 'raw'"),
    "no-weight": (lambda s, W: metrics.PerSampleStats(s).cosine_margin(), ValueError,
                  "ncfast.metrics.PerSampleStats.cosine_margin: built without weight"),
    # a generator checked its arguments only at the first block, not at the call
    "interference-tiles-eager": (lambda s, W: metrics.interference_tiles(s, tile=0), ValueError,
                                 "ncfast.metrics.interference_tiles: tile must be an int >= 1, "
                                 "got 0"),
    "interference-dtype": (lambda s, W: metrics.interference_grid(s, dtype=torch.int64),
                           TypeError, "ncfast.metrics.interference_grid: dtype must be "
                           "torch.float32 or torch.float64, got torch.int64"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_argument_errors(name):
    h, y, W, _ = make("unbalanced")
    call, exc, msg = ERRORS[name]
    with pytest.raises(exc, match="^" + re.escape(msg) + "$"):
        call(reference.class_stats(h, y, 6), W)


def test_same_means_give_an_undefined_cdnv_and_gnc2():
    h, y, W, _ = make("unbalanced")
    h = h.clone()
    h[y == 4] = h[y == 4] - h[y == 4].mean(0) + h[y == 1].mean(0)  # class 4's mean = class 1's
    s = reference.class_stats(h, y, 6)
    with pytest.raises(ValueError, match=re.escape("classes [1, 4] have the same mean")):
        metrics.cdnv(s, tile=2, distance_exponent=2.0)
    with pytest.raises(ValueError, match=re.escape("classes [1, 4] have centred means in the "
                                                   "same direction")):
        metrics.gnc2(s, tile=2)
    assert metrics.gnc2(s, kernels="distance")["distance"].mean > 0


def test_merge_refuses_different_means():
    h, y, W, _ = make("unbalanced")
    a = metrics.PerSampleStats(reference.class_stats(h, y, 6), W)
    b = metrics.PerSampleStats(reference.class_stats(h[:60], y[:60], 6), W)
    with pytest.raises(ValueError, match="must be built from the same means, classifier and "
                                         "options"):
        a.merge(b)


@pytest.mark.cuda
def test_extra_metrics_on_cuda_equal_the_cpu_ones():
    h, y, W, ood = make("unbalanced", d=16)
    cpu = ncfast.ClassStats(6, 16, dtype=F64)
    cpu.update(h, y)
    gpu = ncfast.ClassStats(6, 16, device="cuda", dtype=F64)
    gpu.update(h.cuda(), y.cuda())
    Wg = W.cuda()
    assert metrics.cdnv(gpu, tile=2, distance_exponent=2.0) == pytest.approx(
        metrics.cdnv(cpu, distance_exponent=2.0), rel=1e-10)
    for name, value in metrics.gnc2(cpu).items():
        got = metrics.gnc2(gpu, tile=4)[name]
        assert got.mean == pytest.approx(value.mean, rel=1e-10), name
        assert got.variance == pytest.approx(value.variance, rel=1e-8), name
    torch.testing.assert_close(metrics.interference_grid(gpu, tile=4, dtype=F64).cpu(),
                               metrics.interference_grid(cpu, dtype=F64))
    assert metrics.unc3(Wg, gpu) == pytest.approx(metrics.unc3(W, cpu), rel=1e-10)
    torch.testing.assert_close(metrics.class_distances(Wg, gpu).cpu(),
                               metrics.class_distances(W, cpu))
    ood_mean = metrics.FeatureMean(16, device="cuda")
    ood_mean.update(ood.cuda())
    assert metrics.nc5(gpu, ood_mean.mean) == pytest.approx(metrics.nc5(cpu, ood.mean(0)),
                                                            rel=1e-10)
    results = []
    for stats, dev in ((cpu, "cpu"), (gpu, "cuda")):
        p = metrics.PerSampleStats(stats, W.to(dev), class_scatter=True, keep_margins=True,
                                   dtype=F64)
        p.update(h.to(dev), y.to(dev))
        results.append((p.cosine_margin(), p.ncc_accuracy(), p.nf_ratio(centred=False),
                        p.margins().cpu(), p.margin_histogram()[1]))
    (a_m, a_n, a_f, a_v, a_h), (b_m, b_n, b_f, b_v, b_h) = results
    assert b_m == pytest.approx(a_m, rel=1e-10) and b_n == a_n
    assert b_f == pytest.approx(a_f, rel=1e-9)
    torch.testing.assert_close(b_v, a_v)
    assert b_h.tolist() == a_h.tolist()


def test_train_config_takes_extras_and_names_the_allowed_ones():
    from ncfast.train import config

    assert config.load(None, ["track.extras=[gnc2,nf_ratio]"]).track.extras == ["gnc2",
                                                                                 "nf_ratio"]
    with pytest.raises(config.ConfigError, match=re.escape(
            "config key 'track.extras' must be a list of unc3, cosine_margin, ncc_accuracy, "
            "nf_ratio, gnc2 (NC5 is measured when track.ood names OOD data), got ['nc5']")):
        config.load(None, ["track.extras=[nc5]"])


def test_train_tracks_nc5_on_the_configured_ood_data(tmp_path):
    import csv

    from torch import nn

    from ncfast.train import load, run
    from ncfast.train.data import load_splits, ood_loader

    cfg = load(None, ["data.name=gaussian", "data.gaussian_dim=12", "data.num_classes=4",
                      "data.gaussian_train_per_class=30", "data.gaussian_test_per_class=10",
                      "data.batch_size=40", "epochs=1", "track.every=1", "track.ood=gaussian",
                      "track.extras=[]", "track.nc4=false", "log=[csv]", "progress=false",
                      f"runs_dir={tmp_path}"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    result = run(cfg, model=model)
    nc = [r for r in result.records if r["kind"] == "nc"]
    assert [(r["epoch"], r["split"]) for r in nc] == [(0, "train"), (0, "test"), (1, "train"),
                                                      (1, "test")]
    # the float64 two-pass reference on the trained model: the class means of the training
    # features against the mean of the OOD features (40 draws: as many as the test set)
    splits = load_splits(cfg.data, cfg.seed)
    x, y = splits.train_eval.tensors
    ood = torch.cat([batch[0] for batch in ood_loader("gaussian", splits, cfg.data, cfg.seed,
                                                      0, 1, False)])
    assert ood.shape == (40, 12)
    features = model[:2].double()
    with torch.no_grad():
        h, h_ood = features(x.double()), features(ood.double())
    means = torch.stack([h[y == k].mean(0) for k in range(4)])
    want = (F.normalize(means, dim=1) @ F.normalize(h_ood.mean(0), dim=0)).abs().mean().item()
    assert result.final["train"]["nc5"] == pytest.approx(want, rel=1e-5)
    assert all(0 <= r["nc5"] <= 1 for r in nc)
    with (result.run_dir / "metrics.csv").open() as f:
        tags = {row["tag"] for row in csv.DictReader(f)}
    assert {"nc/train/nc5", "nc/test/nc5"} <= tags


def test_train_ood_key_is_checked():
    from ncfast.train import config
    from ncfast.train.data import Splits, ood_loader

    assert config.load(None, ["track.ood=noise"]).track.ood == "noise"
    with pytest.raises(config.ConfigError, match=re.escape(
            "config key 'track.ood' must be one of none, noise, gaussian, got 'cifar10'")):
        config.load(None, ["track.ood=cifar10"])
    images = torch.zeros(6, 1, 8, 8)
    splits = Splits(None, None, torch.utils.data.TensorDataset(images), 3, (1, 8, 8))
    with pytest.raises(config.ConfigError, match=re.escape(
            "config key 'track.ood' must be none or noise for inputs of shape [1, 8, 8] "
            "(gaussian draws flat inputs), got 'gaussian'")):
        ood_loader("gaussian", splits, config.DataConfig(), 0, 0, 1, False)
    noise = ood_loader("noise", splits, config.DataConfig(), 0, 0, 1, False)
    assert next(iter(noise))[0].shape == (6, 1, 8, 8)
