"""Intra-op threads: each process takes its share of the cores, less its workers; the user can override."""

import pytest
import torch

from stages.core.runtime.threads import intra_op_threads, set_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "cores, processes, workers, want",
    [(16, 1, 0, 16), (16, 8, 0, 2), (16, 1, 4, 12), (16, 8, 2, 1), (2, 1, 2, 1), (64, 8, 4, 4)],
)
def test_share_of_cores_less_workers(cores, processes, workers, want):
    assert intra_op_threads(workers, cores=cores, processes=processes) == want


def test_local_world_size_divides_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert intra_op_threads(0, cores=32) == 8


def test_explicit_count_wins_over_environment(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(1, workers=0) == 1 and torch.get_num_threads() == 1


def test_user_omp_num_threads_is_respected(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_threads(None, workers=0) == torch.get_num_threads() == 1


def test_automatic_count_is_applied(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    want = intra_op_threads(0)
    assert set_threads(None, workers=0) == want and torch.get_num_threads() == want


def test_zero_threads_refused(restore_threads):
    with pytest.raises(ValueError, match="at least 1"):
        set_threads(0, workers=0)
