"""Model FLOPs per training sample (forward + backward = 3x forward matmul FLOPs, a multiply-add counted as 2).

Counts every matmul of the network and the two attention matmuls (``Q K^T`` and ``P V``); elementwise work is
not counted. For Flux.1-schnell at 256 image + 256 text tokens this gives 0.3576 TFLOP per block per sample for
the token-wise work and attention of a block (double and single blocks cost the same: 12 h^2 per token), plus the
per-sample modulation, and 20.4 TFLOP for the whole model (NVIDIA's MLPerf configs use 20.3).
"""

from __future__ import annotations

TRAIN_FACTOR = 3  # backward = 2x forward


def _linear(n_in: int, n_out: int, rows: int) -> int:
    return 2 * n_in * n_out * rows


def attention_flops(hidden: int, tokens: int) -> int:
    """Forward FLOPs of ``softmax(Q K^T) V`` over ``tokens`` joint tokens (all heads)."""
    return 2 * _linear(hidden, tokens, tokens)


def double_block_flops(
    hidden: int, ffn: int, img_tokens: int, txt_tokens: int, modulation: bool = True
) -> int:
    """Forward FLOPs of one double-stream block (each stream: qkv, proj, 2-layer MLP; joint attention)."""
    tokens = img_tokens + txt_tokens
    per_token = _linear(hidden, 3 * hidden, 1) + _linear(hidden, hidden, 1) + 2 * _linear(hidden, ffn, 1)
    mod = 2 * _linear(hidden, 6 * hidden, 1) if modulation else 0
    return per_token * tokens + attention_flops(hidden, tokens) + mod


def single_block_flops(hidden: int, ffn: int, tokens: int, modulation: bool = True) -> int:
    """Forward FLOPs of one single-stream block (linear1 = qkv + MLP in, linear2 = proj + MLP out)."""
    per_token = _linear(hidden, 3 * hidden + ffn, 1) + _linear(hidden + ffn, hidden, 1)
    mod = _linear(hidden, 3 * hidden, 1) if modulation else 0
    return per_token * tokens + attention_flops(hidden, tokens) + mod


def flops_per_sample(config, img_tokens: int, txt_tokens: int) -> int:
    """Training FLOPs per sample of a ``FluxConfig``-like object with ``img_tokens`` + ``txt_tokens`` tokens."""
    h, ffn = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    tokens = img_tokens + txt_tokens
    embed = (
        _linear(config.in_channels, h, img_tokens)  # img_in
        + _linear(config.context_in_dim, h, txt_tokens)  # txt_in
        + _linear(256, h, 1)
        + _linear(h, h, 1)  # time_in
        + _linear(config.vec_in_dim, h, 1)
        + _linear(h, h, 1)  # vector_in
        + _linear(h, 2 * h, 1)  # final adaLN
        + _linear(h, config.in_channels, img_tokens)  # final linear
    )
    blocks = config.num_double_blocks * double_block_flops(h, ffn, img_tokens, txt_tokens)
    blocks += config.num_single_blocks * single_block_flops(h, ffn, tokens)
    return TRAIN_FACTOR * (embed + blocks)
