"""``glm client``: call a gateway from the command line.

Prints the generated text (as it arrives with ``--stream``), or with ``--json``
one JSON object (``--stream --json``: one object per stream message, JSON Lines).
``--tokenize TEXT`` and ``--list-models`` query the gateway instead of generating.
A refused call exits 1 with ``CODE: message``.
"""

from __future__ import annotations

import json
import sys

from google.protobuf import json_format

from services.common.options import repeated
from services.client import GLMClient


def _to_json(message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True),
                      ensure_ascii=False)


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def generation_options(args) -> dict:
    return dict(
        prompt_token_ids=_prompt_ids(args.prompt_ids) if args.prompt_ids else None,
        model=args.model, request_id=args.request_id, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, stop=repeated(args.stop),
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, logprobs=args.logprobs,
        top_logprobs=args.top_logprobs, n=args.n, num_beams=args.num_beams, length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, beam_deterministic=args.beam_deterministic)


def run(args, out=None) -> int:
    out = out or sys.stdout
    client = GLMClient(args.address, api_key=args.api_key, tls=args.tls,
                       root_certificates=args.tls_ca, server_name=args.tls_server_name,
                       timeout=args.timeout_s)
    with client:
        if args.list_models:
            models = client.list_models()
            if args.json:
                print(json.dumps([json_format.MessageToDict(m, preserving_proto_field_name=True)
                                  for m in models]), file=out)
            for spec in [] if args.json else models:
                print(f"{spec.name}\tmax_sequence_length={spec.max_sequence_length}\t"
                      f"vocab_size={spec.vocab_size}", file=out)
            return 0
        if args.tokenize is not None:
            reply = client.tokenize(args.tokenize, args.model)
            print(_to_json(reply) if args.json else ",".join(map(str, reply.token_ids)), file=out)
            return 0
        options = generation_options(args)
        if not args.stream:
            reply = client.generate(args.prompt, **options)
            if args.json:
                print(_to_json(reply), file=out)
            elif reply.candidates:                        # samples or beams: one line each
                for c in reply.candidates:
                    print(f"[{c.index}] score={c.score:.4f} seed={c.seed}\t{c.text}", file=out)
            else:
                print(reply.text, file=out)
            return 0
        for message in client.generate_stream(args.prompt, **options):
            if args.json:
                print(_to_json(message), file=out, flush=True)
            elif args.n > 1:
                if message.text:
                    print(f"[{message.candidate}] {message.text}", file=out, flush=True)
            else:
                print(message.text, end="", file=out, flush=True)
        if not args.json:
            print(file=out)
    return 0
