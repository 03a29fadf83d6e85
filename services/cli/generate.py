"""``glm generate``: validate everything up front (one-line errors), then run the
job on ``--tp`` local ranks and print the filled text or one JSON object."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from model.checkpoint import check_reshard, inspect_checkpoint
from model.config import END_IDS
from model.distributed import default_backend, run_local_ranks
from model.generation import GenerationOptions
from model.quantization import QuantSpec
from model.prompt import PromptError, check_blanks, check_ids, check_length, generation_mask, prepare_text_ids
from model.runner import GenerateJob, generate_on_rank
from model.sampling import SamplingParams
from model.tokenizer import GLMTokenizer, demo_tokenizer

TOKENIZER_FILE = "ice_text.model"


def _tokenizer(args, need_it: bool) -> GLMTokenizer:
    if args.tokenizer:
        return GLMTokenizer.from_file(args.tokenizer)
    beside = Path(args.checkpoint) / TOKENIZER_FILE
    if beside.exists():
        return GLMTokenizer.from_file(beside)
    if need_it:
        raise ValueError(f"no tokenizer: {beside} does not exist; pass --tokenizer PATH to ice_text.model")
    print(f"glm generate: note: no {TOKENIZER_FILE} beside the checkpoint; "
          "text is decoded with the demo tokenizer", file=sys.stderr)
    return demo_tokenizer()


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise PromptError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return name


def build_job(args, tokenizer_needed: bool):
    info = inspect_checkpoint(args.checkpoint)
    config = info.config
    config.check_tp(args.tp)
    check_reshard(info, args.tp)
    tokenizer = _tokenizer(args, tokenizer_needed)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise PromptError("prompt is empty")
        ids = prepare_text_ids(tokenizer.tokenize(args.prompt))
    else:
        ids = _parse_ids(args.prompt_ids)
        check_ids(ids, config.vocab_size)
        if generation_mask(ids) is None:
            raise PromptError("--prompt-ids holds no mask id ([MASK] 150000, [sMASK] 150002 or [gMASK] 150001)")
    check_ids(ids, config.vocab_size)
    check_length(ids, config.max_sequence_length)
    check_blanks(ids)                      # refused here, before any rank starts
    sampling = SamplingParams(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed,
    )
    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        beam_deterministic=args.greedy, beam_seed=args.seed,
    )
    job = GenerateJob(
        checkpoint=str(args.checkpoint), prompt_ids=tuple(ids), sampling=sampling, options=options,
        dtype=args.dtype, device=_device(args.device), all_blanks=args.prompt is not None,
        quant=QuantSpec.parse(args.quant, args.quant_group_size),
    )
    return job, tokenizer


def render(result: dict, job: GenerateJob, tokenizer: GLMTokenizer) -> dict:
    blanks = []
    for b in result["blanks"]:
        blanks.append({
            "text": tokenizer.decode(b["content_ids"], strict=False),
            "token_ids": b["token_ids"],
            "logprobs": b["logprobs"],
            "finish_reason": b["finish_reason"],
        })
        if b["candidates"]:           # beam search: every candidate, best first (--print-all-beams)
            blanks[-1]["candidates"] = [
                {"text": tokenizer.decode([t for t in c["token_ids"] if t not in END_IDS], strict=False),
                 "token_ids": c["token_ids"], "score": c["score"]} for c in b["candidates"]]
    output_ids = list(result["output_ids"])
    if output_ids and output_ids[-1] == tokenizer.eos_id:
        output_ids = output_ids[:-1]
    return {
        "text": "".join(b["text"] for b in blanks),
        "token_ids": [t for b in blanks for t in b["token_ids"]],
        "logprobs": [lp for b in blanks for lp in b["logprobs"]],
        "finish_reason": blanks[-1]["finish_reason"] if blanks else "length",
        "blanks": blanks,
        "output_text": tokenizer.decode(output_ids, strict=False),
        "prompt_token_ids": list(job.prompt_ids),
        "seed": job.sampling.seed,
    }


def run(args) -> int:
    job, tokenizer = build_job(args, tokenizer_needed=args.prompt is not None)
    results = run_local_ranks(generate_on_rank, args.tp, job, backend=default_backend(job.device))
    out = render(results[0], job, tokenizer)
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(out["output_text"])
    return 0
