"""A real stack (``glm serve`` as ``LocalStack`` runs it: gateway, scheduler, a TP=2 pool
of worker processes, a private Redis) at its edges: where it listens, who may call its
ranks, and a seed at the end of the API's range.

- the ranks' rendezvous (``tcp://127.0.0.1:PORT``) and metrics listen on loopback only;
- the ranks' unix sockets and the pool's shard token are this user's only (0600, in a
  0700 folder);
- a shard call without the pool's token (``ClearCache``, ``Decode``, ``FilterBatch``)
  is refused UNAUTHENTICATED while a generation holds the pool's cache, and that
  generation finishes whole; ``Health`` stays open for probes;
- ``seed = 2**64 - 1`` through the gateway: accepted, echoed, and the tokens are what
  ``glm generate``'s sampler draws with that seed;
- ``glm worker`` refuses a non-loopback TCP ``--listen`` without a token.

No verdict depends on timing: the scheduler is held with SIGSTOP while the foreign calls
are made, and released with SIGCONT. Waits are for events, bounded by ``HANG_S``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from model.generation import GenerationOptions, Generator
from model.prompt import prepare_text_ids
from model.runner import load_model
from model.sampling import SamplingParams
from model.tokenizer import GLMTokenizer
from services.client import GLMClient
from services.common.net import free_port
from services.local import LocalStack
from services.local_options import ServeOptions
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.worker.client import ShardCallError, ShardClient
from services.worker.options import TOKEN_FILE
from listening import listening_hosts

pytestmark = [pytest.mark.processes, pytest.mark.slow, pytest.mark.redis]
ROOT = Path(__file__).resolve().parents[1]
HANG_S = 60.0
MAX_SEED = 2**64 - 1


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("glm-tiny", tp=1, seed=13)


@pytest.fixture(scope="module")
def stack(tiny, tmp_path_factory):
    options = ServeOptions.from_flat(dtype="float32",
        checkpoint=tiny, model_name=f"edges-{uuid.uuid4().hex[:8]}", port=free_port(), tp=2, pools=1,
        metrics_port=free_port(), workdir=str(tmp_path_factory.mktemp("edges-logs")))
    s = LocalStack(options).start()
    yield s
    s.stop()


def flag(pid: int, name: str) -> str:
    """The value of flag ``name`` on the command line of process ``pid``."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index(name) + 1]


def test_rendezvous_and_metrics_of_the_ranks_listen_on_loopback_only(stack):
    pool = stack.pools[0]
    dist_init = flag(pool.pids[0], "--dist-init")
    assert dist_init.startswith("tcp://127.0.0.1:")
    assert listening_hosts(int(dist_init.rpartition(":")[2])) == {"127.0.0.1"}
    for pid in pool.pids:
        assert listening_hosts(int(flag(pid, "--metrics-port"))) == {"127.0.0.1"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sockets_and_token_are_this_users_only(stack):
    pool = stack.pools[0]
    assert mode(pool.workdir) == 0o700
    for address in pool.addresses:
        socket_path = Path(address.removeprefix("unix://"))
        assert stat.S_ISSOCK(socket_path.stat().st_mode) and mode(socket_path) == 0o600
    assert mode(pool.workdir / TOKEN_FILE) == 0o600


async def foreign_calls(addresses: list[str]) -> dict[str, grpc.StatusCode]:
    """Destructive shard calls from a client that was not given the pool's token."""
    codes = {}
    async with ShardClient(addresses, timeout_s=HANG_S, token="") as stranger:
        for method, request in (("ClearCache", pb.ClearCacheRequest()),
                                ("Decode", pb.DecodeRequest(batches=[pb.CachedBatch(id=0)])),
                                ("FilterBatch", pb.FilterBatchRequest(batch_id=0))):
            try:
                await stranger.call_all(method, request)
                codes[method] = grpc.StatusCode.OK
            except ShardCallError as exc:
                codes[method] = exc.code
        await stranger.health()          # open: the probes carry no token
    return codes


def test_shard_calls_without_the_token_are_refused_and_the_generation_finishes(stack):
    scheduler = stack.schedulers[0]
    with GLMClient(stack.address, timeout=HANG_S) as client:
        stream = client.generate_stream("The river runs [MASK]", max_new_tokens=24, temperature=0.0)
        first = next(stream)                       # the pool holds the request's cache now
        scheduler.send_signal(signal.SIGSTOP)
        try:
            codes = asyncio.run(foreign_calls(stack.pools[0].addresses))
        finally:
            scheduler.send_signal(signal.SIGCONT)
        rest = list(stream)
    assert codes == dict.fromkeys(("ClearCache", "Decode", "FilterBatch"), grpc.StatusCode.UNAUTHENTICATED)
    tokens = [t for m in (first, *rest) for t in m.token_ids]
    assert rest[-1].finish_reason == "length" and len(tokens) == 24
    assert scheduler.poll() is None


def sampled_reference(checkpoint: str, prompt: str, params: SamplingParams, max_new: int) -> list[int]:
    """What ``glm generate`` draws for ``prompt`` with ``params``."""
    tokenizer = GLMTokenizer.from_file(f"{checkpoint}/ice_text.model")
    result = Generator(load_model(checkpoint)).fill_blanks(
        prepare_text_ids(tokenizer.tokenize(prompt)), params, GenerationOptions(max_new_tokens=max_new))
    return [t for blank in result.blanks for t in blank.token_ids]


def test_the_largest_uint64_seed_runs_end_to_end(stack, tiny):
    prompt = "A [MASK] holds one slice of every weight matrix."
    with GLMClient(stack.address, timeout=HANG_S) as client:
        reply = client.generate(prompt, max_new_tokens=8, temperature=1.0, seed=MAX_SEED)
    assert reply.seed == MAX_SEED
    assert list(reply.token_ids) == sampled_reference(tiny, prompt, SamplingParams(seed=MAX_SEED), 8)


def test_a_worker_refuses_a_non_loopback_tcp_listen_without_a_token(tiny):
    cmd = [sys.executable, "-m", "services.cli.main", "worker", "--checkpoint", tiny, "--tp", "1", "--rank", "0",
           "--listen", f"0.0.0.0:{free_port()}", "--dist-init", "tcp://127.0.0.1:1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S,
                          env={k: v for k, v in os.environ.items() if not k.startswith("GLM_")})
    assert done.returncode != 0 and "needs --shard-token-file" in done.stderr
