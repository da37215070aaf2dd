"""``gptevo evolve --html FILE``: one self-contained static page (no script, no network).

The page holds the step table, the seed's claims with verdicts, and the charts of :data:`CHARTS`,
each one inline ``<svg>`` drawn by matplotlib (the optional extra ``gptevo[report]``; without it
:func:`write_html` raises RequestError saying how to install it). Every chart is always drawn, so the
page has exactly ``len(CHARTS)`` SVG elements; a chart without data (speed when nothing was measured,
loss when no quality data ships) says so inside its frame.
"""
from __future__ import annotations

import io
import os
import tempfile
from html import escape

from gptevo.errors import RequestError
from gptevo.evolve.report import human

CHARTS = (
    ("parameters", "Parameters: total and active per token"),
    ("kv_cache", "KV cache at the chosen context (bf16)"),
    ("speed", "Measured prefill and decode speed"),
    ("quality", "Held-out loss (small scale, mean ± std over seeds)"),
)
MAIN, BRANCH = "#3b6ea8", "#c77c2a"


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RequestError(f"--html needs matplotlib, which is not installed ({exc}); install it with "
                           f"pip install 'gptevo[report]'") from None
    return matplotlib, Figure


def _svg(fig) -> str:
    """The figure as an ``<svg>`` element (XML prolog and doctype dropped), text kept as text."""
    matplotlib, _ = _matplotlib()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "gptevo-evolve"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _axes(title: str, steps: list[dict], ncols: int = 1):
    _, Figure = _matplotlib()
    fig = Figure(figsize=(4.6 * ncols + 2.4, 3.4))
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels([s["id"] for s in steps], rotation=60, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _colors(steps):
    return [BRANCH if s["branch"] else MAIN for s in steps]


def _no_data(ax, text):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#666")


def chart_parameters(r: dict) -> str:
    steps = r["steps"]
    fig, (ax,) = _axes(CHARTS[0][1], steps)
    x = range(len(steps))
    ax.bar([i - 0.2 for i in x], [s["computed"]["params_total"] for s in steps], 0.4, label="total",
           color=_colors(steps))
    ax.bar([i + 0.2 for i in x], [s["computed"]["params_active"] for s in steps], 0.4, label="active per token",
           color="#9bbf85")
    ax.set_ylabel("parameters")
    ax.legend(fontsize=8)
    return _svg(fig)


def chart_kv(r: dict) -> str:
    steps = r["steps"]
    fig, (ax,) = _axes(f"{CHARTS[1][1]}: {r['context']} tokens", steps)
    ax.bar(range(len(steps)), [s["computed"]["kv_bytes_at_context"] for s in steps], color=_colors(steps))
    ax.set_ylabel("bytes")
    return _svg(fig)


def chart_speed(r: dict) -> str:
    steps = r["steps"]
    fig, axes = _axes(f"{CHARTS[2][1]} ({r['backend'] or 'not measured'})", steps, ncols=2)
    for ax, key, label in zip(axes, ("prefill_tok_s", "decode_tok_s"),
                              (f"prefill of {r['context']} tokens", "decode at that context")):
        vals = [s["measured"].get(key) for s in steps]
        if all(v is None for v in vals):
            _no_data(ax, "not measured at this scale")
        else:
            ax.bar(range(len(steps)), [v or 0 for v in vals], color=_colors(steps))
        ax.set_ylabel("tokens / s")
        ax.set_title(label, fontsize=9)
    return _svg(fig)


def chart_quality(r: dict) -> str:
    steps = r["steps"]
    fig, (ax,) = _axes(CHARTS[3][1], steps)
    q = [s["quality"] for s in steps]
    if all(v["heldout_loss"] is None for v in q):
        _no_data(ax, "no quality data shipped")
    else:
        xs = [i for i, v in enumerate(q) if v["heldout_loss"] is not None]
        ax.errorbar(xs, [q[i]["heldout_loss"] for i in xs], yerr=[q[i]["heldout_loss_std"] for i in xs],
                    fmt="none", ecolor="#333", capsize=3)
        ax.scatter(xs, [q[i]["heldout_loss"] for i in xs], c=[_colors(steps)[i] for i in xs], zorder=3)
        ax.set_ylabel("nats / token")
    return _svg(fig)


_DRAW = {"parameters": chart_parameters, "kv_cache": chart_kv, "speed": chart_speed, "quality": chart_quality}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 80em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.branch td:first-child { padding-left: 1.5em; font-style: italic; }
.agrees { background: #e3f4df; } .disagrees { background: #fbe3e1; }
.inconclusive { background: #fdf6d8; } .not-measured { background: #eee; }
figure { margin: 1.5em 0; } figcaption { font-weight: 600; }
small { color: #555; }
"""


def _step_table(r: dict) -> str:
    head = ["step", "change (seed section)", "params", "active", "KV / token", f"KV @ {r['context']}",
            "FLOPs / token", "weight bytes / token", "prefill tok/s", "decode tok/s", "peak memory",
            "held-out loss (small)"]
    rows = []
    for s in r["steps"]:
        c, m, q = s["computed"], s["measured"], s["quality"]
        change = escape(s["change"]) + (f"<br><small>{escape(s['section'])}</small>" if s["section"] else "")
        if s["errata"]:
            change += f"<br><small>errata {escape(', '.join(s['errata']))}</small>"
        if m["note"]:
            change += f"<br><small>{escape(m['note'])}</small>"
        loss = "-" if q["heldout_loss"] is None else f"{q['heldout_loss']:.3f} ± {q['heldout_loss_std']:.3f}"
        cells = [human(c["params_total"], ""), human(c["params_active"], ""), human(c["kv_bytes_per_token"]),
                 human(c["kv_bytes_at_context"]), human(c["flops_per_token"], ""), human(c["weight_bytes_per_token"]),
                 "-" if m["prefill_tok_s"] is None else f"{m['prefill_tok_s']:.1f}",
                 "-" if m["decode_tok_s"] is None else f"{m['decode_tok_s']:.1f}", human(m["model_peak_bytes"]), loss]
        name = escape(s["id"]) + (f" <small>(off {escape(s['parent'])})</small>" if s["branch"] else "")
        rows.append(f"<tr class=\"{'branch' if s['branch'] else 'main'}\"><td>{name}</td><td>{change}</td>"
                    + "".join(f"<td class=\"num\">{escape(x)}</td>" for x in cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _claims_table(r: dict) -> str:
    rows = []
    for cl in r["claims"]:
        scope = " (gpt-oss-20b)" if cl["scope"] == "20b" else ""
        rows.append(f"<tr class=\"{cl['verdict'].replace(' ', '-')}\"><td>{escape(cl['step'])}</td>"
                    f"<td>“{escape(cl['quote'])}”<br><small>{escape(cl['section'])}</small></td>"
                    f"<td>{escape(cl['claimed'])}{scope}</td><td>{escape(cl['ours'])}"
                    + (f"<br><small>{escape(cl['note'])}</small>" if cl["note"] else "") + "</td>"
                    f"<td>{escape(cl['verdict'])}</td><td>{escape(', '.join(cl['errata']))}</td></tr>")
    return ("<table><thead><tr><th>step</th><th>the seed says</th><th>claim</th><th>ours</th><th>verdict</th>"
            "<th>errata</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def render_html(r: dict) -> str:
    """The whole page as a string (matplotlib needed)."""
    _matplotlib()
    s = r["scale"]
    title = f"gptevo evolve: GPT-2 to gpt-oss at the {s['name']} scale"
    figures = "".join(f"<figure id=\"chart-{cid}\"><figcaption>{escape(cap)}</figcaption>{_DRAW[cid](r)}</figure>"
                      for cid, cap in CHARTS)
    summary = (f"Scale {escape(s['name'])}: vocabulary {s['vocab_size']}, width {s['hidden_size']}, "
               f"{s['num_layers']} layers, {s['num_heads']} heads of {s['head_dim']}. Context {r['context']} "
               f"tokens; measured on {escape(r['backend'] or 'nothing (not measured)')} with random weights "
               f"built in memory, {r['decode_tokens']} decoded tokens. {escape(r['quality']['note'])}. "
               f"Definitions: spec/evolution.md.")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{escape(title)}</h1><p>{summary}</p><h2>The ladder</h2>{_step_table(r)}"
            f"<h2>The seed's claims</h2>{_claims_table(r)}<h2>Charts</h2><p>Blue: the main line; orange: the "
            f"side branches (post_norm off pre_norm, qk_norm off gqa).</p>{figures}</body></html>\n")


def write_html(r: dict, path: str) -> None:
    """Render and write ``path`` atomically (a temporary file in the same folder, then renamed)."""
    page = render_html(r)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RequestError(f"--html {path}: the folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".evolve-", suffix=".html", dir=folder)
    except OSError as exc:
        raise RequestError(f"--html {path}: cannot write in {folder} ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except OSError as exc:
        raise RequestError(f"--html {path}: cannot write the report ({exc.strerror})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
