"""Draw one trace as a waterfall PNG (the picture in docs/observability.md).

Input: the JSON that ``python -m tests.test_tracing_e2e OUT.json`` writes (one
request through a real TP=2 stack, every span its OTLP receiver got). One row per
span in tree order (children under their parent, by start time), a bar from its
start to its end, coloured by service, the rank and layer in the label.

    .venv/bin/python -m tests.test_tracing_e2e docs/trace-example.json
    python bench/render_trace.py docs/trace-example.json docs/trace-example.png

Needs only matplotlib (not a project dependency: install it where you run this).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLOURS = {"glm-gateway": "#4C72B0", "glm-scheduler": "#DD8452", "glm-worker": "#55A868"}
LAYER_COLOUR = "#8FD19E"


def tree_order(spans: list[dict]) -> list[tuple[int, dict]]:
    """(depth, span) in depth-first order; a span whose parent is absent is a root."""
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict]] = {}
    roots = []
    for s in spans:
        if s["parent_span_id"] in ids:
            children.setdefault(s["parent_span_id"], []).append(s)
        else:
            roots.append(s)
    out: list[tuple[int, dict]] = []

    def visit(span: dict, depth: int) -> None:
        out.append((depth, span))
        kids = sorted(children.get(span["span_id"], []), key=lambda s: (s["start_ns"], s["rank"] or 0))
        for kid in kids:
            visit(kid, depth + 1)

    for root in sorted(roots, key=lambda s: s["start_ns"]):
        visit(root, 0)
    return out


def label(span: dict) -> str:
    text = span["name"]
    if span["rank"] is not None:
        text += f"  rank {span['rank']}"
    attrs = span["attributes"]
    if "glm.layer" in attrs:
        text += f"  layer {attrs['glm.layer']}"
    elif "glm.batch_size" in attrs:
        text += f"  batch {attrs['glm.batch_id']} x{attrs['glm.batch_size']}"
    if span["links"]:
        text += f"  ({len(span['links'])} link)" if len(span["links"]) == 1 else f"  ({len(span['links'])} links)"
    return text


def render(trace: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = tree_order(trace["spans"])
    t0 = min(s["start_ns"] for _, s in rows)
    height = 0.28 * len(rows) + 1.4
    fig, ax = plt.subplots(figsize=(13, height))
    for y, (depth, s) in enumerate(rows):
        start, width = (s["start_ns"] - t0) / 1e6, (s["end_ns"] - s["start_ns"]) / 1e6
        colour = LAYER_COLOUR if s["name"] == "worker.layer" else COLOURS.get(s["service"], "#999999")
        ax.barh(y, max(width, 0.15), left=start, height=0.7, color=colour, edgecolor="black", linewidth=0.3)
        ax.text(start + max(width, 0.15) + 0.6, y, f"{width:.1f} ms", va="center", fontsize=7)
    names = ["  " * depth + ("└ " if depth else "") + label(s) for depth, s in rows]
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=7.5, family="monospace", ha="left")
    ax.tick_params(axis="y", pad=4.6 * max(map(len, names)))       # left-aligned: the tree shows
    ax.invert_yaxis()
    end = max((s["end_ns"] - t0) / 1e6 for _, s in rows)
    ax.set_xlim(0, end * 1.08)
    ax.set_xlabel("ms since the gateway received the call")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    ax.set_title(f"One request, one trace ({trace['caller_trace_id']}): gateway -> scheduler -> 2 ranks x "
                 f"layers, {len(rows)} spans", fontsize=9)
    fig.legend(handles=[Patch(color=c, label=n) for n, c in COLOURS.items()]
               + [Patch(color=LAYER_COLOUR, label="worker.layer")], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_json")
    parser.add_argument("out_png")
    args = parser.parse_args()
    render(json.loads(Path(args.trace_json).read_text()), Path(args.out_png))
    print(f"wrote {args.out_png}")


if __name__ == "__main__":
    main()
