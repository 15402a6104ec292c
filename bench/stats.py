"""Streaming class-statistics benchmark: one pass of ncfast.ClassStats over N samples in batches
against the NC papers' per-sample approach, a two-pass one-hot torch approach and the x^T x
floor. `python -m bench.stats`. With `--extras`: the cost of the extra metrics (theory.md
5.10-5.12) at K = 1000 and K = 50,000, d = 768, against the reference library
rhubarbwu/neural-collapse on the same statistics where it runs (a checkout named by
$NCFAST_REFERENCE_LIBRARY; it is never part of this repository)."""

from __future__ import annotations

import importlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import ncfast
import ncfast.reference

from . import harness

SEED = 0
BATCH = 256
# Class-mean entries N(0, 1), within-class noise N(0, NOISE^2) per coordinate: clearly
# separated classes with small spread, never zeros.
NOISE = 0.1
# Relative Frobenius error of Sigma_W and of the class means against the float64 reference that
# every candidate (all accumulate in float32) must meet before anything is timed.
GATE = 1e-4

# (N, d, K) per device; --quick uses a smaller N.
SHAPES = {"cpu": (50_000, 512, 100), "cuda": (200_000, 2048, 1000)}
QUICK_N = {"cpu": 10_000, "cuda": 40_000}
# Baseline (a) costs a Python iteration and a d x d outer product per sample: it is timed on the
# first A_SUBSET samples (whole batches) and its time scaled linearly to N.
A_SUBSET = {"cpu": 2048, "cuda": 20_480}


# ------------------------------------------------------------------------------- candidates

def ncfast_pass(batches, K: int, d: int, device: str, check_inputs: bool | str = True):
    stats = ncfast.ClassStats(K, d, device=device, check_inputs=check_inputs)
    for x, y in batches:
        stats.update(x, y)
    return stats.sigma_w(), stats.means


def authors_pass(batches, K: int, d: int, device: str):
    """(a) The approach of the NC papers' public code: every sample goes through the Python
    interpreter (label read with .item(), feature vector appended to its class's list); then per
    class: stack, mean, and the scatter as a sum of one outer product per sample (a (d,1) @ (1,d)
    matmul, as that code computes it)."""
    features_by_class = [[] for _ in range(K)]
    for x, y in batches:
        for i in range(x.shape[0]):
            features_by_class[y[i].item()].append(x[i])

    N = 0
    means = torch.zeros(K, d, device=device, dtype=batches[0][0].dtype)
    Sigma_W = 0
    for k in range(K):
        if not features_by_class[k]:
            continue
        h_k = torch.stack(features_by_class[k])
        mu_k = h_k.mean(0)
        means[k] = mu_k
        for i in range(h_k.shape[0]):
            z = h_k[i] - mu_k
            # as the public NC code writes the per-sample outer product
            Sigma_W += z.unsqueeze(1) @ z.unsqueeze(0)
        N += h_k.shape[0]
    return Sigma_W / N, means


def onehot_two_pass(batches, K: int, d: int, device: str):
    """(b) Two passes with one-hot matrix products: class sums and counts, then the centred
    scatter."""
    dtype = batches[0][0].dtype
    sums = torch.zeros(K, d, device=device, dtype=dtype)
    counts = torch.zeros(K, device=device, dtype=dtype)
    for x, y in batches:
        onehot = F.one_hot(y, K).to(dtype)
        sums.addmm_(onehot.T, x)
        counts += onehot.sum(0)
    means = sums / counts.clamp(min=1)[:, None]
    scatter = torch.zeros(d, d, device=device, dtype=dtype)
    N = 0
    for x, y in batches:
        xc = x - means[y]
        scatter.addmm_(xc.T, xc)
        N += x.shape[0]
    return scatter / N, means


def floor_pass(batches, K: int, d: int, device: str):
    """(c) The floor: only the d x d Gram product of each batch, x^T x, accumulated."""
    gram = torch.zeros(d, d, device=device, dtype=batches[0][0].dtype)
    for x, _ in batches:
        gram.addmm_(x.T, x)
    return gram


# ------------------------------------------------------------------------------- data, gate

def make_batches(N: int, d: int, K: int, device: str):
    gen = torch.Generator(device=device).manual_seed(SEED)
    class_means = torch.randn(K, d, generator=gen, device=device)
    labels = torch.randint(0, K, (N,), generator=gen, device=device)
    features = torch.randn(N, d, generator=gen, device=device).mul_(NOISE).add_(class_means[labels])
    return features, labels, list(zip(features.split(BATCH), labels.split(BATCH)))


def rel_frobenius(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.to(torch.float64)
    return float(torch.linalg.norm(actual.to(torch.float64) - expected)
                 / torch.linalg.norm(expected))


def gate(label: str, result, ref) -> dict:
    """Relative Frobenius errors of (Sigma_W, means); raises CorrectnessError above GATE."""
    sigma_w, means = result
    errors = {"Sigma_W": rel_frobenius(sigma_w, ref.within_cov),
              "means": rel_frobenius(means, ref.means)}
    for what, err in errors.items():
        if not err <= GATE:  # also catches NaN
            raise harness.CorrectnessError(
                f"correctness gate failed for {label}: relative Frobenius error of {what} "
                f"{err:.3g} > {GATE:g} against ncfast.reference.class_stats (float64)")
    return {"candidate": label, **{f"{k} rel. error": f"{v:.1e}" for k, v in errors.items()}}


# ------------------------------------------------------------------------------- the bench

def bench(N: int, d: int, K: int, device: str, min_run_time: float):
    features, labels, batches = make_batches(N, d, K, device)
    n_a = min(N, A_SUBSET[device])
    batches_a = batches[:math.ceil(n_a / BATCH)]
    n_a = sum(x.shape[0] for x, _ in batches_a)

    ncfast_variants = {"ncfast": lambda: ncfast_pass(batches, K, d, device)}
    if device == "cuda":
        ncfast_variants["ncfast immediate checks"] = lambda: ncfast_pass(
            batches, K, d, device, check_inputs="immediate")
        ncfast_variants["ncfast unchecked"] = lambda: ncfast_pass(batches, K, d, device,
                                                                  check_inputs=False)
    candidates = {
        **ncfast_variants,
        "(a)": lambda: authors_pass(batches_a, K, d, device),
        "(b)": lambda: onehot_two_pass(batches, K, d, device),
        "(c)": lambda: floor_pass(batches, K, d, device),
    }

    # Every candidate passes the gate before any is timed (the floor computes something else:
    # it is only checked to be finite).
    ref = ncfast.reference.class_stats(features, labels, K)
    ref_a = ncfast.reference.class_stats(features[:n_a], labels[:n_a], K) if n_a < N else ref
    where = f"N={N} d={d} K={K} {device}"
    gate_rows = []
    for name in ncfast_variants:
        gate_rows.append(gate(f"{name} ({where})", candidates[name](), ref))
    label_a = f"(a) on the first {n_a} samples" if n_a < N else "(a)"
    gate_rows.append(gate(f"{label_a} ({where})", candidates["(a)"](), ref_a))
    gate_rows.append(gate(f"(b) ({where})", candidates["(b)"](), ref))
    if not bool(torch.isfinite(candidates["(c)"]()).all()):
        raise harness.CorrectnessError(f"(c) floor produced a non-finite Gram ({where})")
    del ref, ref_a
    print(f"gate passed: {where}", file=sys.stderr, flush=True)

    times = {}
    for name, fn in candidates.items():
        times[name] = harness.median_time(fn, device, min_run_time)
        print(f"timed {name}: {harness.fmt_time(times[name])}", file=sys.stderr, flush=True)
    times["(a) measured"] = times["(a)"]
    times["(a)"] *= N / n_a
    return {"N": N, "d": d, "K": K, "n_a": n_a, "times": times,
            "variants": list(ncfast_variants), "gate": gate_rows}


def format_rows(r: dict) -> tuple[list[dict], list[str]]:
    t = r["times"]
    col_a = f"(a) extrapolated from n={r['n_a']}" if r["n_a"] < r["N"] else "(a)"
    rows = []
    for variant in r["variants"]:
        rows.append({
            "N": r["N"], "d": r["d"], "K": r["K"], "ncfast variant": variant,
            "ncfast": harness.fmt_time(t[variant]),
            col_a: harness.fmt_time(t["(a)"]),
            "(b) one-hot two-pass": harness.fmt_time(t["(b)"]),
            "(c) floor": harness.fmt_time(t["(c)"]),
            "vs (a)": harness.fmt_ratio(t["(a)"] / t[variant]),
            "vs (b)": harness.fmt_ratio(t["(b)"] / t[variant]),
            "x floor": harness.fmt_ratio(t[variant] / t["(c)"]),
        })
    columns = ["N", "d", "K", "ncfast variant", "ncfast", col_a, "(b) one-hot two-pass",
               "(c) floor", "vs (a)", "vs (b)", "x floor"]
    return rows, columns


def caption(r: dict, device: str) -> str:
    t = r["times"]
    text = (
        f"One pass of streaming class statistics over N samples in batches of {BATCH} (fp32 "
        f"features, pre-generated on the device: class means N(0,1) + N(0,{NOISE:g}²) noise, "
        f"seed {SEED}), median time of the whole pass including the read-out of Σ_W and the "
        "class means. **ncfast**: `ncfast.ClassStats(K, d)`, `update` per batch, then "
        "`sigma_w()` and `means`. **(a)**: the NC papers' public code: per sample a Python "
        "iteration (`.item()` on the label, feature vector appended to its class's list); at the "
        "end per class `torch.stack`, the mean, and Σ_W as a sum of one `torch.outer` per "
        "sample, / N. "
    )
    if r["n_a"] < r["N"]:
        text += (f"(a) is **extrapolated**: timed on the first {r['n_a']} samples "
                 f"({harness.fmt_time(t['(a) measured'])}) and scaled linearly by "
                 f"N/n = {r['N'] / r['n_a']:.3g}. ")
    text += (
        "**(b)**: two passes with one-hot matrix products: class sums `one_hot(y, K).T @ x` and "
        "counts, then `x - means[y]` and `Xc.T @ Xc` accumulated. **(c) floor**: only "
        "`gram.addmm_(x.T, x)` per batch, the d x d Gram product every method needs. "
        "**vs (a), vs (b)**: baseline time / ncfast time (above 1: ncfast is faster). "
        "**x floor**: ncfast time / floor time (1.00x: as fast as the floor)."
    )
    if device == "cuda":
        text += (" **ncfast**: the default checks, deferred on CUDA: label range and "
                 "finiteness are checked on the device when staged rows are folded in, with no "
                 "host synchronisation. **ncfast immediate checks**: "
                 "`ClassStats(check_inputs=\"immediate\")`: every `update` reads its checks "
                 "back, one host synchronisation per batch. **ncfast unchecked**: "
                 "`ClassStats(check_inputs=False)`.")
    return text


# ------------------------------------------------------------------ extra metrics (--extras)

EXTRA_D = 768
EXTRA_K = (1000, 50_000)
EXTRA_PER_CLASS = 4  # first-pass samples per class: the statistics the metrics read
# Samples of the second (per-sample) pass; on this CPU a (rows, 50,000) score block per batch.
EXTRA_PASS_N = {("cpu", 1000): 50_000, ("cpu", 50_000): 5_000,
                ("cuda", 1000): 200_000, ("cuda", 50_000): 200_000}
REF_TILE = 100  # the reference library's tile_size: (100, 100, d) difference tensors
EXTRA_GATE = 1e-6  # relative agreement with the reference library (both in float64)
# ... except where the reference keeps a float32 K x K grid whatever its input dtype: a
# variance over pairs then carries float32 rounding.
EXTRA_GATE_GRID = 1e-5
# One timed call, not blocked_autorange, above this many pairs on a CPU (a call takes minutes).
SINGLE_SHOT_PAIRS = 10**7


def reference_library():
    """(kernels, measure) modules of rhubarbwu/neural-collapse, or (None, reason)."""
    path = os.environ.get("NCFAST_REFERENCE_LIBRARY")
    if path:
        sys.path.insert(0, path)
    try:
        return (importlib.import_module("neural_collapse.kernels"),
                importlib.import_module("neural_collapse.measure")), None
    except ImportError as err:
        return None, f"not installed ({err.name or err})"


def extra_data(K: int, device: str):
    """ClassStats over EXTRA_PER_CLASS samples per class (means N(0,1), noise N(0, 0.1^2)), a
    classifier near the centred means, an OOD mean, and second-pass batches."""
    d = EXTRA_D
    gen = torch.Generator(device=device).manual_seed(SEED)
    means = torch.randn(K, d, generator=gen, device=device)
    stats = ncfast.ClassStats(K, d, device=device)
    labels = torch.arange(K, device=device).repeat(EXTRA_PER_CLASS)
    for chunk in labels.split(8192):
        noise = torch.randn(chunk.numel(), d, generator=gen, device=device)
        stats.update(means[chunk] + NOISE * noise, chunk)
    weight = means - means.mean(0) + 0.3 * torch.randn(K, d, generator=gen, device=device)
    ood_mean = torch.randn(d, generator=gen, device=device) + 0.2 * means.mean(0)
    n = EXTRA_PASS_N[(device, K)]
    pass_labels = torch.randint(0, K, (n,), generator=gen, device=device)
    pass_x = means[pass_labels] + NOISE * torch.randn(n, d, generator=gen, device=device)
    batches = list(zip(pass_x.split(1024), pass_labels.split(1024)))
    return stats, weight, ood_mean, batches


def extra_candidates(stats, weight, ood_mean, batches, ref, ref_dtype):
    """{row: (ncfast fn, reference fn or None)}; each fn returns the values the gate compares.
    The reference is fed the statistics ncfast read (means, global mean, v_k) in ref_dtype."""
    m = ncfast.metrics
    K = stats.num_classes
    means64, mu_g64 = stats.means.double(), stats.global_mean().double()

    def ref_inputs(dtype):
        return (means64.to(dtype), mu_g64.to(dtype), stats.class_variances().to(dtype),
                weight.to(dtype), ood_mean.to(dtype))

    def per_sample():
        p = m.PerSampleStats(stats, weight)
        for x, y in batches:
            p.update(x, y)
        return [p.cosine_margin(), p.ncc_accuracy()]

    rows = {
        "CDNV (p = 1)": (lambda: [m.cdnv(stats, tile=None)], None),
        "CDNV (p = 2)": (lambda: [m.cdnv(stats, tile=None, distance_exponent=2.0)], None),
        "GNC2: distance, log, Riesz (mean, var)": (
            lambda: [v for k in m.gnc2(stats).values() for v in k], None),
        "class vectors + UNC3": (
            lambda: [m.unc3(weight, stats), float(m.class_similarities(weight, stats, True).sum()),
                     float(m.class_distances(weight, stats).sum())], None),
        "NC5": (lambda: [m.nc5(stats, ood_mean)], None),
        "interference grid (K x K, fp32)": (
            lambda: [float(torch.linalg.matrix_norm(m.interference_grid(stats).double()))], None),
        "second pass: cosine margin + NCC": (per_sample, None),
    }
    if ref is None:
        return rows
    kern, meas = ref
    M, mG, V, W, ood = ref_inputs(ref_dtype)
    tile = min(REF_TILE, K)

    def ref_gnc2():
        # Its grid is float32 whatever the input: the Riesz energies at s = d - 2 (~1e-93
        # here) underflow to 0, so the gate compares the distance and log kernels only.
        kernels = (kern.dist_kernel, kern.log_kernel)
        if ref_dtype != torch.float64:
            kernels += (kern.riesz_kernel,)
        return [v for kernel in kernels for v in kern.kernel_stats(M, mG, kernel, tile)]

    rows["CDNV (p = 1)"] = (rows["CDNV (p = 1)"][0],
                           lambda: [meas.variability_cdnv(V, M, 1.0, tile_size=tile)])
    rows["CDNV (p = 2)"] = (rows["CDNV (p = 2)"][0],
                           lambda: [meas.variability_cdnv(V, M, 2.0, tile_size=tile)])
    rows["GNC2: distance, log, Riesz (mean, var)"] = (
        rows["GNC2: distance, log, Riesz (mean, var)"][0], ref_gnc2)
    rows["class vectors + UNC3"] = (rows["class vectors + UNC3"][0], lambda: [
        meas.similarities(W, M, mG).var().item(),
        float(meas.similarities(W, M, mG, cos=True).sum()),
        float(meas.distance_norms(W, M, mG).sum())])
    rows["NC5"] = (rows["NC5"][0], lambda: [meas.orthogonality_deviation(M, ood)])
    rows["interference grid (K x K, fp32)"] = (
        rows["interference grid (K x K, fp32)"][0],
        lambda: [float(torch.linalg.matrix_norm(meas.interference_grid(M, mG).double()))])
    return rows


# ---- (d) dense: the K x K matrices in plain torch, as a user would write it (float64)

def dense_cdnv(means: torch.Tensor, v: torch.Tensor, p: float) -> list[float]:
    """(d) for CDNV: every squared distance at once (torch.cdist, K x K), upper triangle."""
    K = means.shape[0]
    upper = torch.ones(K, K, dtype=torch.bool, device=means.device).triu_(1)
    ratio = (v[:, None] + v[None, :]) / 2 / torch.cdist(means, means).pow_(2 * p)
    return [ratio[upper].mean().item()]


def dense_gnc2(means: torch.Tensor, mu_g: torch.Tensor) -> list[float]:
    """(d) for GNC2: unit centred means, torch.cdist, each kernel on the upper triangle."""
    K, d = means.shape
    u = torch.nn.functional.normalize(means - mu_g, dim=1)
    dist = torch.cdist(u, u)[torch.ones(K, K, dtype=torch.bool, device=means.device).triu_(1)]
    out = []
    for values in (dist, -dist.log(), dist.pow(-(d - 2.0))):
        out += [values.mean().item(), values.var(unbiased=False).item()]
    return out


def subset_gate(name: str, stats, K: int) -> None:
    """ncfast's tiled sweep against (d) on the first 2048 classes (a small tile, so several
    tiles and the diagonal blocks are exercised), in float64, on the bench's device."""
    sub = torch.arange(min(K, 2048), device=stats.means.device)
    counts = stats.counts[sub].double()
    means = stats.means.double()[sub]
    mu_g = (counts[:, None] * means).sum(0) / counts.sum()
    v = stats.class_variances()[sub]
    m = ncfast.metrics
    if name.startswith("CDNV"):
        p = 2.0 if "p = 2" in name else 1.0
        pairs = [(m.cdnv(stats, tile=300, classes=sub, distance_exponent=p),
                  dense_cdnv(means, v, p)[0])]
    else:
        ours = [x for k in m.gnc2(stats, classes=sub, tile=300).values() for x in k]
        pairs = list(zip(ours, dense_gnc2(means, mu_g)))
    for got, want in pairs:
        if not abs(got - want) <= EXTRA_GATE * max(abs(want), 1e-300):
            raise harness.CorrectnessError(f"{name}, first {sub.numel()} classes: ncfast "
                                           f"{got!r} vs dense float64 {want!r}")


def dense_fn(name: str, stats):
    """The (d) baseline of a pair row, or None."""
    means, mu_g, v = stats.means.double(), stats.global_mean().double(), stats.class_variances()
    if name.startswith("CDNV"):
        p = 2.0 if "p = 2" in name else 1.0
        return lambda: dense_cdnv(means, v, p)
    if name.startswith("GNC2"):
        return lambda: dense_gnc2(means, mu_g)
    return None


def ref_fits(row: str, K: int, device: str) -> str | None:
    """None if the reference library can run this row here, else why not."""
    if device == "cpu" and K > 5000 and row.split(" ")[0] in ("CDNV", "GNC2:", "interference"):
        return f"not run: a K x K float32 grid ({K * K * 4 / 2**30:.0f} GiB) per call"
    return None


def time_call(fn, device: str, min_run_time: float, single: bool) -> float:
    if not single:
        return harness.median_time(fn, device, min_run_time)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def extras_bench(K: int, device: str, min_run_time: float):
    stats, weight, ood_mean, batches = extra_data(K, device)
    ref, missing = reference_library()
    gate_rows = extra_candidates(stats, weight, ood_mean, batches, ref, torch.float64) \
        if ref is not None else None
    timed = extra_candidates(stats, weight, ood_mean, batches, ref, torch.float32) \
        if ref is not None else extra_candidates(stats, weight, ood_mean, batches, None, None)
    single = device == "cpu" and K * K > SINGLE_SHOT_PAIRS
    rows = []
    for name, (ours, theirs) in timed.items():
        if name.startswith("interference") and device == "cpu" and K * K * 4 > 2**31:
            rows.append({"K": K, "d": EXTRA_D, "metric": name,
                         "ncfast": f"not run on this CPU: a {K * K * 4 / 2**30:.0f} GiB grid "
                                   "(interference_tiles streams it)"})
            continue
        if theirs is None:
            reason = missing or "computes no such metric"
        else:
            reason = ref_fits(name, K, device)
        one_call = single and name.split()[0] in ("CDNV", "GNC2:")  # minutes per call
        start = time.perf_counter()
        ours_values = ours()
        first_call = time.perf_counter() - start  # on a CPU (single: no device to sync)
        dense = dense_fn(name, stats)
        if dense is not None:
            subset_gate(name, stats, K)
        if reason is None:  # the gate: the same values from both, in float64
            want = gate_rows[name][1]()
            tol = EXTRA_GATE_GRID if name.startswith("GNC2") else EXTRA_GATE
            for got, exp in zip(ours_values, want):  # zip: the reference's values only
                if not abs(got - exp) <= tol * max(abs(exp), 1e-300):
                    raise harness.CorrectnessError(
                        f"{name} at K={K}: ncfast {got!r} vs reference library {exp!r}")
        t_ours = first_call if one_call else time_call(ours, device, min_run_time, False)
        row = {"K": K, "d": EXTRA_D, "metric": name, "ncfast": harness.fmt_time(t_ours)}
        if reason is None:
            t_ref = time_call(theirs, device, min_run_time, one_call)
            row.update({"reference library": harness.fmt_time(t_ref),
                        "vs reference": harness.fmt_ratio(t_ref / t_ours)})
        else:
            row["reference library"] = reason
        if dense is not None and device == "cpu" and K * K * 8 > 2**31:
            row["(d) dense torch"] = f"not run on this CPU: K x K float64 is " \
                                     f"{K * K * 8 / 2**30:.0f} GiB"
        elif dense is not None:
            try:
                t_dense = time_call(dense, device, min_run_time, one_call)
                row.update({"(d) dense torch": harness.fmt_time(t_dense),
                            "vs (d)": harness.fmt_ratio(t_dense / t_ours)})
            except torch.cuda.OutOfMemoryError:
                row["(d) dense torch"] = "out of memory"
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"timed K={K} {name}: {row}", file=sys.stderr, flush=True)
    return rows, EXTRA_PASS_N[(device, K)], single


def extras_main(args, device: str) -> None:
    env = harness.environment(device, {
        "settings": f"min_run_time={args.min_run_time:g} s per measurement, d={EXTRA_D}, "
                    f"{EXTRA_PER_CLASS} samples per class, seed={SEED}, noise std={NOISE:g}, "
                    f"reference library tile_size={REF_TILE}, gate: relative difference "
                    f"<= {EXTRA_GATE:g} in float64"})
    others = harness.OtherCpuUse()
    sections = []
    for K in ((1000,) if args.quick else EXTRA_K):
        rows, n_pass, single = extras_bench(K, device, args.min_run_time)
        caption = (
            f"K = {K}, d = {EXTRA_D}: statistics of {EXTRA_PER_CLASS * K} fp32 samples in "
            "`ncfast.ClassStats`; every metric is read from them (float64 arithmetic). "
            "**reference library**: rhubarbwu/neural-collapse fed the same means, global mean, "
            f"v_k and classifier in float32 (its usual dtype), tile_size={REF_TILE}; before "
            f"timing, its float64 values agree with ncfast's to {EXTRA_GATE:g} "
            f"({EXTRA_GATE_GRID:g} "
            "for GNC2, whose grid it keeps in float32, where its Riesz energies at s = d - 2 "
            "underflow to 0 and are not compared). **vs "
            "reference**: its time / ncfast's. **second pass**: `PerSampleStats` over "
            f"{n_pass} samples in batches of 1024 (cosine margin and nearest-class-mean "
            "accuracy; neither is in the reference library). ncfast's times include reading "
            "the means and global mean from `ClassStats` (O(K d)); the reference gets them "
            "precomputed. **(d) dense torch**: CDNV and GNC2 as a user would write them in "
            "plain torch, float64: `torch.cdist` of the (unit) means, K x K, the kernel on its "
            "upper triangle; before timing, ncfast's tiled sweep (tile 300) agrees with (d) on "
            f"the first 2048 classes to {EXTRA_GATE:g}. "
            + ("CDNV and GNC2 times are one call each (minutes on this CPU). " if single
               else ""))
        sections.append(harness.markdown_table(
            rows, ["K", "d", "metric", "ncfast", "reference library", "vs reference",
                   "(d) dense torch", "vs (d)"], caption))
    harness.close_environment(env, others)
    harness.emit(harness.render_results("ncfast extra NC metrics benchmark", env, sections),
                 args.out)


def main(argv=None) -> None:
    parser = harness.base_parser("python -m bench.stats", __doc__.splitlines()[0])
    parser.add_argument("--extras", action="store_true",
                        help="the extra metrics at K = 1000 and 50,000 (d = 768) instead")
    args = harness.parse_args(parser, argv)
    device = args.device
    if args.extras:
        extras_main(args, device)
        return
    if args.dtypes and args.dtypes != [torch.float32]:
        parser.error("bench.stats measures fp32 features only (--dtypes fp32)")
    if args.shapes:
        if any(len(s) != 3 for s in args.shapes):
            parser.error("bench.stats: --shapes takes NxdxK, e.g. 50000x512x100")
        shapes = args.shapes
    else:
        N, d, K = SHAPES[device]
        shapes = [(QUICK_N[device] if args.quick else N, d, K)]

    env = harness.environment(device, {
        "settings": f"min_run_time={args.min_run_time:g} s per measurement, batch={BATCH}, "
                    f"seed={SEED}, noise std={NOISE:g}, gate: relative Frobenius error "
                    f"<= {GATE:g}"})
    others = harness.OtherCpuUse()
    sections, gate_rows = [], []
    for N, d, K in shapes:
        r = bench(N, d, K, device, args.min_run_time)
        rows, columns = format_rows(r)
        sections.append(harness.markdown_table(rows, columns, caption(r, device)))
        gate_rows += r["gate"]
        print(f"done: N={N} d={d} K={K}", file=sys.stderr, flush=True)

    sections.append(harness.markdown_table(
        gate_rows, ["candidate", "Sigma_W rel. error", "means rel. error"],
        caption="Correctness gate, passed before any timing: relative Frobenius error against "
                "`ncfast.reference.class_stats` (float64, two-pass) on the same samples."))
    harness.close_environment(env, others)
    harness.emit(harness.render_results("ncfast class-statistics benchmark", env, sections),
                 args.out)


if __name__ == "__main__":
    main()
