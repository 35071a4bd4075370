"""ppu_lab.hangs without engines: how stacks are read, filtered and written for a student."""

from __future__ import annotations

import faulthandler
import os
import threading

from ppu_lab import hangs
from ppu_lab.hangs import Frame, HangReport, RankState


def _waits_here(path):
    with open(path, "w") as fh:
        faulthandler.dump_traceback(fh, all_threads=True)


def test_faulthandler_dump_is_read_back_to_the_user_frames(tmp_path):
    path = tmp_path / "stack.txt"
    worker = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    worker.start()  # another thread in the dump, which must not be mistaken for the main one
    _waits_here(path)
    frames = hangs.parse_faulthandler(path.read_text(), threading.main_thread().ident)
    here = __file__
    assert [f["file"] for f in frames if f["file"] != here] == []  # pytest, pluggy, stdlib: filtered
    assert [f["function"] for f in frames][-2:] == [
        "test_faulthandler_dump_is_read_back_to_the_user_frames", "_waits_here"]
    assert frames[-1]["line"] == _waits_here.__code__.co_firstlineno + 2
    assert hangs.parse_faulthandler(path.read_text(), 12345) is None  # no such thread


def test_library_frames_are_dropped_user_and_ppu_lab_frames_kept():
    import json
    import ipyparallel

    assert hangs._is_library(json.__file__) and hangs._is_library(ipyparallel.__file__)
    assert hangs._is_library("<string>") and hangs._is_library("<frozen runpy>")
    assert not hangs._is_library(hangs.__file__)  # ppu_lab
    assert not hangs._is_library(__file__)  # the user's own code
    assert not hangs._is_library(os.path.join("/tmp", "ipykernel_4242", "3312.py"))  # a notebook cell


def test_report_text_names_the_call_the_line_and_the_cell():
    barrier = Frame("/tmp/ipykernel_1/30.py", 7, "mismatched", hangs._code("comm.Barrier()  # waits"), "In[30]")
    caller = Frame("/repo/ppu_lab/parallel.py", 12, "step", "mismatched()")
    px = Frame("/tmp/ipykernel_99/5.py", 3, "<module>", "comm.Bcast(w, root=0)", "%%px")
    report = HangReport([RankState(0, 4, "idle"), RankState(1, 5, "busy", [caller, barrier]),
                         RankState(2, 6, "busy", [px]), RankState(3, 7, "no answer", note="no answer within 2 s")])
    assert str(report).splitlines() == [
        "rank 0: idle",
        "rank 1: in `comm.Barrier()` at line 7 of mismatched() (cell In[30])",
        "        called from line 12 of step() (ppu_lab/parallel.py)",
        "rank 2: in `comm.Bcast(w, root=0)` at line 3 of the %%px cell",
        "rank 3: no answer within 2 s",
    ]
    assert report.busy == [1, 2, 3]
    assert "cl.restart()" in hangs.explain("cl.apply(f) got no answer within 2 s.", report)


class _NeverReady:
    """An AsyncResult whose engines never get through MPI_Init."""

    def ready(self):
        return False

    def wait(self, timeout):
        import time
        time.sleep(min(timeout, 0.05))

    def get(self, timeout=None):
        raise TimeoutError


class _StuckCluster:
    """Just what waits.rank_check reads of an MPICluster."""

    def __init__(self, output, timeout=30.0):
        self.n, self.timeout, self.output = 2, timeout, output
        self.client = {(0, 1): self}

    def apply_async(self, probe):
        return _NeverReady()

    def _engine_output(self):
        return self.output


def test_a_known_intermittent_start_failure_ends_the_rank_check_at_once():
    """Slurm's PMI2 server misreading a rank's request leaves the engines in MPI_Init for good: the rank
    check says so within a poll (and start() retries once) instead of waiting its whole timeout."""
    import time

    import pytest

    from ppu_lab import waits
    from ppu_lab.mpiexec import transient_mpi_init_failure

    garbled = ("slurmstepd-ppulab-n2: error: mpi/pmi2: value not properly terminated in client request\n"
               "slurmstepd-ppulab-n2: error: mpi/pmi2: request not begin with 'cmd='")
    assert transient_mpi_init_failure(garbled) and transient_mpi_init_failure("UCX  ERROR failed to unpack address")
    assert not transient_mpi_init_failure("Abort(1): Fatal error in PMPI_Init")
    start = time.monotonic()
    with pytest.raises(waits.ClusterError, match="known intermittent start-up failure[\\s\\S]*cmd="):
        waits.rank_check(_StuckCluster(garbled), (0, 1), probe=None)
    assert time.monotonic() - start < 10  # not the 30 s timeout
    with pytest.raises(waits.ClusterError, match="did not get through MPI_Init .* within 1 s"):
        waits.rank_check(_StuckCluster("engines started", timeout=1.0), (0, 1), probe=None)
