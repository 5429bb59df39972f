"""Selective recompute on one GPU: activation memory and forward + backward time per recompute option.

The model alone (no optimizer, no DDP): Flux blocks at full width (schnell: hidden 3072, 24 heads, MLP 12288) in
bf16, ``--double`` / ``--single`` blocks, micro-batch ``--mbs`` at 256 image + 256 text tokens (the MLPerf shapes).
Each option builds the model with ``FluxConfig(recompute_granularity="selective", recompute_modules=...)`` (what
``parallel.recompute=selective`` sets), ``block`` wraps every block in torch's checkpoint as the training block
runner does. Per option: the memory still allocated after the forward (the activations kept for backward, output
included), the peak of forward + backward, both above parameters and gradients, and the median time of
forward + backward.

    python bench/recompute_memory.py --double 2 --single 4 --mbs 8 [--backend te] [--fused] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_nemo.flow_matching import image_ids, text_ids  # noqa: E402
from flux_nemo.model import FluxConfig, build_flux  # noqa: E402

ALL = ("core_attn", "mlp", "layernorm")
OPTIONS = {
    "none": None,
    "core_attn": ["core_attn"],
    "mlp": ["mlp"],
    "layernorm": ["layernorm"],
    "mlp+layernorm": ["mlp", "layernorm"],
    "core_attn+mlp+layernorm": list(ALL),
    "block": "block",
}


def block_checkpoint(block, *args):
    """What ``parallel.recompute=block`` does (``flux_nemo.training.block_runner``)."""
    if block.training:
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def build(option, args) -> torch.nn.Module:
    fields = dict(
        num_double_blocks=args.double,
        num_single_blocks=args.single,
        params_dtype=torch.bfloat16,
        bf16=True,
        modulation_fusion=args.fused,
    )
    if isinstance(option, list):
        fields.update(recompute_granularity="selective", recompute_modules=option)
    torch.manual_seed(0)
    model = build_flux(
        FluxConfig.from_flavor("schnell", **fields),
        backend=args.backend,
        block_runner=block_checkpoint if option == "block" else None,
    )
    with torch.no_grad():  # non-zero gates and final layer, so that every block matters
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.train()


def inputs(config: FluxConfig, mbs: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(1)
    kw = dict(generator=gen, device=device, dtype=torch.bfloat16)
    return dict(
        img=torch.randn(mbs, 256, config.in_channels, **kw),
        txt=torch.randn(mbs, 256, config.context_in_dim, **kw),
        y=torch.randn(mbs, config.vec_in_dim, **kw),
        timesteps=torch.rand(mbs, **kw),
        img_ids=image_ids(1, 16, 16, device),
        txt_ids=text_ids(1, 256, device),
    )


def measure(model: torch.nn.Module, batch: dict, steps: int, warmup: int) -> dict:
    def step():
        model(**batch).float().square().mean().backward()

    for _ in range(warmup):  # also allocates the gradients, kept (zeroed) from here on
        step()
        model.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = model(**batch)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    model.zero_grad(set_to_none=False)
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        model.zero_grad(set_to_none=False)
    return dict(kept=kept, peak=peak, ms=statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--mbs", type=int, default=8)
    parser.add_argument("--backend", default="local", choices=["local", "te"])
    parser.add_argument("--fused", action="store_true", help="model.modulation_fusion=true")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    device = torch.device("cuda")
    rows = {}
    for name in args.options:
        model = build(OPTIONS[name], args).to(device)
        rows[name] = measure(model, inputs(model.config, args.mbs, device), args.steps, args.warmup)
        print(name, rows[name], flush=True)
        del model
        torch.cuda.empty_cache()
    gib = 2**30
    print(
        f"\n{torch.cuda.get_device_name()}, {args.backend} spec, fused={args.fused}, {args.double} double + "
        f"{args.single} single blocks at hidden 3072, micro-batch {args.mbs}, 256 + 256 tokens, bf16"
    )
    print(
        f"{'option':<24} {'kept GiB':>9} {'peak GiB':>9} {'ms fwd+bwd':>11} {'kept/none':>10} {'time/none':>10}"
    )
    ref = rows.get("none") or next(iter(rows.values()))
    for name, r in rows.items():
        print(
            f"{name:<24} {r['kept'] / gib:9.2f} {r['peak'] / gib:9.2f} {r['ms']:11.1f} "
            f"{r['kept'] / ref['kept']:10.1%} {r['ms'] / ref['ms']:10.1%}"
        )


if __name__ == "__main__":
    main()
