"""Loss benchmark: forward + backward (w.r.t. the logits) of ncfast.rescaled_mse_loss against
the straightforward eager PyTorch implementation and its torch.compile; the per-call overhead
at a tiny shape; the accuracy and cost of the float64 partial sums at vocabulary-scale K.
`python -m bench.loss`."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import ncfast
import ncfast.reference

from . import harness

# k != 1 so that no implementation can skip the weighting.
LOSS_K = 2.0
LOSS_M = 1.0
SEED = 0

# Issue 13's targets: on the CPU 128x10 and 256x100 against eager, 4096x1000 against compiled;
# on the GPU every shape against both, and 8192x32000 against the copy bandwidth.
SHAPES = {"cpu": [(128, 10), (256, 100), (4096, 1000), (8192, 32000)],
          "cuda": [(256, 10), (256, 1000), (4096, 1000), (8192, 32000)]}
LARGE = (8192, 32000)  # also the size of the copy-bandwidth measurement on CUDA
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
TINY = (4, 3)  # per-call overhead: the kernels' work is negligible at this shape
# One row of vocabulary-scale K: float32 sums of 2e7 squares lose ~1e-3 relative with a few
# running float32 partials; ncfast adds float32 partials of at most 8 terms into float64.
HUGE_K = 20_000_000


def eager_baseline(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Stands for the straightforward user implementation of the rescaled MSE loss (one-hot
    # target, weight matrix, unfused elementwise ops): what ncfast replaces.
    K = logits.shape[1]
    onehot = F.one_hot(target, K).to(logits.dtype)
    w = 1 + (LOSS_K - 1) * onehot
    return (w * (logits - LOSS_M * onehot) ** 2).sum(1).mean()


def ncfast_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ncfast.rescaled_mse_loss(logits, target, k=LOSS_K, M=LOSS_M,
                                    normalize="sample", reduction="mean")


def ncfast_loss_unchecked(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # CUDA only: the same loss without recording bad labels on the device.
    previous = ncfast.set_cuda_target_checks(False)
    try:
        return ncfast_loss(logits, target)
    finally:
        ncfast.set_cuda_target_checks(previous)


def fwd_bwd(loss_fn, logits: torch.Tensor, target: torch.Tensor):
    """The timed step: loss and its gradient w.r.t. the logits (autograd.grad, so no .grad
    accumulation adds a pass that a training step would not have)."""
    def step():
        loss = loss_fn(logits, target)
        (grad,) = torch.autograd.grad(loss, logits)
        return loss, grad
    return step


def reference(logits: torch.Tensor, target: torch.Tensor, chunk_bytes: int = 8 << 20):
    """Float64 loss and gradient from ncfast.reference, in row chunks (the mean is a sum over
    rows / B). Small chunks keep the float64 autograd temporaries of the large shape out of
    host-memory trouble, and small enough for malloc to reuse instead of page-faulting in fresh
    memory each time (several times faster on the CPU VM)."""
    rows_per_chunk = max(1, chunk_bytes // (logits.shape[1] * 8))
    B = logits.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    grads = []
    for start in range(0, B, rows_per_chunk):
        chunk = logits.detach()[start:start + rows_per_chunk].to(torch.float64).requires_grad_()
        loss = ncfast.reference.rescaled_mse_loss(
            chunk, target[start:start + rows_per_chunk], k=LOSS_K, M=LOSS_M,
            normalize="sample", reduction="sum") / B
        (grad,) = torch.autograd.grad(loss, chunk)
        total += loss.detach()
        grads.append(grad)
    return total, torch.cat(grads)


def make_inputs(B: int, K: int, dtype: torch.dtype, device: str):
    gen = torch.Generator(device=device).manual_seed(SEED)
    logits = torch.randn(B, K, generator=gen, device=device, dtype=torch.float32).to(dtype)
    target = torch.randint(0, K, (B,), generator=gen, device=device)
    return logits.requires_grad_(), target


def copy_bandwidth(device: str, min_run_time: float) -> dict:
    """Device-to-device copy of a tensor the byte size of the LARGE fp32 logits: the practical
    bandwidth ceiling that ncfast's GB/s is compared to."""
    src = torch.randn(*LARGE, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    t = harness.median_time(lambda: dst.copy_(src), device, min_run_time)
    return {"bytes": nbytes, "time": t, "GB/s": 2 * nbytes / t / 1e9}


def bench_case(B: int, K: int, dtype: torch.dtype, device: str, min_run_time: float) -> dict:
    logits, target = make_inputs(B, K, dtype, device)
    ref_loss, ref_grad = reference(logits, target)

    # dynamic=False compiles one graph per shape; the reset keeps those graphs from piling up
    # against dynamo's recompile limit across cases.
    torch._dynamo.reset()
    compiled_baseline = torch.compile(eager_baseline, dynamic=False)
    steps = {
        "ncfast": fwd_bwd(ncfast_loss, logits, target),
        **({"ncfast unchecked": fwd_bwd(ncfast_loss_unchecked, logits, target)}
           if device == "cuda" else {}),
        "eager": fwd_bwd(eager_baseline, logits, target),
        "compiled": fwd_bwd(compiled_baseline, logits, target),
    }
    steps["compiled"]()  # compiles forward and backward, outside any timing

    # Every candidate passes the gate before any is timed.
    where = f"B={B} K={K} {harness.DTYPE_NAMES[dtype]} {device}"
    for name, step in steps.items():
        loss, grad = step()
        harness.check_close(f"{name} loss ({where})", loss, ref_loss, dtype)
        harness.check_close(f"{name} grad ({where})", grad, ref_grad, dtype)
    del loss, grad, ref_loss, ref_grad

    times = {name: harness.median_time(step, device, min_run_time)
             for name, step in steps.items()}
    bytes_moved = 3 * B * K * logits.element_size()
    return {
        "B": B, "K": K, "dtype": harness.DTYPE_NAMES[dtype], **times,
        "GB/s": bytes_moved / times["ncfast"] / 1e9,
    }


def overhead_case(device: str, min_run_time: float) -> dict:
    """Forward + backward at a tiny shape: the per-call cost of each implementation (argument
    checks, dispatch, autograd, launches), its kernels' work being negligible."""
    logits, target = make_inputs(*TINY, torch.float32, device)
    torch._dynamo.reset()
    compiled_baseline = torch.compile(eager_baseline, dynamic=False)
    steps = {"ncfast": fwd_bwd(ncfast_loss, logits, target),
             "eager": fwd_bwd(eager_baseline, logits, target),
             "compiled": fwd_bwd(compiled_baseline, logits, target)}
    ref_loss, ref_grad = reference(logits, target)
    for name, step in steps.items():
        loss, grad = step()
        harness.check_close(f"{name} loss (tiny)", loss, ref_loss, torch.float32)
        harness.check_close(f"{name} grad (tiny)", grad, ref_grad, torch.float32)
    return {name: harness.median_time(step, device, min_run_time)
            for name, step in steps.items()}


def accuracy_case(device: str, min_run_time: float) -> dict:
    """One float32 row of HUGE_K logits: relative error of the loss against float64 for ncfast
    and the eager formula (float32 throughout), and the forward time of ncfast against a single
    float32 pass over the same logits (torch.dot(z, z), BLAS sdot): the cost of the float64
    partial sums and the label check."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    z = torch.randn(1, HUGE_K, generator=gen, device=device)
    target = torch.zeros(1, dtype=torch.long, device=device)
    exact = float(ncfast.reference.rescaled_mse_loss(z.double(), target, k=LOSS_K, M=LOSS_M,
                                                      reduction="sum"))
    with torch.no_grad():
        ours = float(ncfast.rescaled_mse_loss(z, target, k=LOSS_K, M=LOSS_M, reduction="sum"))
        eager = float(eager_baseline(z, target))
        dot = float(torch.dot(z[0], z[0]))
        exact_dot = float((z.double() ** 2).sum())
        times = {
            "ncfast": harness.median_time(
                lambda: ncfast.rescaled_mse_loss(z, target, k=LOSS_K, M=LOSS_M, reduction="sum"),
                device, min_run_time),
            "sdot": harness.median_time(lambda: torch.dot(z[0], z[0]), device, min_run_time),
        }
    return {"K": HUGE_K, "ncfast error": abs(ours - exact) / exact,
            "eager error": abs(eager - exact) / exact,
            "sdot error": abs(dot - exact_dot) / exact_dot, **times}


def format_rows(results: list[dict], copy: dict | None) -> list[dict]:
    rows = []
    for r in results:
        row = {
            "B": r["B"], "K": r["K"], "dtype": r["dtype"],
            "ncfast": harness.fmt_time(r["ncfast"]),
            "eager": harness.fmt_time(r["eager"]),
            "compiled": harness.fmt_time(r["compiled"]),
            "vs eager": harness.fmt_ratio(r["eager"] / r["ncfast"]),
            "vs compiled": harness.fmt_ratio(r["compiled"] / r["ncfast"]),
            "ncfast GB/s": harness.fmt_rate(r["GB/s"]),
        }
        if copy:
            row["% of copy BW"] = f"{100 * r['GB/s'] / copy['GB/s']:.0f}%"
        if "ncfast unchecked" in r:
            row["unchecked"] = harness.fmt_time(r["ncfast unchecked"])
            unchecked_rate = r["GB/s"] * r["ncfast"] / r["ncfast unchecked"]
            row["unchecked % of copy BW"] = f"{100 * unchecked_rate / copy['GB/s']:.0f}%"
        rows.append(row)
    return rows


CAPTION = (
    "Forward + backward w.r.t. the logits, median time per call; rescaled MSE with "
    f"k={LOSS_K:g}, M={LOSS_M:g}, normalize=\"sample\", reduction=\"mean\". "
    "**eager**: the straightforward PyTorch implementation (one-hot, weight matrix, unfused ops); "
    "**compiled**: the same function under `torch.compile(dynamic=False)`, compiled before "
    "timing. **vs eager / vs compiled**: baseline time / ncfast time. "
    "**ncfast GB/s** = 3·B·K·element_size / ncfast time: the minimum traffic (read the logits "
    "forward; read them and write the gradient backward)."
)


def main(argv=None) -> None:
    args = harness.parse_args(harness.base_parser("python -m bench.loss", __doc__.splitlines()[0]), argv)
    device = args.device
    shapes = args.shapes or [s for s in SHAPES[device]
                             if not (args.quick and device == "cpu" and s == LARGE)]
    dtypes = args.dtypes or DTYPES[device]

    env = harness.environment(device, {
        "settings": f"min_run_time={args.min_run_time:g} s per measurement, seed={SEED}"})

    others = harness.OtherCpuUse()
    sections = []
    copy = None
    if device == "cuda":
        copy = copy_bandwidth(device, args.min_run_time)
        sections.append(harness.markdown_table(
            [{"bytes": f"{copy['bytes'] / 1e9:.3f} GB", "time": harness.fmt_time(copy["time"]),
              "GB/s": harness.fmt_rate(copy["GB/s"])}],
            ["bytes", "time", "GB/s"],
            caption="Device-to-device copy `dst.copy_(src)` of the (8192, 32000) fp32 logits' "
                    "size; GB/s = 2 · bytes / time (read + write).",
        ))

    results = []
    for dtype in dtypes:
        for B, K in shapes:
            results.append(bench_case(B, K, dtype, device, args.min_run_time))
            print(f"done: B={B} K={K} {harness.DTYPE_NAMES[dtype]}", file=sys.stderr,
                  flush=True)

    overhead = overhead_case(device, args.min_run_time)
    accuracy = accuracy_case(device, args.min_run_time)
    print("done: overhead and accuracy", file=sys.stderr, flush=True)

    harness.close_environment(env, others)
    columns = ["B", "K", "dtype", "ncfast", "eager", "compiled", "vs eager", "vs compiled",
               "ncfast GB/s"] + (["% of copy BW", "unchecked", "unchecked % of copy BW"]
                                 if copy else [])
    caption = CAPTION + (" **% of copy BW**: ncfast GB/s / copy GB/s above; ncfast runs with "
                         "its default label check (on the device, no host sync). "
                         "**unchecked**: ncfast with `ncfast.set_cuda_target_checks(False)` (bad "
                         "labels not recorded)." if copy else "")
    sections.append(harness.markdown_table(format_rows(results, copy), columns, caption))
    sections.append(harness.markdown_table(
        [{"B x K": f"{TINY[0]} x {TINY[1]}",
          **{name: harness.fmt_time(t) for name, t in overhead.items()},
          "vs eager": harness.fmt_ratio(overhead["eager"] / overhead["ncfast"]),
          "vs compiled": harness.fmt_ratio(overhead["compiled"] / overhead["ncfast"])}],
        ["B x K", "ncfast", "eager", "compiled", "vs eager", "vs compiled"],
        caption="Per-call overhead: forward + backward as above at a tiny fp32 shape, where the "
                "kernels' work is negligible (argument checks, dispatch, autograd, launches)."))
    sections.append(harness.markdown_table(
        [{"K": f"{accuracy['K']:.3g}",
          "ncfast rel. error": f"{accuracy['ncfast error']:.1e}",
          "eager rel. error": f"{accuracy['eager error']:.1e}",
          "sdot rel. error": f"{accuracy['sdot error']:.1e}",
          "ncfast forward": harness.fmt_time(accuracy["ncfast"]),
          "sdot": harness.fmt_time(accuracy["sdot"]),
          "ncfast / sdot time": harness.fmt_ratio(accuracy["ncfast"] / accuracy["sdot"])}],
        ["K", "ncfast rel. error", "eager rel. error", "sdot rel. error", "ncfast forward",
         "sdot", "ncfast / sdot time"],
        caption="Accuracy at vocabulary scale: one fp32 row of K logits, loss with "
                "reduction=\"sum\", relative error against the float64 reference; ncfast sums "
                "float32 partials of at most 8 terms in float64. **sdot**: `torch.dot(z, z)`, one "
                "float32 pass over the same logits (its error against the float64 sum of "
                "squares): the ncfast / sdot time ratio is the cost of the float64 partials and "
                "the label check, both under no_grad."))
    harness.emit(harness.render_results("ncfast loss benchmark", env, sections), args.out)


if __name__ == "__main__":
    main()
