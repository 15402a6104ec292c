"""`ncfast.measure`: NC metrics of a model over a data set, from the input of its final linear
layer (theory.md 5.1), in eval mode under no_grad, exact under torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .metrics import NCMetrics, all_metrics
from .stats import ClassStats


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` returns: every metric, the accuracy, the sample count, the classes
    that had no sample (left out of the metrics, by name) and the accumulated statistics (with
    the NC4 count) for further analysis."""

    metrics: NCMetrics
    accuracy: float
    samples: int
    empty_classes: list[int]
    stats: ClassStats
    loss: float | None = None


def _final_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("ncfast.measure: model has no nn.Linear; pass classifier=<the final "
                         "linear module>")
    return linears[-1]


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (
        group is None or group != dist.GroupMember.NON_GROUP_MEMBER)


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
    """
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"ncfast.measure: cache_bytes must be an int >= 0, got {cache_bytes!r}")
    classifier = classifier if classifier is not None else _final_linear(model)
    if not isinstance(classifier, nn.Linear):
        raise TypeError(f"ncfast.measure: classifier must be an nn.Linear, got "
                        f"{type(classifier).__name__}")
    K, d = classifier.out_features, classifier.in_features
    weight = classifier.weight.detach()
    bias = classifier.bias.detach() if classifier.bias is not None else None
    device = torch.device(device) if device is not None else weight.device
    distributed = _distributed(group)

    captured: list[Tensor] = []
    hook = classifier.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().reshape(args[0].shape[0], -1)))
    was_training = model.training
    model.eval()

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    cache: list[tuple[Tensor, Tensor]] | None = [] if nc4 and cache_bytes > 0 else None
    cached_bytes = 0

    def sweep(stats: ClassStats, with_loss: bool) -> tuple[Tensor, Tensor]:
        nonlocal cache, cached_bytes
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = torch.zeros((), dtype=torch.int64, device=device)
        for inputs, labels in loader:
            captured.clear()
            logits = model(inputs.to(weight.device, non_blocking=True))
            if len(captured) != 1:
                raise RuntimeError(f"ncfast.measure: the classifier ran {len(captured)} times "
                                   f"in one forward pass; pass classifier=<the final layer>")
            labels = labels.to(device, non_blocking=True)
            features = captured[0].to(device)
            stats.update(features, labels)
            if cache is not None:
                cached_bytes += features.numel() * features.element_size()
                if cached_bytes <= cache_bytes:  # copies: a model or loader may reuse buffers
                    cache.append((features.clone(), labels.clone()))
                else:  # too large: the NC4 sweep runs the model again
                    cache = None
            correct += (logits.argmax(1).to(device) == labels).sum()
            seen += labels.numel()
            if with_loss:
                loss_sum.add_(loss_fn(logits.float(), labels.to(logits.device)).to(device)
                              * labels.numel())
        return correct, seen

    try:
        with torch.no_grad():
            stats = ClassStats(K, d, device=device, dtype=dtype)
            correct, seen = sweep(stats, loss_fn is not None)
            if distributed:
                stats.all_reduce(group)
            if nc4:
                first_means = stats.means
                stats = ClassStats(K, d, device=device, dtype=dtype, nc4_weight=weight,
                                   nc4_bias=bias, nc4_means=first_means)
                if cache is not None:
                    for features, labels in cache:
                        stats.update(features, labels)
                    cache = None
                else:
                    sweep(stats, False)
                if distributed:
                    stats.all_reduce(group)
            if distributed:
                counts = torch.stack([correct, seen])
                dist.all_reduce(counts, group=group)
                correct, seen = counts[0], counts[1]
                if loss_fn is not None:
                    dist.all_reduce(loss_sum, group=group)
    finally:
        hook.remove()
        model.train(was_training)

    present = stats.counts > 0
    classes = None if bool(present.all()) else present
    result = all_metrics(stats, weight.to(device), None if bias is None else bias.to(device),
                         global_mean=global_mean, classes=classes, undefined=undefined)
    samples = int(seen)
    return Measurement(metrics=result, accuracy=int(correct) / max(samples, 1), samples=samples,
                       empty_classes=(~present).nonzero().flatten().tolist(), stats=stats,
                       loss=float(loss_sum) / max(samples, 1) if loss_fn is not None else None)
