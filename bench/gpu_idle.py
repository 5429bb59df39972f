"""Where the GPU waits: the intervals with no kernel running in a torch profiler capture, and what the host was
doing in each (``bench/train_step.py --profile N``)."""

from __future__ import annotations

from torch.autograd import DeviceType


def busy_intervals(kernels: list[tuple[float, float, str]]) -> list[tuple[float, float, str, str]]:
    """Merge ``(start_us, end_us, name)`` kernel intervals (any stream) into busy spans ``(start, end, first kernel,
    last kernel)``, in time order."""
    spans: list[list] = []
    for start, end, name in sorted(kernels):
        if spans and start <= spans[-1][1]:
            if end > spans[-1][1]:
                spans[-1][1], spans[-1][3] = end, name
        else:
            spans.append([start, end, name, name])
    return [tuple(s) for s in spans]


def gaps(spans: list[tuple[float, float, str, str]], min_us: float) -> list[tuple[float, float, str, str]]:
    """``(start, length_us, kernel before, kernel after)`` of each idle interval of at least ``min_us``."""
    return [
        (a[1], b[0] - a[1], a[3], b[2])
        for a, b in zip(spans, spans[1:], strict=False)
        if b[0] - a[1] >= min_us
    ]


def _host_op(cpu_ops: list, start: float, end: float) -> str:
    """The shortest host op spanning the whole gap (what the host ran while the GPU waited)."""
    covering = [e for e in cpu_ops if e.time_range.start <= start and e.time_range.end >= end]
    return min(covering, key=lambda e: e.time_range.elapsed_us()).name if covering else "-"


def report(prof, steps: int, top: int = 15, min_us: float = 20.0) -> None:
    """Print the GPU's busy and idle time per step over the profiled ``steps``, and the longest idle intervals."""
    events = prof.events()
    kernels = [
        (e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA
    ]
    if not kernels:
        print("# no kernels recorded")
        return
    spans = busy_intervals(kernels)
    total = spans[-1][1] - spans[0][0]
    busy = sum(end - start for start, end, *_ in spans)
    idle = gaps(spans, min_us)
    print(f"# GPU per step: span {total / steps / 1e3:.2f} ms, busy {busy / steps / 1e3:.2f} ms, idle "
          f"{(total - busy) / steps / 1e3:.2f} ms ({len(idle) / steps:.0f} gaps >= {min_us:.0f} us per step, "
          f"{sum(g[1] for g in idle) / steps / 1e3:.2f} ms); {len(kernels) / steps:.0f} kernels per step")  # fmt: skip
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    print("# longest idle intervals (us from the first kernel): length, kernel before -> after, host op")
    for start, length, before, after in sorted(idle, key=lambda g: -g[1])[:top]:
        host = _host_op(cpu_ops, start, start + length)
        print(f"{start - spans[0][0]:>10.0f} {length:>8.0f}  {before[:50]} -> {after[:50]}  [{host[:60]}]")
