"""``glm serve``: the all-in-one mode — gateway, scheduler(s) and worker pool(s) as
local processes, with a private Redis unless ``--redis-url`` is given and the demo
model created on first use unless ``--checkpoint`` is given. Once ready it shows a
client call, then serves until interrupted; a process that dies stops the stack."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from services.local import LocalStack, StackError
from services.local_options import ServeOptions

DEMO_PRESET = "glm-small"
TOKENIZER_FILE = "ice_text.model"     # beside the checkpoint, as the official layout has it
DEMO_PROMPT = "The capital of the country is [MASK], a city by the river."


def demo_checkpoint(cache: Path) -> Path:
    """The demo model, written once (a random glm-small checkpoint + tokenizer)."""
    folder = cache / "demo-glm-small"
    if not (folder / "latest").exists():
        from model.tiny import init_tiny      # only on first use: it needs torch

        print(f"glm serve: creating the demo model in {folder} (first use)", file=sys.stderr)
        init_tiny(folder, preset=DEMO_PRESET, seed=0)
    return folder


def dummy_model_dir(cache: Path, preset: str, config) -> Path:
    """The folder the scheduler and gateway read for dummy weights: ``config.json`` of the
    (shortened) preset and the demo tokenizer (the same 150 528-id vocabulary); no weights."""
    folder = cache / f"dummy-{preset}-{config.num_layers}l"
    if not (folder / TOKENIZER_FILE).exists():
        from model.tokenizer import demo_tokenizer

        folder.mkdir(parents=True, exist_ok=True)
        demo_tokenizer().save(folder / TOKENIZER_FILE)
    config.write_json(folder)
    return folder


def _show_client_call(address: str, model: str) -> None:
    from services.client import GLMClient

    print(f"glm serve: ready on {address}; a client call:", file=sys.stderr)
    print(f"  glm client --address {address} --prompt {DEMO_PROMPT!r} --max-new-tokens 16", file=sys.stderr)
    with GLMClient(address) as client:
        reply = client.generate(DEMO_PROMPT, model=model, max_new_tokens=16, temperature=0, timeout=120)
    print(f"  -> {reply.output_text}", file=sys.stderr)


def options_from_args(args) -> ServeOptions:
    """The stack's options, with the checkpoint (the demo model unless given) and the model's
    name resolved."""
    options = ServeOptions.from_args(args)
    if options.dummy:
        from model.config import DEFAULT_DUMMY_PRESET, dummy_config

        preset = options.ranks.preset or DEFAULT_DUMMY_PRESET
        config = dummy_config(preset, options.ranks.num_layers)
        folder = dummy_model_dir(options.demo_folder(Path.home()), preset, config)
        name = options.model_name or f"{preset}-dummy"
        return replace(options, model_dir=str(folder), model_name=name)
    checkpoint = Path(options.checkpoint) if options.checkpoint else demo_checkpoint(options.demo_folder(Path.home()))
    name = options.model_name or ("glm-demo" if not options.checkpoint else checkpoint.resolve().name)
    return replace(options, checkpoint=str(checkpoint), model_name=name)


def run(args) -> int:
    options = options_from_args(args)
    name = options.model_name
    stack = LocalStack(options)
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"glm serve: starting {options.pools} pool(s) of {options.tp} rank(s) for {name}", file=sys.stderr)
    stack.start()
    try:
        if not options.no_demo_call:
            _show_client_call(stack.address, name)
        http = f"http://{stack.address.rsplit(':', 1)[0]}:{stack.options.http_port}"
        print(f"glm serve: OpenAI-compatible HTTP API on {http}/v1, e.g.", file=sys.stderr)
        print(f"  curl -s {http}/v1/completions -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{name}\", \"prompt\": \"{DEMO_PROMPT}\", \"max_tokens\": 16}}'", file=sys.stderr)
        if stack.metrics is not None:
            print(f"glm serve: metrics of every process on http://{stack.address.rsplit(':', 1)[0]}:"
                  f"{stack.metrics.port}/metrics", file=sys.stderr)
        print("glm serve: serving; Ctrl-C stops", file=sys.stderr)
        while not stopping:
            stack.check_alive()
            time.sleep(0.5)
    except StackError as exc:
        print(f"glm serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0
