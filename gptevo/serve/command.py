"""``gptevo serve``: the OpenAI-compatible server on uvicorn (see spec/serve.md).

    gptevo serve [--model DIR] [--backend B] [--host 127.0.0.1] [--port 8000] [--max-batch N]
                 [--max-queue N] [--max-tokens N] [--api-key KEY] [--chat-template FILE] ...

With no ``--model`` the bundled model is served. It binds 127.0.0.1 unless told otherwise; ``--port 0``
takes a free port. The line ``gptevo serve: listening on http://HOST:PORT`` on stderr says where
(tests and scripts read it). ``--api-key`` (default ``$GPTEVO_API_KEY``) makes every ``/v1/`` route
require ``Authorization: Bearer KEY``.

SIGTERM or Ctrl-C drains: the listening socket closes, new requests on open connections get 503,
running requests finish (at most ``--drain-timeout`` seconds), then the engine stops and the command
exits with status 0 (130 after Ctrl-C).
"""
from __future__ import annotations

import os
import signal
import socket

from gptevo.errors import GptevoError, RequestError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_subparser(sub, env) -> None:
    """Add ``serve`` to the ``gptevo`` subcommands (``env`` gives the defaults read from variables)."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (gptevo[serve])")
    s.add_argument("--model", help="model directory (default: the bundled Austen model)")
    s.add_argument("--backend", default=env.get("GPTEVO_BACKEND") or None,
                   help="reference, numba, cupy, ... (default: $GPTEVO_BACKEND, else numba when installed, "
                        "else reference)")
    s.add_argument("--weights", choices=("stored", "int8"), default="stored", help="weight mode (see generate)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot before 503 + Retry-After (default 64)")
    s.add_argument("--max-tokens", type=int, default=2048,
                   help="largest max_tokens a request may ask for; also the chat default (default 2048)")
    s.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                   help="request body limit, 413 beyond (default 2 MiB)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its body, 408 beyond (default 30)")
    s.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM, seconds to let running requests finish (default 60)")
    s.add_argument("--api-key", default=env.get("GPTEVO_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $GPTEVO_API_KEY)")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the model directory's name)")
    s.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions instead of the model's own")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info logs each request)")
    s.set_defaults(func=cmd_serve)


def _bundled_model_dir() -> str:
    from importlib.resources import files

    path = files("gptevo").joinpath("data", "austen")
    if not path.is_dir():
        raise RequestError(f"the bundled model is missing ({path}); pass --model DIR")
    return os.fspath(path)


def _check_args(args) -> None:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-tokens", args.max_tokens, 1), ("--max-body-bytes", args.max_body_bytes, 1024),
                             ("--port", args.port, 0)):
        if value < low:
            raise RequestError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        raise RequestError(f"--port must be <= 65535, got {args.port}")
    for flag, value in (("--body-timeout", args.body_timeout), ("--drain-timeout", args.drain_timeout)):
        if not value > 0:
            raise RequestError(f"{flag} must be > 0 seconds, got {value}")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except (OSError, IndexError) as exc:
        raise RequestError(f"cannot listen on --host {host} --port {port}: {exc}") from None


def cmd_serve(args, env, stdin, out, err) -> int:
    try:
        import uvicorn
    except ImportError:
        raise GptevoError("gptevo serve needs the serve extra: pip install 'gptevo[serve]'") from None
    from gptevo.loading import load
    from gptevo.serve.app import ServerConfig, create_app
    from gptevo.tokenizer import load_tokenizer

    _check_args(args)
    path = args.model or _bundled_model_dir()
    model = load(path, backend=args.backend, weights=args.weights)
    tokenizer = load_tokenizer(path, vocab_size=model.config.vocab_size,
                               encodings_base=env.get("TIKTOKEN_ENCODINGS_BASE") or None,
                               cache_dir=env.get("TIKTOKEN_CACHE_DIR") or env.get("DATA_GYM_CACHE_DIR") or None)
    model.tokenizer = tokenizer
    name = args.served_model_name or os.path.basename(os.path.normpath(path))
    config = ServerConfig(served_name=name, api_key=args.api_key, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                          body_timeout_s=args.body_timeout, max_tokens=args.max_tokens)
    app = create_app(model, config=config, tokenizer=tokenizer, template_path=args.chat_template)
    server_state = app.state.server
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if args.host not in LOOPBACK and not args.api_key:
        err.write(f"gptevo serve: warning: listening on {args.host} without --api-key: anyone who can reach "
                  f"this port can use the model\n")
    backend = getattr(getattr(model, "backend", None), "name", "?")
    err.write(f"gptevo serve: model {name!r} ({server_state.chat.kind} chat format) on backend {backend!r}, "
              f"max batch {args.max_batch}, queue {args.max_queue}\n")
    url_host = f"[{host}]" if ":" in host else host
    err.write(f"gptevo serve: listening on http://{url_host}:{port}\n")
    err.flush()

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server_state.engine.draining = True
            super().handle_exit(sig, frame)

    server = DrainingServer(uvicorn.Config(app, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.drain_timeout, timeout_keep_alive=5,
                                           limit_concurrency=args.max_batch + args.max_queue + 256))
    # uvicorn re-raises the signal that stopped it once it has drained; ours ends the command quietly
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0
