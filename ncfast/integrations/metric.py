"""Neural collapse as a streaming metric for a user's own loop: ``update`` / ``compute`` /
``reset`` / ``merge`` on a :class:`ncfast.ClassStats`, synchronised across processes exactly
(its centred all-reduce) and a no-op on one process. Where torchmetrics is installed the
metric is a ``torchmetrics.Metric`` (sync, ``forward``, ``merge_state``, MetricCollection)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..metrics import all_metrics
from ..metrics.core import _check_global_mean
from ..stats import ClassStats

__all__ = ["NeuralCollapseMetric", "TORCHMETRICS"]

try:  # optional: without torchmetrics the metric is a plain object with the same methods
    from torchmetrics import Metric as _Base

    TORCHMETRICS = True
except ImportError:
    _Base = object
    TORCHMETRICS = False

_OP = "ncfast.integrations.NeuralCollapseMetric"
# nn.Module methods whose dtype change torchmetrics does not apply to metric states
_KEEP_DTYPE = ("Module.type", "Module.half", "Module.float", "Module.double", "Module.bfloat16")


def _copy(stats: ClassStats, device: torch.device | None = None,
          dtype: torch.dtype | None = None) -> ClassStats:
    """An independent accumulator with the same samples, optionally moved or re-typed."""
    device = stats.device if device is None else device
    clone = ClassStats(stats.num_classes, stats.dim, device=device,
                       dtype=stats.dtype if dtype is None else dtype)
    clone.load_state_dict({key: value.to(device) if isinstance(value, Tensor) else value
                           for key, value in stats.state_dict().items()})
    return clone


class NeuralCollapseMetric(_Base):
    """NC1-NC3, CDNV and the bias quantity of the features seen so far (theory.md 5).

    ``update(features, labels)`` adds a batch: ``features`` (B, d) are the inputs of the final
    linear layer, ``labels`` (B,) integer classes. ``compute()`` returns a dict of 0-dim
    float64 tensors named as the fields of :class:`ncfast.metrics.NCMetrics` (``nc1``,
    ``nc1_trace``, ``nc2_means``, ``cdnv``, ...), ready for ``log_dict``; with ``classifier``
    (the final ``nn.Linear``, read when ``compute`` runs) it adds NC2/NC3 of the classifier and
    ``bias_norm``. A metric the statistics leave undefined (say CDNV while two class means
    coincide, or every metric while a single class has been seen) is left out of the dict,
    unless ``undefined="raise"``. NC4 needs class means
    from a finished pass and is not computed here (:func:`ncfast.measure` makes that second
    pass). Classes with no sample yet are left out of the metrics.

    Distributed: under an initialised ``torch.distributed`` process group ``compute`` combines
    every rank's statistics with :meth:`ClassStats.all_reduce` (exact: centred quantities, two
    collectives) and leaves each rank's own accumulator as it was, so updates continue locally;
    without a process group it is a no-op. ``merge(other)`` adds another metric's samples.

    The accumulator lives on the device of the first batch (float32 by default; ``dtype``
    float64 for references) and follows the metric's moves as torchmetrics states do:
    ``metric.to(device)`` / ``.cuda()`` / ``.cpu()`` (or moving a module that holds it) moves
    the samples seen so far; ``.to(torch.float64)`` and ``set_dtype`` re-type them (to float32
    or float64 only; ``set_dtype`` to another dtype is a TypeError), while ``.half()``,
    ``.float()`` and ``.double()`` leave them as they are (torchmetrics' rule for states).
    ``undefined`` and ``global_mean`` are passed to :func:`ncfast.metrics.all_metrics`; the default ``"none"`` gives None, with the reason in
    ``NCMetrics.undefined``, for a metric the statistics cannot define yet.
    """

    # torchmetrics: compute needs the whole state (no per-batch reduction of values).
    full_state_update = True
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_classes: int, dim: int, *, classifier: nn.Linear | None = None,
                 dtype: torch.dtype = torch.float32, undefined: str = "none",
                 global_mean: str = "weighted", process_group=None, **kwargs) -> None:
        if TORCHMETRICS:
            super().__init__(process_group=process_group, **kwargs)
        elif kwargs:
            raise TypeError(f"{_OP}: unexpected arguments {sorted(kwargs)} (torchmetrics's "
                            f"options need torchmetrics installed)")
        else:
            self.process_group = process_group
        if classifier is not None and not isinstance(classifier, nn.Linear):
            raise TypeError(f"{_OP}: classifier must be an nn.Linear, got "
                            f"{type(classifier).__name__}")
        ClassStats(num_classes, dim, dtype=dtype)  # the same argument checks, at construction
        if undefined not in ("raise", "none"):
            raise ValueError(f"{_OP}: undefined must be 'raise' or 'none', got {undefined!r}")
        _check_global_mean(_OP, global_mean)
        self.num_classes, self.dim, self.stats_dtype = num_classes, dim, dtype
        self.undefined, self.global_mean = undefined, global_mean
        # A reference, not a submodule: the metric must not own, move or save the classifier.
        self.__dict__["classifier"] = classifier
        self.__dict__["stats"] = None

    # ---- the metric protocol

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` (B, d), ``labels`` (B,); a bad batch raises and leaves the
        state as it was (see :meth:`ncfast.ClassStats.update`)."""
        if self.stats is None:
            stats = ClassStats(self.num_classes, self.dim, device=features.device,
                               dtype=self.stats_dtype)
            stats.update(features.detach(), labels)
            self.__dict__["stats"] = stats
        else:
            self.stats.update(features.detach(), labels)

    def compute(self) -> dict[str, Tensor]:
        """The metrics over every sample seen (on every rank, under torch.distributed)."""
        stats = self.stats
        if not TORCHMETRICS and _distributed():  # torchmetrics syncs before compute itself
            stats = self._empty() if stats is None else _copy(stats)
            stats.all_reduce(self.process_group)
        if stats is None or int(stats.total) == 0:
            raise ValueError(f"{_OP}.compute: no samples yet; call update first")
        present = stats.counts > 0
        if int(present.sum()) < 2 and self.undefined == "none":
            return {}  # one class seen so far (a batch in forward, say): nothing is defined yet
        weight = bias = None
        if self.classifier is not None:
            weight = self.classifier.weight.detach().to(stats.device)
            if self.classifier.bias is not None:
                bias = self.classifier.bias.detach().to(stats.device)
        result = all_metrics(stats, weight, bias, global_mean=self.global_mean,
                             classes=None if bool(present.all()) else present,
                             undefined=self.undefined)
        return {name: torch.tensor(value, dtype=torch.float64)
                for name, value in result.as_dict().items() if value is not None}

    def reset(self) -> None:
        """Forget every sample."""
        if TORCHMETRICS:
            super().reset()
        self.__dict__["stats"] = None

    def merge(self, other: "NeuralCollapseMetric") -> "NeuralCollapseMetric":
        """Add ``other``'s samples (exact pairwise merge); ``other`` is unchanged. Returns
        self."""
        if not isinstance(other, NeuralCollapseMetric):
            raise TypeError(f"{_OP}.merge: other must be a NeuralCollapseMetric, got "
                            f"{type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(f"{_OP}.merge: other must have num_classes={self.num_classes} "
                             f"and dim={self.dim}, got {other.num_classes} and {other.dim}")
        if other.stats is not None:
            if self.stats is None:
                self.__dict__["stats"] = _copy(other.stats)
            else:
                self.stats.merge(other.stats)
        if TORCHMETRICS:
            self._computed = None
        return self

    # ---- torchmetrics hooks: the state is the ClassStats, synchronised by its exact merge

    def _apply(self, fn, *args, **kwargs):
        # nn.Module.to/cuda/cpu/set_dtype end here; torchmetrics moves only add_state states,
        # so the accumulator (kept out of them: its exact merge is the sync) is moved here.
        this = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.zeros((), dtype=self.stats_dtype,
                               device="cpu" if self.stats is None else self.stats.device))
        dtype, explicit = self.stats_dtype, getattr(self, "_dtype_convert", False)
        # torchmetrics' rule: .half()/.float()/.double()/.type() keep the states' dtype, .to(dtype)
        # and set_dtype change it; here only to float32/float64, what ClassStats accumulates in.
        typed = explicit or not any(name in str(fn) for name in _KEEP_DTYPE)
        if typed and probe.dtype != dtype:
            if probe.dtype in (torch.float32, torch.float64):
                dtype = probe.dtype
            elif explicit:
                raise TypeError(f"{_OP}.set_dtype: the statistics are kept in torch.float32 "
                                f"or torch.float64, got {probe.dtype}")
        if self.stats is not None and (probe.device != self.stats.device or
                                       dtype != self.stats.dtype):
            self.__dict__["stats"] = _copy(self.stats, probe.device, dtype)
        self.stats_dtype = dtype
        if TORCHMETRICS:  # torchmetrics re-typed its cached result; compute it again (float64)
            self._computed = None
        return this

    def merge_state(self, incoming_state) -> None:
        """torchmetrics' name for :meth:`merge` (a metric or one's ``nc_state``)."""
        if isinstance(incoming_state, NeuralCollapseMetric):
            self.merge(incoming_state)
        else:
            self._load_nc_state(incoming_state, add=True)

    def _copy_state_dict(self) -> dict:
        # torchmetrics caches this before a sync and restores it with setattr(self, name, ...)
        return {"nc_state": None if self.stats is None else self.stats.state_dict()}

    @property
    def nc_state(self) -> dict | None:
        """The accumulator's state_dict (None before the first update)."""
        return None if self.stats is None else self.stats.state_dict()

    @nc_state.setter
    def nc_state(self, state: dict | None) -> None:
        self._load_nc_state(state, add=False)

    def _load_nc_state(self, state, add: bool) -> None:
        if isinstance(state, dict) and "nc_state" in state:
            state = state["nc_state"]
        if state is None:
            if not add:
                self.__dict__["stats"] = None
            return
        device = state["counts"].device
        stats = ClassStats(self.num_classes, self.dim, device=device, dtype=self.stats_dtype)
        stats.load_state_dict(state)
        if add and self.stats is not None:
            self.stats.merge(stats)
        else:
            self.__dict__["stats"] = stats

    def _reduce_states(self, incoming_state: dict) -> None:
        self._load_nc_state(incoming_state, add=True)

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        if self.stats is None:  # this rank saw nothing yet: it contributes an empty accumulator
            self.__dict__["stats"] = self._empty()
        self.stats.all_reduce(process_group or self.process_group)

    def _empty(self) -> ClassStats:
        """An accumulator with no sample, on the classifier's device (else the CPU)."""
        device = self.classifier.weight.device if self.classifier is not None else None
        return ClassStats(self.num_classes, self.dim, device=device, dtype=self.stats_dtype)

    def __repr__(self) -> str:
        return (f"NeuralCollapseMetric(num_classes={self.num_classes}, dim={self.dim}, "
                f"samples={0 if self.stats is None else int(self.stats.total)})")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
