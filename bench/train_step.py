"""Training-step benchmark: flux-nemo (TE spec) against diffusers' FluxTransformer2DModel, in one process.

Ours: built by the training path from the recipe's Hydra config (``te`` spec, bf16 compute, Megatron DDP with the
distributed optimizer: fp32 master weights and Adam state, fp32 gradient reduction, clip 1.0; FP8 and block
recompute through the training block runner). Peer: diffusers, bf16 parameters, fused torch AdamW, eager and
torch.compile (one GPU only). With ``--micro-batches N`` both accumulate N micro-batches per optimizer step (as a
GPU does at the MLPerf batch: GBS 512 on 8 GPUs is 4 micro-batches of 16 per GPU), so the optimizer's share of
the step shrinks for both.

    python bench/train_step.py --double 2 --single 4 --mbs 16 --precision bf16 bf16+fused fp8_delayed+fused \
        --peer eager compile
    torchrun --nproc_per_node 4 bench/train_step.py --double 19 --single 38 --mbs 4 --tp 2 --recompute block
    python bench/train_step.py --precision bf16 --cuda-graph   # the recipe's parallel.cuda_graph=full_iteration

A ``--precision`` entry is a precision (``conf/precision``) with optional ``+`` options: ``fused``
(``model.modulation_fusion=true``), ``paopt`` (``precision.precision_aware_optimizer=true``), ``qkrope``
(``model.qk_norm_rope_fusion=true``), ``bf16grad`` (bf16 gradient buffers and reduction, as ``--grad-reduce-bf16``
for one entry; with ``paopt`` Adam reads them directly), ``bf16adam`` (``precision.adam_moments_dtype=bf16``, needs
``paopt``), ``remainders`` (``precision.store_param_remainders=true``, needs ``paopt``), ``blockgroups``
(``parallel.optimizer_groups_per_block=true``: one Adam param group per block), ``permbmod``
(``train.modulations_once_per_step=false``: the adaLN modulations in every micro-batch's forward).

Prints ms/step (median), samples/s, model TFLOP/s per GPU (0.3574 TFLOP per block per sample at 256 + 256
tokens, MLPerf accounting) and peak memory, then a table with the ratio to the first peer row. ``--profile N``
profiles N more steps of each row: the top kernels, the kernel time by kind (``bench/kernel_kinds.py``), then the
GPU's idle time per step and its longest idle intervals (``bench/gpu_idle.py``); ``--trace PATH`` also writes each
row's Chrome trace.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import statistics
import sys
import traceback
from pathlib import Path

import torch
from torch.profiler import record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_idle, kernel_kinds  # noqa: E402
from bench.options import OPTIONS  # noqa: E402
from bench.peer_diffusers import build_peer, peer_batch, peer_step  # noqa: E402

TFLOP_PER_BLOCK = 0.3574  # per sample, fwd + bwd, 256 image + 256 text tokens
RANK = int(os.environ.get("RANK", "0"))
PRECISIONS = ("bf16", "fp8_delayed", "fp8_current", "fp8_block")  # conf/precision/*.yaml


def variant(text: str) -> str:
    """Validate a ``--precision`` entry ``precision[+option...]``."""
    precision, *options = text.split("+")
    if precision not in PRECISIONS or any(o not in OPTIONS for o in options):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected one of {PRECISIONS} with +options from {list(OPTIONS)}"
        )
    return text


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


def compose_config(args, entry: str, *extra: str):
    """The recipe's own Hydra config (conf/), with this benchmark's depth, precision and parallel layout (and
    ``extra`` overrides)."""
    from hydra import compose, initialize_config_dir

    import flux_nemo.training.config  # noqa: F401  (registers the typed schema)

    precision, *options = entry.split("+")
    overrides = [
        "model=schnell", f"model.num_double_blocks={args.double}", f"model.num_single_blocks={args.single}",
        "model.backend=te", f"precision={precision}", f"parallel.recompute={args.recompute}",
        f"parallel.tensor_model_parallel_size={args.tp}",
        f"train.micro_batch_size={args.mbs}", f"parallel.sequence_parallel={args.sp}",
    ]  # fmt: skip
    if args.grad_reduce_bf16:  # every entry, as its +bf16grad option would
        overrides += OPTIONS["bf16grad"]
    if args.bucket_size:
        overrides.append(f"parallel.bucket_size={args.bucket_size}")
    overrides += [o for option in options for o in OPTIONS[option]] + list(extra)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("flux_schnell", overrides=overrides)


def build_ours(args, precision: str):
    """Our network exactly as the training path builds it: ``build_model`` (block runner for FP8 / recompute),
    Megatron DDP + distributed optimizer (``wrap_megatron_ddp``) and the MLPerf AdamW (fp32 master weights)."""
    from flux_nemo.training.model_builder import build_model, compute_dtype
    from flux_nemo.training.optim import build_megatron_optimizer, megatron_optimizer_config
    from flux_nemo.training.strategy import wrap_megatron_ddp

    cfg = compose_config(args, precision)
    model = wrap_megatron_ddp(build_model(cfg, torch.device("cuda")), cfg)
    opt_config = megatron_optimizer_config(
        1e-4, compute_dtype(cfg), cfg.parallel.use_distributed_optimizer,
        precision_aware=cfg.precision.precision_aware_optimizer,
        moments_dtype=cfg.precision.adam_moments_dtype,
        param_remainders=cfg.precision.store_param_remainders,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )  # fmt: skip
    optimizer = build_megatron_optimizer(
        [model], opt_config, per_block_groups=cfg.parallel.optimizer_groups_per_block
    )
    return model, optimizer, cfg.train.modulations_once_per_step


BATCH_KEYS = ("img", "txt", "y", "t", "img_ids", "txt_ids", "target")


def our_batch(batch: int, device):
    b = peer_batch(batch, device)
    return (
        b["hidden_states"], b["encoder_hidden_states"], b["pooled_projections"], b["timestep"],
        b["img_ids"][None], b["txt_ids"][None], b["target"],
    )  # fmt: skip


def forward_backward(model, batch, micro_batches: int, once_per_step: bool = True):
    """Zero the gradients, accumulate ``micro_batches`` micro-batches (reduction on the last one only) as the
    training step does (``flux_nemo.training.micro_batches.accumulate``: the adaLN modulations once for all of
    them, unless ``once_per_step`` is off), finalize the gradients (data- and tensor-parallel reductions); returns
    the mean loss."""
    from megatron.core.distributed import finalize_model_grads

    from flux_nemo.flow_matching import ModelInputs
    from flux_nemo.training.micro_batches import accumulate

    def loss_fn(x, conditioning):
        pred = model(x.img, x.txt, x.y, x.timesteps, x.img_ids, x.txt_ids, conditioning=conditioning)
        return torch.nn.functional.mse_loss(pred.float(), x.target.float())

    model.zero_grad_buffer()
    inputs = [ModelInputs(*batch)] * micro_batches  # the same samples in every micro-batch
    total = accumulate(
        model,
        inputs,
        loss_fn,
        grad_sync=lambda last: contextlib.nullcontext() if last else model.no_sync(),
        once_per_step=once_per_step,
    )
    finalize_model_grads([model])
    return total / micro_batches


def graphed_forward_backward(model, micro_batches: int, once_per_step: bool = True):
    """:func:`forward_backward` as the recipe's ``parallel.cuda_graph=full_iteration`` runs it: a
    ``GraphedStep`` (2 eager calls, then captured once and replayed) on the current (side) stream."""
    from flux_nemo.training import cuda_graph

    graphed = cuda_graph.GraphedStep(
        lambda static: forward_backward(
            model, tuple(static[k] for k in BATCH_KEYS), micro_batches, once_per_step
        ),
        name="benchmark step",
        warmup=2,
        stream=torch.cuda.current_stream(),
        before_capture=lambda: cuda_graph.rearm_param_gather(model),
    )
    return lambda batch: graphed(dict(zip(BATCH_KEYS, batch, strict=True)))


def our_step(model, optimizer, batch, fwd_bwd):
    """One optimizer step: ``fwd_bwd(batch)`` (eager or graphed), then the optimizer (clip + AdamW)."""
    from flux_nemo.training.block_runner import refresh_fp8_weights

    with record_function("refresh_fp8_weights + zero_grad"):
        refresh_fp8_weights(model)  # the training step does this too: FP8 weights are re-quantized every step
        optimizer.zero_grad()
    with record_function("forward_backward"):
        loss = fwd_bwd(batch)
    with record_function("optimizer.step"):
        optimizer.step()
    return loss


def release_memory() -> None:
    """Free the last row's model before the next. Without a collection, later rows started with earlier rows'
    memory still allocated ("built" 12.2, then 19.7, then 27.0 GiB for the same model, H100, 2026-11-27); the
    suspect is reference cycles (modules <-> Megatron DDP's gradient hooks) that only the cyclic collector frees.
    Not yet confirmed on a GPU."""
    gc.collect()
    torch.cuda.empty_cache()


def gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 2)


def measure(name, step, args, blocks: int) -> dict:
    """Median step time; samples/s and TFLOP/s are per GPU (a micro-batch is shared by ``--tp`` GPUs).

    Memory (this rank): ``built_gib`` allocated before the first step (parameters, gradient buffer, fp32 master
    shard), ``state_gib`` after the steps (plus the Adam moments), ``peak_gib`` the peak over the steps.
    """
    built = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, args.steps, args.warmup)
    ms = statistics.median(times)
    sps = args.mbs * args.micro_batches / args.tp / (ms / 1e3)
    row = {
        "name": name, "ms_per_step": round(ms, 2), "spread_ms": round(max(times) - min(times), 2),
        "samples_per_s": round(sps, 1), "model_tflops": round(sps * TFLOP_PER_BLOCK * blocks, 1),
        "built_gib": gib(built), "state_gib": gib(torch.cuda.memory_allocated()),
        "peak_mem_gib": gib(torch.cuda.max_memory_allocated()),
    }  # fmt: skip
    if RANK == 0:
        print(json.dumps(row), flush=True)
    if args.profile:
        profile(
            name,
            step,
            args.profile,
            args.trace
            and args.trace.with_name(f"{args.trace.stem}-{re.sub('[^A-Za-z0-9._-]', '_', name)}.json"),
        )
    return row


def profile(name: str, step, steps: int, trace: Path | None = None) -> None:
    """Top GPU kernels (and NCCL) over ``steps`` more steps, by total CUDA time, from the torch profiler; then the
    GPU's idle time and its longest idle intervals (``bench/gpu_idle.py``); the Chrome trace to ``trace``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=activities, with_stack=trace is not None) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    if RANK == 0:
        print(f"# profile of {name}, {steps} steps (times are totals over them)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
        print(f"# kernel time by kind ({name})")
        print(kernel_kinds.table(kernel_kinds.by_kind(kernel_kinds.from_profiler(prof), steps)))
        gpu_idle.report(prof, steps)
        if trace:
            prof.export_chrome_trace(str(trace))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--mbs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["bf16"],
        type=variant,
        help="precision[+option...], options: " + " ".join(OPTIONS),
    )
    parser.add_argument("--peer", nargs="*", default=["eager"], choices=["eager", "compile"])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under torchrun)")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "block"])
    parser.add_argument(
        "--micro-batches", type=int, default=1, help="micro-batches per optimizer step (ours and the peer's)"
    )
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (with --tp > 1)")
    parser.add_argument("--grad-reduce-bf16", action="store_true", help="reduce gradients in bf16, not fp32")
    parser.add_argument("--bucket-size", type=int, help="Megatron DDP bucket size (elements)")
    parser.add_argument(
        "--memory-cap-gib", type=float, help="cap this process's GPU memory (emulate an 80 GB card on H200)"
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture zero-grad + forward/backward + grad sync in a CUDA graph",
    )
    parser.add_argument("--profile", type=int, default=0, help="after timing, profile this many steps")
    parser.add_argument(
        "--trace",
        type=Path,
        help="with --profile: Chrome traces with Python stacks, one per row, named after this (the stacks slow the "
        "host, so host-bound idle intervals look longer than without --trace)",
    )
    parser.add_argument("--json", type=Path, help="write all rows here")
    args = parser.parse_args()
    if args.cuda_graph and args.warmup < 3:  # else the capture itself lands among the timed steps
        parser.error("--cuda-graph needs --warmup >= 3 (2 eager calls, then the capture on the third)")

    from flux_nemo.shims import initialize_megatron

    os.environ.setdefault("NVTE_FLASH_ATTN", "0")  # TE picks cuDNN fused attention on Hopper
    torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward fails on the host (gpu-host README)
    initialize_megatron(tensor_model_parallel_size=args.tp)
    if args.cuda_graph:  # as the recipe does before building the model (flux_nemo.training.cuda_graph)
        from flux_nemo.training import cuda_graph

        for entry in args.precision:  # the recipe's own check of what graphs support
            try:
                cuda_graph.validate(compose_config(args, entry, "parallel.cuda_graph=full_iteration"))
            except ValueError as err:
                parser.error(f"--cuda-graph with --precision {entry}: {err}")
        cuda_graph.use_side_stream()
        cuda_graph.use_graph_safe_rng(1234)
    world = torch.distributed.get_world_size()
    device = torch.device("cuda")
    if args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    blocks = args.double + args.single
    if RANK == 0:
        print(f"# {torch.cuda.get_device_name()} x{world}  blocks {args.double}+{args.single}  mbs {args.mbs}"
              f"  tp {args.tp}  sp {args.sp}  recompute {args.recompute}  micro-batches {args.micro_batches}"
              f"  grad reduce {'bf16' if args.grad_reduce_bf16 else 'fp32'}  memory cap {args.memory_cap_gib}",
              flush=True)  # fmt: skip
    rows = []
    for mode in args.peer if world == 1 else []:
        model, fwd, opt = build_peer(args.double, args.single, device, compile_model=mode == "compile")
        batch = peer_batch(args.mbs, device)
        step = functools.partial(peer_step, fwd, opt, batch, args.micro_batches)
        rows.append(measure(f"diffusers {mode}", step, args, blocks))
        model = fwd = opt = batch = step = None
        release_memory()
    for precision in args.precision:
        try:
            model, opt, once = build_ours(args, precision)
            fwd_bwd = (
                graphed_forward_backward(model, args.micro_batches, once)
                if args.cuda_graph
                else functools.partial(
                    forward_backward, model, micro_batches=args.micro_batches, once_per_step=once
                )
            )
            if RANK == 0:
                print(f"# {precision}: built, {gib(torch.cuda.memory_allocated())} GiB allocated", flush=True)
            batch = our_batch(args.mbs, device)
            rows.append(
                measure(
                    f"flux-nemo {precision}",
                    functools.partial(our_step, model, opt, batch, fwd_bwd),
                    args,
                    blocks,
                )
            )
        except Exception:  # report every precision, even when one recipe fails on this card
            traceback.print_exc()
            print(f"# rank {RANK} {precision} failed with {gib(torch.cuda.memory_allocated())} GiB allocated, "
                  f"{gib(torch.cuda.memory_reserved())} GiB reserved", flush=True)  # fmt: skip
        model = opt = batch = fwd_bwd = None
        release_memory()

    if RANK != 0 or not rows:
        return
    base = rows[0]["ms_per_step"]
    print(
        f"\n{'step':<24}{'ms':>9}{'samples/s':>11}{'TFLOP/s':>9}{'built':>7}{'state':>7}{'peak':>7}{'x peer':>8}"
    )
    for r in rows:
        print(f"{r['name']:<24}{r['ms_per_step']:>9}{r['samples_per_s']:>11}{r['model_tflops']:>9}"
              f"{r['built_gib']:>7}{r['state_gib']:>7}{r['peak_mem_gib']:>7}{base / r['ms_per_step']:>8.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
