"""A Lightning callback that measures neural collapse (:func:`ncfast.measure`) at chosen
epochs and logs it through the module's logger."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..measurement import measure

try:  # the `lightning` package, else the older `pytorch_lightning`
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning import Callback

__all__ = ["NeuralCollapseCallback"]

_OP = "ncfast.integrations.NeuralCollapseCallback"


class NeuralCollapseCallback(Callback):
    """Measure NC1-NC4, CDNV and the bias quantity of the LightningModule at chosen epochs.

    An epoch here counts *completed* training epochs: 0 is before training (measured when
    ``fit`` starts), e is after the e-th epoch. The callback measures at epoch 0, every
    ``every_n_epochs`` epochs, at every epoch listed in ``epochs``, and after the last epoch
    (``max_epochs``, when the trainer has an epoch limit); pass ``every_n_epochs=0`` to measure
    only at ``epochs``.

    ``loader`` yields ``(inputs, labels)``: use the training set *without* augmentation, as
    the paper does. Without it the trainer's training loader is used (augmented if the data
    module augments). Under DDP give each rank its shard (Lightning's default loader already
    is); the statistics are combined exactly (:meth:`ncfast.ClassStats.all_reduce`).
    ``classifier`` is the final ``nn.Linear`` (default: the module's last ``nn.Linear``, the
    rule :func:`ncfast.measure` documents). The model runs in eval mode under no_grad and its
    mode is restored.

    Each measurement goes to the trainer's logger (``logger.log_metrics`` at the current
    global step, on rank 0) as ``<prefix><metric>`` (``nc/nc1``, ``nc/accuracy``,
    ``nc/epoch``, ...), undefined metrics left out, and is kept in ``history`` as
    ``(epoch, ncfast.Measurement)`` on every rank.
    """

    def __init__(self, loader: Iterable | None = None, *, every_n_epochs: int = 1,
                 epochs: Iterable[int] = (), classifier: nn.Linear | None = None,
                 nc4: bool = True, prefix: str = "nc/") -> None:
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) \
                or every_n_epochs < 0:
            raise ValueError(f"{_OP}: every_n_epochs must be an int >= 0, got "
                             f"{every_n_epochs!r}")
        epochs = list(epochs)
        bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, int) or e < 0]
        if bad:
            raise ValueError(f"{_OP}: epochs must be ints >= 0, got {bad[0]!r}")
        self.loader, self.every_n_epochs, self.epochs = loader, every_n_epochs, set(epochs)
        self.classifier, self.nc4, self.prefix = classifier, nc4, prefix
        self.history: list = []

    def _due(self, epoch: int, last: bool) -> bool:
        periodic = self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0
        return epoch == 0 or periodic or epoch in self.epochs or last

    def _measure(self, trainer, pl_module, epoch: int) -> None:
        loader = self.loader if self.loader is not None else trainer.train_dataloader
        if loader is None:
            raise ValueError(f"{_OP}: no loader given and the trainer has no training loader "
                             f"yet; pass loader=")
        result = measure(pl_module, loader, classifier=self.classifier, nc4=self.nc4,
                         undefined="none")
        self.history.append((epoch, result))
        values = {f"{self.prefix}{name}": float(value)
                  for name, value in result.metrics.as_dict().items() if value is not None}
        values[f"{self.prefix}accuracy"] = result.accuracy
        values[f"{self.prefix}epoch"] = float(epoch)
        if trainer.logger is not None:
            trainer.logger.log_metrics(values, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:  # not when resuming mid-run
            self._measure(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        limit = trainer.max_epochs  # None or -1: no epoch limit, so no last epoch to measure
        if self._due(epoch, last=limit is not None and limit >= 0 and epoch >= limit):
            self._measure(trainer, pl_module, epoch)
