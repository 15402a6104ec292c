"""UFM Hessian-vector-product benchmark: repeated fp32 HVPs at one point (as Lanczos does them) of
the closed-form ncfast.ufm.UFM.hvp against torch.func (jvp of grad), autograd double backward and
the six-GEMM floor. `python -m bench.hvp`."""

from __future__ import annotations

import sys

import torch
from torch.func import grad as func_grad
from torch.func import hessian as func_hessian
from torch.func import jvp as func_jvp

from ncfast.ufm import UFM

from . import harness

SEED = 0
LAMBDA_W = LAMBDA_H = 5e-4
POINT_SCALE = 0.1  # UFM.random_init scale of the point; directions are N(0, 1)
# Relative Frobenius error, per block (W, H, b), of every fp32 HVP against a float64 torch.func
# HVP on the benchmark instance, checked before anything is timed.
GATE = 1e-4
# (K, d, n): N = nK samples. --quick uses the smaller shape.
SHAPES = {"cpu": (100, 256, 100), "cuda": (1000, 2048, 100)}
QUICK_SHAPES = {"cpu": (50, 128, 40), "cuda": (500, 1024, 40)}
# Directions per call of the batched ncfast HVP (one hvp_operator call on a leading batch dim).
BATCH = {"cpu": 8, "cuda": 4}
# (label, alpha, M); bias="unpenalized" throughout.
CASES = [("plain MSE", 1.0, 1.0), ("rescaled a=3 M=2", 3.0, 2.0)]
# The float64 check on a small instance: (K, d, n), against the dense torch.func.hessian.
SMALL = (5, 7, 3)


# ------------------------------------------------------------------------------- candidates

def make_ufm(K: int, d: int, n: int, alpha: float, M: float) -> UFM:
    return UFM(K, d, n, LAMBDA_W, LAMBDA_H, alpha=alpha, M=M, bias="unpenalized")


def make_point(ufm: UFM, dtype: torch.dtype, device: str, m: int):
    """The point (W, H, b) and m directions (A, B, c), batched on a leading dim, drawn in float64
    on the CPU (the same numbers for every device and dtype), then cast and moved."""
    gen = torch.Generator().manual_seed(SEED)
    point = ufm.random_init(generator=gen, dtype=torch.float64, scale=POINT_SCALE)
    dirs = (torch.randn(m, ufm.K, ufm.d, generator=gen, dtype=torch.float64),
            torch.randn(m, ufm.d, ufm.N, generator=gen, dtype=torch.float64),
            torch.randn(m, ufm.K, generator=gen, dtype=torch.float64))
    move = lambda ts: tuple(t.to(device=device, dtype=dtype).contiguous() for t in ts)  # noqa: E731
    return move(point), move(dirs)


def ncfast_hvp(ufm: UFM, point):
    """`ufm.hvp(params, direction)`: G (hence W H) is recomputed on every call."""
    return lambda v: ufm.hvp(point, v)


def ncfast_operator(ufm: UFM, point):
    """`ufm.hvp_operator(params)`: G computed once at the point, reused by every product."""
    return ufm.hvp_operator(point)


def torch_func_hvp(ufm: UFM, point):
    """Forward-over-reverse: jvp of grad of the UFM objective, on the (W, H, b) tuple."""
    gradient = func_grad(lambda W, H, b: ufm.objective(W, H, b), argnums=(0, 1, 2))

    def hvp(v):
        return func_jvp(gradient, tuple(point), tuple(v))[1]
    return hvp


def double_backward_hvp(ufm: UFM, point):
    """The gradient with create_graph=True once at the point, then per direction one
    autograd.grad(g, params, grad_outputs=v, retain_graph=True): the vector-Jacobian product of
    the gradient's graph with v, i.e. grad of <g, v> without building that dot product."""
    params = tuple(t.detach().requires_grad_() for t in point)
    g = torch.autograd.grad(ufm.objective(*params), params, create_graph=True)

    def hvp(v):
        return torch.autograd.grad(g, params, grad_outputs=tuple(v), retain_graph=True)
    return hvp


def floor_products(ufm: UFM, point, v):
    """Exactly six torch.mm of the HVP's shapes, in the layouts ncfast.ufm uses: dR^T = H^T A^T
    + B^T W^T (two N x d x K products, (N, K) results), then dG H^T, G B^T (K x N x d) and
    W^T dG, A^T G (d x K x N) with dG, G (K, N) transposed views of (N, K) tensors made up
    front. Nothing else: no weighting pass, no additions."""
    W, H, _ = point
    A, B, _ = v
    gen = torch.Generator(device=W.device).manual_seed(SEED + 1)
    dG = torch.randn(ufm.N, ufm.K, generator=gen, device=W.device, dtype=W.dtype).T
    G = torch.randn(ufm.N, ufm.K, generator=gen, device=W.device, dtype=W.dtype).T
    Ht, Bt, Wt, At = H.T, B.T, W.T, A.T

    def six():
        return (torch.mm(Ht, At), torch.mm(Bt, Wt), torch.mm(dG, Ht), torch.mm(G, Bt),
                torch.mm(Wt, dG), torch.mm(At, G))
    return six


def one(dirs, i: int):
    return tuple(t[i] for t in dirs)


# ------------------------------------------------------------------------ correctness gate

def small_float64_check(device: str) -> list[dict]:
    """Every HVP, float64, on a small instance of each case, against the dense Hessian
    (torch.func.hessian of the flattened objective) times the direction."""
    rows = []
    K, d, n = SMALL
    m = 3
    for label, alpha, M in CASES:
        ufm = make_ufm(K, d, n, alpha, M)
        point, dirs = make_point(ufm, torch.float64, device, m)
        x = ufm.flatten(*point)
        Hd = func_hessian(lambda x: ufm.objective(*ufm.unflatten(x)))(x)
        expected = [Hd @ ufm.flatten(*one(dirs, i)) for i in range(m)]
        batched = ncfast_operator(ufm, point)(dirs)
        outputs = {"ncfast batched": [one(batched, i) for i in range(m)]}
        for name, make in (("ncfast", ncfast_operator), ("ncfast hvp", ncfast_hvp), ("torch.func", torch_func_hvp),
                           ("double backward", double_backward_hvp)):
            fn = make(ufm, point)
            outputs[name] = [fn(one(dirs, i)) for i in range(m)]
        worst = {}
        for name in GATE_COLUMNS:
            worst[name] = 0.0
            for i, out in enumerate(outputs[name]):
                actual = torch.cat([t.reshape(-1) for t in out])
                harness.check_close(f"{name} HVP, float64, {label}, K={K} d={d} n={n}",
                                    actual, expected[i], torch.float64)
                worst[name] = max(worst[name], rel_err(actual, expected[i]))
        rows.append({"check": f"float64, K={K} d={d} N={K * n}, {label}, vs dense Hessian",
                     **{name: f"{e:.1e}" for name, e in worst.items()}})
    return rows


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().to(torch.float64)
    diff = actual.detach().to(torch.float64) - expected
    return float(diff.norm() / expected.norm().clamp_min(torch.finfo(torch.float64).tiny))


def fp32_gate(ufm: UFM, label: str, point, dirs, candidates, device: str) -> dict:
    """Each fp32 HVP of direction 0 (and every direction of the batched call) against a
    float64 torch.func HVP of the same direction, block by block."""
    point64 = tuple(t.to(torch.float64) for t in point)
    v64 = tuple(t.to(torch.float64) for t in one(dirs, 0))
    expected = torch_func_hvp(ufm, point64)(v64)
    expected_rest = None
    worst = {}
    for name, fn in candidates.items():
        if name == "ncfast batched":
            out = fn(dirs)
            if expected_rest is None:
                expected_rest = [torch_func_hvp(ufm, point64)(
                    tuple(t.to(torch.float64) for t in one(dirs, i)))
                    for i in range(1, dirs[0].shape[0])]
            pairs = [(one(out, 0), expected)] + [
                (one(out, i), e) for i, e in enumerate(expected_rest, start=1)]
        else:
            pairs = [(fn(one(dirs, 0)), expected)]
        err = max(rel_err(a, e) for actual, exp in pairs for a, e in zip(actual, exp))
        worst[name] = err
        if not err <= GATE:
            raise harness.CorrectnessError(
                f"correctness gate failed for {name} HVP (fp32, {label}, K={ufm.K} d={ufm.d} "
                f"N={ufm.N}, {device}): relative Frobenius error {err:.3g} > {GATE:g} against "
                f"the float64 torch.func HVP")
    return {"check": f"fp32, K={ufm.K} d={ufm.d} N={ufm.N}, {label}, vs float64 torch.func",
            **{name: f"{e:.1e}" for name, e in worst.items()}}


# ---------------------------------------------------------------------------------- bench

def bench_case(K: int, d: int, n: int, label: str, alpha: float, M: float, device: str,
               m: int, min_run_time: float) -> tuple[dict, dict]:
    ufm = make_ufm(K, d, n, alpha, M)
    point, dirs = make_point(ufm, torch.float32, device, m)
    v = one(dirs, 0)
    operator = ncfast_operator(ufm, point)
    single = {
        "ncfast": operator,
        "ncfast hvp": ncfast_hvp(ufm, point),
        "torch.func": torch_func_hvp(ufm, point),
        "double backward": double_backward_hvp(ufm, point),
    }
    batched = operator  # the same operator, a batch of m directions per call
    gate = fp32_gate(ufm, label, point, dirs, {**single, "ncfast batched": batched}, device)

    times = {name: harness.median_time(lambda fn=fn: fn(v), device, min_run_time)
             for name, fn in single.items()}
    times["ncfast batched"] = harness.median_time(lambda: batched(dirs), device,
                                                  min_run_time) / m
    times["floor"] = harness.median_time(floor_products(ufm, point, v), device, min_run_time)
    return {"case": label, "K": K, "d": d, "N": ufm.N, "m": m, **times}, gate


def format_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        for mode, key in (("hvp_operator, 1 direction per call", "ncfast"),
                          ("hvp, 1 direction per call (G recomputed)", "ncfast hvp"),
                          (f"hvp_operator, {r['m']} directions per call", "ncfast batched")):
            t = r[key]
            rows.append({
                "case": r["case"], "K": r["K"], "d": r["d"], "N": r["N"], "ncfast call": mode,
                "ncfast": harness.fmt_time(t),
                "torch.func": harness.fmt_time(r["torch.func"]),
                "double bwd": harness.fmt_time(r["double backward"]),
                "floor (6 mm)": harness.fmt_time(r["floor"]),
                "vs torch.func": harness.fmt_ratio(r["torch.func"] / t),
                "vs double bwd": harness.fmt_ratio(r["double backward"] / t),
                "x floor": harness.fmt_ratio(t / r["floor"]),
            })
    return rows


GATE_COLUMNS = ["ncfast", "ncfast hvp", "ncfast batched", "torch.func", "double backward"]
COLUMNS = ["case", "K", "d", "N", "ncfast call", "ncfast", "torch.func", "double bwd",
           "floor (6 mm)", "vs torch.func", "vs double bwd", "x floor"]

CAPTION = (
    "Median time per fp32 Hessian-vector product of the UFM objective at one fixed point "
    f"(`UFM.random_init(scale={POINT_SCALE:g})`, N(0,1) directions), λ_W = λ_H = {LAMBDA_W:g}, "
    "bias=\"unpenalized\". **ncfast**, closed form (theory.md 3.3), three ways: "
    "`op = ufm.hvp_operator(params)` built once at the point (G = Ω⊙R/N computed there, not "
    "timed), then `op(direction)` per HVP, as Lanczos makes them; `ufm.hvp(params, direction)`, "
    "which recomputes G (one more K x d x N product, W H, and a weighting pass) on every call; "
    "and `op` given a batch of m directions per call, its time divided by m. "
    "**torch.func**: `jvp(grad(f), (W, H, b), (A, B, c))` per direction. **double bwd**: the "
    "gradient with `create_graph=True` once at the point (not timed), then per direction "
    "`autograd.grad(g, params, grad_outputs=v, retain_graph=True)`. **floor (6 mm)**: exactly "
    "six `torch.mm` of the HVP's products (H^T A^T, B^T W^T, dG H^T, G B^T, W^T dG, A^T G) "
    "on operands of the same shapes, in the layouts ncfast uses; no elementwise work. **vs ...**: baseline time / ncfast time. "
    "**x floor**: ncfast time / floor time."
)


def main(argv=None) -> None:
    parser = harness.base_parser("python -m bench.hvp", __doc__.splitlines()[0])
    args = harness.parse_args(parser, argv)
    device = args.device
    if args.dtypes and args.dtypes != [torch.float32]:
        parser.error("bench.hvp measures fp32 HVPs only (--dtypes fp32)")
    if args.shapes:
        if any(len(s) != 3 or s[2] % s[0] for s in args.shapes):
            parser.error("bench.hvp: --shapes takes KxdxN with N a multiple of K, "
                         "e.g. 100x256x10000")
        shapes = [(K, d, N // K) for K, d, N in args.shapes]
    else:
        shapes = [(QUICK_SHAPES if args.quick else SHAPES)[device]]
    m = BATCH[device]

    env = harness.environment(device, {
        "settings": f"min_run_time={args.min_run_time:g} s per measurement, seed={SEED}, "
                    f"batch m={m}, gate: float64 vs dense Hessian on K,d,n={SMALL}; fp32 "
                    f"relative Frobenius error per block <= {GATE:g} vs float64 torch.func"})
    others = harness.OtherCpuUse()
    gate_rows = small_float64_check(device)
    print("done: float64 check", file=sys.stderr, flush=True)
    results = []
    for K, d, n in shapes:
        for label, alpha, M in CASES:
            r, g = bench_case(K, d, n, label, alpha, M, device, m, args.min_run_time)
            results.append(r)
            gate_rows.append(g)
            print(f"done: K={K} d={d} N={K * n} {label}", file=sys.stderr, flush=True)

    harness.close_environment(env, others)
    sections = [
        harness.markdown_table(format_rows(results), COLUMNS, CAPTION),
        harness.markdown_table(
            gate_rows, ["check"] + GATE_COLUMNS,
            caption="Correctness gate, passed before any timing: worst relative error (2-norm) "
                    "of each HVP; float64 rows against the dense `torch.func.hessian` of the "
                    "flattened objective times the direction (3 directions, also "
                    "`harness.check_close` at the float64 tolerance), fp32 rows per block "
                    "(W, H, b) against a float64 torch.func HVP on the benchmark instance."),
    ]
    harness.emit(harness.render_results("ncfast UFM Hessian-vector-product benchmark", env,
                                        sections), args.out)


if __name__ == "__main__":
    main()
