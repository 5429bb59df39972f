"""The ``+option`` suffixes shared by the benchmarks: each names the recipe overrides it adds to a precision."""

OPTIONS = {
    "fused": ["model.modulation_fusion=true"],
    "paopt": ["precision.precision_aware_optimizer=true"],
    "qkrope": ["model.qk_norm_rope_fusion=true"],
    # bf16 gradient buffers and reduction; with paopt TE FusedAdam reads them as they are
    "bf16grad": ["precision.grad_reduce_in_fp32=false", "precision.mlperf_comm=bfloat16"],
    "bf16adam": ["precision.adam_moments_dtype=bf16"],  # needs paopt
    "remainders": ["precision.store_param_remainders=true"],  # needs paopt
    "blockgroups": ["parallel.optimizer_groups_per_block=true"],  # one Adam param group per block
    "permbmod": ["train.modulations_once_per_step=false"],  # the adaLN modulations in every micro-batch
}
