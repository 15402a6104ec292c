"""`python -m ncfast.info`: versions, how ncfast was built, which ops have which kernels."""

from __future__ import annotations

import platform
import sys

import torch

import ncfast

OPS = ("rescaled_mse", "rescaled_mse_backward")
KERNEL_KEYS = ("CPU", "CUDA")


def kernel_table() -> dict[str, dict[str, bool]]:
    """{op: {"CPU": bool, "CUDA": bool}}: which dispatch keys have a registered kernel."""
    return {
        op: {key: torch._C._dispatch_has_kernel_for_dispatch_key(f"ncfast::{op}", key)
             for key in KERNEL_KEYS}
        for op in OPS
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
        f"{'op':<24}" + "".join(f"{k:>6}" for k in KERNEL_KEYS),
    ]
    for op, keys in kernel_table().items():
        lines.append(f"{op:<24}" + "".join(f"{'yes' if v else 'no':>6}" for v in keys.values()))
    lines.append("")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"GPU visible: yes ({', '.join(names)})")
    else:
        lines.append("GPU visible: no")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
