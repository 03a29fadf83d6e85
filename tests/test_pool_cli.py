"""``glm pool`` as a real process on a tiny checkpoint at tp=2: it launches both ranks,
which answer Health on their unix sockets; a rank killed with SIGKILL makes the pool
stop the other and exit non-zero (137) in bounded time; SIGTERM stops every rank and
exits 0. No rank outlives the pool."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.proto_gen.glm.v1 import shard_pb2_grpc

pytestmark = [pytest.mark.processes, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
TP = 2
READY_S = 120.0            # the pool's --ready-timeout-s and the test's wait: only a hang reaches it
EXIT_S = 60.0              # after the signal: --stop-grace-s 3 is the protocol bound, the rest only catches a hang


@pytest.fixture(scope="module")
def ckpt(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=11)


def _healthy(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            shard_pb2_grpc.ShardServiceStub(channel).Health(pb.HealthRequest(), timeout=1.0)
        return True
    except grpc.RpcError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not running: its parent (the pool) is gone or will reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _rank_pids(log: Path) -> list[int]:
    match = re.search(r"started \d+ rank\(s\): pids ([\d ]+)", log.read_text(errors="replace"))
    return [int(p) for p in match.group(1).split()] if match else []


@pytest.fixture
def pool(ckpt, tmp_path):
    """A running `glm pool --tp 2`: (process, its log, rank pids), every rank answering Health."""
    sockets = Path(f"/tmp/glm-pool-test-{os.getpid()}-{time.monotonic_ns()}")   # short: unix socket paths
    log = tmp_path / "pool.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "pool", "--checkpoint", ckpt, "--tp", str(TP),
             "--socket-dir", str(sockets), "--kv-memory-gib", "0.002", "--threads", "1", "--stop-grace-s", "3",
             "--ready-timeout-s", str(READY_S)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
    pids: list[int] = []
    try:
        addresses = [f"unix://{sockets}/rank-{r}.sock" for r in range(TP)]
        deadline = time.monotonic() + READY_S
        while not (len(pids) == TP and all(_healthy(a) for a in addresses)):
            assert proc.poll() is None, f"glm pool exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the ranks were not ready in {READY_S} s:\n{log.read_text()}"
            time.sleep(0.2)
            pids = pids or _rank_pids(log)
        yield proc, log, pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids or _rank_pids(log):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for leftover in sockets.glob("*"):
            leftover.unlink(missing_ok=True)
        if sockets.exists():
            sockets.rmdir()


def _wait_exit(proc: subprocess.Popen, log: Path) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"glm pool still running {EXIT_S} s later:\n{log.read_text()}")
    return code, time.monotonic() - t0


def test_a_killed_rank_stops_the_pool_non_zero(pool):
    proc, log, pids = pool
    os.kill(pids[1], signal.SIGKILL)
    code, _ = _wait_exit(proc, log)
    assert code == 128 + signal.SIGKILL, log.read_text()
    assert not any(_alive(pid) for pid in pids), log.read_text()
    assert "rank 1 exited" in log.read_text()


def test_sigterm_stops_every_rank_and_exits_zero(pool):
    proc, log, pids = pool
    proc.send_signal(signal.SIGTERM)
    code, _ = _wait_exit(proc, log)
    assert code == 0, log.read_text()
    assert not any(_alive(pid) for pid in pids), log.read_text()
