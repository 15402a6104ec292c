"""The package around the kernels: build information, `python -m ncfast.info`, import hygiene,
the load-failure message."""

import subprocess
import sys
import textwrap

import torch

import ncfast
from ncfast import info


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_build_info_describes_this_build():
    b = ncfast.build_info()
    assert b["torch_version"] == torch.__version__
    assert set(b) == {"torch_version", "cuda", "cuda_arch_list", "compiler", "cuda_compiler"}
    assert b["cuda"] == (b["cuda_compiler"] is not None) == (b["cuda_arch_list"] != "")


def test_every_op_has_a_cpu_kernel_and_cuda_kernels_match_the_build():
    table = info.kernel_table()
    assert {"rescaled_mse", "rescaled_mse_backward", "class_moments", "nc4_mismatches",
            "linear_rescaled_mse"} <= set(table)
    for op, keys in table.items():
        assert keys["fake"], op
        if keys["any"]:  # composite: built from ATen ops, no device kernels of its own
            assert not keys["CPU"] and not keys["CUDA"], op
        else:
            assert keys["CPU"], op
            assert keys["CUDA"] == ncfast.build_info()["cuda"], op


def test_info_command_prints_versions_kernels_and_gpu():
    out = subprocess.run([sys.executable, "-m", "ncfast.info"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert f"torch {torch.__version__}" in out
    for op in info.ops():
        assert f"\n{op} " in out
    assert ("GPU visible: yes" in out) == torch.cuda.is_available()


def test_import_needs_no_gpu_and_no_training_extras():
    r = _python("""
        import sys
        import ncfast
        heavy = {"torchvision", "matplotlib", "sklearn", "yaml", "scipy", "torchmetrics",
                 "lightning", "pytorch_lightning", "tensorboard", "curvlinops"}
        heavy &= set(sys.modules)
        print(sorted(heavy))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_failed_extension_load_names_both_torch_versions():
    # Make `ncfast._C` unloadable, as a build for another torch would be.
    r = _python("""
        import importlib.abc, sys
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ncfast._C":
                    raise ImportError("undefined symbol: _ZN3c10 (simulated)")
        sys.meta_path.insert(0, Broken())
        import ncfast
    """)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ncfast._C failed to load")
    assert f"built for torch {ncfast.build_info()['torch_version']}" in last
    assert f"the torch found is {torch.__version__}" in last
    assert "simulated" in last
