"""Hostile clients (issue: malformed JSON, wrong types, unknown model, prompt beyond the context,
max_tokens <= 0 or huge, oversized bodies, non-UTF-8, slow senders and vanished clients, a full queue, no or
a wrong API key): each gets an OpenAI-style error object with its 4xx/503 status, or is dropped and
its generation cancelled; after every case the server still answers /health with nothing in flight.
Slow readers are in test_serve_engine.py (they need a decoder that outruns the socket buffers).
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import time

import openai
import pytest

from serve_helpers import SERVED, load_bundled, serve_app

LONG = 240                # max_tokens of a request that is still running when its client leaves
                          # (within the bundled model's 256-token context, with a short prompt)


@pytest.fixture(scope="module")
def model():
    return load_bundled("reference")


@pytest.fixture(scope="module")
def live(model):
    server = serve_app(model, max_batch=4, max_queue=4, max_body_bytes=1024 * 1024, body_timeout_s=1.0,
                       max_tokens=model.config.context_length)
    yield server
    server.close()


def request(live, method, path, body=b"", headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=timeout)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.headers, data


def post(live, body, path="/v1/completions", headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, hdrs, data = request(live, "POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
    return status, hdrs, json.loads(data) if data else None


def assert_error(got, status, param=None, code=None, match=None):
    st, _, body = got
    assert st == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if match is not None:
        assert re.search(match, err["message"]), err["message"]


def wait_for(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_serving(live):
    """Nothing left in flight (decoder included: every cache freed), and /health answers."""
    decoder = live.state.engine.decoder
    wait_for(lambda: live.state.engine.in_flight == 0 and decoder.running == 0 and decoder.pending == 0,
             "the engine to be idle")
    status, _, data = request(live, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


def metric(live, name):
    _, _, data = request(live, "GET", "/metrics")
    m = re.search(rf"^{re.escape(name)} (\S+)$", data.decode(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("raw, match", [
    (b'{"prompt": "x", ', "invalid JSON"),
    (b"", "invalid JSON"),
    (b'{"prompt": "\xff\xfe"}', "invalid UTF-8"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"prompt": "x", "prompt": "y"}', "duplicate key"),
    (b"[1, 2]", "JSON object"),
])
def test_malformed_bodies(live, raw, match):
    assert_error(post(live, raw), 400, match=match)
    assert_serving(live)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "x", "n": 3}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": 7}, "model"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": 3},
     "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": 1},
     "stream_options"),
])
def test_wrong_types_and_values_name_the_field(live, path, body, param):
    assert_error(post(live, body, path), 400, param=param)
    assert_serving(live)


def test_unknown_model_is_404(live):
    assert_error(post(live, {"model": "gpt-4o", "prompt": "x"}), 404, "model", "model_not_found", "gpt-4o")
    assert_serving(live)


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_not_positive(live, max_tokens):
    assert_error(post(live, {"prompt": "x", "max_tokens": max_tokens}), 400, "max_tokens", match=">= 1")
    assert_serving(live)


def test_max_tokens_huge(live, model):
    context = model.config.context_length
    assert_error(post(live, {"prompt": "x", "max_tokens": 10**12}), 400, "max_tokens", match="limit")
    assert_error(post(live, {"prompt": [1] * 10, "max_tokens": context}), 400, "max_tokens",
                 "context_length_exceeded", str(context))
    assert_serving(live)


def test_prompt_beyond_the_context(live, model):
    context = model.config.context_length
    assert_error(post(live, {"prompt": [1] * context, "max_tokens": 1}), 400, "prompt",
                 "context_length_exceeded", f"{context} tokens")
    assert_serving(live)


def test_lone_surrogate_in_the_text(live):
    assert_error(post(live, b'{"prompt": "a\\ud800b", "max_tokens": 1}'), 400, match="Unicode")
    assert_serving(live)


def test_oversized_bodies_are_413(live):
    big = b'{"prompt": "' + b"a" * (1024 * 1024) + b'"}'
    assert_error(post(live, big), 413, code="body_too_large", match="1048576")
    # no Content-Length (chunked): counted while it arrives
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    conn.close()
    assert_serving(live)


def test_slow_body_is_408(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n{\"prompt\": ")
        data = b""
        while b"}}" not in data:                   # the server answers after its 1 s body timeout
            more = s.recv(65536)
            if not more:
                break
            data += more
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert b"request_timeout" in data
    assert_serving(live)


def _start_raw(live, body: dict) -> socket.socket:
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", live.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    return s


@pytest.mark.parametrize("stream", [False, True])
def test_vanished_client_cancels_its_generation(live, stream):
    decoder = live.state.engine.decoder
    cancelled = metric(live, "gptevo_requests_cancelled_total")
    generated = metric(live, "gptevo_generated_tokens_total")
    s = _start_raw(live, {"prompt": "It is", "max_tokens": LONG, "temperature": 0, "stream": stream})
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")      # headers and the first chunks arrived
    wait_for(lambda: decoder.running == 1, "the request to run")
    s.close()                                                # the client vanishes mid-generation
    assert_serving(live)                                     # cancelled: the decoder holds no cache
    assert metric(live, "gptevo_requests_cancelled_total") == cancelled + 1
    assert metric(live, "gptevo_generated_tokens_total") - generated < LONG


def test_full_queue_is_503_with_retry_after(model):
    small = serve_app(model, max_batch=1, max_queue=1)
    try:
        decoder = small.state.engine.decoder
        a = _start_raw(small, {"prompt": "It is", "max_tokens": LONG, "temperature": 0, "stream": True})
        wait_for(lambda: decoder.running == 1, "the first request to run")
        b = _start_raw(small, {"prompt": "Emma", "max_tokens": LONG, "temperature": 0, "stream": True})
        wait_for(lambda: small.state.engine.in_flight == 2, "the second request to wait")
        status, headers, body = post(small, {"prompt": "x", "max_tokens": 1})
        assert status == 503 and body["error"]["code"] == "server_overloaded"
        assert int(headers["Retry-After"]) >= 1
        a.close()
        b.close()
        assert_serving(small)
        assert post(small, {"prompt": "x", "max_tokens": 1})[0] == 200     # room again
    finally:
        small.close()


def test_api_key(model):
    keyed = serve_app(model, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            keyed.client(api_key="wrong").models.list()
        status, _, body = post(keyed, {"prompt": "x", "max_tokens": 1})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        r = keyed.client(api_key="s3cret").completions.create(model=SERVED, prompt="x", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert request(keyed, "GET", "/health")[0] == 200                 # probes need no key
    finally:
        keyed.close()


def test_unknown_routes_and_methods_answer_json(live):
    status, _, data = request(live, "GET", "/v2/nothing")
    assert status == 404 and "error" in json.loads(data)
    status, _, data = request(live, "GET", "/v1/completions")
    assert status == 405 and "error" in json.loads(data)
    assert_serving(live)


def test_metrics_count_requests_by_status(live):
    assert post(live, {"prompt": 5})[0] == 400
    text = request(live, "GET", "/metrics")[2].decode()
    assert re.search(r'^gptevo_requests_total\{endpoint="/v1/completions",status="400"\} [1-9]', text, re.M)
    for name in ("gptevo_queue_depth", "gptevo_batch_size", "gptevo_tokens_per_second",
                 "gptevo_generated_tokens_total", "gptevo_prompt_tokens_total"):
        assert re.search(rf"^# TYPE {name} (gauge|counter)$", text, re.M), name


def test_requests_arriving_while_draining_get_503(live):
    live.state.engine.draining = True                      # what SIGTERM sets (gptevo/serve/command.py)
    try:
        assert_error(post(live, {"prompt": "x", "max_tokens": 1}), 503, code="shutting_down")
        status, _, data = request(live, "GET", "/health")
        assert status == 503 and json.loads(data)["status"] == "draining"
    finally:
        live.state.engine.draining = False
    assert_serving(live)
