"""``glm bench serve``: a load generator for the public API and the report it prints.

``workload`` draws the requests (prompts, output lengths, Poisson arrival times) from a seed;
``stats`` turns per-request timings into throughput, TTFT and inter-token latency; ``driver``
sends a workload to a gateway over gRPC, or to any OpenAI-compatible server through
``openai_client``, and times every streamed message. None of them imports
torch; ``services.cli.bench`` starts one local stack per batching mode and compares them.
"""
