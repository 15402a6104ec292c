"""BatchNorm over the global batch under DDP (model.sync_batch_norm): torch's nn.SyncBatchNorm on
CUDA, and on CPU (gloo), where torch's has no kernel, GlobalBatchNorm: the same statistics from
two differentiable all-reduces, so 1 and N processes train the same network."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode mean and variance are those of the batch of every process
    together. Two passes, as single-process BatchNorm computes them (the sum and count, then the
    squared deviations from the global mean), each one all-reduce; gradients flow through both
    (torch.distributed.nn), so backward is that of BatchNorm over the global batch. Eval mode and
    a single process are plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected an input with 2 or more dimensions "
                             f"(N, C, ...), got shape {list(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        local_count = x.numel() // x.shape[1]
        sums = dist_fn.all_reduce(torch.cat([x.sum(dims), x.new_full((1,), local_count)]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out.to(input.dtype)


def convert(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised across processes (the module itself
    when it has none): nn.SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere. Parameters and
    running statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        bn = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, device=device,
                             dtype=module.running_mean.dtype if module.running_mean is not None
                             else None)
        if module.affine:
            with torch.no_grad():
                bn.weight = module.weight
                bn.bias = module.bias
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        module.add_module(name, convert(child, device))
    return module

