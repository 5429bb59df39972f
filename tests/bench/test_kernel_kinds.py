"""``bench/kernel_kinds.py``: kernel names from the H100 traces sort into their kinds; per-step totals."""

import json

from bench.kernel_kinds import by_kind, from_chrome_trace, kind, table

NAMES = {  # kernel names as the thirteenth session's H100 trace has them (shortened), and their kind
    "nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT": "gemm",
    "void cublasLt::epilogue::impl::globalKernelBgradAB_v2<8, 128, __nv_bfloat16, __nv_bfloat16, float>": "gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float>": "gemm",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128": "attention",
    "void cudnn::fusion::compute_dot_do_o_specialized<true, 128>": "attention",
    "cast_transpose_optimized_kernel(__nv_bfloat16 const*, float const*, __nv_fp8_e4m3*": "fp8 cast/amax",
    "triton_red_fused_add_mul_native_layer_norm_0": "compiled (triton)",
    "void multi_tensor_apply_kernel<TensorListMetadata<5, false>, multi_tensor_adam": "adam/multi-tensor",
    "void at::native::vectorized_elementwise_kernel<8, at::native::GeluBackwardCUDAKernelImpl": "gelu",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy_vectorized<OpaqueType<2u>>": "concat",
    "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>": "add",
    "void at::native::elementwise_kernel<128, 4, gpu_kernel_impl_nocast<direct_copy_kernel_cuda>>": "copy",
    "void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>>": "fill",
    "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16, func_wrapper>>": "reduction",
    "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL": "nccl",
    "void at::native::vectorized_elementwise_kernel<8, silu_kernel>": "other",
}


def test_names_sort_into_kinds():
    assert {name: kind(name) for name in NAMES} == NAMES


def test_per_step_totals_largest_first(tmp_path):
    events = [
        {"cat": "kernel", "name": "nvjet_a", "dur": 300.0},
        {"cat": "kernel", "name": "nvjet_b", "dur": 100.0},
        {"cat": "kernel", "name": "triton_poi_fused_x", "dur": 100.0},
        {"cat": "kernel", "name": "triton_red_fused_y", "dur": 100.0},
        {"cat": "cpu_op", "name": "aten::mm", "dur": 999.0},  # not a kernel
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    rows = by_kind(from_chrome_trace(str(trace)), steps=2)
    assert rows == [("gemm", 0.2, 1), ("compiled (triton)", 0.1, 1)]
    assert table(rows).splitlines()[-1] == "| total | 0.30 | 2 |"
