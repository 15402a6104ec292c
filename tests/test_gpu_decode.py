"""data.decode='cuda': the batched crop boxes follow torchvision's RandomResizedCrop, the on-device
augmentation gives the CPU (PIL) path's output statistics (run here on CPU tensors), and on a GPU
nvJPEG + the device augmentation give the CPU decode's batches."""

import io
import math

import numpy as np
import pytest
import torch

from ncfast.train import gpu_decode
from ncfast.train.data import (IMAGENET_MEAN, IMAGENET_STD, JpegFiles, collate_files,
                               derived_seed)

SIZE = 48


def jpeg_files(tmp_path, count=12, seed=0):
    """JPEGs of varied sizes and aspect ratios (two beyond RandomResizedCrop's ratio range):
    smooth colour fields with a left-to-right ramp (so a missing flip shows) plus noise."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    sizes = [(60, 80), (80, 60), (72, 72), (50, 130), (130, 50), (90, 120)]
    paths = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        coarse = torch.rand(3, 4, 5, generator=gen)
        field = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear")[0]
        ramp = torch.linspace(0, 0.5, w).expand(h, w)
        pixels = (field * 0.5 + ramp + 0.1 * torch.rand(3, h, w, generator=gen)).clamp(0, 1)
        path = tmp_path / f"{i}.jpg"
        Image.fromarray((pixels * 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(
            path, quality=92)
        paths.append(path)
    return paths


def file_bytes(paths):
    return [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]


def crop_statistics(batch):
    """Per crop: the channel means, the mean within-channel spread and the left-minus-right
    mean (flips make it average to zero)."""
    half = batch.shape[-1] // 2
    return torch.cat([batch.mean((2, 3)), batch.std((2, 3)).mean(1, keepdim=True),
                      (batch[..., :half].mean((1, 2, 3)) - batch[..., half:].mean((1, 2, 3)))
                      [:, None]], 1).double()


def assert_same_distribution(a, b, names, z=4.5):
    """Column means of two samples agree within z standard errors of their difference."""
    for j, name in enumerate(names):
        diff = a[:, j].mean() - b[:, j].mean()
        se = math.sqrt(a[:, j].var() / len(a) + b[:, j].var() / len(b))
        assert abs(diff) <= z * se, f"{name}: means differ by {float(diff):.4g} ({z} SE = " \
                                    f"{z * se:.4g})"


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (60, 400), (400, 60)],
                         ids=["landscape", "portrait", "wide-fallback", "tall-fallback"])
def test_crop_boxes_follow_torchvision_random_resized_crop(height, width):
    from torchvision import transforms as T

    n = 3000
    boxes = gpu_decode.crop_boxes([(height, width)] * n, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= height)
                 & (left + w <= width)).all())
    torch.manual_seed(2)
    image = torch.empty(3, height, width)
    defaults = T.RandomResizedCrop(224)  # torchvision's scale and ratio
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, defaults.scale, defaults.ratio)
                        for _ in range(n)])

    def described(b):
        t, lft, hh, ww = b.double().T
        return torch.stack([hh * ww / (height * width), torch.log(ww / hh),
                            (t + hh / 2) / height, (lft + ww / 2) / width], 1)

    assert_same_distribution(described(boxes), described(ref),
                             ["area fraction", "log aspect", "centre row", "centre column"])


def test_crop_boxes_come_from_the_generator_alone():
    sizes = [(375, 500), (64, 64), (500, 40)]
    a = gpu_decode.crop_boxes(sizes, torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    b = gpu_decode.crop_boxes(sizes, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, gpu_decode.crop_boxes(sizes, torch.Generator().manual_seed(6)))


def test_device_augmentation_matches_the_pil_path_statistics(tmp_path):
    """The on-device path (torchvision.io decode + gpu_decode.augment, here on CPU tensors)
    against torchvision's PIL transforms, over 20 augmented passes of 12 images."""
    from PIL import Image
    from torchvision import transforms as T

    paths = jpeg_files(tmp_path)
    pil = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = [Image.open(p).convert("RGB") for p in paths]
    torch.manual_seed(3)
    cpu = torch.stack([pil(img) for _ in range(20) for img in images])
    decoded = gpu_decode.decode(file_bytes(paths), torch.device("cpu"))
    device = torch.cat([gpu_decode.augment(decoded, SIZE, IMAGENET_MEAN, IMAGENET_STD,
                                           torch.Generator().manual_seed(100 + k))
                        for k in range(20)])
    assert device.shape == cpu.shape == (240, 3, SIZE, SIZE) and device.dtype == torch.float32
    names = ["mean R", "mean G", "mean B", "within-crop spread", "left minus right"]
    assert_same_distribution(crop_statistics(device), crop_statistics(cpu), names)
    # the ramp makes unflipped crops darker on the left: about half of them are flipped
    lr = crop_statistics(device)[:, 4]
    assert 0.3 < float((lr > 0).double().mean()) < 0.7


def test_device_augmentation_of_an_uncropped_image_is_a_resize(tmp_path):
    """A square image whose every crop try fails is cropped whole (the fallback): the output
    is the antialiased bilinear resize PIL makes, flipped or not, within JPEG-free rounding."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    pixels = (torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0)) * 255).to(
        torch.uint8)
    # scale (1, 1) and ratio (1, 1) leave only the whole image
    boxes = gpu_decode.crop_boxes([(96, 96)], torch.Generator(), scale=(1.0, 1.0),
                                  ratio=(1.0, 1.0))
    assert boxes.tolist() == [[0, 0, 96, 96]]
    gen = torch.Generator().manual_seed(0)
    out = gpu_decode.augment([pixels], 40, (0.0, 0.0, 0.0), (1 / 255,) * 3, gen,
                             scale=(1.0, 1.0), ratio=(1.0, 1.0))[0]
    expected = TF.pil_to_tensor(Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize(
        (40, 40), Image.BILINEAR)).float()
    flipped = torch.Generator().manual_seed(0)
    gpu_decode.crop_boxes([(96, 96)], flipped, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    if bool(torch.rand(1, generator=flipped) < 0.5):
        expected = expected.flip(-1)
    assert (out - expected).abs().max() <= 1.0  # PIL rounds to uint8; the device path does not


def mixed_files(tmp_path):
    """Files an ImageFolder accepts, as (bytes, PIL's RGB pixels): a JPEG, a PNG with an alpha
    channel under a .JPEG name (as ImageNet's training set holds one), a CMYK JPEG (ImageNet
    holds 22) and a grayscale PNG."""
    from PIL import Image

    pixels = (torch.rand(30, 44, 4, generator=torch.Generator().manual_seed(0)) * 255).to(
        torch.uint8).numpy()
    rgba = Image.fromarray(pixels, "RGBA")
    cases = [(rgba.convert("RGB"), "JPEG"), (rgba, "PNG"), (rgba.convert("CMYK"), "JPEG"),
             (rgba.convert("L"), "PNG")]
    out = []
    for i, (image, kind) in enumerate(cases):
        path = tmp_path / f"{i}.JPEG"
        image.save(path, format=kind, quality=95)
        expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        out.append((file_bytes([path])[0], expected))
    return out


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_decode_reads_every_file_an_image_folder_holds(tmp_path, device):
    """Not only JPEGs: a PNG or a CMYK JPEG in the training tree is decoded (on the CPU where
    the batched decoder refuses it), as the PIL path reads it, instead of ending the run."""
    files, expected = zip(*mixed_files(tmp_path))
    images = gpu_decode.decode(list(files), torch.device(device))
    assert len(images) == 4
    for i, (image, want) in enumerate(zip(images, expected)):
        assert image.device.type == device and image.dtype == torch.uint8, i
        assert image.shape == want.shape == (3, 30, 44), i
        # PNGs exactly; JPEGs within the decoders' IDCT and colour-conversion differences
        tolerance = 0 if i in (1, 3) else 8
        assert float((image.cpu().float() - want.float()).abs().mean()) <= tolerance, i
    with pytest.raises(RuntimeError):
        gpu_decode.decode([files[0], torch.tensor([0xFF, 0xD8, 0, 1], dtype=torch.uint8)],
                          torch.device(device))


def test_jpeg_files_and_derived_seeds(tmp_path):
    from torchvision.datasets import ImageFolder

    (tmp_path / "a").mkdir()
    jpeg_files(tmp_path / "a", count=2)
    files = JpegFiles(ImageFolder(str(tmp_path)))
    data, label = files[1]
    assert data.dtype == torch.uint8 and label == 0
    assert bytes(data.numpy()) == (tmp_path / "a" / "1.jpg").read_bytes()
    batch, labels = collate_files([files[0], files[1]])
    assert len(batch) == 2 and labels.tolist() == [0, 0]
    seeds = {derived_seed(6, e, s) for e in range(3) for s in range(100)}
    assert len(seeds) == 300 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_and_augmentation_match_the_cpu_decode(tmp_path):
    """nvJPEG + the augmentation on the GPU against libjpeg + the same augmentation on the CPU,
    with the same crops: equal up to the decoders' IDCT and chroma upsampling differences (a
    wrong crop or flip differs by the images' noise, about 25 levels); the prefetching pipeline
    (side stream, thread) gives the synchronous batches."""
    paths = jpeg_files(tmp_path, count=24)
    files = file_bytes(paths)
    cuda = torch.device("cuda")
    on_gpu = gpu_decode.augment(gpu_decode.decode(files, cuda), SIZE, IMAGENET_MEAN,
                                IMAGENET_STD, torch.Generator().manual_seed(4))
    on_cpu = gpu_decode.augment(gpu_decode.decode(files, torch.device("cpu")), SIZE,
                                IMAGENET_MEAN, IMAGENET_STD, torch.Generator().manual_seed(4))
    assert on_gpu.device.type == "cuda"
    diff = (on_gpu.cpu() - on_cpu).abs()
    step = 1 / (255 * min(IMAGENET_STD))  # one uint8 level, normalised
    assert float(diff.mean()) < 1.0 * step and float(diff.max()) < 24 * step
    pipe = gpu_decode.GpuPipeline(cuda, SIZE, IMAGENET_MEAN, IMAGENET_STD, seed=6)
    assert pipe.device.index is not None
    labels = torch.arange(24)
    loader = [(files[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    fetched = [(x.clone(), y.clone()) for x, y in pipe.batches(iter(loader), epoch=2,
                                                                 first_step=0)]
    direct = [pipe.batch(f, y, 2, step) for step, (f, y) in enumerate(loader)]
    assert len(fetched) == 3
    for (xa, ya), (xb, yb) in zip(fetched, direct):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_each_process_draws_its_own_crops_and_flips(tmp_path):
    """Under DDP every process augments its part of the step's global batch: with the same
    draws on every rank, sample i of each process's batch would share one crop and one flip."""
    files = file_bytes(jpeg_files(tmp_path, count=4))
    labels = torch.arange(4)
    ranks = [gpu_decode.GpuPipeline("cpu", 32, IMAGENET_MEAN, IMAGENET_STD, seed=6, rank=r,
                                    world=2) for r in range(2)]
    a, b = (pipe.batch(files, labels, epoch=1, step=3)[0] for pipe in ranks)
    assert not torch.equal(a, b)
    assert torch.equal(a, ranks[0].batch(files, labels, epoch=1, step=3)[0]), "repeatable"


def test_prefetching_thread_gives_the_same_batches_and_stops_cleanly(tmp_path):
    """The prefetch thread (the CUDA path's, here without streams): the same batches as the
    synchronous path, no thread left behind when the consumer stops early, and an error in a
    batch raised in the consumer."""
    import threading

    files = file_bytes(jpeg_files(tmp_path, count=12))
    labels = torch.arange(12)
    loader = [(files[i:i + 4], labels[i:i + 4]) for i in range(0, 12, 4)]
    pipe = gpu_decode.GpuPipeline("cpu", 32, IMAGENET_MEAN, IMAGENET_STD, seed=6)
    fetched = list(pipe.batches(iter(loader), epoch=3, first_step=1, prefetch=True))
    direct = list(pipe.batches(iter(loader), epoch=3, first_step=1, prefetch=False))
    assert len(fetched) == len(direct) == 3
    for (xa, ya), (xb, yb) in zip(fetched, direct):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(fetched[0][0], next(pipe.batches(iter(loader), 3, 0))[0]), \
        "the crops depend on the step"

    def decode_threads():
        return [t for t in threading.enumerate() if t.name == "ncfast-gpu-decode"]

    early = pipe.batches(iter(loader), epoch=3, first_step=0, prefetch=True)
    next(early)
    early.close()
    assert not decode_threads()
    broken = [loader[0], ([torch.tensor([0xFF, 0xD8, 0, 1], dtype=torch.uint8)], labels[:1])]
    with pytest.raises(RuntimeError):
        list(pipe.batches(iter(broken), epoch=0, first_step=0, prefetch=True))
    assert not decode_threads()
