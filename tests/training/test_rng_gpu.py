"""The training draws' own CUDA stream (flux_nemo.training.rng): seeded per data-parallel rank, and independent of
what else advances the default CUDA generator (Transformer Engine's fused attention does, on every call)."""

import pytest
import torch
from megatron.core import tensor_parallel

from flux_nemo.training.rng import STREAM, add_training_stream, training_draws

pytestmark = pytest.mark.gpu


def _reseed(seed: int, dp_rank: int) -> None:
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # resets the tracker, as initialize_megatron does
    torch.manual_seed(seed + dp_rank)
    add_training_stream(seed, dp_rank)


def _draws(consume_default: bool) -> list[torch.Tensor]:
    out = []
    for _ in range(3):
        with training_draws():
            out.append(torch.randn(1000, device="cuda"))
        if consume_default:  # what a library does between two draws of the step
            torch.randn(12345, device="cuda")
    return out


def test_training_draws_do_not_depend_on_the_default_generator(megatron_world):
    _reseed(7, 0)
    assert STREAM in tensor_parallel.get_cuda_rng_tracker().get_states()
    plain = _draws(consume_default=False)
    _reseed(7, 0)
    disturbed = _draws(consume_default=True)
    for a, b in zip(plain, disturbed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain[0], plain[1])  # the stream advances

    _reseed(7, 1)  # another data-parallel rank draws other noise
    assert not torch.equal(_draws(consume_default=False)[0], plain[0])

    _reseed(7, 0)  # and the default generator is not the stream
    assert not torch.equal(torch.randn(1000, device="cuda"), plain[0])


def test_a_saved_state_without_the_stream_keeps_it(megatron_world, caplog):
    """A checkpoint from before the training draws had their own stream restores the other states; the stream
    stays registered (the draws would otherwise fall back to the default generator) and a warning names it."""
    from flux_nemo.training.checkpoint import rng_state, set_rng_state

    _reseed(7, 0)
    old = rng_state()
    del old["tracker"][STREAM]
    expected = _draws(consume_default=False)  # the stream's next draws, from where it is now
    _reseed(7, 0)
    set_rng_state(old)
    assert "flux-training-rng" in caplog.text
    assert STREAM in tensor_parallel.get_cuda_rng_tracker().get_states()
    for a, b in zip(_draws(consume_default=False), expected, strict=True):
        assert torch.equal(a, b)
