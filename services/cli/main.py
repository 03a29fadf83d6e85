"""``glm``: one entry point. A service command's flags are its options class's
(``services/*/options.py``), a tool's are declared here; each command's module is
imported only when that command runs, so ``glm gateway`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from services.common.env import apply_env_defaults, debug_enabled, namespace, variable
from services.common.options import Repeatable, non_negative_int, positive_int
from services.gateway.options import GatewayOptions
from services.local_options import ServeOptions
from services.scheduler.options import SchedulerOptions
from services.worker.options import DTYPES, PoolOptions, WorkerOptions

# command -> (module under services.cli, help)
COMMANDS = {
    "serve": ("serve", "all in one: gateway + scheduler + worker pool (+ Redis, + demo model)"),
    "generate": ("generate", "generate locally from a checkpoint (no services)"),
    "convert": ("checkpoints", "reshard a checkpoint for another tensor-parallel size"),
    "init-tiny": ("checkpoints", "write a small random checkpoint + tokenizer in the official layout"),
    "plan": ("plan", "memory per GPU for a model x quantization x TP x context"),
    "worker": ("worker", "serve one tensor-parallel rank of a pool over gRPC (the shard protocol)"),
    "pool": ("pool", "launch and supervise the tp ranks of one pool (`glm worker` each) as one unit"),
    "scheduler": ("scheduler", "run one pool's scheduler: Redis queue -> continuous batching over the workers"),
    "gateway": ("gateway", "serve the public gRPC API: validate, enqueue on Redis, relay tokens"),
    "client": ("client", "call a gateway from the command line"),
    "bench": ("bench", "benchmarks: serve (load generator over the whole stack), step (the model alone)"),
}


class UsageError(ValueError):
    """Bad command-line input; printed as one line."""


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--tokenizer", help="ice_text.model (default: the one beside the checkpoint)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks (local processes)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="auto: bfloat16 on a CPU with native bf16, float16 on CUDA, else float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text; may contain [MASK], [sMASK], [gMASK]")
    src.add_argument("--prompt-ids", help="comma-separated context ids holding a mask id")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=128)
    p.add_argument("--min-new-tokens", type=non_negative_int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.7, help="0 or 1 = off (official default 0.7)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (official default 1234)")
    p.add_argument("--num-beams", type=positive_int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram-size", type=non_negative_int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quant(p)


def _add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantization at load (a pre-quantized checkpoint loads as it is)")
    p.add_argument("--quant-group-size", type=positive_int, default=None,
                   help="group-wise scales every N input columns instead of the official per-row scales")


def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-folder", required=True)
    p.add_argument("--output-folder", required=True)
    p.add_argument("--target-tp", type=positive_int, required=True)
    p.add_argument("--quantization-bit-width", type=int, choices=[4, 8], default=None,
                   help="write the official pre-quantized layout (<key> int8 + <key>_scale fp16)")
    p.add_argument("--quant-group-size", type=positive_int, default=None,
                   help="group-wise scales (beyond the official per-row scheme)")


def _add_init_tiny(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory")
    p.add_argument("--preset", default="glm-tiny", help="model preset (glm-tiny, glm-small, ...)")
    p.add_argument("--tp", type=positive_int, default=1, help="partitions to write")
    p.add_argument("--seed", type=int, default=0)


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="glm-130b",
                   help="model preset (glm-130b, glm-small, ...) or a checkpoint folder")
    p.add_argument("--quant", choices=["none", "fp16", "int8", "int4"], default="none",
                   help="weight format of the four linears (fp16 = none)")
    p.add_argument("--tp", type=positive_int, required=True, help="tensor-parallel size (GPUs)")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU in GiB")
    p.add_argument("--max-tokens", type=positive_int, default=2048,
                   help="tokens per sequence, prompt + output")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences at once")
    p.add_argument("--group-size", type=positive_int, help="group-wise scales (default: per row)")
    p.add_argument("--num-layers", type=positive_int, help="only the first N layers of the model (same width)")
    p.add_argument("--cpu-kernels", action="store_true",
                   help="ranks on a CPU with native bf16, bf16 activations: count the copies the CPU "
                        "kernels repack and the tied LM head's packed copy")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="the gateway, HOST:PORT")
    p.add_argument("--model", default="", help="model name (default: the gateway's default)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text; may contain [MASK], [sMASK], [gMASK]")
    what.add_argument("--prompt-ids", help="comma-separated context ids holding a mask id")
    what.add_argument("--tokenize", metavar="TEXT", help="print the ids TEXT becomes")
    what.add_argument("--list-models", action="store_true", help="print the models served")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-new-tokens", type=positive_int, help="per blank (default: the server's)")
    p.add_argument("--min-new-tokens", type=non_negative_int, default=0)
    p.add_argument("--temperature", type=float, help="0 = greedy (default 1)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, help="0 or 1 = off")
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=non_negative_int, help="default: drawn by the gateway")
    p.add_argument("--stop", action=Repeatable, metavar="TEXT", help="stop text (repeatable)")
    p.add_argument("--logprobs", action="store_true", help="log-probability of each token")
    p.add_argument("--top-logprobs", type=non_negative_int, default=0, help="alternatives per token (0-5)")
    p.add_argument("--n", type=positive_int, default=1, help="independent samples (each printed)")
    p.add_argument("--num-beams", type=non_negative_int, default=0, help=">= 2: beam search (every beam printed)")
    p.add_argument("--length-penalty", type=float, help="beam search (default 1.0)")
    p.add_argument("--no-repeat-ngram-size", type=non_negative_int, default=0, help="beam search; 0 = off")
    p.add_argument("--beam-deterministic", action="store_true", help="beam search: top-k, no draws")
    p.add_argument("--request-id", default="", help="idempotency key: a retry re-attaches")
    p.add_argument("--timeout-s", type=float, help="deadline of the call")
    p.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--tls-ca", help="PEM root certificate(s) to trust (default: the system's)")
    p.add_argument("--tls-server-name", help="expected name in the server certificate")


def _add_bench(p: argparse.ArgumentParser) -> None:
    subs = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    s = subs.add_parser("serve", help="load a server: throughput, TTFT, ITL per batching mode",
                        description="Concurrent streaming clients with Poisson arrivals and mixed "
                                    "prompt/output lengths; one local stack per --modes entry "
                                    "(same checkpoint, same seeded load), or --address.")
    s.add_argument("--checkpoint", help="checkpoint folder (default: the demo model, created on first use)")
    s.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "glm"), help="where the demo model lives")
    s.add_argument("--modes", default="continuous,static,sequential",
                   help="batching modes to compare, one local stack each")
    s.add_argument("--address", help="bench this running gateway (HOST:PORT) in its own mode only")
    s.add_argument("--model", default="", help="with --address: model name (default: the gateway's)")
    s.add_argument("--label", default="server", help="with --address: the report's row name")
    s.add_argument("--redis-url", help="with --address: the stack's own Redis (its queue), to report its "
                                       "commands per token, rows per forward and the workers' share (the "
                                       "server's statistics are reset: give a Redis of this stack only)")
    s.add_argument("--requests", type=positive_int, default=48, help="requests per mode")
    s.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second (0 = all at once)")
    s.add_argument("--concurrency", type=positive_int, default=32, help="calls in flight at most")
    s.add_argument("--min-new-tokens", type=positive_int, default=8, help="shortest output (tokens)")
    s.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest output (tokens)")
    s.add_argument("--prompt-tokens", type=_token_range,
                   help="LO:HI: synthetic prompts of a length uniform in LO..HI tokens (default: a fixed set "
                        "of English and Chinese prompts of 3-90 tokens)")
    s.add_argument("--early-stops", action="store_true",
                   help="send every request with --max-new-tokens as its limit and end it (the client "
                        "cancels) after its drawn length: requests that stop early")
    s.add_argument("--duration-s", type=float, default=120.0,
                   help="per mode: nothing is sent after this, and calls still running are cut")
    s.add_argument("--seed", type=int, default=0, help="seed of the arrivals, prompts and lengths")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--warmup", type=non_negative_int, default=2, help="short requests before measuring")
    s.add_argument("--max-batch-size", type=positive_int, default=32)
    s.add_argument("--tp", type=positive_int, default=1, help="ranks per pool")
    s.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on a CPU with native bf16, float16 on CUDA, else float32")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--kv-memory-gib", type=float, help="KV-cache memory per rank (default: measured)")
    s.add_argument("--threads", type=positive_int, help="torch CPU threads per rank (default: CPUs / tp)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    _add_bench_serve_apis(s)
    _add_bench_gemv(subs)
    _add_bench_step(subs)


def _add_bench_gemv(subs) -> None:
    g = subs.add_parser("gemv", help="every decode linear of a preset against the read bandwidth",
                        description="Times each linear shape of a preset's shard (QKV, dense, GeGLU, "
                                    "inner->h, tied LM head) per dtype, quantization and batch, for "
                                    "every candidate implementation, against the measured read bandwidth.")
    g.add_argument("--preset", default="glm-small", help="model preset (glm-small, glm-130b, ...)")
    g.add_argument("--tp", type=positive_int, default=1, help="shard shapes of this tensor-parallel size")
    g.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    g.add_argument("--quant", default="none,int8,int4", help="comma list of none, int8, int4")
    g.add_argument("--batch", default="1", help="comma list of activation rows (e.g. 1,8,32)")
    g.add_argument("--shapes", default="", help="comma list: qkv, attn_dense, h_to_4h, 4h_to_h, lm_head (default all)")
    g.add_argument("--repeats", type=positive_int, default=20, help="timed calls per case (the best is kept)")
    g.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer of the bandwidth measurement")
    g.add_argument("--max-gib", type=float, default=6.0, help="skip a case whose peak memory would pass this")
    g.add_argument("--compile", action="store_true", help="also time torch.compile(F.linear)")
    g.add_argument("--json", action="store_true", help="print one JSON object")



def _add_bench_serve_apis(s: argparse.ArgumentParser) -> None:
    """``glm bench serve``'s flags for other servers: the API of --address, and a peer."""
    s.add_argument("--api", choices=["grpc", "openai"], default="grpc",
                   help="with --address: our gateway (grpc) or any OpenAI-compatible completions server "
                        "(POST /v1/completions, streamed)")
    s.add_argument("--peer", metavar="HOST:PORT",
                   help="also bench this running server, right after our rows, with the same load; "
                        "the table adds the ratios ours / peer")
    s.add_argument("--peer-api", choices=["openai", "grpc"], default="openai", help="the peer's API")
    s.add_argument("--peer-model", default="",
                   help="the model name sent to the peer (default: the first it lists at /v1/models)")
    s.add_argument("--peer-label", default="peer", help="the peer's row name (e.g. vllm)")
    s.add_argument("--extra-body", default="",
                   help="JSON object merged into every OpenAI request body (null drops a default field, "
                        "e.g. '{\"min_tokens\": null}')")



def _token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI (two integers), got {text!r}") from None
    if not 2 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 2 <= LO <= HI, got {text!r}")
    return lo, hi


def _batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def _add_bench_step(subs) -> None:
    s = subs.add_parser("step", help="the model alone: bare forward, worker step, prefill, memory (per batch size)",
                        description="Decode (bare forward, LM head, worker step) per batch size and a prefill, "
                                    "each with the bytes it moves and the fraction of the read bandwidth "
                                    "measured in the same run; resident memory against glm plan.")
    s.add_argument("--checkpoint", help="checkpoint folder (or --load-format dummy)")
    s.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="auto = the checkpoint; dummy = random weights for --preset, no checkpoint")
    s.add_argument("--preset", help="--load-format dummy: the model shape (default glm-small, the demo's)")
    s.add_argument("--num-layers", type=positive_int, help="--load-format dummy: the first N layers of the preset")
    s.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bfloat16 on a CPU with native bf16, float16 on CUDA, else float32")
    s.add_argument("--quant", choices=["none", "int8", "int4"], default="none", help="weight-only quantization")
    s.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel ranks (local processes, gloo)")
    s.add_argument("--batch", type=_batches, default=(1, 8, 32, 64), help="decode batch sizes, comma-separated")
    s.add_argument("--prompt-tokens", type=positive_int, default=512, help="tokens of the prefill (batch 1)")
    s.add_argument("--context-tokens", type=positive_int, default=32,
                   help="prompt of every decoding row (its KV cache)")
    s.add_argument("--kv-cache", choices=["paged", "dense"], default="paged",
                   help="paged: the workers' block pool, one packed forward per step; dense: the left-padded "
                        "cache of glm generate and beam search")
    s.add_argument("--kv-block-size", type=positive_int, default=16, help="tokens per block of the paged pool")
    s.add_argument("--steps", type=positive_int, default=10, help="timed calls per figure")
    s.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls before them")
    s.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the read-bandwidth probe")
    s.add_argument("--threads", type=positive_int, help="torch threads per rank (default: CPUs / tp)")
    s.add_argument("--json", action="store_true", help="print one JSON object")


# The service commands: one options class each declares their flags (services/*/options.py).
SERVICES = {
    "serve": ServeOptions,
    "worker": WorkerOptions,
    "pool": PoolOptions,
    "scheduler": SchedulerOptions,
    "gateway": GatewayOptions,
}

# The tools: flags declared here, each tool's GLM_ variables in its own namespace (GLM_PLAN_MODEL).
ADDERS = {
    "generate": _add_generate,
    "convert": _add_convert,
    "init-tiny": _add_init_tiny,
    "plan": _add_plan,
    "client": _add_client,
    "bench": _add_bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm", description="GLM-130B serving toolkit")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if name in SERVICES:
            SERVICES[name].add_flags(sub)
        else:
            ADDERS[name](sub)
            namespace(sub, name)
    _show_variables(parser)
    return parser


def _show_variables(parser: argparse.ArgumentParser) -> None:
    """End each flag's help with its ``GLM_`` variable."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_variables(sub)
        elif action.option_strings and action.dest != "help":
            action.help = f"{action.help or ''} [{variable(action)}]".lstrip()


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
