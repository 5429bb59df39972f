"""Block and selective recompute give the same loss and gradients; unsupported options fail naming the key."""

import contextlib

import pytest
import torch
from tiny_run import compose_cfg

from flux_nemo import flow_matching as fm
from flux_nemo.training.block_runner import after_backward, block_runner, validate
from flux_nemo.training.model_builder import build_model, flux_config


def _loss_and_grads(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    for p in model.parameters():  # move off the zero-initialised gates so every block matters
        p.data.add_(0.02 * torch.randn_like(p))
    calls = []
    model.single_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    inputs = fm.training_inputs(batch, (batch["t5"][:1] * 0, batch["clip"][:1] * 0), torch.float32)
    loss = fm.mse_loss(model(*inputs[:6]), inputs.target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], len(calls)


@pytest.mark.parametrize(
    "overrides, block_calls",
    [
        (["parallel.recompute=block"], 2),  # recompute re-runs the block in backward
        (["parallel.recompute=selective", "parallel.recompute_modules=[core_attn,mlp,norm]"], 1),
    ],
)
def test_recompute_matches_plain(megatron_world, overrides, block_calls):
    from flux_nemo.training.data import record_shapes
    from flux_nemo.training.warmup import synthetic_batch

    plain = compose_cfg()
    recompute = compose_cfg(*overrides)
    assert block_runner(plain) is None and (block_runner(recompute) is not None) == (block_calls == 2)
    batch = synthetic_batch(record_shapes(plain, flux_config(plain)), 4, torch.device("cpu"))
    loss_a, grads_a, calls_a = _loss_and_grads(plain, batch)
    loss_b, grads_b, calls_b = _loss_and_grads(recompute, batch)
    assert (calls_a, calls_b) == (1, block_calls)
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "overrides, granularity, modules",
    [
        ([], None, ["core_attn"]),  # Megatron's default list, unused without a granularity
        (["parallel.recompute=block", "parallel.recompute_modules=[mlp]"], None, ["core_attn"]),
        (["parallel.recompute=selective"], "selective", ["core_attn"]),
        (
            ["parallel.recompute=selective", "parallel.recompute_modules=[norm,mlp]"],
            "selective",
            ["layernorm", "mlp"],
        ),
    ],
)
def test_selective_recompute_sets_megatron_config_fields(overrides, granularity, modules):
    config = flux_config(compose_cfg(*overrides))
    assert (config.recompute_granularity, config.recompute_modules) == (granularity, modules)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.recompute=full"], "parallel.recompute"),
        (["parallel.recompute_modules=[core_attn,layernorm]"], "parallel.recompute_modules"),
        (["parallel.recompute=selective", "parallel.recompute_modules=[]"], "parallel.recompute_modules"),
        (["precision=fp8_delayed"], "precision.fp8"),  # tiny uses model.backend=local
    ],
)
def test_unsupported_options_fail_naming_the_key(overrides, key):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(cfg)
    if "recompute" in key:  # the model config is built from these keys too
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            flux_config(cfg)


class _Recorded(torch.autograd.Function):
    """``x * 2`` whose backward writes "block" into ``log`` (stands for a block's backward)."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("block")
        return grad * 2, None


def test_after_backward_runs_once_after_the_block_backward_and_keeps_gradients():
    """What the delayed-scaling update in a graph capture relies on: ``fn`` runs once per backward, after every
    gradient of the block's inputs is computed, and the gradients are those of the plain block."""
    x, y, pe = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True), torch.randn(3)
    log = []

    def block(a, b, c, scale):
        return (_Recorded.apply(a, log) * b + c * scale).sum()

    block(x, y, pe, 3.0).backward()
    plain = (x.grad.clone(), y.grad.clone())
    x.grad = y.grad = None
    log.clear()
    args = after_backward(lambda: log.append("fn"), x, y, pe, 3.0)
    assert args[2] is pe and args[3] == 3.0  # no grad required: passed through as they are
    block(*args).backward()
    assert log == ["block", "fn"]
    assert torch.equal(x.grad, plain[0]) and torch.equal(y.grad, plain[1])


def test_after_backward_passes_through_without_autograd():
    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        assert after_backward(lambda: None, x)[0] is x
    assert after_backward(lambda: None, torch.randn(3), 1)[1] == 1


@pytest.mark.parametrize("outer", [True, False])
def test_runner_enters_the_fp8_context_around_all_blocks_or_per_block(megatron_world, outer):
    """Delayed scaling (``outer``): one context per forward around all blocks, and the capture wrap on the first
    block's inputs only; current/block scaling and block recompute: the context and the wrap on every block. The
    model's output is the plain one either way (the context here only counts)."""
    from flux_nemo.training.block_runner import BlockRunner
    from flux_nemo.training.data import record_shapes
    from flux_nemo.training.warmup import synthetic_batch

    cfg = compose_cfg()
    events = []

    @contextlib.contextmanager
    def context():
        events.append("enter")
        yield
        events.append("exit")

    def in_capture(args):
        events.append("wrap")
        return args

    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    for name, block in [*model.double_blocks.named_children(), *model.single_blocks.named_children()]:
        block.register_forward_pre_hook(lambda *_, name=name: events.append("block"))
    batch = synthetic_batch(record_shapes(cfg, flux_config(cfg)), 4, torch.device("cpu"))
    inputs = fm.training_inputs(batch, (batch["t5"][:1] * 0, batch["clip"][:1] * 0), torch.float32)
    plain = model(*inputs[:6])
    events.clear()
    model.block_runner = BlockRunner(False, context, outer=outer, in_capture=in_capture)
    for _ in range(2):  # a second forward (micro-batch) enters again and wraps its first block again
        torch.testing.assert_close(model(*inputs[:6]), plain, rtol=0, atol=0)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    per_forward = ["enter"] + ["wrap", "block"] + ["block"] * (blocks - 1) + ["exit"]
    if not outer:
        per_forward = ["wrap", "enter", "block", "exit"] * blocks
    assert blocks >= 2 and events == per_forward * 2


class _DelayedState:
    """The two tensors of TE's ``DelayedScalingRecipeState`` that delayed scaling updates."""

    def __init__(self, history: torch.Tensor, scale: torch.Tensor):
        self.amax_history, self.scale = history, scale


def test_delayed_scaling_kept_restores_states_in_place_and_resets_new_ones():
    """A state present before the block gets its values back (a resumed run's), in the same tensors; one created
    inside it (TE creates them on a module's first FP8 forward) gets TE's initial zero history and unit scale; a
    history whose length TE changed meanwhile gets the old rows that fit. Modules without FP8 state are skipped."""
    from flux_nemo.training.block_runner import delayed_scaling_kept

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    old = torch.arange(8.0).view(4, 2)
    model[0].fp8_meta = {"scaling_fwd": _DelayedState(old.clone(), torch.tensor([2.0, 3.0]))}
    model[2].fp8_meta = {"scaling_bwd": _DelayedState(torch.tensor([[1.0], [2.0]]), torch.tensor([4.0]))}
    fwd = model[0].fp8_meta["scaling_fwd"]
    history_tensor, scale_tensor = fwd.amax_history, fwd.scale
    with delayed_scaling_kept(model):
        fwd.amax_history.add_(7.0)  # the warmup's amaxes and scale updates
        fwd.scale.mul_(5.0)
        model[1].fp8_meta = {
            "recipe": None,
            "scaling_fwd": _DelayedState(torch.full((4, 2), 9.0), torch.ones(2) * 8),
        }
        model[2].fp8_meta["scaling_bwd"] = _DelayedState(torch.full((3, 1), 9.0), torch.tensor([6.0]))
    assert fwd.amax_history is history_tensor and fwd.scale is scale_tensor
    assert torch.equal(fwd.amax_history, old) and torch.equal(fwd.scale, torch.tensor([2.0, 3.0]))
    new = model[1].fp8_meta["scaling_fwd"]
    assert torch.equal(new.amax_history, torch.zeros(4, 2)) and torch.equal(new.scale, torch.ones(2))
    resized = model[2].fp8_meta["scaling_bwd"]
    assert torch.equal(resized.amax_history, torch.tensor([[1.0], [2.0], [0.0]]))
    assert torch.equal(resized.scale, torch.tensor([4.0]))
