"""``glm bench serve``: the pure parts (percentiles, ITL samples, Poisson arrivals, the seeded
workload, the summary and the ratios) and one real run of two modes on the glm-tiny model."""

from __future__ import annotations

import json
import random

import pytest

from services.bench.stats import RequestResult, itl_samples, percentile, ratios, summarise
from services.bench.workload import PROMPTS, make_workload, poisson_arrivals
from services.cli.main import main


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_itl_counts_every_token_of_a_message():
    # first message gives no gap; a 3-token message 0.6 s later gives three gaps of 0.2 s
    assert itl_samples([(1.0, 1), (1.5, 1), (2.1, 3)]) == pytest.approx([0.5, 0.2, 0.2, 0.2])
    assert itl_samples([(1.0, 4)]) == []


def test_poisson_arrivals_have_the_requested_rate():
    times = poisson_arrivals(20000, 8.0, random.Random(1))
    assert all(b > a for a, b in zip(times, times[1:]))
    assert times[-1] / len(times) == pytest.approx(1 / 8.0, rel=0.03)
    assert poisson_arrivals(5, 0, random.Random(1)) == [0.0] * 5
    assert poisson_arrivals(3, float("inf"), random.Random(1)) == [0.0] * 3


def test_workload_is_seeded_and_mixed():
    a = make_workload(200, rate=4, min_new_tokens=8, max_new_tokens=64, seed=5)
    assert a == make_workload(200, rate=4, min_new_tokens=8, max_new_tokens=64, seed=5)
    assert a != make_workload(200, rate=4, min_new_tokens=8, max_new_tokens=64, seed=6)
    assert {r.max_new_tokens for r in a} <= set(range(8, 65)) and len({r.max_new_tokens for r in a}) > 20
    assert len({r.prompt for r in a}) == len(PROMPTS)
    assert [r.index for r in a] == list(range(200))
    with pytest.raises(ValueError):
        make_workload(1, rate=1, min_new_tokens=9, max_new_tokens=8, seed=0)


def test_prompt_set_covers_both_languages_both_masks_and_lengths():
    assert any("[gMASK]" in p for p in PROMPTS) and any("[MASK]" in p for p in PROMPTS)
    assert any(any("\u4e00" <= c <= "\u9fff" for c in p) for p in PROMPTS)
    assert any(p.isascii() for p in PROMPTS)
    assert min(map(len, PROMPTS)) < 20 < 300 < max(map(len, PROMPTS))
    assert all(p.count("MASK]") == 1 for p in PROMPTS)   # one blank: output length = max_new_tokens


def _done(index, sent, tokens, gap, requested=None):
    r = RequestResult(index, requested or tokens, scheduled_s=sent, sent_s=sent,
                      finish_reason="length", generated_tokens=tokens)
    r.token_times = [(sent + 0.1 + i * gap, 1) for i in range(tokens)]
    r.first_token_s = r.token_times[0][0]
    r.finished_s = r.token_times[-1][0]
    return r


def test_summary_counts_and_rates():
    results = [_done(0, 0.0, 5, 0.1), _done(1, 0.5, 3, 0.2), RequestResult(2, 7, scheduled_s=9.0, error="x")]
    s = summarise(results)
    assert (s["requests"], s["sent"], s["completed"], s["failed"]) == (3, 2, 2, 1)
    assert s["generated_tokens"] == 8 and s["requested_tokens"] == 15
    assert s["completed_tokens_match"]
    assert s["elapsed_s"] == pytest.approx(1.0)           # 0.0 -> 0.5 + 0.1 + 2 * 0.2
    assert s["throughput_tok_s"] == pytest.approx(8.0) and s["throughput_rps"] == pytest.approx(2.0)
    assert s["ttft_s"]["p50"] == pytest.approx(0.1)
    assert s["itl_s"]["count"] == 6 and s["itl_s"]["p99"] == pytest.approx(0.2)
    assert not summarise([_done(0, 0.0, 4, 0.1, requested=6)])["completed_tokens_match"]


def test_ratios_are_base_over_other():
    fast = {"throughput_tok_s": 30.0, "throughput_rps": 3.0, "ttft_s": {"p50": 0.1, "p99": 0.2},
            "itl_s": {"p50": 0.05, "p99": 0.1}}
    slow = {"throughput_tok_s": 10.0, "throughput_rps": 1.0, "ttft_s": {"p50": 1.0, "p99": 2.0},
            "itl_s": {"p50": 0.025, "p99": None}}
    out = ratios({"continuous": fast, "sequential": slow})
    assert list(out) == ["continuous_vs_sequential"]
    row = out["continuous_vs_sequential"]
    assert row["throughput_tok_s"] == pytest.approx(3.0) and row["ttft_p50"] == pytest.approx(0.1)
    assert row["itl_p50"] == pytest.approx(2.0) and row["itl_p99"] is None
    assert ratios({"sequential": slow}) == {}


@pytest.mark.processes                 # glm bench serve starts a whole stack
@pytest.mark.slow
def test_bench_serve_two_modes_on_tiny(tmp_path, capsys):
    from model.tiny import init_tiny

    init_tiny(tmp_path / "ckpt", preset="glm-tiny", seed=3)
    code = main(["bench", "serve", "--checkpoint", str(tmp_path / "ckpt"), "--modes", "continuous,static",
                 "--requests", "6", "--rate", "30", "--min-new-tokens", "2", "--max-new-tokens", "8",
                 "--warmup", "1", "--duration-s", "60", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["cores"] >= 1 and report["settings"]["requests"] == 6
    expected = sum(r.max_new_tokens for r in make_workload(6, rate=30, min_new_tokens=2, max_new_tokens=8, seed=0))
    for mode in ("continuous", "static"):
        r = report["modes"][mode]
        assert (r["requests"], r["sent"], r["completed"], r["failed"]) == (6, 6, 6, 0)
        assert r["generated_tokens"] == r["requested_tokens"] == expected
        assert r["completed_tokens_match"]
        assert r["throughput_tok_s"] > 0 and r["throughput_rps"] > 0
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] <= r["latency_s"]["p99"]
        assert 0 < r["itl_s"]["count"] <= expected - 6      # the first message of each has no gap
        assert set(r["cpu"]) == {"workers", "schedulers", "gateway", "redis", "load generator"}
        assert r["cpu"]["workers"] > 0 and all(share >= 0 for share in r["cpu"].values())
    row = report["ratios"]["continuous_vs_static"]
    assert all(row[k] is not None and row[k] > 0 for k in ("throughput_tok_s", "throughput_rps", "ttft_p50"))


def test_cpu_split_tells_a_busy_process_from_a_sleeping_one():
    import subprocess
    import sys

    from services.bench.cpu_split import CpuSplit, cpu_seconds

    burn = ("import sys, time\nsys.stdin.readline()\nend = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\nprint(flush=True)\ntime.sleep(60)")
    busy = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        split = CpuSplit({"busy": [busy.pid], "idle": [idle.pid], "none": []})
        split.start()
        busy.stdin.write("go\n")                        # it burns 0.3 s of CPU only after start()
        busy.stdin.flush()
        busy.stdout.readline()                          # ... and says when it has
        assert cpu_seconds(busy.pid) >= 0.3
        shares = split.report()
        assert set(shares) == {"busy", "idle"}          # a name without processes is left out
        assert shares["busy"] > shares["idle"] >= 0
    finally:
        busy.kill(), idle.kill()
        busy.wait(), idle.wait()
