"""``bench/gpu_check.py --device cpu`` runs every path the GPU run takes (but the CUDA
kernels and the capture, which it says it skips) end to end on a shortened model, so the
first GPU run cannot fail on a typo; its last line is the JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.processes, pytest.mark.slow]


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--preset", "glm-tiny",
           "--layers", "2", "--quick", "--context", "24", "--prefill", "64", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the CUDA kernels are skipped" in proc.stdout and "no capture" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text()) and summary["failures"] == 0
    assert len(summary["kernels"]) == 4 * 2 * 2 and all(r["ok"] for r in summary["kernels"])
    assert any("host_rel_err" in r for r in summary["kernels"])
    assert len(summary["paged"]) == 1 and summary["paged"][0]["ok"]          # kernels.cpu_paged vs the reference
    assert summary["copy_gbps"] > 0 and all(r["gbps"] > 0 for r in summary["gemv"])
    decode = summary["model"]["decode"]
    assert [r["batch"] for r in decode] == [1, 8]
    for r in decode:
        assert r["eager_ms"] > 0 and r["graphs_ms"] > 0 and r["floor_ms"] > 0
        assert r["graphs_ok"] and r["static_steps"] > 0        # the static path ran, and agreed
    assert summary["model"]["prefill"]["tokens"] == 64 and summary["model"]["layers"] == 2
    assert summary["model"]["paged_kernel"] and summary["model"]["kv_pool_gb"] > 0
