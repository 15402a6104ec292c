"""ClassStats against the float64 two-pass reference: accuracy in the collapse regime, batching
and sharding invariance, exact merges (pairwise and across 2 gloo processes), NC4 counting,
persistence, and bad input that must leave the state untouched."""

import re

import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

import ncfast
from ncfast import metrics, reference
from ncfast.stats import NonFiniteFeaturesError


def mixture(K, d, n_per_class, sigma, seed=0, dtype=torch.float32, unbalanced=False):
    """Class means of norm ~ sqrt(d) * 5, within-class noise sigma; shuffled."""
    gen = torch.Generator().manual_seed(seed)
    means = 5 + 10 * torch.randn(K, d, generator=gen, dtype=torch.float64)
    counts = torch.full((K,), n_per_class)
    if unbalanced:
        counts = torch.randint(1, 2 * n_per_class, (K,), generator=gen)
    labels = torch.repeat_interleave(torch.arange(K), counts)
    feats = means[labels] + sigma * torch.randn(len(labels), d, generator=gen,
                                                dtype=torch.float64)
    perm = torch.randperm(len(labels), generator=gen)
    return feats[perm].to(dtype), labels[perm]


def stream(feats, labels, K, batch, device="cpu", dtype=torch.float32, **kw):
    stats = ncfast.ClassStats(K, feats.shape[1], device=device, dtype=dtype, **kw)
    for i in range(0, len(labels), batch):
        stats.update(feats[i:i + batch].to(device), labels[i:i + batch].to(device))
    return stats


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def test_float32_accuracy_in_the_collapse_regime(device):
    # The target: sigma = 1e-3 of the class-mean norm, K=100, d=64, N=20,000,
    # batches of 256, float32 state: <= 1e-4 relative error in Sigma_W and NC1.
    K, d, n = 100, 64, 200
    gen = torch.Generator().manual_seed(1)
    means = torch.randn(K, d, generator=gen, dtype=torch.float64)
    means = 40 * means / means.norm(dim=1, keepdim=True)
    labels = torch.arange(K).repeat_interleave(n)[torch.randperm(K * n, generator=gen)]
    feats = (means[labels] + 40e-3 / d**0.5 * torch.randn(K * n, d, generator=gen,
                                                          dtype=torch.float64)).float()
    ref = reference.class_stats(feats.double(), labels, K)
    stats = stream(feats, labels, K, 256, device=device)
    assert rel(stats.sigma_w(), ref.sigma_w()) <= 1e-4
    assert abs(metrics.nc1(stats) / metrics.nc1(ref) - 1) <= 1e-4
    assert rel(stats.means, ref.means) <= 1e-6


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
@pytest.mark.parametrize("unbalanced", [False, True], ids=["balanced", "unbalanced"])
@pytest.mark.parametrize("buffer_rows", [None, 10], ids=["staged", "buffer10"])
def test_float64_state_matches_two_pass_for_any_batching(device, batch, unbalanced, buffer_rows):
    """Any batching and any staging buffer (10 rows: batches of 7 flush on overflow, of 64 and
    1000 bypass it) give the two-pass result."""
    feats, labels = mixture(6, 5, 20, 0.3, dtype=torch.float64, unbalanced=unbalanced)
    ref = reference.class_stats(feats, labels, 6)
    stats = stream(feats, labels, 6, batch, device=device, dtype=torch.float64,
                   buffer_rows=buffer_rows)
    assert_close(stats.counts.cpu(), ref.counts)
    assert_close(stats.means.cpu(), ref.means, rtol=1e-12, atol=1e-12)
    assert_close(stats.sigma_w().cpu(), ref.sigma_w(), rtol=1e-12, atol=1e-12)
    assert_close(stats.class_variances().cpu(), ref.class_variances(), rtol=1e-12, atol=1e-12)
    for kind in ("weighted", "unweighted"):
        assert_close(stats.global_mean(kind).cpu(), ref.global_mean(kind), rtol=1e-12,
                     atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_features_accumulate_in_float32(device, dtype):
    feats, labels = mixture(4, 8, 50, 0.5, dtype=dtype)
    ref = reference.class_stats(feats.double(), labels, 4)
    stats = stream(feats, labels, 4, 32, device=device)
    assert stats.sigma_w().dtype == torch.float64 and stats.means.dtype == torch.float64
    assert rel(stats.sigma_w(), ref.sigma_w()) <= 1e-5


def test_merging_shards_equals_one_pass(device):
    feats, labels = mixture(5, 4, 30, 0.2, dtype=torch.float64, unbalanced=True)
    one = stream(feats, labels, 5, 16, device=device, dtype=torch.float64)
    parts = [stream(feats[s], labels[s], 5, 9, device=device, dtype=torch.float64)
             for s in (slice(0, 17), slice(17, 18), slice(18, None))]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert_close(merged.sigma_w(), one.sigma_w(), rtol=1e-12, atol=1e-12)
    assert_close(merged.means, one.means, rtol=1e-12, atol=1e-12)
    assert_close(merged.class_variances(), one.class_variances(), rtol=1e-12, atol=1e-12)
    # and it keeps accumulating correctly after the merge
    more, more_labels = mixture(5, 4, 3, 0.2, seed=9, dtype=torch.float64)
    merged.update(more.to(device), more_labels.to(device))
    ref = reference.class_stats(torch.cat([feats, more]), torch.cat([labels, more_labels]), 5)
    assert_close(merged.sigma_w().cpu(), ref.sigma_w(), rtol=1e-12, atol=1e-12)


def test_two_classes_one_sample_class_and_empty_class(device):
    feats = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 2.5], [9.0, 9.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    stats = stream(feats, labels, 2, 3, device=device, dtype=torch.float64)
    ref = reference.class_stats(feats, labels, 2)
    assert_close(stats.sigma_w().cpu(), ref.sigma_w())
    assert stats.class_variances()[1].item() == 0  # one sample: no spread
    three = stream(feats, labels, 3, 2, device=device, dtype=torch.float64)
    assert three.counts.tolist() == [3, 1, 0] and three.means[2].abs().sum().item() == 0
    with pytest.raises(metrics.EmptyClassError, match=r"\[2\]"):
        metrics.nc1(three)


def test_nc4_count_matches_reference(device):
    feats, labels = mixture(5, 6, 40, 8.0, seed=3)
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(5, 6, generator=gen), torch.randn(5, generator=gen)
    first = stream(feats, labels, 5, 50, device=device)
    second = stream(feats, labels, 5, 50, device=device, nc4_weight=weight, nc4_bias=bias,
                    nc4_means=first.means)
    ref = reference.class_stats(feats.double(), labels, 5, weight=weight.double(),
                                bias=bias.double())
    assert second.nc4_total.item() == len(labels)
    assert second.nc4_mismatches.item() == ref.nc4_mismatches.item()
    assert 0 < second.nc4_mismatches.item() < len(labels)  # the fixture is not trivial


def close_classes_on_an_offset(offset, K=10, d=256, n=40, seed=0):
    """float32 features of classes about 1 apart on a common offset (float32 rounds ||mu||^2
    by about 0.3 at offset 100), a classifier and the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.05 * torch.randn(K, d, generator=g, dtype=torch.float64)
    labels = torch.arange(K).repeat_interleave(n)
    feats = (offset + centres[labels] + 0.01 * torch.randn(K * n, d, generator=g,
                                                            dtype=torch.float64)).float()
    weight = torch.randn(K, d, generator=g, dtype=torch.float64)
    bias = torch.randn(K, generator=g, dtype=torch.float64)
    return feats, labels, weight, bias


def test_float32_nc4_under_a_large_common_offset(device):
    """NC4's nearest means are found about a common point: expanded about the origin,
    ||mu_k||^2 - 2 h.mu_k lost the class differences to float32 rounding (a third of the
    samples' nearest means were wrong at offset 100)."""
    feats, labels, weight, bias = close_classes_on_an_offset(100.0)
    ref = reference.class_stats(feats.double(), labels, 10, weight=weight, bias=bias)
    first = stream(feats, labels, 10, 64, device=device)
    second = stream(feats, labels, 10, 64, device=device, nc4_weight=weight.float(),
                    nc4_bias=bias.float(), nc4_means=first.means)
    assert ref.nc4_mismatches.item() > 0  # not trivial: the classifier is random
    assert second.nc4_mismatches.item() == ref.nc4_mismatches.item()


def _updates_under_sync_check(stats, feats, labels):
    """Staged batches (folded when the buffer fills) and one batch past the buffer, with any
    host synchronisation an error (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(0, 120, 30):
            stats.update(feats[i:i + 30], labels[i:i + 30])
        stats.update(feats[120:], labels[120:])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_update_reads_nothing_back_from_the_device():
    """README: on CUDA (deferred checks) update never waits for the GPU, NC4 count included;
    the state then equals the reference."""
    feats, labels = mixture(5, 6, 40, 0.5, seed=3)  # 200 rows: 4 staged batches, then 80
    gen = torch.Generator().manual_seed(4)
    first = stream(feats, labels, 5, 50)
    # a classifier near the means, so that some samples match and some do not (80 of 200)
    weight = first.means.float() + 8 * torch.randn(5, 6, generator=gen)
    bias = torch.randn(5, generator=gen)
    stats = ncfast.ClassStats(5, 6, device="cuda", buffer_rows=64, nc4_weight=weight,
                              nc4_bias=bias, nc4_means=first.means)
    _updates_under_sync_check(stats, feats.cuda(), labels.cuda())
    ref = reference.class_stats(feats.double(), labels, 5, weight=weight.double(),
                                bias=bias.double())
    assert stats.counts.cpu().tolist() == ref.counts.tolist()
    assert rel(stats.sigma_w(), ref.sigma_w()) <= 1e-5
    assert stats.nc4_mismatches.item() == ref.nc4_mismatches.item() == 80


def test_pickles_after_its_means_were_read():
    """The means cache's weak references made pickle and torch.save fail once any metric had
    read the means; the copy reads the same means and keeps accumulating."""
    import io
    import pickle

    feats, labels = mixture(3, 4, 10, 0.1)
    stats = stream(feats[:20], labels[:20], 3, 8)
    means = stats.means.clone()
    copy = pickle.loads(pickle.dumps(stats))
    buffer = io.BytesIO()
    torch.save(stats, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copy, loaded):
        assert torch.equal(other.means, means)
        other.update(feats[20:], labels[20:])
        assert_close(other.sigma_w(), reference.class_stats(feats.double(), labels, 3).sigma_w(),
                     rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.means, means)  # the original is untouched


def test_state_dict_round_trip_and_reset(device):
    feats, labels = mixture(3, 4, 10, 0.1)
    stats = stream(feats, labels, 3, 8, device=device)
    clone = ncfast.ClassStats(3, 4, device=device)
    clone.load_state_dict(stats.state_dict())
    assert_close(clone.sigma_w(), stats.sigma_w(), rtol=0, atol=0)
    clone.update(feats[:5].to(device), labels[:5].to(device))
    stats.update(feats[:5].to(device), labels[:5].to(device))
    assert_close(clone.sigma_w(), stats.sigma_w(), rtol=0, atol=0)
    stats.reset()
    assert stats.total.item() == 0 and stats.sigma_w().abs().sum().item() == 0


def _snapshot(stats):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in stats.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("case,exc,message", [
    ("label-too-large", ValueError, r"labels must be in \[0, 4\), got 4"),
    ("label-negative", ValueError, r"labels must be in \[0, 4\), got -1"),
    ("nan", ValueError, r"features must be finite, got a NaN or Inf in row 2"),
    ("inf", ValueError, r"features must be finite, got a NaN or Inf in row 0"),
    ("width", ValueError, r"features must have 3 columns \(dim\), got 5"),
    ("label-count", ValueError, r"labels must be 1-D with one label per row of features \(4\)"),
    ("label-dtype", TypeError, r"labels must be int64 or int32, got torch.float32"),
    ("int-features", TypeError, r"features must have a floating dtype, got torch.int64"),
])
def test_bad_update_is_rejected_and_state_unchanged(device, case, exc, message):
    feats, labels = mixture(4, 3, 5, 0.1)
    # The default on CPU; on CUDA the default defers the value checks (tested below).
    stats = stream(feats, labels, 4, 6, device=device, check_inputs="immediate")
    before = _snapshot(stats)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    if case == "label-too-large":
        y[1] = 4
    elif case == "label-negative":
        y[3] = -1
    elif case == "nan":
        x[2, 1] = float("nan")
    elif case == "inf":
        x[0, 0] = float("inf")
    elif case == "width":
        x = torch.randn(4, 5)
    elif case == "label-count":
        y = torch.tensor([0, 1])
    elif case == "label-dtype":
        y = y.float()
    elif case == "int-features":
        x = torch.ones(4, 3, dtype=torch.int64)
    with pytest.raises(exc, match=message):
        stats.update(x.to(device), y.to(device))
    _assert_same_state(before, _snapshot(stats))


def _bad_batch(case, B=5, d=3, K=4):
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(B, d, generator=gen), torch.randint(0, K, (B,), generator=gen)
    if case == "label":
        y[1] = K
    elif case == "nan":
        x[2, 0] = float("nan")
    elif case == "huge":
        x[3, 1] = 1e30  # finite, but its square overflows float32
    return x, y


@pytest.mark.parametrize("buffer_rows", [8, 64, 4], ids=["flush-per-batch", "one-flush",
                                                         "unstaged"])
@pytest.mark.parametrize("case,exc,message", [
    ("label", ValueError, r"labels must be in \[0, 4\), got 4 in row 1"),
    ("nan", NonFiniteFeaturesError, r"features must be finite, got a NaN or Inf in row 2"),
    ("huge", NonFiniteFeaturesError, r"features are too large for torch.float32 statistics: "
                                     r"max \|h\| = 1e\+30 > .* in row 3"),
])
def test_deferred_checks_leave_bad_batches_out_and_report_at_the_next_read(
        device, buffer_rows, case, exc, message):
    feats, labels = mixture(4, 3, 10, 0.1)
    opts = dict(device=device, buffer_rows=buffer_rows, nc4_weight=torch.randn(4, 3),
                nc4_means=torch.randn(4, 3))
    good = ncfast.ClassStats(4, 3, check_inputs=False, **opts)
    deferred = ncfast.ClassStats(4, 3, check_inputs="deferred", **opts)
    for i in range(0, 40, 6):
        if i in (24, 30):  # batches 5 and 7 of the deferred accumulator are bad
            deferred.update(*(t.to(device) for t in _bad_batch(case)))  # no error, no sync
        x, y = feats[i:i + 6].to(device), labels[i:i + 6].to(device)
        good.update(x, y)
        deferred.update(x, y)
    with pytest.raises(exc, match=r"batch 5 \(counted from the last reset\) was left out of "
                                  r"the statistics \(1 later bad batches too\): " + message):
        deferred.sigma_w()
    # Reported once; the state is that of the good batches alone, NC4 counts included.
    for name in ("counts", "nc4_total", "nc4_mismatches"):
        assert torch.equal(getattr(deferred, name), getattr(good, name)), name
    assert_close(deferred.sigma_w(), good.sigma_w(), rtol=1e-6, atol=1e-6)
    assert_close(deferred.means, good.means, rtol=1e-6, atol=1e-6)


def test_deferred_check_failure_reaches_merge_and_state_dict(device):
    feats, labels = mixture(4, 3, 5, 0.1)
    for read in (lambda s: s.state_dict(), lambda s: s.counts,
                 lambda s: ncfast.ClassStats(4, 3, device=device).merge(s)):
        stats = stream(feats, labels, 4, 6, device=device, check_inputs="deferred")
        stats.update(*(t.to(device) for t in _bad_batch("label")))
        with pytest.raises(ValueError, match="batch 5 "):
            read(stats)
        assert int(stats.total) == 20


def test_merge_and_load_reject_mismatches_without_changing_state():
    stats = stream(*mixture(4, 3, 5, 0.1), 4, 6)
    before = _snapshot(stats)
    with pytest.raises(ValueError, match="needs num_classes=4 and dim=3, got num_classes=5"):
        stats.merge(ncfast.ClassStats(5, 3))
    with pytest.raises(ValueError, match="needs num_classes=4 and dim=3, got num_classes=4 "
                                         "and dim=2"):
        stats.load_state_dict(ncfast.ClassStats(4, 2).state_dict())
    with pytest.raises(TypeError, match="other must be a ClassStats"):
        stats.merge("not stats")
    _assert_same_state(before, _snapshot(stats))


NC4_SAME = ("NC4 counts must be made against the same classifier (nc4_weight, nc4_bias) and "
            "means (nc4_means) to be combined; counts against different ones give no NC4")


@pytest.mark.parametrize("differs", ["weight", "bias", "means", "same"])
def test_merge_refuses_nc4_counts_against_another_classifier(differs):
    """Summing NC4 counts made against different classifiers (or means) gave a meaningless NC4
    silently; now a ValueError that changes nothing. The same set-up in another dtype merges."""
    feats, labels = mixture(4, 3, 6, 0.3, dtype=torch.float64)
    first = stream(feats, labels, 4, 8, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    setup = dict(nc4_weight=torch.randn(4, 3, generator=g, dtype=torch.float64),
                 nc4_bias=torch.randn(4, generator=g, dtype=torch.float64),
                 nc4_means=first.means)
    other = dict(setup)
    if differs != "same":
        key = f"nc4_{differs}"
        other[key] = setup[key] + 0.5
    a = stream(feats, labels, 4, 8, **setup)
    b = stream(feats, labels, 4, 8, dtype=torch.float64, **other)
    if differs == "same":
        assert a.merge(b).nc4_total.item() == 2 * len(labels)
        return
    before = _snapshot(a)
    with pytest.raises(ValueError, match="^" + re.escape(f"ncfast.ClassStats.merge: {NC4_SAME}")
                       + "$"):
        a.merge(b)
    _assert_same_state(before, _snapshot(a))


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_classes must be an int >= 1, got 0"):
        ncfast.ClassStats(0, 3)
    with pytest.raises(ValueError, match="check_inputs must be True, False, 'immediate' or "
                                         "'deferred', got 'later'"):
        ncfast.ClassStats(3, 3, check_inputs="later")
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        ncfast.ClassStats(3, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"nc4_weight must have shape \[3, 4\], got \[4, 3\]"):
        ncfast.ClassStats(3, 4, nc4_weight=torch.zeros(4, 3), nc4_means=torch.zeros(3, 4))


def test_class_moments_opcheck(device):
    feats, labels = mixture(3, 5, 4, 0.5)
    shift = torch.randn(3, 5)
    torch.library.opcheck(torch.ops.ncfast.class_moments.default,
                          (feats.to(device), labels.to(device), shift.to(device)))
    torch.library.opcheck(torch.ops.ncfast.class_moments_.default,
                          (feats.to(device), labels.to(device), shift.to(device)))


def test_class_moments_in_place_equals_the_functional_op(device):
    feats, labels = mixture(3, 5, 40, 0.5, dtype=torch.float64)
    feats, labels, shift = feats.to(device), labels.to(device), torch.randn(3, 5).double().to(
        device)
    expected = torch.ops.ncfast.class_moments(feats, labels, shift)
    shifted = feats.clone()
    got = torch.ops.ncfast.class_moments_(shifted, labels, shift)
    for g, e in zip((*got, shifted), expected):
        assert torch.equal(g, e)
    with pytest.raises(TypeError, match="shifting in place needs features of the state dtype"):
        torch.ops.ncfast.class_moments_(feats.bfloat16(), labels, shift.float())
    with pytest.raises(ValueError, match="shifting in place needs contiguous features"):
        torch.ops.ncfast.class_moments_(feats.T.contiguous().T, labels, shift)


@pytest.mark.parametrize("bad", [-1, 3, 7], ids=["negative", "K", "above-K"])
def test_moments_op_skips_labels_out_of_range(device, bad):
    """Rows labelled -1 are how ClassStats leaves rows out; any label outside [0, K) is such a
    row, never an address (a label of K or more wrote past the outputs)."""
    # Named so that bench/gpu_check.sh, which keeps class_moments tests off the GPU for the
    # in-place op's sake, runs it: it calls only the functional op.
    feats, labels = mixture(3, 5, 4, 0.5, dtype=torch.float64)
    shift = torch.randn(3, 5, dtype=torch.float64)
    skipped = labels.clone()
    skipped[::3] = bad
    kept = (skipped >= 0) & (skipped < 3)
    got = torch.ops.ncfast.class_moments(feats.to(device), skipped.to(device), shift.to(device))
    want = torch.ops.ncfast.class_moments(feats[kept], labels[kept], shift)
    for g, w in zip(got[:3], want[:3]):
        assert_close(g.cpu(), w)
    assert torch.equal(got[3][~kept.to(device)], torch.zeros(int((~kept).sum()), 5,
                                                             dtype=torch.float64, device=device))
    assert_close(got[3][kept.to(device)].cpu(), want[3])


def test_all_reduce_without_a_process_group_is_a_no_op():
    import torch.distributed as dist

    assert not dist.is_initialized()
    feats, labels = mixture(5, 4, 12, 0.3, dtype=torch.float64, unbalanced=True)
    stats = stream(feats, labels, 5, 16, dtype=torch.float64)
    before = stats.state_dict()
    assert stats.all_reduce() is stats
    after = stats.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value


def _gloo_worker(rank, world, init_file, feats, labels, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        shard = slice(rank, None, world)
        stats = stream(feats[shard], labels[shard], 5, 7, dtype=torch.float64)
        stats.all_reduce()
        # float32 under a large offset: the reduced means are not rounded to the state dtype
        offset_feats, offset_labels, _ = offset_data(1e5)
        stats32 = stream(offset_feats[shard], offset_labels[shard], 10, 64).all_reduce()
        # NC4 counted against another classifier on each rank: refused on both, state kept
        weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank),
                             dtype=torch.float64)
        nc4 = stream(feats[shard], labels[shard], 5, 7, dtype=torch.float64, nc4_weight=weight,
                     nc4_means=stats.means)
        before = nc4.counts.clone()
        try:
            nc4.all_reduce()
            nc4_error = None
        except ValueError as err:
            nc4_error = str(err)
        out[rank] = {"sigma_w": stats.sigma_w(), "means": stats.means.clone(),
                     "counts": stats.counts.clone(), "var": stats.class_variances(),
                     "offset_metrics": metrics.all_metrics(stats32).as_dict(),
                     "nc4_error": nc4_error, "nc4_kept": torch.equal(nc4.counts, before)}
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_all_reduce_equals_single_process(tmp_path):
    feats, labels = mixture(5, 4, 12, 0.3, dtype=torch.float64, unbalanced=True)
    one = stream(feats, labels, 5, 16, dtype=torch.float64)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "store"), feats, labels, out),
                           nprocs=2, start_method="spawn")
        results = dict(out)
    for rank in (0, 1):
        assert_close(results[rank]["counts"], one.counts)
        assert_close(results[rank]["means"], one.means, rtol=1e-12, atol=1e-12)
        assert_close(results[rank]["sigma_w"], one.sigma_w(), rtol=1e-12, atol=1e-12)
        assert_close(results[rank]["var"], one.class_variances(), rtol=1e-12, atol=1e-12)
        assert_offset_metrics(results[rank]["offset_metrics"], offset_data(1e5)[2])
        assert results[rank]["nc4_error"] == f"ncfast.ClassStats.all_reduce: {NC4_SAME}"
        assert results[rank]["nc4_kept"]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_nc4_kernel_matches_argmax_argmin(device, with_bias):
    gen = torch.Generator().manual_seed(7)
    B, K = 300, 37
    scores = torch.randn(B, 2 * K, generator=gen, dtype=torch.float64)
    scores[:5, :K] = 1.0  # ties: the first index wins, as torch.argmax does
    sq = torch.rand(K, generator=gen, dtype=torch.float64)
    bias = torch.randn(K, generator=gen, dtype=torch.float64) if with_bias else None
    logits = scores[:, :K] + (bias if with_bias else 0)
    nearest = (sq - 2 * scores[:, K:]).argmin(1)
    expected = (logits.argmax(1) != nearest).sum().item()
    def to(t):
        return t.to(device)

    got = torch.ops.ncfast.nc4_mismatches(to(scores), None if bias is None else to(bias), to(sq))
    assert got.item() == expected and 0 < expected < B
    skip = torch.rand(B, generator=gen) < 0.3
    got = torch.ops.ncfast.nc4_mismatches(to(scores), None if bias is None else to(bias), to(sq),
                                          to(skip))
    assert got.item() == (logits.argmax(1) != nearest)[~skip].sum().item()
    torch.library.opcheck(torch.ops.ncfast.nc4_mismatches.default,
                          (to(scores), None if bias is None else to(bias), to(sq)))


def test_wide_features_use_the_block_triangular_gram_exactly(device):
    # d >= 256 accumulates only the upper block triangle of the Gram product.
    feats, labels = mixture(3, 300, 15, 0.2, dtype=torch.float64, unbalanced=True)
    ref = reference.class_stats(feats, labels, 3)
    stats = stream(feats, labels, 3, 11, device=device, dtype=torch.float64)
    assert_close(stats.sigma_w().cpu(), ref.sigma_w(), rtol=1e-12, atol=1e-12)
    clone = ncfast.ClassStats(3, 300, device=device, dtype=torch.float64)
    clone.load_state_dict(stats.state_dict())
    clone.merge(stream(feats, labels, 3, 7, device=device, dtype=torch.float64))
    doubled = reference.class_stats(torch.cat([feats, feats]), torch.cat([labels, labels]), 3)
    assert_close(clone.sigma_w().cpu(), doubled.sigma_w(), rtol=1e-12, atol=1e-12)


# ---- issue 11: unrounded means, overflow across batches, all-or-nothing load_state_dict

OFFSET_KEYS = ("nc1", "nc1_trace", "nc2_means", "equinorm_means", "cdnv")


def offset_data(offset, K=10, d=32, n=200):
    """float32 features: class means 1 apart on top of a common offset, spread 0.01; shuffled,
    with the float64 reference metrics."""
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(K, d, generator=gen, dtype=torch.float64)
    labels = torch.arange(K).repeat_interleave(n)[torch.randperm(K * n, generator=gen)]
    feats = (offset + means[labels] + 0.01 * torch.randn(K * n, d, generator=gen,
                                                         dtype=torch.float64)).float()
    ref = metrics.all_metrics(reference.class_stats(feats.double(), labels, K)).as_dict()
    return feats, labels, ref


def assert_offset_metrics(got, ref):
    for key in OFFSET_KEYS:
        assert abs(got[key] / ref[key] - 1) <= 1e-6, key


@pytest.mark.parametrize("offset", [1e4, 1e5, -3e5], ids=["1e4", "1e5", "-3e5"])
def test_float32_metrics_read_unrounded_means_under_a_large_common_offset(offset):
    """Class means 1 apart on top of a common offset: float32 means rounded to the state dtype
    cost NC1 and NC2 up to 1e-3 relative; read unrounded, they agree with the reference."""
    feats, labels, ref = offset_data(offset)
    stats = stream(feats, labels, 10, 64)
    assert stats.means.dtype == torch.float64
    assert_offset_metrics(metrics.all_metrics(stats).as_dict(), ref)


@pytest.mark.parametrize("offset", [1e5, -3e5], ids=["1e5", "-3e5"])
def test_float32_merge_keeps_the_unrounded_means(offset):
    """A merge stores each class's merged mean as a float32 reference point; what the rounding
    loses stays in the sums, so merged shards (and a merge after a state_dict round trip) give
    the metrics of one pass, not ones 1e-4 off."""
    feats, labels, ref = offset_data(offset)
    parts = [stream(feats[i::3], labels[i::3], 10, 64) for i in range(3)]
    merged = parts[0].merge(parts[1])
    restored = ncfast.ClassStats(10, 32)
    restored.load_state_dict(merged.state_dict())
    for stats in (merged.merge(parts[2]), restored.merge(parts[2])):
        assert_offset_metrics(metrics.all_metrics(stats).as_dict(), ref)
    # and it keeps accumulating from the merged state
    more = stream(feats, labels, 10, 64).merge(stream(feats[0::3], labels[0::3], 10, 64))
    more.update(feats[1::3], labels[1::3])
    more.update(feats[2::3], labels[2::3])
    doubled = metrics.all_metrics(reference.class_stats(
        torch.cat([feats, feats]).double(), torch.cat([labels, labels]), 10)).as_dict()
    assert_offset_metrics(metrics.all_metrics(more).as_dict(), doubled)


@pytest.mark.parametrize("offset", [1e5, -3e5], ids=["1e5", "-3e5"])
def test_float64_merged_state_loads_into_float32_with_unrounded_means(offset, device):
    """A float64 merge keeps each merged mean in its reference point; loaded into a float32
    accumulator, those were rounded to float32 (NC2 1e-3 off); now re-split as merge does. A
    float64 state of float64 features (first samples off the float32 grid) is the same case."""
    feats, labels, ref = offset_data(offset)
    wide = feats.double()
    merged = stream(wide[0::2], labels[0::2], 10, 64, device, torch.float64).merge(
        stream(wide[1::2], labels[1::2], 10, 64, device, torch.float64))
    jitter = wide + 1e-3 * torch.rand(wide.shape, generator=torch.Generator().manual_seed(5),
                                      dtype=torch.float64)
    streamed = stream(jitter, labels, 10, 64, device, torch.float64)
    ref_jitter = metrics.all_metrics(reference.class_stats(jitter, labels, 10)).as_dict()
    for source, want in ((merged, ref), (streamed, ref_jitter)):
        narrow = ncfast.ClassStats(10, 32, device=device)
        narrow.load_state_dict(source.state_dict())
        assert_offset_metrics(metrics.all_metrics(narrow).as_dict(), want)
        # and it keeps accumulating from the loaded state
        narrow.update(feats.to(device), labels.to(device))
        assert narrow.total.item() == 2 * len(labels)


@pytest.mark.parametrize("checks", ["immediate", "deferred", False])
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 0.9), (torch.float64, 0.9)],
                         ids=["float32", "float64"])
def test_sums_that_overflow_across_batches_raise_naming_the_cause(device, checks, dtype, scale):
    """Every row passes the per-row magnitude check, yet the sums of squares of several rows do
    not fit the state dtype: the next read raises instead of returning inf/NaN metrics."""
    K, d = 2, 4
    stats = ncfast.ClassStats(K, d, device=device, dtype=dtype, check_inputs=checks)
    limit = (torch.finfo(dtype).max / (4 * d)) ** 0.5
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (40, d), generator=gen, dtype=torch.float64) * 2 - 1
    feats = (scale * limit * signs).to(device=device, dtype=dtype)
    labels = (torch.arange(40) % K).to(device)
    for i in range(40):  # one row per batch: each passes on its own
        stats.update(feats[i:i + 1], labels[i:i + 1])
    message = (rf"ncfast.ClassStats: the accumulated sums overflowed {dtype} after 40 samples: "
               r"every batch passed the per-row check .*reset\(\) and accumulate with "
               r"dtype=torch.float64, or scale the features down")
    for read in (lambda: stats.sigma_w(), lambda: stats.means, lambda: metrics.all_metrics(stats),
                 lambda: stats.state_dict()):
        with pytest.raises(ncfast.stats.StatisticsOverflowError, match=message):
            read()
    stats.reset()
    stats.update(feats[:2] / limit, labels[:2])
    assert torch.isfinite(stats.sigma_w()).all()


def test_sums_that_fit_do_not_raise():
    stats = stream(*mixture(3, 4, 20, 0.5), 3, 7)
    for _ in range(3):
        assert torch.isfinite(stats.sigma_w()).all() and stats.total.item() == 60


def _corrupt(state, key, value):
    state = dict(state)
    if value is KeyError:
        del state[key]
    else:
        state[key] = value(state[key]) if callable(value) else value
    return state


@pytest.mark.parametrize("key, value, exc, message", [
    *[(k, KeyError, ValueError, rf"state lacks the entries \['{k}'\]")
      for k in ("counts", "shift", "sums", "sq", "gram", "nc4_total", "num_classes")],
    ("version", 2, ValueError, r"expected a ClassStats state of version 1, got version 2"),
    ("num_classes", "4", TypeError, r"state\['num_classes'\] must be an int, got str"),
    ("dim", 2, ValueError, r"needs num_classes=4 and dim=3, got num_classes=4 and dim=2"),
    ("counts", lambda t: t[:3], ValueError, r"state\['counts'\] must have shape \[4\], got \[3\]"),
    ("gram", lambda t: t.T[:2], ValueError, r"state\['gram'\] must have shape \[3, 3\], got "
                                            r"\[2, 3\]"),
    ("shift", lambda t: t.half(), TypeError, r"state\['shift'\] must have dtype torch.float32 "
                                             r"or torch.float64, got torch.float16"),
    ("counts", lambda t: t.float(), TypeError, r"state\['counts'\] must have dtype torch.int64 "
                                               r"or torch.int32, got torch.float32"),
    ("sums", [[0.0] * 3] * 4, TypeError, r"state\['sums'\] must be a tensor, got list"),
    ("sq", lambda t: t.to("meta"), ValueError, r"state\['sq'\] must be on the CPU or on cpu, "
                                               r"got meta"),
    ("counts", lambda t: t - 100, ValueError, r"state\['counts'\] must be >= 0, got -9\d"),
    ("gram", lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), ValueError,
     r"state\['gram'\] must be finite in torch.float32, got NaN or Inf"),
    ("sums", lambda t: t * float("inf"), ValueError, r"state\['sums'\] must be finite"),
    ("nc4_mismatches", lambda t: t + 1, ValueError, r"state\['nc4_mismatches'\] must be <= "
                                                    r"state\['nc4_total'\], got 1 > 0"),
], ids=[*[f"missing-{k}" for k in ("counts", "shift", "sums", "sq", "gram", "nc4_total",
                                    "num_classes")],
        "version", "num-classes-str", "dim", "counts-shape", "gram-shape", "shift-fp16",
        "counts-float", "sums-list", "sq-meta", "counts-negative", "gram-nan", "sums-inf",
        "nc4-over-total"])
def test_load_state_dict_is_all_or_nothing(key, value, exc, message):
    stats = stream(*mixture(4, 3, 5, 0.1), 4, 6)
    good = stream(*mixture(4, 3, 7, 0.3, seed=5), 4, 6).state_dict()
    before, nc1 = _snapshot(stats), metrics.nc1(stats)
    with pytest.raises(exc, match=r"ncfast.ClassStats.load_state_dict: " + message):
        stats.load_state_dict(_corrupt(good, key, value))
    _assert_same_state(before, _snapshot(stats))
    assert metrics.nc1(stats) == nc1


def test_load_state_dict_of_something_else_is_a_type_error():
    stats = ncfast.ClassStats(4, 3)
    for bad in (None, [1, 2], "state"):
        with pytest.raises(TypeError, match=r"state must be a dict \(from state_dict\(\)\), got "):
            stats.load_state_dict(bad)


def test_means_are_read_once_and_rebuilt_after_every_change():
    # The means are cached between reads (a metric reads them, then the global mean); every
    # change of the state, and an in-place change of the returned tensor, rebuilds them.
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, 4, (90,), generator=g)
    y[:4] = torch.arange(4)
    h = 3 * torch.randn(4, 5, generator=g, dtype=torch.float64)[y] + torch.randn(
        90, 5, generator=g, dtype=torch.float64)

    def want(rows):
        return reference.class_stats(h[rows], y[rows], 4).means

    s = ncfast.ClassStats(4, 5, dtype=torch.float64)
    s.update(h[:40], y[:40])
    first = s.means
    assert s.means is first
    assert_close(s.global_mean(), reference.class_stats(h[:40], y[:40], 4).global_mean())
    s.update(h[40:60], y[40:60])
    assert_close(s.means, want(slice(0, 60)), rtol=1e-12, atol=1e-12)
    s.means.add_(1.0)  # a caller's in-place change does not stick
    assert_close(s.means, want(slice(0, 60)), rtol=1e-12, atol=1e-12)
    other = ncfast.ClassStats(4, 5, dtype=torch.float64)
    other.update(h[60:], y[60:])
    s.merge(other)
    assert_close(s.means, want(slice(None)), rtol=1e-12, atol=1e-12)
    s.load_state_dict(other.state_dict())
    assert_close(s.means, want(slice(60, None)), rtol=1e-12, atol=1e-12)
    s.reset()
    assert not s.means.any()
    with torch.inference_mode():  # inference tensors carry no version: no cache, still exact
        s.update(h, y)
        assert_close(s.means, want(slice(None)), rtol=1e-12, atol=1e-12)
