"""FP8 through the block runner: Transformer Engine's cached FP8 weights follow the optimizer (GPU)."""

import pytest
import torch
from flux_testing import make_inputs, randomize_
from tiny_run import compose_cfg

from flux_nemo.training.model_builder import build_model

pytestmark = pytest.mark.gpu


def test_fp8_weights_are_requantized_at_every_step(megatron_world):
    """TE linears quantize their weights on the first micro-batch of a step and reuse that FP8 copy afterwards
    (``is_first_microbatch``). ``refresh_fp8_weights`` marks a new step; without it a trained model would keep
    running the FP8 copy of its first weights."""
    pytest.importorskip("transformer_engine")
    from flux_nemo.training.block_runner import refresh_fp8_weights

    cfg = compose_cfg("model.backend=te", "precision=fp8_current")  # current scaling: no amax history
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = randomize_(build_model(cfg, device), seed=0).train()
    inputs = {k: v.to(device) for k, v in make_inputs(model.config, 2, 4, 4, 16).items()}
    inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"][:1], inputs["txt_ids"][:1]

    def update_weights(seed):  # what an optimizer step does to the parameters
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))

    def fresh_forward():  # a new model holding the current weights quantizes them from scratch
        fresh = build_model(cfg, device).train()
        weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        fresh.load_state_dict(weights, strict=False)
        return fresh(**inputs)

    refresh_fp8_weights(model)
    model(**inputs)  # step 1 quantizes and caches the weights
    update_weights(1)
    stale = model(**inputs)  # same step (no refresh): the cached FP8 weights of step 1
    refresh_fp8_weights(model)
    fresh = model(**inputs)  # new step: re-quantized
    expected = fresh_forward()
    err_fresh = ((fresh.float() - expected.float()).abs().amax() / expected.float().abs().amax()).item()
    err_stale = ((stale.float() - expected.float()).abs().amax() / expected.float().abs().amax()).item()
    print(f"FP8 output vs a fresh model: refreshed {err_fresh:.3e}, without refresh {err_stale:.3e}")
    assert err_fresh < 1e-3
    assert err_stale > 10 * max(err_fresh, 1e-4), "TE did not cache the FP8 weights: the refresh is moot"
