"""``gptevo serve``: an OpenAI-compatible HTTP server with continuous batching (spec/serve.md).

- :mod:`gptevo.serve.app`: the Starlette app (``create_app``) and its handlers;
- :mod:`gptevo.serve.engine`: the thread that steps :class:`gptevo.batching.BatchDecoder`;
- :mod:`gptevo.serve.protocol`: OpenAI request checks and response objects;
- :mod:`gptevo.serve.formats`: chat formats and incremental detokenization;
- :mod:`gptevo.serve.metrics`: counters and the Prometheus text;
- :mod:`gptevo.serve.command`: the ``gptevo serve`` subcommand on uvicorn.

Needs the ``serve`` extra (uvicorn, starlette); importing this package alone loads neither.
"""
