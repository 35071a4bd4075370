"""ppu_lab.timeline: spans, overlaps, Chrome trace and Gantt chart (no MPI), then traced runs under mpiexec."""

import json

import numpy as np
import pytest

from ppu_lab.timeline import Timeline


def synthetic(overlap=False):
    """Two ranks, two steps: compute, wait, comm, update; rank 1 computes longer (rank 0 waits)."""
    rows = []
    for r, work in ((0, 1.0), (1, 3.0)):
        t = 0.0
        for step in range(2):
            for name, dur in (("compute", work), ("wait", 3.0 - work), ("comm", 0.5), ("update", 0.2)):
                rows.append((r, step, name, t, t + dur))
                t += dur
    if overlap:
        rows.append((1, 1, "extra", 4.0, 4.6))     # inside rank 1's step-1 spans
    r, s, n, a, b = zip(*rows)
    return Timeline(np.array(r), np.array(s), np.array(n, dtype=object), np.array(a), np.array(b), size=2)


def test_per_step_means_and_rows():
    tl = synthetic()
    per = tl.per_step()
    assert np.allclose(per["compute"], [1.0, 3.0]) and np.allclose(per["wait"], [2.0, 0.0])
    assert np.allclose(per["comm"], [0.5, 0.5])
    rows = tl.rows()
    assert list(rows) == [0, 1] and all(np.all(np.diff(tl.start[i]) >= 0) for i in rows.values())
    assert tl.overlaps() == []


def test_overlapping_spans_are_found():
    bad = synthetic(overlap=True).overlaps()
    assert bad and all(r == 1 for r, _, _ in bad)


def test_window_keeps_steps_and_restarts_the_clock():
    w = synthetic().window(1, 1)
    assert set(w.step.tolist()) == {1} and w.start.min() == 0.0
    with pytest.raises(ValueError, match="no spans"):
        synthetic().window(5, 6)


def test_chrome_trace_is_what_perfetto_reads(tmp_path):
    tl = synthetic()
    trace = tl.to_chrome(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text()) == trace
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(tl.start) and {e["pid"] for e in spans} == {0, 1}
    first = min(spans, key=lambda e: (e["pid"], e["ts"]))
    assert first["name"] == "compute" and first["ts"] == 0 and first["dur"] == 1e6  # microseconds
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert names == ["rank 0", "rank 1"]


def test_gantt_draws_one_row_per_rank():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    assert synthetic().gantt(ax=ax) is ax
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["comm", "compute", "update", "wait"]
    assert "ms" in ax.get_xlabel()
    plt.close(fig)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_traced_runs_under_mpiexec(mpirun, mnist_root, tmp_path, n):
    """One row per rank, no overlaps, the straggler shows as waiting elsewhere, clocks aligned, train()
    unchanged by tracing (tests/mpi/timeline_trace.py asserts on rank 0)."""
    proc = mpirun(n, "timeline_trace.py", mnist_root, tmp_path, timeout=180)
    assert f"timeline ok on {n} ranks" in proc.stdout
