"""The typed seams between the scheduler and the workers: a refused Prefill names its
request in the trailing metadata (``ShardCallError.refused_request_id``, never parsed
from the message), and a ``CachedBatch`` carries its width, which the scheduler reads
as is (``loop.view_of``) and the workers fill with the cache length. In-process fakes
for the client's side, then one real worker process for the contract itself."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from model.kv_footprint import blocks_for
from services.common.errors import REFUSED_REQUEST_METADATA
from services.proto_gen.glm.v1 import shard_pb2 as pb
from services.proto_gen.glm.v1 import shard_pb2_grpc
from services.scheduler.shard_pb import PoolFailure, view_of
from services.worker.client import ShardCallError, ShardClient, refused_request_id


class Refusing(shard_pb2_grpc.ShardServiceServicer):
    """A fake rank whose Prefill is refused with the given trailing metadata."""

    def __init__(self, code: grpc.StatusCode, metadata: tuple) -> None:
        self.code, self.metadata = code, metadata

    async def Prefill(self, request, context):
        if self.metadata:
            context.set_trailing_metadata(self.metadata)
        await context.abort(self.code, "request 99 is mentioned in words only")


def refusal(tmp_path, code, metadata) -> ShardCallError:
    async def main():
        server = grpc.aio.server()
        shard_pb2_grpc.add_ShardServiceServicer_to_server(Refusing(code, metadata), server)
        address = f"unix://{tmp_path}/fake-rank.sock"
        server.add_insecure_port(address)
        await server.start()
        try:
            async with ShardClient([address], timeout_s=60) as client:
                with pytest.raises(ShardCallError) as err:
                    await client.prefill(pb.Batch(id=1))
                return err.value
        finally:
            await server.stop(None)
    return asyncio.run(main())


def test_refused_request_id_comes_from_the_trailing_metadata(tmp_path):
    err = refusal(tmp_path, grpc.StatusCode.INVALID_ARGUMENT, ((REFUSED_REQUEST_METADATA, "7"),))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.method == "Prefill"
    assert err.refused_request_id == 7                       # not the 99 of the message


def test_a_refusal_without_the_metadata_names_no_request(tmp_path):
    err = refusal(tmp_path, grpc.StatusCode.INVALID_ARGUMENT, ())
    assert err.refused_request_id is None and "request 99" in err.details


def test_refused_request_id_of_odd_metadata():
    assert refused_request_id(None) is None
    assert refused_request_id((("other", "3"),)) is None
    assert refused_request_id(((REFUSED_REQUEST_METADATA, "x3"),)) is None
    assert refused_request_id(((REFUSED_REQUEST_METADATA, b"12"),)) == 12


def test_the_scheduler_reads_the_batch_width_as_sent():
    reply = pb.DecodeResponse(batch=pb.CachedBatch(id=4, request_ids=[1, 2], size=2, max_tokens=10**6, width=9))
    view = view_of(reply)
    assert (view.id, view.row_ids, view.width, view.max_tokens) == (4, (1, 2), 9, 10**6)
    assert view_of(pb.DecodeResponse()) is None
    assert view_of(pb.DecodeResponse(batch=pb.CachedBatch(id=4))) is None             # no row left
    with pytest.raises(PoolFailure, match="without its width"):
        view_of(pb.DecodeResponse(batch=pb.CachedBatch(id=4, request_ids=[1], size=1, max_tokens=8)))


# -- a real worker ----------------------------------------------------------------------------
@pytest.mark.processes
def test_a_real_worker_names_the_refused_request_and_reports_its_width(checkpoint):
    from services.worker.pool import start_pool

    def request(rid: int, ids: list[int], max_new: int) -> pb.Request:
        return pb.Request(id=rid, input_ids=ids, sampling=pb.SamplingParameters(greedy=True),
                          stopping=pb.StoppingCriteria(max_new_tokens=max_new))

    good = [request(11, [20100, 20200, 20300, 150001], 6), request(12, [20400, 150001], 9)]
    bad = request(13, [200000, 20100, 150001], 6)                       # outside the vocabulary

    async def main(addresses):
        async with ShardClient(addresses, timeout_s=60) as client:
            await client.warmup(4, 16, 48)
            with pytest.raises(ShardCallError) as err:
                await client.prefill(pb.Batch(id=1, requests=[good[0], bad, good[1]]))
            prefilled = await client.prefill(pb.Batch(id=2, requests=good))
            decoded = await client.decode([prefilled.batch])
            await client.clear_cache()
            return err.value, prefilled.batch, decoded.batch

    pool = start_pool(checkpoint("glm-tiny", tp=1, seed=3), 1, dtype="float32", kv_memory_gib=0.002)
    try:
        err, after_prefill, after_decode = asyncio.run(main(pool.addresses))
    finally:
        pool.stop()
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.refused_request_id == 13
    # the width is the longest row: the widest prompt + sop, then one token per decode step
    assert after_prefill.width == 5 and after_decode.width == 6
    # and the footprint is the blocks the rows hold now (paged pool of 16-token blocks)
    assert after_prefill.max_tokens == (blocks_for(5, 16) + blocks_for(3, 16)) * 16 == 32
    assert after_decode.max_tokens == (blocks_for(6, 16) + blocks_for(4, 16)) * 16
