"""The UFM landscape experiment (`ncfast ufm`, theory.md 4.2-4.7, 7.3-7.5), in float64 on a CPU:

1. gradient descent from a random init: f - f*, NC1 (trace), NC2 (classifier), NC3 (gram) along
   the path, and the global-optimality certificate (theory.md 4.3) at the end;
2. the zero point and the saddles Z_S (plain MSE, theory.md 4.5-4.6): lambda_min of the Hessian
   by Lanczos on the analytic HVP against the closed form mu_-(1/(K sqrt n));
3. a sweep over alpha and M (rescaled MSE): the Hessian at the NC optimum (theory.md 4.7),
   lambda_max and the smallest nonzero eigenvalue by Lanczos, lambda_par and lambda_perp in
   closed form; writes results.json and curvature.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import ufm as U
from .hessian import lanczos

_F64 = torch.float64


def _clean(x):
    """JSON-safe: NaN/inf -> None, tensors -> lists, recursively."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _flat_hvp(model: U.UFM, point):
    """The analytic HVP of theory.md 3.3 at ``point`` as a map on flat vectors."""

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return model.flatten(*model.hvp(point, model.unflatten(v)))

    hvp.dtype, hvp.device = _F64, torch.device("cpu")
    return hvp


def _grad_norm(model: U.UFM, W, H, b) -> float:
    return math.sqrt(sum(float((g**2).sum()) for g in model.grad(W, H, b) if g is not None))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {str(out_dir)!r} exists and is not empty; pass --overwrite "
            f"(overwrite=True) to write into it anyway, or choose another --out"
        )


def _gd_part(model, steps, lr, record_every, gen, log):
    gm = U.global_minimizer(model)
    res = U.gradient_descent(model, steps=steps, lr=lr, record_every=record_every,
                             record_metrics=True, generator=gen)
    gap = [f - gm.f_star for f in res.objective]
    cert = U.certificate(model, res.W, res.H, res.b, rtol=1e-4)
    final = {
        "f": res.f, "f_minus_fstar": gap[-1],
        **{k: v[-1] for k, v in res.metrics.items()},
        "certificate": {"sigma_max_G": cert.sigma_max, "threshold_sqrt_lWlH": cert.threshold,
                        "certified_rtol_1e-4": cert.certified, "grad_norm": cert.grad_norm},
    }
    log(f"[1] gradient descent, lr {lr:g}, {steps} steps, random N(0, 0.1^2) init; closed form: "
        f"case {gm.regime}, f* = {gm.f_star:.10g}")
    log(f"    {'step':>6}  {'f - f*':>10}  {'NC1_tr':>10}  {'NC2_W':>10}  {'NC3_gram':>10}")
    n_rec = len(res.steps)
    show = sorted({0, n_rec - 1} | {round(i * (n_rec - 1) / 6) for i in range(7)})
    for i in show:
        m = {k: v[i] for k, v in res.metrics.items()}
        log(f"    {res.steps[i]:>6}  {gap[i]:>10.3e}  {m['nc1_trace']:>10.3e}  "
            f"{m['nc2_classifier']:>10.3e}  {m['nc3_gram']:>10.3e}")
    log(f"    certificate at the end: sigma_max(G) = {cert.sigma_max:.8g} vs sqrt(lW lH) = "
        f"{cert.threshold:.8g} -> {'certified' if cert.certified else 'NOT certified'} "
        f"(rtol 1e-4), |grad f| = {cert.grad_norm:.2e}")
    return {
        "lr": lr, "steps": steps, "init": "N(0, 0.1^2) i.i.d.", "regime": gm.regime,
        "f_star": gm.f_star,
        "path": {"step": res.steps, "f": res.objective, "f_minus_fstar": gap, **res.metrics},
        "final": final,
    }


def _critical_part(model, lanczos_iter, seed, log, notes):
    out = []
    K, d = model.K, model.d
    P = model.num_params
    points = [("zero point", 0, U.zero_point(model))]
    if K * model.c < 1:
        for s in range(1, K - 1):
            if s > d:
                notes.append(f"saddle s={s} skipped: needs d >= s (d={d})")
                continue
            points.append(("saddle Z_S", s, U.saddle(model, s)))
    else:
        notes.append(f"saddles Z_S skipped: theory.md 4.5 needs Kc < 1, got Kc = "
                     f"{K * model.c:.4g} (the zero point is then the global minimiser)")
    log(f"[2] critical points, plain MSE: lambda_min by Lanczos ({min(P, lanczos_iter)} steps, "
        f"analytic HVP) vs closed form mu_-(1/(K sqrt n))")
    log(f"    {'point':<11} {'s':>2}  {'f':>10}  {'|grad f|':>8}  {'lambda_min Lanczos':>19}  "
        f"{'closed form':>14}  {'rel diff':>8}  {'4.4 dir. curv. (pred.)':>24}")
    for name, s, pt in points:
        W, H, b = pt.W, pt.H, pt.b
        cf = pt.lambda_min if isinstance(pt, U.ZeroPoint) else pt.negative_eigenvalue
        gen = torch.Generator().manual_seed(seed + 1000 + s)
        lr_ = lanczos(_flat_hvp(model, (W, H, b)), P, 1, which="smallest",
                      num_iter=min(P, lanczos_iter), generator=gen)
        lam = float(lr_.eigenvalues[0])
        rel = abs(lam - cf) / abs(cf)
        rec = {"point": name, "s": s, "f_closed_form": pt.f,
               "f": float(model.objective(W, H, b)), "grad_norm": _grad_norm(model, W, H, b),
               "lambda_min_lanczos": lam, "lanczos_residual": float(lr_.residuals[0]),
               "lambda_min_closed_form": cf, "rel_diff": rel,
               "negative_multiplicity_closed_form":
                   (K - 1 - s) * (d - s) if s else d * (K - 1)}
        try:
            nc = U.negative_curvature_direction(model, W, H, b)
            rec["direction_4_4"] = {"curvature": nc.curvature, "predicted": nc.predicted,
                                    "rayleigh_quotient": nc.curvature / nc.norm_sq}
            dir_txt = f"{nc.curvature:.6f} ({nc.predicted:.6f})"
        except ValueError as e:
            rec["direction_4_4"] = None
            notes.append(f"{name} s={s}: no 4.4 direction ({e})")
            dir_txt = "n/a"
        out.append(rec)
        log(f"    {name:<11} {s:>2}  {rec['f']:>10.6f}  {rec['grad_norm']:>8.1e}  {lam:>19.12f}  "
            f"{cf:>14.10f}  {rel:>8.1e}  {dir_txt:>24}")
    return out


def _curvature_part(K, d, n, lambda_W, lambda_H, alphas, Ms, lanczos_iter, seed, log, notes):
    cases, skipped = [], []
    log("[3] Hessian at the NC optimum, rescaled MSE, unpenalised bias (theory.md 4.7): "
        "lambda_par, lambda_perp closed form; lambda_max, lambda_min^+ Lanczos")
    log(f"    {'alpha':>6} {'M':>6}  {'case':<4} {'x*':>8}  {'lambda_par':>10}  "
        f"{'lambda_perp':>11}  {'lambda_max':>10}  {'lambda_min^+':>12}  {'kappa':>8}  "
        f"{'par/perp in Ritz':>16}")
    for alpha in alphas:
        for M in Ms:
            model = U.UFM(K, d, n, lambda_W, lambda_H, alpha=float(alpha), M=float(M))
            tag = f"alpha={alpha:g}, M={M:g}"
            try:
                gm = U.global_minimizer(model)
            except NotImplementedError as e:
                skipped.append({"alpha": alpha, "M": M, "reason": str(e)})
                log(f"    note: {tag} skipped: no closed-form minimiser ({e})")
                continue
            if gm.regime.endswith("(zero)"):
                reason = (f"case {gm.regime}: x* <= 0, the minimiser is W = H = 0 and there is "
                          f"no NC optimum (theory.md 4.7 does not apply)")
                skipped.append({"alpha": alpha, "M": M, "reason": reason})
                log(f"    note: {tag} skipped: {reason}")
                continue
            if d < K:
                reason = f"theory.md 4.7 needs d >= K, got d={d} < K={K}"
                skipped.append({"alpha": alpha, "M": M, "reason": reason})
                log(f"    note: {tag} skipped: {reason}")
                continue
            P = model.num_params
            m = min(P, lanczos_iter)
            point = (gm.W, gm.H, gm.b)
            gen = torch.Generator().manual_seed(seed + 2000)
            res = lanczos(_flat_hvp(model, point), P, m, which="smallest", num_iter=m,
                          generator=gen)
            theta = res.eigenvalues
            lam_max = float(theta.max())
            zero_tol = 1e-8 * max(abs(lam_max), 1.0)
            pos = theta[theta > zero_tol]
            lam_min_pos = float(pos.min()) if pos.numel() else math.nan
            i_pos = int((theta == lam_min_pos).nonzero()[0]) if pos.numel() else None
            i_max = int(theta.argmax())
            N = model.N
            x = M - model.c * (K - 1 + alpha) / alpha
            rho = math.sqrt(n * lambda_H / lambda_W) * x
            lam_par = rho / N * (1 + (alpha - 1) * (K - 1) / K) + lambda_H
            lam_perp = rho / N + lambda_H
            s2 = math.sqrt(lambda_W / (n * lambda_H)) * x * (K - 1) / K
            par_seen = float((theta - lam_par).abs().min()) / lam_par
            perp_seen = float((theta - lam_perp).abs().min()) / lam_perp
            case = {
                "alpha": alpha, "M": M, "regime": gm.regime, "f_star": gm.f_star,
                "grad_norm_at_optimum": _grad_norm(model, *point),
                "x_star": x, "rho": rho,
                "lambda_par_closed_form": lam_par, "lambda_perp_closed_form": lam_perp,
                "lambda_par_minus_lambda_H": lam_par - lambda_H,
                "lambda_perp_minus_lambda_H": lam_perp - lambda_H,
                "s_star_sq": s2, "angular_curvature": s2 * lam_perp,
                "lambda_max_lanczos": lam_max, "lambda_min_pos_lanczos": lam_min_pos,
                "kappa_lanczos": lam_max / lam_min_pos if pos.numel() else math.nan,
                "lambda_min_lanczos": float(theta.min()),
                "zero_tol": zero_tol,
                "residual_lambda_max": float(res.residuals[i_max]),
                "residual_lambda_min_pos":
                    float(res.residuals[i_pos]) if i_pos is not None else math.nan,
                "lanczos_steps": res.num_iter, "lanczos_breakdown": res.breakdown,
                "lambda_par_rel_dist_to_ritz": par_seen, "lambda_perp_rel_dist_to_ritz": perp_seen,
                "zero_multiplicity_closed_form": (K - 1) * (2 * d - K) // 2,
            }
            cases.append(case)
            seen = "yes" if max(par_seen, perp_seen) < 1e-8 else f"{max(par_seen, perp_seen):.0e}"
            log(f"    {alpha:>6g} {M:>6g}  {gm.regime:<4} {x:>8.4f}  {lam_par:>10.6f}  "
                f"{lam_perp:>11.6f}  {lam_max:>10.6f}  {lam_min_pos:>12.6f}  "
                f"{case['kappa_lanczos']:>8.1f}  {seen:>16}")
    notes.extend(f"curvature sweep: alpha={s['alpha']:g}, M={s['M']:g} skipped: {s['reason']}"
                 for s in skipped)
    return cases, skipped


def _plot(path: Path, cases, alphas, Ms, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (xkey, groups, gkey) in zip(axes, (("alpha", Ms, "M"), ("M", alphas, "alpha"))):
        for j, g in enumerate(groups):
            sel = sorted((c for c in cases if c[gkey] == g), key=lambda c: c[xkey])
            if not sel:
                continue
            xs = [c[xkey] for c in sel]
            col = colors[j % len(colors)]
            ax.plot(xs, [c["lambda_par_closed_form"] for c in sel], "o-", color=col,
                    label=f"λ_par, {gkey}={g:g}")
            ax.plot(xs, [c["lambda_perp_closed_form"] for c in sel], "s--", color=col,
                    label=f"λ_perp, {gkey}={g:g}")
            ax.plot(xs, [c["lambda_max_lanczos"] for c in sel], "^:", color=col,
                    label=f"λ_max (Lanczos), {gkey}={g:g}")
            ax.plot(xs, [c["lambda_min_pos_lanczos"] for c in sel], "v-.", color=col, alpha=0.6,
                    label=f"λ_min^+ (Lanczos), {gkey}={g:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xkey)
        ax.set_ylabel("Hessian eigenvalue at the NC optimum")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    out_dir: str | Path = "runs/ufm",
    K: int = 4,
    d: int = 7,
    n: int = 3,
    lambda_W: float = 1e-2,
    lambda_H: float = 2e-2,
    steps: int = 5000,
    seed: int = 0,
    alphas: tuple[float, ...] = (1, 5, 15),
    Ms: tuple[float, ...] = (1, 3, 10),
    lr: float = 0.5,
    record_every: int = 50,
    lanczos_iter: int = 400,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict:
    """Run the three parts, write ``results.json`` and ``curvature.png`` into ``out_dir`` and
    return the results. Raises FileExistsError when ``out_dir`` is a non-empty directory and
    ``overwrite`` is False (with ``overwrite`` the two files are replaced; nothing else there is
    touched). Plain MSE with an unpenalised bias for parts 1-2; float64 on the CPU."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    lines: list[str] = []

    def log(s: str) -> None:
        lines.append(s)
        if not quiet:
            print(s, flush=True)

    notes: list[str] = []
    model = U.UFM(K, d, n, lambda_W, lambda_H)
    gen = torch.Generator().manual_seed(seed)
    log(f"ncfast ufm: K={K} d={d} n={n} (N={model.N}), lambda_W={lambda_W:g}, "
        f"lambda_H={lambda_H:g}, Kc={K * model.c:.4g}, {model.num_params} parameters, float64")
    gd = _gd_part(model, steps, lr, record_every, gen, log)
    crit = _critical_part(model, lanczos_iter, seed, log, notes)
    cases, skipped = _curvature_part(K, d, n, lambda_W, lambda_H, tuple(alphas), tuple(Ms),
                                     lanczos_iter, seed, log, notes)
    method = (
        "lambda_par, lambda_perp (and x*, rho, s*^2, angular curvature s*^2 lambda_perp): closed "
        "form of theory.md 4.7. lambda_max, lambda_min_pos (smallest Ritz value > zero_tol = "
        "1e-8 max(lambda_max, 1)) and lambda_min (PSD check): Lanczos with full "
        "reorthogonalisation on the analytic HVP (theory.md 3.3) at the closed-form minimiser "
        "of ncfast.ufm.global_minimizer, num_iter = min(num_params, lanczos_iter); the run "
        "stops at breakdown (lanczos_steps), by which point every distinct eigenvalue seen "
        "from the start vector is found to rounding (residuals reported); multiplicities are "
        "not available from one start vector. lambda_par/perp_rel_dist_to_ritz: relative "
        "distance from the closed form to the nearest Ritz value (a cross-check)."
    )
    out.mkdir(parents=True, exist_ok=True)
    png = out / "curvature.png"
    if cases:
        _plot(png, cases, tuple(alphas), tuple(Ms),
              f"UFM K={K}, d={d}, n={n}, λ_W={lambda_W:g}, λ_H={lambda_H:g}: Hessian at the NC "
              f"optimum vs α and M (lines: closed form λ_par/λ_perp; Lanczos λ_max/λ_min^+)")
    else:
        png.unlink(missing_ok=True)  # under --overwrite: a plot of another run's sweep
        notes.append("no case of the sweep is covered: curvature.png not written")
    elapsed = time.perf_counter() - t0
    results = {
        "config": {"K": K, "d": d, "n": n, "N": model.N, "lambda_W": lambda_W,
                   "lambda_H": lambda_H, "lambda_b": 0.0, "bias": "unpenalized",
                   "c": model.c, "Kc": K * model.c, "num_params": model.num_params,
                   "steps": steps, "lr": lr, "seed": seed, "alphas": list(alphas),
                   "Ms": list(Ms), "lanczos_iter": lanczos_iter, "dtype": "float64",
                   "convention": "paper (theory.md 3.1)"},
        "gradient_descent": gd,
        "critical_points": crit,
        "curvature": {"method": method, "cases": cases, "skipped": skipped},
        "notes": notes,
        "files": {"results": "results.json",
                  "plot": "curvature.png" if cases else None},
        "elapsed_s": elapsed,
    }
    for note in notes:
        log(f"note: {note}")
    log(f"wrote {out / 'results.json'}" + (f" and {png}" if cases else "")
        + f" in {elapsed:.1f} s")
    results["summary"] = lines
    with open(out / "results.json", "w") as fh:
        json.dump(_clean(results), fh, indent=1)
    return results


def _floats(s: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ncfast ufm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ufm", help="output directory (default: runs/ufm)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty output directory (replaces results.json and "
                        "curvature.png)")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--d", type=int, default=7)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--lambda-W", type=float, default=1e-2)
    p.add_argument("--lambda-H", type=float, default=2e-2)
    p.add_argument("--steps", type=int, default=5000, help="gradient-descent steps")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alphas", type=_floats, default=(1.0, 5.0, 15.0),
                   help="comma-separated alpha values (default 1,5,15)")
    p.add_argument("--Ms", type=_floats, default=(1.0, 3.0, 10.0),
                   help="comma-separated M values (default 1,3,10)")
    p.add_argument("--lanczos-iter", type=int, default=400)
    a = p.parse_args(argv)
    try:
        run(a.out, K=a.K, d=a.d, n=a.n, lambda_W=a.lambda_W, lambda_H=a.lambda_H,
            steps=a.steps, seed=a.seed, alphas=a.alphas, Ms=a.Ms, lr=a.lr,
            lanczos_iter=a.lanczos_iter, overwrite=a.overwrite)
    except FileExistsError as e:
        sys.exit(f"ncfast ufm: error: {e}")
    except ValueError as e:
        sys.exit(f"ncfast ufm: error: {e}")


if __name__ == "__main__":
    main()
