"""``glm``: one entry point. Parsers are declared here; each command's module is
imported only when that command runs, so ``glm gateway`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from services.common.env import apply_env_defaults, debug_enabled

# command -> (module under services.cli, help)
COMMANDS = {
    "generate": ("generate", "generate locally from a checkpoint (no services)"),
    "convert": ("checkpoints", "reshard a checkpoint for another tensor-parallel size"),
    "init-tiny": ("checkpoints", "write a small random checkpoint + tokenizer in the official layout"),
    "plan": ("plan", "memory per GPU for a model x quantization x TP x context"),
    "worker": ("worker", "serve one tensor-parallel rank of a pool over gRPC (the shard protocol)"),
}


class UsageError(ValueError):
    """Bad command-line input; printed as one line."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--tokenizer", help="ice_text.model (default: the one beside the checkpoint)")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel ranks (local processes)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text; may contain [MASK], [sMASK], [gMASK]")
    src.add_argument("--prompt-ids", help="comma-separated context ids holding a mask id")
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=128)
    p.add_argument("--min-new-tokens", type=_non_negative_int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.7, help="0 or 1 = off (official default 0.7)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (official default 1234)")
    p.add_argument("--num-beams", type=_positive_int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=_non_negative_int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quant(p)


def _add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization at load (a pre-quantized checkpoint loads as it is)")
    p.add_argument("--quant-group-size", type=_positive_int, default=None,
                   help="group-wise scales every N input columns instead of the official per-row scales")


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-folder", required=True)
    p.add_argument("--output-folder", required=True)
    p.add_argument("--target-tp", type=_positive_int, required=True)
    p.add_argument("--quantization-bit-width", type=int, choices=[4, 8], default=None,
                   help="write the official pre-quantized layout (<key> int8 + <key>_scale fp16)")
    p.add_argument("--quant-group-size", type=_positive_int, default=None,
                   help="group-wise scales (beyond the official per-row scheme)")


def _add_init_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory")
    p.add_argument("--preset", default="glm-tiny", help="model preset (glm-tiny, glm-small, ...)")
    p.add_argument("--tp", type=_positive_int, default=1, help="partitions to write")
    p.add_argument("--seed", type=int, default=0)


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="glm-130b",
                   help="model preset (glm-130b, glm-small, ...) or a checkpoint folder")
    p.add_argument("--quant", choices=["none", "fp16", "int8", "int4"], default="none",
                   help="weight format of the four linears (fp16 = none)")
    p.add_argument("--tp", type=_positive_int, required=True, help="tensor-parallel size (GPUs)")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU in GiB")
    p.add_argument("--max-tokens", type=_positive_int, default=2048,
                   help="tokens per sequence, prompt + output")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences at once")
    p.add_argument("--group-size", type=_positive_int, help="group-wise scales (default: per row)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--tp", type=_positive_int, required=True, help="tensor-parallel size of the pool")
    p.add_argument("--rank", type=_non_negative_int, required=True, help="this process's rank")
    p.add_argument("--listen", required=True, help="unix:///path/to.sock or host:port")
    p.add_argument("--dist-init", required=True, help="tcp://HOST:PORT rendezvous, the same for every rank")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda = this rank's GPU (rank %% GPUs); NCCL on cuda, gloo on cpu")
    _add_quant(p)
    p.add_argument("--kv-memory-gib", type=float, help="KV-cache memory per rank (default: measured)")
    p.add_argument("--collective-timeout-s", type=float, default=60.0,
                   help="a collective waiting longer than this fails the rank")
    p.add_argument("--otlp-endpoint", help="export traces over OTLP/gRPC to host:port (default: none)")
    p.add_argument("--layer-trace-ratio", type=float, default=0.0,
                   help="fraction of forwards that record a span per layer")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads for this rank")
    p.add_argument("--model-name", help="name reported by Info (default: the checkpoint folder's name)")


ADDERS = {
    "generate": _add_generate,
    "convert": _add_convert,
    "init-tiny": _add_init_tiny,
    "plan": _add_plan,
    "worker": _add_worker,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm", description="GLM-130B serving toolkit")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        ADDERS[name](subs.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        apply_env_defaults(parser)
    except ValueError as exc:
        parser.error(str(exc))
    args = parser.parse_args(argv)
    module_name, _ = COMMANDS[args.command]
    module = importlib.import_module(f"services.cli.{module_name}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"glm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_enabled():
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"glm {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
