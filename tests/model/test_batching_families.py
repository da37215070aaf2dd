"""Batched decode on every peer-fixture family: each sequence of a batch gives what it gives alone.

For each fixture of ``_builders.peer_fixtures`` (GPT-2 learned positions, llama3/linear/dynamic/yarn/
longrope RoPE, sliding windows, Qwen2 mixed windows, Qwen3 q/k-norm, Mixtral and Qwen3-MoE experts,
Phi-3 partial rotary, Gemma, gpt-oss with MXFP4 experts and sinks), on the reference and numba
backends: prompts of different lengths decoded together by ``gptevo.generate(model, [...])`` equal,
token for token, the single-prompt greedy results; ``forward_batch`` rows equal single forwards
within 1e-5 of the largest logit. Dynamic-NTK and longrope fixtures have rows on both sides of the
length where their frequencies change, in one batch.
"""
from __future__ import annotations

import numpy as np
import pytest

import gptevo
from gptevo import backends
from _builders import peer_fixtures

pytestmark = pytest.mark.peer

AVAILABLE = backends.available()
NAMES = list(peer_fixtures.FIXTURES)
NEW = 6


@pytest.fixture(scope="module")
def loaded():
    cache: dict = {}

    def get(built, backend):
        if backend not in AVAILABLE:
            pytest.skip(f"backend {backend!r} unavailable: {AVAILABLE.unavailable[backend]}")
        if (built.name, backend) not in cache:
            cache[built.name, backend] = gptevo.load(str(built.path), backend=backend)
        return cache[built.name, backend]

    return get


def _prompts(name: str, model) -> list[list[int]]:
    """Three prompts: one token, about half the fixture's length, and long enough that its decode
    crosses the fixture's length (past max_position_embeddings for dynamic / longrope fixtures)."""
    spec = peer_fixtures.FIXTURES[name]
    ids = peer_fixtures.token_ids(name, spec.seq_len, vocab=model.config.vocab_size)
    longest = min(spec.seq_len - 2, model.config.context_length - NEW)
    return [ids[:1], ids[:spec.seq_len // 2], ids[:longest]]


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("name", NAMES)
def test_batched_greedy_equals_single_greedy(peer_checkpoints, loaded, name, backend):
    model = loaded(peer_checkpoints(name), backend)
    prompts = _prompts(name, model)
    want = [gptevo.generate(model, p, max_new_tokens=NEW, temperature=0.0) for p in prompts]
    got = gptevo.generate(model, prompts, max_new_tokens=NEW, temperature=0.0)
    assert got == want, f"{name} on {backend}"

    room = min(64, model.config.context_length)
    batch, alone = [model.new_cache(room) for _ in prompts], [model.new_cache(room) for _ in prompts]
    for p, a, b in zip(prompts, batch, alone):
        model.forward(p, a)
        model.forward(p, b)
    for step in range(NEW):
        tokens = [w[step] for w in want]
        rows = model.forward_batch(tokens, batch)                                       # [B,V]
        single = np.concatenate([model.forward([t], c) for t, c in zip(tokens, alone)])  # [B,V]
        err = float(np.abs(rows - single).max() / np.abs(single).max())
        assert err < 1e-5, f"{name} on {backend}, step {step}: relative difference {err:.2e}"
