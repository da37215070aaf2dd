"""The gptevo command line: generate (argument, stdin, ids), chat (three modes), info, errors.

Models: the fake models of _gen_fakes (patched in for gptevo.cli.load_model) and, when present, the
bundled Austen model. info's numbers are checked against parameter formulas written out here.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import gptevo
from gptevo import cli

from _gen_fakes import FakeModel, ScriptedModel, byte_tokenizer_json, vocab_size_of, write_tokenizer

BUNDLED = Path(gptevo.__file__).parent / "data" / "austen"
needs_bundled = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(),
                                   reason="the bundled model gptevo/data/austen is not there yet")
HARMONY_SPECIALS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                    "<|call|>", "<|endoftext|>")


class TTY(io.StringIO):
    def isatty(self):
        return True


def run(argv, stdin="", env=None):
    out, err = io.StringIO(), io.StringIO()
    stdin = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin)
    rc = cli.main(argv, env=env or {}, stdin=stdin, stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def tok(tmp_path):
    write_tokenizer(tmp_path)
    from gptevo.tokenizer import load_tokenizer

    return load_tokenizer(tmp_path)


@pytest.fixture
def use_model(monkeypatch):
    """Make the CLI load ``model`` instead of reading a directory; records the backend asked for."""
    calls = []

    def install(model):
        def fake_load(path, backend, err=None, weights="stored", **options):
            calls.append((path, backend))
            return model
        monkeypatch.setattr(cli, "load_model", fake_load)
        return calls
    return install


# -- generate ------------------------------------------------------------------------------------
def test_generate_prints_the_library_text(use_model, tok):
    V = vocab_size_of(byte_tokenizer_json())
    use_model(FakeModel(V, tokenizer=tok))
    rc, out, err = run(["generate", "--model", "m", "--max-new-tokens", "12", "--temperature", "0.9",
                        "--seed", "4", "--top-k", "20", "--top-p", "0.9", "Once"])
    want = gptevo.generate(FakeModel(V, tokenizer=tok), "Once", max_new_tokens=12, temperature=0.9, seed=4,
                           top_k=20, top_p=0.9)
    assert rc == 0 and out == "Once" + want + "\n" and err == ""


def test_generate_reads_stdin_and_stops(use_model, tok):
    eos = tok.token_to_id("<|endoftext|>")
    script = list(b"Hello there. More")
    use_model(ScriptedModel(vocab_size_of(byte_tokenizer_json()), script, after=eos, eos=(eos,), tokenizer=tok))
    rc, out, _ = run(["generate", "--model", "m", "--temperature", "0", "--stop", ".", "--no-echo"],
                     stdin="A prompt\n")
    assert rc == 0 and out == "Hello there\n"
    rc, out, _ = run(["generate", "--model", "m", "--temperature", "0", "-"], stdin="A prompt")
    assert rc == 0 and out == "A promptHello there. More\n"


def test_stdin_prompt_drops_one_trailing_newline(use_model):
    m = FakeModel(40)
    use_model(m)
    calls = []
    m.tokenizer = type("T", (), {"encode": lambda self, text: calls.append(text) or [1, 2],
                                 "decode": lambda self, ids: "", "token_to_id": lambda self, t: None})()
    run(["generate", "--model", "m", "--max-new-tokens", "1"], stdin="line one\n\n")
    assert calls == ["line one\n"]


def test_generate_ids(use_model):
    use_model(FakeModel(40))
    rc, out, _ = run(["generate", "--model", "m", "--ids", "--temperature", "0", "--max-new-tokens", "5", "5, 9 2"])
    assert rc == 0
    assert [int(x) for x in out.split()] == gptevo.generate(FakeModel(40), [5, 9, 2], max_new_tokens=5, temperature=0)


def test_backend_from_flag_or_environment(use_model):
    calls = use_model(FakeModel(40))
    run(["generate", "--model", "m", "--ids", "1"], env={"GPTEVO_BACKEND": "numba"})
    run(["generate", "--model", "m", "--ids", "--backend", "reference", "1"], env={"GPTEVO_BACKEND": "numba"})
    run(["generate", "--model", "m", "--ids", "1"])
    assert [b for _, b in calls] == ["numba", "reference", None]


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "m", "--temperature", "-1", "x"], "--temperature"),
    (["generate", "--model", "m", "--top-p", "2", "x"], "--top-p"),
    (["generate", "--model", "m", "--min-p", "2", "x"], "--min-p"),
    (["generate", "--model", "m", "--repetition-penalty", "0", "x"], "--repetition-penalty"),
    (["generate", "--model", "m", "--ids", "1 x"], "--ids"),
    (["generate", "--model", "m", ""], "empty"),
])
def test_user_errors_exit_2_without_traceback(use_model, tok, argv, needle):
    use_model(FakeModel(vocab_size_of(byte_tokenizer_json()), tokenizer=tok))
    rc, out, err = run(argv)
    assert rc == 2 and needle in err and "Traceback" not in err and err.startswith("gptevo: error:")


def test_missing_model_and_usage_errors(tmp_path):
    rc, _, err = run(["generate", "--model", str(tmp_path / "nope"), "x"])
    assert rc == 2 and "nope" in err and "Traceback" not in err
    assert run(["generate", "--no-such-flag", "x"])[0] == 2
    assert run([])[0] == 2
    assert run(["--version"])[0] == 0


def test_no_prompt_on_a_terminal(use_model, tok):
    use_model(FakeModel(vocab_size_of(byte_tokenizer_json()), tokenizer=tok))
    rc, _, err = run(["generate", "--model", "m"], stdin=TTY(""))
    assert rc == 2 and "PROMPT" in err


def test_loading_status_only_on_a_terminal(tmp_path):
    err = TTY()
    with pytest.raises(gptevo.GptevoError):
        cli.load_model(str(tmp_path), None, err)
    assert "loading" in err.getvalue()
    quiet = io.StringIO()
    with pytest.raises(gptevo.GptevoError):
        cli.load_model(str(tmp_path), None, quiet)
    assert quiet.getvalue() == ""


# -- chat ----------------------------------------------------------------------------------------
def test_chat_continuation_mode(use_model, tok):
    eos = tok.token_to_id("<|endoftext|>")
    use_model(ScriptedModel(vocab_size_of(byte_tokenizer_json()), list(b" went home."), after=eos, eos=(eos,),
                            tokenizer=tok))
    rc, out, err = run(["chat", "--model", "m", "--temperature", "0"], stdin="Emma\n/exit\nnever read\n")
    assert rc == 0 and out == " went home.\n" and "not chat-trained" in err


def test_chat_harmony_mode_prints_the_final_channel(use_model, tmp_path):
    write_tokenizer(tmp_path, byte_tokenizer_json(specials=HARMONY_SPECIALS))
    from gptevo.tokenizer import load_tokenizer

    htok = load_tokenizer(tmp_path)
    reply = htok.encode("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
                        "<|message|>Four.<|return|>")
    use_model(ScriptedModel(vocab_size_of(byte_tokenizer_json(specials=HARMONY_SPECIALS)), reply, context=1024,
                            tokenizer=htok))
    rc, out, err = run(["chat", "--model", "m", "--temperature", "0", "--show-analysis"],
                       stdin="What is 2 + 2?\n")
    assert rc == 0 and out == "Four.\n" and "[analysis] Think." in err and "harmony" in err


def test_chat_template_mode(use_model, tmp_path, tok):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"}))
    eos = tok.token_to_id("<|endoftext|>")
    m = ScriptedModel(vocab_size_of(byte_tokenizer_json()), list(b"Hi!"), after=eos, eos=(eos,), tokenizer=tok)
    m.path = str(tmp_path)
    use_model(m)
    rc, out, err = run(["chat", "--model", "m", "--temperature", "0"], stdin="Hello\n")
    assert rc == 0 and out == "Hi!\n" and "chat template" in err


# -- info ----------------------------------------------------------------------------------------
def test_info_numbers_match_hand_formulas(tmp_path):
    V, D, L, H, G, Dh, I = 100, 16, 2, 4, 2, 4, 24
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": V, "hidden_size": D, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": G, "head_dim": Dh, "intermediate_size": I,
        "max_position_embeddings": 64, "tie_word_embeddings": False}))
    rc, out, _ = run(["info", "--model", str(tmp_path), "--json", "--context", "10"])
    assert rc == 0
    info = json.loads(out)
    per_layer = D * H * Dh + 2 * D * G * Dh + H * Dh * D + 3 * D * I + 2 * D
    total = V * D + L * per_layer + D + V * D
    assert info["family"] == "llama" and info["parameters_total"] == total
    assert info["parameters_active"] == total - V * D                # embedding lookup not counted
    assert info["kv_cache_bytes_per_token_bf16"] == 2 * L * G * Dh * 2
    assert info["kv_cache_bytes_at_context_bf16"] == 10 * 2 * L * G * Dh * 2
    assert info["weight_memory"]["float32"] == 4 * total and info["weight_memory"]["bfloat16"] == 2 * total
    rc, text, _ = run(["info", "--model", str(tmp_path)])
    assert rc == 0 and "llama" in text and f"{total:,}" in text


def test_info_bad_model(tmp_path):
    rc, _, err = run(["info", "--model", str(tmp_path)])
    assert rc == 2 and "config.json" in err


# -- the bundled model ---------------------------------------------------------------------------
@needs_bundled
def test_bundled_generate_matches_library_and_streams_identically():
    model = gptevo.load(str(BUNDLED))
    prompt = "It is a truth universally acknowledged"
    for kw in (dict(temperature=0.0), dict(temperature=0.8, seed=3, top_k=50)):
        text = gptevo.generate(model, prompt, max_new_tokens=16, **kw)
        assert "".join(gptevo.generate(model, prompt, max_new_tokens=16, stream=True, **kw)) == text
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
        rc, out, err = run(["generate", "--max-new-tokens", "16", *flags, prompt])
        assert rc == 0 and out == prompt + text + "\n"


@needs_bundled
def test_bundled_info_and_chat():
    rc, out, _ = run(["info", "--json"])
    info = json.loads(out)
    assert rc == 0 and info["family"] == "gpt_oss" and info["parameters_active"] < info["parameters_total"]
    rc, out, err = run(["chat", "--max-new-tokens", "4", "--seed", "0"], stdin="Mr. Darcy\n")
    assert rc == 0 and "not chat-trained" in err and out.endswith("\n")


def test_weights_flag_reaches_load(monkeypatch, capsys):
    import gptevo.loading

    seen = []

    def fake_load(path, backend=None, weights="stored", **kw):
        seen.append(weights)
        raise gptevo.GptevoError("stop here")

    monkeypatch.setattr(gptevo.loading, "load", fake_load)
    rc, _, err = run(["generate", "--weights", "int8", "--ids", "1 2"])
    assert seen == ["int8"] and rc == 2 and "stop here" in err
    rc, _, _ = run(["generate", "--weights", "int4", "--ids", "1 2"])
    assert rc == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
