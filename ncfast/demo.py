"""The fused loss on an embedded default problem: a seeded Gaussian mixture, a small MLP trained
with the rescaled MSE, a check of the fused kernel against ncfast.reference, and the collapse
of the learned features (ncfast.measure). Runs on a CPU in seconds; the training issue's
`ncfast train` supersedes it as the main job."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import ncfast
from ncfast import reference


def gaussian_mixture(classes: int, dim: int, per_class: int, separation: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    means = separation * torch.randn(classes, dim, generator=gen) / dim**0.5
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = means[labels] + torch.randn(classes * per_class, dim, generator=gen)
    return features, labels


def run(steps: int = 300, k: float = 1.0, M: float = 1.0, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x, y = gaussian_mixture(classes=10, dim=32, per_class=200, separation=6.0, seed=seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss_fn = ncfast.RescaledMSELoss(k=k, M=M)
    print(f"rescaled MSE (k={k:g}, M={M:g}) on a 10-class Gaussian mixture, {len(y)} samples")
    nc1_start = ncfast.measure(model, [(x, y)], nc4=False).metrics.nc1
    start = time.perf_counter()
    for step in range(steps + 1):
        logits = model(x)
        loss = loss_fn(logits, y)
        if step % 50 == 0:
            acc = (logits.argmax(1) == y).float().mean().item()
            print(f"  step {step:4d}  loss {loss.item():.5f}  train accuracy {acc:.3f}")
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elapsed = time.perf_counter() - start

    # The fused kernel against the float64 reference, on the trained logits.
    z = model(x).detach().double().requires_grad_()
    fused = ncfast.rescaled_mse_loss(z, y, k=k, M=M)
    (g_fused,) = torch.autograd.grad(fused, z)
    ref = reference.rescaled_mse_loss(z, y, k=k, M=M)
    (g_ref,) = torch.autograd.grad(ref, z)
    collapse = ncfast.measure(model, [(x, y)]).metrics
    result = {
        "nc1_start": nc1_start,
        "nc1_end": collapse.nc1,
        "nc4_end": collapse.nc4,
        "final_loss": loss.item(),
        "train_accuracy": acc,
        "seconds": elapsed,
        "loss_error": abs(fused.item() - ref.item()),
        "grad_error": (g_fused - g_ref).abs().max().item(),
    }
    print(f"trained in {elapsed:.1f} s; fused vs float64 reference: |loss diff| "
          f"{result['loss_error']:.2e}, max |grad diff| {result['grad_error']:.2e}")
    print(f"neural collapse of the 64-d features (ncfast.measure): NC1 {nc1_start:.3g} -> "
          f"{collapse.nc1:.3g}, NC2 (classifier) {collapse.nc2_classifier:.3g}, "
          f"NC4 {collapse.nc4:.3g}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ncfast demo", description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=float, default=1.0)
    p.add_argument("--M", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run(steps=a.steps, k=a.k, M=a.M, seed=a.seed)


if __name__ == "__main__":
    main()
