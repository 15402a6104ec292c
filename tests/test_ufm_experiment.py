"""The `ncfast ufm` landscape experiment (ncfast/ufm_experiment.py), at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ncfast import ufm, ufm_experiment

TINY = dict(K=4, d=6, n=3, lambda_W=1e-2, lambda_H=2e-2, steps=2500, seed=0,
            alphas=(1, 5), Ms=(1, 3), quiet=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ufm") / "run"
    res = ufm_experiment.run(out, **TINY)
    return out, res


def test_json_keys(tiny_run):
    out, res = tiny_run
    data = json.loads((out / "results.json").read_text())
    for key in ("config", "gradient_descent", "critical_points", "curvature", "notes",
                "summary", "elapsed_s"):
        assert key in data
    gd = data["gradient_descent"]
    for key in ("step", "f_minus_fstar", "nc1_trace", "nc2_classifier", "nc3_gram"):
        assert len(gd["path"][key]) == len(gd["path"]["step"]) > 2
    assert "certificate" in gd["final"]
    assert data["curvature"]["method"].startswith("lambda_par")
    assert len(data["curvature"]["cases"]) == 4  # (1,1), (1,3), (5,1), (5,3): all case A/D
    # saddles s = 0 (zero point), 1, 2 for K = 4
    assert [c["s"] for c in data["critical_points"]] == [0, 1, 2]


def test_gd_reaches_closed_form(tiny_run):
    _, res = tiny_run
    final = res["gradient_descent"]["final"]
    assert abs(final["f_minus_fstar"]) < 1e-9
    assert final["nc1_trace"] < 1e-8
    assert final["certificate"]["certified_rtol_1e-4"]
    assert res["gradient_descent"]["path"]["f_minus_fstar"][0] > 1e-2  # it did move


def test_lanczos_lambda_min_matches_closed_form(tiny_run):
    _, res = tiny_run
    zp = res["critical_points"][0]
    assert zp["point"] == "zero point"
    expected = ufm.mu_minus(1 / (4 * 3**0.5), 1e-2, 2e-2)
    assert zp["lambda_min_closed_form"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(-0.1294241439, abs=1e-9)  # theory.md 7.3
    assert zp["rel_diff"] < 1e-6
    assert zp["lambda_min_lanczos"] == pytest.approx(expected, rel=1e-6)
    for sad in res["critical_points"][1:]:
        assert sad["grad_norm"] < 1e-12
        assert sad["lambda_min_lanczos"] == pytest.approx(expected, rel=1e-6)


def test_curvature_matches_theory_table():
    # theory.md 4.8: K = 4, d = 6, n = 3, lambda_W = lambda_H = 1e-2
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = ufm_experiment.run(tmp + "/r", K=4, d=6, n=3, lambda_W=1e-2, lambda_H=1e-2,
                                 steps=1, alphas=(1, 5), Ms=(1, 10), quiet=True)
    table = {(1, 1): (0.14434, 1.1355, 0.00881), (5, 1): (0.57135, 2.7326, 0.00876),
             (1, 10): (1.44338, 2.8868, 0.00410)}
    got = {(c["alpha"], c["M"]): c for c in res["curvature"]["cases"]}
    for key, (lpar, lmax, lminp) in table.items():
        c = got[key]
        assert c["lambda_par_closed_form"] == pytest.approx(lpar, abs=1e-5)
        assert c["lambda_max_lanczos"] == pytest.approx(lmax, abs=1e-4)
        assert c["lambda_min_pos_lanczos"] == pytest.approx(lminp, abs=1e-5)
        assert c["lambda_par_rel_dist_to_ritz"] < 1e-8
        assert c["lambda_min_lanczos"] > -1e-10  # PSD at the optimum


def test_skips_uncovered_cases(tmp_path):
    # d = 2 < K-1 = 3: rescaled (F) has no closed form; plain (F) is covered but 4.7 needs d >= K
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "curvature.png").write_bytes(b"an earlier run's plot")
    res = ufm_experiment.run(tmp_path / "r", K=4, d=2, n=3, steps=1, alphas=(1, 5), Ms=(1,),
                             quiet=True, overwrite=True)
    assert res["curvature"]["cases"] == [] and res["files"]["plot"] is None
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["results.json"]
    reasons = [s["reason"] for s in res["curvature"]["skipped"]]
    assert len(reasons) == 2 and any("no closed form" in r for r in reasons)
    assert any("skipped" in note for note in res["notes"])


def test_png_written(tiny_run):
    out, _ = tiny_run
    png = out / "curvature.png"
    data = png.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    keep = out / "results.json"
    keep.write_text("precious")
    with pytest.raises(SystemExit) as exc:
        ufm_experiment.main(["--out", str(out), "--steps", "1"])
    msg = str(exc.value.code)
    assert "not empty" in msg and "--overwrite" in msg and str(out) in msg
    assert keep.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    with pytest.raises(FileExistsError):
        ufm_experiment.run(out, steps=1, quiet=True)
    assert keep.read_text() == "precious"


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "ncfast", "ufm", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--out" in r.stdout and "--overwrite" in r.stdout and "--alphas" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ncfast", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert "ufm" in r.stdout
