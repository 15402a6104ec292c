"""data.decode='cuda': the ImageFolder training pipeline on the GPU. Loader workers only read the
JPEG files; each batch is decoded by one batched nvJPEG call (torchvision.io.decode_jpeg) and
random-resized-cropped, flipped and normalised on the device, a batch ahead of the training step
on a side stream. The augmentation runs on any device (its tests run on the CPU) and draws its
randomness from a CPU generator seeded by (seed, epoch, step): runs repeat, and resume
mid-epoch, exactly."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import warnings
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import derived_seed

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (not installed here);
# the GPU machine's torchvision 0.26 has them without the warning.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of "
                        "TorchVision", category=DeprecationWarning)

# torchvision's RandomResizedCrop defaults (Szegedy et al.'s Inception crop)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def crop_boxes(sizes: Sequence[tuple[int, int]], generator: torch.Generator,
               scale=SCALE, ratio=RATIO) -> torch.Tensor:
    """(B, 4) int64 boxes (top, left, height, width), one per (height, width) in ``sizes``, drawn
    as torchvision's RandomResizedCrop.get_params draws them (ten tries at an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, else the central crop of the clamped
    ratio), for the whole batch at once; the randomness comes from ``generator`` alone."""
    hw = torch.tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    H, W = hw[:, :1], hw[:, 1:]
    B = len(hw)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand(B, 10, generator=generator,
                                                                  dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(B, 10, generator=generator,
                                                               dtype=torch.float64))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.int8).argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    H, W = H[:, 0], W[:, 0]
    # No try fits: the central crop, its ratio clamped to the range (torchvision's fallback).
    in_ratio = W / H
    fw = torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W)
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    fits = ok.any(1)
    w, h = torch.where(fits, w, fw), torch.where(fits, h, fh)
    u = torch.rand(B, 2, generator=generator, dtype=torch.float64)
    top = torch.where(fits, torch.floor(u[:, 0] * (H - h + 1)), torch.floor((H - h) / 2))
    left = torch.where(fits, torch.floor(u[:, 1] * (W - w + 1)), torch.floor((W - w) / 2))
    return torch.stack([top, left, h, w], 1).to(torch.int64)


def augment(images: Sequence[torch.Tensor], size: int, mean: Sequence[float],
            std: Sequence[float], generator: torch.Generator, scale=SCALE,
            ratio=RATIO) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip + ToTensor + Normalize(mean,
    std) of a list of uint8 (3, H, W) images of any sizes, on their device: a (B, 3, size,
    size) float32 batch. Bilinear resizing with antialiasing, as PIL resizes on the CPU path
    (without its rounding to uint8 in between)."""
    device = images[0].device
    boxes = crop_boxes([tuple(img.shape[1:]) for img in images], generator, scale,
                       ratio).tolist()
    flips = (torch.rand(len(images), generator=generator) < 0.5).tolist()
    out = torch.empty(len(images), 3, size, size, device=device)
    # Host values only (boxes, flips, mean, std): nothing here waits for the device.
    for i, (img, (top, left, h, w), flip) in enumerate(zip(images, boxes, flips)):
        crop = img[None, :, top:top + h, left:left + w].float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=True)[0]
        out[i] = resized.flip(-1) if flip else resized
    for c in range(3):  # ToTensor's 1/255 and Normalize in one multiply-add per channel
        out[:, c].mul_(1.0 / (255.0 * std[c])).sub_(mean[c] / std[c])
    return out


def decode(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 RGB (3, H, W) images on ``device``: one batched nvJPEG call on CUDA
    (libjpeg on the CPU). Grayscale and CMYK files come out as RGB. The files an ImageFolder
    accepts besides JPEGs (PNG, ...; ImageNet's training set holds a PNG under a .JPEG name),
    and JPEGs the batched call refuses, are decoded on the CPU (torchvision.io.decode_image)
    and moved to the device, as the PIL path reads them, instead of stopping the run."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    def on_cpu(data: torch.Tensor) -> torch.Tensor:
        return decode_image(data, mode=ImageReadMode.RGB).to(device)

    def one(data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return on_cpu(data)  # raises the CPU decoder's error for a damaged file

    # The JPEG start-of-image marker, read from the host bytes (no device work).
    jpeg = [i for i, data in enumerate(files) if data[:2].tolist() == [0xFF, 0xD8]]
    images = [None] * len(files)
    if jpeg:
        try:
            decoded = decode_jpeg([files[i] for i in jpeg], mode=ImageReadMode.RGB,
                                  device=device)
        except RuntimeError:  # one refused file fails the whole batch: decode one by one
            decoded = [one(files[i]) for i in jpeg]
        for i, image in zip(jpeg, decoded):
            images[i] = image
    return [image if image is not None else on_cpu(data)
            for image, data in zip(images, files)]


def _check_decoder(device: torch.device) -> None:
    """ConfigError now, before a run starts, when JPEGs cannot be decoded on ``device`` (a
    torchvision without nvJPEG): :func:`decode`'s CPU fallback for single refused files would
    otherwise decode every batch on the CPU, in one thread, without a word."""
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    probe = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
    try:
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"config key 'data.decode' = 'cuda' needs torchvision to decode JPEGs "
                          f"on {device} (nvJPEG), which failed ({detail}); use "
                          f"data.decode='cpu'") from None


class GpuPipeline:
    """The training batches of a JpegFiles loader, decoded and augmented on ``device``; under
    DDP one per process (``rank`` of ``world``), each drawing its own crops and flips."""

    def __init__(self, device: torch.device, size: int, mean, std, seed: int, rank: int = 0,
                 world: int = 1):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the prefetch thread sets it
            device = torch.device("cuda", torch.cuda.current_device())
        _check_decoder(device)
        self.device, self.size, self.mean, self.std, self.seed = device, size, mean, std, seed
        self.rank, self.world = rank, world

    def batch(self, files, labels, epoch: int, step: int):
        # One stream per (step, rank): the processes' batches of a step get independent draws.
        position = step * self.world + self.rank
        gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch, position))
        x = augment(decode(files, self.device), self.size, self.mean, self.std, gen)
        return x, labels.to(self.device, non_blocking=True)

    def batches(self, loader_iter: Iterator, epoch: int, first_step: int,
                prefetch: bool | None = None) -> Iterator:
        """(x, y) on the device for steps first_step, first_step + 1, ... of ``epoch``. With
        ``prefetch`` (default: on CUDA) a thread prepares them a batch ahead, on CUDA on a side
        stream, so decoding overlaps the training step; the batches are the same either way."""
        if prefetch is None:
            prefetch = self.device.type == "cuda"
        if not prefetch:
            for step, (files, labels) in enumerate(loader_iter, first_step):
                yield self.batch(files, labels, epoch, step)
            return
        yield from _prefetched(self, loader_iter, epoch, first_step)


_DONE = object()


def _prefetched(pipe: GpuPipeline, loader_iter: Iterator, epoch: int, first_step: int):
    cuda = pipe.device.type == "cuda"
    side = torch.cuda.Stream(pipe.device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def offer(item) -> bool:
        """Hand ``item`` over unless the consumer has stopped."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            if cuda:
                torch.cuda.set_device(pipe.device)
            for step, (files, labels) in enumerate(loader_iter, first_step):
                if stop.is_set():
                    return
                event = None
                with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                    x, y = pipe.batch(files, labels, epoch, step)
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                if not offer((x, y, event)):
                    return
            offer(_DONE)
        except BaseException as err:  # raised again in the consumer's thread
            offer(err)

    thread = threading.Thread(target=produce, name="ncfast-gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            x, y, event = item
            if cuda:
                current = torch.cuda.current_stream(pipe.device)
                current.wait_event(event)
                x.record_stream(current)  # made on the side stream, freed after the main one
                y.record_stream(current)
            yield x, y
    finally:
        stop.set()
        thread.join()
