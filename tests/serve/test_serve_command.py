"""``gptevo serve`` as a process: the bundled model by default on 127.0.0.1 and an ephemeral port,
the API key from GPTEVO_API_KEY, and SIGTERM draining the running request before exiting 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from serve_helpers import SERVED, alone, load_bundled


@pytest.fixture
def process():
    env = {**os.environ, "GPTEVO_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "gptevo.cli", "serve", "--port", "0", "--backend", "reference",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while True:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            break
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("gptevo serve did not start:\n" + "".join(lines))
    threading.Thread(target=proc.stderr.read, daemon=True).start()      # keep draining its log
    yield proc, m.group(1), "".join(lines)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_process_key_bundled_model_and_sigterm_drain(process):
    proc, url, log = process
    assert "'austen'" in log and "backend 'reference'" in log
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [SERVED]

    model = load_bundled("reference")
    from gptevo.generation import tokenizer_for

    want = alone(model, tokenizer_for(model).encode("It is"), 40)
    stream = client.completions.create(model=SERVED, prompt="It is", max_tokens=40, temperature=0, stream=True)
    pieces = []
    for chunk in stream:
        if not pieces:
            proc.send_signal(signal.SIGTERM)              # mid-generation: it must still finish
        pieces.append(chunk)
    assert len(pieces) > 10                            # chunks kept coming after the signal
    assert "".join(c.choices[0].text for c in pieces) == want
    assert pieces[-1].choices[0].finish_reason == "length"
    assert proc.wait(timeout=60) == 0
