"""Python clients of the gateway: ``GLMClient`` (blocking) and ``AsyncGLMClient`` (asyncio).

    with GLMClient("127.0.0.1:50051", api_key="...") as client:
        reply = client.generate("The capital of France is [MASK].", max_new_tokens=16,
                                temperature=0, stop=["."])
        for chunk in client.generate_stream("Once upon a time", seed=7):
            print(chunk.text, end="", flush=True)

Options are plain keywords (see ``build_request``); replies are the protobuf
messages of ``glm.v1`` (``GenerateResponse``, ``GenerateStreamResponse``...).
A failed call raises ``GLMError`` with the gRPC ``code`` and the server's message.
Leaving a stream early (``break``, closing the iterator) cancels the call, and the
gateway cancels the generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

import grpc

from services.proto_gen.glm.v1 import generation_pb2 as pb
from services.proto_gen.glm.v1 import generation_pb2_grpc as pb_grpc


class GLMError(Exception):
    """A call the gateway refused or could not finish."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "GLMError":
        return cls(error.code(), error.details() or "")


def build_request(prompt: str | None = None, *, prompt_token_ids: Iterable[int] | None = None,
                  model: str = "", request_id: str = "",
                  max_new_tokens: int | None = None, min_new_tokens: int = 0,
                  stop: Iterable[str] = (), temperature: float | None = None, top_k: int = 0,
                  top_p: float | None = None, repetition_penalty: float | None = None,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                  seed: int | None = None, logprobs: bool = False,
                  top_logprobs: int = 0, n: int = 0, num_beams: int = 0,
                  length_penalty: float | None = None, no_repeat_ngram_size: int = 0,
                  beam_deterministic: bool = False) -> pb.GenerateRequest:
    """A ``GenerateRequest``; ``None`` leaves an option to the server's default. ``n``:
    samples; ``num_beams`` (>= 2) and the next three: a beam search."""
    sampling = pb.SamplingOptions(top_k=top_k, presence_penalty=presence_penalty,
                                  frequency_penalty=frequency_penalty)
    for name, value in (("temperature", temperature), ("top_p", top_p),
                        ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(sampling, name, value)
    stopping = pb.StoppingOptions(min_new_tokens=min_new_tokens, stop=list(stop))
    if max_new_tokens is not None:
        stopping.max_new_tokens = max_new_tokens
    beam = pb.BeamSearchOptions(num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
                                deterministic=beam_deterministic)
    if length_penalty is not None:
        beam.length_penalty = length_penalty
    return pb.GenerateRequest(
        model=model, prompt=prompt or "", prompt_token_ids=list(prompt_token_ids or ()),
        request_id=request_id, sampling=sampling, stopping=stopping,
        output=pb.OutputOptions(logprobs=logprobs, top_logprobs=top_logprobs), n=n, beam_search=beam)


class _Connection:
    """What both clients share: address, credentials, metadata, default deadline."""

    def __init__(self, address: str, *, api_key: str | None, tls: bool,
                 root_certificates: bytes | str | Path | None, server_name: str | None,
                 timeout: float | None) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self.credentials = None
        self.options: list[tuple[str, str]] = []
        if tls or root_certificates is not None:
            roots = root_certificates
            if isinstance(roots, (str, Path)):
                roots = Path(roots).expanduser().read_bytes()
            self.credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            if server_name:
                self.options.append(("grpc.ssl_target_name_override", server_name))

    def call_timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class GLMClient:
    """Blocking client. ``timeout`` (seconds) is the default deadline of every call."""

    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | Path | None = None,
                 server_name: str | None = None, timeout: float | None = None) -> None:
        self._conn = _Connection(address, api_key=api_key, tls=tls,
                                 root_certificates=root_certificates, server_name=server_name,
                                 timeout=timeout)
        if self._conn.credentials is not None:
            self._channel = grpc.secure_channel(address, self._conn.credentials, self._conn.options)
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.TextGenerationStub(self._channel)

    def _call(self, method, request, timeout):
        try:
            return method(request, timeout=self._conn.call_timeout(timeout),
                          metadata=self._conn.metadata)
        except grpc.RpcError as error:
            raise GLMError.from_rpc(error) from None

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 **options) -> pb.GenerateResponse:
        return self._call(self._stub.Generate, build_request(prompt, **options), timeout)

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                        **options) -> Iterator[pb.GenerateStreamResponse]:
        call = self._stub.GenerateStream(build_request(prompt, **options),
                                         timeout=self._conn.call_timeout(timeout),
                                         metadata=self._conn.metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise GLMError.from_rpc(error) from None
        finally:
            call.cancel()  # no-op once the stream has ended

    def tokenize(self, prompt: str, model: str = "", *, timeout: float | None = None) -> pb.TokenizeResponse:
        return self._call(self._stub.Tokenize, pb.TokenizeRequest(model=model, prompt=prompt), timeout)

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelSpec]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelSpec:
        return self._call(self._stub.ModelInfo, pb.ModelInfoRequest(model=model), timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GLMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGLMClient:
    """asyncio client; create it inside the event loop that uses it."""

    def __init__(self, address: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | str | Path | None = None,
                 server_name: str | None = None, timeout: float | None = None) -> None:
        self._conn = _Connection(address, api_key=api_key, tls=tls,
                                 root_certificates=root_certificates, server_name=server_name,
                                 timeout=timeout)
        if self._conn.credentials is not None:
            self._channel = grpc.aio.secure_channel(address, self._conn.credentials, self._conn.options)
        else:
            self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.TextGenerationStub(self._channel)

    async def _call(self, method, request, timeout):
        try:
            return await method(request, timeout=self._conn.call_timeout(timeout),
                                metadata=self._conn.metadata)
        except grpc.RpcError as error:
            raise GLMError.from_rpc(error) from None

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **options) -> pb.GenerateResponse:
        return await self._call(self._stub.Generate, build_request(prompt, **options), timeout)

    async def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                              **options) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self._stub.GenerateStream(build_request(prompt, **options),
                                         timeout=self._conn.call_timeout(timeout),
                                         metadata=self._conn.metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise GLMError.from_rpc(error) from None
        finally:
            call.cancel()

    async def tokenize(self, prompt: str, model: str = "", *,
                       timeout: float | None = None) -> pb.TokenizeResponse:
        return await self._call(self._stub.Tokenize, pb.TokenizeRequest(model=model, prompt=prompt),
                                timeout)

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelSpec]:
        return list((await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)).models)

    async def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelSpec:
        return await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(model=model), timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncGLMClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
