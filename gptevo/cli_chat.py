"""``gptevo chat``: an interactive conversation with a model on the command line.

The conversation format comes from the model (:func:`chat_mode`): harmony for a tokenizer that has the
harmony tokens (gpt-oss), else the ``chat_template`` of ``tokenizer_config.json`` /
``chat_template.jinja``, else *continuation*: the bundled Austen model is not chat-trained, so each line
you type is appended to a running transcript and the model continues it. The history is left-truncated
to fit the context, and a reply is at most ``--max-new-tokens`` and at most half the context.

Commands: ``/reset`` clears the history, ``/show`` prints the last prompt as the model saw it (after
the format and any truncation, special tokens written out), ``/help`` lists the commands, ``/exit``
(or end of input) quits.

On a terminal (stdin and stdout both), lines are read with :func:`input` and the ``readline`` module
where Python has it: line editing, and the arrow keys recall earlier lines. Ctrl-C while a reply is
being written stops it and returns to the prompt (the part already shown stays in the history);
Ctrl-C or Ctrl-D at the prompt quits. Flags that the model's format ignores (``--system`` without a
chat format, ``--reasoning`` and ``--show-analysis`` outside harmony) are warned about on stderr.
``--stats`` prints one summary of the whole session at the end (gptevo/cli.py, ``stats_line``).
"""
from __future__ import annotations

import sys
import time

HELP = "/reset clears the history, /show prints the last prompt, /exit quits"


def add_subparser(sub, env) -> None:
    """Add ``chat`` to the ``gptevo`` subcommands."""
    from gptevo.cli import HelpFormatter, model_flags, sampling_flags

    c = sub.add_parser("chat", help="interactive chat (harmony, chat template, or text continuation)",
                       formatter_class=HelpFormatter, description=__doc__.split("\n\n")[1])
    model_flags(c, env)
    sampling_flags(c, 256)
    c.add_argument("--system", metavar="TEXT",
                   help="system prompt (harmony: developer instructions; ignored without a chat format) "
                        "(default: none)")
    c.add_argument("--reasoning", choices=("low", "medium", "high"), default=None,
                   help="harmony reasoning effort (default: medium; other formats ignore it)")
    c.add_argument("--show-analysis", action="store_true", help="harmony: print the analysis channel to stderr")
    c.set_defaults(func=cmd_chat)


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


def ignored_flags(args, mode: str) -> list[str]:
    """Warnings for the flags given that the conversation format ``mode`` does not use."""
    out = []
    if args.system and mode == "continue":
        out.append("--system is ignored: this model has no chat format, so there is no system message")
    if args.reasoning is not None and mode != "harmony":
        out.append("--reasoning is ignored: only the harmony format (gpt-oss) has a reasoning effort")
    if args.show_analysis and mode != "harmony":
        out.append("--show-analysis is ignored: only the harmony format (gpt-oss) has an analysis channel")
    return out


class LineReader:
    """Lines from the user: ``input()`` with readline on a terminal, else ``stdin.readline()``.

    ``read()`` returns the line without its newline, or None at end of input (Ctrl-D) or on Ctrl-C.
    """

    def __init__(self, stdin, out, err):
        self.stdin, self.err = stdin, err
        self.terminal = (stdin is sys.stdin and out is sys.stdout and _isatty(stdin) and _isatty(out))
        self.prompt = _isatty(stdin)
        if self.terminal:
            try:
                import readline  # noqa: F401  (importing it gives input() line editing and history)
            except ImportError:  # pragma: no cover - Python built without readline
                pass

    def read(self) -> str | None:
        if self.terminal:
            try:
                return input("> ")
            except (EOFError, KeyboardInterrupt):
                return None
        if self.prompt:
            self.err.write("> ")
            self.err.flush()
        try:
            line = self.stdin.readline()
        except KeyboardInterrupt:
            return None
        return line.rstrip("\n") if line else None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def cmd_chat(args, env, stdin, out, err) -> int:
    from gptevo import cli
    from gptevo.chat import encode_harmony, parse_harmony
    from gptevo.generation import Timings, check_max_new_tokens, fit_context, sampling_for, text_pieces, token_stream

    start = time.perf_counter()
    model = cli.load_model(args.model or cli.bundled_model_dir(), args.backend, err, **cli.load_options(args))
    load_s = time.perf_counter() - start
    tok = cli.attach_tokenizer(model, env)
    cfg = model.config
    # the history is left-truncated to fit; keep at least half of the context for it
    limit = max(1, cfg.context_length // 2)
    n_new = min(check_max_new_tokens(args.max_new_tokens) or limit, limit)
    opts = cli.sampling_options(args)
    del opts["max_new_tokens"]
    sampling = sampling_for(model, **opts)
    mode, extra = chat_mode(model, tok)
    notes = {"harmony": "harmony format (gpt-oss)", "template": f"chat template from {getattr(extra, 'source', '')}",
             "continue": "this model has no chat format (it is not chat-trained): each line you type is "
                         "appended to the text so far and the model continues it"}
    err.write(f"chat: {notes[mode]}. {HELP}.\n")
    for warning in ignored_flags(args, mode):
        err.write(f"gptevo: warning: {warning}\n")
    reader = LineReader(stdin, out, err)
    system = [{"role": "system", "content": args.system}] if args.system and mode != "continue" else []
    messages = list(system)
    transcript = ""
    shown = ""                       # the last prompt as the model saw it (/show)
    eos = tuple(cfg.eos_token_ids)
    totals = Timings()
    while True:
        line = reader.read()
        if line is None:
            if reader.terminal or reader.prompt:
                out.write("\n")
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            messages, transcript = list(system), ""
            continue
        if command == "/show":
            out.write((shown or "(nothing yet: no prompt has been sent)") + "\n")
            out.flush()
            continue
        if command == "/help":
            err.write(HELP + "\n")
            continue
        if not command:
            continue
        timings = Timings()
        answer = ""
        try:
            if mode == "harmony":
                messages.append({"role": "user", "content": line})
                ids = encode_harmony(tok, messages, reasoning=args.reasoning or "medium")
                ids = fit_context(ids, n_new, cfg.context_length, "left")
                shown = tok.decode(ids)
                new: list[int] = []
                for t in token_stream(model, ids, max_new_tokens=n_new, sampling=sampling,
                                      stop_token_ids=(*extra, *eos), timings=timings):
                    new.append(t)
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
            shown = tok.decode(ids)
            for piece in text_pieces(tok, model, ids, max_new_tokens=n_new, sampling=sampling,
                                     stop_token_ids=eos, timings=timings):
                out.write(piece)
                out.flush()
                answer += piece
            out.write("\n")
            out.flush()
        except KeyboardInterrupt:               # Ctrl-C: stop this reply, back to the prompt
            out.write("\n")
            out.flush()
            err.write("[reply stopped]\n")
            err.flush()
            if mode == "harmony":
                messages.pop()                  # the reply was never shown: forget the question too
                continue
        finally:
            totals.add(timings)
        if mode == "template":
            messages.append({"role": "assistant", "content": answer})
        elif mode == "continue":
            transcript += answer
    out.flush()
    if args.stats:
        err.write(cli.stats_line(load_s, totals, model) + "\n")
    return 0
