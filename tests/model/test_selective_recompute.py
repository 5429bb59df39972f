"""Selective recompute (``recompute_granularity="selective"``, ``recompute_modules``): the same output and gradients
as without recompute, fewer bytes kept for backward, the recomputation really runs, and only while training."""

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from flux_testing import make_inputs, randomize_
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from flux_nemo.model import FluxConfig, build_flux
from flux_nemo.model.attention import SDPAttention
from flux_nemo.model.blocks import FluxMLP

MODULES = ("core_attn", "mlp", "layernorm")
OPTIONS = [(m,) for m in MODULES] + [MODULES]
FIELDS = dict(params_dtype=torch.float64, context_in_dim=32, vec_in_dim=16)  # tiny: h 256, 2 + 2 blocks
BATCH, GRID, TXT = 2, (8, 8), 16
# Calls per forward of the plain model: core attentions, MLPs, LayerNorms (4 per double block, 1 per single, final).
FORWARD_CALLS = {"core_attn": 4, "mlp": 6, "layernorm": 11}
RECOMPUTED = {"core_attn": 4, "mlp": 6, "layernorm": 10}  # every one but the final layer's LayerNorm


def build(modules: tuple[str, ...] | None, **fields) -> torch.nn.Module:
    selective = {}
    if modules is not None:
        selective = dict(recompute_granularity="selective", recompute_modules=list(modules))
    torch.manual_seed(0)
    model = build_flux(FluxConfig.from_flavor("tiny", **FIELDS, **selective, **fields), backend="local")
    return randomize_(model, seed=0).train()


class SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Tensors autograd saves for backward while active; each storage once, parameters (kept anyway) excluded.

    ``nbytes()`` reads the storages when called: one freed by the ``layernorm`` recompute counts 0 bytes. Storages
    are told apart by their (preserved) Python objects, held here: a freed one's address may be reused.
    """

    def __init__(self, model: torch.nn.Module):
        self.params = {id(p.untyped_storage()) for p in model.parameters()}
        self.saved: dict[int, torch.UntypedStorage] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if id(storage) not in self.params:
            self.saved.setdefault(id(storage), storage)
        return t

    def nbytes(self) -> int:
        return sum(storage.nbytes() for storage in self.saved.values())


class LayerNormCounter(TorchDispatchMode):
    """Counts LayerNorm forward kernels (``aten.native_layer_norm``) run while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.native_layer_norm.default
        return func(*args, **(kwargs or {}))


@dataclass
class Run:
    out: torch.Tensor
    grads: dict[str, torch.Tensor]
    saved_bytes: int
    calls: dict[str, int]  # forward + backward


def forward_backward(model: torch.nn.Module, seed: int = 1, count_layer_norms: bool = True) -> Run:
    """One forward (saved tensors measured) and backward of ``(out * probe).sum()``; counts module calls
    (LayerNorms with a dispatch mode, which torch.compile'd ops refuse: ``count_layer_norms=False`` for them)."""
    model.zero_grad(set_to_none=True)
    calls, hooks = Counter(), []
    for module in model.modules():
        name = {SDPAttention: "core_attn", FluxMLP: "mlp"}.get(type(module))
        target = module.linear_fc1 if name == "mlp" else module  # pre-hooks: a recompute stops early
        if name:
            hooks.append(target.register_forward_pre_hook(lambda *_, name=name: calls.update([name])))
    config = model.config
    inputs = make_inputs(config, BATCH, *GRID, TXT, dtype=torch.float64)
    probe = torch.randn(BATCH, GRID[0] * GRID[1], config.in_channels, dtype=torch.float64)
    saved = SavedActivations(model)
    torch.manual_seed(seed)  # the same RNG stream for runs with attention dropout
    layer_norms = LayerNormCounter() if count_layer_norms else contextlib.nullcontext()
    with layer_norms:
        with saved:
            out = model(**inputs)
        saved_bytes = saved.nbytes()
        if out.requires_grad:
            (out * probe).sum().backward()
    for hook in hooks:
        hook.remove()
    if count_layer_norms:
        calls["layernorm"] = layer_norms.count
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == (len(list(model.parameters())) if out.requires_grad else 0)
    return Run(out.detach(), grads, saved_bytes, dict(calls))


@functools.cache
def result(modules: tuple[str, ...] | None, sdpa: SDPBackend | None = None) -> Run:
    """``forward_backward`` of a fresh model (cached per option; ``sdpa`` forces an SDPA backend)."""
    model = build(modules)
    if sdpa is None:
        return forward_backward(model)
    with sdpa_kernel(sdpa):
        return forward_backward(model)


def assert_same(run: Run, ref: Run) -> None:
    torch.testing.assert_close(run.out, ref.out, rtol=1e-13, atol=1e-15)
    assert run.grads.keys() == ref.grads.keys()
    for name, grad in ref.grads.items():
        torch.testing.assert_close(run.grads[name], grad, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("modules", OPTIONS, ids="+".join)
def test_recompute_gives_the_same_output_and_gradients(megatron_world, modules):
    assert_same(result(modules), result(None))


@pytest.mark.parametrize("modules", OPTIONS, ids="+".join)
def test_recompute_reruns_the_modules_and_keeps_fewer_bytes(megatron_world, modules):
    plain, run = result(None), result(modules)
    assert plain.calls == FORWARD_CALLS
    assert run.calls == {m: FORWARD_CALLS[m] + (RECOMPUTED[m] if m in modules else 0) for m in MODULES}
    print(f"\nsaved for backward, {'+'.join(modules)}: {run.saved_bytes:,} B vs none {plain.saved_bytes:,} B")
    assert run.saved_bytes < plain.saved_bytes


def test_core_attn_recompute_with_math_attention_drops_the_probabilities(megatron_world):
    """Unfused attention keeps the [b, heads, s, s] softmax; with ``core_attn`` only q, k, v stay."""
    plain, run = result(None, SDPBackend.MATH), result(("core_attn",), SDPBackend.MATH)
    assert_same(run, plain)
    s = GRID[0] * GRID[1] + TXT
    probabilities = BATCH * 2 * s * s * 8  # 2 heads, fp64
    print(f"\nsaved for backward, math SDPA: core_attn {run.saved_bytes:,} B vs none {plain.saved_bytes:,} B")
    assert plain.saved_bytes - run.saved_bytes >= 4 * probabilities  # 4 blocks


def test_saved_bytes_table(megatron_world):
    """Prints the bytes kept for backward per option (``pytest -s``): the activations, parameters excluded."""
    plain = result(None)
    rows = [("none", plain)] + [("+".join(m), result(m)) for m in OPTIONS]
    rows += [("none, math SDPA", result(None, SDPBackend.MATH))]
    rows += [("core_attn, math SDPA", result(("core_attn",), SDPBackend.MATH))]
    lines = [
        f"{name:<22} {r.saved_bytes:>12,} B {r.saved_bytes / plain.saved_bytes:7.1%}" for name, r in rows
    ]
    shape = f"tiny fp64: hidden 256, 2 heads, 2 double + 2 single blocks, batch {BATCH}, {GRID[0] * GRID[1]}+{TXT}"
    print(f"\nbytes saved for backward ({shape} tokens; % of none)\n" + "\n".join(lines))
    assert all(r.saved_bytes < plain.saved_bytes for _, r in rows[1:-2])


@pytest.mark.slow  # inductor compiles the fused ops on CPU: ~30 s
def test_recompute_with_fused_elementwise_ops(megatron_world):
    """The ``layernorm`` checkpoint also wraps the torch.compile'd LayerNorm + modulate ops (modulation_fusion)."""
    plain = forward_backward(build(None, modulation_fusion=True), count_layer_norms=False)
    for modules in [("layernorm",), MODULES]:
        run = forward_backward(build(modules, modulation_fusion=True), count_layer_norms=False)
        assert_same(run, plain)
        print(
            f"\nsaved, fused ops, {'+'.join(modules)}: {run.saved_bytes:,} B vs none {plain.saved_bytes:,} B"
        )
        assert run.saved_bytes < plain.saved_bytes


def test_recompute_replays_attention_dropout(megatron_world):
    """Dropout inside the recomputed core attention draws the same mask again (the RNG state is replayed)."""
    plain = forward_backward(build(None, attention_dropout=0.3))
    run = forward_backward(build(MODULES, attention_dropout=0.3))
    other_seed = forward_backward(build(None, attention_dropout=0.3), seed=2)
    assert not torch.allclose(other_seed.out, plain.out)  # dropout is active
    assert_same(run, plain)


def test_eval_and_no_grad_run_plainly(megatron_world):
    plain = forward_backward(build(None).eval())
    model = build(MODULES).eval()
    run = forward_backward(model)
    assert run.calls == plain.calls == FORWARD_CALLS  # nothing re-run in backward
    assert run.saved_bytes == plain.saved_bytes
    assert_same(run, plain)
    with torch.no_grad():
        run = forward_backward(model.train())
    assert run.calls == FORWARD_CALLS and run.saved_bytes == 0
    torch.testing.assert_close(run.out, plain.out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(recompute_granularity="selective", recompute_modules=["norm"]), "FluxConfig.recompute_modules"),
        (dict(recompute_granularity="selective", recompute_modules=["moe"]), "FluxConfig.recompute_modules"),
        (dict(recompute_granularity="full"), "FluxConfig.recompute_granularity"),
    ],
)
def test_config_errors_name_the_field(fields, key):
    with pytest.raises(ValueError, match=key):
        FluxConfig.from_flavor("tiny", **fields)


def test_selective_defaults_to_core_attn_as_megatron():
    config = FluxConfig.from_flavor("tiny", recompute_granularity="selective")
    assert config.recompute_modules == ["core_attn"]
