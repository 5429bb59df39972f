"""flux-nemo: MLPerf Training flux1 (Flux.1-schnell) on NeMo / Megatron-Core."""
