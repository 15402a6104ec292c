"""Metrics that need every sample again, against the class means of a first pass
(theory.md 5.12): the cosine margin (mean and distribution), nearest-class-mean
classification and the per-class nuclear/Frobenius ratio; and the feature mean of an
out-of-distribution pass for NC5. Streaming states, never the features; exact across merge
and all_reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..stats import check_state_version, checked_state_tensors
from .core import ClassStatistics, EmptyClassError, _check_stats, _class_indices

_F64 = torch.float64
MARGIN_KINDS = ("centred", "official")
_BLOCK = 2**24  # entries of a (rows, K) block of scores
STATE_VERSION = 1


def _check_state_header(op: str, state, kind: str, expected: dict) -> None:
    """A state's type, version and settings, before any of its tensors is read."""
    check_state_version(op, state, kind, STATE_VERSION)
    settings = state.get("settings")
    if not isinstance(settings, dict):
        raise ValueError(f"{op}: state['settings'] must be a dict, got "
                         f"{type(settings).__name__}")
    for key, mine in expected.items():
        theirs = settings.get(key)
        if type(theirs) is not type(mine) or theirs != mine:
            raise ValueError(f"{op}: state['settings'][{key!r}] must be {mine!r} (this "
                             f"accumulator's setting), got {theirs!r}")


def _check_features(op: str, features: Tensor, dim: int, device: torch.device) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != dim:
        shape = list(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{op}: features must be 2-D (batch, {dim}), got {shape}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"{op}: features must have a floating dtype, got {features.dtype}")
    if features.device != device:
        raise ValueError(f"{op}: features must be on the accumulator's device ({device}), got "
                         f"{features.device}")
    if features.numel() and not bool(torch.isfinite(features).all()):
        row = int((~torch.isfinite(features).all(1)).nonzero()[0])
        raise ValueError(f"{op}: features must be finite, got a NaN or Inf in row {row}")


def _gather_rows(values: Tensor, group) -> Tensor:
    """Every rank's 1-D ``values``, concatenated in rank order (sizes may differ)."""
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


class PerSampleStats:
    r"""The second pass: each sample against the first pass's class means (and classifier).

    Built from the statistics of a complete first pass (``ClassStats`` after ``all_reduce``, or
    any :class:`ncfast.metrics.ClassStatistics`), it accumulates, batch by batch:

    - with ``weight`` (K, d): the **cosine margin** of every sample (theory.md 5.12),
      cos_i(y_i) - max_{j != y_i} cos_i(j), where cos_i(j) is the cosine between the centred
      feature h_i - μ_G and the centred classifier row w_j - w̄ (``margin="centred"``), or
      (``margin="official"``) the seed paper's code: the raw logit w_j·h_i over
      ‖h_i - μ_G‖‖w_j - w̄‖. Kept as its sum, a histogram of ``margin_bins`` equal bins over
      [-2, 2] and, with ``keep_margins=True``, every value (N floats; ``margins()``). A sample
      equal to μ_G has no cosine: it is counted, and the margin's read-outs then raise
      ValueError saying how many (the other metrics are unaffected);
    - ``ncc=True``: the **nearest-class-mean accuracy**, argmin_k ‖h_i - μ_k‖ == y_i over the
      classes that had samples, in blocks of 2^24 scores (any K);
    - ``class_scatter=True``: per class, n_k, sum (h - μ_k) and sum (h - μ_k)(h - μ_k)^T about
      the first-pass means (K d^2 numbers: for moderate K only), for the **nuclear/Frobenius
      ratio** ``nf_ratio()``.

    The state dtype ``dtype`` (float32 or float64) is the arithmetic of the scores; margins,
    sums and scatters are accumulated in float64. ``merge`` and ``all_reduce`` add states built
    from the same means and classifier. A bad batch raises before the state changes.
    """

    def __init__(
        self,
        stats: ClassStatistics,
        weight: Tensor | None = None,
        *,
        ncc: bool = True,
        class_scatter: bool = False,
        margin: str = "centred",
        margin_bins: int = 2000,
        keep_margins: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        op = "ncfast.metrics.PerSampleStats"
        K, d = _check_stats(op, stats)
        if margin not in MARGIN_KINDS:
            raise ValueError(f"{op}: margin must be 'centred' or 'official', got {margin!r}")
        if isinstance(margin_bins, bool) or not isinstance(margin_bins, int) or margin_bins < 1:
            raise ValueError(f"{op}: margin_bins must be an int >= 1, got {margin_bins!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = torch.empty(0, device=stats.means.device if device is None
                                  else device).device
        self.num_classes, self.dim, self.dtype = K, d, dtype
        self.margin_kind, self.margin_bins, self.keep_margins = margin, margin_bins, keep_margins
        to = dict(device=self.device, dtype=dtype)
        counts = stats.counts.to(self.device)
        self._present = counts > 0
        if not bool(self._present.any()):
            raise EmptyClassError(f"{op}: the statistics have no samples", list(range(K)))
        means, mu_g = stats.means.to(self.device, _F64), stats.global_mean("weighted")
        mu_g = mu_g.to(self.device, _F64)
        self._means, self._mu_g = means.to(dtype), mu_g.to(dtype)
        # Nearest means from features and means centred by μ_G: under a large common offset the
        # expansion ||μ_k||^2 - 2 h.μ_k would cancel away, in float32, the class differences.
        self._centred_means = (means - mu_g).to(dtype)
        self._sq_means = torch.where(self._present, (self._centred_means.double() ** 2).sum(1),
                                     float("inf")).to(dtype)  # empty classes are never nearest
        self._ncc, self._scatter = bool(ncc), bool(class_scatter)
        self._weight = None
        if weight is not None:
            if not isinstance(weight, Tensor) or tuple(weight.shape) != (K, d):
                shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight)
                raise ValueError(f"{op}: weight must have shape [{K}, {d}], got {shape}")
            if K < 2:
                raise ValueError(f"{op}: the cosine margin needs at least 2 classes, got {K}")
            w = weight.detach().to(**to)
            wc = w - w.mean(0)
            wc_norms = torch.linalg.vector_norm(wc, dim=1)
            zero = (wc_norms == 0).nonzero().flatten().tolist()
            if zero:
                raise ValueError(f"{op}: weight rows {zero} equal the mean row; their cosine "
                                 f"margin is undefined")
            self._weight = (w if margin == "official" else wc, wc_norms)
        self.reset()

    def reset(self) -> None:
        """Forget every sample (keeps the means, the classifier and the options)."""
        K, d, dev = self.num_classes, self.dim, self.device
        self._count = torch.zeros((), dtype=torch.int64, device=dev)
        self._ncc_correct = torch.zeros((), dtype=torch.int64, device=dev)
        self._margin_sum = torch.zeros((), dtype=_F64, device=dev)
        self._margin_hist = torch.zeros(self.margin_bins, dtype=torch.int64, device=dev)
        self._margin_undefined = torch.zeros((), dtype=torch.int64, device=dev)  # h = μ_G
        self._margin_values: list[Tensor] = []
        if self._scatter:
            self._class_n = torch.zeros(K, dtype=torch.int64, device=dev)
            self._class_sum = torch.zeros(K, d, dtype=_F64, device=dev)
            self._class_scatter = torch.zeros(K, d, d, dtype=_F64, device=dev)

    # ---- accumulation

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` (B, d) float, ``labels`` (B,) int64/int32 in [0, K)."""
        op = "ncfast.metrics.PerSampleStats.update"
        _check_features(op, features, self.dim, self.device)
        if not isinstance(labels, Tensor) or labels.shape != (features.shape[0],) or \
                labels.dtype not in (torch.int64, torch.int32) or labels.device != self.device:
            shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"{op}: labels must be 1-D int64/int32 on {self.device} with one "
                             f"label per row of features ({features.shape[0]}), got {shape}")
        B = features.shape[0]
        if B == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"{op}: labels must be in [0, {self.num_classes}), got "
                             f"{lo if lo < 0 else hi}")
        h = features.to(self.dtype)
        # centred by μ_G for the margins and the nearest means; the scatter alone needs neither
        hc = h - self._mu_g if self._weight is not None or self._ncc else None
        y = labels.long()
        margins = undefined = None
        if self._weight is not None:
            centred_norms = torch.linalg.vector_norm(hc, dim=1)
            defined = centred_norms > 0  # a row equal to μ_G has no cosine
            margins = self._margins(h, hc, y, torch.where(defined, centred_norms, 1.0))
            undefined = B - int(defined.sum())
            if undefined:
                margins = margins[defined]
        # Everything above may raise; the state changes only below.
        self._count += B
        if margins is not None:
            self._margin_undefined += undefined
            self._margin_sum += margins.sum()
            bins = ((margins + 2.0) * (self.margin_bins / 4.0)).floor().long()
            self._margin_hist += torch.bincount(bins.clamp_(0, self.margin_bins - 1),
                                                minlength=self.margin_bins)
            if self.keep_margins:
                self._margin_values.append(margins)
        if self._ncc:
            self._ncc_correct += (self._nearest_means(hc) == y).sum()
        if self._scatter:
            self._add_scatter(h.to(_F64), y)

    def _row_blocks(self, B: int):
        rows = max(1, _BLOCK // self.num_classes)
        return ((r, min(r + rows, B)) for r in range(0, B, rows))

    def _margins(self, h: Tensor, hc: Tensor, y: Tensor, centred_norms: Tensor) -> Tensor:
        w, wc_norms = self._weight
        out = torch.empty(h.shape[0], dtype=_F64, device=self.device)
        for r0, r1 in self._row_blocks(h.shape[0]):
            x = (h if self.margin_kind == "official" else hc)[r0:r1]
            cos = (x @ w.T) / (centred_norms[r0:r1, None] * wc_norms[None, :])
            rows = torch.arange(r1 - r0, device=self.device)
            true = cos[rows, y[r0:r1]].clone()
            cos[rows, y[r0:r1]] = -torch.inf
            out[r0:r1] = true.double() - cos.amax(1).double()
        return out

    def _nearest_means(self, hc: Tensor) -> Tensor:
        # argmin_k ||h - mu_k||^2 = argmin_k (||mu_k - mu_G||^2 - 2 (h - mu_G).(mu_k - mu_G)),
        # ``hc`` = h - mu_G, a block of rows at a time
        out = torch.empty(hc.shape[0], dtype=torch.int64, device=self.device)
        for r0, r1 in self._row_blocks(hc.shape[0]):
            out[r0:r1] = (self._sq_means - 2.0 * (hc[r0:r1] @ self._centred_means.T)).argmin(1)
        return out

    def _add_scatter(self, h: Tensor, y: Tensor) -> None:
        centred = h - self._means.to(_F64)[y]
        self._class_n += torch.bincount(y, minlength=self.num_classes)
        self._class_sum.index_add_(0, y, centred)
        for k in torch.unique(y).tolist():
            rows = centred[y == k]
            self._class_scatter[k] += rows.T @ rows

    # ---- read-out

    @property
    def count(self) -> int:
        """Samples seen."""
        return int(self._count)

    def _need(self, what: str, ok: bool, hint: str) -> None:
        if not ok:
            raise ValueError(f"ncfast.metrics.PerSampleStats.{what}: {hint}")
        if int(self._count) == 0:
            raise ValueError(f"ncfast.metrics.PerSampleStats.{what}: no samples were added")

    def ncc_accuracy(self) -> float:
        """Fraction of samples whose nearest first-pass class mean is their own class."""
        self._need("ncc_accuracy", self._ncc, "built with ncc=False")
        return int(self._ncc_correct) / int(self._count)

    def _need_margins(self, what: str, ok: bool, hint: str) -> None:
        self._need(what, ok, hint)
        undefined = int(self._margin_undefined)
        if undefined:
            raise ValueError(f"ncfast.metrics.PerSampleStats.{what}: {undefined} of "
                             f"{int(self._count)} samples equal the global mean; their cosine "
                             f"margin is undefined")

    def cosine_margin(self) -> float:
        """Mean cosine margin over every sample seen."""
        self._need_margins("cosine_margin", self._weight is not None, "built without weight")
        return float(self._margin_sum) / int(self._count)

    def margin_histogram(self) -> tuple[Tensor, Tensor]:
        """``(edges, counts)``: ``margin_bins + 1`` float64 edges over [-2, 2] and int64 counts
        (the last bin includes 2)."""
        self._need_margins("margin_histogram", self._weight is not None, "built without weight")
        edges = torch.linspace(-2.0, 2.0, self.margin_bins + 1, dtype=_F64)
        return edges, self._margin_hist.cpu()

    def margins(self) -> Tensor:
        """Every sample's cosine margin, sorted ascending (float64), as the seed paper's code
        returns them; needs ``keep_margins=True``."""
        self._need_margins("margins", self._weight is not None and self.keep_margins,
                   "needs weight and keep_margins=True")
        return torch.cat(self._margin_values).sort().values

    def nf_ratio(self, centred: bool = True, classes=None) -> float:
        """Mean over classes of ‖X_k‖_* / ‖X_k‖_F (theory.md 5.12), X_k the n_k x d matrix
        of class k's features centred by their class mean (``centred=False``: the raw features,
        as the seed paper's code). Between 1 (rank one) and sqrt(rank); small when a class
        collapses onto a line. ``classes``: indices or a mask of the classes to average (default
        every class with samples). A centred class with no spread (one sample) is undefined:
        ValueError naming it. The singular values come from the d x d scatter in float64, so a
        class with fewer samples than dimensions (or nearly rank-deficient) loses its singular
        values below sqrt(eps) of its largest: about 1e-9 relative error per lost one."""
        op = "ncfast.metrics.PerSampleStats.nf_ratio"
        self._need("nf_ratio", self._scatter, "built with class_scatter=False")
        n = self._class_n
        idx = (n > 0).nonzero().flatten() if classes is None else \
            _class_indices(op, classes, self.num_classes, self.device)
        if not idx.numel():
            raise ValueError(f"{op}: classes must select at least one class")
        empty = idx[n[idx] == 0].tolist()
        if empty:
            raise EmptyClassError(f"{op}: classes {empty} have no samples", empty)
        nk = n[idx].to(_F64)
        s = self._class_sum[idx]
        scatter = self._class_scatter[idx] - s[:, :, None] * s[:, None, :] / nk[:, None, None]
        eig, vecs = torch.linalg.eigh(scatter)
        eig = eig.clamp_min(0.0)
        if centred:
            nuclear, frob2 = eig.sqrt().sum(1), eig.sum(1)
        else:
            # X^T X = scatter + n_k mu_k mu_k^T = B^T B with B = [sqrt(eig) V^T; sqrt(n_k) mu_k^T]:
            # the SVD of B keeps the mean's direction exact however small the spread around it
            # (an eigendecomposition of X^T X itself would lose everything below sqrt(eps)).
            mu = self._means.to(_F64)[idx] + s / nk[:, None]
            B = torch.cat([eig.sqrt()[:, :, None] * vecs.mT,
                           (nk.sqrt()[:, None] * mu)[:, None, :]], dim=1)
            nuclear = torch.linalg.svdvals(B).sum(1)
            frob2 = eig.sum(1) + nk * (mu * mu).sum(1)
        flat = (frob2 <= 0).nonzero().flatten()
        if flat.numel():
            bad = idx[flat].tolist()
            what = "no spread" if centred else "only zero features"
            raise ValueError(f"{op}: classes {bad} have {what}; their ratio is undefined "
                             f"(pass classes=...)")
        return (nuclear / frob2.sqrt()).mean().item()

    # ---- saving

    def _settings(self) -> dict:
        return {"num_classes": self.num_classes, "dim": self.dim, "margin": self.margin_kind,
                "margin_bins": self.margin_bins, "ncc": self._ncc,
                "class_scatter": self._scatter, "keep_margins": self.keep_margins,
                "weight": self._weight is not None}

    def state_dict(self) -> dict:
        """The samples' state, with the settings and the first pass's means and classifier it
        was built from; ``load_state_dict`` restores it exactly."""
        state = {"version": STATE_VERSION, "settings": self._settings(),
                 "means": self._means.clone(),
                 **{key: t.clone() for key, t in zip(self._part_names(), self._parts())}}
        if self._weight is not None:
            state["classifier"] = self._weight[0].clone()
        if self.keep_margins:
            state["margins"] = torch.cat(self._margin_values) if self._margin_values else \
                torch.zeros(0, dtype=_F64, device=self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` into an accumulator built from the same means, classifier
        and options, all or nothing: the settings, the means and classifier (equal), every
        tensor's shape, dtype and device, counts >= 0, finite sums and consistent totals are
        checked before the state is touched; any failure raises (TypeError/ValueError naming
        the entry) and leaves this accumulator as it was."""
        op = "ncfast.metrics.PerSampleStats.load_state_dict"
        _check_state_header(op, state, "PerSampleStats", self._settings())
        K, d, i64 = self.num_classes, self.dim, torch.int64
        if "margin_undefined" not in state:  # a state saved before samples equal to μ_G
            state = {**state, "margin_undefined": torch.zeros((), dtype=i64)}  # were counted
        specs = {"means": ((K, d), self.dtype), "count": ((), i64), "ncc_correct": ((), i64),
                 "margin_sum": ((), _F64), "margin_hist": ((self.margin_bins,), i64),
                 "margin_undefined": ((), i64)}
        if self._weight is not None:
            specs["classifier"] = ((K, d), self.dtype)
        if self._scatter:
            specs.update(class_n=((K,), i64), class_sum=((K, d), _F64),
                         class_scatter=((K, d, d), _F64))
        if self.keep_margins:
            margins = state.get("margins")
            rows = margins.shape[0] if isinstance(margins, Tensor) and margins.dim() == 1 else 0
            specs["margins"] = ((rows,), _F64)
        new = checked_state_tensors(op, state, specs, self.device)
        classifier = None if self._weight is None else self._weight[0]
        for key, mine in (("means", self._means), ("classifier", classifier)):
            if key in new and not torch.equal(new[key], mine):
                raise ValueError(f"{op}: state[{key!r}] must equal the {key} this accumulator "
                                 f"was built from")
        count = int(new["count"])
        undefined = int(new["margin_undefined"])
        totals = {"ncc_correct": int(new["ncc_correct"])}
        if self._weight is not None:
            # samples equal to μ_G have no margin, so no bin
            totals["margin_hist"] = int(new["margin_hist"].sum()) + undefined
        elif undefined:
            raise ValueError(f"{op}: state['margin_undefined'] must be 0 for an accumulator "
                             f"built without weight, got {undefined}")
        if self._scatter:
            totals["class_n"] = int(new["class_n"].sum())
        if self.keep_margins and self._weight is not None:
            totals["margins"] = new["margins"].numel() + undefined
        for key, total in totals.items():
            if total > count if key == "ncc_correct" else total != count:
                rule = "<=" if key == "ncc_correct" else "=="
                raise ValueError(f"{op}: state[{key!r}] must count {rule} state['count'] "
                                 f"({count}) samples, got {total}")
        # Everything checked: commit at once.
        for name, value in zip(self._part_names(), (new[k] for k in self._part_names())):
            setattr(self, "_" + name, value)
        self._margin_values = [new["margins"]] if self.keep_margins and count else []

    # ---- combining

    def _part_names(self) -> list[str]:
        names = ["count", "ncc_correct", "margin_sum", "margin_hist", "margin_undefined"]
        return names + (["class_n", "class_sum", "class_scatter"] if self._scatter else [])

    def _parts(self) -> list[Tensor]:
        return [getattr(self, "_" + name) for name in self._part_names()]

    @torch.no_grad()
    def merge(self, other: "PerSampleStats") -> "PerSampleStats":
        """Add another accumulator's samples (built from the same means and classifier)."""
        op = "ncfast.metrics.PerSampleStats.merge"
        if not isinstance(other, PerSampleStats):
            raise TypeError(f"{op}: other must be a PerSampleStats, got {type(other).__name__}")
        same = (other.num_classes, other.dim, other.margin_kind, other.margin_bins,
                other._ncc, other._scatter, other.keep_margins) == (
                self.num_classes, self.dim, self.margin_kind, self.margin_bins, self._ncc,
                self._scatter, self.keep_margins) \
            and torch.equal(other._means.to(self.device), self._means) \
            and (other._weight is None) == (self._weight is None) \
            and (self._weight is None or torch.equal(other._weight[0].to(self.device),
                                                     self._weight[0]))
        if not same:
            raise ValueError(f"{op}: both accumulators must be built from the same means, "
                             f"classifier and options")
        for mine, theirs in zip(self._parts(), other._parts()):
            mine += theirs.to(self.device)
        self._margin_values += [v.to(self.device) for v in other._margin_values]
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "PerSampleStats":
        """Sum the states of every rank in ``group`` (kept margins are gathered in rank
        order); every rank ends with the same state. Without an initialised process group (one
        process) a no-op, as :meth:`ncfast.ClassStats.all_reduce`. Returns self."""
        if not dist.is_available() or not dist.is_initialized():
            return self
        for part in self._parts():
            dist.all_reduce(part, group=group)
        if self.keep_margins:
            local = torch.cat(self._margin_values) if self._margin_values else \
                torch.zeros(0, dtype=_F64, device=self.device)
            self._margin_values = [_gather_rows(local, group)]
        return self


class FeatureMean:
    """Streaming mean of features with no labels, for an out-of-distribution pass (NC5):
    float64 sums about the first sample (no cancellation), exact across merge and all_reduce."""

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"ncfast.metrics.FeatureMean: dim must be an int >= 1, got {dim!r}")
        self.dim = dim
        self.device = torch.empty(0, device="cpu" if device is None else device).device
        self.reset()

    def reset(self) -> None:
        self._count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._shift = None  # (d,) float64, the first sample
        self._sum = torch.zeros(self.dim, dtype=_F64, device=self.device)

    @torch.no_grad()
    def update(self, features: Tensor) -> None:
        """Add a batch of features (B, d); a bad batch raises and changes nothing."""
        _check_features("ncfast.metrics.FeatureMean.update", features, self.dim, self.device)
        if features.shape[0] == 0:
            return
        h = features.to(_F64)
        if self._shift is None:
            self._shift = h[0].clone()
        self._sum += (h - self._shift).sum(0)
        self._count += h.shape[0]

    @property
    def count(self) -> int:
        return int(self._count)

    @property
    def mean(self) -> Tensor:
        """(d,) float64 mean of every feature seen."""
        if int(self._count) == 0:
            raise ValueError("ncfast.metrics.FeatureMean.mean: no samples were added")
        return self._shift + self._sum / int(self._count)

    def state_dict(self) -> dict:
        """Count, reference point and shifted sum; ``load_state_dict`` restores them exactly."""
        shift = self._shift if self._shift is not None else self._sum.new_zeros(self.dim)
        return {"version": STATE_VERSION, "settings": {"dim": self.dim},
                "count": self._count.clone(),
                "shift": shift.clone(), "sum": self._sum.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``, all or nothing: dim, shapes, dtypes, devices, count >= 0
        and finite sums are checked first (TypeError/ValueError naming the entry); a failure
        leaves this accumulator as it was."""
        op = "ncfast.metrics.FeatureMean.load_state_dict"
        _check_state_header(op, state, "FeatureMean", {"dim": self.dim})
        d = self.dim
        new = checked_state_tensors(op, state, {"count": ((), torch.int64), "shift": ((d,), _F64),
                                                "sum": ((d,), _F64)}, self.device)
        if int(new["count"]) == 0 and bool(new["sum"].any()):
            raise ValueError(f"{op}: state['sum'] must be zero when state['count'] is 0")
        self._count, self._sum = new["count"], new["sum"]
        self._shift = new["shift"] if int(new["count"]) else None

    @torch.no_grad()
    def merge(self, other: "FeatureMean") -> "FeatureMean":
        if not isinstance(other, FeatureMean):
            raise TypeError(f"ncfast.metrics.FeatureMean.merge: other must be a FeatureMean, "
                            f"got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"ncfast.metrics.FeatureMean.merge: other must be a FeatureMean "
                             f"of dim {self.dim}, got {other!r}")
        if int(other._count):
            if self._shift is None:
                self._shift = other._shift.to(self.device).clone()
            n_b = int(other._count)
            self._sum += other._sum.to(self.device) + n_b * (other._shift.to(self.device)
                                                              - self._shift)
            self._count += n_b
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "FeatureMean":
        """Combine every rank's samples: one all-reduce of (n_r, n_r mean_r). Without an
        initialised process group (one process) a no-op, as :meth:`ncfast.ClassStats.all_reduce`.
        Returns self."""
        if not dist.is_available() or not dist.is_initialized():
            return self
        n = int(self._count)
        local = torch.cat([torch.tensor([float(n)], dtype=_F64, device=self.device),
                           n * self.mean if n else torch.zeros(self.dim, dtype=_F64,
                                                               device=self.device)])
        dist.all_reduce(local, group=group)
        total = int(round(float(local[0])))
        self.reset()
        if total:
            self._shift = local[1:] / total
            self._count += total
        return self

    def __repr__(self) -> str:
        return f"FeatureMean(dim={self.dim}, device={self.device}, samples={int(self._count)})"
