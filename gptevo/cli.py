"""The ``gptevo`` command: ``generate``, ``chat`` and ``info`` (and ``bench``).

    gptevo generate "It is a truth" [--model DIR] [--backend B] [--max-new-tokens N] [--temperature T]
                    [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S]
                    [--stop STR ...] [--truncate left] [--no-echo] [--stats] [--ids]
    echo "It is a truth" | gptevo generate     (one trailing newline of stdin is dropped)
    gptevo chat [--model DIR] [--system TEXT] [--reasoning low|medium|high] [--show-analysis] [--stats] ...
    gptevo info [--model DIR] [--context N] [--dtype float32|float64] [--json]
    python -m gptevo ...                       (the same command)

With no ``--model`` the bundled model (``gptevo/data/austen``, a small gpt-oss-architecture model
trained on Jane Austen's novels) is used. ``generate`` prints the prompt, then streams the new text to
stdout as it is made (the same text as ``gptevo.generate``); ``--no-echo`` prints the new text only.
``--ids`` reads the prompt as token ids and prints the new ids only, for checkpoints without a tokenizer.
``--max-new-tokens -1`` means no limit: until the end of text (an eos token) or of the model's context.
Sampling flags left out take the model's ``generation_config.json`` values (gptevo/generation_config.py).
``--stats`` prints one summary line on stderr, as llama-cli does: load time, prompt tokens and their
tok/s (the prompt's forward pass), generated tokens and their tok/s (the one-token decode steps, one
fewer than the tokens: the first comes from the prompt's pass), backend and peak resident memory.

``chat`` picks the conversation format from the model (gptevo/cli_chat.py): harmony for a tokenizer that
has the harmony tokens (gpt-oss), else the ``chat_template`` of ``tokenizer_config.json`` /
``chat_template.jinja``, else *continuation*. On a terminal it edits lines with readline (history with
the arrow keys); Ctrl-C stops the reply being written, and Ctrl-C or Ctrl-D at the prompt quits.

Errors name the flag that fixes them (``--truncate left``, ``--check-weights``, ``--dtype float64``),
not the Python keyword: :func:`cli_message` rewrites library messages for the command line.

Environment variables the command line reads: ``GPTEVO_BACKEND`` (the default of ``--backend``; the
library's ``gptevo.backends.default_name`` reads it too), ``TIKTOKEN_ENCODINGS_BASE`` (a directory
holding ``o200k_base.tiktoken``, or the file) and ``TIKTOKEN_CACHE_DIR`` / ``DATA_GYM_CACHE_DIR``
(tiktoken's cache), the last two for gpt-oss checkpoints in the original layout, which ship no
``tokenizer.json``; the tokenizer code takes those locations as arguments. README.md, "Environment
variables", lists every variable gptevo and its tools read.

Exit status: 0 on success, 2 for a usage error or a gptevo error (the message goes to stderr without
a traceback), 130 when interrupted.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time

from gptevo.bundled import BUNDLED, bundled_model_dir  # noqa: F401  (re-exported)
from gptevo.errors import GptevoError, RequestError


# -- helpers -------------------------------------------------------------------------------------


def _tokenizer_locations(env) -> dict:
    return {"encodings_base": env.get("TIKTOKEN_ENCODINGS_BASE") or None,
            "cache_dir": env.get("TIKTOKEN_CACHE_DIR") or env.get("DATA_GYM_CACHE_DIR") or None}


def _dir_size(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            if n.endswith(".safetensors"):
                try:
                    total += os.path.getsize(os.path.join(root, n))
                except OSError:
                    pass
    return total


def load_model(path: str, backend, err=None, weights: str = "stored", dtype: str = "float32",
               check_weights: bool = False):
    """``gptevo.load`` with a status line on stderr when it is a terminal (loading is memory-mapped,
    so the line covers the header checks and the weight preparation), naming the backend chosen;
    the first compilation of the numba kernels on this machine adds one line saying so."""
    from gptevo.loading import load

    err = err or sys.stderr
    show = hasattr(err, "isatty") and err.isatty()
    if show:
        err.write(f"loading {path} ({human_bytes(_dir_size(path))}) ...")
        err.flush()
        announce_compilation(err)
    start = time.perf_counter()
    model = load(path, backend=backend, weights=weights, dtype=dtype, check_weights=check_weights)
    if show:
        name = getattr(getattr(model, "backend", None), "name", "?")
        mode = "" if weights == "stored" else f", {weights} weights"
        err.write(f" done in {time.perf_counter() - start:.1f}s on backend {name!r}{mode}\n")
        err.flush()
    return model


def announce_compilation(err) -> None:
    """Print "compiling kernels, once per machine" on ``err`` at numba's first compilation in this
    process (numba's compile events); nothing when numba is not loaded or every kernel is cached."""
    if "numba" not in sys.modules and importlib.util.find_spec("numba") is None:
        return
    from numba.core import event

    class _FirstCompile(event.Listener):
        said = False

        def on_start(self, ev):
            if not self.said:
                self.said = True
                err.write("\ncompiling kernels, once per machine (cached for later runs) ...")
                err.flush()

        def on_end(self, ev):
            pass

    event.register("numba:compile", _FirstCompile())


def attach_tokenizer(model, env):
    """Load the model's tokenizer (with the tiktoken locations from the environment) onto ``model``."""
    from gptevo.tokenizer import load_tokenizer

    if getattr(model, "tokenizer", None) is None:
        model.tokenizer = load_tokenizer(model.path, vocab_size=model.config.vocab_size,
                                         **_tokenizer_locations(env))
    return model.tokenizer


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def human_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def load_options(args) -> dict:
    """The ``gptevo.load`` options given by the load flags: --weights, and --dtype / --check-weights
    when they differ from the defaults."""
    options = {"weights": args.weights}
    if args.dtype != "float32":
        options["dtype"] = args.dtype
    if args.check_weights:
        options["check_weights"] = True
    return options


def sampling_options(args) -> dict:
    """The sampling keywords of ``gptevo.generate`` given by the sampling flags (None = model default)."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
            "seed": args.seed}


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (getrusage; kilobytes on Linux, bytes on macOS), or None."""
    try:
        import resource
    except ImportError:      # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def stats_line(load_s: float, timings, model) -> str:
    """The one-line ``--stats`` summary (module doc): load, prompt, generation, backend, peak RSS."""
    t = timings
    prompt_rate = t.prompt_tokens / t.prompt_s if t.prompt_s > 0 else 0.0
    gen_rate = t.decode_steps / t.decode_s if t.decode_s > 0 else 0.0
    backend = getattr(getattr(model, "backend", None), "name", "?")
    rss = peak_rss_bytes()
    return (f"stats: load {load_s:.2f} s | prompt {t.prompt_tokens} tokens, {t.prompt_s:.3f} s, "
            f"{prompt_rate:.1f} tok/s | generated {t.new_tokens} tokens, {t.decode_s:.3f} s, {gen_rate:.1f} tok/s | "
            f"backend {backend} | peak RSS {human_bytes(rss) if rss is not None else '?'}")


# Library wording -> command-line wording, for error messages shown on the command line.
_REMEDIES = (
    ("gptevo.load(path, check_weights=True)", "--check-weights"),
    ("check_weights=True", "--check-weights"),
    ("dtype='float64'", "--dtype float64"),
    ("truncation='left'", "--truncate left"),
    ("max_new_tokens=None (no limit)", "--max-new-tokens -1 (no limit)"),
)
_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
          "top_p": "--top-p", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
          "seed": "--seed", "truncation": "--truncate", "stop": "--stop"}
_FLAG_WORD = re.compile(r"(?<![\w'\"./-])(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")(?![\w'\"])")


def cli_message(exc: BaseException) -> str:
    """The message of a gptevo error as the command line shows it: remedies and, for a request error,
    parameter names as the flags that set them (``top_p`` -> ``--top-p``)."""
    from gptevo.errors import RequestError

    text = str(exc)
    for old, new in _REMEDIES:
        text = text.replace(old, new)
    if isinstance(exc, RequestError):
        text = _FLAG_WORD.sub(lambda m: _FLAGS[m.group(1)], text)
    return text


# -- generate ------------------------------------------------------------------------------------
def _read_prompt(args, stdin) -> str:
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt is None and hasattr(stdin, "isatty") and stdin.isatty():
        raise RequestError("give a PROMPT argument or pipe the prompt on stdin")
    text = stdin.read()
    return text[:-1] if text.endswith("\n") else text      # the newline that echo adds


def _parse_ids(text: str) -> list[int]:
    parts = text.replace(",", " ").split()
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise RequestError(f"--ids expects integers separated by spaces or commas, got {text[:60]!r}") from None


def cmd_generate(args, env, stdin, out, err) -> int:
    from gptevo.generation import Timings, generate

    prompt = _read_prompt(args, stdin)
    start = time.perf_counter()
    model = load_model(args.model or bundled_model_dir(), args.backend, err, **load_options(args))
    load_s = time.perf_counter() - start
    timings = Timings() if args.stats else None
    kw = dict(sampling_options(args), truncation=args.truncate, timings=timings)
    if args.ids:
        new = generate(model, _parse_ids(prompt), stop_token_ids=None, **kw)
        out.write(" ".join(map(str, new)) + "\n")
    else:
        attach_tokenizer(model, env)
        pieces = generate(model, prompt, stop=args.stop or None, stream=True, **kw)   # checks the request
        if args.echo:
            out.write(prompt)
            out.flush()
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
    out.flush()
    if timings is not None:
        err.write(stats_line(load_s, timings, model) + "\n")
    return 0


# -- the parser ----------------------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default: "(default: X)" is appended to a help text that does not
    state its default already (options whose default is None say it in their own words; on/off
    switches are off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0 \
                or action.default in (None, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def max_new_tokens_arg(text: str) -> int | None:
    """--max-new-tokens: a positive integer, or -1 for no limit (None: until eos or the context)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n == -1:
        return None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, or -1 for no limit; got {text!r}")
    return n


def model_flags(sp, env, backend: bool = True) -> None:
    """--model, and with ``backend`` the load flags: --backend, --weights, --dtype, --check-weights."""
    sp.add_argument("--model", metavar="DIR", help="model directory (default: the bundled Austen model)")
    if backend:
        sp.add_argument("--backend", default=env.get("GPTEVO_BACKEND") or None,
                        help="reference (exact), numba, cupy, ... (default: $GPTEVO_BACKEND, else numba "
                             "when installed, else reference)")
        sp.add_argument("--weights", choices=("stored", "int8"), default="stored",
                        help="stored: every tensor in its stored dtype (exact); int8: dense matrices as "
                             "blockwise int8 (faster, approximate; spec/ops/int8.md)")
        sp.add_argument("--check-weights", action="store_true",
                        help="scan every weight for NaN/inf (and MXFP4 scales decoding to them) before "
                             "running; reads the whole checkpoint")
    sp.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="activation and KV-cache dtype (float64: slower, for overflow or accuracy checks)")


def sampling_flags(sp, max_new: int) -> None:
    """The sampling flags of generate and chat (None defaults: the model's generation_config.json)."""
    model_default = "default: the model's generation_config.json, else"
    sp.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=max_new, metavar="N",
                    help="tokens to generate at most; -1 = no limit (until the end of text or of the "
                         "context)")
    sp.add_argument("--temperature", type=float, default=None, metavar="T",
                    help=f"0 = greedy ({model_default} 1.0)")
    sp.add_argument("--top-k", type=int, default=None, metavar="K",
                    help=f"keep the K most likely tokens; 0 = off ({model_default} off)")
    sp.add_argument("--top-p", type=float, default=None, metavar="P",
                    help=f"keep the smallest set of tokens with probability >= P; 1 = off ({model_default} off)")
    sp.add_argument("--min-p", type=float, default=None, metavar="P",
                    help=f"drop tokens less likely than P x the most likely one; 0 = off ({model_default} off)")
    sp.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                    help="divide the logits of tokens already seen (prompt and output) by R (multiply "
                         f"negative ones); 1 = off ({model_default} off)")
    sp.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each run)")
    sp.add_argument("--stats", action="store_true",
                    help="print load time, prompt and generation tok/s, backend and peak RSS on stderr")


def build_parser(env) -> argparse.ArgumentParser:
    from gptevo import __version__
    from gptevo.cli_chat import add_subparser as add_chat
    from gptevo.cli_info import add_subparser as add_info

    p = argparse.ArgumentParser(prog="gptevo", description="Run GPT-family models (GPT-2 ... gpt-oss) "
                                "without PyTorch.", formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"gptevo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt (argument or stdin)",
                       formatter_class=HelpFormatter, description="Print the prompt and its continuation.")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads stdin")
    model_flags(g, env)
    sampling_flags(g, 64)
    g.add_argument("--stop", action="append", metavar="STR",
                   help="stop string (repeatable; not printed) (default: none)")
    g.add_argument("--truncate", choices=("left",), default=None,
                   help="left: drop the start of a prompt too long for the context (default: refuse it)")
    g.add_argument("--no-echo", dest="echo", action="store_false", help="print the new text only, not the prompt")
    g.add_argument("--ids", action="store_true", help="the prompt is token ids; print the new token ids only")
    g.set_defaults(func=cmd_generate)

    add_chat(sub, env)
    add_info(sub, env)

    from gptevo.bench import add_subparser as add_bench
    add_bench(sub, env)
    from gptevo.serve.command import add_subparser as add_serve
    add_serve(sub, env)
    from gptevo.evolve.cli import add_subparser as add_evolve
    add_evolve(sub, env)
    return p


def main(argv=None, *, env=None, stdin=None, stdout=None, stderr=None) -> int:
    """Run the command line; returns the exit status (see the module doc)."""
    env = os.environ if env is None else env
    stdin, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser(env)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:          # --help / --version (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return args.func(args, env, stdin, out, err)
    except GptevoError as exc:
        out.flush()
        err.write(f"gptevo: error: {cli_message(exc)}\n")
        return 2
    except KeyboardInterrupt:
        err.write("\n")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
