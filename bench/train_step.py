"""Training-step benchmark: flux-nemo (TE spec) against diffusers' FluxTransformer2DModel, in one process.

Ours: the ``te`` spec, bf16 parameters, Megatron DDP with the distributed optimizer (fp32 master weights and
Adam state, fp32 gradient reduction), global grad-norm clip 1.0, FP8 recipes through Megatron's FP8 context per
block. Peer: diffusers, bf16 parameters, fused torch AdamW, eager and torch.compile.

    python bench/train_step.py --double 2 --single 4 --mbs 16 --precision bf16 fp8_delayed --peer eager

Prints ms/step (median), samples/s, model TFLOP/s per GPU (0.3574 TFLOP per block per sample at 256 + 256
tokens, MLPerf accounting) and peak memory, then a table with the ratio to the first peer row.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peer_diffusers import build_peer, peer_batch, peer_step  # noqa: E402

TFLOP_PER_BLOCK = 0.3574  # per sample, fwd + bwd, 256 image + 256 text tokens
FP8_RECIPES = {"fp8_delayed": ("hybrid", "delayed"), "fp8_current": ("e4m3", "tensorwise"),
               "fp8_block": ("e4m3", "blockwise")}  # fmt: skip


def time_steps(step, steps: int, warmup: int) -> list[float]:
    """Per-step milliseconds from CUDA events, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def build_ours(args, precision: str):
    """Our model, wrapped in Megatron DDP + distributed optimizer exactly as the GPU training path does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.fp8_utils import get_fp8_context
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from flux_nemo.model import FluxConfig, build_flux

    fp8, recipe = FP8_RECIPES.get(precision, (None, "delayed"))
    config = FluxConfig.from_flavor(
        "schnell", num_double_blocks=args.double, num_single_blocks=args.single,
        params_dtype=torch.bfloat16, bf16=True, fp8=fp8, fp8_recipe=recipe,
        use_cpu_initialization=False, gradient_accumulation_fusion=args.grad_acc_fusion,
    )  # fmt: skip
    compiled = {}

    def run_block(block, *inputs):
        if args.compile_blocks:  # fuse the eager elementwise work between TE kernels
            block = compiled.setdefault(id(block), torch.compile(block))
        with get_fp8_context(config) if fp8 else nullcontext():
            return block(*inputs)

    model = build_flux(config, backend="te", block_runner=run_block)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, overlap_param_gather=True,
        use_distributed_optimizer=True, bucket_size=40_000_000,
    )  # fmt: skip
    model = DistributedDataParallel(config, ddp_config, model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        clip_grad=1.0, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True,
    )  # fmt: skip
    optimizer = get_megatron_optimizer(opt_config, [model], config_overrides={})  # wd on every parameter
    return model, optimizer


def our_batch(batch: int, device):
    b = peer_batch(batch, device)
    return (
        b["hidden_states"], b["encoder_hidden_states"], b["pooled_projections"], b["timestep"],
        b["img_ids"][None], b["txt_ids"][None], b["target"],
    )  # fmt: skip


def our_step(model, optimizer, batch):
    img, txt, y, t, img_ids, txt_ids, target = batch
    model.zero_grad_buffer()
    optimizer.zero_grad()
    pred = model(img, txt, y, t, img_ids, txt_ids)
    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    loss.backward()
    model.finish_grad_sync()
    optimizer.step()
    return loss.detach()


def measure(name, step, args, blocks: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, args.steps, args.warmup)
    ms = statistics.median(times)
    sps = args.mbs / (ms / 1e3)
    row = {
        "name": name, "ms_per_step": round(ms, 2), "spread_ms": round(max(times) - min(times), 2),
        "samples_per_s": round(sps, 1), "model_tflops": round(sps * TFLOP_PER_BLOCK * blocks, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--mbs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", *FP8_RECIPES])
    parser.add_argument("--peer", nargs="*", default=["eager"], choices=["eager", "compile"])
    parser.add_argument("--grad-acc-fusion", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile-blocks", action="store_true", help="torch.compile each block")
    parser.add_argument("--json", type=Path, help="write all rows here")
    args = parser.parse_args()

    from flux_nemo.shims import initialize_megatron

    os.environ.setdefault("NVTE_FLASH_ATTN", "0")  # TE picks cuDNN fused attention on Hopper
    torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward fails on the host (gpu-host README)
    initialize_megatron()
    device = torch.device("cuda")
    blocks = args.double + args.single
    print(f"# {torch.cuda.get_device_name()}  blocks {args.double}+{args.single}  mbs {args.mbs}", flush=True)
    rows = []
    for mode in args.peer:
        model, fwd, opt = build_peer(args.double, args.single, device, compile_model=mode == "compile")
        batch = peer_batch(args.mbs, device)
        rows.append(measure(f"diffusers {mode}", functools.partial(peer_step, fwd, opt, batch), args, blocks))
        model = fwd = opt = batch = None
        torch.cuda.empty_cache()
    for precision in args.precision:
        try:
            model, opt = build_ours(args, precision)
            batch = our_batch(args.mbs, device)
            rows.append(
                measure(
                    f"flux-nemo {precision}", functools.partial(our_step, model, opt, batch), args, blocks
                )
            )
        except Exception:  # report every precision, even when one recipe fails on this card
            traceback.print_exc()
        model = opt = batch = None
        torch.cuda.empty_cache()

    base = rows[0]["ms_per_step"]
    print(f"\n{'step':<24}{'ms':>9}{'samples/s':>11}{'TFLOP/s':>9}{'GiB':>7}{'x peer':>8}")
    for r in rows:
        print(f"{r['name']:<24}{r['ms_per_step']:>9}{r['samples_per_s']:>11}{r['model_tflops']:>9}"
              f"{r['peak_mem_gib']:>7}{base / r['ms_per_step']:>8.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
