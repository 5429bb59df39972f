"""Selective recompute under context, tensor and sequence parallelism (and CP x TP x SP): ranks that recompute the
core attention (with its context-parallel key/value gather), the MLPs and the LayerNorm + modulate ops reproduce
the single-rank output, gradients and AdamW step computed without recompute (CPU, gloo, local spec, float64)."""

import pytest
import torch
from test_parallel import WORLD_SIZE, reference_run, run_ranks

SELECTIVE = dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp", "layernorm"])


@pytest.mark.parametrize("mode", list(WORLD_SIZE))
def test_ranks_with_selective_recompute_match_one_without(megatron_world, tmp_path, mode):
    data = reference_run("local", torch.float64, "cpu", mode)
    data["config"] = data["config"] | SELECTIVE  # the ranks' FluxConfig; the reference ran without recompute
    data.update(tol_out=1e-10, tol_grad=1e-10, tol_step=1e-10)
    run_ranks(data, tmp_path)
