"""Choose the bundled model's sampling defaults (gptevo/data/austen/generation_config.json) by measurement.

For each candidate setting (temperature, top_k, top_p, min_p, repetition_penalty) the bundled model
continues a few Austen-style prompts with a few seeds, and two figures are taken over the generated text:

- dictionary share: the share of generated words (letters with an optional 's/'t/... suffix,
  lower-cased) that occur in a word list built from the six cleaned Austen novels
  (``tools/austen_corpus.py`` writes them to ``WORKDIR/clean``); made-up words ("tirth",
  "occurenity") lower it;
- distinct 4-grams: distinct word 4-grams / all word 4-grams of each sample, averaged; loops ("she was
  not to be so much ... she was not to be so much") lower it.

Usage: ``python tools/tune_bundled_sampling.py [--workdir /work/work-data] [--tokens 160]
[--seeds 0 1 2] [--backend numba] [--json]``. Prints one row per candidate, best first by
``dictionary share x distinct 4-grams``; the chosen row goes into the bundled model's README.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import gptevo  # noqa: E402

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
PROMPTS = (
    "It is a truth universally acknowledged",
    "Mr. Darcy walked into the room and",
    "The Miss Dashwoods were",
    "\"My dear Emma,\" said Mr. Knightley,",
)
# (temperature, top_k, top_p, min_p, repetition_penalty); 0 / 1.0 / 0.0 / 1.0 = off
CANDIDATES = (
    (1.0, 0, 1.0, 0.0, 1.0),
    (0.9, 0, 1.0, 0.0, 1.0),
    (0.8, 0, 1.0, 0.0, 1.0),
    (0.7, 0, 1.0, 0.0, 1.0),
    (0.6, 0, 1.0, 0.0, 1.0),
    (0.8, 40, 1.0, 0.0, 1.0),
    (0.7, 40, 1.0, 0.0, 1.0),
    (0.8, 0, 0.9, 0.0, 1.0),
    (0.7, 0, 0.9, 0.0, 1.0),
    (0.8, 40, 0.9, 0.0, 1.0),
    (0.7, 40, 0.9, 0.0, 1.0),
    (1.0, 0, 1.0, 0.05, 1.0),
    (1.0, 0, 1.0, 0.1, 1.0),
    (0.9, 0, 1.0, 0.05, 1.0),
    (0.8, 0, 1.0, 0.05, 1.0),
    (0.8, 0, 1.0, 0.1, 1.0),
    (0.7, 0, 1.0, 0.05, 1.0),
    (0.7, 40, 0.9, 0.0, 1.1),
    (0.8, 0, 1.0, 0.05, 1.1),
    (0.7, 0, 1.0, 0.05, 1.1),
    (0.7, 0, 1.0, 0.1, 1.1),
    (0.6, 0, 1.0, 0.05, 1.15),
    (0.5, 0, 1.0, 0.0, 1.0),
    (0.5, 40, 0.9, 0.0, 1.0),
    (0.4, 0, 1.0, 0.0, 1.0),
    (0.9, 40, 0.9, 0.0, 1.0),
    (0.8, 40, 0.95, 0.0, 1.0),
    (0.8, 20, 0.9, 0.0, 1.0),
)


def word_list(workdir: str) -> set[str]:
    words: set[str] = set()
    for name in NOVELS:
        path = os.path.join(workdir, "clean", name + ".txt")
        if not os.path.isfile(path):
            sys.exit(f"{path} is missing: run python tools/austen_corpus.py {workdir} first")
        with open(path, encoding="utf-8") as f:
            words.update(w.lower() for w in WORD.findall(f.read()))
    return words


def measure(texts: list[str], words: set[str]) -> tuple[float, float]:
    """(dictionary share over all words, mean distinct-4-gram ratio over the samples)."""
    known = total = 0
    ratios = []
    for text in texts:
        ws = [w.lower() for w in WORD.findall(text)]
        known += sum(w in words for w in ws)
        total += len(ws)
        grams = [tuple(ws[i:i + 4]) for i in range(len(ws) - 3)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return known / max(total, 1), sum(ratios) / max(len(ratios), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/work/work-data", help="where tools/austen_corpus.py wrote clean/")
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backend", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    words = word_list(args.workdir)
    model = gptevo.load(backend=args.backend)
    off = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    rows = []
    start = time.perf_counter()
    greedy = [gptevo.generate(model, p, max_new_tokens=args.tokens, **{**off, "temperature": 0.0})
              for p in PROMPTS]
    share, distinct = measure(greedy, words)
    rows.append({"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                 "dictionary_share": share, "distinct_4grams": distinct, "note": "greedy"})
    for t, k, p, mp, rp in CANDIDATES:
        kw = dict(temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rp)
        texts = [gptevo.generate(model, prompt, max_new_tokens=args.tokens, seed=s, **kw)
                 for prompt in PROMPTS for s in args.seeds]
        share, distinct = measure(texts, words)
        rows.append({**kw, "dictionary_share": share, "distinct_4grams": distinct})
    rows.sort(key=lambda r: -r["dictionary_share"] * r["distinct_4grams"])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{len(words)} distinct words in the Austen word list; {len(PROMPTS)} prompts x {len(args.seeds)} "
          f"seeds x {args.tokens} tokens per candidate; {time.perf_counter() - start:.0f} s")
    print("temperature top_k top_p min_p rep_penalty | dictionary share | distinct 4-grams | product")
    for r in rows:
        print(f"{r['temperature']:11.2f} {r['top_k']:5d} {r['top_p']:5.2f} {r['min_p']:5.2f} "
              f"{r['repetition_penalty']:11.2f} | {r['dictionary_share']:16.4f} | {r['distinct_4grams']:16.4f} | "
              f"{r['dictionary_share'] * r['distinct_4grams']:.4f} {r.get('note', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
