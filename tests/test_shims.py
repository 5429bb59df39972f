"""The documented Megatron-Core workarounds that need no process group (the rest run in the model and parallel tests)."""

import torch

from flux_nemo.shims import loadable_optimizer_state


def test_loaded_dp_reshardable_entries_keep_the_padding_filter_but_iterate_tensors_only():
    """Megatron 0.16.1 filters a bucket by ``entry["padding"]``, then the precision-aware path hands every
    ``entry.items()`` pair to FusedAdam: after the wrap the filter still works and only tensors are handed on."""
    exp_avg, param, pad = torch.ones(3), torch.zeros(3), torch.zeros(2)
    bucket = [
        {"param": param, "exp_avg": exp_avg, "exp_avg_sq": exp_avg * 2, "padding": False},
        {"param": pad, "exp_avg": pad, "exp_avg_sq": pad, "padding": True},
    ]
    state = {
        "param_groups": [{"lr": 1e-4, "params": [0]}],
        "param_state": {0: {torch.bfloat16: [bucket]}, "per_bucket_numel_unpadded": [{torch.bfloat16: [3]}]},
        "param_state_sharding_type": "dp_reshardable",
    }
    loaded = loadable_optimizer_state(state)
    assert loaded is state and loaded["param_groups"] == [{"lr": 1e-4, "params": [0]}]
    entries = state["param_state"][0][torch.bfloat16][0]
    kept = [e for e in entries if not e["padding"]]  # Megatron's filter, verbatim
    assert len(kept) == 1
    assert [k for k, _ in kept[0].items()] == ["param", "exp_avg", "exp_avg_sq"]
    assert kept[0]["param"] is param and kept[0]["exp_avg"] is exp_avg  # no copies
    assert all(torch.is_tensor(v) for _, v in kept[0].items())
    assert loadable_optimizer_state(state) is state  # idempotent
    assert [k for k, _ in state["param_state"][0][torch.bfloat16][0][0].items()] == [
        "param",
        "exp_avg",
        "exp_avg_sq",
    ]
