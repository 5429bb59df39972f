"""parallel.cuda_graph: config validation and the static input buffers of a graphed step (CPU; the capture itself
is covered by test_cuda_graph_gpu.py)."""

import pytest
import torch
from tiny_run import compose_cfg

from flux_nemo.training import cuda_graph
from flux_nemo.training.cuda_graph import StaticInputs, describe_mismatch, signature

GRAPH = "parallel.cuda_graph=full_iteration"


def test_none_is_valid_and_unknown_modes_fail_naming_the_key():
    cuda_graph.validate(compose_cfg())
    with pytest.raises(ValueError, match=r"parallel\.cuda_graph='per_layer'; expected one of"):
        cuda_graph.validate(compose_cfg("parallel.cuda_graph=per_layer"))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (
            [
                "model.backend=local",
                "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true",
            ],
            r"parallel\.sequence_parallel=true with model\.backend=local",
        ),
        (
            ["parallel.num_distributed_optimizer_instances=2"],
            r"parallel\.num_distributed_optimizer_instances",
        ),
        ([], r"needs CUDA"),  # system=cpu (and no CUDA here)
    ],
)
def test_unsupported_combinations_fail_naming_both_keys(overrides, key):
    cfg = compose_cfg(GRAPH, *overrides)
    with pytest.raises(ValueError, match=key) as err:
        cuda_graph.validate(cfg)
    assert "parallel.cuda_graph=full_iteration" in str(err.value)


@pytest.mark.parametrize("precision", ["fp8_delayed", "fp8_current", "fp8_block"])
def test_fp8_recipes_are_not_rejected(precision):
    """Every FP8 recipe is graphed (delayed scaling's amax and scale updates are device work captured with the
    step), so only the CPU check stops them here; on the GPU host test_cuda_graph_gpu.py trains them graphed against
    eager."""
    with pytest.raises(ValueError, match=r"needs CUDA") as err:
        cuda_graph.validate(compose_cfg(GRAPH, "model.backend=te", f"precision={precision}"))
    assert "precision.fp8" not in str(err.value)


@pytest.mark.parametrize("precision, first", [("fp8_current", "eager"), ("bf16", "graph")])
def test_fp8_evaluations_cast_the_weights_in_an_eager_first_batch(precision, first):
    """A graphed evaluation replays only the batches that read the FP8 weight copies: the first batch of each FP8
    evaluation, which casts the updated weights, runs eagerly; synthetic warmup batches (no evaluation started)
    and every bf16 batch replay. The capture itself and the evaluation losses: test_cuda_graph_gpu.py."""
    from flux_nemo.training.module import FluxTrainingModule

    module = FluxTrainingModule(compose_cfg("model.backend=te", f"precision={precision}"))
    module.flux = torch.nn.Linear(2, 2)
    module.flux.is_first_microbatch = False  # what refresh_fp8_weights sets, as on a TE linear
    calls = []

    def record(kind):
        def step(batch):
            calls.append((kind, module.flux.is_first_microbatch))
            module.flux.is_first_microbatch = False  # a TE linear clears it after casting
            return torch.ones((), dtype=torch.float64), torch.ones((), dtype=torch.int64)

        return step

    module.eval_graph, module.eval_sums = record("graph"), record("eager")
    batch = {"mean": torch.zeros(1)}
    module.validation_step(batch, 0)  # a synthetic warmup batch
    for _ in range(2):
        module.on_validation_epoch_start()
        for i in range(3):
            module.validation_step(batch, i)
    fp8 = precision != "bf16"
    assert calls == [("graph", False)] + [(first, fp8), ("graph", False), ("graph", False)] * 2
    assert module._eval_count.item() == 3  # the last evaluation's batches


def test_module_validates_at_construction():
    """The recipe builds the module before anything runs: a CPU run with graphs fails there, naming the key."""
    from flux_nemo.training.module import FluxTrainingModule

    FluxTrainingModule(compose_cfg())  # graphs off: fine on CPU
    with pytest.raises(ValueError, match=r"parallel\.cuda_graph=full_iteration needs CUDA"):
        FluxTrainingModule(compose_cfg(GRAPH))


def test_graphed_step_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        cuda_graph.GraphedStep(lambda inputs: inputs, name="training step")


def _batch(rows: int, fill: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "mean": torch.full((rows, 4, 2, 2), fill, dtype=torch.bfloat16),
        "timestep": torch.arange(rows) % 8,
        "valid": torch.ones(rows, dtype=torch.bool),
    }


def test_static_inputs_copy_into_the_same_buffers():
    static = StaticInputs("cpu", "evaluation step")
    first = static.load(_batch(3, 1.0))
    pointers = {k: v.data_ptr() for k, v in first.items()}
    second = static.load(_batch(3, 2.0))
    assert {k: v.data_ptr() for k, v in second.items()} == pointers  # the addresses a graph reads
    assert torch.equal(second["mean"], torch.full((3, 4, 2, 2), 2.0, dtype=torch.bfloat16))
    assert first["mean"] is second["mean"]
    second["extra"] = torch.zeros(1)  # a caller's change to the returned dict does not leak into the buffers
    assert "extra" not in static.load(_batch(3))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda b: {**b, "mean": b["mean"][:2]},
            r"'mean' is \[2, 4, 2, 2\] torch.bfloat16, expected \[3, 4, 2, 2\]",
        ),
        (
            lambda b: {**b, "timestep": b["timestep"].int()},
            r"'timestep' is \[3\] torch.int32, expected \[3\] torch.int64",
        ),
        (lambda b: {k: v for k, v in b.items() if k != "valid"}, r"missing keys \['valid'\]"),
        (lambda b: {**b, "clip": torch.zeros(3, 8)}, r"unexpected keys \['clip'\]"),
    ],
)
def test_static_inputs_reject_other_keys_shapes_and_dtypes(change, message):
    static = StaticInputs("cpu", "evaluation step")
    static.load(_batch(3))
    with pytest.raises(ValueError, match=r"evaluation step: the inputs differ .*" + message):
        static.load(change(_batch(3)))


def test_signature_needs_tensors_and_describes_every_difference():
    with pytest.raises(TypeError, match="input 'n' is a int, not a tensor"):
        signature({"n": 3})
    a = signature(_batch(3))
    b = signature({"mean": torch.zeros(3, 4, 2, 2), "extra": torch.zeros(1)})
    text = describe_mismatch(a, b)
    assert "missing keys ['timestep', 'valid']" in text
    assert "unexpected keys ['extra']" in text
    assert "'mean' is [3, 4, 2, 2] torch.float32, expected [3, 4, 2, 2] torch.bfloat16" in text
