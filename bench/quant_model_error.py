"""Model-level error of weight-only quantization on the demo model.

Builds the glm-small demo checkpoint (random weights, model.tiny), runs the same
prompts through the dense fp32 model and through INT8/INT4 models (official
per-row scales and group-wise scales), and reports per-position output error:
relative logit error ||q - ref|| / ||ref||, top-1 agreement and KL(ref || q).

    python bench/quant_model_error.py [--preset glm-small] [--group-size 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import GMASK_ID, MASK_ID  # noqa: E402
from model.parallel import ParallelContext  # noqa: E402
from model.quantization import QuantSpec  # noqa: E402
from model.tiny import init_tiny  # noqa: E402
from model.tokenizer import demo_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tp_jobs import batch_logits  # noqa: E402

PROMPTS = [
    "The river runs past the old mill and [MASK] into the valley.",
    "今天的天气很好，我们去公园散步吧。[gMASK]",
    "A tensor-parallel shard holds one slice of every weight matrix [MASK].",
]


def metrics(ref: torch.Tensor, q: torch.Tensor) -> dict:
    rel = ((q - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item()
    top1 = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    lp_ref, lp_q = torch.log_softmax(ref, -1), torch.log_softmax(q, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1).mean().item()
    return {"rel_logit_error": rel, "top1_agreement": top1, "kl": kl}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="glm-small")
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tok = demo_tokenizer()
    rows = []
    for text in PROMPTS:
        ids = tok.tokenize(text)
        rows.append((ids if (MASK_ID in ids or GMASK_ID in ids) else ids + [GMASK_ID], []))
    with tempfile.TemporaryDirectory() as d:
        init_tiny(d, preset=args.preset, seed=0)
        ctx = ParallelContext()
        ref = torch.cat([x for x in batch_logits(ctx, d, rows, "float32")])
        # bf16 activations without quantization: how sensitive the model is to any perturbation
        results = {"bf16 (dense)": metrics(ref, torch.cat(batch_logits(ctx, d, rows, "bfloat16")))}
        for bits in (8, 4):
            for group in (None, args.group_size):
                spec = QuantSpec(bits, group)
                got = torch.cat(batch_logits(ctx, d, rows, "float32", None, spec))
                results[spec.name] = metrics(ref, got)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.preset}: {ref.shape[0]} positions, dense fp32 reference")
    print(f"{'scheme':<14} {'rel. logit error':>17} {'top-1 agreement':>16} {'KL(ref||q)':>11}")
    for name, m in results.items():
        print(f"{name:<14} {m['rel_logit_error']:>17.4f} {m['top1_agreement']:>16.3f} {m['kl']:>11.4f}")


if __name__ == "__main__":
    main()
