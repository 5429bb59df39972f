"""parallel.cuda_graph=full_iteration trains like the eager step (GPU): same per-step losses, evaluation losses and
final weights from the same seed, with both graphs captured and replayed."""

import math
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tiny_run import compose_cfg, train_losses

from flux_nemo.training.block_runner import delayed_scaling_states
from flux_nemo.training.checkpoint import unwrap
from flux_nemo.training.run import prepare

pytestmark = pytest.mark.gpu


GPU = ["system=h100_1x8", "system.devices=1"]
# Relative difference allowed between the graphed and the eager run when the eager run is deterministic. Local
# spec: the replay is bitwise equal (1e-6 is a floor). TE spec, H100, 2026-11-27: steps 1-3 bitwise equal, then up
# to 1.1e-6 relative from step 4 on, with or without evaluations in between, from TE's cuDNN fused attention in
# capture mode (with NVTE_FUSED_ATTN=0 the graphed run is bitwise equal): 1e-5, still 10x below what a wrong graph
# does to the losses. FP8 current and block scaling (H200, 2026-11-28) pass the same loss bound; delayed scaling
# must also reproduce the eager run's amax-history updates and scales (_check_delayed_scaling).
REL_FLOOR = {"local": 1e-6, "te": 1e-5}
# TE's cuDNN fused attention (the default) makes the te weights drift under capture: see the xfail below. Run this
# file again with NVTE_FUSED_ATTN=0 and the te cases must match eager without that allowance.
FUSED_ATTENTION = os.environ.get("NVTE_FUSED_ATTN", "1") != "0"
# FP8 delayed scaling: the scales follow the amaxes, which follow the graphed weights' drift from eager (the xfail
# below): 6.0% at most over the 28 scale tensors of the tiny model (H200, 2026-11-29). A missing or frozen backward
# update leaves the backward scales at 1.0 where eager's reach ~3e11. Without the fused attention graphed = eager.
DELAYED_SCALE_REL = 0.25 if FUSED_ATTENTION else 1e-6
FUSED = (
    "model.modulation_fusion=true",
    "model.qk_norm_rope_fusion=true",
)  # torch.compile'd kernels in the graph
CASES = [  # (backend, precision, extra overrides), with the test id
    pytest.param("local", "bf16", (), id="local-bf16"),
    pytest.param("local", "bf16", FUSED, id="local-bf16-fused"),
    pytest.param("te", "bf16", (), id="te-bf16"),
    pytest.param("te", "fp8_delayed", (), id="te-fp8_delayed"),
    pytest.param("te", "fp8_current", (), id="te-fp8_current"),
    pytest.param("te", "fp8_block", (), id="te-fp8_block"),
    # The default warmup: both graphs are captured on synthetic batches, the evaluation graph with the FP8 weight
    # cast off; evaluations must still see the weights of the last update (their first batch casts them eagerly).
    pytest.param("te", "fp8_current", ("train.synthetic_warmup_steps=2",), id="te-fp8_current-warmup2"),
]


def _train(name, tiny_data, tmp_path, *extra, callbacks=()):
    """The tiny run (6 steps, evaluations after steps 3 and 6, one synthetic warmup step unless ``extra`` sets
    another), with ``callbacks`` first in the trainer's list: losses, evals, weights."""
    cfg = compose_cfg(
        *GPU,
        *tiny_data,
        *extra,
        f"mlperf.log_file={tmp_path}/{name}.txt",
        f"exp_manager.exp_dir={tmp_path}/{name}",
    )
    run = prepare(cfg)
    run.trainer.callbacks[:0] = list(callbacks)
    result = run.fit()
    weights = {
        k: v.detach().float().cpu()
        for k, v in unwrap(run.module.flux).state_dict().items()
        if torch.is_tensor(v) and not k.endswith("_extra_state")
    }
    # Copied now: TE's global amax buffers keep this run's modules, so later runs in the process roll their histories.
    weights.update(_delayed_scaling_state(run.module))
    return run.module, train_losses(cfg.mlperf.log_file), [value for _, value in result.evals], weights


def _delayed_scaling_state(module) -> dict[str, torch.Tensor]:
    """FP8 delayed scaling's scales and amax histories of every TE module (``...#scale``, ``...#amax_history``);
    empty for the other recipes, whose quantizers keep no state across steps."""
    state = {}
    for name, recipe_state in delayed_scaling_states(unwrap(module.flux)):
        state[f"{name}#scale"] = recipe_state.scale.detach().float().cpu()
        state[f"{name}#amax_history"] = recipe_state.amax_history.detach().float().cpu()
    return state


def _check_delayed_scaling(eager_w: dict, graphed_w: dict) -> None:
    """Each replay must run delayed scaling's amax reduction and scale update as the eager step does: every
    history roll leaves its mark in the amax history (its zero / non-zero pattern is the update count per tensor,
    which a graph without the updates, or with them once per capture, would not reproduce), and the scales move
    off their initial 1.0 to the eager run's values (:data:`DELAYED_SCALE_REL`)."""
    keys = [k for k in eager_w if "#" in k]
    assert keys, "no delayed-scaling state found in the TE modules"
    for k in keys:
        if k.endswith("#amax_history"):
            assert torch.equal(graphed_w[k] != 0, eager_w[k] != 0), f"{k}: update pattern differs from eager"
    scales = [k for k in keys if k.endswith("#scale")]
    assert any((eager_w[k] != 1).any() for k in scales), "eager scales never left 1.0: nothing to compare"
    worst = max(((graphed_w[k] - eager_w[k]).abs() / eager_w[k].abs()).max().item() for k in scales)
    print(f"delayed scaling: {len(scales)} scale tensors, worst relative difference to eager {worst:.3e}")
    assert worst <= DELAYED_SCALE_REL, f"graphed FP8 scales differ from eager by {worst:.1%}"


def _excess(diff: float, bound: float) -> float:
    """``diff / bound`` (<= 1 passes); a zero bound allows only a zero difference."""
    if bound > 0:
        return diff / bound
    return 0.0 if diff == 0 else math.inf


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b)


@pytest.mark.parametrize("backend, precision, extra", CASES)
def test_full_iteration_graphs_train_like_eager(tiny_data, tmp_path, backend, precision, extra):
    """The eager run twice (its run-to-run spread), then with graphs.

    A replay launches the same kernels on the same data as the eager step (same RNG offsets, same addresses
    relative to the inputs), so the graphed run matches bit for bit when the eager step is deterministic; on
    H200 with the local spec and 2 data-parallel ranks the step function was bitwise equal (device probe). Where
    the eager step is not deterministic (atomics in an attention backward) the graphed run may differ by what two
    eager runs differ: the tolerance is 4x that spread, and 1e-6 relative at least. A wrong graph (stale
    parameters, a repeated random stream, a missing gradient sync) changes the losses by 1e-4 or more.
    """
    if backend == "te":
        pytest.importorskip("transformer_engine")
    spec = (f"model.backend={backend}", f"precision={precision}", *extra)
    _, eager, eager_evals, eager_w = _train("eager", tiny_data, tmp_path, *spec)
    _, again, again_evals, again_w = _train("again", tiny_data, tmp_path, *spec)
    module, graphed, graphed_evals, graphed_w = _train(
        "graphed", tiny_data, tmp_path, *spec, "parallel.cuda_graph=full_iteration"
    )

    assert sorted(graphed) == sorted(eager) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in graphed.values()) and len(graphed_evals) == len(eager_evals) == 2

    if precision == "fp8_delayed":
        _check_delayed_scaling(eager_w, graphed_w)
    eager_w, again_w, graphed_w = (
        {k: v for k, v in w.items() if "#" not in k} for w in (eager_w, again_w, graphed_w)
    )
    spread = max(
        _max_rel_diff(again, eager),
        _max_rel_diff(dict(enumerate(again_evals)), dict(enumerate(eager_evals))),
    )
    tol = max(4 * spread, REL_FLOOR[backend])
    weight_excess, worst_key = max(
        (
            _excess(
                (graphed_w[k] - ref).abs().max().item(),
                max(4 * (again_w[k] - ref).abs().max().item(), REL_FLOOR[backend] * ref.abs().max().item()),
            ),
            k,
        )
        for k, ref in eager_w.items()
    )
    print(f"eager {eager}\ngraphed {graphed}\nevals eager {eager_evals} graphed {graphed_evals}")
    print(f"eager run-to-run spread {spread:.3e}; tolerance {tol:.3e}; worst weight diff / its tolerance "
          f"{weight_excess:.3f} ({worst_key})")  # fmt: skip
    assert _max_rel_diff(graphed, eager) <= tol
    assert _max_rel_diff(dict(enumerate(graphed_evals)), dict(enumerate(eager_evals))) <= tol
    # call 1 (synthetic warmup) eager, call 2 captured and replayed, then one replay per call: steps 1..6 and the 3
    # batches of the evaluations after steps 3 and 6, but for the first batch of an FP8 evaluation (eager)
    warmup = 2 if "train.synthetic_warmup_steps=2" in extra else 1
    assert module.train_graph.captured and module.eval_graph.captured
    assert module.train_graph.replays == warmup - 1 + 6
    assert module.eval_graph.replays == warmup - 1 + (4 if precision.startswith("fp8") else 6)
    if backend == "te" and FUSED_ATTENTION and weight_excess > 1.0:
        ref = eager_w[worst_key]
        share = (graphed_w[worst_key] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        pytest.xfail(
            f"te spec, {precision}: the graphed weights drift from the eager ones ({worst_key}: {share:.1%} of its "
            f"largest entry, {weight_excess:.0f}x the tolerance) while the losses match within {tol:.1e}. bf16: "
            "it comes from TE's cuDNN fused attention in capture mode: with NVTE_FUSED_ATTN=0 the graphed te runs "
            "match eager exactly (bf16: H100, 2026-11-27; fp8_current and fp8_block: H200, 2026-11-28)"
        )
    if precision == "fp8_delayed" and not FUSED_ATTENTION and weight_excess > 1.0:
        pytest.xfail(
            f"te spec, fp8_delayed, NVTE_FUSED_ATTN=0: losses, evaluations, amax-history patterns and scales match "
            f"eager, the block weights do not ({worst_key}: {weight_excess:.0f}x the tolerance; 625x = 0.6% of the "
            "largest entry of double_blocks.0.img_mlp.linear_fc1.bias on H200, 2026-11-29): not understood yet; "
            "512-step convergence graphed vs eager agrees within seed noise (docs/PERFORMANCE.md)"
        )
    assert weight_excess <= 1.0, f"{worst_key}: {weight_excess:.3g}x its tolerance"


class _ScaleBlockWeights(Callback):
    """Before each evaluation, scale the blocks' linear weights by 1.5: far more than an optimizer step moves them,
    so an evaluation that reads FP8 weight copies cast before this shows it in its loss."""

    def on_validation_start(self, trainer, module):
        with torch.no_grad():
            for name, p in unwrap(module.flux).named_parameters():
                if "blocks." in name and name.endswith("weight") and p.dim() == 2:
                    p.mul_(1.5)


def test_graphed_fp8_evaluations_read_the_weights_they_evaluate(tiny_data, tmp_path):
    """The default 2-step warmup captures the evaluation graph on a synthetic batch (FP8 weight cast off). The
    block weights change right before each evaluation; the graphed evaluations must see them as the eager ones do
    (an evaluation reading the FP8 copies of the previous step's weights is off by far more than the tolerance)."""
    pytest.importorskip("transformer_engine")
    spec = ("model.backend=te", "precision=fp8_current", "train.synthetic_warmup_steps=2")
    _, _, eager_evals, _ = _train("eager", tiny_data, tmp_path, *spec, callbacks=[_ScaleBlockWeights()])
    module, _, graphed_evals, _ = _train(
        "graphed",
        tiny_data,
        tmp_path,
        *spec,
        "parallel.cuda_graph=full_iteration",
        callbacks=[_ScaleBlockWeights()],
    )
    rel = _max_rel_diff(dict(enumerate(graphed_evals)), dict(enumerate(eager_evals)))
    print(f"evals eager {eager_evals} graphed {graphed_evals}: relative difference {rel:.2e}")
    # H200, 2026-11-29: 9.0e-7 (the cuDNN capture-mode difference); 1.5e-4 with the previous module.py, whose replays
    # read the FP8 copies cast before the scaling (the tiny model's zero-initialised gates damp the blocks' effect)
    assert len(eager_evals) == 2 and rel <= 1e-5, f"graphed evaluations differ from eager by {rel:.2e}"
    assert module.eval_graph.captured and module.eval_graph.replays == 1 + 4  # warmup call 2; 2 of 3 per eval


@pytest.mark.parametrize("graphs", [(), ("parallel.cuda_graph=full_iteration",)], ids=["eager", "graphed"])
def test_the_synthetic_warmup_leaves_no_amax_in_the_delayed_scaling_state(tiny_data, tmp_path, graphs):
    """FP8 delayed scaling after the default 2-step synthetic warmup (train and evaluation batches, the graphs
    captured on them) against a run without warmup: the amax histories hold the same number of updates (a
    warmup amax left behind is an extra non-zero row for ``precision.fp8_amax_history_len`` micro-batches) and the
    scales agree."""
    pytest.importorskip("transformer_engine")
    spec = ("model.backend=te", "precision=fp8_delayed")
    _, cold, _, cold_w = _train("cold", tiny_data, tmp_path, *spec, "train.synthetic_warmup_steps=0")
    _, warm, _, warm_w = _train("warm", tiny_data, tmp_path, *spec, *graphs, "train.synthetic_warmup_steps=2")
    histories = [k for k in cold_w if k.endswith("#amax_history")]
    assert histories and sorted(k for k in warm_w if "#" in k) == sorted(k for k in cold_w if "#" in k)
    extra_rows = {k: int((warm_w[k] != 0).any(1).sum() - (cold_w[k] != 0).any(1).sum()) for k in histories}
    print(f"losses without warmup {cold}\nwith warmup {warm}\nextra non-zero history rows: "
          f"{sorted(set(extra_rows.values()))}")  # fmt: skip
    for k in histories:
        assert torch.equal(warm_w[k] != 0, cold_w[k] != 0), (
            f"{k}: {extra_rows[k]} more updates than without warmup"
        )
    _check_delayed_scaling(cold_w, warm_w)
