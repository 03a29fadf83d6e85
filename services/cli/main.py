"""``glm``: one entry point. Parsers are declared here; each command's module is
imported only when that command runs, so ``glm gateway`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from services.common.env import apply_env_defaults, debug_enabled

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
    "bench": ("bench", "benchmark serving: load generator, continuous vs static vs sequential batching"),
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


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=_non_negative_int, default=0,
                   help="serve Prometheus metrics (text format) on this port; 0 = off")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the metrics endpoint")


def _add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--tp", type=_positive_int, required=True, help="tensor-parallel size of the pool")
    p.add_argument("--rank", type=_non_negative_int, required=True, help="this process's rank")
    p.add_argument("--listen", required=True, help="unix:///path/to.sock or host:port")
    p.add_argument("--dist-init", required=True, help="tcp://HOST:PORT rendezvous, the same for every rank")
    _add_rank_options(p)
    _add_metrics(p)


def _add_rank_options(p: argparse.ArgumentParser) -> None:
    """What every rank of a pool is run with: shared by ``glm worker`` (one rank) and
    ``glm pool`` (which passes them on to each rank it starts)."""
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda = the rank's own GPU (rank %% GPUs); NCCL on cuda, gloo on cpu")
    _add_quant(p)
    p.add_argument("--kv-memory-gib", type=float, help="KV-cache memory per rank (default: measured)")
    p.add_argument("--collective-timeout-s", type=float, default=60.0,
                   help="a collective waiting longer than this fails the rank")
    p.add_argument("--otlp-endpoint", help="export traces over OTLP/gRPC to host:port (default: none)")
    p.add_argument("--layer-trace-ratio", type=float, default=0.0,
                   help="fraction of forwards that record a span per layer")
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads per rank (default: CPUs / tp under glm pool, torch's own otherwise)")
    p.add_argument("--model-name", help="name reported by Info (default: the checkpoint folder's name)")


def _add_pool(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--tp", type=_positive_int, required=True, help="ranks to launch (one per GPU on cuda)")
    p.add_argument("--socket-dir", required=True, help="rank r listens on unix://DIR/rank-<r>.sock")
    p.add_argument("--dist-port", type=_non_negative_int, default=0,
                   help="the ranks' rendezvous, tcp://127.0.0.1:PORT (0 = a free port)")
    _add_rank_options(p)
    p.add_argument("--metrics-port", type=_non_negative_int, default=0,
                   help="rank r serves Prometheus metrics on PORT + r; 0 = off")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of the ranks' metrics endpoints")
    p.add_argument("--ready-timeout-s", type=float, default=1800.0,
                   help="every rank answers Health within this, or the pool stops (non-zero)")
    p.add_argument("--stop-grace-s", type=float, default=10.0,
                   help="on stop, SIGTERM the ranks and SIGKILL those still running after this")


class _Repeatable(argparse.Action):
    """A repeatable flag collecting a list. Its ``GLM_`` variable holds the values
    comma-separated; flags given on the command line replace the variable's."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest)
        if items is self.default or not isinstance(items, list):
            items = []
        setattr(namespace, self.dest, items + [values])


def repeated(value) -> list[str]:
    """The list a ``_Repeatable`` flag holds (a ``GLM_`` variable's value is split on commas)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return list(value)


def _add_gateway(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action=_Repeatable, metavar="NAME=CHECKPOINT_DIR", required=True,
                   help="a model to serve (repeatable; the first is the default); only the "
                        "checkpoint's config.json and ice_text.model are read")
    p.add_argument("--tokenizer", help="ice_text.model for every model (default: beside each checkpoint)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=_non_negative_int, default=50051, help="0 = any free port")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--redis-timeout-s", type=float, default=2.0,
                   help="Redis connect/read timeout; past it calls fail with UNAVAILABLE")
    p.add_argument("--max-queue-depth", type=_positive_int, default=1024,
                   help="requests waiting per model (XLEN of its queue) before RESOURCE_EXHAUSTED")
    p.add_argument("--max-new-tokens-limit", type=_positive_int, default=2048)
    p.add_argument("--default-max-new-tokens", type=_positive_int, default=128,
                   help="per blank, when a request does not say")
    p.add_argument("--max-stop-sequences", type=_non_negative_int, default=8)
    p.add_argument("--max-stop-chars", type=_positive_int, default=256, help="length of one stop text")
    p.add_argument("--api-key", action=_Repeatable, metavar="KEY",
                   help="require 'authorization: Bearer KEY' (repeatable; health and reflection stay open)")
    p.add_argument("--api-keys-file", help="file with one API key per line")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", help="PEM private key")
    _add_metrics(p)
    p.add_argument("--grace-period-s", type=float, default=30.0,
                   help="on SIGTERM, how long in-flight calls may run on")
    p.add_argument("--otlp-endpoint", help="export traces over OTLP/gRPC to host:port (default: none)")


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
    p.add_argument("--max-new-tokens", type=_positive_int, help="per blank (default: the server's)")
    p.add_argument("--min-new-tokens", type=_non_negative_int, default=0)
    p.add_argument("--temperature", type=float, help="0 = greedy (default 1)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, help="0 or 1 = off")
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=_non_negative_int, help="default: drawn by the gateway")
    p.add_argument("--stop", action=_Repeatable, metavar="TEXT", help="stop text (repeatable)")
    p.add_argument("--logprobs", action="store_true", help="log-probability of each token")
    p.add_argument("--top-logprobs", type=_non_negative_int, default=0, help="alternatives per token (0-5)")
    p.add_argument("--request-id", default="", help="idempotency key: a retry re-attaches")
    p.add_argument("--timeout-s", type=float, help="deadline of the call")
    p.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--tls-ca", help="PEM root certificate(s) to trust (default: the system's)")
    p.add_argument("--tls-server-name", help="expected name in the server certificate")


def _add_scheduler(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--model", required=True, help="model name: reads glm:queue:{model}")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (only config.json and ice_text.model)")
    p.add_argument("--tokenizer", help="ice_text.model (default: the one beside the checkpoint)")
    p.add_argument("--workers", required=True, help="comma-separated rank addresses, rank 0 first")
    p.add_argument("--pool-id", help="consumer name in the queue's group (default: host-pid)")
    p.add_argument("--mode", choices=["continuous", "static", "sequential"], default="continuous")
    p.add_argument("--max-batch-size", type=_positive_int, default=32)
    p.add_argument("--max-input-tokens", type=_positive_int, help="context + sop (default: max_sequence_length/2)")
    p.add_argument("--max-total-tokens", type=_positive_int, help="input + new (default: max_sequence_length)")
    p.add_argument("--max-prefill-tokens", type=_positive_int, default=4096, help="padded tokens of one prefill")
    p.add_argument("--max-waiting-tokens", type=_positive_int, default=20,
                   help="decode steps after which waiting requests are prefilled anyway")
    p.add_argument("--waiting-served-ratio", type=float, default=0.3,
                   help="waiting requests per running one that justify pausing decodes for a prefill")
    p.add_argument("--shard-timeout-s", type=float, default=60.0, help="deadline of every shard call")
    p.add_argument("--warmup-timeout-s", type=float, default=600.0)
    p.add_argument("--claim-idle-ms", type=_positive_int, default=None,
                   help="pending entries idle this long belong to a dead pool (default: redis_keys.CLAIM_IDLE_MS)")
    p.add_argument("--idle-block-ms", type=_positive_int, default=200, help="XREADGROUP BLOCK while idle")
    p.add_argument("--drain-timeout-s", type=float, default=30.0, help="on SIGTERM: finish running requests")
    _add_metrics(p)
    p.add_argument("--otlp-endpoint", help="export traces over OTLP/gRPC to host:port (default: none)")


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=_non_negative_int, default=50051, help="the gateway's port")
    p.add_argument("--host", default="127.0.0.1", help="the gateway's address")
    p.add_argument("--redis-url", help="an existing Redis (default: start a private one)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the demo model, created on first use)")
    p.add_argument("--tokenizer", help="ice_text.model (default: the one beside the checkpoint)")
    p.add_argument("--model-name", help="name clients use (default: glm-demo, or the checkpoint folder's name)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "glm"), help="where the demo model lives")
    p.add_argument("--tp", type=_positive_int, default=1, help="ranks per pool")
    p.add_argument("--pools", type=_positive_int, default=1, help="pools sharing the queue")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none")
    p.add_argument("--kv-memory-gib", type=float, help="KV-cache memory per rank (default: measured)")
    p.add_argument("--mode", choices=["continuous", "static", "sequential"], default="continuous",
                   help="batching: continuous (iteration-level), static, or one request at a time")
    p.add_argument("--max-batch-size", type=_positive_int, default=32)
    p.add_argument("--no-demo-call", action="store_true", help="do not make the example client call")
    p.add_argument("--metrics-port", type=_non_negative_int, default=0,
                   help="serve the Prometheus metrics of every process (gateway, schedulers, ranks) "
                        "on this one port, on --host; 0 = off")
    p.add_argument("--otlp-endpoint",
                   help="every service (gateway, schedulers, every rank) exports traces over OTLP/gRPC "
                        "to host:port (default: none)")
    p.add_argument("--layer-trace-ratio", type=float, default=0.0,
                   help="fraction of forwards whose workers record a span per layer (0-1)")


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
    s.add_argument("--requests", type=_positive_int, default=48, help="requests per mode")
    s.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second (0 = all at once)")
    s.add_argument("--concurrency", type=_positive_int, default=32, help="calls in flight at most")
    s.add_argument("--min-new-tokens", type=_positive_int, default=8, help="shortest output (tokens)")
    s.add_argument("--max-new-tokens", type=_positive_int, default=64, help="longest output (tokens)")
    s.add_argument("--duration-s", type=float, default=120.0,
                   help="per mode: nothing is sent after this, and calls still running are cut")
    s.add_argument("--seed", type=int, default=0, help="seed of the arrivals, prompts and lengths")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--warmup", type=_non_negative_int, default=2, help="short requests before measuring")
    s.add_argument("--max-batch-size", type=_positive_int, default=32)
    s.add_argument("--tp", type=_positive_int, default=1, help="ranks per pool")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--kv-memory-gib", type=float, help="KV-cache memory per rank (default: measured)")
    s.add_argument("--json", action="store_true", help="print one JSON object")


ADDERS = {
    "serve": _add_serve,
    "generate": _add_generate,
    "convert": _add_convert,
    "init-tiny": _add_init_tiny,
    "plan": _add_plan,
    "worker": _add_worker,
    "pool": _add_pool,
    "scheduler": _add_scheduler,
    "gateway": _add_gateway,
    "client": _add_client,
    "bench": _add_bench,
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
