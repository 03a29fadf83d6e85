"""The gateway: the public gRPC API (``glm.v1.TextGeneration``), stateless, no torch.

It validates and tokenizes a call, enqueues it on Redis for the pools, and relays
the request's event stream back to the caller (``docs/architecture.md`` "Processes",
"Redis contract").

    catalog.py     the models served: config.json + tokenizer of each checkpoint
    validation.py  GenerateRequest -> a validated, tokenized ``Admission`` (pure)
    broker.py      Redis: idempotent enqueue, queue depth, event reading, cancel
    relay.py       events -> GenerateStreamResponse / GenerateResponse (pure)
    service.py     the TextGeneration servicer
    auth.py        the optional API-key interceptor
    reflection.py  server reflection v1 (over grpcio-reflection's v1alpha) and v1alpha
    server.py      the grpc.aio server: health, reflection, TLS, graceful shutdown
"""
