"""ncfast's HVPs in the linear-algebra ecosystem: SciPy LinearOperators (eigsh) of the UFM and
network operators, and curvlinops both ways (its Hessian and GGN operators over a DataLoader
agree with ncfast's; ncfast operators run in its estimators; its operators in ncfast's Lanczos)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import ncfast
from ncfast import hessian
from ncfast.integrations import as_linear_operator

try:  # the GPU machine may lack SciPy: only the tests that need it skip
    import scipy.sparse.linalg as scipy_linalg
except ImportError:
    scipy_linalg = None
needs_scipy = pytest.mark.skipif(scipy_linalg is None, reason="needs scipy")
F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_network(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x = torch.randn(10, 3, generator=gen(seed + 1), dtype=F64)
    y = torch.randint(0, 3, (10,), generator=gen(seed + 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    return model, x, y, loader


def dense(op, n):
    return torch.stack([op(e) for e in torch.eye(n, dtype=F64)], 1)


@needs_scipy
def test_ufm_hvp_as_a_scipy_operator_gives_eigsh_the_dense_spectrum():
    ufm = ncfast.ufm.UFM(K=3, d=4, n=2, lambda_W=1e-2, lambda_H=2e-2, alpha=3.0, M=2.0)
    point = ufm.random_init(generator=gen(0), scale=0.5)
    op = as_linear_operator(ufm.hvp_operator(point))
    assert op.shape == (ufm.num_params, ufm.num_params) and op.dtype == np.float64
    H = torch.autograd.functional.hessian(lambda flat: ufm.objective(*ufm.unflatten(flat)),
                                          ufm.flatten(*point))
    exact = torch.linalg.eigvalsh(H).numpy()
    top = np.sort(scipy_linalg.eigsh(op, k=3, which="LA", return_eigenvectors=False))
    bottom = np.sort(scipy_linalg.eigsh(op, k=2, which="SA", return_eigenvectors=False))
    np.testing.assert_allclose(top, exact[-3:], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bottom, exact[:2], rtol=1e-8, atol=1e-10)
    v = np.random.default_rng(0).standard_normal((ufm.num_params, 2))
    np.testing.assert_allclose(op @ v, H.numpy() @ v, rtol=1e-10, atol=1e-12)  # matmat
    np.testing.assert_allclose(op.rmatvec(v[:, 0]), H.numpy() @ v[:, 0], rtol=1e-10)


@needs_scipy
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_network_operator_as_a_scipy_operator(curvature):
    model, _, _, loader = tiny_network(3)
    op = hessian.network_operator(model, nn.functional.cross_entropy, loader,
                                  curvature=curvature)
    exact = torch.linalg.eigvalsh(dense(op, op.n)).numpy()
    top = np.sort(scipy_linalg.eigsh(hessian.as_linear_operator(op), k=2, which="LA",
                                     return_eigenvectors=False))
    np.testing.assert_allclose(top, exact[-2:], rtol=1e-8)


@needs_scipy
def test_a_plain_callable_needs_its_size():
    A = torch.randn(5, 5, generator=gen(4), dtype=F64)
    A = A + A.T
    op = as_linear_operator(lambda v: A @ v, 5, dtype=F64)
    np.testing.assert_allclose(op @ np.ones(5), (A @ torch.ones(5, dtype=F64)).numpy())
    with pytest.raises(ValueError, match=r"^ncfast.integrations.as_linear_operator: n must be "
                                         r"an int >= 1 \(give it when the operator does not "
                                         r"carry it\), got None$"):
        as_linear_operator(lambda v: A @ v)
    with pytest.raises(TypeError, match="hvp must be callable, got Tensor"):
        as_linear_operator(A, 5)


@needs_scipy
def test_a_bfloat16_network_talks_to_scipy_in_float32():
    model, x, y, _ = tiny_network(11)
    model = model.to(torch.bfloat16)
    op = hessian.network_operator(model, nn.functional.cross_entropy,
                                  [(x.to(torch.bfloat16), y)])
    linear = as_linear_operator(op)
    v = np.random.default_rng(1).standard_normal(op.n)
    assert linear.dtype == np.float32
    want = op(torch.as_tensor(v, dtype=torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(linear @ v, want)


def test_curvlinops_operators_agree_with_ncfast_over_a_loader():
    curvlinops = pytest.importorskip("curvlinops")
    from ncfast.integrations import from_curvlinops, to_curvlinops

    model, _, _, loader = tiny_network(5)
    params = list(model.parameters())
    V = torch.randn(sum(p.numel() for p in params), 3, generator=gen(6), dtype=F64)
    for curvature, cls in (("hessian", curvlinops.HessianLinearOperator),
                           ("gauss_newton", curvlinops.GGNLinearOperator)):
        ours = hessian.network_operator(model, nn.functional.cross_entropy, loader,
                                        curvature=curvature)
        theirs = cls(model, nn.CrossEntropyLoss(), params, loader)
        assert_close(theirs @ V, torch.stack([ours(V[:, i]) for i in range(3)], 1),
                     rtol=1e-10, atol=1e-12)
    # ncfast's operator inside curvlinops: products, algebra, its estimators. Over a list of
    # batches: iterating a DataLoader draws from torch's global generator, as the probes do.
    ours = hessian.network_operator(model, nn.functional.cross_entropy, list(loader),
                                    curvature="gauss_newton")
    wrapped = to_curvlinops(ours)
    assert wrapped.shape == (ours.n, ours.n)
    assert_close(wrapped @ V, theirs @ V, rtol=1e-10, atol=1e-12)
    assert_close((2.0 * wrapped) @ V[:, 0], 2 * ours(V[:, 0]), rtol=1e-10, atol=1e-12)
    exact = dense(ours, ours.n)
    estimates = []
    for operator in (wrapped, exact):  # same probes: the estimator sees the same matrix
        torch.manual_seed(7)
        estimates.append(float(curvlinops.hutchpp_trace(operator, 12)))
    assert_close(estimates[0], estimates[1], rtol=1e-10, atol=1e-12)
    assert abs(estimates[0] - float(exact.trace())) < 0.5 * float(exact.diag().abs().sum())
    # curvlinops' operator inside ncfast's Lanczos
    res = hessian.lanczos(from_curvlinops(theirs), ours.n, 1, num_iter=ours.n, generator=gen(8))
    eig = torch.linalg.eigvalsh(exact)
    assert_close(res.eigenvalues, torch.stack([eig[0], eig[-1]]), rtol=1e-8, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_network_operator_on_cuda_matches_the_cpu(curvature):
    model, _, _, loader = tiny_network(9)
    cpu = hessian.network_operator(model, nn.functional.cross_entropy, loader,
                                   curvature=curvature)
    want = dense(cpu, cpu.n)
    gpu = hessian.network_operator(model.cuda(), nn.functional.cross_entropy, loader,
                                   curvature=curvature)
    assert gpu.device.type == "cuda"
    V = torch.randn(cpu.n, 3, generator=gen(10), dtype=F64)
    got = torch.stack([gpu(V[:, i].cuda()) for i in range(3)], 1).cpu()
    assert_close(got, want @ V, rtol=1e-9, atol=1e-12)
    if scipy_linalg is None:
        return
    top = np.sort(scipy_linalg.eigsh(as_linear_operator(gpu), k=2, which="LA",
                                     return_eigenvectors=False))
    np.testing.assert_allclose(top, torch.linalg.eigvalsh(want).numpy()[-2:], rtol=1e-8)
