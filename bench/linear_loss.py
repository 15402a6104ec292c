"""Fused linear + loss benchmark: forward + backward (w.r.t. features, weight and bias) of
ncfast.linear_rescaled_mse_loss, both methods, against the eager composition linear + ncfast loss,
its torch.compile, and the two K x d x d products of the Gram path; time and peak extra memory.
`python -m bench.linear_loss`."""

from __future__ import annotations

import gc
import sys

import torch
import torch.nn.functional as F

import ncfast
import ncfast.reference
from ncfast.linear_loss import default_chunk_size

from . import harness

# k != 1 so that no implementation can skip the weighting.
LOSS_K = 2.0
LOSS_M = 1.0
SEED = 0

# (N, d, K): the shapes. --quick uses the smaller ones.
SHAPES = {"cpu": [(2048, 256, 32768)], "cuda": [(8192, 4096, 131072)]}
QUICK_SHAPES = {"cpu": [(1024, 128, 8192)], "cuda": [(4096, 2048, 65536)]}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16]}
# The targets, checked on its shapes: time ratio to eager and share of eager's memory.
TARGETS = {("cpu", (2048, 256, 32768), torch.float32): ("at least 20x faster than eager", 20.0,
                                                          0.05),
           ("cuda", (8192, 4096, 131072), torch.bfloat16): ("at most 0.25x of eager's time",
                                                            4.0, None)}


# ------------------------------------------------------------------------------- candidates

def eager_composition(X, W, b, y):
    # Stands for what a user writes without the fused head: the linear layer (N x K logits),
    # then the ncfast loss on them.
    return ncfast.rescaled_mse_loss(F.linear(X, W, b), y, k=LOSS_K, M=LOSS_M)


def fused(method: str):
    def loss(X, W, b, y):
        return ncfast.linear_rescaled_mse_loss(X, W, y, b, k=LOSS_K, M=LOSS_M, method=method)
    return loss


def fwd_bwd(loss_fn, X, W, b, y):
    """The timed step: loss and its gradients w.r.t. features, weight and bias (autograd.grad,
    so no .grad accumulation adds a pass that a training step would not have)."""
    def step():
        loss = loss_fn(X, W, b, y)
        return (loss, *torch.autograd.grad(loss, (X, W, b)))
    return step


def floor_products(X, W):
    """Exactly the Gram path's two K x d x d products, in its dtypes: G = W^T W (float32 result
    for bf16 on CUDA) and W S with S a d x d matrix (result in the weight's dtype, freshly
    allocated like the weight gradient). Nothing else."""
    gen = torch.Generator(device=W.device).manual_seed(SEED + 1)
    S = torch.randn(W.shape[1], W.shape[1], generator=gen, device=W.device).to(W.dtype)
    wt = W.T
    if W.is_cuda and W.dtype == torch.bfloat16 and hasattr(torch.ops.aten.mm, "dtype"):
        def gram():
            return torch.mm(wt, W, out_dtype=torch.float32)
    else:
        def gram():
            return torch.mm(wt, W)

    def two():
        return gram(), torch.mm(W, S)
    return two


# ------------------------------------------------------------------------ reference and gate

def reference(X, W, b, y, chunk_bytes: int = 64 << 20):
    """Float64 loss and gradients of the composition from ncfast.reference, in row chunks (the
    mean is a sum over rows / N) so the float64 logits never exist whole."""
    N, K = X.shape[0], W.shape[0]
    rows = max(1, chunk_bytes // (K * 8))
    W64 = W.detach().to(torch.float64).requires_grad_()
    b64 = b.detach().to(torch.float64).requires_grad_()
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    gw = torch.zeros_like(W64)
    gb = torch.zeros_like(b64)
    gx = []
    for start in range(0, N, rows):
        x = X.detach()[start:start + rows].to(torch.float64).requires_grad_()
        loss = ncfast.reference.rescaled_mse_loss(
            F.linear(x, W64, b64), y[start:start + rows], k=LOSS_K, M=LOSS_M,
            reduction="sum") / N
        g = torch.autograd.grad(loss, (x, W64, b64))
        total += loss.detach()
        gx.append(g[0])
        gw += g[1]
        gb += g[2]
    return total, torch.cat(gx), gw, gb


def make_inputs(N: int, d: int, K: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(SEED)
    X = torch.randn(N, d, generator=gen, device=device)
    W = torch.randn(K, d, generator=gen, device=device) / d**0.5  # logits of order 1
    b = 0.1 * torch.randn(K, generator=gen, device=device)
    y = torch.randint(0, K, (N,), generator=gen, device=device)
    return (*(t.to(dtype).requires_grad_() for t in (X, W, b)), y)


# ----------------------------------------------------------------------------------- memory

def peak_extra_bytes(fn, device: str) -> int:
    """Peak bytes held by torch's allocator during one call of `fn`, above what was held before
    it (the inputs), the returned gradients included. CUDA: torch.cuda.max_memory_allocated.
    CPU: the allocation and free events of torch's CPU allocator, as torch.profiler
    (profile_memory=True) records them, summed in order: the running total's maximum."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


# ------------------------------------------------------------------------------------ bench

def bench_case(N: int, d: int, K: int, dtype: torch.dtype, device: str,
               min_run_time: float) -> dict:
    X, W, b, y = make_inputs(N, d, K, dtype, device)
    ref = reference(X, W, b, y)

    # dynamic=False compiles one graph per shape; the reset keeps those graphs from piling up
    # against dynamo's recompile limit across cases.
    torch._dynamo.reset()
    compiled_composition = torch.compile(eager_composition, dynamic=False)
    steps = {
        "gram": fwd_bwd(fused("gram"), X, W, b, y),
        "chunked": fwd_bwd(fused("chunked"), X, W, b, y),
        "eager": fwd_bwd(eager_composition, X, W, b, y),
        "compiled": fwd_bwd(compiled_composition, X, W, b, y),
    }
    steps["compiled"]()  # compiles forward and backward, outside any timing

    # Every candidate passes the gate before any is timed. In bf16/fp16 the K x d weight gradient
    # has ~1e8 entries and every method rounds each one, so elementwise tolerances catch the
    # tails of plain rounding; there each candidate's largest error must instead stay within
    # twice eager's own (plus one unit roundoff of the largest entry).
    where = f"N={N} d={d} K={K} {harness.DTYPE_NAMES[dtype]} {device}"
    labels = ("loss", "grad features", "grad weight", "grad bias")
    outputs = {name: [t.detach() for t in step()] for name, step in steps.items()}
    for name, outs in outputs.items():
        for label, ours, expected, eager in zip(labels, outs, ref, outputs["eager"]):
            if dtype in (torch.float32, torch.float64):
                harness.check_close(f"{name} {label} ({where})", ours, expected, dtype)
                continue
            err = (ours.double() - expected).abs().max().item()
            bound = (2 * (eager.double() - expected).abs().max().item()
                     + torch.finfo(dtype).eps * expected.abs().max().item())
            if not err <= bound:
                raise harness.CorrectnessError(
                    f"correctness gate failed for {name} {label} ({where}): max error {err:.3g} "
                    f"> {bound:.3g} (twice eager's + eps * max)")
    del outputs, ours, ref

    grads_bytes = sum(t.numel() * t.element_size() for t in (X, W, b))
    memory = {name: peak_extra_bytes(step, device) for name, step in steps.items()}
    steps["floor"] = floor_products(X, W)
    times = {name: harness.median_time(step, device, min_run_time)
             for name, step in steps.items()}
    return {"N": N, "d": d, "K": K, "dtype": dtype, "times": times, "memory": memory,
            "grads_bytes": grads_bytes, "chunk": default_chunk_size(K)}


# Nominal flop counts (multiply-adds x 2) of each candidate's forward + backward.
def flops(name: str, N: int, d: int, K: int) -> float:
    return {
        "gram": 4 * K * d * d + 8 * N * d * d,  # G, W S; X G twice, X^T D X, the class rows
        "floor": 4 * K * d * d,
        "chunked": 8 * N * K * d,  # logits, recomputed logits, grad_X, grad_W
        "eager": 6 * N * K * d,
        "compiled": 6 * N * K * d,
    }[name]


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_rows(r: dict) -> list[dict]:
    times, memory = r["times"], r["memory"]
    rows = []
    for name in ("gram", "chunked", "eager", "compiled", "floor"):
        t = times[name]
        row = {
            "N x d x K": f"{r['N']} x {r['d']} x {r['K']}",
            "dtype": harness.DTYPE_NAMES[r["dtype"]],
            "candidate": name,
            "time": harness.fmt_time(t),
            "vs eager": harness.fmt_ratio(times["eager"] / t),
            "vs compiled": harness.fmt_ratio(times["compiled"] / t),
            "x floor": harness.fmt_ratio(t / times["floor"]),
            "TFLOP/s": harness.fmt_rate(flops(name, r["N"], r["d"], r["K"]) / t / 1e12),
        }
        if name in memory:
            extra = memory[name]
            work = max(extra - r["grads_bytes"], 0)
            eager_work = max(memory["eager"] - r["grads_bytes"], 1)
            row.update({
                "peak extra memory": fmt_bytes(extra),
                "% of eager's": f"{100 * extra / memory['eager']:.1f}%",
                "workspace": fmt_bytes(work),
                "workspace % of eager's": f"{100 * work / eager_work:.1f}%",
            })
        rows.append(row)
    return rows


def target_lines(r: dict, device: str) -> list[str]:
    key = (device, (r["N"], r["d"], r["K"]), r["dtype"])
    if key not in TARGETS:
        return []
    text, speedup, memory_share = TARGETS[key]
    times, memory = r["times"], r["memory"]
    got = times["eager"] / times["gram"]
    lines = [f"- time, gram: {text}: eager / gram = {got:.1f}x "
             f"({'met' if got >= speedup else 'not met'}); the floor alone is "
             f"{times['eager'] / times['floor']:.1f}x faster than eager"]
    if memory_share is not None:
        share = memory["gram"] / memory["eager"]
        work = (memory["gram"] - r["grads_bytes"]) / (memory["eager"] - r["grads_bytes"])
        lines.append(
            f"- memory, gram: at most {100 * memory_share:.0f}% of eager's peak extra memory: "
            f"{100 * share:.1f}% counting the returned gradients "
            f"({'met' if share <= memory_share else 'not met'}; the weight gradient alone, "
            f"K d elements, is {100 * r['K'] * r['d'] * r['dtype'].itemsize / memory['eager']:.1f}"
            f"% of eager's), {100 * work:.1f}% without them "
            f"({'met' if work <= memory_share else 'not met'})")
    else:
        nk = r["N"] * r["K"] * r["dtype"].itemsize
        work = memory["gram"] - r["grads_bytes"]
        lines.append(f"- memory, gram: no N x K buffer: workspace (peak extra less the returned "
                     f"gradients) {fmt_bytes(work)} against {fmt_bytes(nk)} for one N x K "
                     f"{harness.DTYPE_NAMES[r['dtype']]} tensor "
                     f"({'met' if work < nk else 'not met'})")
    return lines


CAPTION = (
    "Forward + backward w.r.t. features, weight and bias, median time per call; rescaled MSE with "
    f"k={LOSS_K:g}, M={LOSS_M:g}, normalize=\"sample\", reduction=\"mean\", with bias; features "
    "N(0,1), weight N(0,1/d), bias N(0,0.01), random labels. **gram**, **chunked**: "
    "`ncfast.linear_rescaled_mse_loss(method=...)` (chunked: default chunk of {chunk} rows). "
    "**eager**: `ncfast.rescaled_mse_loss(F.linear(x, W, b), y)`; **compiled**: that function "
    "under `torch.compile(dynamic=False)`, compiled before timing. **floor**: the Gram path's "
    "two K x d x d products alone (`W.T @ W`, `W @ S`), no loss, time only. **vs eager / vs "
    "compiled**: baseline time / candidate time; **x floor**: candidate time / floor time. "
    "**TFLOP/s**: nominal flops / time, with 6NKd (eager, compiled), 8NKd (chunked: logits "
    "recomputed), 4Kd² + 8Nd² (gram), 4Kd² (floor). **peak extra memory**: the most bytes "
    "torch's allocator held during one call above what it held before (the inputs), the "
    "returned gradients included ({how}); **workspace**: the same less the gradients' "
    "{grads} (which every method returns); percentages against eager's."
)


def main(argv=None) -> None:
    parser = harness.base_parser("python -m bench.linear_loss", __doc__.splitlines()[0])
    args = harness.parse_args(parser, argv)
    device = args.device
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)[device]
    dtypes = args.dtypes or DTYPES[device]

    env = harness.environment(device, {
        "settings": f"min_run_time={args.min_run_time:g} s per measurement, seed={SEED}"})
    others = harness.OtherCpuUse()
    results = []
    for dtype in dtypes:
        for shape in shapes:
            if len(shape) != 3:
                parser.error(f"--shapes takes NxdxK, got {'x'.join(map(str, shape))}")
            results.append(bench_case(*shape, dtype, device, args.min_run_time))
            print(f"done: N x d x K = {shape} {harness.DTYPE_NAMES[dtype]}", file=sys.stderr,
                  flush=True)

    harness.close_environment(env, others)
    columns = ["N x d x K", "dtype", "candidate", "time", "vs eager", "vs compiled", "x floor",
               "TFLOP/s", "peak extra memory", "% of eager's", "workspace",
               "workspace % of eager's"]
    how = ("torch.cuda.max_memory_allocated" if device == "cuda" else
           "torch.profiler's CPU allocator events, in a separate untimed call")
    sections = []
    for r in results:
        caption = CAPTION.format(chunk=r["chunk"], how=how, grads=fmt_bytes(r["grads_bytes"]))
        sections.append(harness.markdown_table(format_rows(r), columns, caption))
        lines = target_lines(r, device)
        if lines:
            sections.append("Targets of the issue at this shape:\n\n" + "\n".join(lines))
    harness.emit(harness.render_results("ncfast fused linear + loss benchmark", env, sections),
                 args.out)


if __name__ == "__main__":
    main()
