"""Which rank's failure a failed data-parallel launch reports, and whether the run was lost.

The ranks fail together: when one raises or dies, the others lose their peer in
their next collective. The error files here are written by torch's own error
handler, as a spawned rank's are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import (
    ChildFailedError,
    ErrorHandler,
    ProcessFailure,
)

from worker.engine.launch import PeerLost, RankFailed, failure_reason


def raised(folder: Path, rank: int, exc: Exception, pid: int = 1000) -> ProcessFailure:
    path = folder / f"error-{rank}.json"
    os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
    try:
        try:
            raise exc
        except Exception as caught:
            ErrorHandler().record_exception(caught)
    finally:
        del os.environ["TORCHELASTIC_ERROR_FILE"]
    return ProcessFailure(local_rank=rank, pid=pid + rank, exitcode=1, error_file=str(path))


def killed(folder: Path, rank: int, signal_number: int = 9) -> ProcessFailure:
    missing = str(folder / f"none-{rank}.json")
    return ProcessFailure(
        local_rank=rank, pid=2000 + rank, exitcode=-signal_number, error_file=missing
    )


def reason(*failures: ProcessFailure) -> tuple[str, bool]:
    return failure_reason(ChildFailedError("train", {f.local_rank: f for f in failures}))


PEER = PeerLost("lost a rank of the run at epoch 3, step 40: Connection reset by peer")


def test_a_rank_s_own_failure_explains_its_peers_losing_it(tmp_path):
    own = RankFailed("data: train.npz field 'y': label 12 is not below the class count 10")
    assert reason(raised(tmp_path, 0, PEER), raised(tmp_path, 1, own)) == (str(own), False)


def test_a_killed_rank_is_a_lost_run_named_by_the_rank_that_died(tmp_path):
    text, lost = reason(raised(tmp_path, 0, PEER), killed(tmp_path, 1))
    assert lost is True
    assert text == "rank 1 (pid 2001) ended by signal SIGKILL; the other ranks were stopped"


def test_a_rank_that_only_lost_its_peer_another_node_is_a_lost_run(tmp_path):
    assert reason(raised(tmp_path, 0, PEER)) == (str(PEER), True)


@pytest.mark.parametrize("exc", [KeyError("position"), ZeroDivisionError("division by zero")])
def test_a_bug_in_a_rank_fails_the_run_with_its_type(tmp_path, exc, capsys):
    text, lost = reason(raised(tmp_path, 1, exc), raised(tmp_path, 0, PEER))
    assert lost is False
    assert text.startswith(f"rank 1 failed: {type(exc).__name__}")
    assert "Traceback" in capsys.readouterr().err  # the traceback goes to stderr
