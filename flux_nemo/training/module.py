"""``FluxTrainingModule``: the MLPerf flux1 training and evaluation steps as a manual-optimization LightningModule.

One Lightning batch is one optimizer step: the rank's ``global_batch_size / dp`` samples, split into micro-batches
of ``train.micro_batch_size`` whose gradients accumulate (synchronised on the last one). Metrics stay on the device
and are read only at log intervals and evaluations (``pop_train_metrics``, ``eval_result``): a step has no host sync.
The network itself (``self.flux``) is built in ``configure_model``, after the strategy has set up Megatron's
parallel state, and wrapped by the strategy (Megatron DDP on GPU). With ``parallel.cuda_graph=full_iteration`` the
step's forward + backward and the evaluation batch each run as one CUDA graph (``flux_nemo.training.cuda_graph``).
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import DictConfig

from flux_nemo import flow_matching as fm
from flux_nemo.model import Conditioning
from flux_nemo.training import cuda_graph
from flux_nemo.training.block_runner import refresh_fp8_weights
from flux_nemo.training.checkpoint import rng_state, set_rng_state
from flux_nemo.training.config import check_batch_sizes, resolve_lr_warmup
from flux_nemo.training.context_parallel import average_over_context_parallel, shard_inputs
from flux_nemo.training.data import build_loaders, load_empty, record_shapes
from flux_nemo.training.micro_batches import accumulate
from flux_nemo.training.model_builder import build_model, compute_dtype
from flux_nemo.training.optim import set_lr, warmup_constant_lr
from flux_nemo.training.rng import add_training_stream, training_draws

log = logging.getLogger(__name__)

# Eager calls of each graphed step before its capture. With the default train.synthetic_warmup_steps=2 both graphs
# are captured in the untimed warmup (call 1 eager, call 2 captured).
GRAPH_WARMUP_CALLS = 1


class _IterableView:
    """The train loader as a plain iterable: its position is checkpointed by us (``train_loader_state``), not by
    Lightning, whose copy would count the batch its fetcher reads ahead."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


class FluxTrainingModule(pl.LightningModule):
    """Flux.1 rectified-flow training (reference objective, ``flux_nemo.flow_matching``) and validation loss."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        cuda_graph.validate(cfg)
        self.automatic_optimization = False
        self.cfg = cfg
        self.lr, self.warmup_steps = resolve_lr_warmup(cfg)
        self.dtype_compute = compute_dtype(cfg)
        self.flux: torch.nn.Module | None = None
        self.empty: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loader_state: dict | None = None  # train-loader position restored from a checkpoint
        self._train_loader = None
        self.train_graph: cuda_graph.GraphedStep | None = None  # parallel.cuda_graph=full_iteration
        self.eval_graph: cuda_graph.GraphedStep | None = None
        self._quantize_in_next_eval_batch = False  # FP8: the next evaluation batch casts the updated weights
        self._reset_train_metrics()
        self._reset_eval_metrics()

    # ------------------------------------------------------------------ build
    def configure_model(self) -> None:
        """Build and initialise the network (same seed on every rank), then seed the training RNG per dp rank."""
        if self.flux is not None:
            return
        seed = self.trainer.strategy.seed
        graphs = self.cfg.parallel.cuda_graph == "full_iteration"
        if graphs:  # before the build: autograd nodes keep their stream, TE attention keeps its RNG tracker
            self._stream_before_graphs = cuda_graph.use_side_stream()
            cuda_graph.use_graph_safe_rng(seed)
        torch.manual_seed(seed)
        self.flux = build_model(self.cfg, self.device)
        self.empty = load_empty(self.cfg, self.flux.config, self.device)
        torch.manual_seed(seed + parallel_state.get_data_parallel_rank())
        add_training_stream(seed, parallel_state.get_data_parallel_rank())  # GPU: the draws' own stream
        dp = parallel_state.get_data_parallel_world_size()
        self.num_micro_batches = check_batch_sizes(self.cfg, dp)
        self.local_batch_size = self.cfg.train.global_batch_size // dp
        if graphs:
            self._build_graphs()

    def _build_graphs(self) -> None:
        """One graph for the step's forward + backward, one for an evaluation batch, sharing one memory pool.

        Sharing is safe because the two never run at the same time (one stream) and each output is consumed (added
        to a metric) right after its replay: the evaluation graph reuses blocks the training graph frees inside its
        own replay, so it costs almost no extra memory, while nothing either graph keeps alive is touched by the
        other (an allocation made during a capture stays reserved in the pool while it is referenced).
        """
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.current_stream()
        self.train_graph = cuda_graph.GraphedStep(
            self._forward_backward,
            name="training step",
            warmup=GRAPH_WARMUP_CALLS,
            pool=pool,
            stream=stream,
            before_capture=lambda: cuda_graph.rearm_param_gather(self.flux),
        )
        self.eval_graph = cuda_graph.GraphedStep(
            self.eval_sums, name="evaluation step", warmup=GRAPH_WARMUP_CALLS, pool=pool, stream=stream
        )

    def teardown(self, stage: str) -> None:
        """Give the thread back the CUDA stream it had before the graphs' side stream (several runs per process)."""
        previous = getattr(self, "_stream_before_graphs", None)
        if previous is not None:
            torch.cuda.set_stream(previous)
            self._stream_before_graphs = None
        super().teardown(stage)

    def configure_optimizers(self):
        """Built by the strategy once it has wrapped the model (Megatron optimizer on GPU, AdamW on CPU)."""
        return self.trainer.strategy.build_optimizer()

    def train_dataloader(self):
        self._train_loader, _ = build_loaders(self.cfg, self.flux.config, self.local_batch_size, train=True)
        if self.loader_state is not None:
            self._train_loader.load_state_dict(self.loader_state)
        return _IterableView(self._train_loader)

    def val_dataloader(self):
        _, loader = build_loaders(self.cfg, self.flux.config, self.local_batch_size, train=False)
        return loader

    @property
    def shapes(self):
        return record_shapes(self.cfg, self.flux.config)

    # ------------------------------------------------------------------ training
    def predict(self, inputs: fm.ModelInputs, conditioning: Conditioning | None = None) -> torch.Tensor:
        """The network's velocity prediction; it computes in its parameters' dtype (bf16 on GPU, fp32 on CPU).

        x0, noise, x_t and the target are formed in ``precision.compute_dtype`` as the reference does. On CPU the
        network stays fp32: Megatron's linear layers do not support CPU autocast. ``conditioning``: the adaLN
        modulations of these samples, computed beforehand (``flux_nemo.training.micro_batches``).
        """
        ids = inputs.img_ids[:1], inputs.txt_ids[:1]  # the same for every sample: one RoPE table
        return self.flux(inputs.img, inputs.txt, inputs.y, inputs.timesteps, *ids, conditioning=conditioning)

    def train_inputs(self, chunks: list[dict[str, torch.Tensor]]) -> list[fm.ModelInputs]:
        """The reference training inputs of each micro-batch (fresh posterior sample, CFG dropout, t ~ U[0, 1)),
        drawn micro-batch after micro-batch from the training stream; context parallel: this rank's tokens (same
        draws on every CP rank)."""
        with training_draws():
            inputs = [
                fm.training_inputs(chunk, self.empty, self.dtype_compute, self.cfg.train.cfg_dropout)
                for chunk in chunks
            ]
        return [shard_inputs(x) for x in inputs]

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Accumulate the gradient of one step's batch over its micro-batches; returns the mean loss (device).

        With CUDA graphs the returned tensor is the graph's static output: read it before the next step.
        """
        if self.train_graph is not None:
            return self.train_graph(batch)
        return self._forward_backward(self._to_device(batch))

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step on a device batch: zero the grads, micro-batches, grad sync (what a CUDA graph captures)."""
        strategy = self.trainer.strategy
        micro = self.cfg.train.micro_batch_size
        if self.cfg.precision.fp8:  # quantize the updated weights once, on the first micro-batch
            refresh_fp8_weights(self.flux)
        chunks = [
            {k: v[i : i + micro] for k, v in batch.items()} for i in range(0, len(batch["mean"]), micro)
        ]
        inputs = self.train_inputs(chunks)
        strategy.zero_grad()
        # The micro-batches, with the adaLN modulations computed once for all of them (training/micro_batches.py).
        total = accumulate(
            self.flux,
            inputs,
            lambda x, conditioning: fm.mse_loss(self.predict(x, conditioning), x.target),
            grad_sync=lambda last: strategy.grad_sync(enabled=last),
            backward=self.manual_backward,
            once_per_step=self.cfg.train.modulations_once_per_step,
        )
        strategy.finish_grad_sync()
        return total / len(chunks)

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step + 1
        set_lr(self.optimizers().optimizer, warmup_constant_lr(step, self.lr, self.warmup_steps))
        loss = self.forward_backward(batch)
        grad_norm = self.optimizers().step()
        self._loss_sum += loss
        self._grad_norm_sum += grad_norm
        self._window_steps += 1

    def _reset_train_metrics(self) -> None:
        device = self.device if self.flux is not None else None
        self._loss_sum = torch.zeros((), device=device)
        self._grad_norm_sum = torch.zeros((), device=device)
        self._window_steps = 0

    def pop_train_metrics(self) -> dict[str, float] | None:
        """Mean loss (data-parallel mean) and grad norm since the last call; the one host sync per log interval."""
        if self._window_steps == 0:
            return None
        stats = torch.stack([self._loss_sum, self._grad_norm_sum]) / self._window_steps
        if (
            dist.is_initialized()
        ):  # context-parallel ranks hold the losses of different tokens: average them too
            dist.all_reduce(stats, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            stats /= parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        loss, grad_norm = stats.tolist()
        self._reset_train_metrics()
        return {"loss": loss, "grad_norm": grad_norm}

    def on_fit_start(self) -> None:
        """The metric accumulators, created on the CPU before Lightning moved the module, go to its device (the
        synthetic warmup, when there is one, has already done this; without it a GPU run failed at its first
        step)."""
        self._reset_train_metrics()
        self._reset_eval_metrics()

    # ------------------------------------------------------------------ evaluation
    def _reset_eval_metrics(self) -> None:
        device = self.device if self.flux is not None else None
        self._eval_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._eval_count = torch.zeros((), dtype=torch.float64, device=device)

    def on_validation_epoch_start(self) -> None:
        """Evaluation draws from a fork of the training RNG, so evaluating never changes the training stream."""
        self._reset_eval_metrics()
        self._rng_before_eval = rng_state()
        # FP8: the first eval batch quantizes the current weights, the others reuse that copy.
        if self.cfg.precision.fp8:
            refresh_fp8_weights(self.flux)
            self._quantize_in_next_eval_batch = True

    def on_validation_epoch_end(self) -> None:
        set_rng_state(self._rng_before_eval)

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        self.trainer.strategy.eval_mode(True)

    def on_validation_model_train(self) -> None:
        self.trainer.strategy.eval_mode(False)
        super().on_validation_model_train()

    def eval_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-sample losses, number of samples) over the valid rows of a device batch.

        Per-sample MSE at t = timestep / 8 (no dropout, fresh noise); padding rows never count.
        """
        with training_draws():
            inputs = fm.eval_inputs(batch, self.dtype_compute)
        inputs = shard_inputs(inputs)  # context parallel: this rank's tokens
        per_sample = average_over_context_parallel(fm.per_sample_mse(self.predict(inputs), inputs.target))
        valid = batch["valid"]
        return torch.where(valid, per_sample.double(), 0.0).sum(), valid.sum()

    def validation_step(self, batch, batch_idx):
        """Add one batch to the evaluation sums; with graphs, every batch but an FP8 evaluation's first replays.

        The first batch of an FP8 evaluation casts the updated weights into the FP8 copies the linears keep (TE
        updates that workspace in place), and the later batches read them. A graph replays what its capture saw, so
        it can do only one of the two; the evaluation graph does the reading (captured with the cast off, e.g. on a
        synthetic warmup batch), and the first batch runs eagerly (on the graph's stream), as in the eager run.
        """
        eager = self.eval_graph is None or self._quantize_in_next_eval_batch
        self._quantize_in_next_eval_batch = False
        if eager:
            total, count = self.eval_sums(self._to_device(batch))
        else:
            total, count = self.eval_graph(batch)
        self._eval_sum += total
        self._eval_count += count

    def eval_result(self) -> tuple[float, int]:
        """(mean per-sample loss, sample count) over all data-parallel ranks (one host sync per evaluation)."""
        stats = torch.stack([self._eval_sum, self._eval_count])
        if dist.is_initialized():
            dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        total, count = stats.tolist()
        if count == 0:
            raise RuntimeError(f"evaluation saw no valid samples ({self.cfg.data.eval_path})")
        return total / count, int(count)

    # ------------------------------------------------------------------ checkpoint extras
    def train_loader_state(self) -> dict | None:
        """Train-loader position after the samples the optimizer steps consumed.

        Lightning fetches one batch ahead, so the loader's own count is one batch too far: the position is
        ``global_step x (GBS / dp)`` samples into this rank's chunk.
        """
        if self._train_loader is None:
            return self.loader_state
        return {
            **self._train_loader.state_dict(),
            "samples_seen": self.trainer.global_step * self.local_batch_size,
        }
