"""The ``gptevo evolve`` subcommand (registered by gptevo/cli.py through :func:`add_subparser`).

    gptevo evolve [--scale tiny|small|gpt2|20b] [--backend B] [--context N] [--decode-tokens N]
                  [--threads N] [--no-measure] [--json] [--html FILE]

Prints the ladder table and the seed's claims (or, with ``--json``, the report of
:mod:`gptevo.evolve.report`); ``--html FILE`` also writes the self-contained page. Progress lines go
to stderr while steps are measured.
"""
from __future__ import annotations

import json

from gptevo.evolve.ladder import DEFAULT_SCALE, SCALES
from gptevo.evolve.report import DEFAULT_DECODE_TOKENS


def add_subparser(sub, env) -> None:
    """Add ``evolve`` to the ``gptevo`` subcommands."""
    p = sub.add_parser("evolve", help="the seed's GPT-2 -> gpt-oss ladder, step by step: sizes, KV cache, "
                                      "FLOPs, measured speed, held-out loss, the seed's claims")
    p.add_argument("--scale", choices=tuple(SCALES), default=DEFAULT_SCALE,
                   help=f"model sizes of the ladder (default {DEFAULT_SCALE}; 20b ends at the real gpt-oss-20b)")
    p.add_argument("--backend", default=env.get("GPTEVO_BACKEND") or None,
                   help="backend the steps are measured on (default: $GPTEVO_BACKEND, else numba when "
                        "installed, else reference)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens in the KV cache for the KV, FLOPs and prefill figures (default: half the "
                        "scale's GPT-2 context)")
    p.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS,
                   help=f"tokens decoded after the prefill (default {DEFAULT_DECODE_TOKENS})")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numba, OpenMP and BLAS in each measuring process (default: the "
                        "environment's)")
    p.add_argument("--no-measure", action="store_true", help="skip the measured columns (computed and "
                                                             "shipped figures only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (schema gptevo.evolve/1)")
    p.add_argument("--html", metavar="FILE", default=None, help="also write a self-contained HTML report "
                                                               "(needs gptevo[report])")
    p.set_defaults(func=cmd_evolve)


def cmd_evolve(args, env, stdin, out, err) -> int:
    from gptevo.evolve import report

    if args.html:
        from gptevo.evolve.html import _matplotlib

        _matplotlib()                     # fail before measuring anything
    def progress(msg):
        err.write(msg + "\n")
        err.flush()

    r = report.build(args.scale, backend=args.backend, context=args.context, decode_tokens=args.decode_tokens,
                     measure=not args.no_measure, threads=args.threads, progress=progress)
    if args.html:
        from gptevo.evolve.html import write_html

        write_html(r, args.html)
        progress(f"[evolve] wrote {args.html}")
    out.write(json.dumps(r, indent=1) + "\n" if args.json else report.format_table(r))
    return 0
