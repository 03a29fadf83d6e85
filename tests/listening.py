"""Where a port listens: the local addresses of the TCP listening sockets on it (``ss``)."""

from __future__ import annotations

import shutil
import subprocess


def listening_hosts(port: int) -> set[str]:
    """The hosts of every TCP socket listening on ``port`` (``127.0.0.1``, ``0.0.0.0``,
    ``*``, ``[::]``...), from ``ss -ltnH``; an empty set when nothing listens there."""
    ss = shutil.which("ss")
    assert ss, "ss (iproute2) is needed to read the listening sockets"
    out = subprocess.run([ss, "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    hosts = set()
    for line in out.splitlines():
        local = line.split()[3]                       # State Recv-Q Send-Q Local:Port Peer:Port
        hosts.add(local.rpartition(":")[0])
    return hosts
