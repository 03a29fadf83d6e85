"""``glm bench serve --api openai`` and ``--peer``: the server-sent-event reader, the token
counting rule, and the client against a real HTTP server on loopback that streams completion
chunks the OpenAI way (each test states how the server counts its tokens), with its errors
(HTTP error bodies, errors inside the stream, connection refused) and the --duration-s cut."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.bench.driver import CUT, run_load, server_model
from services.bench.openai_client import (
    SOURCE_CHUNKS, SOURCE_RUNNING_USAGE, SOURCE_SPREAD, SOURCE_TOKEN_IDS, ChunkCounter, OpenAIError,
    base_url, completion_body, spread, sse_data)
from services.bench.stats import summarise
from services.bench.workload import make_workload
from services.cli.main import main


class FakeCompletions(ThreadingHTTPServer):
    """A loopback server of ``/v1/models`` and streamed ``/v1/completions``: it sends exactly
    ``max_tokens`` tokens, ``per_chunk`` tokens a chunk, ``gap_s`` apart, in the style ``style``:
    ``token_ids`` (each chunk lists its ids), ``running`` (each chunk has the running usage),
    ``plain`` (text only), then a usage chunk and ``[DONE]``. ``fail`` makes it answer
    ``(status, body)`` instead; ``stream_error`` sends an error event after two chunks."""

    daemon_threads = True

    def __init__(self, style="token_ids", per_chunk=1, gap_s=0.002, fail=None, stream_error=False):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.style, self.per_chunk, self.gap_s = style, per_chunk, gap_s
        self.fail, self.stream_error = fail, stream_error
        self.bodies: list[dict] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address):
        pass                                     # a client that hung up (the --duration-s cut)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, kind="application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode())
        else:
            self._send(404, b'{"detail": "Not Found"}')

    def do_POST(self):
        server: FakeCompletions = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.bodies.append(body)
        if server.fail:
            status, text = server.fail
            return self._send(status, text.encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        total, sent, chunks = body["max_tokens"], 0, 0
        while sent < total:
            n = min(server.per_chunk, total - sent)
            ids = list(range(sent, sent + n))
            sent, chunks = sent + n, chunks + 1
            choice = {"index": 0, "text": "w" * n, "finish_reason": "length" if sent == total else None}
            chunk = {"object": "text_completion", "model": body["model"], "choices": [choice]}
            if server.style == "token_ids":
                choice["token_ids"] = ids
                choice["text"] = ""              # a token that decodes to no text yet still counts
            elif server.style == "running":
                chunk["usage"] = {"prompt_tokens": 5, "completion_tokens": sent, "total_tokens": 5 + sent}
            self._event(chunk)
            if server.stream_error and chunks == 2:
                self._event({"error": {"message": "engine died", "code": 500}})
                return
            time.sleep(server.gap_s)
        self._event({"object": "text_completion", "choices": [],
                     "usage": {"prompt_tokens": 5, "completion_tokens": total, "total_tokens": 5 + total}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj: dict) -> None:
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()


def _load(address, workload, **options):
    return asyncio.run(run_load(address, workload, api="openai", model="fake-model", **options))


def _workload(count=4, lo=3, hi=9):
    return make_workload(count, rate=0, min_new_tokens=lo, max_new_tokens=hi, seed=1)


async def _lines(raw: bytes):
    for line in raw.splitlines(keepends=True):
        yield line


def _events(raw: bytes) -> list[str]:
    async def collect():
        return [data async for data in sse_data(_lines(raw))]
    return asyncio.run(collect())


def test_sse_reader_follows_the_event_stream_format():
    raw = (b": keep-alive comment\r\n\r\nevent: completion\r\ndata: {\"a\": 1}\r\n\r\n"
           b"data:two\ndata: lines\nid: 7\n\n\n\ndata: [DONE]")          # no blank line at the end
    assert _events(raw) == ['{"a": 1}', "two\nlines", "[DONE]"]


def test_counting_rule_prefers_ids_then_running_usage_then_chunks():
    by_ids = ChunkCounter()
    assert [by_ids.tokens_in({"choices": [{"text": "", "token_ids": ids}]}) for ids in ([1, 2], [3])] == [2, 1]
    assert by_ids.settle(3) == ([2, 1], SOURCE_TOKEN_IDS)

    running = ChunkCounter()
    chunks = [{"choices": [{"text": "ab"}], "usage": {"completion_tokens": c}} for c in (1, 3, 4)]
    assert [running.tokens_in(c) for c in chunks] == [1, 2, 1]
    assert running.tokens_in({"choices": [], "usage": {"completion_tokens": 4}}) == 0   # the usage chunk
    assert running.settle(4) == ([1, 2, 1], SOURCE_RUNNING_USAGE)

    plain = ChunkCounter()
    texts = ["a", "", "b", "c"]                  # an empty chunk carries nothing we can count
    assert [plain.tokens_in({"choices": [{"text": t}]}) for t in texts] == [1, 0, 1, 1]
    assert plain.settle(3) == ([1, 1, 1], SOURCE_CHUNKS)
    assert plain.settle(8) == ([2, 3, 3], SOURCE_SPREAD)
    assert spread(7, 7) == [1] * 7 and sum(spread(100, 7)) == 100


def test_request_body_forces_the_length_and_extra_body_overrides():
    req = _workload(1)[0]
    body = completion_body(req, model="m", temperature=0.0)
    assert body["prompt"] == req.prompt and body["model"] == "m" and body["stream"] is True
    assert body["max_tokens"] == body["min_tokens"] == req.max_new_tokens and body["ignore_eos"] is True
    assert body["temperature"] == 0.0 and "seed" not in body
    assert body["stream_options"]["include_usage"] is True
    sampled = completion_body(req, model="m", temperature=0.8, extra_body={"min_tokens": None, "top_k": 5})
    assert sampled["seed"] == req.seed and "min_tokens" not in sampled and sampled["top_k"] == 5
    assert base_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert base_url("https://h:1/api/v1/") == "https://h:1/api/v1"
    with pytest.raises(ValueError, match="HOST:PORT"):
        base_url("no-port")


@pytest.mark.parametrize("style,per_chunk,source", [
    ("token_ids", 1, SOURCE_TOKEN_IDS),
    ("running", 2, SOURCE_RUNNING_USAGE),
    ("plain", 3, SOURCE_SPREAD),                 # 3 tokens a chunk, said only by the final usage
    ("plain", 1, SOURCE_CHUNKS),
])
def test_openai_stream_counts_every_token(style, per_chunk, source):
    workload = _workload()
    with FakeCompletions(style=style, per_chunk=per_chunk) as server:
        results = _load(server.address, workload, concurrency=2)
    expected = sum(r.max_new_tokens for r in workload)
    s = summarise(results)
    assert (s["completed"], s["failed"]) == (4, 0), s["errors"]
    assert s["generated_tokens"] == s["requested_tokens"] == expected and s["completed_tokens_match"]
    assert s["token_count_source"] == {source: 4}
    assert s["prompt_tokens"]["mean"] == 5                    # the server's final usage
    for req, res in zip(workload, results):
        chunks = -(-req.max_new_tokens // per_chunk)
        assert len(res.token_times) == chunks and res.finish_reason == "length"
        assert res.sent_s < res.first_token_s <= res.finished_s
    # ITL: every token but those of each request's first chunk gives one sample; a spread count
    # puts the smaller shares first (7 tokens sent as 3+3+1 are counted 2+2+3)
    firsts = [spread(r.max_new_tokens, -(-r.max_new_tokens // per_chunk))[0] if source == SOURCE_SPREAD
              else min(per_chunk, r.max_new_tokens) for r in workload]
    assert s["itl_s"]["count"] == expected - sum(firsts)
    assert s["itl_s"]["p50"] > 0 and s["ttft_s"]["count"] == 4
    assert [b["prompt"] for b in sorted(server.bodies, key=lambda b: b["prompt"])] == \
        sorted(r.prompt for r in workload)
    assert all(b["max_tokens"] == b["min_tokens"] and b["temperature"] == 0.0 for b in server.bodies)


@pytest.mark.parametrize("fail,expected", [
    ((400, '{"error": {"message": "max_tokens is too large",\n "code": 400}}'),
     'HTTP 400: {"error": {"message": "max_tokens is too large", "code": 400}}'),
    ((503, "Service Unavailable: no capacity " + "x" * 500), "HTTP 503: Service Unavailable: no capacity "),
])
def test_http_errors_report_status_and_body(fail, expected):
    with FakeCompletions(fail=fail) as server:
        results = _load(server.address, _workload(2))
    if fail[0] == 400:
        assert [r.error for r in results] == [expected] * 2
    else:                                        # a long body is cut to its start
        assert all(r.error.startswith(expected) and len(r.error) <= len("HTTP 503: ") + 200 for r in results)
    assert summarise(results)["completed"] == 0


def test_an_error_inside_the_stream_fails_the_request():
    with FakeCompletions(stream_error=True) as server:
        results = _load(server.address, _workload(2, lo=5, hi=5))
    assert all(r.error == "stream error: engine died" and not r.completed for r in results)


def test_connection_refused_is_reported_per_request_and_before_the_run():
    with socket.socket() as s:                   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    results = _load(address, _workload(2))
    assert all(r.error.startswith("ClientConnectorError: Cannot connect to host 127.0.0.1:") for r in results)
    with pytest.raises(OpenAIError, match=r"GET http://127\.0\.0\.1:\d+/v1/models"):
        asyncio.run(server_model("openai", address))


def test_slow_streams_are_cut_at_the_duration():
    workload = _workload(6, lo=200, hi=200)
    with FakeCompletions(gap_s=0.05) as server:    # 200 tokens take 10 s; the run stops at 0.6 s
        started = time.perf_counter()
        results = _load(server.address, workload, concurrency=3, duration_s=0.6)
        elapsed = time.perf_counter() - started
    assert elapsed < 5
    assert [r.error for r in results] == [CUT] * 6
    assert sum(r.sent_s is not None for r in results) == 3          # 3 more waited for a slot
    assert all(r.token_times for r in results if r.sent_s is not None)


def test_one_invocation_benches_a_server_and_a_peer(capsys):
    with FakeCompletions(per_chunk=1, gap_s=0.001) as ours, FakeCompletions(per_chunk=1, gap_s=0.004) as peer:
        code = main(["bench", "serve", "--address", ours.address, "--api", "openai", "--label", "ours",
                     "--peer", peer.address, "--peer-label", "vllm", "--requests", "4", "--rate", "0",
                     "--min-new-tokens", "6", "--max-new-tokens", "6", "--warmup", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["modes"]) == ["ours", "vllm"]
    assert report["settings"]["peer"] == {"address": peer.address, "api": "openai",
                                          "model": "fake-model", "label": "vllm"}
    for row in report["modes"].values():
        assert (row["completed"], row["generated_tokens"]) == (4, 24) and row["completed_tokens_match"]
    ratio = report["peer_ratios"]["ours_vs_vllm"]
    expected = report["modes"]["ours"]["throughput_tok_s"] / report["modes"]["vllm"]["throughput_tok_s"]
    assert ratio["throughput_tok_s"] == pytest.approx(expected)
    assert all(ratio[k] is not None for k in ("ttft_p50", "itl_p50", "itl_p99"))
    # the same workload went to both: warm-up (1) + 4 requests each, the same prompts in each
    assert len(ours.bodies) == len(peer.bodies) == 5
    assert sorted(b["prompt"] for b in ours.bodies) == sorted(b["prompt"] for b in peer.bodies)


@pytest.mark.parametrize("argv,message", [
    (["--api", "openai"], "--api openai needs --address"),
    (["--peer-model", "x"], "need --peer HOST:PORT"),
    (["--address", "127.0.0.1:1", "--extra-body", "[1]"], "--extra-body: expected a JSON object"),
    (["--address", "127.0.0.1:1", "--api", "openai", "--extra-body", "{"], "--extra-body: not JSON"),
])
def test_bad_flag_combinations_are_refused_before_anything_starts(argv, message, capsys):
    assert main(["bench", "serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_peer_model_has_the_compute_shape_of_glm_small():
    import importlib.util
    from pathlib import Path

    from model.config import GLMConfig

    path = Path(__file__).resolve().parents[1] / "bench" / "peer_model.py"
    spec = importlib.util.spec_from_file_location("peer_model", path)
    peer_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer_model)
    ours = GLMConfig.from_name("glm-small")
    llama = peer_model.llama_config(ours, "bfloat16")
    assert llama["architectures"] == ["LlamaForCausalLM"] and llama["tie_word_embeddings"] is True
    assert (llama["num_hidden_layers"], llama["hidden_size"], llama["num_attention_heads"],
            llama["num_key_value_heads"], llama["intermediate_size"], llama["vocab_size"]) == \
        (ours.num_layers, ours.hidden_size, ours.num_attention_heads, ours.num_attention_heads,
         ours.inner_hidden_size, ours.vocab_size) == (4, 256, 8, 8, 688, 150528)
    assert llama["head_dim"] * llama["num_attention_heads"] == llama["hidden_size"]
    assert llama["torch_dtype"] == "bfloat16"
