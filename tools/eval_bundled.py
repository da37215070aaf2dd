"""Held-out perplexity of the bundled Austen model with gptevo's NumPy reference vs a unigram baseline.

The held-out novel (Persuasion, never seen by the tokenizer or the model) is tokenized with the
bundled tokenizer.json and cut into windows of ``--seq`` tokens with stride ``seq - 1``, so every
token after the first is predicted exactly once, each with at most ``seq - 1`` tokens of context.
For each window ``gptevo.load(model).logits(window[:-1])`` gives [seq-1, V] logits; the negative
log-likelihood of ``window[1:]`` is summed in float64.

Baseline: unigram token distribution fit on the five training novels (joined by <|endoftext|>, as
in training) with add-one smoothing over the whole vocabulary, scored on the same predicted tokens.

Both are reported per token (BPE-dependent) and per byte of the predicted text (tokenizer-
independent; Persuasion is ASCII, so bytes = characters), plus bits per byte.

Needs the corpus: ``python tools/austen_corpus.py`` (writes WORKDIR/clean/*.txt).
Usage: ``python tools/eval_bundled.py [--max-windows N] [--torch]`` (``--torch`` also scores the
torch model saved by tools/train_bundled.py's export stage, for comparison).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRAIN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey")
HELDOUT_NOVEL = "persuasion"
EOS = "<|endoftext|>"


def byte_level_decoder() -> dict:
    """The inverse of the byte-level BPE alphabet: printable character -> byte value (GPT-2 scheme:
    printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 onwards in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def token_byte_lengths(tok) -> np.ndarray:
    """Bytes each token stands for (0 for special tokens)."""
    inv = byte_level_decoder()
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    lens = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        lens[i] = 0 if piece in specials else sum(1 for ch in piece if ch in inv)
    return lens


def windows(ids: np.ndarray, T: int) -> list:
    return [ids[s:s + T] for s in range(0, len(ids) - 1, T - 1) if len(ids[s:s + T]) > 1]


def read_novel(workdir: str, name: str) -> str:
    path = os.path.join(workdir, "clean", name + ".txt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} missing: run `python tools/austen_corpus.py {workdir}` first")
    with open(path, encoding="utf-8") as f:
        return f.read()


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def score(logits_fn, wins, label: str) -> float:
    """Sum of NLL (nats) of window[1:] given window[:-1] over all windows."""
    total, t0 = 0.0, time.time()
    for n, w in enumerate(wins):
        lp = log_softmax64(logits_fn(w[:-1]))                                 # [len-1, V]
        total -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        if (n + 1) % 50 == 0:
            print(f"  [{label}] {n + 1}/{len(wins)} windows, {time.time() - t0:.0f}s", flush=True)
    return total


def report(label: str, nll: float, ntok: int, nbytes: int) -> None:
    print(f"{label:28s} ppl/token {math.exp(nll / ntok):9.2f}   ppl/byte {math.exp(nll / nbytes):7.4f}"
          f"   bits/byte {nll / nbytes / math.log(2):6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "gptevo", "data", "austen"))
    ap.add_argument("--workdir", default="/work/work-data")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = the whole novel")
    ap.add_argument("--torch", action="store_true", help="also score the torch model (export.pt)")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    import gptevo

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    V = tok.get_vocab_size()
    eos = tok.token_to_id(EOS)
    train = []
    for name in TRAIN_NOVELS:
        train.extend(tok.encode(read_novel(args.workdir, name)).ids)
        train.append(eos)
    held = np.array(tok.encode(read_novel(args.workdir, HELDOUT_NOVEL)).ids, dtype=np.int64)
    wins = windows(held, args.seq)
    if args.max_windows:
        wins = wins[:args.max_windows]
    targets = np.concatenate([w[1:] for w in wins])
    ntok = int(targets.size)
    nbytes = int(token_byte_lengths(tok)[targets].sum())
    print(f"held-out {HELDOUT_NOVEL}: {len(wins)} windows of <= {args.seq} tokens, {ntok} predicted tokens, "
          f"{nbytes} bytes")

    counts = np.bincount(np.array(train), minlength=V).astype(np.float64) + 1.0   # add-one smoothing
    uni_nll = float(-np.log(counts / counts.sum())[targets].sum())

    model = gptevo.load(args.model)
    ref_nll = score(lambda ids: model.logits([int(i) for i in ids]), wins, "gptevo")

    torch_nll = None
    if args.torch:
        import torch

        import train_bundled as tb

        torch.set_num_threads(2)
        ck = torch.load(os.path.join(args.workdir, "bundled", "export.pt"), weights_only=False)
        tm = tb.GptOss(ck["cfg"])
        tm.load_state_dict(ck["model"])
        tb.quantize_experts(tm)
        tm.eval()
        with torch.no_grad():
            torch_nll = score(lambda ids: tm(torch.from_numpy(np.asarray(ids))[None])[0].numpy(), wins, "torch")

    report("gptevo reference (MXFP4)", ref_nll, ntok, nbytes)
    if torch_nll is not None:
        report("torch model (MXFP4)", torch_nll, ntok, nbytes)
    report("unigram, add-one", uni_nll, ntok, nbytes)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    main()
