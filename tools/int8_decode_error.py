"""Error of the int8 weight mode on the decode path, where the numba backend quantizes activations too.

``tools/int8_error.py`` compares whole-sequence forwards (prefill: float activations on several rows).
This tool decodes one token per forward, so the int8-activation kernels run (spec/ops/int8.md,
"Decode path"), and prints three comparisons over the same seeded token ids:

- int8 decode vs stored decode (what a user of ``weights="int8"`` gets while generating);
- int8 prefill (float activations) vs stored decode (the weight rounding alone);
- int8 decode vs int8 prefill (the activation rounding alone).

Columns: max rel = max|a - b| / max|b|, mean rel = mean|a - b| / mean|b|, top-1 = share of positions
with the same argmax. Usage: ``python tools/int8_decode_error.py MODEL_DIR [N_TOKENS] [--backend numba]``.
"""
from __future__ import annotations

import argparse

import numpy as np

import gptevo


def decode_logits(model, ids) -> np.ndarray:
    """Logits [N, V] from N one-token forwards."""
    cache = model.new_cache(len(ids) + 4)
    return np.concatenate([model.forward([int(t)], cache) for t in ids])


def stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    diff = np.abs(a - b)
    return (float(diff.max() / np.abs(b).max()), float(diff.mean() / np.abs(b).mean()),
            float((a.argmax(-1) == b.argmax(-1)).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("tokens", type=int, nargs="?", default=64)
    ap.add_argument("--backend", default="numba")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ids = np.random.default_rng(args.seed).integers(0, 1000, args.tokens)          # [N]
    out = {}
    for mode in ("stored", "int8"):
        model = gptevo.load(args.model, backend=args.backend, weights=mode)
        out[mode] = decode_logits(model, ids)
        if mode == "int8":
            out["int8 prefill"] = model.forward(ids, model.new_cache(len(ids) + 4))
        del model
    rows = {"int8 decode vs stored decode": ("int8", "stored"),
            "int8 prefill (float activations) vs stored decode": ("int8 prefill", "stored"),
            "int8 decode vs int8 prefill (activation rounding alone)": ("int8", "int8 prefill")}
    print("| model | comparison | positions | max rel | mean rel | top-1 |")
    print("|---|---|---|---|---|---|")
    for name, (a, b) in rows.items():
        mx, mean, top1 = stats(out[a], out[b])
        print(f"| {args.model.rstrip('/').split('/')[-1]} | {name} | {len(ids)} | {mx:.2e} | {mean:.2e} | "
              f"{100 * top1:.2f} % |")


if __name__ == "__main__":
    main()
