"""Full-iteration CUDA graphs (``parallel.cuda_graph=full_iteration``): a whole training step, or one evaluation
batch, captured once in one ``torch.cuda.CUDAGraph`` and replayed.

This is Megatron-Core's "full iteration" scope (``megatron.core.full_cuda_graph.FullCudaGraphWrapper``) around our
own step functions. :class:`GraphedStep` wraps ``fn(inputs: dict[str, Tensor]) -> outputs``:

* every call first copies ``inputs`` into static device buffers (:class:`StaticInputs`: allocated from the first
  call's keys, shapes and dtypes; a later call with other keys, shapes or dtypes raises ``ValueError``), and ``fn``
  always receives those same buffers, so the graph reads each call's data from fixed addresses;
* the first ``warmup`` calls run ``fn`` eagerly on a side stream (lazy initialisation: cuBLAS handles, NCCL
  communicators, compiled kernels, Megatron DDP's first-batch bookkeeping, optimizer state);
* the next call captures ``fn`` on that stream (``capture_error_mode="thread_local"``: the data-loader threads may
  allocate pinned memory meanwhile) and replays it; from then on a call is a copy of the inputs plus one replay;
* the outputs of a replayed call are the graph's static tensors: read them before the next call (of this step or of
  any step sharing its memory pool), which overwrites them.

What a captured function must respect (``docs/DESIGN.md``, "CUDA graphs"): no host sync (``.item()``, ``.tolist()``,
Python ``bool`` of a tensor, ``torch.cuda.synchronize``, data-dependent shapes); its Python side effects happen once,
at capture, never on replay; random numbers come from the default CUDA generator (graph-safe: each replay draws
fresh numbers exactly as an eager call would) or from generators registered with the graph, such as the states of
Megatron's CUDA RNG tracker once it is graph-safe (:func:`use_graph_safe_rng`, :func:`megatron_rng_generators`);
collectives go through NCCL (capturable; gloo is not).

FP8 delayed scaling is graphed too. Its per-tensor amax histories and scales are static device tensors; a TE module
adds them to ``FP8GlobalStateManager``'s amax buffers on its first eager forward (skipped while a capture is under
way, so the eager warm-up calls before the capture are what register every module), and the update (concatenate,
amax all-reduce, TE's fused history roll + scale kernel) is plain device work launched from Python: at each
``fp8_autocast`` exit (forward) and, for the backward, by the block runner after the backward of the first block
under each autocast (``flux_nemo.training.block_runner``: TE skips its own backward update while
:func:`transformer_engine_capture` says a capture is under way). The capture records those launches over the
registered buffers, so each replay updates the scales as an eager step does (GPU test: the same amax-history
pattern and scales as eager).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from omegaconf import DictConfig

MODES = ("none", "full_iteration")


def validate(cfg: DictConfig) -> None:
    """Fail at recipe start, naming the keys, on ``parallel.cuda_graph`` values and combinations we do not run."""
    mode = cfg.parallel.cuda_graph
    if mode not in MODES:
        raise ValueError(f"parallel.cuda_graph={mode!r}; expected one of {MODES}")
    if mode == "none":
        return
    key = f"parallel.cuda_graph={mode}"
    if _backend(cfg) == "te":
        log.warning(
            "%s with model.backend=te: losses match the eager step (1.1e-6 relative over 6 steps of the GPU test) "
            "but the weights drift slightly from it from the third update on: TE's cuDNN fused attention computes "
            "slightly differently in capture mode (with NVTE_FUSED_ATTN=0 graphed = eager bitwise; H100, "
            "2026-11-27; docs/DESIGN.md, 'CUDA graphs'). With FP8 current/block scaling the losses match within 1e-5 "
            "and the weights drift more (10-30%% of the largest entry of a zero-initialised bias after 6 steps), from "
            "the same cause (NVTE_FUSED_ATTN=0: graphed = eager exactly); 512-step convergence runs with and "
            "without graphs agree within 0.0003 in validation loss (H200, 2026-11-28; docs/PERFORMANCE.md)",
            key,
        )
    if cfg.precision.fp8 == "delayed":
        log.warning(
            "%s with precision.fp8='delayed': the scales update on every replay as in the eager step (GPU test: "
            "same amax-history pattern and scales), but even with NVTE_FUSED_ATTN=0 the graphed block weights are "
            "not bitwise the eager ones after 6 steps (0.6%% of an fc1 bias's largest entry; not understood yet); "
            "512-step convergence runs graphed and eager agree within seed noise (H200, 2026-11-29; "
            "docs/PERFORMANCE.md)",
            key,
        )
    if cfg.parallel.sequence_parallel and _backend(cfg) == "local":
        raise ValueError(
            f"{key} does not support parallel.sequence_parallel=true with model.backend=local: Megatron's local "
            "sequence-parallel linears all-gather into a global buffer that is reallocated when a larger batch "
            "comes (the evaluation batch), leaving a captured graph with a freed address; use model.backend=te"
        )
    if cfg.parallel.num_distributed_optimizer_instances != 1:
        raise ValueError(
            f"{key} needs parallel.num_distributed_optimizer_instances=1 (got "
            f"{cfg.parallel.num_distributed_optimizer_instances}): with several instances Megatron reduces "
            "gradients on a separate stream synchronised with the legacy default stream, outside the capture"
        )
    if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        raise ValueError(
            f"{key} needs CUDA (a GPU system and a CUDA build of torch; system.accelerator="
            f"{cfg.system.accelerator!r}, CUDA available: {torch.cuda.is_available()}); use "
            "parallel.cuda_graph=none on CPU"
        )


def _backend(cfg: DictConfig) -> str:
    from flux_nemo.training.model_builder import backend

    return backend(cfg)


def signature(inputs: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of a dict of tensors (``TypeError`` on a value that is not a tensor)."""
    for key, value in inputs.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"input {key!r} is a {type(value).__name__}, not a tensor")
    return {key: (tuple(value.shape), value.dtype) for key, value in inputs.items()}


def describe_mismatch(expected: Mapping, got: Mapping) -> str:
    """What differs between two :func:`signature` results, one clause per key."""
    parts = []
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        parts.append(f"missing keys {missing}")
    if extra:
        parts.append(f"unexpected keys {extra}")
    for key in sorted(set(expected) & set(got)):
        if expected[key] != got[key]:
            (shape, dtype), (want_shape, want_dtype) = got[key], expected[key]
            parts.append(f"{key!r} is {list(shape)} {dtype}, expected {list(want_shape)} {want_dtype}")
    return "; ".join(parts)


class StaticInputs:
    """Device buffers with the keys, shapes and dtypes of the first inputs loaded; later inputs are copied into them.

    ``load`` returns the same buffers every time (a new dict of them, so a caller adding keys changes nothing
    here). Copies are ``non_blocking``: from pinned host memory they overlap with earlier device work.
    """

    def __init__(self, device: torch.device | str, name: str = "step"):
        self.device = torch.device(device)
        self.name = name
        self.spec: dict | None = None
        self.buffers: dict[str, Tensor] | None = None

    def load(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        spec = signature(inputs)
        if self.buffers is None:
            self.spec = spec
            self.buffers = {k: torch.empty(s, dtype=d, device=self.device) for k, (s, d) in spec.items()}
        elif spec != self.spec:
            raise ValueError(
                f"{self.name}: the inputs differ from those the CUDA graph was built for "
                f"({describe_mismatch(self.spec, spec)}); a graph replays fixed shapes: keep batch shapes "
                "constant (the eval loader pads its last batch) or use parallel.cuda_graph=none"
            )
        for key, value in inputs.items():
            self.buffers[key].copy_(value, non_blocking=True)
        return dict(self.buffers)


def megatron_rng_generators() -> list[torch.Generator]:
    """The states of Megatron's CUDA RNG tracker that are generators, i.e. those of a graph-safe tracker.

    A capture registers them (as ``FullCudaGraphWrapper`` does with ``get_all_rng_states``) so that code forking
    the tracker inside the graph (Transformer Engine attention enters ``tracker.fork()`` on every call) draws fresh
    numbers on each replay. A default tracker holds CPU byte tensors instead: none are returned, and forking it
    inside a capture fails (``torch.cuda.get_rng_state`` is not capturable).
    """
    from megatron.core import tensor_parallel

    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    return [state for state in states.values() if isinstance(state, torch.Generator)]


def use_graph_safe_rng(seed: int) -> None:
    """Re-create Megatron's CUDA RNG tracker with graph-safe states, seeded as before.

    With Transformer Engine installed this is Megatron's ``TECudaRNGStatesTracker`` (``te_rng_tracker=True``): TE's
    attention asserts during a capture that its tracker is TE's ``CudaRNGStatesTracker`` (which Megatron's own
    ``use_cudagraphable_rng`` tracker is not). Without TE, Megatron itself falls back to its
    ``use_cudagraphable_rng`` tracker. Same seeds, so the same random streams as the default tracker. Call it
    before the model is built: Transformer Engine's attention keeps the tracker it sees at construction. It also
    re-seeds the default CUDA generator with ``seed`` (``model_parallel_cuda_manual_seed`` does).
    """
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, te_rng_tracker=True, use_cudagraphable_rng=True, force_reset_rng=True
    )


def use_side_stream() -> torch.cuda.Stream:
    """Make a new side stream this thread's current CUDA stream; returns the stream that was current.

    Call it before the model and its Megatron DDP wrapper are built. Megatron DDP keeps each parameter's
    ``AccumulateGrad`` node (for its gradient hooks), and autograd runs such a node on the stream that was current
    when it was made: on the legacy default stream it cannot join a capture ("operation would make the legacy stream
    depend on a capturing blocking stream"). Training then runs on this stream, and the graphs are warmed up and
    captured on it (PyTorch's recipe for DDP: construct and warm up on a side stream).
    """
    previous = torch.cuda.current_stream()
    torch.cuda.set_stream(torch.cuda.Stream())
    return previous


def rearm_param_gather(model: torch.nn.Module) -> None:
    """Megatron DDP with overlapped parameter all-gather: make the next forward dispatch every bucket's all-gather.

    Its forward pre-hooks skip the gather of a bucket marked as dispatched, and ``eval_mode`` / checkpoint saves
    gather synchronously and leave that mark until the next ``finish_grad_sync``. A training graph captured then
    would contain no all-gather, and replays would never spread the parameters the optimizer updates. Call it
    just before capturing a training step (a no-op without overlapped param gather).
    """
    config = getattr(model, "ddp_config", None)
    if config is None or not (config.use_distributed_optimizer and config.overlap_param_gather):
        return
    for group in model.bucket_groups + model.expert_parallel_bucket_groups:
        if not hasattr(group, "param_gather_dispatched") or group.param_gather_handle is not None:
            raise RuntimeError(
                "Megatron DDP bucket group without param_gather_dispatched or with an all-gather in flight: "
                "this megatron-core is not the one flux_nemo.training.cuda_graph was written for (0.16)"
            )
        group.param_gather_dispatched = False


@contextlib.contextmanager
def transformer_engine_capture() -> Iterator[None]:
    """Tell Transformer Engine that a CUDA graph is being captured (a no-op without it installed).

    Transformer Engine asks ``transformer_engine.pytorch.graph.is_graph_capturing()``, which is true only between
    its ``set_capture_start`` / ``set_capture_end`` (its ``make_graphed_callables`` and Megatron-Core's layer graphs
    call them), and passes the answer to its attention backend selection and fused-attention kernels
    (``cuda_graph=...``). A plain ``torch.cuda.graph`` capture without it recorded a cuDNN fused attention that hit
    an illegal memory access at the first replay (H100 and H200, te spec, 2026-11-27; TE's unfused attention and the
    local spec replayed correctly); with it the replay runs and trains like the eager step.
    """
    try:
        from transformer_engine.pytorch import graph as te_graph
    except ImportError:
        yield
        return
    te_graph.set_capture_start()
    try:
        yield
    finally:
        te_graph.set_capture_end()


class GraphedStep:
    """``fn(inputs: dict[str, Tensor])`` run eagerly ``warmup`` times, then captured once and replayed.

    Args:
        fn: the step; it receives the static input buffers (same keys as the call's inputs).
        name: for messages ("training step").
        warmup: eager calls before the capture (>= 1).
        pool: a ``torch.cuda.graph_pool_handle()`` to share with other graphs that never run concurrently
            (None: a private pool).
        generators: returns the generators to register with the graph besides the default CUDA generator
            (default :func:`megatron_rng_generators`).
        before_capture: called just before the capture (e.g. :func:`rearm_param_gather`).
        stream: where the eager calls and the capture run (None: a new side stream). Use the stream the model's
            autograd nodes were made on when they outlive an iteration (Megatron DDP; :func:`use_side_stream`).
    """

    def __init__(
        self,
        fn: Callable[[dict[str, Tensor]], object],
        *,
        name: str = "step",
        warmup: int = 1,
        pool=None,
        generators: Callable[[], Iterable[torch.Generator]] = megatron_rng_generators,
        before_capture: Callable[[], None] | None = None,
        stream: torch.cuda.Stream | None = None,
    ):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{name}: CUDA graphs need a CUDA device (parallel.cuda_graph=none on CPU)")
        if warmup < 1:
            raise ValueError(f"{name}: warmup must be >= 1 eager call before the capture, got {warmup}")
        self.fn, self.name, self.warmup = fn, name, warmup
        self.pool, self.generators, self.before_capture = pool, generators, before_capture
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.inputs = StaticInputs(self.device, name)
        self.stream = torch.cuda.Stream(self.device) if stream is None else stream
        if self.stream == torch.cuda.default_stream(self.device):
            raise ValueError(f"{name}: cannot capture on the default stream; pass a side stream or None")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None
        self.calls = 0  # every call
        self.replays = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, inputs: Mapping[str, Tensor]):
        static = self.inputs.load(inputs)
        self.calls += 1
        if self.graph is None:
            if self.calls <= self.warmup:
                return self._eager(static)
            self._capture(static)
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def _eager(self, static: dict[str, Tensor]):
        current = torch.cuda.current_stream(self.device)
        if current == self.stream:
            return self.fn(static)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            outputs = self.fn(static)
        current.wait_stream(self.stream)
        return outputs

    def _capture(self, static: dict[str, Tensor]) -> None:
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators():
            graph.register_generator_state(generator)
        if self.before_capture is not None:
            self.before_capture()
        torch.cuda.synchronize(self.device)  # the input copies and all earlier work are done
        try:
            with (
                transformer_engine_capture(),
                torch.cuda.graph(
                    graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
                ),
            ):
                outputs = self.fn(static)
        except Exception as err:
            raise RuntimeError(
                f"capturing the {self.name} in a CUDA graph failed ({type(err).__name__}: {err}). Inside the "
                "step there must be no host sync (.item(), .tolist(), bool(tensor), torch.cuda.synchronize, "
                "data-dependent shapes), no CPU tensors, no RNG that is not graph-safe (an error naming "
                "CUDAGeneratorImpl), no autograd node made on the legacy default stream (an error naming the "
                "legacy stream: build the model after use_side_stream()); see docs/DESIGN.md 'CUDA graphs', or "
                "use parallel.cuda_graph=none"
            ) from err
        self.graph, self.outputs = graph, outputs
