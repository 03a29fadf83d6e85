"""From per-request timings to the figures a serving benchmark reports: throughput
(completed requests/s, generated tokens/s), time to first token (TTFT) and inter-token latency
(ITL), each as mean, p50 and p99, and the ratios between batching modes.

Definitions (times on the client's clock, ``time.perf_counter``):

* TTFT: from sending the request to the first streamed message that carries tokens.
* ITL: per token. A message of k tokens arriving g seconds after the previous token message of
  the same request contributes k samples of g/k (the first message contributes none). A
  scheduler that streams one token per step gives one sample per message.
* latency: from sending the request to its last message.
* client wait: from the planned (Poisson) arrival to the send, when ``--concurrency`` calls
  were already in flight; ``ttft_from_arrival`` = client wait + TTFT.
* throughput: over the window from the first send to the last message of the mode.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    """What one benchmark request measured: when it was planned, sent, got its first and last
    token, and every streamed message's arrival."""

    index: int
    requested_tokens: int
    scheduled_s: float                  # planned arrival (workload), from the run's start
    sent_s: float | None = None         # when the call went out (later if --concurrency was full)
    first_token_s: float | None = None
    finished_s: float | None = None     # the message with finish_reason
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in it)
    prompt_tokens: int = 0              # usage of the last message
    generated_tokens: int = 0
    finish_reason: str = ""
    error: str = ""
    count_source: str = ""              # OpenAI streams: which rule counted the tokens (openai_client)

    @property
    def streamed_tokens(self) -> int:
        return sum(n for _, n in self.token_times)

    @property
    def completed(self) -> bool:
        return self.finished_s is not None and not self.error


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict[str, float | int | None]:
    return {"count": len(values), "mean": sum(values) / len(values) if values else None,
            "p50": percentile(values, 50), "p99": percentile(values, 99)}


def itl_samples(token_times: list[tuple[float, int]]) -> list[float]:
    """Per-token gaps of one request (see the module docstring)."""
    out: list[float] = []
    for (before, _), (at, n) in zip(token_times, token_times[1:]):
        out.extend([(at - before) / n] * n)
    return out


def summarise(results: list[RequestResult]) -> dict:
    """One mode's report."""
    sent = [r for r in results if r.sent_s is not None]
    done = [r for r in results if r.completed]
    ends = [r.finished_s if r.finished_s is not None else r.token_times[-1][0]
            for r in sent if r.finished_s is not None or r.token_times]
    start = min((r.sent_s for r in sent), default=0.0)
    elapsed = max(ends, default=start) - start
    tokens = sum(r.streamed_tokens for r in results)
    return {
        "requests": len(results),
        "sent": len(sent),
        "completed": len(done),
        "failed": sum(1 for r in results if r.error),
        "requested_tokens": sum(r.requested_tokens for r in results),
        "generated_tokens": tokens,
        "completed_tokens_match": all(r.streamed_tokens == r.generated_tokens == r.requested_tokens
                                      for r in done),
        "elapsed_s": elapsed,
        "throughput_rps": len(done) / elapsed if elapsed > 0 else None,
        "throughput_tok_s": tokens / elapsed if elapsed > 0 else None,
        "ttft_s": distribution([r.first_token_s - r.sent_s for r in sent if r.first_token_s is not None]),
        "itl_s": distribution([g for r in sent for g in itl_samples(r.token_times)]),
        "latency_s": distribution([r.finished_s - r.sent_s for r in done]),
        # as the server counted (a request the client ended early has no final count)
        "prompt_tokens": distribution([float(r.prompt_tokens) for r in done if r.prompt_tokens]),
        "client_wait_s": distribution([r.sent_s - r.scheduled_s for r in sent]),
        "ttft_from_arrival_s": distribution([r.first_token_s - r.scheduled_s for r in sent
                                             if r.first_token_s is not None]),
        "errors": sorted({r.error for r in results if r.error})[:5],
        **({"token_count_source": dict(Counter(r.count_source for r in sent if r.count_source))}
           if any(r.count_source for r in sent) else {}),
    }


RATIO_METRICS = (
    ("throughput_tok_s", ("throughput_tok_s",)),
    ("throughput_rps", ("throughput_rps",)),
    ("ttft_p50", ("ttft_s", "p50")),
    ("ttft_p99", ("ttft_s", "p99")),
    ("itl_p50", ("itl_s", "p50")),
    ("itl_p99", ("itl_s", "p99")),
)


def _pick(report: dict, path: tuple[str, ...]) -> float | None:
    value = report
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def ratio_row(report: dict, other: dict) -> dict[str, float | None]:
    """Each of ``RATIO_METRICS`` as report ÷ other (None where either is missing or other is 0)."""
    row = {}
    for name, path in RATIO_METRICS:
        a, b = _pick(report, path), _pick(other, path)
        row[name] = a / b if a is not None and b else None
    return row


def ratios(reports: dict[str, dict], base: str = "continuous") -> dict[str, dict[str, float | None]]:
    """``{"<base>_vs_<other>": {metric: base ÷ other}}`` for every other mode reported.
    Throughput ratios above 1 and latency ratios below 1 favour ``base``."""
    if base not in reports:
        return {}
    return {f"{base}_vs_{other}": ratio_row(reports[base], report)
            for other, report in reports.items() if other != base}


def peer_ratios(reports: dict[str, dict], peer: str) -> dict[str, dict[str, float | None]]:
    """``{"<row>_vs_<peer>": {metric: row ÷ peer}}`` for every row but the peer's: ours ÷ theirs,
    above 1 favours ours for throughput, below 1 for TTFT and ITL."""
    if peer not in reports:
        return {}
    return {f"{name}_vs_{peer}": ratio_row(report, reports[peer])
            for name, report in reports.items() if name != peer}
