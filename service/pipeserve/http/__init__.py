"""The HTTP/JSON front door: OpenAI-compatible endpoints (/v1/audio/transcriptions,
/v1/embeddings, /v1/completions, /v1/chat/completions, /v1/models) and /healthz, /readyz on
`Settings.http_listen`, served by the server's own process and event loop.

It owns the translation between OpenAI's request/response shapes and the pipeserve.v1
messages, and nothing else: every request becomes a call on the server's own gRPC services
over a loopback channel (a private unix socket), so authentication, limits, admission,
draining, metrics, tracing and error reasons are exactly those of a gRPC caller. It imports
the contracts and the core settings/errors only; no pipeline, model or torch code.

Stack: aiohttp (maintained by aio-libs since 2014, one package). It runs on an existing
asyncio loop with AppRunner/TCPSite (no server lifecycle or signal handling of its own to
fight with grpc.aio's), bounds a request body (client_max_size) before reading it, parses
multipart uploads itself, streams responses (server-sent events) and cancels a handler when
its client goes away, which cancels the gRPC call and so the work. Starlette would need
uvicorn (whose Server wants to own signals) and python-multipart beside it.

Modules: front_door (start/stop, the loopback channel), routes (the endpoints), fields
(request fields checked, generation options), errors (gRPC status -> HTTP status and OpenAI's
error JSON), sse (event framing, reading a stream), transcripts (text/srt/vtt/verbose_json),
chat (chat templates from tokenizer_config.json).

May import: core, contracts.
"""
