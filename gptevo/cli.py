"""The ``gptevo`` command: ``generate``, ``chat`` and ``info``.

    gptevo generate "It is a truth" [--model DIR] [--backend B] [--max-new-tokens N] [--temperature T]
                    [--top-k K] [--top-p P] [--seed S] [--stop STR ...] [--ids]
    echo "It is a truth" | gptevo generate     (one trailing newline of stdin is dropped)
    gptevo chat [--model DIR] [--system TEXT] [--reasoning low|medium|high] [--show-analysis] ...
    gptevo info [--model DIR] [--context N] [--json]

With no ``--model`` the bundled model (``gptevo/data/austen``, a small gpt-oss-architecture model
trained on Jane Austen's novels) is used. ``generate`` streams the new text to stdout as it is made
(the same text as ``gptevo.generate``); ``--ids`` reads the prompt as token ids and prints new ids,
for checkpoints without a tokenizer.

``chat`` picks the conversation format from the model: harmony for a tokenizer that has the harmony
tokens (gpt-oss), else the ``chat_template`` of ``tokenizer_config.json`` / ``chat_template.jinja``,
else *continuation*: the bundled Austen model is not chat-trained, so each line you type is appended to
a running transcript and the model continues it. ``/reset`` clears the history, ``/exit`` (or end of
input) quits. The history is left-truncated to fit the context, and a reply is at most
``--max-new-tokens`` and at most half the context.

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
import json
import os
import sys
import time

from gptevo.errors import GptevoError, RequestError

BUNDLED = ("data", "austen")


# -- helpers -------------------------------------------------------------------------------------
def bundled_model_dir() -> str:
    """The directory of the bundled model, found with importlib.resources."""
    from importlib.resources import files

    path = files("gptevo").joinpath(*BUNDLED)
    if not path.is_dir():
        raise RequestError(f"the bundled model is missing ({path}); pass --model DIR")
    return os.fspath(path)


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


def load_model(path: str, backend, err=None, weights: str = "stored"):
    """``gptevo.load`` with a status line on stderr when it is a terminal (loading is memory-mapped,
    so the line covers the header checks and the weight preparation), naming the backend chosen;
    the first compilation of the numba kernels on this machine adds one line saying so."""
    from gptevo.model import load

    err = err or sys.stderr
    show = hasattr(err, "isatty") and err.isatty()
    if show:
        err.write(f"loading {path} ({human_bytes(_dir_size(path))}) ...")
        err.flush()
        announce_compilation(err)
    start = time.perf_counter()
    model = load(path, backend=backend, weights=weights)
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
    from gptevo.generation import generate

    prompt = _read_prompt(args, stdin)
    model = load_model(args.model or bundled_model_dir(), args.backend, err, weights=args.weights)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed)
    if args.ids:
        new = generate(model, _parse_ids(prompt), stop_token_ids=None, **kw)
        out.write(" ".join(map(str, new)) + "\n")
        return 0
    attach_tokenizer(model, env)
    for piece in generate(model, prompt, stop=args.stop or None, stream=True, **kw):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


# -- chat ----------------------------------------------------------------------------------------
def chat_mode(model, tokenizer) -> tuple[str, object]:
    """("harmony", stop ids) | ("template", ChatTemplate) | ("continue", None)."""
    from gptevo.chat import harmony_stop_ids, load_chat_template

    stops = harmony_stop_ids(tokenizer)
    if stops is not None:
        return "harmony", stops
    template = load_chat_template(model.path) if model.path else None
    if template is not None:
        return "template", template
    return "continue", None


def cmd_chat(args, env, stdin, out, err) -> int:
    from gptevo.chat import encode_harmony, parse_harmony
    from gptevo.generation import (check_max_new_tokens, check_sampling, fit_context, text_pieces,
                                   token_stream)

    model = load_model(args.model or bundled_model_dir(), args.backend, err, weights=args.weights)
    tok = attach_tokenizer(model, env)
    cfg = model.config
    # the history is left-truncated to fit; keep at least half of the context for it
    n_new = min(check_max_new_tokens(args.max_new_tokens), max(1, cfg.context_length // 2))
    sampling = check_sampling(args.temperature, args.top_k, args.top_p, args.seed, cfg.vocab_size)
    mode, extra = chat_mode(model, tok)
    notes = {"harmony": "harmony format (gpt-oss)", "template": f"chat template from {getattr(extra, 'source', '')}",
             "continue": "this model has no chat format (it is not chat-trained): each line you type is "
                         "appended to the text so far and the model continues it"}
    err.write(f"chat: {notes[mode]}. /reset clears the history, /exit quits.\n")
    interactive = hasattr(stdin, "isatty") and stdin.isatty()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    transcript = ""
    eos = tuple(cfg.eos_token_ids)
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            transcript = ""
            continue
        if not line.strip():
            continue
        if mode == "harmony":
            messages.append({"role": "user", "content": line})
            ids = encode_harmony(tok, messages, reasoning=args.reasoning)
            ids = fit_context(ids, n_new, cfg.context_length, "left")
            new = list(token_stream(model, ids, max_new_tokens=n_new, sampling=sampling,
                                    stop_token_ids=(*extra, *eos)))
            reply = parse_harmony(new, tok)
            if args.show_analysis and reply.analysis:
                err.write(f"[analysis] {reply.analysis}\n")
            answer = reply.final or (reply.messages[-1].content if reply.messages else "")
            out.write(answer + "\n")
            out.flush()
            messages.append({"role": "assistant", "content": answer})
            continue
        if mode == "template":
            messages.append({"role": "user", "content": line})
            ids = tok.encode(extra.render(messages, add_generation_prompt=True), add_special_tokens=False)
        else:
            transcript = (transcript + " " + line).strip() if transcript else line
            ids = tok.encode(transcript)
        ids = fit_context(ids, n_new, cfg.context_length, "left")
        answer = ""
        for piece in text_pieces(tok, model, ids, max_new_tokens=n_new, sampling=sampling, stop_token_ids=eos):
            out.write(piece)
            out.flush()
            answer += piece
        out.write("\n")
        out.flush()
        if mode == "template":
            messages.append({"role": "assistant", "content": answer})
        else:
            transcript += answer
    return 0


# -- info ----------------------------------------------------------------------------------------
def model_info(config, context: int) -> dict:
    """Sizes and memory of a config, from gptevo.calculators (exact integers)."""
    from gptevo import calculators as C

    counts = C.parameter_count(config)
    dtypes = ("float32", "bfloat16", "float16", "int8", "mxfp4")
    info = {
        "family": config.family,
        "layers": config.num_layers, "hidden_size": config.hidden_size, "heads": config.num_heads,
        "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "context": config.context_length, "experts": config.num_experts,
        "experts_per_token": config.experts_per_token, "sliding_window": config.sliding_window,
        "parameters_total": counts["total"],
        "parameters_active": C.active_parameters(config),
        "parameters_active_with_embedding": C.active_parameters(config, count_embedding=True),
        "kv_cache_bytes_per_token_bf16": C.kv_cache_bytes(config, 1, "bfloat16"),
        "kv_cache_context_tokens": context,
        "kv_cache_bytes_at_context_bf16": C.kv_cache_bytes(config, context, "bfloat16"),
        "bytes_per_token_bf16": C.bytes_per_token(config, "bfloat16", context_tokens=context),
        "weight_memory": {d: C.weight_memory(config, d) for d in dtypes},
    }
    if config.is_moe:
        info["weight_memory"]["mxfp4_experts_only"] = C.weight_memory(config, "mxfp4", experts_only=True)
        info["bytes_per_token_mxfp4_experts"] = C.bytes_per_token(config, "mxfp4", context_tokens=context,
                                                                  experts_only=True)
    return info


def cmd_info(args, env, stdin, out, err) -> int:
    from gptevo.config_adapters import load_config

    path = args.model or bundled_model_dir()
    config = load_config(path)
    context = args.context if args.context is not None else min(config.context_length, 4096)
    if context < 0:
        raise RequestError(f"--context must be >= 0, got {context}")
    info = model_info(config, context)
    if args.json:
        out.write(json.dumps({"path": path, **info}, indent=2) + "\n")
        return 0
    w = info["weight_memory"]
    lines = [
        f"model            {path}",
        f"family           {info['family']}",
        f"shape            {info['layers']} layers, hidden {info['hidden_size']}, {info['heads']} heads "
        f"({info['kv_heads']} KV) x {info['head_dim']}, vocab {info['vocab_size']}, context {info['context']}",
    ]
    if info["experts"]:
        lines.append(f"experts          {info['experts_per_token']} of {info['experts']} per token")
    if info["sliding_window"]:
        lines.append(f"sliding window   {info['sliding_window']}")
    lines += [
        f"parameters       {human_count(info['parameters_total'])} total ({info['parameters_total']:,})",
        f"active/token     {human_count(info['parameters_active'])} ({info['parameters_active']:,}; "
        f"{info['parameters_active_with_embedding']:,} with the embedding table)",
        f"KV cache         {human_bytes(info['kv_cache_bytes_per_token_bf16'])} per token (bf16); "
        f"{human_bytes(info['kv_cache_bytes_at_context_bf16'])} at {context} tokens",
        f"read per token   {human_bytes(info['bytes_per_token_bf16'])} (bf16 weights + KV at {context} tokens)",
    ]
    if "bytes_per_token_mxfp4_experts" in info:
        lines.append(f"                 {human_bytes(info['bytes_per_token_mxfp4_experts'])} "
                     f"(MXFP4 experts, as gpt-oss ships)")
    lines.append("weight memory    " + ", ".join(f"{d} {human_bytes(b)}" for d, b in w.items()))
    out.write("\n".join(lines) + "\n")
    return 0


# -- the parser ----------------------------------------------------------------------------------
def build_parser(env) -> argparse.ArgumentParser:
    from gptevo import __version__

    p = argparse.ArgumentParser(prog="gptevo", description="Run GPT-family models (GPT-2 ... gpt-oss) "
                                "without PyTorch.")
    p.add_argument("--version", action="version", version=f"gptevo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def model_flags(sp, backend=True):
        sp.add_argument("--model", help="model directory (default: the bundled Austen model)")
        if backend:
            sp.add_argument("--backend", default=env.get("GPTEVO_BACKEND") or None,
                            help="reference (exact), numba, cupy, ... (default: $GPTEVO_BACKEND, else numba "
                                 "when installed, else reference)")
            sp.add_argument("--weights", choices=("stored", "int8"), default="stored",
                            help="stored: every tensor in its stored dtype (exact, default); int8: dense "
                                 "matrices as blockwise int8 (faster, approximate; spec/ops/int8.md)")

    def sampling_flags(sp, max_new):
        sp.add_argument("--max-new-tokens", type=int, default=max_new)
        sp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        sp.add_argument("--top-k", type=int, default=None, help="0 = off")
        sp.add_argument("--top-p", type=float, default=None, help="1 = off")
        sp.add_argument("--seed", type=int, default=None)

    g = sub.add_parser("generate", help="continue a prompt (argument or stdin)")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads stdin")
    model_flags(g)
    sampling_flags(g, 64)
    g.add_argument("--stop", action="append", help="stop string (repeatable); not printed")
    g.add_argument("--ids", action="store_true", help="the prompt is token ids; print new token ids")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (harmony, chat template, or text continuation)")
    model_flags(c)
    sampling_flags(c, 256)
    c.add_argument("--system", help="system prompt (harmony: developer instructions)")
    c.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium", help="harmony only")
    c.add_argument("--show-analysis", action="store_true", help="harmony: print the analysis channel to stderr")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="sizes, parameters, KV cache and memory of a model (config only)")
    model_flags(i, backend=False)
    i.add_argument("--context", type=int, default=None, help="tokens for the KV-cache figures (default 4096)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

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
        err.write(f"gptevo: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        err.write("\n")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
