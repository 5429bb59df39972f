"""The idle-interval arithmetic of ``bench/gpu_idle.py`` (the profiler part needs a GPU)."""

from bench.gpu_idle import busy_intervals, gaps


def test_overlapping_kernels_merge_and_gaps_name_their_neighbours():
    kernels = [  # (start_us, end_us, name) on two streams, out of order
        (30.0, 40.0, "c"),
        (0.0, 10.0, "a"),
        (5.0, 12.0, "b"),  # overlaps a: one busy span ending with b
        (12.0, 20.0, "b2"),  # touches it: still the same span
        (100.0, 110.0, "d"),
        (102.0, 104.0, "e"),  # inside d
    ]
    spans = busy_intervals(kernels)
    assert spans == [(0.0, 20.0, "a", "b2"), (30.0, 40.0, "c", "c"), (100.0, 110.0, "d", "d")]
    assert gaps(spans, min_us=5.0) == [(20.0, 10.0, "b2", "c"), (40.0, 60.0, "c", "d")]
    assert gaps(spans, min_us=20.0) == [(40.0, 60.0, "c", "d")]
