"""Input pipeline of `ncfast train` on ImageFolder JPEGs: decoded and augmented images/s of the
training loader (PIL in the workers) against the number of workers, of the GPU decode path
(data.decode=cuda), and both against the model's own step rate with its inputs already on the
device. On a synthetic ImageNet-like tree of JPEGs made here. `python -m bench.data`."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import ncfast
from ncfast.train import load
from ncfast.train.data import (IMAGENET_MEAN, IMAGENET_STD, close_workers, epoch_batches,
                               image_folder, loaders)
from ncfast.train.gpu_decode import GpuPipeline, augment, decode

from . import harness
from .train import K, autocast, make_model

SEED = 0
SIZE = 224
# ImageNet's training JPEGs are mostly 500 px on the long side, 4:3 landscape the most common
# (mean about 390 x 470, about 110 KB each): (height, width, probability); one in five images
# gets a long side drawn from 250-900 px instead of 500.
SHAPES = [(375, 500, 0.55), (333, 500, 0.15), (500, 375, 0.12), (500, 500, 0.08),
          (500, 333, 0.04), (281, 500, 0.06)]
NOISE = 18  # pixel noise (uint8 levels) that makes the files about ImageNet's size at quality 90

SETTINGS = {  # images, classes, per-process batch, worker counts, model batch, fed steps
    "cpu": dict(images=384, classes=8, batch=32, workers=[0, 1, 2], gpu_workers=[],
                model_batch=8, fed_steps=0),
    "cuda": dict(images=2048, classes=16, batch=256, workers=[2, 4, 8, 15], gpu_workers=[2, 4],
                 model_batch=256, fed_steps=30),
}


def _draw_shape(rng: np.random.Generator) -> tuple[int, int]:
    probs = np.array([p for *_, p in SHAPES])
    h, w, _ = SHAPES[rng.choice(len(SHAPES), p=probs / probs.sum())]
    if rng.random() < 0.2:
        long_side = int(rng.integers(250, 901))
        scale = long_side / max(h, w)
        h, w = max(32, round(h * scale)), max(32, round(w * scale))
    return h, w


def _write_image(job: tuple[Path, int]) -> tuple[int, int, int]:
    """One JPEG: a smooth random colour field plus pixel noise, quality 90; returns (h, w,
    bytes)."""
    from PIL import Image

    path, index = job
    rng = np.random.default_rng([SEED, index])
    h, w = _draw_shape(rng)
    coarse = Image.fromarray(rng.integers(20, 236, (max(2, h // 24), max(2, w // 24), 3),
                                          dtype=np.uint8))
    field = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels = field + rng.normal(0, NOISE, (h, w, 3)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return h, w, path.stat().st_size


def make_tree(root: Path, images: int, classes: int) -> dict:
    """root/train/<class>/*.jpg (``images`` files) and a one-image-per-class root/val/."""
    jobs = []
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{split}_{i:06d}.JPEG", i + (0 if split == "train" else 10**6)))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        shapes = list(pool.map(_write_image, jobs, chunksize=16))[:images]
    h, w, size = (np.array(v, dtype=np.float64) for v in zip(*shapes))
    return {"images": images, "classes": classes, "mean height": f"{h.mean():.0f} px",
            "mean width": f"{w.mean():.0f} px", "mean file": f"{size.mean() / 1e3:.0f} KB",
            "share not 500 px on the long side": f"{(np.maximum(h, w) != 500).mean():.0%}"}


def train_config(root: Path, batch: int, workers: int, decode_on: str):
    return load(None, ["data.name=imagefolder", f"data.dir={root}", f"data.image_size={SIZE}",
                       "data.augment=imagenet", f"data.batch_size={batch}",
                       f"data.workers={workers}", f"data.decode={decode_on}"])


# Each file is listed this many times in an epoch, so that an epoch holds dozens of batches (an
# ImageNet epoch holds thousands): the workers' start-of-epoch stall (each worker assembles a
# whole batch before the first one arrives) is then rare, as in a real run.
EPOCH_REPEATS = 8


def batches(cfg, device: torch.device):
    """Training batches as `ncfast train` makes them, on ``device``, epoch after epoch."""
    splits = image_folder(cfg.data)
    splits.train.samples = splits.train.samples * EPOCH_REPEATS
    splits.train.targets = splits.train.targets * EPOCH_REPEATS
    train, *_ = loaders(splits, cfg.data, cfg.seed, 0, 1, device.type == "cuda")
    gpu = (GpuPipeline(device, SIZE, IMAGENET_MEAN, IMAGENET_STD, cfg.seed)
           if cfg.data.decode == "cuda" else None)
    try:
        epoch = 0
        while True:
            epoch += 1
            source = epoch_batches(train, cfg.seed, epoch, gpu=gpu)
            for x, y in source:
                yield (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    finally:
        if gpu is not None:
            source.close()  # stops the prefetch thread before the workers
        close_workers(train)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_rate(cfg, device: torch.device, min_seconds: float) -> float:
    """Images/s delivered on the device, timed from the first batch (workers started) for at
    least ``min_seconds`` and two batches."""
    source = batches(cfg, device)
    with contextlib.closing(source):
        next(source)
        _sync(device)
        start, images, count = time.perf_counter(), 0, 0
        while count < 2 or time.perf_counter() - start < min_seconds:
            x, _ = next(source)
            images += len(x)
            count += 1
        _sync(device)
        return images / (time.perf_counter() - start)


def make_step(model, optimizer, device: torch.device):
    """One training step as `ncfast train` takes it (the ncfast loss, SGD)."""
    def step(x, y):
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device.type):
            loss = ncfast.rescaled_mse_loss(model(x), y, normalize="element")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def resident_rate(step, batch: int, device: torch.device, min_run_time: float) -> float:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=gen).to(device)
    y = torch.randint(0, K, (batch,), generator=gen).to(device)
    step(x, y)  # warm-up: cuDNN autotuning, allocator
    return batch / harness.median_time(lambda: step(x, y), device.type, min_run_time)


def fed_rate(step, cfg, device: torch.device, steps: int) -> float:
    """Samples/s of training steps fed by the pipeline (after 3 warm-up steps)."""
    source = batches(cfg, device)
    with contextlib.closing(source):
        for _ in range(3):
            step(*next(source))
        _sync(device)
        start, samples = time.perf_counter(), 0
        for _ in range(steps):
            x, y = next(source)
            step(x, y)
            samples += len(x)
        _sync(device)
        return samples / (time.perf_counter() - start)


def _measured(measure, *args):
    """``measure(*args)``, or the error that stopped it as the table's entry (a machine whose
    /dev/shm cannot hold the workers' batches fails that case, not the whole benchmark)."""
    try:
        return float(measure(*args))
    except Exception as err:  # noqa: BLE001 - reported in the table instead
        print(f"failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return f"failed: {type(err).__name__}: {' '.join(str(err).split())[:120]}"


def _shm() -> str:
    try:
        st = os.statvfs("/dev/shm")
        return f"{st.f_blocks * st.f_frsize / 2**30:.1f} GiB"
    except OSError:
        return "n/a"


def gate(root: Path, device: torch.device) -> None:
    """Before timing: the GPU path's decode + augmentation equals the CPU decode's with the same
    crops (within two uint8 levels on average: the decoders' IDCT and chroma upsampling; a
    wrong crop or flip differs by about the images' noise, 18 levels), and its batches are
    normalised images."""
    files = sorted((root / "train").rglob("*.JPEG"))[:16]
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    on_device = augment(decode(data, device), SIZE, IMAGENET_MEAN, IMAGENET_STD,
                        torch.Generator().manual_seed(1))
    on_cpu = augment(decode(data, torch.device("cpu")), SIZE, IMAGENET_MEAN, IMAGENET_STD,
                     torch.Generator().manual_seed(1))
    level = 1 / (255 * min(IMAGENET_STD))
    diff = float((on_device.cpu() - on_cpu).abs().mean())
    if not (on_device.shape == (16, 3, SIZE, SIZE) and diff < 2 * level
            and bool(on_cpu.isfinite().all()) and float(on_cpu.abs().mean()) < 3):
        raise harness.CorrectnessError(f"correctness gate failed: the device path's batch "
                                       f"differs from the CPU decode's by {diff:.3g} on average")


def main(argv=None) -> None:
    parser = harness.base_parser("python -m bench.data", __doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="make (or reuse) the JPEG tree here instead of a "
                                           "temporary folder")
    args = harness.parse_args(parser, argv)
    if args.shapes or args.dtypes:
        parser.error("bench.data: the cases are fixed (--quick for a smoke run)")
    device = torch.device(args.device)
    s = dict(SETTINGS[args.device])
    if args.quick:
        s.update(images=s["batch"] * 3, workers=s["workers"][-1:], gpu_workers=s["gpu_workers"][:1],
                 fed_steps=min(s["fed_steps"], 5))
    min_seconds = 3 * args.min_run_time
    precision = "bf16 autocast + channels_last" if args.device == "cuda" else "fp32"
    with contextlib.ExitStack() as stack:
        root = Path(args.data_dir) if args.data_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="ncfast-bench-data-")))
        started = time.perf_counter()
        tree = make_tree(root, s["images"], s["classes"])
        made = time.perf_counter() - started
        env = harness.environment(args.device, {
            "settings": f"synthetic ImageNet-like JPEGs ({tree['images']} train images, "
                        f"{tree['classes']} classes, mean {tree['mean height']} x "
                        f"{tree['mean width']}, {tree['mean file']} per file, made in "
                        f"{made:.0f} s, read from the page cache), RandomResizedCrop({SIZE}) + "
                        f"flip + normalise, batch {s['batch']}, ResNet-50 (ImageNet stem, "
                        f"K={K}) {precision}, SGD; each file {EPOCH_REPEATS} times an epoch; "
                        f"images/s from the first batch on, for at least {min_seconds:g} s; "
                        f"CPU cores visible: {os.cpu_count()}; /dev/shm {_shm()}"})
        others = harness.OtherCpuUse()
        gate(root, device)

        torch.manual_seed(SEED)
        model = make_model("resnet50", args.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9,
                                    weight_decay=5e-5)
        step = make_step(model, optimizer, device)
        with ncfast.cuda_target_checks(False):  # as ncfast train runs the loss
            model_rate = resident_rate(step, s["model_batch"], device, args.min_run_time)
        print(f"done: model step {model_rate:,.3g} samples/s", file=sys.stderr, flush=True)

        rows = []
        cases = [("cpu", w) for w in s["workers"]] + [("cuda", w) for w in s["gpu_workers"]]
        for decode_on, workers in cases:
            cfg = train_config(root, s["batch"], workers, decode_on)
            path = ("PIL in the workers" if decode_on == "cpu" else
                    "data.decode=cuda: workers read, nvJPEG + device augmentation")
            rate = _measured(pipeline_rate, cfg, device, min_seconds)
            rows.append({"path": path, "workers": workers, **(
                {"images/s": f"{rate:,.0f}", "per worker": f"{rate / max(workers, 1):,.0f}",
                 "vs model step rate": harness.fmt_ratio(rate / model_rate)}
                if isinstance(rate, float) else {"images/s": rate})})
            print(f"done: {decode_on} decode, {workers} workers: {rows[-1]['images/s']} "
                  f"images/s", file=sys.stderr, flush=True)

        fed_rows = []
        if s["fed_steps"]:
            for decode_on, workers in (("cpu", s["workers"][-1]), ("cuda", s["gpu_workers"][-1])):
                cfg = train_config(root, s["batch"], workers, decode_on)
                with ncfast.cuda_target_checks(False):
                    rate = _measured(fed_rate, step, cfg, device, s["fed_steps"])
                ok = isinstance(rate, float)
                fed_rows.append({"input": f"data.decode={decode_on}, {workers} workers",
                                 "training samples/s": f"{rate:,.0f}" if ok else rate,
                                 "inputs on the device": f"{model_rate:,.0f}",
                                 "share of the device-resident rate":
                                     f"{rate / model_rate:.1%}" if ok else ""})
                print(f"done: fed by {decode_on}: {fed_rows[-1]['training samples/s']} "
                      f"samples/s", file=sys.stderr, flush=True)
        harness.close_environment(env, others)

    sections = [
        harness.markdown_table([tree], list(tree), caption="The synthetic JPEG tree (ImageNet's "
                               "training set: mostly 500 px on the long side, mean about 390 x "
                               "470, about 110 KB a file)."),
        harness.markdown_table([{"model": "ResNet-50", "batch": s["model_batch"],
                                 "samples/s": f"{model_rate:,.3g}"}],
                               ["model", "batch", "samples/s"],
                               caption="The model's step rate with its inputs already on the "
                                       "device (the rate the input pipeline must sustain)."),
        harness.markdown_table(rows, ["path", "workers", "images/s", "per worker",
                                      "vs model step rate"],
                               caption="Training batches delivered on the device, decoded and "
                                       "augmented, by the loader `ncfast train` builds. **vs "
                                       "model step rate**: above 1 the pipeline alone outruns "
                                       "the model" + (" (on the CPU both share the same cores)"
                                                      if args.device == "cpu" else "") + "."),
    ]
    if fed_rows:
        sections.append(harness.markdown_table(
            fed_rows, list(fed_rows[0]),
            caption=f"Training fed by the pipeline: {s['fed_steps']} steps after 3 warm-up "
                    f"steps, against the same step with its inputs on the device (target: "
                    f">= 90%)."))
    harness.emit(harness.render_results("ncfast input-pipeline benchmark", env, sections),
                 args.out)


if __name__ == "__main__":
    main()
