"""The figures of ``glm bench step`` (``services.bench.step``) from its raw timings: ms,
tokens/s, bytes moved, bandwidth fractions, FLOP rates, memory against ``glm plan``; and the
table it prints. Pure arithmetic, no torch.

Bytes and FLOPs are per rank, summed over the ``tp`` ranks (the shards are the same size) and
divided by rank 0's time; the bandwidth is the whole machine's, so on TP > 1 the fraction is
that of the machine all ranks share.
"""

from __future__ import annotations

import statistics

GB = 1e9
MIB = 1 << 20


def _median(seconds: list[float]) -> float:
    return statistics.median(seconds)


def _p90(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def _ms(seconds: list[float]) -> dict:
    return {"median": _median(seconds) * 1e3, "p90": _p90(seconds) * 1e3}


def kv_read_bytes(rank: dict, batch: int, kv_length: float) -> int:
    """Keys and values of every layer attention reads for one new token per row."""
    layers = rank["config"]["num_layers"]
    return int(2 * layers * batch * kv_length * rank["hidden_local"] * rank["dtype_bytes"])


def decode_row(rank: dict, row: dict, tp: int, bandwidth: float) -> dict:
    """One batch size: times, per-layer split, bytes, bandwidth fraction, FLOP rate, step ratio."""
    b, layers = row["batch"], rank["config"]["num_layers"]
    forward, step = _median(row["forward"]), _median(row["step"])
    head, embed = _median(row["head"]), _median(row["embed"])
    weights = sum(rank["bytes"].values())
    kv = kv_read_bytes(rank, b, row["kv_length"])
    moved = (weights + kv) * tp
    h = rank["config"]["hidden_size"]
    flops = tp * (2 * b * (rank["linear_params"] + rank["vocab_local"] * h)
                  + 4 * b * row["kv_length"] * rank["hidden_local"] * layers)
    head_bytes = rank["bytes"]["embedding"] * tp
    return {
        "batch": b, "kv_length": row["kv_length"],
        "forward_ms": _ms(row["forward"]), "step_ms": _ms(row["step"]),
        "head_ms": _ms(row["head"]), "embed_ms": _ms(row["embed"]),
        "layer_ms": (forward - head - embed) / layers * 1e3,
        "step_over_forward": step / forward,
        "forward_tok_s": b / forward, "step_tok_s": b / step,
        "bytes": {"weights": weights * tp, "kv_cache": kv * tp, "total": moved},
        "forward_gb_s": moved / forward / GB, "forward_bandwidth_fraction": moved / forward / bandwidth,
        "head_gb_s": head_bytes / head / GB, "head_bandwidth_fraction": head_bytes / head / bandwidth,
        "forward_gflop_s": flops / forward / GB,
    }


def prefill_row(rank: dict, prefill: dict, tp: int) -> dict:
    """A prefill of ``tokens`` at batch 1 (attention over the whole prompt, LM head on the last)."""
    n, layers, h = prefill["tokens"], rank["config"]["num_layers"], rank["config"]["hidden_size"]
    seconds = _median(prefill["times"])
    flops = tp * (2 * n * rank["linear_params"] + 4 * n * n * rank["hidden_local"] * layers
                  + 2 * h * rank["vocab_local"])
    return {"tokens": n, "ms": _ms(prefill["times"]), "tok_s": n / seconds, "gflop_s": flops / seconds / GB}


def memory_rows(bench, ranks: list[dict]) -> list[dict]:
    """Per rank: resident memory before and after building, against ``glm plan``'s weights."""
    from model.plan import weight_bytes
    from services.bench.step import config_of

    config = config_of(bench)
    dtype_bytes = ranks[0]["dtype_bytes"]
    bf16 = dtype_bytes == 2 and bench.dtype in ("bfloat16", "auto")
    predicted = weight_bytes(config, quant=ranks[0]["quant"].split("-")[0], tp=bench.tp, dtype_bytes=dtype_bytes,
                             group_size=None, cpu_kernels=bf16,
                             head_copy=ranks[0]["head_copy"])   # as the head was prepared
    rows = []
    for rank in ranks:
        built = rank["rss_after_build"] - rank["rss_before_build"]
        rows.append({"rank": rank["rank"], "rss_before_build": rank["rss_before_build"],
                     "rss_after_build": rank["rss_after_build"], "rss_end": rank["rss_end"],
                     "built": built, "stored": sum(rank["bytes"].values()), "plan_weights": predicted,
                     "built_over_plan": built / predicted})
    return rows


def format_table(report: dict) -> str:
    """The human-readable report: decode rows, prefill, memory."""
    s = report["settings"]
    c = report["config"]
    lines = [f"model: {c['num_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
             f"inner {c['inner_hidden_size']}, vocab {c['vocab_size']}; {s['dtype']}, quant {report['quant']}, "
             f"tp {s['tp']} ({report['threads_per_rank']} thread(s)/rank); read bandwidth "
             f"{report['read_bandwidth_gb_s']:.1f} GB/s; decode context {s['context_tokens']} tokens",
             f"{'batch':>5} {'fwd ms':>8} {'p90':>7} {'step ms':>8} {'p90':>7} {'step/fwd':>8} {'layer ms':>9} "
             f"{'head ms':>8} {'MB/step':>8} {'GB/s':>6} {'of bw':>6} {'GFLOP/s':>8} {'tok/s':>8}"]
    for r in report["decode"]:
        lines.append(
            f"{r['batch']:>5} {r['forward_ms']['median']:>8.2f} {r['forward_ms']['p90']:>7.2f} "
            f"{r['step_ms']['median']:>8.2f} {r['step_ms']['p90']:>7.2f} {r['step_over_forward']:>8.2f} "
            f"{r['layer_ms']:>9.3f} {r['head_ms']['median']:>8.2f} {r['bytes']['total'] / MIB:>8.1f} "
            f"{r['forward_gb_s']:>6.1f} {r['forward_bandwidth_fraction']:>6.0%} {r['forward_gflop_s']:>8.1f} "
            f"{r['step_tok_s']:>8.1f}")
    p = report["prefill"]
    lines.append(f"prefill {p['tokens']} tokens (batch 1): {p['ms']['median']:.1f} ms (p90 {p['ms']['p90']:.1f}), "
                 f"{p['tok_s']:.0f} tokens/s, {p['gflop_s']:.1f} GFLOP/s")
    for m in report["memory"]:
        lines.append(f"rank {m['rank']}: RSS {m['rss_after_build'] / MIB:.0f} MiB after building (+"
                     f"{m['built'] / MIB:.0f} MiB; tensors {m['stored'] / MIB:.0f} MiB); glm plan weights "
                     f"{m['plan_weights'] / MIB:.0f} MiB; built/plan {m['built_over_plan']:.3f}")
    return "\n".join(lines)
