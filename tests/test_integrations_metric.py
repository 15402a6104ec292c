"""ncfast.integrations: the streaming NC metric (plain and as a torchmetrics.Metric), its exact
2-process gloo sync, and the Lightning callback on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

import ncfast
from ncfast import reference
from ncfast.integrations import NeuralCollapseMetric
from ncfast.integrations.metric import TORCHMETRICS


def data(K=4, d=6, n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, K, (n * K,), generator=gen)
    feats = means[labels] + 0.5 * torch.randn(n * K, d, generator=gen, dtype=torch.float64)
    return feats, labels


def expected(feats, labels, K, classifier=None):
    """The metrics of the float64 reference statistics."""
    stats = reference.class_stats(feats, labels, K)
    W = None if classifier is None else classifier.weight.detach().double()
    b = None if classifier is None else classifier.bias.detach().double()
    return ncfast.metrics.all_metrics(stats, W, b, undefined="none").as_dict()


def check(got: dict, want: dict, rtol=1e-10):
    assert set(got) == {k for k, v in want.items() if v is not None}
    for name, value in got.items():
        assert value.dtype == torch.float64 and value.dim() == 0
        assert_close(value.item(), want[name], rtol=rtol, atol=1e-12, msg=name)


@pytest.mark.filterwarnings("ignore:The ``compute`` method.*before the ``update``")
def test_update_compute_reset_merge_match_the_reference():
    feats, labels = data()
    fc = nn.Linear(6, 4).double()
    whole = NeuralCollapseMetric(4, 6, classifier=fc, dtype=torch.float64)
    first, second = (NeuralCollapseMetric(4, 6, classifier=fc, dtype=torch.float64)
                     for _ in range(2))
    for i in range(0, len(labels), 17):
        whole.update(feats[i:i + 17], labels[i:i + 17])
        (first if i < 60 else second).update(feats[i:i + 17], labels[i:i + 17])
    want = expected(feats, labels, 4, fc)
    check(whole.compute(), want)
    before = second.compute()
    check(first.merge(second).compute(), want)
    check(second.compute(), {k: v.item() for k, v in before.items()})  # other is unchanged
    whole.reset()
    with pytest.raises(ValueError, match="no samples yet; call update first"):
        whole.compute()
    whole.update(feats[:50], labels[:50])
    check(whole.compute(), expected(feats[:50], labels[:50], 4, fc))


def test_float32_state_stays_close_and_bad_input_keeps_the_state():
    feats, labels = data(seed=3)
    metric = NeuralCollapseMetric(4, 6)
    metric.update(feats.float(), labels)
    kept = {k: v.clone() for k, v in metric.compute().items()}
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got 9"):
        metric.update(feats[:3].float(), torch.tensor([0, 9, 1]))
    check(metric.compute(), {k: v.item() for k, v in kept.items()}, rtol=0)
    check(metric.compute(), expected(feats, labels, 4), rtol=1e-4)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_classes=0, dim=3), ValueError, "num_classes must be an int >= 1, got 0"),
    (dict(num_classes=3, dim=3, classifier=nn.Conv1d(1, 1, 1)), TypeError,
     "classifier must be an nn.Linear, got Conv1d"),
    (dict(num_classes=3, dim=3, undefined="nan"), ValueError,
     "undefined must be 'raise' or 'none', got 'nan'"),
    # at construction, not at the first compute() after an epoch of updates
    (dict(num_classes=3, dim=3, global_mean="mean"), ValueError,
     "global_mean must be 'weighted' or 'unweighted', got 'mean'"),
], ids=["no-classes", "not-linear", "bad-undefined", "bad-global-mean"])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        NeuralCollapseMetric(**kwargs)


def test_is_a_torchmetrics_metric_with_forward_and_merge_state():
    torchmetrics = pytest.importorskip("torchmetrics")
    feats, labels = data(seed=1)
    metric = NeuralCollapseMetric(4, 6, dtype=torch.float64)
    assert isinstance(metric, torchmetrics.Metric)
    batch_value = metric(feats[:60], labels[:60])  # forward: this batch's value, and accumulates
    check(batch_value, expected(feats[:60], labels[:60], 4))
    other = NeuralCollapseMetric(4, 6, dtype=torch.float64)
    other.update(feats[60:], labels[60:])
    metric.merge_state(other)
    check(metric.compute(), expected(feats, labels, 4))
    collection = torchmetrics.MetricCollection({"nc": NeuralCollapseMetric(4, 6,
                                                                          dtype=torch.float64)})
    collection.update(feats, labels)
    check(collection.compute(), expected(feats, labels, 4))  # a dict result is flattened


def test_a_single_class_so_far_gives_no_metrics_unless_asked_to_raise():
    """forward on a batch of one class (or compute after one): every metric is undefined, so
    the default undefined="none" gives an empty dict (it raised 'needs at least 2 classes' in
    the middle of a training loop); undefined="raise" still raises."""
    feats, labels = data(seed=2)
    one = labels == 1
    metric = NeuralCollapseMetric(4, 6, classifier=nn.Linear(6, 4), dtype=torch.float64)
    if TORCHMETRICS:  # forward: this batch's value, and the batch is accumulated
        assert metric(feats[one], labels[one]) == {}
    else:
        metric.update(feats[one], labels[one])
    assert metric.compute() == {}
    metric.update(feats[~one], labels[~one])
    check(metric.compute(), expected(feats, labels, 4, metric.classifier))
    strict = NeuralCollapseMetric(4, 6, undefined="raise")
    strict.update(feats[one], labels[one])
    with pytest.raises(ValueError, match="needs at least 2 classes, got 1"):
        strict.compute()


def test_plain_metric_without_torchmetrics(tmp_path):
    # The same class when torchmetrics cannot be imported: a plain object, same results.
    feats, labels = data(seed=4)
    code = textwrap.dedent("""
        import json, sys
        sys.modules["torchmetrics"] = None  # makes `import torchmetrics` fail
        import torch
        from ncfast.integrations import metric
        feats, labels = torch.load(sys.argv[1])
        m = metric.NeuralCollapseMetric(4, 6, dtype=torch.float64)
        m.update(feats[:50], labels[:50])
        m.update(feats[50:], labels[50:])
        values = {k: v.item() for k, v in m.compute().items()}
        try:
            metric.NeuralCollapseMetric(4, 6, sync_on_compute=False)
        except TypeError as err:
            error = str(err)
        print(json.dumps([metric.TORCHMETRICS, values, error]))
    """)
    path = tmp_path / "data.pt"
    torch.save((feats, labels), path)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    has_torchmetrics, values, error = json.loads(out.stdout)
    assert has_torchmetrics is False
    check({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()},
          expected(feats, labels, 4))
    assert error == ("ncfast.integrations.NeuralCollapseMetric: unexpected arguments "
                     "['sync_on_compute'] (torchmetrics's options need torchmetrics installed)")


def _gloo_worker(rank, world, folder, feats, labels):
    import importlib

    import torch.distributed as dist

    from ncfast.integrations import metric
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        fc = nn.Linear(6, 4).double()
        shard = slice(rank, None, world)
        results = {"weights": (fc.weight.detach().clone(), fc.bias.detach().clone())}
        tm = metric.NeuralCollapseMetric(4, 6, classifier=fc, dtype=torch.float64)
        tm.update(feats[shard], labels[shard])
        results["torchmetrics"] = {k: v.item() for k, v in tm.compute().items()}
        results["local_after_sync"] = int(tm.stats.total)  # the rank's own state is kept
        sys.modules["torchmetrics"] = None  # the plain class: compute syncs a copy itself
        plain_metric = importlib.reload(metric)
        assert not plain_metric.TORCHMETRICS
        plain = plain_metric.NeuralCollapseMetric(4, 6, classifier=fc, dtype=torch.float64)
        if rank == 0:  # rank 1 sees nothing: it contributes an empty accumulator
            plain.update(feats, labels)
        results["plain"] = {k: v.item() for k, v in plain.compute().items()}
        results["plain_local"] = 0 if plain.stats is None else int(plain.stats.total)
        torch.save(results, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync_is_exact(tmp_path):
    pytest.importorskip("torchmetrics")
    feats, labels = data(seed=2)
    mp.start_processes(_gloo_worker, args=(2, str(tmp_path), feats, labels), nprocs=2,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    fc = nn.Linear(6, 4).double()
    with torch.no_grad():
        fc.weight.copy_(results[0]["weights"][0])
        fc.bias.copy_(results[0]["weights"][1])
    want = expected(feats, labels, 4, fc)
    for rank in (0, 1):
        check({k: torch.tensor(v, dtype=torch.float64)
               for k, v in results[rank]["torchmetrics"].items()}, want)
        check({k: torch.tensor(v, dtype=torch.float64)
               for k, v in results[rank]["plain"].items()}, want)
        assert results[rank]["local_after_sync"] == len(labels[rank::2])
    assert (results[0]["plain_local"], results[1]["plain_local"]) == (len(labels), 0)


def lightning_classifier(lightning):
    """A small LightningModule and its loader (4 batches per epoch)."""
    feats, labels = data(K=3, d=5, n=40, seed=5)
    dataset = torch.utils.data.TensorDataset(feats.float(), labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)

    class Classifier(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    return Classifier(), loader


def test_lightning_callback_measures_at_the_chosen_epochs(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from ncfast.integrations import NeuralCollapseCallback

    module, loader = lightning_classifier(lightning)
    callback = NeuralCollapseCallback(loader, every_n_epochs=0, epochs=[2])
    logger = lightning.loggers.CSVLogger(tmp_path, name="run")
    trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", logger=logger,
                                callbacks=[callback], enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                log_every_n_steps=1)
    trainer.fit(module, loader)
    assert [epoch for epoch, _ in callback.history] == [0, 2, 3]  # start, chosen, last
    final = ncfast.measure(module, loader, undefined="none")
    assert callback.history[-1][1].metrics == final.metrics
    assert callback.history[0][1].metrics.nc1 != final.metrics.nc1  # it did train in between
    assert module.training  # the mode is restored
    import csv
    with open(next(tmp_path.glob("run/*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("nc/nc1")]
    assert [float(r["nc/epoch"]) for r in rows] == [0, 2, 3]
    assert float(rows[-1]["nc/nc1"]) == pytest.approx(final.metrics.nc1)
    assert float(rows[-1]["nc/accuracy"]) == pytest.approx(final.accuracy)


def test_lightning_callback_without_an_epoch_limit_measures_only_the_chosen_epochs():
    """max_epochs=-1 (Lightning's "no limit", and what max_steps alone sets) has no last
    epoch: every epoch counted as the last one and was measured."""
    lightning = pytest.importorskip("lightning.pytorch")
    from ncfast.integrations import NeuralCollapseCallback

    module, loader = lightning_classifier(lightning)
    callback = NeuralCollapseCallback(loader, every_n_epochs=0, epochs=[2])
    trainer = lightning.Trainer(max_epochs=-1, max_steps=12, accelerator="cpu", logger=False,
                                callbacks=[callback], enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.current_epoch == 3  # three epochs of 4 steps ran
    assert [epoch for epoch, _ in callback.history] == [0, 2]


def test_lightning_callback_checks_its_arguments():
    pytest.importorskip("lightning.pytorch")
    from ncfast.integrations import NeuralCollapseCallback

    with pytest.raises(ValueError, match="every_n_epochs must be an int >= 0, got -1"):
        NeuralCollapseCallback(every_n_epochs=-1)
    with pytest.raises(ValueError, match="epochs must be ints >= 0, got 1.5"):
        NeuralCollapseCallback(epochs=[1, 1.5])


@pytest.mark.cuda
def test_metric_on_cuda_matches_the_reference():
    feats, labels = data(seed=6)
    fc = nn.Linear(6, 4).double().cuda()
    metric = NeuralCollapseMetric(4, 6, classifier=fc, dtype=torch.float64)
    for i in range(0, len(labels), 25):
        metric.update(feats[i:i + 25].cuda(), labels[i:i + 25].cuda())
    assert metric.stats.device.type == "cuda"
    check(metric.compute(), expected(feats, labels, 4, fc.cpu()))


def test_device_and_dtype_moves_carry_the_samples_seen():
    pytest.importorskip("torchmetrics")
    feats, labels = data(seed=7)
    metric = NeuralCollapseMetric(4, 6)  # float32 state
    metric.update(feats[:60].float(), labels[:60])
    assert metric.to("cpu") is metric and metric.stats.dtype == torch.float32
    metric.half()  # torchmetrics' rule: .half()/.double() keep a state's dtype
    assert metric.stats.dtype == torch.float32
    metric.set_dtype(torch.float64)
    assert metric.stats.dtype == torch.float64 and int(metric.stats.total) == 60
    metric.update(feats[60:], labels[60:])  # float64 batches now accumulate in float64
    check(metric.compute(), expected(feats, labels, 4), rtol=1e-5)
    metric.to(torch.float32)
    assert metric.stats.dtype == torch.float32 and int(metric.stats.total) == len(labels)
    check(metric.compute(), expected(feats, labels, 4), rtol=1e-5)
    with pytest.raises(TypeError, match=r"^ncfast.integrations.NeuralCollapseMetric.set_dtype: "
                       r"the statistics are kept in torch.float32 or torch.float64, got "
                       r"torch.float16$"):
        metric.set_dtype(torch.float16)
    assert metric.stats.dtype == torch.float32 and int(metric.stats.total) == len(labels)


@pytest.mark.cuda
def test_to_cuda_and_back_moves_the_state():
    pytest.importorskip("torchmetrics")
    feats, labels = data(seed=8)
    metric = NeuralCollapseMetric(4, 6, dtype=torch.float64)
    metric.update(feats[:50], labels[:50])
    holder = nn.Module()
    holder.metric = metric
    holder.cuda()  # moving a module that holds the metric moves its samples
    assert metric.stats.device.type == "cuda" and metric.device.type == "cuda"
    metric.update(feats[50:].cuda(), labels[50:].cuda())
    check(metric.compute(), expected(feats, labels, 4))
    metric.cpu()
    assert metric.stats.device.type == "cpu"
    check(metric.compute(), expected(feats, labels, 4))
