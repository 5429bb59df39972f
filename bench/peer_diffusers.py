"""The peer baseline: one training step of diffusers' FluxTransformer2DModel, as the GPU host README measured it.

bf16 parameters, fused torch AdamW, eager or torch.compile, batch-first inputs at the MLPerf shape (256 image
tokens of 64 channels, 256 T5 tokens of 4096, CLIP pooled 768). Used by ``bench/train_step.py`` so that our step
and the peer's run in the same process on the same card.
"""

from __future__ import annotations

import torch

from flux_nemo.flow_matching import image_ids


def build_peer(num_double: int, num_single: int, device: torch.device, compile_model: bool):
    """A full-width Flux.1-schnell transformer with ``num_double`` + ``num_single`` blocks (random weights)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=num_double,
        num_single_layers=num_single,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    ).to(device=device, dtype=torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True
    )
    fwd = torch.compile(model) if compile_model else model
    return model, fwd, optimizer


def peer_batch(batch: int, device: torch.device, img_tokens: int = 256, txt_tokens: int = 256):
    """Random inputs at the MLPerf shape; ids as diffusers expects them (2-D)."""
    side = int(img_tokens**0.5)
    img_ids = image_ids(1, side, side, device)[0]
    bf16 = torch.bfloat16
    return {
        "hidden_states": torch.randn(batch, img_tokens, 64, device=device, dtype=bf16),
        "encoder_hidden_states": torch.randn(batch, txt_tokens, 4096, device=device, dtype=bf16),
        "pooled_projections": torch.randn(batch, 768, device=device, dtype=bf16),
        "timestep": torch.rand(batch, device=device, dtype=bf16),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(txt_tokens, 3, device=device),
        "target": torch.randn(batch, img_tokens, 64, device=device, dtype=bf16),
    }


def peer_step(fwd, optimizer, batch: dict, micro_batches: int = 1) -> torch.Tensor:
    """zero_grad, ``micro_batches`` x (forward, fp32 MSE over ``micro_batches``, backward: the gradients add up),
    clip 1.0, AdamW step (the reference's step order); returns the last micro-batch's loss."""
    optimizer.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "target"}
    for _ in range(micro_batches):
        pred = fwd(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), batch["target"].float()) / micro_batches
        loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.detach()
