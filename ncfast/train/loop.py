"""`ncfast.train.run(config)`: the training loop. One process or torchrun/DDP (NC statistics
merged exactly across ranks, only rank 0 writes), mixed precision, NC tracking, atomic
checkpoints and an exact --resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import losses, measure
from ..measurement import final_linear
from ..stats import NonFiniteFeaturesError
from . import checkpoint as ckpt
from . import config as config_mod
from . import logs, report, sync_batch_norm
from .config import ConfigError, TrainConfig, peak_lr
from .data import (IMAGENET_MEAN, IMAGENET_STD, JpegFiles, class_subset, close_workers,
                   epoch_batches, load_splits, loaders, ood_loader)
from .gpu_decode import GpuPipeline
from .models import build_model
from .runfolder import RunFolder

# Keys that may change when a run is resumed (they do not change what is computed; name and
# runs_dir let a copied or renamed run folder be resumed).
RESUME_FREE = ("epochs", "name", "runs_dir", "progress", "progress_every", "log", "data.workers",
               "data.pin_memory", "data.persistent_workers", "data.dir", "data.download")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class RunResult:
    """What :func:`run` returns (on every rank): the run folder, every metrics record and the
    last NC measurement per split."""
    run_dir: Path
    records: list[dict]
    final: dict[str, dict]
    train_time: float
    track_time: float


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        here = True
    return _Dist(rank, world, local, here)


def _device(cfg: TrainConfig, d: _Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but torch sees no CUDA device")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def loss_function(cfg: config_mod.LossConfig):
    if cfg.name == "ce":
        return F.cross_entropy
    k, M = (cfg.k, cfg.M) if cfg.name == "rescaled_mse" else (1.0, 1.0)
    return lambda logits, y: losses.rescaled_mse_loss(logits, y, k=k, M=M,
                                                      normalize=cfg.normalize)


def warmup_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The factor on the scheduled lr at optimisation step ``step`` (0-based, counted from the
    start of training): a linear ramp over schedule.warmup_epochs, step by step, from the
    unscaled lr (with linear scaling: Goyal et al.'s gradual warm-up) or from 0, reaching 1
    at its last step."""
    total = cfg.schedule.warmup_epochs * steps_per_epoch
    if step >= total:
        return 1.0
    ref = cfg.optim.lr_reference_batch
    start = min(1.0, ref / cfg.data.batch_size) if ref else 0.0
    return start + (1.0 - start) * (step + 1) / total


def _optimizer(cfg: config_mod.OptimConfig, params, lr: float):
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                   weight_decay=cfg.weight_decay)
    # L-BFGS has no weight decay: the closure adds 0.5 * wd * sum ||p||^2 (theory.md 6.1).
    return torch.optim.LBFGS(params, lr=lr, history_size=cfg.lbfgs_history,
                             max_iter=cfg.lbfgs_max_iter, line_search_fn="strong_wolfe")


def _scheduler(cfg: TrainConfig, optimizer):
    s = cfg.schedule
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, s.step_epochs, s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, s.min_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _on_rank0(d: _Dist, check):
    """Run ``check`` on rank 0 only (the run folder is rank 0's: other nodes may not see it, and
    rank 0 may already be writing to it) and raise its error on every rank; returns its result
    on rank 0, None elsewhere."""
    error = result = None
    if d.main:
        try:
            result = check()
        except (ConfigError, ckpt.CheckpointError) as err:
            error = err
    if d.world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def _tracking_epochs(cfg: TrainConfig) -> set[int]:
    return set(range(0, cfg.epochs + 1, cfg.track.every)) | {0, cfg.epochs}


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ConfigError(f"precision={cfg.precision!r} needs CUDA; use precision='fp32' on CPU")
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _seed_everything(seed: int, deterministic: bool) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def measure_split(model, fc, loader, loss_fn, device, cfg: TrainConfig, split: str,
                  epoch: int, ood=None) -> dict:
    """One NC record of ``split`` (the metrics, accuracy, loss, norms) at ``epoch``, with
    ``fc`` the classifier whose input is the measured feature; with ``ood`` (a loader of
    out-of-distribution inputs) NC5 too."""
    start = time.perf_counter()
    # In float32 even when training under bf16/fp16 autocast: their rounding (2^-8 / 2^-11)
    # would swamp the within-class spread of a collapsed network, and with it NC1.
    try:
        m = measure(model, loader, classifier=fc, device=device, nc4=cfg.track.nc4,
                    loss_fn=loss_fn, undefined="none", extras=cfg.track.extras,
                    ood_loader=ood)
    except NonFiniteFeaturesError as err:
        raise TrainingDiverged(f"training diverged by epoch {epoch}: the {split} features are "
                               f"not finite in eval mode ({err}); lower optim.lr (now "
                               f"{cfg.optim.lr:g})") from None
    stats = m.stats
    # mean ||h||^2 = tr(Sigma_W) + sum_k n_k ||mu_k||^2 / N
    n = stats.counts.to(stats.means.dtype)
    mean_sq = float(stats.sigma_w().trace() + (n * (stats.means ** 2).sum(1)).sum() / n.sum())
    record = {"kind": "nc", "epoch": epoch, "split": split, "accuracy": m.accuracy,
              "top5_accuracy": m.top5_accuracy, "loss": m.loss, "samples": m.samples,
              **m.metrics.as_dict(), **m.extra,
              "feature_norm": math.sqrt(max(mean_sq, 0.0)),
              "weight_norm": float(fc.weight.detach().norm()),
              "bias_param_norm": None if fc.bias is None else float(fc.bias.detach().norm()),
              "empty_classes": m.empty_classes,
              "seconds": time.perf_counter() - start}
    if m.metrics.undefined:  # e.g. two classes share a mean early in training
        record["undefined"] = m.metrics.undefined
    return record


def _sync_buffers(model: nn.Module, d: _Dist) -> None:
    """BatchNorm running statistics from rank 0, so every rank measures the same network."""
    if d.world > 1:
        for buf in model.buffers():
            dist.broadcast(buf, 0)


def run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, *,
        model: nn.Module | None = None, classifier: nn.Linear | None = None) -> RunResult:
    """Train ``cfg`` (see :mod:`ncfast.train.config`) and track neural collapse. Under torchrun
    every process calls this; only rank 0 writes to ``<runs_dir>/<name>/``.

    ``model``: train your own ``nn.Module`` instead of building ``cfg.model`` (whose keys are
    then not used). It maps a batch of the configured data set's inputs to logits (B, K); it is
    moved to the run's device (and to channels_last if configured) and wrapped in DDP under
    torchrun (each process passes an identically built instance: DDP starts every rank from
    rank 0's weights). The features whose collapse is tracked are the inputs of
    ``classifier``, by default the **last** ``nn.Linear`` in ``model.modules()`` (registration
    order: the rule of :func:`ncfast.measure`); pass ``classifier`` when that is not the final
    layer. Checkpoints hold the model's ``state_dict``, so ``resume=True`` needs the same model
    again. Everything else (losses, optimisers, schedule, NC tracking, logs, exact resume) is
    as for the built-in models.
    """
    config_mod.validate(cfg)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"ncfast.train.run: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    if classifier is not None:
        if not isinstance(classifier, nn.Linear):
            raise TypeError(f"ncfast.train.run: classifier must be an nn.Linear, got "
                            f"{type(classifier).__name__}")
        if model is None or all(m is not classifier for m in model.modules()):
            raise ValueError("ncfast.train.run: classifier must be a module of model (pass "
                             "model= with it)")
    requested = "cuda" if cfg.device == "cuda" or (
        cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = _init_distributed(requested)
    # deterministic=true changes process-wide switches: put them back for the caller.
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.backends.cudnn.benchmark)
    try:
        # Every data source yields labels in [0, K) (data.py checks K against the data), so
        # the loss need not read them back on CUDA: no host sync inside a training step.
        with losses.cuda_target_checks(False):
            return _run(cfg, resume, overwrite, d, model, classifier)
    finally:
        torch.use_deterministic_algorithms(deterministic[0])
        torch.backends.cudnn.benchmark = deterministic[1]
        if d.initialised_here:
            dist.destroy_process_group()


def _restore(path: Path, cfg: TrainConfig, model, optimizer, scheduler, scaler,
             steps_per_epoch: int) -> tuple[int, float, float, ckpt.EpochProgress | None]:
    """Load the checkpoint at ``path`` into the run's objects and the RNGs; returns (epoch,
    train_time, track_time, where it stands within the next epoch). Raises before any RNG
    changes if anything does not fit."""
    saved = ckpt.load(path)
    try:
        saved_cfg = config_mod.from_dict(saved["config"])
    except ConfigError as err:
        raise ckpt.CheckpointError(f"cannot resume: the config stored in {str(path)!r} is "
                                   f"invalid ({err})") from None
    ckpt.check_same_config(config_mod.to_dict(saved_cfg), config_mod.to_dict(cfg), RESUME_FREE)
    if saved["epoch"] > cfg.epochs:
        raise ConfigError(f"cannot resume to epochs={cfg.epochs}: the checkpoint is at "
                          f"epoch {saved['epoch']}")
    within = saved.get("within_epoch")
    if within is not None and saved["epoch"] == cfg.epochs:
        # Nothing would train, and the run would end on the weights of a partial epoch.
        raise ConfigError(f"cannot resume to epochs={cfg.epochs}: the checkpoint is inside "
                          f"epoch {saved['epoch'] + 1} (after its step {within['step']})")
    if cfg.schedule.name == "cosine" and saved_cfg.epochs != cfg.epochs:
        # The cosine's length is the run's: another length would send the lr back up.
        raise ConfigError(f"cannot resume a cosine schedule with epochs={cfg.epochs}: it was "
                          f"built for epochs={saved_cfg.epochs}, and another length would "
                          f"move the learning rate off its path (up again when longer); keep "
                          f"epochs={saved_cfg.epochs}, or start a new run")
    if within is not None and within["step"] >= steps_per_epoch:
        # a mid-epoch checkpoint is never written at an epoch's last step
        raise ckpt.CheckpointError(f"cannot resume: checkpoint {str(path)!r} stands at step "
                                   f"{within['step']} of an epoch, but an epoch of this data "
                                   f"has {steps_per_epoch} steps; the run folder is unchanged")
    fresh = (optimizer.state_dict()["param_groups"], scheduler.state_dict(), scaler.state_dict())
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        within = None if within is None else ckpt.EpochProgress(**within)
        if scheduler.last_epoch != saved["epoch"]:
            raise ValueError(f"its schedule is at epoch {scheduler.last_epoch}, the checkpoint "
                             f"at epoch {saved['epoch']}")
        _check_restored(cfg, optimizer, scheduler, scaler, *fresh)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        detail = " ".join(str(err).split())  # torch's load_state_dict message spans lines
        raise ckpt.CheckpointError(f"cannot resume: checkpoint {str(path)!r} does not fit this "
                                   f"model ({type(err).__name__}: {detail}); the run folder is "
                                   f"unchanged") from None
    ckpt.set_rng_state(saved["rng"])
    return saved["epoch"], saved["train_time"], saved["track_time"], within


def _check_restored(cfg: TrainConfig, optimizer, scheduler, scaler, groups: list[dict],
                    schedule: dict, scaling: dict) -> None:
    """What torch's load_state_dict methods take without a check must still be what this config
    builds (a hand-made checkpoint could otherwise fail mid-epoch): hyperparameters equal to a
    fresh optimiser's and schedule's, a finite learning rate, state shaped like the parameters."""
    def same(a, b) -> bool:
        return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)

    for i, (group, new) in enumerate(zip(optimizer.param_groups, groups)):
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < math.inf:
            raise ValueError(f"optimizer group {i}: lr must be a finite number >= 0, got {lr!r}")
        for key in set(group) & set(new) - {"params", "lr"}:
            if not same(group[key], new[key]):
                raise ValueError(f"optimizer group {i}: {key} is {group[key]!r}, the config "
                                 f"gives {new[key]!r}")
    if cfg.optim.name != "lbfgs":  # L-BFGS keeps flat history vectors, not per-parameter state
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {list(value.shape)}, "
                                     f"its parameter {list(p.shape)}")
    restored = scheduler.state_dict()
    for key in set(restored) & set(schedule) - {"last_epoch", "_step_count", "_last_lr",
                                                "_get_lr_called_within_step", "_is_initial"}:
        if not same(restored[key], schedule[key]):
            raise ValueError(f"schedule {key} is {restored[key]!r}, the config gives "
                             f"{schedule[key]!r}")
    last = restored.get("_last_lr", [])
    if not (isinstance(last, list) and all(isinstance(v, (int, float)) and math.isfinite(v)
                                           for v in last)):
        raise ValueError(f"schedule _last_lr must be a list of finite numbers, got {last!r}")
    restored = scaler.state_dict()
    if set(restored) != set(scaling) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in restored.values()):
        raise ValueError(f"grad scaler state must hold finite numbers for {sorted(scaling)}, "
                         f"got {restored!r}")


def _run(cfg: TrainConfig, resume: bool, overwrite: bool, d: _Dist, user_model, classifier
         ) -> RunResult:
    run_dir = Path(cfg.runs_dir) / cfg.name
    device = _device(cfg, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Exclusive from here on; the folder itself is written only once everything has loaded.
    folder = _on_rank0(d, lambda: RunFolder(run_dir, resume, overwrite))
    try:
        return _train(cfg, resume, d, device, run_dir, folder, user_model, classifier)
    finally:
        if folder is not None:
            folder.release()


def _train(cfg: TrainConfig, resume: bool, d: _Dist, device: torch.device, run_dir: Path,
           folder: RunFolder | None, user_model: nn.Module | None,
           classifier: nn.Linear | None) -> RunResult:
    _seed_everything(cfg.seed, cfg.deterministic)

    # Everything that can fail on bad input happens before the run folder is touched.
    splits = load_splits(cfg.data, cfg.seed)
    splits.train_eval = class_subset(splits.train_eval, cfg.track.subset_per_class, cfg.seed)
    train_loader, train_eval_loader, test_loader = loaders(
        splits, cfg.data, cfg.seed, d.rank, d.world, device.type == "cuda")
    ood = ood_loader(cfg.track.ood, splits, cfg.data, cfg.seed, d.rank, d.world,
                     device.type == "cuda")
    if user_model is None:
        model = build_model(cfg.model, splits.num_classes, splits.input_shape).to(device)
        classifier = model.fc  # every built-in model ends in this classifier
    else:
        model = user_model.to(device)
        try:
            classifier = classifier if classifier is not None else final_linear(model)
        except ValueError:
            raise ConfigError("ncfast.train.run: model has no nn.Linear to track neural "
                              "collapse at; pass classifier=<its final linear layer>") from None
        if classifier.out_features != splits.num_classes:
            raise ConfigError(f"ncfast.train.run: the classifier ({classifier}) has "
                              f"{classifier.out_features} outputs, but {cfg.data.name} has "
                              f"{splits.num_classes} classes")
    if cfg.log:  # on every rank, so all of them stop together
        logs.check_available(cfg.log)
    last_batch = len(splits.train) // d.world % (cfg.data.batch_size // d.world)
    if last_batch == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                               for m in model.modules()):
        raise ConfigError(f"config key 'data.batch_size' must not leave a last training batch of "
                          f"one sample per process with BatchNorm ({len(splits.train)} training "
                          f"samples), got {cfg.data.batch_size}")
    if d.world > 1 and cfg.model.sync_batch_norm:
        model = sync_batch_norm.convert(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg.optim, params, peak_lr(cfg))
    scheduler = _scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    loss_fn = loss_function(cfg.loss)
    _autocast(cfg, device)  # raises for reduced precision on CPU

    gpu = None
    if isinstance(splits.train, JpegFiles):  # data.decode='cuda' (libjpeg on a CPU device)
        gpu = GpuPipeline(device, splits.input_shape[-1], IMAGENET_MEAN, IMAGENET_STD, cfg.seed,
                          d.rank, d.world)

    start_epoch, records, train_time, track_time = 0, [], 0.0, 0.0
    within = None  # where a mid-epoch checkpoint stands
    if resume:  # every check and load before the run folder is written to
        start_epoch, train_time, track_time, within = _restore(
            run_dir / ckpt.CHECKPOINT, cfg, model, optimizer, scheduler, scaler,
            len(train_loader))

    if folder is not None:
        folder.create()
        if resume:
            records = ckpt.truncate_metrics(folder.path / ckpt.METRICS, start_epoch)
        ckpt.atomic_write(folder.path / ckpt.CONFIG,
                          lambda f: f.write(config_mod.dump(cfg).encode()))

    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    progress = report.Progress(cfg.progress and d.main, cfg.progress_every)
    arch = cfg.model.arch if user_model is None else type(model).__name__
    if cfg.progress and d.main:
        trainable = sum(p.numel() for p in params)
        print(f"ncfast train: {run_dir} | {arch} ({trainable:,} trainable parameters) "
              f"on {cfg.data.name} ({len(splits.train):,} train / {len(splits.test):,} test, "
              f"{splits.num_classes} classes) | {cfg.loss.name}, {cfg.optim.name} lr "
              f"{peak_lr(cfg):g}, {cfg.epochs} epochs | {device.type} x {d.world}, "
              f"{cfg.precision}" + (f" | resumed at epoch {start_epoch}" + (
                  f", step {within.step} of the next" if within else "") if resume else ""),
              flush=True)
    metrics_file = (folder.path / ckpt.METRICS).open("a") if folder is not None else None
    extra_logs = logs.RunLogs(folder.path, cfg.log, records, start_epoch if resume else None) \
        if folder is not None and cfg.log else None
    tracked = _tracking_epochs(cfg)

    def emit(record: dict) -> None:
        records.append(record)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if extra_logs is not None:
            extra_logs.write(record)

    def track(epoch: int) -> None:
        nonlocal track_time
        start = time.perf_counter()
        _sync_buffers(model, d)
        emit(measure_split(model, classifier, train_eval_loader, loss_fn, device, cfg, "train",
                           epoch, ood))
        if cfg.track.test:
            emit(measure_split(model, classifier, test_loader, loss_fn, device, cfg, "test",
                               epoch, ood))
        track_time += time.perf_counter() - start
        if folder is not None and cfg.track.keep_checkpoints:
            ckpt.save(folder.path / ckpt.kept(epoch), payload(epoch), keep_previous=False)

    def payload(epoch: int, within: ckpt.EpochProgress | None = None) -> dict:
        return {"epoch": epoch, "config": config_mod.to_dict(cfg), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": ckpt.rng_state(),
                "train_time": train_time, "track_time": track_time,
                "within_epoch": None if within is None else dataclasses.asdict(within)}

    def save(epoch: int, within: ckpt.EpochProgress | None = None) -> None:
        """checkpoint.pt after ``epoch`` whole epochs, and ``within`` the next one."""
        ckpt.save(folder.path / ckpt.CHECKPOINT, payload(epoch, within))
        folder.commit()  # --overwrite: the new run replaces the old one only now

    every_steps = cfg.checkpoint_every_steps

    def check_finite(epoch: int, loss_mean: float) -> None:
        """TrainingDiverged before a checkpoint would keep a diverged network."""
        finite_weights = bool(torch.stack([t.isfinite().all() for t in model.state_dict()
                                           .values() if t.is_floating_point()]).all())
        if not (math.isfinite(loss_mean) and finite_weights):
            what = (f"the mean training loss is {loss_mean}" if not math.isfinite(loss_mean)
                    else "the weights or BatchNorm statistics are no longer finite")
            raise TrainingDiverged(
                f"training diverged in epoch {epoch}: {what}; lower optim.lr (now "
                f"{cfg.optim.lr:g}). The run folder keeps its last checkpoint, written before "
                f"the divergence")

    def step_done(epoch: int, step: int, steps_per_epoch: int, progress_now) -> None:
        """Every checkpoint_every_steps steps, a checkpoint inside the epoch (its last step
        leaves the checkpoint to the epoch's end)."""
        if (every_steps and step < steps_per_epoch
                and ((epoch - 1) * steps_per_epoch + step) % every_steps == 0):
            within = progress_now()  # under DDP a collective: every rank takes part
            check_finite(epoch, within.loss_sum / within.seen)  # the same on every rank
            if folder is not None:
                save(epoch - 1, within)

    try:
        if start_epoch == 0 and within is None:
            track(0)
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            seconds, loss_mean, acc, samples, lr = _train_epoch(
                cfg, net, params, train_loader, gpu, optimizer, scaler, loss_fn, device, epoch,
                progress, d, within, step_done)
            within = None
            train_time += seconds
            check_finite(epoch, loss_mean)
            scheduler.step()
            emit({"kind": "train", "epoch": epoch, "loss": loss_mean, "accuracy": acc,
                  "lr": lr, "seconds": seconds, "samples_per_s": samples / seconds})
            progress.epoch_done(f"epoch {epoch}/{cfg.epochs}  loss {loss_mean:.4g}  "
                                f"acc {acc:.4f}  lr {lr:.3g}  {samples / seconds:,.0f} samples/s")
            if epoch in tracked:
                track(epoch)
                if d.main:
                    last = [r for r in records if r["kind"] == "nc" and r["epoch"] == epoch]
                    progress.epoch_done("  NC " + "  ".join(
                        f"{r['split']}: acc {r['accuracy']:.4f} NC1 {report.fmt(r['nc1'])}"
                        for r in last))
            # The epoch's last step, when due, is the one step_done leaves to this save.
            step_due = every_steps and epoch * len(train_loader) % every_steps == 0
            if folder is not None and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
                                       or step_due):
                save(epoch)
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if extra_logs is not None:
            extra_logs.close()
        close_workers(train_loader, train_eval_loader, test_loader,
                      *([] if ood is None else [ood]))

    if folder is not None:
        report.plot(records, folder.path / ckpt.PLOT, f"{cfg.name}: {arch} on "
                    f"{cfg.data.name}, {cfg.loss.name}, {cfg.optim.name}")
        if cfg.progress:
            print(report.summary(records, train_time, track_time))
            print(f"run folder: {run_dir}")
    final = {}
    for r in records:
        if r["kind"] == "nc":
            final[r["split"]] = r
    return RunResult(run_dir, records, final, train_time, track_time)


def _train_epoch(cfg, net, params, loader, gpu, optimizer, scaler, loss_fn, device, epoch,
                 progress, d: _Dist, within: ckpt.EpochProgress | None, step_done):
    """One epoch, from ``within`` (a mid-epoch checkpoint's progress) when given; calls
    ``step_done(epoch, step, steps_per_epoch, progress)`` after every step (``progress()``
    sums the running sums over the processes: a host sync, so only when a checkpoint needs
    them). A checkpoint's sums are those of every process: rank 0 resumes with them."""
    net.train()
    within = within or ckpt.EpochProgress()
    if d.rank != 0:
        within = dataclasses.replace(within, loss_sum=0.0, correct=0, seen=0)
    wd = cfg.optim.weight_decay
    loss_sum = torch.tensor(within.loss_sum, device=device, dtype=torch.float64)
    correct = torch.tensor(within.correct, device=device, dtype=torch.int64)
    seen = within.seen
    batches = len(loader)
    # The shown rate counts what this start of the epoch did: rank 0's `seen` begins with
    # every process's samples before a resume, and within.seconds with their time.
    seen_at_start, started = seen, time.perf_counter()
    start = started - within.seconds
    batches_iter = epoch_batches(loader, cfg.seed, epoch, within.step, gpu)
    lr = optimizer.param_groups[0]["lr"]
    try:
        for i, (x, y) in enumerate(batches_iter, within.step + 1):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            warm = warmup_factor(cfg, (epoch - 1) * batches + i - 1, batches)
            scheduled = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:  # the scheduler keeps stepping the unwarmed lr
                group["lr"] *= warm
            lr = optimizer.param_groups[0]["lr"]
            if cfg.optim.name == "lbfgs":
                first: list = []

                def closure():
                    optimizer.zero_grad(set_to_none=True)
                    logits = net(x)
                    loss = loss_fn(logits, y)
                    if not first:
                        first.append((loss.detach(), logits.detach()))
                    total = loss + 0.5 * wd * sum((p * p).sum() for p in params) if wd else loss
                    total.backward()
                    return total

                optimizer.step(closure)
                loss, logits = first[0]
            else:
                with _autocast(cfg, device):
                    logits = net(x)
                    loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            for group, value in zip(optimizer.param_groups, scheduled):
                group["lr"] = value
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
            progress.update(epoch, cfg.epochs, i, batches, (seen - seen_at_start) * d.world,
                            time.perf_counter() - started, loss)
            step_done(epoch, i, batches, lambda: ckpt.EpochProgress(
                i, *_summed(loss_sum, correct, seen, d), time.perf_counter() - start))
    finally:  # a step that raises stops the prefetch thread (and frees its loader) now
        if gpu is not None:
            batches_iter.close()
    loss_total, correct_total, n = _summed(loss_sum, correct, seen, d)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, loss_total / n, correct_total / n, n, lr


def _summed(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, d: _Dist
            ) -> tuple[float, int, int]:
    """An epoch's running sums (loss, correct, samples) over every process."""
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(
        float(seen), device=loss_sum.device, dtype=torch.float64)])
    if d.world > 1:
        dist.all_reduce(totals)
    return float(totals[0]), int(totals[1]), int(totals[2])
