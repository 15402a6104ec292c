"""Streaming per-class statistics for the NC metrics (theory.md 5.2, 5.8): class counts and
means, the pooled within-class scatter, per-class variances and, optionally, the NC4 count; in
one pass, mergeable exactly across batches, shards and processes."""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import Tensor

from ._gram import fill_lower, upper_blocks

_UPDATE = "ncfast.ClassStats.update"


class NonFiniteFeaturesError(ValueError):
    """A batch with NaN/Inf features, or features too large for the state dtype."""


class StatisticsOverflowError(NonFiniteFeaturesError):
    """Batches that each fit the state dtype, but whose accumulated sums overflow it."""

STATE_VERSION = 1
CHECK_MODES = (True, False, "immediate", "deferred")


def _same_key(a: tuple, b: tuple) -> bool:
    # the very same tensors (weak references: a replaced state is freed, not kept alive by
    # the cache, and a dead reference matches nothing), unchanged in place
    return all(ra() is not None and ra() is rb() and va == vb
               for (ra, va), (rb, vb) in zip(a, b))


def check_state_version(op: str, state, kind: str, version: int) -> None:
    """A saved state is a dict of the expected version (before any entry is read)."""
    if not isinstance(state, dict):
        raise TypeError(f"{op}: state must be a dict (from state_dict()), got "
                        f"{type(state).__name__}")
    if state.get("version") != version:
        raise ValueError(f"{op}: expected a {kind} state of version {version}, got version "
                         f"{state.get('version')!r}")


def checked_state_tensors(op: str, state: dict, specs: dict, device: torch.device) -> dict:
    """The tensors ``specs`` names, checked and copied before an accumulator's state is touched
    (its ``load_state_dict`` then commits them at once). ``specs[key] = (shape, dtype)``: an
    integer dtype takes int32/int64 entries, which must be >= 0; a floating one takes
    float32/float64 entries, which must be finite in it. Entries on the CPU or on ``device``
    are accepted. Raises TypeError/ValueError naming the entry, the rule and the value."""
    missing = [key for key in specs if key not in state]
    if missing:
        raise ValueError(f"{op}: state lacks the entries {missing}")
    new = {}
    for key, (shape, dtype) in specs.items():
        t = state[key]
        integral = not dtype.is_floating_point
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: state[{key!r}] must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{op}: state[{key!r}] must have shape {list(shape)}, got "
                             f"{list(t.shape)}")
        allowed = (torch.int64, torch.int32) if integral else (torch.float32, torch.float64)
        if t.dtype not in allowed:
            raise TypeError(f"{op}: state[{key!r}] must have dtype "
                            f"{' or '.join(map(str, allowed))}, got {t.dtype}")
        if t.device.type != "cpu" and t.device != device:
            raise ValueError(f"{op}: state[{key!r}] must be on the CPU or on {device}, "
                             f"got {t.device}")
        t = t.detach().to(device=device, dtype=dtype, copy=True)
        bad = (t < 0).any() if integral else ~t.isfinite().all()
        if t.numel() and bool(bad):
            rule = ">= 0" if integral else f"finite in {dtype}"
            raise ValueError(f"{op}: state[{key!r}] must be {rule}, got "
                             f"{t.min().item() if integral else 'NaN or Inf'}")
        new[key] = t
    return new


_NC4_SAME = ("NC4 counts must be made against the same classifier (nc4_weight, nc4_bias) and "
             "means (nc4_means) to be combined; counts against different ones give no NC4")


def _common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both in the narrower of their dtypes (a float32 and a float64 accumulator built from
    the same classifier hold it rounded to their own dtype)."""
    dtype = a.dtype if a.element_size() <= b.element_size() else b.dtype
    return a.to(dtype), b.to(dtype)


def _nc4_fingerprint(nc4: tuple | None, device: torch.device) -> Tensor:
    """A float64 number that differs, but for a coincidence, between NC4 set-ups (classifier,
    bias and means) to float32 resolution, as merge compares a float32 and a float64 one: each
    entry weighted by its position, so a permutation changes it too."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in nc4 or ():
        x = t.float().double().reshape(t.shape[0], -1)  # (K, d) or (K, 1)
        x = torch.where(x.isinf(), -1.0, x)  # the inf norms of classes with no mean
        # sum_kj (k + 1)(j + 1) x_kj as two matrix-vector products: no (K, d) weight grid
        rows, cols = (torch.arange(1, n + 1, dtype=torch.float64, device=device)
                      for n in x.shape)
        total += rows @ (x @ cols)
    return total


def _about_means(counts: Tensor, sums: Tensor, sq: Tensor,
                 gram: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """(M2, per-class sum ||h - mu_k||^2) in float64 from a shifted state's n_k, S_k,
    sum ||h - c_k||^2 and Q (theory.md 5.8); M2 is None when ``gram`` is."""
    n = counts.clamp(min=1).double()
    s = sums.double() * (counts > 0)[:, None]
    m2 = None if gram is None else gram.double() - (s / n[:, None]).T @ s
    return m2, sq.double() - (s * s).sum(1) / n


class ClassStats:
    r"""Accumulates, batch by batch, everything the NC metrics need from last-layer features.

    State (theory.md 5.8, *shifted* form). Every class k has a reference point c_k, set to its
    first sample when the class is first seen. The accumulator keeps n_k, S_k = sum (h - c_k),
    per-class sum ||h - c_k||^2 and the pooled Gram Q = sum (h - c_{y})(h - c_{y})^T, so one
    batch costs one fused pass (``torch.ops.ncfast.class_moments``) and one d x d Gram product
    (its upper block triangle only: Q is symmetric), with no per-batch K x d^2 correction.
    The centred quantities follow exactly at read time:

        mu_k = c_k + S_k / n_k,     M2 = Q - sum_k S_k S_k^T / n_k,     Sigma_W = M2 / N.

    Features near their class mean are shifted by a nearby point, so float32 state keeps
    Sigma_W accurate in the collapse regime (within-class spread << ||mu||), where the raw
    second moment would cancel catastrophically.

    Args:
        num_classes: K, the number of classes.
        dim: d, the feature width.
        device: where the state lives (default CPU).
        dtype: state dtype, float32 (default) or float64. bf16/fp16 features are accumulated in
            float32; other feature dtypes are converted to the state dtype.
        check_inputs: how every batch's values are validated (label range, finite features
            whose squared norms fit the state dtype); shapes, dtypes and devices are always
            checked at once.

            - ``"immediate"``: before ``update`` returns; a bad batch raises there. On CUDA this
              reads flags back, a host synchronisation per batch.
            - ``"deferred"``: on the device, when staged rows are folded into the state, so
              ``update`` never synchronises. A bad batch is left out of the state as a whole,
              and the next read of the state (``counts``, ``means``, ``sigma_w()``, ``merge``,
              ``state_dict()``, ...) raises once, naming the first bad batch (its number among
              the updates since the last reset) and how many were left out. The state then
              equals that of the accepted batches alone.
            - ``True`` (default): immediate on CPU, where it costs nothing, deferred on CUDA.
            - ``False``: no check; the caller guarantees valid input (out-of-range labels are
              then clamped into range, never used as out-of-bounds addresses).
        nc4_weight: the classifier (K, d). With ``nc4_means``, ``update`` also counts samples
            whose nearest class mean disagrees with the classifier's prediction (NC4,
            theory.md 5.6); ``ncfast.measure`` makes that second sweep for you.
        nc4_bias: the classifier's optional bias (K,).
        nc4_means: the class means (K, d) of a *previous pass*; a row of NaN marks a class
            that pass did not see, which is then never the nearest.
        buffer_rows: batches smaller than this are staged in a (buffer_rows, d) buffer and
            folded into the state a block at a time (when it is full, and before any read,
            merge or state_dict). Default: 2^23 / d rows (32 MiB of float32) in [256, 8192] on
            CPU; 2^25 / d rows (128 MiB) in [256, 32768] on CUDA, where every fold costs some
            launches and larger Gram blocks run faster.

    A rejected batch leaves the accumulator exactly as it was (with deferred checks: as if
    that update had never been made).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        check_inputs: bool = True,
        nc4_weight: Tensor | None = None,
        nc4_bias: Tensor | None = None,
        nc4_means: Tensor | None = None,
        buffer_rows: int | None = None,
    ) -> None:
        # Resolved through an allocation so "cuda" becomes "cuda:0": devices compare exactly.
        self.device = torch.empty(0, device="cpu" if device is None else device).device
        for name, value in (("num_classes", num_classes), ("dim", dim),
                            ("buffer_rows", 1 if buffer_rows is None else buffer_rows)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ncfast.ClassStats: {name} must be an int >= 1, got {value!r}")
        if buffer_rows is None:  # a staging buffer of 32 MiB of float32 (128 MiB on a GPU)
            cpu = self.device.type == "cpu"
            buffer_rows = max(256, min(8192 if cpu else 32768, (2**23 if cpu else 2**25) // dim))
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ncfast.ClassStats: dtype must be torch.float32 or torch.float64, "
                            f"got {dtype}")
        self.num_classes, self.dim, self.dtype = num_classes, dim, dtype
        if not any(check_inputs is mode or (isinstance(check_inputs, str) and
                                            check_inputs == mode) for mode in CHECK_MODES):
            raise ValueError(f"ncfast.ClassStats: check_inputs must be True, False, 'immediate' "
                             f"or 'deferred', got {check_inputs!r}")
        self.check_inputs = check_inputs
        self._checks = ("immediate" if self.device.type == "cpu" else "deferred") \
            if check_inputs is True else (check_inputs or None)
        self.buffer_rows = buffer_rows
        self._staged_x = self._staged_y = None
        self._nc4 = self._check_nc4(nc4_weight, nc4_bias, nc4_means)
        self.reset()

    # ---- state

    def reset(self) -> None:
        """Forget every sample (keeps K, d, dtype, device and the NC4 classifier)."""
        K, d, opts = self.num_classes, self.dim, dict(device=self.device, dtype=self.dtype)
        self._means_cache = None  # (key, means, their version): see the means property
        self._counts = torch.zeros(K, device=self.device, dtype=torch.int64)
        self._shift = torch.zeros(K, d, **opts)
        self._sums = torch.zeros(K, d, **opts)
        self._sq = torch.zeros(K, **opts)
        self._gram = torch.zeros(d, d, **opts)
        self._all_seen = False  # once every class has a reference point, updates skip that work
        self._nc4_mismatches = torch.zeros((), device=self.device, dtype=torch.int64)
        self._nc4_total = torch.zeros((), device=self.device, dtype=torch.int64)
        self._pending = 0  # rows staged in _staged_x / _staged_y, not yet in the state
        self._batches = 0  # updates since the reset: numbers the batches in deferred errors
        self._staged_batches: list[tuple[int, int]] = []  # (first staged row, batch number)
        # Deferred checks: [batches left out, then for the first of them: its number, row,
        # label, max |h|], on the device until a read of the state looks at it.
        self._rejected = torch.zeros(5, device=self.device, dtype=torch.float64)
        self._state_checked = True  # False once the sums changed: _settle checks them

    def _check_nc4(self, weight, bias, means):
        if weight is None and bias is None and means is None:
            return None
        K, d = self.num_classes, self.dim
        if weight is None or means is None:
            raise ValueError("ncfast.ClassStats: NC4 needs nc4_weight and nc4_means "
                             "(nc4_bias is optional)")
        for name, t, shape in (("nc4_weight", weight, (K, d)), ("nc4_means", means, (K, d)),
                               ("nc4_bias", bias, (K,))):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"ncfast.ClassStats: {name} must have shape {list(shape)}, "
                                 f"got {list(t.shape)}")
        to, f64 = dict(device=self.device, dtype=self.dtype), dict(device=self.device,
                                                                    dtype=torch.float64)
        means = means.detach().to(**f64)
        present = means.isfinite().all(1)  # NaN rows: classes the previous pass did not see
        if not bool(present.any()):
            raise ValueError("ncfast.ClassStats: nc4_means must have a finite row (rows of NaN "
                             "mark classes with no mean)")
        # Distances about a common point: under a large common offset the expansion
        # ||mu_k||^2 - 2 h.mu_k cancels away, in float32, the differences between classes.
        # The logits follow as W (h - c) + (W c + b).
        centre = means[present].mean(0)
        means = torch.where(present[:, None], means - centre, 0)
        weight = weight.detach().to(**f64)
        bias = weight @ centre + (0 if bias is None else bias.detach().to(**f64))
        sq_norms = torch.where(present, (means * means).sum(1), float("inf"))
        return (torch.cat([weight, means]).to(**to), bias.to(**to), sq_norms.to(**to),
                centre.to(**to))

    # ---- accumulation

    def _feature_dtype(self, features: Tensor) -> torch.dtype:
        # The op accumulates in the features' opmath type, which must be the state dtype.
        reduced = features.dtype in (torch.float16, torch.bfloat16)
        if self.dtype == torch.float32 and reduced:
            return features.dtype
        return self.dtype

    def _check_batch(self, features: Tensor, labels: Tensor) -> None:
        if not isinstance(features, Tensor) or features.dim() != 2:
            shape = list(features.shape) if isinstance(features, Tensor) else type(features)
            raise ValueError(f"{_UPDATE}: features must be 2-D (batch, dim), got {shape}")
        if features.shape[1] != self.dim:
            raise ValueError(f"{_UPDATE}: features must have {self.dim} columns (dim), got "
                             f"{features.shape[1]}")
        if not features.dtype.is_floating_point:
            raise TypeError(f"{_UPDATE}: features must have a floating dtype, got "
                            f"{features.dtype}")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or \
                labels.shape[0] != features.shape[0]:
            shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels)
            raise ValueError(f"{_UPDATE}: labels must be 1-D with one label per row of "
                             f"features ({features.shape[0]}), got {shape}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{_UPDATE}: labels must be int64 or int32, got {labels.dtype}")
        for name, t in (("features", features), ("labels", labels)):
            if t.device != self.device:
                raise ValueError(f"{_UPDATE}: {name} must be on the accumulator's device "
                                 f"({self.device}), got {t.device}")

    def _check_values(self, features: Tensor, labels: Tensor) -> None:
        """Label range, finiteness and magnitude (squared norms must not overflow the state
        dtype) in two reductions and one host read."""
        lo, hi = torch.aminmax(labels)
        f_lo, f_hi = torch.aminmax(features)  # a NaN propagates into both
        limit = self._magnitude_limit()
        lo, hi, f_lo, f_hi = torch.stack([lo.double(), hi.double(), f_lo.double(),
                                          f_hi.double()]).tolist()
        peak = max(-f_lo, f_hi) if f_lo == f_lo and f_hi == f_hi else float("nan")
        if lo < 0 or hi >= self.num_classes:
            value = int(lo) if lo < 0 else int(hi)
            raise ValueError(f"{_UPDATE}: labels must be in [0, {self.num_classes}), got {value}")
        if not peak <= limit:
            bad_row = ~torch.isfinite(features).all(1)
            if bool(bad_row.any()):
                row = int(bad_row.nonzero()[0].item())
                raise NonFiniteFeaturesError(f"{_UPDATE}: features must be finite, got a NaN or "
                                             f"Inf in row {row}")
            raise NonFiniteFeaturesError(
                f"{_UPDATE}: features are too large for {self.dtype} statistics: max |h| = "
                f"{peak:.3g} > {limit:.3g} (squared norms overflow)")

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` (B, d) float, ``labels`` (B,) int64/int32 in [0, K).

        Small batches are staged: copied into a buffer of ``buffer_rows`` rows that is folded
        into the state when full or before anything reads the state, so the per-batch cost is
        two copies and the class sums and Gram products run on large blocks."""
        self._check_batch(features, labels)
        B = features.shape[0]
        if B == 0:
            return
        if self._checks == "immediate":
            self._check_values(features, labels)
        # Commit only now: everything above may raise without touching the state.
        self._batches += 1
        if B >= self.buffer_rows:
            self._flush()
            self._add(features.to(self._feature_dtype(features)), labels, [(0, self._batches)])
            return
        if self._pending + B > self.buffer_rows:
            self._flush()
        if self._staged_x is None:
            self._staged_x = torch.empty(self.buffer_rows, self.dim, device=self.device,
                                         dtype=self.dtype)
            self._staged_y = torch.empty(self.buffer_rows, device=self.device, dtype=torch.int64)
        self._staged_x[self._pending:self._pending + B].copy_(features, non_blocking=True)
        self._staged_y[self._pending:self._pending + B].copy_(labels, non_blocking=True)
        self._staged_batches.append((self._pending, self._batches))
        self._pending += B

    def _flush(self) -> None:
        """Fold the staged rows into the state (no host synchronisation)."""
        if self._pending:
            rows, self._pending = self._pending, 0
            batches, self._staged_batches = self._staged_batches, []
            self._add(self._staged_x[:rows], self._staged_y[:rows], batches, scratch=True)

    def _settle(self) -> None:
        """Before any read: fold the staged rows in, then report batches that deferred checks
        left out, and a state whose sums overflowed (one host read, only when something
        changed since the last one)."""
        self._flush()
        deferred = self._checks == "deferred"
        if self._state_checked and not deferred:
            return
        flags = self._rejected if deferred else self._rejected.new_zeros(5)
        if not self._state_checked:  # every row passed its check, yet the sums may not fit
            finite = (self._sums.isfinite().all() & self._sq.isfinite().all()
                      & self._gram.isfinite().all())
            flags = torch.cat([flags, finite.double()[None]])
        left_out, batch, row, label, peak, *finite = flags.tolist()
        self._state_checked = True
        if left_out:
            self._rejected.zero_()
            self._state_checked = False  # the overflow check is still due
            self._raise_left_out(int(left_out), int(batch), int(row), label, peak)
        if finite and not finite[0]:
            self._state_checked = False  # raise again at every read until a reset
            raise StatisticsOverflowError(
                f"ncfast.ClassStats: the accumulated sums overflowed {self.dtype} after "
                f"{int(self._counts.sum())} samples: every batch passed the per-row check "
                f"(max |h| <= {self._magnitude_limit():.3g}), but their sums of squares do not "
                f"fit together; reset() and accumulate with dtype=torch.float64, or scale the "
                f"features down")

    def _raise_left_out(self, left_out: int, batch: int, row: int, label: float,
                        peak: float) -> None:
        others = "" if left_out == 1 else f" ({left_out - 1} later bad batches too)"
        where = (f"{_UPDATE}: batch {batch} (counted from the last reset) was left out of "
                 f"the statistics{others}: ")
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{where}labels must be in [0, {self.num_classes}), got "
                             f"{int(label)} in row {row}")
        if peak != peak or peak == float("inf"):
            raise NonFiniteFeaturesError(f"{where}features must be finite, got a NaN or Inf in "
                                         f"row {row}")
        raise NonFiniteFeaturesError(
            f"{where}features are too large for {self.dtype} statistics: max |h| = {peak:.3g} "
            f"> {self._magnitude_limit():.3g} in row {row} (squared norms overflow)")

    def _magnitude_limit(self) -> float:
        """The largest |h| whose squared norms (of h - c, up to ||2h||^2) fit the state dtype."""
        return (torch.finfo(self.dtype).max / (4 * self.dim)) ** 0.5

    def _screen(self, feats: Tensor, labels: Tensor, batches: list[tuple[int, int]]) -> Tensor:
        """Deferred checks, on the device: labels with -1 on every row of a batch that fails
        them (the kernels skip such rows), and the first failure noted in ``_rejected``."""
        R, dev = feats.shape[0], self.device
        lo, hi = torch.aminmax(feats, dim=1)  # a NaN propagates into both
        peak = torch.maximum(-lo, hi).to(torch.float64)
        row_bad = (labels < 0) | (labels >= self.num_classes) | ~(peak <= self._magnitude_limit())
        # Row -> batch: the batches' first rows and numbers, copied without a host sync.
        table = torch.tensor(batches, dtype=torch.int64, pin_memory=dev.type == "cuda")
        table = table.to(dev, non_blocking=True)
        batch_of_row = torch.searchsorted(table[:, 0].contiguous(),
                                          torch.arange(R, device=dev), right=True) - 1
        bad_rows_per_batch = torch.zeros(len(batches), device=dev, dtype=torch.int64)
        bad_rows_per_batch.index_add_(0, batch_of_row, row_bad.long())
        skip = bad_rows_per_batch.index_select(0, batch_of_row) > 0
        first = torch.argmax(row_bad.to(torch.uint8))  # the first bad row (0 if none)
        found = torch.stack([
            (bad_rows_per_batch > 0).sum().double(),
            table[batch_of_row[first], 1].double(),
            (first - table[batch_of_row[first], 0]).double(),
            labels[first].double(), peak[first]])
        total = self._rejected[0] + found[0]
        self._rejected = torch.where(self._rejected[0] > 0, self._rejected, found)  # the first
        self._rejected[0] = total
        return skip

    def _add(self, feats: Tensor, labels: Tensor, batches: list[tuple[int, int]],
             scratch: bool = False) -> None:
        """Fold rows into the state; ``scratch``: feats is the staging buffer, free to be
        shifted in place. That matters on a CPU only, where a fresh (B, d) tensor costs more in
        page faults than the pass itself; CUDA's caching allocator hands one out for free."""
        K = self.num_classes
        skip = self._screen(feats, labels, batches) if self._checks == "deferred" else None
        # The kernel indexes by label: clamped labels keep it in bounds whatever the input
        # (with check_inputs=False the caller vouches for them); -1 marks a skipped row.
        safe_labels = labels.clamp(0, K - 1)
        if skip is not None:
            safe_labels = torch.where(skip, -1, safe_labels)
        shift = self._shift if self._all_seen else self._new_shift(feats, safe_labels)
        if self._nc4 is not None:  # before the rows may be shifted in place
            self._nc4_mismatches += self._nc4_batch(feats, skip)
            self._nc4_total += feats.shape[0] if skip is None else (~skip).sum()
        if scratch and self.device.type == "cpu":
            counts, sums, sq = torch.ops.ncfast.class_moments_(feats, safe_labels, shift)
            shifted = feats
        else:
            counts, sums, sq, shifted = torch.ops.ncfast.class_moments(feats, safe_labels, shift)
        self._shift = shift
        self._counts += counts
        self._sums += sums
        self._sq += sq
        self._accumulate_gram(shifted)
        self._state_checked = False
        if self.device.type == "cpu" and not self._all_seen:  # a free read on the CPU only
            self._all_seen = bool(self._counts.all())

    def _new_shift(self, feats: Tensor, labels: Tensor) -> Tensor:
        """Reference points after this batch: classes seen for the first time take their first
        sample in it (skipped rows, labelled -1, are never one)."""
        K, B = self.num_classes, feats.shape[0]
        first = torch.full((K + 1,), B, device=self.device, dtype=torch.int64)
        slot = torch.where(labels < 0, K, labels.long())
        first.scatter_reduce_(0, slot, torch.arange(B, device=self.device), reduce="amin")
        first = first[:K]
        newly_seen = (self._counts == 0) & (first < B)
        candidates = feats.index_select(0, first.clamp(max=B - 1)).to(self.dtype)
        return torch.where(newly_seen[:, None], candidates, self._shift)

    def _accumulate_gram(self, shifted: Tensor) -> None:
        """Q += X^T X on the upper block triangle only (Q is symmetric; see _full_gram)."""
        for start, stop in upper_blocks(self.dim):
            self._gram[start:stop, start:].addmm_(shifted[:, start:stop].T, shifted[:, start:])

    def _full_gram(self) -> Tensor:
        """Q with its lower block triangle filled in from the upper one."""
        return fill_lower(self._gram)

    def _nc4_batch(self, feats: Tensor, skip: Tensor | None) -> Tensor:
        # One GEMM against [W; means], then one fused pass: argmax of the logits (+ bias) vs
        # argmin_k ||x - mu_k||^2 = argmin_k (||mu_k||^2 - 2 x . mu_k), counted on the device.
        stacked, bias, sq_norms, centre = self._nc4
        scores = (feats.to(self.dtype) - centre) @ stacked.T
        return torch.ops.ncfast.nc4_mismatches(scores, bias, sq_norms, skip)

    # ---- read-out (the protocol of ncfast.metrics)

    @property
    def counts(self) -> Tensor:
        """(K,) int64 samples per class."""
        self._settle()
        return self._counts

    @property
    def total(self) -> Tensor:
        """N, the number of samples seen (0-dim int64 tensor)."""
        self._settle()
        return self._counts.sum()

    def _present(self) -> Tensor:
        return self._counts > 0

    @property
    def means(self) -> Tensor:
        """(K, d) class means mu_k = c_k + S_k / n_k in float64, never rounded to the state
        dtype (a large common offset would cost NC1 three digits in float32); rows of classes
        with no sample are zero. The same tensor is returned until the state changes (clone it
        before changing it in place; doing so only makes the next read rebuild it)."""
        self._settle()
        key = None if torch.is_inference_mode_enabled() else self._means_key()
        cached = getattr(self, "_means_cache", None)  # absent in an object pickled before it
        if key is not None and cached is not None and _same_key(cached[0], key) \
                and cached[1]._version == cached[2]:
            return cached[1]
        n = self._counts.clamp(min=1).double()
        present = self._present()[:, None]
        mu = torch.where(present, self._shift.double() + self._sums.double() / n[:, None], 0)
        # Kept until the state (or the returned tensor itself) changes: a metric that reads the
        # means and then the global mean builds this (K, d) float64 tensor once, not twice.
        self._means_cache = None if key is None else (key, mu, mu._version)
        return mu

    def __getstate__(self) -> dict:
        # The means cache holds weak references, which do not pickle: a pickled (torch.save,
        # multiprocessing) accumulator rebuilds its means at the first read instead.
        return {**self.__dict__, "_means_cache": None}

    def _means_key(self) -> tuple | None:
        """Weak references to the state tensors the means come from, with their in-place
        version counters (None for inference tensors, which have none: no cache then)."""
        try:
            return tuple((weakref.ref(t), t._version)
                         for t in (self._counts, self._shift, self._sums))
        except RuntimeError:
            return None

    def _centred(self, with_m2: bool = True) -> tuple[Tensor, Tensor | None, Tensor]:
        """(mu, M2, per-class sum ||h - mu_k||^2) in float64; M2 (a K d^2 product) is None
        unless ``with_m2``: the means and variances alone are O(K d)."""
        return (self.means, *_about_means(self._counts, self._sums, self._sq,
                                          self._full_gram() if with_m2 else None))

    def sigma_w(self) -> Tensor:
        """(d, d) pooled within-class covariance Sigma_W = M2 / N (theory.md 5.2), float64."""
        return self._centred()[1] / self.total.clamp(min=1).double()

    def class_variances(self) -> Tensor:
        """(K,) v_k = (1/n_k) sum_{i in k} ||h_i - mu_k||^2 (0 for empty classes), float64."""
        return self._centred(with_m2=False)[2] / self._counts.clamp(min=1).double()

    def global_mean(self, kind: str = "weighted") -> Tensor:
        """(d,) sample-weighted mean (1/N) sum_i h_i, or the unweighted mean of the class means
        of the classes that have samples."""
        mu = self.means  # not _centred(): the variances are not needed here
        if kind == "weighted":
            # a matrix-vector product: one pass over the means, no (K, d) temporary
            return (self._counts.double() @ mu) / self.total.clamp(min=1).double()
        if kind == "unweighted":
            present = self._present()
            return mu[present].mean(0)
        raise ValueError(f"ncfast.ClassStats.global_mean: kind must be 'weighted' or "
                         f"'unweighted', got {kind!r}")

    @property
    def nc4_mismatches(self) -> Tensor | None:
        self._settle()
        return self._nc4_mismatches if self._nc4 is not None else None

    @property
    def nc4_total(self) -> Tensor | None:
        self._settle()
        return self._nc4_total if self._nc4 is not None else None

    # ---- combining

    def _check_compatible(self, what: str, K: int, d: int) -> None:
        if (K, d) != (self.num_classes, self.dim):
            raise ValueError(f"ncfast.ClassStats.{what}: needs num_classes={self.num_classes} and "
                             f"dim={self.dim}, got num_classes={K} and dim={d}")

    def _set_centred(self, n: Tensor, mu: Tensor, m2: Tensor, sq: Tensor) -> None:
        """The state of float64 counts, means, M2 and per-class centred sums of squares. The
        reference points are the means rounded to the state dtype and the sums keep what the
        rounding lost, so a float32 state reads back the float64 means it was given (a rounded
        mean costs NC1 digits under a large common offset)."""
        to = dict(device=self.device, dtype=self.dtype)
        n = n.to(device=self.device, dtype=torch.float64)
        mu = mu.to(device=self.device, dtype=torch.float64)
        self._counts = n.to(torch.int64)
        self._shift = mu.to(**to)
        self._sums = ((mu - self._shift.double()) * n[:, None]).to(**to)
        s = self._sums.double()
        s_over_n = s / n.clamp(min=1)[:, None]
        self._gram = (m2 + s_over_n.T @ s).to(**to)  # read back as Q - sum_k S_k S_k^T / n_k
        self._sq = (sq + (s_over_n * s).sum(1)).to(**to)
        self._all_seen = False
        self._state_checked = False

    @torch.no_grad()
    def merge(self, other: "ClassStats") -> "ClassStats":
        """Add another accumulator's samples (pairwise Chan merge, exact); returns self. NC4
        counts combine only when both were made against the same classifier and means
        (ValueError otherwise, and nothing changes)."""
        if not isinstance(other, ClassStats):
            raise TypeError(f"ncfast.ClassStats.merge: other must be a ClassStats, got "
                            f"{type(other).__name__}")
        self._check_compatible("merge", other.num_classes, other.dim)
        if (self._nc4 is None) != (other._nc4 is None):
            raise ValueError("ncfast.ClassStats.merge: both accumulators must count NC4, or "
                             "neither")
        if self._nc4 is not None and not all(
                torch.equal(*_common_dtype(mine, theirs.to(self.device)))
                for mine, theirs in zip(self._nc4, other._nc4)):
            raise ValueError(f"ncfast.ClassStats.merge: {_NC4_SAME}")
        mu_a, m2_a, sq_a = self._centred()  # both flush their staged rows
        mu_b, m2_b, sq_b = (t.to(self.device) for t in other._centred())
        n_a, n_b = self._counts.double(), other._counts.to(self.device).double()
        n = n_a + n_b
        w = torch.where(n > 0, n_a * n_b / n.clamp(min=1), 0)
        delta = mu_b - mu_a
        mu = torch.where((n > 0)[:, None], mu_a + delta * (n_b / n.clamp(min=1))[:, None], 0)
        m2 = m2_a + m2_b + (delta * w[:, None]).T @ delta
        sq = sq_a + sq_b + w * (delta * delta).sum(1)
        self._set_centred(n, mu, m2, sq)
        self._nc4_mismatches += other._nc4_mismatches.to(self.device)
        self._nc4_total += other._nc4_total.to(self.device)
        return self

    @torch.no_grad()
    def all_reduce(self, group=None) -> "ClassStats":
        """Combine the accumulators of every rank in ``group`` (torch.distributed), exactly:
        two all-reduces of centred quantities (theory.md 5.8), never raw second moments. Every
        rank ends with the same state. Without an initialised process group (a single
        process) there is nothing to combine: a no-op, as in torchmetrics. Returns self."""
        if not dist.is_available() or not dist.is_initialized():
            return self
        # As merge: every rank counts NC4 against the same classifier and means, or none does.
        # One small MAX-reduce of (has NC4, fingerprint) and their negations: every rank sees
        # the same extremes, so all raise together (none waits on a collective) or none does.
        has = torch.tensor(float(self._nc4 is not None), dtype=torch.float64, device=self.device)
        fingerprint = _nc4_fingerprint(self._nc4, self.device)
        extremes = torch.stack([has, -has, fingerprint, -fingerprint])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
        if bool(extremes[0] != -extremes[1]):
            raise ValueError("ncfast.ClassStats.all_reduce: every rank must count NC4, or none")
        if bool(extremes[2] != -extremes[3]):
            raise ValueError(f"ncfast.ClassStats.all_reduce: {_NC4_SAME}")
        mu_r, m2_r, sq_r = self._centred()
        n_r = self._counts.double()
        first = torch.cat([n_r, (n_r[:, None] * mu_r).reshape(-1)])
        dist.all_reduce(first, group=group)
        K, d = self.num_classes, self.dim
        n = first[:K]
        mu = torch.where((n > 0)[:, None], first[K:].reshape(K, d) / n.clamp(min=1)[:, None], 0)
        delta = mu_r - mu
        second = torch.cat([
            (m2_r + (delta * n_r[:, None]).T @ delta).reshape(-1),
            sq_r + n_r * (delta * delta).sum(1),
            torch.stack([self._nc4_mismatches, self._nc4_total]).double(),
        ])
        dist.all_reduce(second, group=group)
        m2 = second[: d * d].reshape(d, d)
        sq = second[d * d: d * d + K]
        self._set_centred(n, mu, m2, sq)
        self._nc4_mismatches = second[-2].round().to(torch.int64)
        self._nc4_total = second[-1].round().to(torch.int64)
        return self

    # ---- persistence

    def state_dict(self) -> dict:
        """Tensors and metadata; ``load_state_dict`` restores them exactly."""
        self._settle()
        return {
            "version": STATE_VERSION, "num_classes": self.num_classes, "dim": self.dim,
            "counts": self._counts.clone(), "shift": self._shift.clone(),
            "sums": self._sums.clone(), "sq": self._sq.clone(), "gram": self._full_gram().clone(),
            "nc4_mismatches": self._nc4_mismatches.clone(), "nc4_total": self._nc4_total.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``, all or nothing: keys, K and d, every tensor's shape, dtype
        and device, counts >= 0 and finite sums are checked before the state is touched; any
        failure raises (TypeError/ValueError naming the entry) and leaves this accumulator as
        it was. Tensors on the CPU or this accumulator's device are accepted (and copied); a
        float64 state read into a float32 accumulator keeps its float64 means, as merge does."""
        op = "ncfast.ClassStats.load_state_dict"
        check_state_version(op, state, "ClassStats", STATE_VERSION)
        K, d = self.num_classes, self.dim
        missing = [key for key in ("num_classes", "dim") if key not in state]
        if missing:
            raise ValueError(f"{op}: state lacks the entries {missing}")
        for key in ("num_classes", "dim"):
            if isinstance(state[key], bool) or not isinstance(state[key], int):
                raise TypeError(f"{op}: state[{key!r}] must be an int, got "
                                f"{type(state[key]).__name__}")
        self._check_compatible("load_state_dict", state["num_classes"], state["dim"])
        i64, f = torch.int64, self.dtype
        new = checked_state_tensors(op, state, {
            "counts": ((K,), i64), "shift": ((K, d), f), "sums": ((K, d), f), "sq": ((K,), f),
            "gram": ((d, d), f), "nc4_mismatches": ((), i64), "nc4_total": ((), i64)}, self.device)
        if bool(new["nc4_mismatches"] > new["nc4_total"]):
            raise ValueError(f"{op}: state['nc4_mismatches'] must be <= state['nc4_total'], got "
                             f"{int(new['nc4_mismatches'])} > {int(new['nc4_total'])}")
        # Everything checked: commit at once.
        self._counts, self._shift, self._sums = new["counts"], new["shift"], new["sums"]
        self._sq, self._gram = new["sq"], new["gram"]
        if self.dtype != torch.float64 and any(state[key].dtype == torch.float64 for key in
                                               ("shift", "sums", "sq", "gram")):
            # A float64 state (a merged one keeps its means in its reference points) read into
            # a float32 one: re-split it as merge does, so the means are not rounded.
            wide = {key: state[key].detach().to(self.device, torch.float64)
                    for key in ("shift", "sums", "sq", "gram")}
            n = new["counts"].double()
            mu = torch.where((n > 0)[:, None],
                             wide["shift"] + wide["sums"] / n.clamp(min=1)[:, None], 0)
            self._set_centred(n, mu, *_about_means(new["counts"], wide["sums"], wide["sq"],
                                                   wide["gram"]))
        self._nc4_mismatches, self._nc4_total = new["nc4_mismatches"], new["nc4_total"]
        self._all_seen = False
        self._pending, self._staged_batches = 0, []
        self._rejected.zero_()
        self._state_checked = True

    def __repr__(self) -> str:
        return (f"ClassStats(num_classes={self.num_classes}, dim={self.dim}, "
                f"dtype={self.dtype}, device={self.device}, "
                f"samples={int(self._counts.sum()) + self._pending})")  # no _settle: never raises
