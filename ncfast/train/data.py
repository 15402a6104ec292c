"""Data sets and loaders of `ncfast train`: the embedded digits default, a synthetic Gaussian
mixture, torchvision's MNIST / FashionMNIST / CIFAR from a folder (downloaded only when asked),
and ImageFolder trees. Training loaders shuffle by (seed, epoch) alone, so a resumed run sees
the same batches; every split is sharded across processes under torch.distributed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from .config import ConfigError, DataConfig, show_value

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


@dataclass
class Splits:
    """The three views a run needs: augmented train (for SGD), un-augmented train and test
    (for the NC measurements, as the paper measures on the un-augmented training set)."""
    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


class InMemory(TensorDataset):
    """Tensors held in memory. The DataLoader fetches a batch through ``__getitems__``: one
    indexing op per tensor instead of B single-sample reads that collate then stacks."""

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _already_batched(batch):
    return batch


def _tensor_splits(x_train, y_train, x_test, y_test, num_classes) -> Splits:
    train = InMemory(x_train, y_train)
    return Splits(train, train, InMemory(x_test, y_test), num_classes,
                  tuple(x_train.shape[1:]))


def digits(cfg: DataConfig, seed: int) -> Splits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download),
    pixels scaled to [0, 1], a stratified train/test split by a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("data.name='digits' needs scikit-learn (pip install scikit-learn)") \
            from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for k in range(10):
        idx = (y == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held_out = round(len(idx) * cfg.test_fraction)
        if not 0 < held_out < len(idx):
            raise ConfigError(f"config key 'data.test_fraction' must leave every class a "
                              f"training and a test image, got {cfg.test_fraction!r} (class {k} "
                              f"would keep {held_out} of its {len(idx)} images for the test set)")
        test_idx.append(idx[:held_out])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    return _tensor_splits(x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], 10)


def gaussian(cfg: DataConfig, seed: int) -> Splits:
    """K Gaussian classes in R^dim: means N(0, separation^2 / dim per coordinate), unit noise."""
    K = cfg.num_classes or 10
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(K, cfg.gaussian_dim, generator=gen) * (
        cfg.gaussian_separation / math.sqrt(cfg.gaussian_dim))

    def draw(per_class):
        y = torch.arange(K).repeat_interleave(per_class)
        y = y[torch.randperm(len(y), generator=gen)]
        return means[y] + torch.randn(len(y), cfg.gaussian_dim, generator=gen) / math.sqrt(
            cfg.gaussian_dim), y

    x_train, y_train = draw(cfg.gaussian_train_per_class)
    x_test, y_test = draw(cfg.gaussian_test_per_class)
    return _tensor_splits(x_train, y_train, x_test, y_test, K)


def _transforms(cfg: DataConfig, mean, std, crop: int, default_augment: str):
    from torchvision import transforms as T

    augment = default_augment if cfg.augment == "auto" else cfg.augment
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if augment == "none":
        train = T.Compose(normalize)
    elif augment == "crop_flip":
        train = T.Compose([T.RandomCrop(crop, padding=4), T.RandomHorizontalFlip(), *normalize])
    else:  # imagenet
        train = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), *normalize])
    if augment == "imagenet":
        test = T.Compose([T.Resize(round(crop * 256 / 224)), T.CenterCrop(crop), *normalize])
    elif cfg.name == "imagefolder":
        test = T.Compose([T.Resize(crop), T.CenterCrop(crop), *normalize])
    else:
        test = T.Compose(normalize)
    return train, test


def torchvision_dataset(cfg: DataConfig) -> Splits:
    try:
        from torchvision import datasets
    except ImportError:
        raise ConfigError(f"data.name={cfg.name!r} needs torchvision") from None
    table = {
        "mnist": (datasets.MNIST, MNIST_MEAN, MNIST_STD, 28, 10, "none"),
        "fashion_mnist": (datasets.FashionMNIST, FASHION_MEAN, FASHION_STD, 28, 10, "none"),
        "cifar10": (datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD, 32, 10, "crop_flip"),
        "cifar100": (datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD, 32, 100, "crop_flip"),
    }
    cls, mean, std, size, K, default_augment = table[cfg.name]
    root = Path(cfg.dir)
    train_t, test_t = _transforms(cfg, mean, std, size, default_augment)
    try:
        make = lambda train, t: cls(str(root), train=train, transform=t,  # noqa: E731
                                    download=cfg.download)
        train, train_eval, test = make(True, train_t), make(True, test_t), make(False, test_t)
    except (RuntimeError, OSError) as err:  # not found or corrupted; offline (URLError)
        if cfg.download:
            reason = getattr(err, "reason", None) or str(err).strip().splitlines()[0]
            raise ConfigError(f"data.name={cfg.name!r}: the download failed ({reason}); on a "
                              f"machine without network access place the files yourself: "
                              f"{_expected_files(cls, root)}") from None
        raise ConfigError(f"data.name={cfg.name!r}: no usable data set under data.dir="
                          f"{str(root)!r} ({err}); pass data.download=true to download it, or "
                          f"place the files: {_expected_files(cls, root)}") from None
    channels = 1 if cfg.name in ("mnist", "fashion_mnist") else 3
    return Splits(train, train_eval, test, K, (channels, size, size))


class JpegFiles(Dataset):
    """An ImageFolder's training samples as raw file bytes (uint8 tensors) and labels: all a
    loader worker does with data.decode='cuda' (gpu_decode decodes and augments)."""

    def __init__(self, folder):
        self.samples, self.targets, self.classes = folder.samples, folder.targets, folder.classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), label


def collate_files(batch):
    """A batch of files stays a list (the images differ in size until they are decoded)."""
    return [data for data, _ in batch], torch.tensor([label for _, label in batch])


def _expected_files(cls, root: Path) -> str:
    """Where torchvision looks for a data set's files under ``root``, as advice to a user."""
    if hasattr(cls, "base_folder"):  # CIFAR-10 / CIFAR-100: one archive, extracted
        return (f"either the extracted folder {str(root / cls.base_folder)}/ (as in the archive) "
                f"or the archive {str(root / cls.filename)} (from {cls.url}) with "
                f"data.download=true, which then only checks and extracts it")
    raw = root / cls.__name__ / "raw"  # MNIST / FashionMNIST
    names = ", ".join(name for name, _ in cls.resources)
    return (f"the files {names} (from {cls.mirrors[0]}) in {raw}/ with data.download=true, "
            f"which then only checks and extracts them")


def image_folder(cfg: DataConfig) -> Splits:
    """An ImageFolder tree: data.dir/train/<class>/*.jpg and data.dir/val (or test)/<class>/."""
    try:
        from torchvision import datasets
    except ImportError:
        raise ConfigError("data.name='imagefolder' needs torchvision") from None
    root = Path(cfg.dir)
    train_dir = root / "train"
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else "no such folder"
        raise ConfigError(f"data.name='imagefolder' needs data.dir={str(root)!r} to hold train/ "
                          f"and val/ (or test/) class folders; found {found}")
    size = cfg.image_size or 224
    train_t, test_t = _transforms(cfg, IMAGENET_MEAN, IMAGENET_STD, size,
                                  "imagenet" if size >= 128 else "crop_flip")
    train = datasets.ImageFolder(str(train_dir), train_t)
    if cfg.decode == "cuda":  # the workers read the files; the GPU decodes and augments
        if (cfg.augment if cfg.augment != "auto" else
                "imagenet" if size >= 128 else "crop_flip") != "imagenet":
            raise ConfigError(f"config key 'data.decode' = 'cuda' implements data.augment="
                              f"'imagenet' (random-resized crop and flip), got data.augment="
                              f"{cfg.augment!r} at data.image_size={size}")
        train = JpegFiles(train)
    train_eval = datasets.ImageFolder(str(train_dir), test_t)
    test = datasets.ImageFolder(str(test_dir), test_t)
    if test.classes != train.classes:
        raise ConfigError(f"data.dir={str(root)!r}: {test_dir.name}/ has {len(test.classes)} "
                          f"class folders, train/ has {len(train.classes)}; they must be the "
                          f"same classes")
    return Splits(train, train_eval, test, len(train.classes), (3, size, size))


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    try:
        if cfg.name == "digits":
            splits = digits(cfg, seed)
        elif cfg.name == "gaussian":
            splits = gaussian(cfg, seed)
        elif cfg.name == "imagefolder":
            splits = image_folder(cfg)
        else:
            splits = torchvision_dataset(cfg)
    except OSError as err:  # a path the OS refuses (too long, unreadable, a file for a folder)
        raise ConfigError(f"config key 'data.dir' must be a readable folder, got "
                          f"{show_value(cfg.dir)} ({err.strerror or err})") from None
    if splits.num_classes < 2:
        raise ConfigError(f"data.name={cfg.name!r} has {splits.num_classes} class(es); a "
                          f"classifier needs at least 2")
    if cfg.num_classes and cfg.num_classes != splits.num_classes:
        raise ConfigError(f"data.num_classes={cfg.num_classes} disagrees with the data: "
                          f"data.name={cfg.name!r} has {splits.num_classes} classes")
    return splits


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every label of ``dataset``, without loading its inputs (in-memory tensors, or the
    ``targets`` list that torchvision's data sets and ImageFolder keep)."""
    if isinstance(dataset, InMemory):
        return dataset.tensors[1]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ConfigError(f"track.subset_per_class needs the labels of the training set; "
                          f"{type(dataset).__name__} does not list them (no .targets)")
    return torch.as_tensor(targets, dtype=torch.int64)


def class_subset(dataset: Dataset, per_class: int, seed: int) -> Dataset:
    """A fixed subset of ``dataset``: ``per_class`` samples of every class (all of a smaller
    class), drawn from ``seed`` alone and kept in the data set's order; ``per_class=0`` is the
    data set itself."""
    if per_class == 0:
        return dataset
    labels = labels_of(dataset)
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for k in torch.unique(labels).tolist():
        idx = (labels == k).nonzero().flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    index = torch.cat(chosen).sort().values
    if isinstance(dataset, InMemory):
        return InMemory(*(t[index] for t in dataset.tensors))
    return Subset(dataset, index.tolist())


class TrainOrder(Sampler):
    """The training order of one process: a permutation of the n samples from (seed, epoch)
    alone, cut to world * (n // world); rank r takes its positions r, r + world, ... (torch's
    DistributedSampler with drop_last, so consecutive batches of b per rank together hold one
    process's batch of world * b: 1 and several processes take the same steps). ``start``
    skips the samples a resumed epoch has trained on already. ``keyed``: yields (index, epoch)
    for SeededAugment."""

    def __init__(self, n: int, rank: int, world: int, seed: int, keyed: bool = False):
        self.n, self.rank, self.world, self.seed, self.keyed = n, rank, world, seed, keyed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen)[: len(self) * self.world]
        mine = order[self.rank::self.world][self.start:].tolist()
        return iter([(i, self.epoch) for i in mine] if self.keyed else mine)


def derived_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample (SeededAugment) or one batch (the GPU path) in one
    epoch: a function of these alone."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + position) & (2**63 - 1)


class SeededAugment(Dataset):
    """A randomly augmented data set whose draws for sample i in epoch e come from (seed, e, i)
    alone (torchvision's transforms draw from torch's generator, seeded here per sample, the
    caller's generator left as it was): the same crops whatever the workers, the processes or
    the point a run was resumed from. Indexed by (index, epoch) keys (TrainOrder(keyed=True))."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]


class Shard(Sampler[int]):
    """Positions rank, rank + world, ...: every sample exactly once across processes (the NC
    statistics are merged exactly, so no padding)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))


def _loader(dataset, batch_size, sampler, cfg: DataConfig, cuda: bool, drop_last: bool):
    workers = cfg.workers
    collate = (_already_batched if isinstance(dataset, InMemory) else
               collate_files if isinstance(dataset, JpegFiles) else None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=cfg.pin_memory and cuda, drop_last=drop_last,
                      persistent_workers=cfg.persistent_workers and workers > 0,
                      collate_fn=collate)


def loaders(splits: Splits, cfg: DataConfig, seed: int, rank: int, world: int, cuda: bool):
    """(train, train_eval, test) loaders for this process. The global batch is split evenly."""
    if cfg.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.batch_size} must be divisible by the number of "
                          f"processes ({world})")
    per_rank = cfg.batch_size // world
    eval_batch = max(1, cfg.eval_batch_size // world)
    train_set = splits.train
    augmented = not isinstance(train_set, (InMemory, JpegFiles))  # JpegFiles: per batch
    if augmented:
        train_set = SeededAugment(train_set, seed)
    sampler = TrainOrder(len(train_set), rank, world, seed, keyed=augmented)
    train = _loader(train_set, per_rank, sampler, cfg, cuda, drop_last=False)
    train_eval = _loader(splits.train_eval, eval_batch, Shard(len(splits.train_eval), rank, world),
                         cfg, cuda, drop_last=False)
    test = _loader(splits.test, eval_batch, Shard(len(splits.test), rank, world), cfg, cuda,
                   drop_last=False)
    return train, train_eval, test


def epoch_batches(train: DataLoader, seed: int, epoch: int, first_step: int = 0, gpu=None):
    """The batches of ``epoch`` from the training loader of :func:`loaders`, from step
    ``first_step`` on (a resumed epoch): the order from (seed, epoch), the workers' seeds from
    (seed, epoch) too, not from the global generator (which a resumed run restores to its
    state at the checkpoint, after the loader was made); through ``gpu`` (a
    gpu_decode.GpuPipeline) with data.decode='cuda'."""
    train.sampler.set_epoch(epoch, start=first_step * train.batch_size)
    train.generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    batches = iter(train)
    return batches if gpu is None else gpu.batches(batches, epoch, first_step)


OOD_MAX_SAMPLES = 10_000
OOD_SEED_OFFSET = 0x0D0D  # the OOD draws never share a generator state with the data's


def ood_loader(name: str, splits: Splits, cfg: DataConfig, seed: int, rank: int, world: int,
               cuda: bool) -> DataLoader | None:
    """The out-of-distribution inputs of ``track.ood`` (NC5), this process's shard, or None
    for "none": as many as the test set (at most OOD_MAX_SAMPLES), in the training inputs'
    shape, drawn from ``seed`` + OOD_SEED_OFFSET so the same run always measures the same
    ones. "noise": standard normal inputs; "gaussian": the test split of :func:`gaussian`
    with the data's K in its input dimension (flat inputs only)."""
    if name == "none":
        return None
    n = min(len(splits.test), OOD_MAX_SAMPLES)
    ood_seed = seed + OOD_SEED_OFFSET
    if name == "noise":
        x = torch.randn(n, *splits.input_shape,
                        generator=torch.Generator().manual_seed(ood_seed))
    elif len(splits.input_shape) != 1:
        raise ConfigError(f"config key 'track.ood' must be none or noise for inputs of shape "
                          f"{list(splits.input_shape)} (gaussian draws flat inputs), got "
                          f"{show_value(name)}")
    else:
        K = splits.num_classes
        mixture = DataConfig(name="gaussian", num_classes=K, gaussian_dim=splits.input_shape[0],
                             gaussian_train_per_class=1,
                             gaussian_test_per_class=math.ceil(n / K))
        x = gaussian(mixture, ood_seed).test.tensors[0][:n]
    ood = InMemory(x, torch.zeros(n, dtype=torch.int64))
    return _loader(ood, max(1, cfg.eval_batch_size // world), Shard(n, rank, world), cfg, cuda,
                   drop_last=False)


def close_workers(*loaders: DataLoader) -> None:
    """Stop the persistent workers now. A DataLoader and its worker iterator refer to each other,
    so without this the workers live until the garbage collector runs (or, at interpreter exit,
    until a 5 s join per worker times out)."""
    for loader in loaders:
        if loader.num_workers > 0:
            loader._iterator = None  # the iterator's finaliser shuts its workers down
