"""`ncfast info` (or `python -m ncfast.info`): versions, how ncfast was built, which kernels
each ncfast op has."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import ncfast

# Column: dispatch key. "any" is a composite kernel (built from ATen ops: runs on every device);
# "fake" is the meta implementation torch.compile and opcheck trace with.
KERNEL_KEYS = {"CPU": "CPU", "CUDA": "CUDA", "any": "CompositeExplicitAutograd",
               "fake": "Meta", "autograd": "Autograd"}


def ops() -> list[str]:
    """Every op registered in the ncfast namespace (torch.ops.ncfast.*), sorted."""
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("ncfast::"))


def kernel_table() -> dict[str, dict[str, bool]]:
    """{op: {column: bool}}: which dispatch keys (KERNEL_KEYS) have a kernel for each op."""
    return {
        op: {column: torch._C._dispatch_has_kernel_for_dispatch_key(f"ncfast::{op}", key)
             for column, key in KERNEL_KEYS.items()}
        for op in ops()
    }


def report() -> str:
    info = ncfast.build_info()
    lines = [
        f"ncfast {ncfast.__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"built against torch {info['torch_version']} with {info['compiler']}",
        f"CUDA kernels: {'compiled' if info['cuda'] else 'not compiled'}"
        + (f" ({info['cuda_compiler']}, arch list {info['cuda_arch_list']})" if info["cuda"] else ""),
        "",
        f"{'op':<30}" + "".join(f"{k:>10}" for k in KERNEL_KEYS),
    ]
    for op, keys in kernel_table().items():
        lines.append(f"{op:<30}" + "".join(f"{'yes' if v else 'no':>10}" for v in keys.values()))
    lines.append("")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPU visible: yes ({', '.join(names)})")
    else:
        lines.append("GPU visible: no")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="ncfast info",
        description="Print the versions of Python, torch and ncfast, how the extension was "
                    "built, which kernels each ncfast op has (CPU, CUDA, any device, fake, "
                    "autograd) and whether a GPU is visible.").parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
