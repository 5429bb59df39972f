"""GPU kernel time by kind (GEMMs, attention, FP8 casts, compiled elementwise, Adam, ...) per step.

Used by ``bench/train_step.py --profile N`` after its kernel table, and on its own over a Chrome trace that
``--trace`` wrote: ``python bench/kernel_kinds.py TRACE.json --steps 2``. The kinds are read from kernel names
(cuBLAS ``nvjet``/``gemm``, cuDNN attention, Transformer Engine casts, Triton kernels from torch.compile, ...); the
first matching rule wins, and anything unmatched is ``other``. Element-wise adds, copies and fills are split out
because they are what fusions remove.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Iterable

# (kind, pattern) in priority order; matched against the kernel name, case-insensitive.
RULES: list[tuple[str, str]] = [
    ("nccl", r"nccl"),
    ("attention", r"sdpa|flash|fmha|fused_attn|cudnn"),
    ("gemm", r"nvjet|gemm|cutlass|sm90_xmma|cublaslt"),  # cublasLt: split-K reduce, bias-gradient epilogue
    ("fp8 cast/amax", r"cast_transpose|quantize|amax|fp8|scale_inv"),
    ("compiled (triton)", r"^triton_"),
    ("adam/multi-tensor", r"multi_tensor|adam"),
    ("gelu", r"gelu"),
    ("concat", r"catarray|cat_"),
    ("add", r"cudafunctor_add|add_kernel"),
    ("copy", r"direct_copy|copy_kernel"),
    ("fill", r"fillfunctor|memset"),
    ("reduction", r"reduce"),
]
_COMPILED = [(kind, re.compile(pattern, re.IGNORECASE)) for kind, pattern in RULES]


def kind(name: str) -> str:
    """The kind of a kernel, from its name."""
    for label, pattern in _COMPILED:
        if pattern.search(name):
            return label
    return "other"


def by_kind(kernels: Iterable[tuple[str, float]], steps: int) -> list[tuple[str, float, int]]:
    """``(kind, ms per step, kernels per step)`` for ``(name, duration_us)`` pairs over ``steps`` steps, largest
    first."""
    time, count = defaultdict(float), defaultdict(int)
    for name, duration_us in kernels:
        label = kind(name)
        time[label] += duration_us
        count[label] += 1
    rows = [(label, time[label] / 1000 / steps, round(count[label] / steps)) for label in time]
    return sorted(rows, key=lambda row: -row[1])


def table(rows: list[tuple[str, float, int]]) -> str:
    total = sum(ms for _, ms, _ in rows)
    lines = ["| kind | ms per step | kernels per step |", "|---|---|---|"]
    lines += [f"| {label} | {ms:.2f} | {n} |" for label, ms, n in rows]
    lines.append(f"| total | {total:.2f} | {sum(n for _, _, n in rows)} |")
    return "\n".join(lines)


def from_profiler(prof) -> list[tuple[str, float]]:
    """``(name, duration_us)`` of every CUDA kernel in a torch profiler capture."""
    from torch.autograd import DeviceType

    return [
        (e.name, e.time_range.elapsed_us())
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith("Memcpy")
    ]


def from_chrome_trace(path: str) -> list[tuple[str, float]]:
    """``(name, duration_us)`` of every kernel (``cat == "kernel"``) in a Chrome trace from ``--trace``."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(e["name"], float(e["dur"])) for e in events if e.get("cat") == "kernel"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trace", help="Chrome trace written by bench/train_step.py --trace")
    parser.add_argument("--steps", type=int, required=True, help="steps the trace covers (--profile N)")
    args = parser.parse_args()
    print(table(by_kind(from_chrome_trace(args.trace), args.steps)))


if __name__ == "__main__":
    main()
