"""Helpers for the server tests: the bundled model, gptevo serve apps run by uvicorn in a thread on
127.0.0.1 with an ephemeral port (the official ``openai`` package is the client), and the text a
request gets alone from the single-sequence decode loop."""
from __future__ import annotations

import os
import socket
import threading
import time
from importlib.resources import files

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn, starlette) is not installed")
pytest.importorskip("starlette", reason="the serve extra (uvicorn, starlette) is not installed")
pytest.importorskip("openai", reason="the openai client (test extra) is not installed")

import gptevo  # noqa: E402
from gptevo.generation import sampling_for, text_pieces  # noqa: E402

BUNDLED = os.fspath(files("gptevo").joinpath("data", "austen"))
SERVED = "austen"


class LiveServer:
    """An ASGI app served by uvicorn in a daemon thread; ``url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def state(self):
        return self.app.state.server

    def client(self, **kw):
        import openai

        kw.setdefault("api_key", "unused")
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def serve_app(model, decoder=None, tokenizer=None, **config):
    from gptevo.serve.app import ServerConfig, create_app

    config.setdefault("served_name", SERVED)
    return LiveServer(create_app(model, config=ServerConfig(**config), decoder=decoder, tokenizer=tokenizer))


def load_bundled(backend: str):
    if backend not in gptevo.backends.available():
        pytest.skip(f"backend {backend!r} is not available here")
    return gptevo.load(BUNDLED, backend=backend)


def alone(model, prompt_ids, n, temperature=0.0, seed=None, stop=()):
    """The text one request gets alone: the single-sequence decode loop of gptevo.generation, with the
    sampling of gptevo.generate (fields not given take the model's generation_config.json)."""
    from gptevo.generation import tokenizer_for

    return "".join(text_pieces(tokenizer_for(model), model, list(prompt_ids), max_new_tokens=n,
                               sampling=sampling_for(model, temperature=temperature, seed=seed), stop=tuple(stop),
                               stop_token_ids=tuple(model.config.eos_token_ids)))
