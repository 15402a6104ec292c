"""Training throughput of `ncfast train`'s step on synthetic ImageNet-shaped data: the ncfast
rescaled-MSE loss against torch's cross-entropy and torch's MSE on one-hot targets, and the cost
of NC tracking (ncfast.measure) against training. `python -m bench.train`."""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

import ncfast
from ncfast.train import load
from ncfast.train.models import build_model

from . import harness

SEED = 0
K = 1000
# (arch, image size, batch) per device: ImageNet-shaped on the GPU, a small size on the CPU.
CASES = {
    "cuda": [("resnet18", 224, 256), ("resnet50", 224, 256)],
    "cpu": [("resnet18", 64, 32), ("resnet50", 64, 16)],
}
QUICK_CASES = {"cuda": [("resnet18", 224, 256)], "cpu": [("resnet18", 32, 16)]}
# NC tracking: measure() over this many batches (NC4's second sweep over the cached features,
# eval mode, no_grad),
# against training on the same number of samples.
TRACK_BATCHES = 8
TRACK_EVERY, TEST_FRACTION = 10, 0.2  # the default cadence, a test set 1/5 of the train set


def losses():
    """The three losses a user would train with; the MSEs as the paper defines them (element
    normalisation: the mean over all B x K entries)."""
    return {
        "ncfast rescaled MSE": lambda z, y: ncfast.rescaled_mse_loss(z, y, normalize="element"),
        "torch cross-entropy": F.cross_entropy,
        # what users write without ncfast: nn.MSELoss against one-hot targets
        "torch MSE (one-hot)": lambda z, y: F.mse_loss(z, F.one_hot(y, z.shape[1]).to(z.dtype)),
    }


def gate(device: str) -> None:
    """The ncfast loss equals torch's MSE on one-hot targets before anything is timed."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    z = torch.randn(64, K, generator=gen, device=device, dtype=torch.float64)
    y = torch.randint(0, K, (64,), generator=gen, device=device)
    fns = losses()
    harness.check_close("ncfast rescaled MSE vs torch MSE (one-hot)",
                        fns["ncfast rescaled MSE"](z, y), fns["torch MSE (one-hot)"](z, y),
                        torch.float64)


def make_model(arch: str, device: str):
    cfg = load(None, [f"model.arch={arch}", "model.stem=imagenet"]).model
    model = build_model(cfg, K, (3, 224, 224)).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" \
        else contextlib.nullcontext()


def bench_case(arch: str, size: int, batch: int, device: str, min_run_time: float) -> list:
    torch.manual_seed(SEED)
    model = make_model(arch, device)
    x = torch.randn(batch, 3, size, size, device=device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, K, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    rows, times = [], {}
    for name, loss_fn in losses().items():
        def step():
            with autocast(device):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):  # warm-up: cuDNN autotuning, allocator
            step()
        times[name] = harness.median_time(step, device, min_run_time)
    base = times["torch cross-entropy"]
    for name, t in times.items():
        rows.append({"model": arch, "input": f"{batch}x3x{size}x{size}", "loss": name,
                     "step": harness.fmt_time(t), "samples/s": f"{batch / t:,.0f}",
                     "vs cross-entropy": harness.fmt_ratio(base / t)})

    # NC tracking: ncfast.measure over TRACK_BATCHES batches vs training on them.
    data = [(x, y)] * TRACK_BATCHES

    def track():  # in float32, as ncfast train measures (its measure_split says why)
        ncfast.measure(model, data, classifier=model.fc, nc4=True)

    track()
    t_track = harness.median_time(track, device, min_run_time) / (TRACK_BATCHES * batch)
    t_train = times["ncfast rescaled MSE"] / batch
    overhead = t_track / t_train * (1 + TEST_FRACTION) / TRACK_EVERY
    tracking = {"model": arch, "input": f"{batch}x3x{size}x{size}",
                "measure per sample": harness.fmt_time(t_track),
                "train step per sample": harness.fmt_time(t_train),
                "measure / train": harness.fmt_ratio(t_track / t_train),
                f"overhead at track.every={TRACK_EVERY}": f"{100 * overhead:.1f}%"}
    return rows, tracking


def main(argv=None) -> None:
    parser = harness.base_parser("python -m bench.train", __doc__.splitlines()[0])
    args = harness.parse_args(parser, argv)
    device = args.device
    if args.shapes or args.dtypes:
        parser.error("bench.train: the cases are fixed (--quick for a smoke run)")
    cases = (QUICK_CASES if args.quick else CASES)[device]
    precision = "bf16 autocast + channels_last" if device == "cuda" else "fp32"
    env = harness.environment(device, {
        "settings": f"min_run_time={args.min_run_time:g} s per measurement, K={K}, SGD "
                    f"(momentum 0.9, wd 5e-4), {precision}, "
                    f"synthetic inputs resident on the device (no data loading), seed {SEED}, the "
                    f"ncfast loss without its CUDA label read-back, as `ncfast train` runs it"})
    others = harness.OtherCpuUse()
    gate(device)
    step_rows, track_rows = [], []
    for arch, size, batch in cases:
        # As `ncfast train` runs the loss: its labels are validated with the data, so no
        # label read-back on CUDA (cross-entropy checks with device asserts, also no sync).
        with ncfast.cuda_target_checks(False):
            rows, tracking = bench_case(arch, size, batch, device, args.min_run_time)
        step_rows += rows
        track_rows.append(tracking)
        print(f"done: {arch} {size} {batch}", file=sys.stderr, flush=True)
    sections = [
        harness.markdown_table(step_rows, ["model", "input", "loss", "step", "samples/s",
                                           "vs cross-entropy"],
                               caption="One training step (forward, loss, backward, SGD step), "
                                       "median. **vs cross-entropy**: the cross-entropy step "
                                       "time / this step time (above 1: faster). Correctness "
                                       "gate before timing: the ncfast loss equals torch's MSE "
                                       "on one-hot targets in float64."),
        harness.markdown_table(track_rows, list(track_rows[0]),
                               caption=f"NC tracking: `ncfast.measure` (eval mode, no_grad, "
                                       f"float32, NC4's second sweep over the cached "
                                       f"features) per sample against a training step per "
                                       f"sample (ncfast loss). **overhead**: "
                                       f"measure/train x (1 + {TEST_FRACTION:g} for a test set) / "
                                       f"{TRACK_EVERY}, the share of training time at the "
                                       f"default cadence."),
    ]
    harness.close_environment(env, others)
    harness.emit(harness.render_results("ncfast training-step benchmark", env, sections),
                 args.out)


if __name__ == "__main__":
    main()
