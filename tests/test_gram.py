"""The upper-block-triangle Gram products behind ClassStats and the fused linear loss, at widths
with 1 to 4 column blocks."""

import pytest
import torch
from torch.testing import assert_close

import ncfast
from ncfast._gram import fill_lower, symmetric_gram, upper_blocks


@pytest.mark.parametrize("d, blocks", [(5, 1), (255, 1), (256, 2), (300, 2), (1000, 4)])
def test_symmetric_gram_and_fill_lower_equal_the_full_product(d, blocks):
    a = torch.randn(40, d, dtype=torch.float64)
    assert len(upper_blocks(d)) == blocks
    assert_close(symmetric_gram(a, torch.mm), a.T @ a, rtol=1e-13, atol=1e-12)
    upper = torch.zeros(d, d, dtype=torch.float64)
    for start, stop in upper_blocks(d):
        upper[start:stop, start:] += a[:, start:stop].T @ a[:, start:]
    assert_close(fill_lower(upper), a.T @ a, rtol=1e-13, atol=1e-12)


def test_linear_loss_gram_path_with_several_blocks():
    """d = 300: W^T W in two column blocks, against the unfused composition."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 300, generator=gen, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(512, 300, generator=gen, dtype=torch.float64) / 300**0.5).requires_grad_()
    b = torch.randn(512, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 512, (64,), generator=gen)
    ours = ncfast.linear_rescaled_mse_loss(X, W, y, b, k=2.0, M=1.5, method="gram")
    theirs = ncfast.rescaled_mse_loss(torch.nn.functional.linear(X, W, b), y, k=2.0, M=1.5)
    assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert_close(torch.autograd.grad(ours, (X, W, b)), torch.autograd.grad(theirs, (X, W, b)),
                 rtol=1e-10, atol=1e-12)
