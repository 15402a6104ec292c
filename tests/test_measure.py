"""ncfast.measure on a small model: metrics equal the float64 reference on hooked features,
accuracy, eval mode restored, empty classes reported, and a 2-process gloo run equal to 1."""

import re

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ncfast
from ncfast import metrics, reference


def make_model_and_data(K=4, d_in=6, d=5, n=30, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, d),
                          nn.ReLU(), nn.Linear(d, K))
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(K, d_in, generator=gen)
    labels = torch.arange(K).repeat_interleave(n)
    inputs = centres[labels] + torch.randn(K * n, d_in, generator=gen)
    # float64 end to end, so batching cannot move the features by float32 rounding
    return model.double(), inputs.double(), labels


def test_measure_matches_reference_on_hooked_features():
    model, inputs, labels = make_model_and_data()
    model.train()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=17)
    result = ncfast.measure(model, loader, dtype=torch.float64)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        feats = model[:5](inputs).double()
        logits = model(inputs)
    W, b = model[5].weight.double(), model[5].bias.double()
    ref = reference.class_stats(feats, labels, 4, weight=W, bias=b)
    expected = metrics.all_metrics(ref, W, b)
    for name, value in result.metrics.as_dict().items():
        assert value == pytest.approx(getattr(expected, name), rel=1e-9, abs=1e-12), name
    assert result.accuracy == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    assert result.samples == len(labels) and result.empty_classes == []
    assert len(model[5]._forward_pre_hooks) == 0


@pytest.mark.parametrize("cache_bytes,forwards", [(2**30, 1), (600, 2), (0, 2)],
                         ids=["cached", "cache-overflows", "no-cache"])
def test_nc4_sweep_reuses_cached_features_within_the_budget(cache_bytes, forwards):
    model, inputs, labels = make_model_and_data()  # 120 x 5 float64 features: 4800 bytes
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=17)
    result = ncfast.measure(model, loader, dtype=torch.float64, cache_bytes=cache_bytes)
    assert len(calls) == forwards * len(loader)
    reference_run = ncfast.measure(model, loader, dtype=torch.float64, cache_bytes=0)
    assert result.metrics.as_dict() == reference_run.metrics.as_dict()
    assert result.stats.nc4_total.item() == len(labels)


def test_measure_rejects_a_bad_cache_budget():
    model, inputs, labels = make_model_and_data()
    model.train()
    with pytest.raises(ValueError, match="cache_bytes must be an int >= 0, got -1"):
        ncfast.measure(model, [(inputs, labels)], cache_bytes=-1)
    assert model.training and len(model[5]._forward_pre_hooks) == 0


def test_measure_reports_empty_classes_by_name():
    model, inputs, labels = make_model_and_data(K=5)
    keep = labels != 2
    loader = DataLoader(TensorDataset(inputs[keep], labels[keep]), batch_size=32)
    result = ncfast.measure(model, loader)
    assert result.empty_classes == [2]
    assert result.stats.counts[2].item() == 0


def test_nc4_leaves_out_classes_without_samples():
    """NC4's nearest mean ranges over the classes that have samples (theory.md 5.6, as the
    reference): an empty class's zero mean row was nearest to the samples near the origin."""
    torch.manual_seed(0)
    fc = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(2).repeat_interleave(50)  # class 2 has no samples
    feats = torch.tensor([[0.2] * 4, [3.0] * 4], dtype=torch.float64)[labels] + 0.3 * torch.randn(
        100, 4, generator=g, dtype=torch.float64)
    result = ncfast.measure(nn.Sequential(nn.Identity(), fc),
                            DataLoader(TensorDataset(feats, labels), batch_size=16),
                            dtype=torch.float64)
    ref = reference.class_stats(feats, labels, 3, weight=fc.weight, bias=fc.bias)
    assert result.empty_classes == [2]
    assert result.metrics.nc4 == metrics.nc4(ref) == 0.5


def test_a_classifier_without_cosine_margins_leaves_only_that_extra_undefined():
    """A zero-initialised head has no centred rows: with undefined="none" the cosine margin is
    None with the reason and the other metrics are measured (measure raised, ncfast train
    stopped); with "raise" it raises."""
    model, inputs, labels = make_model_and_data()
    nn.init.zeros_(model[5].weight)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=17)
    extras = ("cosine_margin", "ncc_accuracy")
    result = ncfast.measure(model, loader, dtype=torch.float64, extras=extras, undefined="none")
    assert result.extra["cosine_margin"] is None
    assert result.metrics.undefined["cosine_margin"] == (
        "ncfast.metrics.PerSampleStats: weight rows [0, 1, 2, 3] equal the mean row; their "
        "cosine margin is undefined")
    with torch.no_grad():
        feats = model.eval()[:5](inputs)
    nearest = torch.cdist(feats, reference.class_stats(feats, labels, 4).means).argmin(1)
    assert result.extra["ncc_accuracy"] == pytest.approx((nearest == labels).double().mean())
    with pytest.raises(ValueError, match=r"weight rows \[0, 1, 2, 3\] equal the mean row"):
        ncfast.measure(model, loader, dtype=torch.float64, extras=extras)


def test_single_class_data_leave_the_two_class_metrics_undefined():
    """One class in the data: under undefined="none" every metric of two or more classes is
    None with the reason (measure raised 'needs at least 2 classes'), NC4, the bias norm and the
    per-sample extras are measured; under "raise" it raises."""
    model, inputs, labels = make_model_and_data()
    one = labels == 1
    loader = DataLoader(TensorDataset(inputs[one], labels[one]), batch_size=17)
    extras = ("unc3", "gnc2", "ncc_accuracy")
    result = ncfast.measure(model, loader, dtype=torch.float64, extras=extras, undefined="none")
    reason = "ncfast.metrics.all_metrics: needs at least 2 classes, got 1"
    values = result.metrics.as_dict()
    assert [name for name, value in values.items() if value is not None] == ["bias_norm", "nc4"]
    assert {result.metrics.undefined[name] for name, value in values.items()
            if value is None} == {reason}
    assert result.extra["unc3"] is None and result.extra["gnc2_riesz_mean"] is None
    assert result.metrics.undefined["unc3"] == "ncfast.metrics.unc3: needs at least 2 classes, " \
        "got 1"
    assert result.extra["ncc_accuracy"] == 1.0 and result.empty_classes == [0, 2, 3]
    with torch.no_grad():
        logits = model.eval()(inputs[one])
    assert result.metrics.nc4 == pytest.approx((logits.argmax(1) != 1).double().mean().item())
    with pytest.raises(ValueError, match="^" + re.escape(reason) + "$"):
        ncfast.measure(model, loader, dtype=torch.float64, extras=extras)


def test_a_dead_network_leaves_only_the_cosine_margin_undefined():
    """Every feature zero, so equal to μ_G: the cosine margin has no value. It raised from the
    middle of the second sweep whatever undefined said (ncfast train with the extra stopped);
    now it is None with the reason under "none", and "raise" names the metric."""
    model, inputs, labels = make_model_and_data()
    nn.init.zeros_(model[3].weight)
    nn.init.zeros_(model[3].bias)  # the features are ReLU(0) = 0
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=17)
    extras = ("cosine_margin", "ncc_accuracy")
    result = ncfast.measure(model, loader, dtype=torch.float64, extras=extras, undefined="none")
    reason = ("ncfast.metrics.PerSampleStats.cosine_margin: 120 of 120 samples equal the "
              "global mean; their cosine margin is undefined")
    assert result.extra["cosine_margin"] is None
    assert result.metrics.undefined["cosine_margin"] == reason
    assert result.extra["ncc_accuracy"] == 0.25  # every mean is 0: the nearest is class 0
    assert result.metrics.nc1 is None and result.stats.nc4_total.item() == 120
    # strict: two of four samples at μ_G = 0, every other metric defined
    torch.manual_seed(0)
    head = nn.Sequential(nn.Identity(), nn.Linear(2, 2).double())
    feats = torch.tensor([[2.0, 1.0], [0.0, 0.0], [-2.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    strict = [(feats, torch.tensor([0, 0, 1, 1]))]
    with pytest.raises(ValueError, match="^" + re.escape(reason.replace("120 of 120", "2 of 4"))
                       + "$"):
        ncfast.measure(head, strict, dtype=torch.float64, extras=extras)


def test_measure_rejects_a_non_linear_classifier():
    model, inputs, labels = make_model_and_data()
    with pytest.raises(TypeError, match="classifier must be an nn.Linear, got ReLU"):
        ncfast.measure(model, [(inputs, labels)], classifier=model[2])


def _measure_worker(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, inputs, labels = make_model_and_data()
        shard = slice(rank, None, world)
        loader = DataLoader(TensorDataset(inputs[shard], labels[shard]), batch_size=9)
        m = ncfast.measure(model, loader, dtype=torch.float64, extras=ALL_EXTRAS,
                           ood_loader=[inputs[shard][:20]])
        out[rank] = {**m.metrics.as_dict(), **m.extra, "top5": m.top5_accuracy}
        # kept margins are gathered in rank order; sorted, they are the one-process ones
        per_sample = metrics.PerSampleStats(m.stats, model[5].weight, keep_margins=True,
                                            dtype=torch.float64)
        with torch.no_grad():
            per_sample.update(model.eval()[:5](inputs[shard]), labels[shard])
        out[f"margins{rank}"] = per_sample.all_reduce().margins().tolist()
    finally:
        dist.destroy_process_group()


def test_two_process_measure_equals_one_process(tmp_path):
    model, inputs, labels = make_model_and_data()
    m = ncfast.measure(model, DataLoader(TensorDataset(inputs, labels), batch_size=9),
                       dtype=torch.float64, extras=ALL_EXTRAS,
                       ood_loader=[inputs[0::2][:20], inputs[1::2][:20]])
    one = {**m.metrics.as_dict(), **m.extra, "top5": m.top5_accuracy}
    per_sample = metrics.PerSampleStats(m.stats, model[5].weight, keep_margins=True,
                                        dtype=torch.float64)
    with torch.no_grad():
        per_sample.update(model.eval()[:5](inputs), labels)
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_measure_worker, args=(2, str(tmp_path / "store"), out), nprocs=2,
                           start_method="spawn")
        results = dict(out)
    assert len(one) == 15 + 1 + 6 + 5
    for rank in (0, 1):
        for name, value in one.items():
            # nf_ratio: dead ReLU units make these classes rank-deficient (its 1e-9 floor)
            rel = 1e-7 if name == "nf_ratio" else 1e-9
            assert results[rank][name] == pytest.approx(value, rel=rel, abs=1e-12), name
        assert results[f"margins{rank}"] == pytest.approx(per_sample.margins().tolist(),
                                                          rel=1e-12, abs=1e-12)


ALL_EXTRAS = ("unc3", "gnc2", "cosine_margin", "ncc_accuracy", "nf_ratio")


def test_measure_reports_top5_and_the_extras_of_the_hooked_features():
    model, inputs, labels = make_model_and_data(K=7, n=20)
    ood = torch.randn(40, 6, generator=torch.Generator().manual_seed(3)).double()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=17)
    result = ncfast.measure(model, loader, dtype=torch.float64, extras=ALL_EXTRAS,
                            ood_loader=DataLoader(TensorDataset(ood), batch_size=16),
                            cdnv_exponents=(2.0,))
    model.eval()
    with torch.no_grad():
        feats, logits, ood_feats = model[:5](inputs), model(inputs), model[:5](ood)
    W = model[5].weight.double()
    ref = reference.class_stats(feats, labels, 7)
    per_sample = metrics.PerSampleStats(ref, W, class_scatter=True, dtype=torch.float64)
    per_sample.update(feats, labels)
    gnc2 = metrics.gnc2(ref)
    expected = {
        "unc3": metrics.unc3(W, ref), "cdnv_p2": metrics.cdnv(ref, distance_exponent=2.0),
        **{f"gnc2_{k}_{part}": getattr(v, "mean" if part == "mean" else "variance")
           for k, v in gnc2.items() for part in ("mean", "var")},
        "cosine_margin": per_sample.cosine_margin(), "ncc_accuracy": per_sample.ncc_accuracy(),
        "nf_ratio": per_sample.nf_ratio(), "nc5": metrics.nc5(ref, ood_feats.mean(0)),
    }
    assert set(result.extra) == set(expected)
    for name, value in expected.items():
        assert result.extra[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    top5 = (logits.topk(5).indices == labels[:, None]).any(1).double().mean().item()
    assert result.top5_accuracy == pytest.approx(top5) and result.top5_accuracy > result.accuracy
    assert result.ood.count == 40 and result.per_sample.count == len(labels)


def test_measure_rejects_unknown_extras_and_nc5_without_ood_data():
    model, inputs, labels = make_model_and_data()
    with pytest.raises(ValueError, match=r"extras must be names from \['unc3', 'cosine_margin', "
                                         r"'ncc_accuracy', 'nf_ratio', 'gnc2', 'nc5'\], got "
                                         r"\['nc9'\]"):
        ncfast.measure(model, [(inputs, labels)], extras=("nc9",))
    with pytest.raises(ValueError, match="extras 'nc5' needs ood_loader=<out-of-distribution"):
        ncfast.measure(model, [(inputs, labels)], extras=("nc5",))


class NeverIterated:
    def __iter__(self):
        raise AssertionError("the data were swept before the arguments were checked")


@pytest.mark.parametrize("exponents, error, message", [
    ((0,), ValueError, "each of cdnv_exponents must be a finite number > 0, got 0"),
    ((2, float("nan")), ValueError, "each of cdnv_exponents must be a finite number > 0, got nan"),
    (("2",), ValueError, "each of cdnv_exponents must be a finite number > 0, got '2'"),
    (2.0, TypeError, "cdnv_exponents must be a collection of numbers, got float"),
], ids=["zero", "nan", "str", "scalar"])
@pytest.mark.parametrize("undefined", ["raise", "none"])
def test_measure_checks_cdnv_exponents_before_the_sweep(exponents, error, message, undefined):
    """A bad exponent is an argument error before the model runs, whatever ``undefined`` says
    (it was reported as an undefined cdnv_p0 under "none", after a sweep over the data)."""
    model, _, _ = make_model_and_data()
    with pytest.raises(error, match=re.escape(f"ncfast.measure: {message}")):
        ncfast.measure(model, NeverIterated(), cdnv_exponents=exponents, undefined=undefined)
