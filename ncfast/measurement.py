"""`ncfast.measure`: NC metrics of a model over a data set, from the input of its final linear
layer (theory.md 5.1), in eval mode under no_grad, exact under torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import metrics as _metrics
from .metrics import FeatureMean, NCMetrics, PerSampleStats, all_metrics
from .metrics.core import check_distance_exponent
from .stats import ClassStats

# Extra metrics (theory.md 5.10-5.12) that measure reports on request; "unc3" is cheap
# (O(K d)) and on by default. The per-sample ones add a second sweep (as NC4's, shared with it).
EXTRAS = ("unc3", "cosine_margin", "ncc_accuracy", "nf_ratio", "gnc2", "nc5")
PER_SAMPLE_EXTRAS = ("cosine_margin", "ncc_accuracy", "nf_ratio")


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` returns: every metric, the top-1 and top-5 accuracy, the sample
    count, the classes that had no sample (left out of the metrics, by name) and the
    accumulated statistics (with the NC4 count) for further analysis; ``extra`` holds the
    requested extra metrics by name (None, with the reason in ``metrics.undefined``, where
    undefined), ``per_sample`` the second-pass state (margin histogram, kept margins) and
    ``ood`` the OOD feature mean when they were measured."""

    metrics: NCMetrics
    accuracy: float
    samples: int
    empty_classes: list[int]
    stats: ClassStats
    loss: float | None = None
    top5_accuracy: float | None = None
    extra: dict[str, float | None] = field(default_factory=dict)
    per_sample: PerSampleStats | None = None
    ood: FeatureMean | None = None


def final_linear(model: nn.Module) -> nn.Linear:
    """The classifier ncfast tracks by default: the last ``nn.Linear`` in ``model.modules()``
    (registration order)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("ncfast.measure: model has no nn.Linear; pass classifier=<the final "
                         "linear module>")
    return linears[-1]


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (
        group is None or group != dist.GroupMember.NON_GROUP_MEMBER)


def _check_extras(extras, ood_loader) -> tuple[str, ...]:
    if isinstance(extras, str):
        extras = (extras,)
    extras = tuple(extras)
    bad = [e for e in extras if e not in EXTRAS]
    if bad:
        raise ValueError(f"ncfast.measure: extras must be names from {list(EXTRAS)}, got {bad}")
    if "nc5" in extras and ood_loader is None:
        raise ValueError("ncfast.measure: extras 'nc5' needs ood_loader=<out-of-distribution "
                         "data>")
    if ood_loader is not None and "nc5" not in extras:
        extras += ("nc5",)
    return extras


def _reraise(err: Exception):
    raise err


def _extra_metrics(extras, stats, weight, per_sample, ood, classes, global_mean, cdnv_exponents,
                   undefined, reasons, margin_error=None) -> dict[str, float | None]:
    """The requested extra metrics by name; undefined ones are None (reason in ``reasons``)
    when ``undefined="none"``. ``margin_error``: why the second sweep could not take the
    cosine margin (a classifier row equal to the mean row)."""
    out: dict[str, float | None] = {}

    def put(name, compute):
        if undefined == "raise":
            out[name] = compute()
            return
        try:
            out[name] = compute()
        except ValueError as err:
            out[name] = None
            reasons[name] = str(err)

    if "unc3" in extras:
        put("unc3", lambda: _metrics.unc3(weight, stats, global_mean=global_mean, classes=classes))
    for p in cdnv_exponents:
        put(f"cdnv_p{p:g}", lambda p=p: _metrics.cdnv(stats, None, classes, distance_exponent=p))
    if "gnc2" in extras:
        try:
            kernels = _metrics.gnc2(stats, global_mean=global_mean, classes=classes)
        except ValueError as err:
            if undefined == "raise":
                raise
            kernels, reasons["gnc2"] = {}, str(err)
        for name in _metrics.pairwise.KERNELS:
            value = kernels.get(name)
            out[f"gnc2_{name}_mean"] = None if value is None else value.mean
            out[f"gnc2_{name}_var"] = None if value is None else value.variance
    if "cosine_margin" in extras:
        put("cosine_margin", per_sample.cosine_margin if margin_error is None else
            lambda: _reraise(margin_error))
    if "ncc_accuracy" in extras:
        put("ncc_accuracy", per_sample.ncc_accuracy)
    if "nf_ratio" in extras:
        put("nf_ratio", lambda: per_sample.nf_ratio(classes=classes))
    if "nc5" in extras:
        put("nc5", lambda: _metrics.nc5(stats, ood.mean, classes=classes))
    return out


def measure(
    model: nn.Module,
    loader: Iterable,
    classifier: nn.Linear | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    nc4: bool = True,
    global_mean: str = "weighted",
    group=None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    undefined: str = "raise",
    cache_bytes: int = 2**30,
    extras: Collection[str] = ("unc3",),
    ood_loader: Iterable | None = None,
    cdnv_exponents: Collection[float] = (),
) -> Measurement:
    """Measure neural collapse of ``model`` over ``loader`` (batches ``(inputs, labels)``).

    Features are the input of ``classifier`` (default: the last ``nn.Linear`` in
    ``model.modules()``), flattened to (B, d); W and b are its weight and bias. The model runs in
    eval mode (BatchNorm uses running statistics) under no_grad, and its training flag is
    restored afterwards. Use an un-augmented loader (the training set, as the paper does).

    With ``nc4=True`` the data are swept twice: NC4 compares each sample's nearest class mean
    (means from the complete first sweep, across all ranks) with the classifier's prediction.
    The first sweep keeps its features on ``device`` while they take at most ``cache_bytes``
    (per process; default 1 GiB), and the second then reuses them instead of running the model
    again; larger data sets run the model twice.
    Under torch.distributed each rank passes its own shard (e.g. a DistributedSampler); the
    statistics, accuracy and NC4 counts are combined exactly and every rank gets the result.
    With ``loss_fn(logits, labels)`` (a batch mean) the result also holds the mean loss over
    every sample, from the first sweep. ``undefined`` is passed to
    :func:`ncfast.metrics.all_metrics` ("none": undefined metrics are None, with the reason).

    ``extras`` names extra metrics for ``Measurement.extra`` (theory.md 5.10-5.12):
    ``"unc3"`` (default, O(K d)); ``"gnc2"`` (the three hyperspherical kernels' mean and
    variance, ``gnc2_<kernel>_mean``/``_var``: a tiled K x K sweep); the per-sample ones, made
    in the second sweep (shared with NC4's): ``"cosine_margin"`` (mean; the histogram is in
    ``Measurement.per_sample``), ``"ncc_accuracy"`` and ``"nf_ratio"`` (K d^2 of state); and
    ``"nc5"``, implied by ``ood_loader`` (batches ``(inputs, ...)`` or inputs), whose features'
    mean is taken in one more sweep. ``cdnv_exponents`` adds CDNV at each distance exponent p
    as ``cdnv_p<p>``. Top-5 accuracy is always reported.
    """
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"ncfast.measure: cache_bytes must be an int >= 0, got {cache_bytes!r}")
    extras = _check_extras(extras, ood_loader)
    if isinstance(cdnv_exponents, (str, bytes)) or not isinstance(cdnv_exponents, Iterable):
        raise TypeError(f"ncfast.measure: cdnv_exponents must be a collection of numbers, got "
                        f"{type(cdnv_exponents).__name__}")
    # checked before the data are swept; a bad value is an error, never an undefined metric
    cdnv_exponents = tuple(check_distance_exponent("ncfast.measure", "each of cdnv_exponents", p)
                           for p in cdnv_exponents)
    per_sample_extras = [e for e in extras if e in PER_SAMPLE_EXTRAS]
    classifier = classifier if classifier is not None else final_linear(model)
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"ncfast.measure: classifier must be an nn.Linear, got "
                        f"{type(classifier).__name__}")
    K, d = classifier.out_features, classifier.in_features
    weight = classifier.weight.detach()
    bias = classifier.bias.detach() if classifier.bias is not None else None
    device = torch.device(device) if device is not None else weight.device
    distributed = _distributed(group)
    second_sweep = nc4 or bool(per_sample_extras)

    captured: list[Tensor] = []
    hook = classifier.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().reshape(args[0].shape[0], -1)))
    was_training = model.training
    model.eval()

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    cache: list[tuple[Tensor, Tensor]] | None = [] if second_sweep and cache_bytes > 0 else None
    cached_bytes = 0

    def features_of(inputs: Tensor) -> tuple[Tensor, Tensor]:
        captured.clear()
        logits = model(inputs.to(weight.device, non_blocking=True))
        if len(captured) != 1:
            raise RuntimeError(f"ncfast.measure: the classifier ran {len(captured)} times "
                               f"in one forward pass; pass classifier=<the final layer>")
        return captured[0].to(device), logits

    def sweep(consumers, first: bool) -> tuple[Tensor, Tensor, Tensor]:
        nonlocal cache, cached_bytes
        correct = torch.zeros((), dtype=torch.int64, device=device)
        correct5 = torch.zeros((), dtype=torch.int64, device=device)
        seen = torch.zeros((), dtype=torch.int64, device=device)
        for inputs, labels in loader:
            features, logits = features_of(inputs)
            labels = labels.to(device, non_blocking=True)
            for consumer in consumers:
                consumer.update(features, labels)
            if not first:
                continue
            if cache is not None:
                cached_bytes += features.numel() * features.element_size()
                if cached_bytes <= cache_bytes:  # copies: a model or loader may reuse buffers
                    cache.append((features.clone(), labels.clone()))
                else:  # too large: the second sweep runs the model again
                    cache = None
            top = logits.topk(min(5, K), dim=1).indices.to(device)
            correct += (top[:, 0] == labels).sum()
            correct5 += (top == labels[:, None]).any(1).sum()
            seen += labels.numel()
            if loss_fn is not None:
                loss_sum.add_(loss_fn(logits.float(), labels.to(logits.device)).to(device)
                              * labels.numel())
        return correct, correct5, seen

    per_sample = ood = margin_error = None
    try:
        with torch.no_grad():
            stats = ClassStats(K, d, device=device, dtype=dtype)
            correct, correct5, seen = sweep([stats], True)
            if distributed:
                stats.all_reduce(group)
            if second_sweep:
                consumers = []
                if per_sample_extras:
                    options = dict(ncc="ncc_accuracy" in extras,
                                   class_scatter="nf_ratio" in extras, device=device, dtype=dtype)
                    try:
                        per_sample = PerSampleStats(
                            stats, weight if "cosine_margin" in extras else None, **options)
                    except ValueError as err:  # a classifier row that has no cosine margin
                        if undefined == "raise":
                            raise
                        margin_error = err
                        per_sample = PerSampleStats(stats, None, **options)
                    consumers.append(per_sample)
                if nc4:  # classes the first sweep did not see have no mean to be nearest to
                    first_means = torch.where((stats.counts > 0)[:, None], stats.means, torch.nan)
                    stats = ClassStats(K, d, device=device, dtype=dtype, nc4_weight=weight,
                                       nc4_bias=bias, nc4_means=first_means)
                    consumers.append(stats)
                if cache is not None:
                    for features, labels in cache:
                        for consumer in consumers:
                            consumer.update(features, labels)
                    cache = None
                else:
                    sweep(consumers, False)
                if distributed:
                    for consumer in consumers:
                        consumer.all_reduce(group)
            if ood_loader is not None:
                ood = FeatureMean(d, device=device)
                for batch in ood_loader:
                    ood.update(features_of(batch[0] if isinstance(batch, (tuple, list))
                                           else batch)[0])
                if distributed:
                    ood.all_reduce(group)
            if distributed:
                counts = torch.stack([correct, correct5, seen])
                dist.all_reduce(counts, group=group)
                correct, correct5, seen = counts[0], counts[1], counts[2]
                if loss_fn is not None:
                    dist.all_reduce(loss_sum, group=group)
    finally:
        hook.remove()
        model.train(was_training)

    present = stats.counts > 0
    classes = None if bool(present.all()) else present
    result = all_metrics(stats, weight.to(device), None if bias is None else bias.to(device),
                         global_mean=global_mean, classes=classes, undefined=undefined)
    extra = _extra_metrics(extras, stats, weight.to(device), per_sample, ood, classes,
                           global_mean, cdnv_exponents, undefined, result.undefined, margin_error)
    samples = int(seen)
    return Measurement(metrics=result, accuracy=int(correct) / max(samples, 1), samples=samples,
                       empty_classes=(~present).nonzero().flatten().tolist(), stats=stats,
                       loss=float(loss_sum) / max(samples, 1) if loss_fn is not None else None,
                       top5_accuracy=int(correct5) / max(samples, 1), extra=extra,
                       per_sample=per_sample, ood=ood)
