"""The command line as a new user meets it: ``python -m gptevo`` on the bundled model in a subprocess,
and ``gptevo chat`` in a pseudo-terminal (readline editing and history, Ctrl-C, /show).

Expected values come from the public library call with the same arguments, from hand formulas, or
from the files themselves (the safetensors header read with struct + json); subprocesses use the
reference backend (no kernel compilation) and few tokens, to stay fast.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gptevo
from gptevo import cli
from gptevo.generation import generate as library_generate

REPO = Path(__file__).resolve().parents[2]
BUNDLED = Path(gptevo.__file__).parent / "data" / "austen"
PROMPT = "It is a truth universally acknowledged"
STATS = re.compile(r"^stats: load (\d+\.\d+) s \| prompt (\d+) tokens, \d+\.\d+ s, \d+\.\d tok/s \| "
                   r"generated (\d+) tokens, \d+\.\d+ s, \d+\.\d tok/s \| backend (\w+) \| "
                   r"peak RSS \d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)$")     # human_bytes: the unit grows with the size


def gptevo_cli(*argv, stdin: str = "", timeout: float = 120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTEVO_")}
    env["GPTEVO_BACKEND"] = "reference"
    p = subprocess.run([sys.executable, "-m", "gptevo", *argv], input=stdin, capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def bundled():
    return gptevo.load(backend="reference")


# -- generate --------------------------------------------------------------------------------------
def test_generate_echoes_the_prompt_then_the_library_text_and_prints_stats(bundled):
    rc, out, err = gptevo_cli("generate", PROMPT, "--max-new-tokens", "12", "--seed", "5", "--stats")
    want = library_generate(bundled, PROMPT, max_new_tokens=12, seed=5)    # the model's sampling defaults
    assert rc == 0, err
    assert out == PROMPT + want + "\n"
    lines = [line for line in err.splitlines() if line.startswith("stats:")]
    assert len(lines) == 1, err
    m = STATS.match(lines[0])
    assert m, lines[0]
    n_prompt = len(gptevo.generation.tokenizer_for(bundled).encode(PROMPT))
    assert int(m.group(2)) == n_prompt and 1 <= int(m.group(3)) <= 12 and m.group(4) == "reference"


def test_no_echo_and_sampling_flags_match_the_library(bundled):
    rc, out, err = gptevo_cli("generate", PROMPT, "--no-echo", "--max-new-tokens", "10", "--seed", "2",
                              "--temperature", "0.9", "--top-k", "0", "--top-p", "1", "--min-p", "0.05",
                              "--repetition-penalty", "1.3")
    want = library_generate(bundled, PROMPT, max_new_tokens=10, seed=2, temperature=0.9, top_k=0, top_p=1.0,
                            min_p=0.05, repetition_penalty=1.3)
    assert rc == 0 and out == want + "\n", err


def test_unlimited_max_new_tokens_and_errors_that_name_the_flag():
    ids = " ".join(str(5 + i % 50) for i in range(250))       # the bundled context is 256
    rc, out, err = gptevo_cli("generate", "--ids", "--max-new-tokens", "-1", "--temperature", "0", ids)
    new = [int(t) for t in out.split()]
    assert rc == 0, err
    assert len(new) == 6 or (new[-1] == 4095 and len(new) < 6)      # to the end of the context, or eos
    rc, out, err = gptevo_cli("generate", "--ids", "--max-new-tokens", "10", ids)
    assert rc == 2 and "--truncate left" in err and "--max-new-tokens" in err, err
    assert "truncation=" not in err and "max_new_tokens" not in err
    rc, out, err = gptevo_cli("generate", "--ids", "--max-new-tokens", "10", "--truncate", "left",
                              "--temperature", "0", ids)
    assert rc == 0 and len(out.split()) >= 1, err
    rc, _, err = gptevo_cli("generate", "--max-new-tokens", "0", "x")
    assert rc == 2 and "--max-new-tokens" in err and "-1 for no limit" in err


def test_numerical_error_remedies_are_flags(bundled):
    with pytest.raises(gptevo.NumericalError) as info:
        bundled._finite(np.array([[0.0, np.nan]], dtype=np.float32), 0)
    library = str(info.value)
    assert "check_weights=True" in library and "dtype='float64'" in library     # the Python wording
    shown = cli.cli_message(info.value)
    assert "--check-weights" in shown and "--dtype float64" in shown
    assert "check_weights" not in shown and "dtype='" not in shown
    options = {o for a in _subparser("generate")._actions for o in a.option_strings}
    assert {"--check-weights", "--dtype", "--truncate"} <= options


def test_dtype_and_check_weights_reach_load(monkeypatch):
    import gptevo.loading

    seen = []

    def fake_load(path, backend=None, **kw):
        seen.append(kw)
        raise gptevo.GptevoError("stop here")

    monkeypatch.setattr(gptevo.loading, "load", fake_load)
    rc = cli.main(["generate", "--dtype", "float64", "--check-weights", "--ids", "1"], env={},
                  stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    assert rc == 2 and seen[0]["dtype"] == "float64" and seen[0]["check_weights"] is True


def _subparser(name):
    return cli.build_parser({})._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_help_states_every_default(command):
    sp = _subparser(command)
    formatter = sp._get_formatter()
    for action in sp._actions:
        if not action.option_strings or action.nargs == 0:
            continue                                          # the prompt, --help, on/off switches
        text = formatter._get_help_string(action) % {"default": action.default}
        assert "default" in text, f"{command} {action.option_strings}: {text!r}"


def test_help_through_python_m():
    rc, out, _ = gptevo_cli("generate", "--help")
    assert rc == 0 and "(default: 64)" in out and "-1 = no limit" in out and "generation_config.json" in out
    rc, out, _ = gptevo_cli("--version")
    assert rc == 0 and out.startswith("gptevo ")


# -- info --------------------------------------------------------------------------------------------
def test_info_reports_files_tokens_and_the_float32_kv_cache():
    rc, out, err = gptevo_cli("info", "--json")
    assert rc == 0, err
    info = json.loads(out)
    with open(BUNDLED / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    counts: dict[str, int] = {}
    for t in header.values():
        counts[t["dtype"]] = counts.get(t["dtype"], 0) + 1
    assert {d: v["tensors"] for d, v in info["stored_dtypes"].items()} == counts
    assert info["weight_bytes_on_disk"] == (BUNDLED / "model.safetensors").stat().st_size
    L, G, Dh = 4, 2, 32                                   # config.json: layers, KV heads, head_dim
    assert info["kv_cache_dtype"] == "float32" and info["kv_cache_bytes_per_token"] == 2 * L * G * Dh * 4
    assert info["context"] == 256 and info["kv_cache_context_tokens"] == 256
    assert info["special_tokens"] == {"bos": 4094, "eos": [4095], "pad": 4095}
    assert info["special_token_text"]["4095"] == "<|endoftext|>"
    assert "tokenizer.json" in info["tokenizer"]["kind"] and info["chat_format"].startswith("none")
    rc, text, _ = gptevo_cli("info", "--dtype", "float64")
    assert rc == 0 and "float64" in text and "stored dtypes" in text and "special tokens" in text
    rc, _, err = gptevo_cli("info", "--context", "300")
    assert rc == 2 and "--context 300 is beyond the model's context of 256" in err


# -- the Python API ------------------------------------------------------------------------------------
def test_load_without_a_path_is_the_bundled_model(bundled):
    assert Path(bundled.path).resolve() == BUNDLED.resolve()
    assert bundled.config.context_length == 256


def test_generate_signature_is_explicit():
    public = inspect.signature(gptevo.generate).parameters
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in public.values())
    assert list(public) == list(inspect.signature(library_generate).parameters)
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                 "stop", "stop_token_ids", "stream", "truncation"):
        assert name in public


# -- chat ----------------------------------------------------------------------------------------------
def test_chat_warns_about_flags_the_format_ignores_and_prints_stats(bundled):
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["chat", "--backend", "reference", "--system", "Be brief.", "--reasoning", "high",
                   "--max-new-tokens", "4", "--seed", "0", "--stats"], env={},
                  stdin=io.StringIO("Emma\n/show\n"), stdout=out, stderr=err)
    text = err.getvalue()
    assert rc == 0 and "--system is ignored" in text and "--reasoning is ignored" in text
    assert out.getvalue().splitlines()[-1] == "Emma"          # /show: the prompt the model was given
    stats = [line for line in text.splitlines() if line.startswith("stats:")]
    assert len(stats) == 1 and STATS.match(stats[0]), text
    n_prompt = len(gptevo.generation.tokenizer_for(bundled).encode("Emma"))
    assert int(STATS.match(stats[0]).group(2)) == n_prompt and 1 <= int(STATS.match(stats[0]).group(3)) <= 4


class Terminal:
    """``python -m gptevo chat`` on a pseudo-terminal (pty.fork: the child's controlling terminal, so
    Ctrl-C typed there is SIGINT to it); reads everything it writes, so it never blocks on output."""

    def __init__(self, *argv):
        import pty

        env = {k: v for k, v in os.environ.items() if not k.startswith("GPTEVO_")}
        env.update(GPTEVO_BACKEND="reference", TERM="xterm", INPUTRC="/dev/null")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                              # the child
            os.chdir(REPO)
            # A terminal starts programs with SIGINT at its default; a test run started in the
            # background by a non-interactive shell inherits it ignored, and Python then keeps it
            # ignored (Ctrl-C would do nothing and these tests would fail for that reason alone).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, "-m", "gptevo", "chat", *argv], env)
        self.buf = b""

    def read_until(self, needle: bytes, start: int = 0, timeout: float = 60) -> int:
        """Read until ``needle`` appears after offset ``start``; its end offset."""
        end = time.monotonic() + timeout
        while (i := self.buf.find(needle, start)) < 0:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"{needle!r} did not appear; the terminal shows {self.buf[-600:]!r}")
            try:
                self.buf += os.read(self.fd, 4096)
            except OSError:
                raise AssertionError(f"chat ended before {needle!r}: {self.buf[-600:]!r}") from None
        return i + len(needle)

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def exit_status(self, timeout: float = 30, kill: bool = True) -> int | None:
        """The child's exit code once it exits within ``timeout``; else it is killed and this
        raises, or (``kill=False``) None is returned and it keeps running."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.buf += os.read(self.fd, 4096)
                except OSError:
                    pass
        if not kill:
            return None
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"chat did not exit: {self.buf[-600:]!r}")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_chat_on_a_terminal_ctrl_c_readline_history_and_show():
    pytest.importorskip("readline")
    t = Terminal("--max-new-tokens", "128", "--seed", "0")
    try:
        at = t.read_until(b"> ")
        t.type(b"Mr. Darcy\r")
        at = t.read_until(b"Mr. Darcy\r\n", at)
        t.read_until(b" ", at)                          # the reply has started streaming
        t.type(b"\x03")                                 # Ctrl-C: stop the reply, not the program
        at = t.read_until(b"[reply stopped]", at)
        at = t.read_until(b"> ", at)
        t.type(b"/sow\x1b[D\x1b[Dh\r")                  # readline: two left arrows, insert "h": "/show"
        shown_end = t.read_until(b"\r\n> ", t.read_until(b"Mr. Darcy", at))
        # /show ran (an unedited "/sow..." line would have been sent to the model): it printed the
        # last prompt, "Mr. Darcy", and nothing was generated
        assert t.buf[at:shown_end].endswith(b"\r\nMr. Darcy\r\n> "), t.buf[at:shown_end]
        t.type(b"\x1b[A\r")                             # up arrow: the last line again
        again_end = t.read_until(b"\r\n> ", shown_end)
        assert t.buf[shown_end:again_end].count(b"Mr. Darcy") == 1
        t.type(b"\x04")                                 # Ctrl-D at an empty prompt quits
        assert t.exit_status() == 0
    finally:
        t.close()


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_ctrl_c_at_the_prompt_quits():
    pytest.importorskip("readline")
    t = Terminal("--max-new-tokens", "4")
    try:
        t.read_until(b"> ")
        # The prompt is written before readline has prepared the terminal; a Ctrl-C typed within
        # that instant can be lost on a loaded machine (seen in CI). A person never types that
        # fast, so the test types it again every 2 s until the program has quit.
        status = None
        for _ in range(15):
            t.type(b"\x03")
            status = t.exit_status(timeout=2, kill=False)
            if status is not None:
                break
        assert status == 0, f"chat did not exit: {t.buf[-600:]!r}"
    finally:
        t.close()
