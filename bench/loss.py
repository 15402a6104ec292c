"""Loss benchmark: forward + backward (w.r.t. the logits) of ncfast.rescaled_mse_loss against
the straightforward eager PyTorch implementation and its torch.compile. `python -m bench.loss`."""

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

SHAPES = [(256, 10), (256, 1000), (4096, 1000), (8192, 32000)]
LARGE = (8192, 32000)  # also the size of the copy-bandwidth measurement on CUDA
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}


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
    # CUDA only: the same loss without the label-range check and its host synchronisation.
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
    shapes = args.shapes or [s for s in SHAPES
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

    harness.close_environment(env, others)
    columns = ["B", "K", "dtype", "ncfast", "eager", "compiled", "vs eager", "vs compiled",
               "ncfast GB/s"] + (["% of copy BW", "unchecked", "unchecked % of copy BW"]
                                 if copy else [])
    caption = CAPTION + (" **% of copy BW**: ncfast GB/s / copy GB/s above. **unchecked**: "
                         "ncfast with `ncfast.set_cuda_target_checks(False)` (no label-range "
                         "check, so no host sync per call)." if copy else "")
    sections.append(harness.markdown_table(format_rows(results, copy), columns, caption))
    harness.emit(harness.render_results("ncfast loss benchmark", env, sections), args.out)


if __name__ == "__main__":
    main()
