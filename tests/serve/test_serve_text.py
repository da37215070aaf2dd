"""WindowedTextStream (the server's incremental detokenizer) gives exactly TextStream's pieces: on real
text with multi-byte characters, on random token ids (broken UTF-8 included), with and without stop
strings, across its settling points."""
from __future__ import annotations

import numpy as np
import pytest

from gptevo.generation import TextStream
from gptevo.serve.formats import WindowedTextStream
from gptevo.tokenizer import load_tokenizer

from serve_helpers import BUNDLED

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. Café, naïve, façade — “quoted” ✓ 日本語 🙂 ") * 12


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUNDLED)


def pieces(stream, ids):
    return [stream.push(t) for t in ids] + [stream.finish()]


@pytest.mark.parametrize("stop", [(), ("wife",), ("日本", "🙂 I")])
def test_real_text(tok, stop):
    ids = tok.encode(TEXT)
    assert len(ids) > 3 * WindowedTextStream.SETTLE_EVERY
    context = tok.encode("Chapter 1. ")
    want = pieces(TextStream(tok, context, stop), ids)
    assert pieces(WindowedTextStream(tok, context, stop), ids) == want
    if not stop:
        assert "".join(want) == TEXT


def test_random_ids(tok):
    rng = np.random.default_rng(7)
    real = tok.encode(TEXT)
    for trial in range(60):
        n = int(rng.integers(1, 150))
        if trial % 2:
            ids = [int(t) for t in rng.integers(0, 4094, size=n)]          # bytes that need not be UTF-8
        else:
            start = int(rng.integers(0, len(real) - 1))
            ids = real[start:start + n]                                    # may start mid-character
        context = [int(t) for t in rng.integers(0, 4094, size=int(rng.integers(0, 12)))]
        stop = ("e t",) if trial % 3 == 0 else ()
        assert pieces(WindowedTextStream(tok, context, stop), ids) == pieces(TextStream(tok, context, stop), ids)


def test_settling_inside_multibyte_characters(tok):
    # every character is several byte tokens, so some settling points fall inside a character
    ids = tok.encode("🙂é日" * 60)
    assert len(ids) > 3 * len("🙂é日")
    for skip in range(12):                     # shift where the settling points fall
        context = tok.encode("x")
        got = pieces(WindowedTextStream(tok, context, ()), ids[skip:])
        assert got == pieces(TextStream(tok, context, ()), ids[skip:])
