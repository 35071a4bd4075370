"""ppu_lab.config: quick mode, and the one thread limiter (torch and BLAS, restored on exit)."""

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from ppu_lab.config import limit_threads


def _blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]


@pytest.fixture
def two_threads():
    """torch and BLAS at 2 threads during the test (so that a limit to 1 shows); the old settings after."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(2):
            assert _blas_threads() and set(_blas_threads()) == {2}, threadpool_info()
            yield
    finally:
        torch.set_num_threads(old)


def test_limit_threads_limits_torch_and_blas_and_restores_them(two_threads):
    with limit_threads(1):
        assert torch.get_num_threads() == 1
        assert set(_blas_threads()) == {1}
    assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}
    with pytest.raises(RuntimeError, match="inside"), limit_threads(1):  # restored on errors too
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}
    with limit_threads(None):  # None: nothing changes
        assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}


def test_limit_threads_rejects_a_bad_count():
    with pytest.raises(ValueError, match="threads must be an integer >= 1"), limit_threads(0):
        pass
