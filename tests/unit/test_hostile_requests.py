"""Groups D, F and G of the reliability facts, section 4, end to end: a real tiny model directory
(Llama-like weights written here, a byte-level ``tokenizer.json``) driven only through the public API
(``gptevo.load``, ``gptevo.generate``, ``gptevo.cli.main``). The unit tests of generation, tokenizer
and CLI use fakes; these check that the real loader, model, KV cache and tokenizer keep the promises
together. Expected tokens are re-derived from ``model.logits`` (full-sequence argmax), never from the
generation code.
"""
import io
import json
import os
import time

import numpy as np
import pytest

import gptevo
from _gen_fakes import byte_tokenizer_json, vocab_size_of
from _st_writer import build, write as write_bytes
from gptevo import cli
from gptevo.config_adapters import config_from_dict
from gptevo.errors import FormatError, GptevoError, NumericalError, RequestError
from _builders.tiny_models import hf_tensors, make_roles, store_dtype

TOK = byte_tokenizer_json()
V = vocab_size_of(TOK)
CTX = 32
CFG = {"model_type": "llama", "vocab_size": V, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
       "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": CTX,
       "rope_theta": 10000.0, "tie_word_embeddings": False}


def model_dir(root, name="m", tokenizer=TOK, mutate=None) -> str:
    d = os.path.join(str(root), name)
    os.makedirs(d, exist_ok=True)
    config = config_from_dict(CFG, "test")
    t = hf_tensors(config, store_dtype(make_roles(config, 11), np.float32))
    t = {k: np.asarray(v, np.float32) for k, v in t.items()}
    if mutate is not None:
        mutate(t)
    write_bytes(os.path.join(d, "model.safetensors"), build(t))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CFG, f)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gptevo.load(model_dir(tmp_path_factory.mktemp("req")))


def greedy_by_logits(model, ids, n):
    """Greedy continuation re-derived from full-sequence logits (no cache, no sampling code)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(model.logits(ids)[-1])))
    return ids[-n:]


# -- F1 prompt longer than the context --------------------------------------------------------------
def test_f1_prompt_filling_the_context_is_refused_with_both_numbers(model):
    with pytest.raises(RequestError, match=str(CTX)):
        gptevo.generate(model, [1] * CTX, max_new_tokens=1)
    with pytest.raises(RequestError) as e:
        gptevo.generate(model, [1] * 20, max_new_tokens=13)             # 20 + 13 > 32
    assert "20" in str(e.value) and str(CTX) in str(e.value)
    out = gptevo.generate(model, list(range(1, 21)), max_new_tokens=13, temperature=0, truncation="left")
    assert out == greedy_by_logits(model, list(range(1, 21))[-19:], 13)   # only when asked: 19 + 13 = 32


# -- F2 invalid token ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [[-1], [V], [2**40], [2**70], [1.0], [True], [np.float64(3)], [1, None],
                                    b"abc", 7, np.array([[1, 2]])])
def test_f2_invalid_ids_are_request_errors_and_the_model_stays_usable(model, prompt):
    with pytest.raises(RequestError):
        gptevo.generate(model, prompt, max_new_tokens=2)
    assert gptevo.generate(model, [5, 6], max_new_tokens=2, temperature=0) == greedy_by_logits(model, [5, 6], 2)


# -- F3 NaN / inf logits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_f3_non_finite_weights_raise_numerical_error_per_request(tmp_path, model, value):
    def mutate(t):
        t["model.norm.weight"][3] = value
    bad = gptevo.load(model_dir(tmp_path, mutate=mutate))
    for prompt in ([1, 2, 3], "hello"):
        with np.errstate(all="ignore"), pytest.raises(NumericalError):
            gptevo.generate(bad, prompt, max_new_tokens=3, temperature=0)
        with np.errstate(all="ignore"), pytest.raises(NumericalError):
            list(gptevo.generate(bad, prompt, max_new_tokens=3, stream=True, seed=1))
    assert gptevo.generate(model, [1, 2, 3], max_new_tokens=2, temperature=0) == greedy_by_logits(model, [1, 2, 3], 2)


# -- F4 bad sampling parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw,name", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": "1"}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": V + 1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 10**12}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
])
def test_f4_bad_sampling_parameter_is_named(model, kw, name):
    with pytest.raises(RequestError, match=name):
        gptevo.generate(model, [1, 2], **{"max_new_tokens": 2, **kw})


def test_f4_temperature_zero_is_greedy_without_division(model):
    with np.errstate(all="raise"):                     # a division by zero would raise here
        out = gptevo.generate(model, [7, 8, 9], max_new_tokens=4, temperature=0, seed=3)
    assert out == greedy_by_logits(model, [7, 8, 9], 4)


# -- F5 empty prompt --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", [], (), np.array([], np.int64)])
def test_f5_empty_prompt(model, prompt):
    with pytest.raises(RequestError, match="empty"):
        gptevo.generate(model, prompt, max_new_tokens=1)


# -- F6 huge or odd text -----------------------------------------------------------------------------------
def test_f6_prompt_over_the_byte_cap_is_refused_before_tokenizing(model, monkeypatch):
    from gptevo import generation

    monkeypatch.setattr(generation, "MAX_PROMPT_BYTES", 1000)
    for prompt in ("a" * 1001, "é" * 501):             # 1001 characters; 501 characters = 1002 UTF-8 bytes
        t0 = time.perf_counter()
        with pytest.raises(RequestError, match="1000"):
            gptevo.generate(model, prompt, max_new_tokens=1)
        assert time.perf_counter() - t0 < 5


def test_f6_odd_text(model):
    with pytest.raises(RequestError):
        gptevo.generate(model, "ok \ud800 lone surrogate", max_new_tokens=1)
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match=str(CTX)):  # tokenized (no stack overflow), then too long
        gptevo.generate(model, "^" * 10**6, max_new_tokens=1)
    assert time.perf_counter() - t0 < 30
    text = gptevo.generate(model, "\x00\u202e\U0001F600", max_new_tokens=3, temperature=0)
    assert isinstance(text, str)                       # invalid UTF-8 in the output is replaced, not raised


# -- F7 stop / limit edge ----------------------------------------------------------------------------------
def test_f7_generation_reaching_exactly_the_context(model):
    prompt = list(range(10, 10 + CTX - 3))             # 29 + 3 == 32 positions
    out = gptevo.generate(model, prompt, max_new_tokens=3, temperature=0)
    assert out == greedy_by_logits(model, prompt, 3)   # the last token is sampled, never written at position 32
    with pytest.raises(RequestError):
        gptevo.generate(model, prompt, max_new_tokens=4)


# -- D1 token ids beyond the embedding, reached through generate ------------------------------------------
def test_d1_tokenizer_ids_beyond_the_embedding_refused_when_generating(tmp_path):
    tok = json.loads(json.dumps(TOK))
    tok["added_tokens"][0]["id"] = 10**9
    m = gptevo.load(model_dir(tmp_path, tokenizer=tok))
    with pytest.raises(FormatError, match=r"tokenizer\.json.*1000000000|1000000000.*tokenizer\.json"):
        gptevo.generate(m, "hello", max_new_tokens=1)
    assert gptevo.generate(m, [1, 2], max_new_tokens=1, temperature=0) == greedy_by_logits(m, [1, 2], 1)


# -- G3 interrupt in the CLI; G5 no traceback leaks ---------------------------------------------------------
def test_g3_keyboard_interrupt_in_the_cli_exits_130_without_traceback(model, monkeypatch):
    class Interrupting:
        config, path = model.config, model.path

        def new_cache(self, n):
            return model.new_cache(n)

        def logits(self, ids):
            raise KeyboardInterrupt

        forward = lambda self, ids, cache: (_ for _ in ()).throw(KeyboardInterrupt)   # noqa: E731

    monkeypatch.setattr(cli, "load_model", lambda path, backend, err=None, weights="stored": Interrupting())
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["generate", "--model", "m", "--max-new-tokens", "4", "--ids", "1 2"], env={},
                  stdin=io.StringIO(""), stdout=out, stderr=err)
    assert rc == 130 and "Traceback" not in err.getvalue()


def test_g5_cli_errors_are_one_line_without_traceback(tmp_path):
    def mutate(t):
        t["model.norm.weight"][0] = np.nan
    d = model_dir(tmp_path, mutate=mutate)
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["generate", "--model", d, "--max-new-tokens", "4", "--ids", "1 2"], env={},
                  stdin=io.StringIO(""), stdout=out, stderr=err)
    assert rc != 0 and "Traceback" not in err.getvalue() and "non-finite" in err.getvalue()
    assert err.getvalue().startswith("gptevo: error:")


def test_errors_are_all_gptevo_errors():
    for cls in (FormatError, NumericalError, RequestError):
        assert issubclass(cls, GptevoError)
