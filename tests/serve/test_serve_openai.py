"""gptevo serve with the official openai client: completions and chat, streamed and not, on the
reference and numba backends (bundled model). Every expected text is what the same request gets alone
from the single-sequence decode loop (gptevo.generation), not from the server."""
from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

from serve_helpers import SERVED, alone

PROMPT = "It is a truth universally acknowledged"


def tok(model):
    from gptevo.generation import tokenizer_for

    return tokenizer_for(model)


def test_models_lists_the_served_model(backend_server):
    live, model = backend_server
    ids = [m.id for m in live.client().models.list()]
    assert ids == [SERVED]
    assert live.client().models.retrieve(SERVED).id == SERVED


def test_completion_equals_the_request_alone(backend_server):
    live, model = backend_server
    r = live.client().completions.create(model=SERVED, prompt=PROMPT, max_tokens=12, temperature=0)
    ids = tok(model).encode(PROMPT)
    assert r.choices[0].text == alone(model, ids, 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    assert r.object == "text_completion" and r.model == SERVED


def test_completion_stream_concatenates_to_the_whole_text(backend_server):
    live, model = backend_server
    chunks = list(live.client().completions.create(model=SERVED, prompt=PROMPT, max_tokens=10, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == alone(model, tok(model).encode(PROMPT), 10)
    assert len(text_chunks) > 2                                  # it really streamed
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_from_token_ids(backend_server):
    live, model = backend_server
    ids = tok(model).encode("Mr. Darcy")
    r = live.client().completions.create(model=SERVED, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == alone(model, ids, 6)
    assert r.usage.prompt_tokens == len(ids)


def test_stop_string_cuts_the_text_and_finishes_with_stop(backend_server):
    live, model = backend_server
    ids = tok(model).encode(PROMPT)
    full = alone(model, ids, 24)
    stop = full.split()[3]                                       # a word that occurs in the output
    r = live.client().completions.create(model=SERVED, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert live.state.engine.in_flight == 0                      # cancelled: its cache is gone


def test_seeded_sampling_equals_the_request_alone(backend_server):
    live, model = backend_server
    ids = tok(model).encode(PROMPT)
    kw = dict(model=SERVED, prompt=PROMPT, max_tokens=12, temperature=0.9, seed=1234)   # top-k/p: the model's
    a = live.client().completions.create(**kw).choices[0].text
    b = live.client().completions.create(**kw).choices[0].text
    assert a == b == alone(model, ids, 12, temperature=0.9, seed=1234)


def test_chat_whole_and_streamed(backend_server):
    live, model = backend_server
    messages = [{"role": "system", "content": "Chapter 1"}, {"role": "user", "content": "Mr. Bennet said"}]
    # the bundled model has no chat format: its prompt is the contents, one per line (spec/serve.md)
    want = alone(model, tok(model).encode("Chapter 1\nMr. Bennet said\n"), 9)
    r = live.client().chat.completions.create(model=SERVED, messages=messages, max_tokens=9, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.object == "chat.completion" and r.usage.completion_tokens == 9
    chunks = list(live.client().chat.completions.create(model=SERVED, messages=messages, max_tokens=9,
                                                        temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_chat_accepts_text_parts_and_max_completion_tokens(backend_server):
    live, model = backend_server
    messages = [{"role": "user", "content": [{"type": "text", "text": "Emma "}, {"type": "text", "text": "was"}]}]
    r = live.client().chat.completions.create(model=SERVED, messages=messages, max_completion_tokens=5,
                                              temperature=0)
    assert r.choices[0].message.content == alone(model, tok(model).encode("Emma was\n"), 5)


def test_eight_concurrent_greedy_clients_each_get_their_single_request_output(backend_server):
    live, model = backend_server
    prompts = ["It is a truth", "Mr. Darcy", "Elizabeth", "The family of Dashwood", "Emma Woodhouse",
               "Catherine Morland", "Sir Thomas", "Mrs. Bennet"]
    lengths = [14, 9, 16, 6, 11, 15, 8, 12]                     # they leave the batch at different steps
    seen = []
    original_step = live.state.engine.decoder.step

    def step():
        events = original_step()
        seen.append(live.state.engine.decoder.running)          # sequences in the batch after the step
        return events

    live.state.engine.decoder.step = step
    try:
        def ask(i):
            stream = i % 2 == 0
            r = live.client().completions.create(model=SERVED, prompt=prompts[i], max_tokens=lengths[i],
                                                 temperature=0, stream=stream)
            return "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text

        with cf.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(8)))
    finally:
        del live.state.engine.decoder.step
    for p, n, g in zip(prompts, lengths, got):
        assert g == alone(model, tok(model).encode(p), n), p
    assert max(seen) > 1                                          # requests were decoded together


def test_refusals_through_the_client(backend_server):
    live, _ = backend_server
    c = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model=SERVED, prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        c.completions.create(model=SERVED, prompt="x", max_tokens=1, n=2)
    with pytest.raises(openai.BadRequestError, match="limit of 512"):
        c.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)


def test_concurrent_seeded_clients_each_get_their_single_request_output(backend_server):
    live, model = backend_server
    asks = [("Emma", 11, 0.8, 1), ("Emma", 11, 0.8, 2), ("Mr. Knightley", 9, 1.2, 3), ("It is", 13, 0.7, 1)]

    def ask(a):
        prompt, n, t, seed = a
        return live.client().completions.create(model=SERVED, prompt=prompt, max_tokens=n, temperature=t,
                                                seed=seed).choices[0].text

    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, asks))
    for (prompt, n, t, seed), g in zip(asks, got):
        assert g == alone(model, tok(model).encode(prompt), n, temperature=t, seed=seed), (prompt, seed)
    assert got[0] != got[1]                                       # the seed matters
