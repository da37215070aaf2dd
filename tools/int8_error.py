"""Error of the int8 weight mode: logits with ``weights="int8"`` vs the exact path (``"stored"``).

For each model the same token sequences are run through ``gptevo.load(path, weights="stored")`` and
``gptevo.load(path, weights="int8")`` on the same backend (numba by default: the fast path users get),
and the logits compared over every position and vocabulary entry:

- max rel:  max|int8 - stored| / max|stored|    (over all positions and the whole vocabulary)
- mean rel: mean|int8 - stored| / mean|stored|
- top-1:    share of positions where argmax(int8 logits) == argmax(stored logits)
- experts changed (MoE models): (position, MoE layer) pairs whose top-k expert set differs, out of
  all such pairs (from ``model.trace``'s router logits; a changed set moves that token's logits by
  far more than the rounding of the weights does), and the max rel over the positions before the
  first such change in the sequence (no position after it sees unchanged routing through attention)

Models:
- the bundled model (gptevo/data/austen, gpt-oss architecture, MXFP4 experts): the held-out novel in
  the windows of tools/eval_bundled.py (its ``windows``/``read_novel``/``score`` are imported, so the
  per-token perplexity is computed exactly as that tool computes it), limited to ``--max-windows``;
  it reports the perplexity per token with both weight modes and the change in %. Needs the corpus:
  ``python tools/austen_corpus.py`` (writes WORKDIR/clean/*.txt, offline via apt-get download);
- every peer fixture of tests/_builders/peer_fixtures.py (tiny random HF-layout models of each family,
  built into a temporary directory with ``build_fixture``; needs torch and transformers), on
  ``--fixture-seqs`` seeded token sequences of the fixture's own length;
- the synthetic full-size GPT-2 at ``--gpt2`` if present (random weights: logits metrics only).

Then one model (the bundled one, ``--ref-windows`` windows) is rerun on backend="reference" to show the
numba kernel adds nothing beyond the quantization: the int8-vs-stored error on the reference, and the
numba-vs-reference difference with each weight mode (the "kernel" rows: stored vs stored, int8 vs int8).

Usage: ``nice -n 5 python tools/int8_error.py [--max-windows N] [--backend numba] [--skip-fixtures]``
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


class Compare:
    """Running logits comparison of ``b`` (the tested path) against ``a`` (the exact path)."""

    def __init__(self):
        self.max_d = self.max_a = self.sum_d = self.sum_a = 0.0
        self.n = self.positions = self.agree = 0
        self.routes = self.route_changes = 0
        self.max_d_same = 0.0                 # max|d| over positions whose experts all stayed the same

    def add(self, a, b) -> None:
        """``a``, ``b``: logits [T, V], or (logits, expert sets) pairs from :func:`run`."""
        same = None
        if isinstance(a, tuple):
            (a, ra), (b, rb) = a, b
            same = np.ones(a.shape[0], dtype=bool)
            for x, y in zip(ra, rb):                                 # one [T, k] per MoE layer
                changed = (x != y).any(-1)
                self.routes += x.shape[0]
                self.route_changes += int(changed.sum())
                same &= ~np.maximum.accumulate(changed)              # causal: later positions see it too
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        d = np.abs(b64 - a64)
        self.max_d = max(self.max_d, float(d.max()))
        if same is not None and same.any():
            self.max_d_same = max(self.max_d_same, float(d[same].max()))
        self.max_a = max(self.max_a, float(np.abs(a64).max()))
        self.sum_d += float(d.sum())
        self.sum_a += float(np.abs(a64).sum())
        self.n += d.size
        self.positions += a.shape[0]
        self.agree += int((a64.argmax(-1) == b64.argmax(-1)).sum())

    def row(self) -> dict:
        return {"positions": self.positions, "max_rel": self.max_d / self.max_a,
                "mean_rel": self.sum_d / self.sum_a, "top1": self.agree / self.positions,
                "routes": self.routes, "route_changes": self.route_changes,
                "max_rel_same": self.max_d_same / self.max_a}


def run(model, ids):
    """Logits [T, V] of a dense model; for an MoE model (logits, [T, k] sorted expert ids per MoE
    layer) from ``model.trace`` (same computation and logits as ``model.logits``)."""
    if model.config.mlp != "moe":
        return model.logits(ids)
    tr = model.trace(ids)
    k = model.config.experts_per_token
    experts = [np.sort(np.argsort(-v, axis=-1, kind="stable")[:, :k], axis=-1)
               for name, v in tr.items() if name.endswith(".router_logits")]
    return tr["logits"], experts


def logits_of(out):
    return out[0] if isinstance(out, tuple) else out


def bundled(args, backend: str, max_windows: int, perplexity: bool) -> dict:
    """int8 vs stored on the held-out Austen novel; per-token perplexity of both when asked."""
    from tokenizers import Tokenizer

    import eval_bundled as eb
    import gptevo

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    held = np.array(tok.encode(eb.read_novel(args.workdir, eb.HELDOUT_NOVEL)).ids, dtype=np.int64)
    wins = eb.windows(held, args.seq)
    total = len(wins)
    if max_windows:
        wins = wins[:max_windows]
    ntok = int(sum(len(w) - 1 for w in wins))
    exact = gptevo.load(args.model, backend=backend)
    quant = gptevo.load(args.model, backend=backend, weights="int8")
    cmp, nll_s, nll_q, t0 = Compare(), 0.0, 0.0, time.time()
    for n, w in enumerate(wins):
        ids = [int(i) for i in w[:-1]]
        os_, oq = run(exact, ids), run(quant, ids)
        cmp.add(os_, oq)
        ls, lq = logits_of(os_), logits_of(oq)
        if perplexity:   # eval_bundled.score on this one window: the same NLL sum, window by window
            nll_s += eb.score(lambda _ids: ls, [w], "stored")
            nll_q += eb.score(lambda _ids: lq, [w], "int8")
        if (n + 1) % 25 == 0:
            print(f"  [bundled/{backend}] {n + 1}/{len(wins)} windows, {time.time() - t0:.0f}s", flush=True)
    out = cmp.row()
    out.update(model=f"bundled austen (gpt_oss), {len(wins)}/{total} windows", backend=backend,
               logits=(exact, quant, wins))
    if perplexity:
        out.update(ppl_stored=math.exp(nll_s / ntok), ppl_int8=math.exp(nll_q / ntok), tokens=ntok)
    return out


def kernel_rows(args, numba_row: dict) -> list:
    """Reference backend on the first ``--ref-windows`` windows: int8 vs stored there, and numba vs
    reference with each weight mode (what the kernel itself contributes)."""
    import gptevo

    exact_n, quant_n, wins = numba_row["logits"]
    wins = wins[:args.ref_windows]
    exact_r = gptevo.load(args.model, backend="reference")
    quant_r = gptevo.load(args.model, backend="reference", weights="int8")
    q_vs_s, k_s, k_q = Compare(), Compare(), Compare()
    for w in wins:
        ids = [int(i) for i in w[:-1]]
        rs, rq = run(exact_r, ids), run(quant_r, ids)
        q_vs_s.add(rs, rq)
        k_s.add(rs, run(exact_n, ids))
        k_q.add(rq, run(quant_n, ids))
    name = f"bundled austen, first {len(wins)} windows"
    return [dict(q_vs_s.row(), model=name, backend="reference"),
            dict(k_s.row(), model=name + ": kernel, stored", backend="numba vs reference"),
            dict(k_q.row(), model=name + ": kernel, int8", backend="numba vs reference")]


def fixtures(args, backend: str) -> tuple[list, list]:
    """int8 vs stored on each peer fixture (``--fixture-seqs`` seeded sequences of its length)."""
    import gptevo
    from _builders import peer_fixtures as pf

    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    rows, failed = [], []
    names = args.fixtures or list(pf.FIXTURES)
    with tempfile.TemporaryDirectory(prefix="int8_error_") as tmp:
        for name in names:
            spec = pf.FIXTURES[name]
            missing = [m for m in spec.needs if not pf.have(m)]
            if missing:
                failed.append(f"{name}: not built ({', '.join(missing)} missing)")
                continue
            try:
                built = pf.build_fixture(name, os.path.join(tmp, name))
                exact = gptevo.load(built.path, backend=backend)
                quant = gptevo.load(built.path, backend=backend, weights="int8")
                cmp = Compare()
                seqs = [built.ids] + [pf.token_ids(f"{name}/int8/{k}", len(built.ids))
                                      for k in range(1, args.fixture_seqs)]
                for ids in seqs:
                    cmp.add(run(exact, ids), run(quant, ids))
            except Exception as exc:          # report and go on: one family must not hide the others
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            rows.append(dict(cmp.row(), model=f"fixture {name} ({spec.family})", backend=backend))
            print(f"  [fixtures] {name} done", flush=True)
    return rows, failed


def gpt2_full(args, backend: str) -> dict:
    import gptevo

    exact = gptevo.load(args.gpt2, backend=backend)
    quant = gptevo.load(args.gpt2, backend=backend, weights="int8")
    V = exact.config.vocab_size
    rng = np.random.default_rng(0)
    cmp = Compare()
    for _ in range(args.gpt2_seqs):
        ids = [int(t) for t in rng.integers(0, V, args.gpt2_len)]
        cmp.add(exact.logits(ids), quant.logits(ids))
    return dict(cmp.row(), model="synthetic GPT-2 124M (random weights)", backend=backend)


def table(rows: list) -> str:
    head = ("| model | backend | positions | max rel | mean rel | top-1 agree | experts changed | "
            "max rel before first change | ppl/token stored | ppl/token int8 | change |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        ppl = ["", "", ""]
        if "ppl_stored" in r:
            ppl = [f"{r['ppl_stored']:.3f}", f"{r['ppl_int8']:.3f}",
                   f"{100 * (r['ppl_int8'] / r['ppl_stored'] - 1):+.3f} %"]
        moe = (f"{r['route_changes']}/{r['routes']} | {r['max_rel_same']:.2e}" if r["routes"] else " | ")
        lines.append(f"| {r['model']} | {r['backend']} | {r['positions']} | {r['max_rel']:.2e} | "
                     f"{r['mean_rel']:.2e} | {100 * r['top1']:.2f} % | {moe} | " + " | ".join(ppl) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="numba", help="backend of the main rows (default numba)")
    ap.add_argument("--model", default=os.path.join(ROOT, "gptevo", "data", "austen"))
    ap.add_argument("--workdir", default="/work/work-data", help="holds clean/*.txt (tools/austen_corpus.py)")
    ap.add_argument("--seq", type=int, default=256, help="window length, as tools/eval_bundled.py")
    ap.add_argument("--max-windows", type=int, default=150,
                    help="held-out windows of the bundled model (0 = the whole novel, 459 windows; "
                         "default 150: 1.5 min on 2 idle cores with numba, 4.5 min when shared)")
    ap.add_argument("--ref-windows", type=int, default=4, help="windows rerun on the reference backend")
    ap.add_argument("--fixture-seqs", type=int, default=8, help="token sequences per peer fixture")
    ap.add_argument("--fixtures", nargs="*", help="peer fixture names (default: all)")
    ap.add_argument("--skip-fixtures", action="store_true")
    ap.add_argument("--gpt2", default="/work/models/gpt2-124m", help="synthetic GPT-2 dir (skipped if absent)")
    ap.add_argument("--gpt2-seqs", type=int, default=2)
    ap.add_argument("--gpt2-len", type=int, default=128)
    args = ap.parse_args(argv)

    rows, notes, t0 = [], [], time.time()
    if os.path.exists(os.path.join(args.workdir, "clean", "persuasion.txt")):
        b = bundled(args, args.backend, args.max_windows, perplexity=True)
        rows.append(b)
        if args.ref_windows and args.backend != "reference":
            rows.extend(kernel_rows(args, b))
        b.pop("logits")
    else:
        notes.append(f"bundled model: no corpus in {args.workdir}/clean (run tools/austen_corpus.py)")
    print(f"bundled model done, {time.time() - t0:.0f}s", flush=True)
    if not args.skip_fixtures:
        frows, failed = fixtures(args, args.backend)
        rows.extend(frows)
        notes.extend(failed)
    if args.gpt2 and os.path.exists(os.path.join(args.gpt2, "config.json")):
        rows.append(gpt2_full(args, args.backend))
    elif args.gpt2:
        notes.append(f"synthetic GPT-2: {args.gpt2} absent")
    print()
    print(table(rows))
    for n in notes:
        print(f"not measured: {n}")
    print(f"({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
