"""The fused QKV split + QK RMSNorm + RoPE op (``model.qk_norm_rope_fusion``) against formulations of the same math,
each through ``torch.compile``, forward + backward, on one GPU; with the bandwidth bound of the bytes it must move.

Why: in the thirteenth session's H100 trace the op's kernels ran at about a third of the memory bandwidth (single
block, micro-batch 16: 178 µs forward, where reading and writing q and k would take ~67 µs at the H100's nominal
3.35 TB/s, computed, not measured; ~11 ms per 4-micro-batch step at 2 + 4 blocks). The variants differ only in how the RoPE pair rotation is written:

* ``stack`` (the model's, ``embeddings.rotate_interleaved``): ``stack((-x[1::2], x[0::2]), -1).flatten(-2)``;
* ``pairs``: the last dim viewed as ``[hn / 2, 2]``, each output pair from the pair's two values and one cos/sin;
* ``flip``: ``(x.unflatten(-1, (hn / 2, 2)).flip(-1) * [-1, 1]).flatten(-2)``.

Usage: ``python3 bench/qk_norm_rope.py [--tokens 512 --batch 16 --heads 24 --head-dim 128 --iters 50]``. Prints a
table: ms forward, ms forward + backward, and the largest difference from ``stack``'s outputs and gradients.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_nemo.model.fusions import qkv_norm_rope, rms_norm  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def _pairs(t, cos, sin):
    x = t.float().unflatten(-1, (-1, 2))  # [..., hn/2, 2]
    c, s = cos[..., 0::2, None], sin[..., 0::2, None]  # one angle per pair
    x0, x1 = x[..., :1], x[..., 1:]
    return torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).to(t.dtype)


def _flip(t, cos, sin):
    x = t.float()
    sign = torch.tensor([-1.0, 1.0], device=t.device)
    rotated = (x.unflatten(-1, (-1, 2)).flip(-1) * sign).flatten(-2)
    return (x * cos + rotated * sin).to(t.dtype)


def _variant(rotate):
    def op(mixed, bias, q_weight, k_weight, cos, sin):
        mixed = mixed + bias.view(mixed.shape[-2:])
        q, k, v = mixed.chunk(3, dim=-1)
        return (
            rotate(rms_norm(q, q_weight, EPS), cos, sin),
            rotate(rms_norm(k, k_weight, EPS), cos, sin),
            v.contiguous(),
        )

    return op


VARIANTS = {
    "stack": lambda mixed, bias, qw, kw, cos, sin: qkv_norm_rope(mixed, bias, qw, kw, cos, sin, EPS),
    "pairs": _variant(_pairs),
    "flip": _variant(_flip),
}


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    dev, s, b, h, d = "cuda", args.tokens, args.batch, args.heads, args.head_dim
    gen = torch.Generator(dev).manual_seed(0)
    mixed = torch.randn(s, b, h, 3 * d, device=dev, generator=gen).bfloat16().requires_grad_()
    bias = torch.randn(h * 3 * d, device=dev, generator=gen).bfloat16().requires_grad_()
    q_weight, k_weight = (
        torch.rand(d, device=dev, generator=gen).bfloat16().requires_grad_() for _ in range(2)
    )
    angles = torch.rand(s, 1, 1, d // 2, device=dev, generator=gen, dtype=torch.float64).repeat_interleave(
        2, -1
    )
    cos, sin = angles.cos().float(), angles.sin().float()
    probes = [torch.randn(s, b, h, d, device=dev, generator=gen).bfloat16() for _ in range(3)]
    inputs = (mixed, bias, q_weight, k_weight)
    # Bytes the op must move: read q, k, v (and write them) forward; read dq, dk, dv and q, k, write dmixed backward.
    elem = s * b * h * d * 2
    bound_fwd, bound_both = 6 * elem, 6 * elem + 8 * elem
    print(f"# {torch.cuda.get_device_name()}, [s {s}, b {b}, heads {h}, head dim {d}], bf16")
    rows, reference = [], None
    for name, fn in VARIANTS.items():
        op = torch.compile(fn, fullgraph=True)

        def forward(op=op):
            with torch.no_grad():
                return op(*inputs, cos, sin)

        def both(op=op):
            outs = op(*inputs, cos, sin)
            torch.autograd.backward(outs, probes)

        fwd, total = time_ms(forward, args.iters), time_ms(both, args.iters)
        for t in inputs:
            t.grad = None
        outs = op(*inputs, cos, sin)
        torch.autograd.backward(outs, probes)
        result = [o.detach().float() for o in outs] + [t.grad.float() for t in inputs]
        if reference is None:
            reference = result
        diff = max((r - x).abs().max().item() for r, x in zip(reference, result, strict=True))
        for t in inputs:
            t.grad = None
        rows.append((name, fwd, total, diff))
    bw = 3.35e12  # H100 SXM nominal; the bound columns are for comparison only
    print(
        f"bandwidth bound at 3.35 TB/s: forward {bound_fwd / bw * 1e3:.3f} ms, both {bound_both / bw * 1e3:.3f} ms"
    )
    print("| variant | forward ms | forward + backward ms | max diff vs stack |")
    print("|---|---|---|---|")
    for name, fwd, total, diff in rows:
        print(f"| {name} | {fwd:.3f} | {total:.3f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
