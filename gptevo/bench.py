"""``gptevo bench MODEL_DIR``: decode and prefill speed against the machine's memory roofline.

One run measures, in this order:

1. decode: greedy, batch 1, one token per ``model.forward`` call on a KV cache, after ``--warmup``
   tokens (the first call compiles numba kernels); tok/s = tokens / seconds;
2. prefill: one ``model.forward(ids, cache, logits="last")`` of ``--prompt-tokens`` random ids on an
   empty cache, after an 8-token warm-up (the output head runs on the last position only, as in
   llama.cpp's prompt processing); tok/s = prompt tokens / seconds (0 skips it);
   1 and 2 (and 3b) run ``--repeats`` times (default 3, on fresh caches), reported as the mean and
   sample standard deviation of the per-repetition tok/s, as llama-bench reports its ``-r`` runs;
3. peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after 1 and 2 (before anything else
   allocates);
3b. prefill sweep: the same prefill measurement at each of ``--prefill-sizes`` (default 128, 512, 2048;
   capped at the context; a size equal to ``--prompt-tokens`` reuses that measurement);
3c. aggregate batched decode at each of ``--batch-sizes`` (default 1, 4, 16) through
   :class:`gptevo.batching.BatchDecoder`: B greedy requests with one-token prompts are admitted
   (prefill, untimed), ``--warmup`` batched steps run, then ``--batch-steps`` (default 16) steps are
   timed; tok/s = B x steps / seconds (every step decodes one token of each of the B sequences);
4. weight bytes read per decoded token, counted from the loaded weights (:func:`weight_bytes_per_token`);
5. memory read bandwidth, measured now: NumPy dot products streaming a buffer of ``--bandwidth-mib``
   (default 1 GiB, far above the last-level cache) in 4 MiB chunks on ``threads`` Python threads, best
   of 3 passes (:func:`memory_bandwidth`);
6. roofline fraction = bytes/token x tok/s / bandwidth;
7. with ``--llama-bench PATH --gguf FILE``: ``PATH -m FILE -p 0 -n N -t T -r R -o json`` and
   ``-p P -n 0``, plus ``--llama-args`` (see gptevo.bench_llama), the bytes per token of the GGUF, and
   llama-bench's peak RSS (``RUSAGE_CHILDREN``); both engines side by side in one table;
7b. with ``--interleave`` as well: step 1 runs in pairs instead, one repetition of ours then
   ``llama-bench -r 1``, ``--repeats`` times, and the table adds each pair's ratio (median and
   range): the machine's bandwidth drifts, and pairs a few seconds apart compare like with like
   (:func:`paired_decode`; the model stays loaded, so the GGUF must fit in the available memory).

``--threads N`` sets NUMBA_NUM_THREADS / OMP / OpenBLAS / MKL thread counts in the environment before
the backend is imported, ``numba.set_num_threads(N)`` after, and OpenBLAS's thread count through its C
entry point when NumPy's OpenBLAS is already loaded. ``--weights`` is passed to ``gptevo.load`` as
``weights=`` only when given. Results: a table on stdout, or one JSON object with ``--json``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import shlex
import sys
import threading
import time

import numpy as np

from gptevo.errors import RequestError

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
_BLAS_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_",
                 "scipy_openblas_set_num_threads")


# -- threads ---------------------------------------------------------------------------------------
def _loaded_blas_libraries() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def set_blas_threads(n: int) -> bool:
    """Set the thread count of every loaded OpenBLAS; True when one accepted it."""
    done = False
    for path in _loaded_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for fn in _BLAS_SETTERS:
            setter = getattr(lib, fn, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                done = True
    return done


def set_threads(n: int | None, env=None) -> dict:
    """Apply ``--threads`` before loading (see the module doc); returns what was set."""
    env = os.environ if env is None else env
    if n is None:
        return {"threads": os.cpu_count() or 1, "set": False}
    if n < 1:
        raise RequestError(f"--threads must be at least 1, got {n}")
    for var in _THREAD_VARS:
        if var == "NUMBA_NUM_THREADS" and "numba" in sys.modules:
            continue                       # numba read it at import; set_num_threads below instead
        env[var] = str(n)
    return {"threads": n, "set": True, "blas": set_blas_threads(n)}


def set_numba_threads(n: int) -> int | None:
    """``numba.set_num_threads`` when numba is loaded (capped at its pool size); the count in use."""
    numba = sys.modules.get("numba")
    if numba is None:
        return None
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    return numba.get_num_threads()


# -- measurements ----------------------------------------------------------------------------------
def memory_bandwidth(nbytes: int = 1 << 30, threads: int = 2, repeats: int = 3, chunk: int = 1 << 22) -> float:
    """Bytes read per second streaming an ``nbytes`` float32 buffer (``np.dot(c, c)`` per chunk of
    ``chunk`` bytes, chunks split over ``threads`` threads), best of ``repeats`` passes."""
    buf = np.ones(max(nbytes // 4, 1), dtype=np.float32)                    # [N]; ones: real pages
    step = max(chunk // 4, 1)
    starts = list(range(0, buf.size, step))
    parts = [starts[i::threads] for i in range(threads)]
    sink = [0.0] * threads

    def work(i):
        acc = 0.0
        for s in parts[i]:
            c = buf[s:s + step]                                             # [step]
            acc += float(np.dot(c, c))
        sink[i] = acc

    best = float("inf")
    for _ in range(repeats):
        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best


def _nbytes(a) -> int:
    return int(getattr(a, "nbytes", 0) or 0)


def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    bounds = getattr(np.lib, "array_utils", np).byte_bounds
    return bounds(a)


def _pieces(a) -> list[np.ndarray] | None:
    """The arrays holding ``a``'s bytes (itself; an Mxfp4Weight's blocks and scales; an int8 weight's
    values and scales), or None when they do not add up to ``a.nbytes``."""
    if isinstance(a, np.ndarray):
        return [a]
    arrays = [v for v in (getattr(a, n, None) for n in ("blocks", "scales", "values", "scale"))
              if isinstance(v, np.ndarray)]
    return arrays if arrays and sum(x.nbytes for x in arrays) == _nbytes(a) else None


class _ByteSet:
    """Bytes of a set of arrays, each memory range counted once (views of a fused weight, a tied head)."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []
        self.others: dict[int, int] = {}

    def add(self, a) -> None:
        pieces = _pieces(a)
        if pieces is None:
            self.others[id(a)] = _nbytes(a)
            return
        for p in pieces:
            if p.size:
                self.ranges.append(_byte_bounds(p))

    def total(self) -> int:
        n, end = 0, -1
        for lo, hi in sorted(self.ranges):
            if hi > end:
                n += hi - max(lo, end)
                end = hi
        return n + sum(self.others.values())


def weight_bytes_per_token(model) -> int:
    """Weight bytes one decoded token reads: every tensor once (a memory range shared by several
    tensors, such as q/k/v views of a fused qkv weight, once), except the token and position tables
    (one row each; a tied head reads the whole table again as the output matrix) and the expert
    tensors (``experts_*``: k of E experts, k/E of their bytes)."""
    w, c = model.weights, model.config
    dense, experts = _ByteSet(), _ByteSet()
    total = 0
    for table in (w.embed, w.pos_embed):
        if table is not None:
            total += _nbytes(table) // max(int(table.shape[0]), 1)
    for a in (w.lm_head, w.final_norm, w.final_norm_bias):
        if a is not None:
            dense.add(a)
    E, k = int(c.num_experts or 0), int(c.experts_per_token or 0)
    for layer in w.layers:
        for name, a in vars(layer).items():
            if a is not None:
                (experts if name.startswith("experts_") and E else dense).add(a)
    return total + dense.total() + (experts.total() * k // E if E else 0)


def weight_dtypes(model) -> str:
    """The stored dtypes of the weights, e.g. "float32" or "bfloat16 + mxfp4" (biases left out: a
    backend may widen them at load, as numba does with 16-bit expert biases)."""
    names = set()
    arrays = [model.weights.embed, model.weights.lm_head] + [a for L in model.weights.layers
                                                             for n, a in vars(L).items() if "bias" not in n]
    for a in arrays:
        if a is not None:
            names.add(str(getattr(a, "dtype", type(a).__name__)))
    return " + ".join(sorted(names))


def peak_rss(who=resource.RUSAGE_SELF) -> int:
    """Peak resident set size in bytes (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(who).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _summary(samples: list[float], **extra) -> dict:
    """Mean and sample standard deviation of per-repetition tok/s, as llama-bench reports them
    (``avg_ts`` / ``stddev_ts``); ``samples`` keeps every repetition."""
    mean = float(np.mean(samples))
    sd = float(np.std(samples, ddof=1)) if len(samples) > 1 else 0.0
    return {**extra, "tok_s": mean, "stddev": sd, "samples": [float(v) for v in samples]}


def measure_decode(model, tokens: int, warmup: int = 3, seed: int = 0, repeats: int = 1) -> dict:
    """Greedy batch-1 decode, ``repeats`` times: ``warmup`` + ``tokens`` single-token forwards on a
    fresh KV cache each time; tok/s is the mean over repetitions (``warmup_s``: the first one's
    warm-up, which includes compilation)."""
    rng = np.random.default_rng(seed)
    rates, seconds, warmup_s = [], 0.0, None
    for _ in range(repeats):
        cache = model.new_cache(warmup + tokens)
        tok = int(rng.integers(0, model.config.vocab_size))
        t0 = time.perf_counter()
        for _ in range(warmup):
            tok = int(np.argmax(model.forward([tok], cache)[-1]))
        t1 = time.perf_counter()
        for _ in range(tokens):
            tok = int(np.argmax(model.forward([tok], cache)[-1]))          # logits [1, V]
        dt = time.perf_counter() - t1
        warmup_s = t1 - t0 if warmup_s is None else warmup_s
        rates.append(tokens / dt)
        seconds += dt
    return _summary(rates, tokens=tokens, seconds=seconds, warmup_s=warmup_s, repeats=repeats)


def measure_prefill(model, tokens: int, seed: int = 0, repeats: int = 1) -> dict | None:
    """``repeats`` forwards of ``tokens`` random ids, each on an empty cache (after an 8-token
    warm-up); tok/s is the mean over repetitions."""
    if tokens <= 0:
        return None
    rng = np.random.default_rng(seed + 1)
    V = model.config.vocab_size
    model.forward(rng.integers(0, V, min(8, tokens)).tolist(), model.new_cache(min(8, tokens)), logits="last")
    rates, seconds = [], 0.0
    for _ in range(repeats):
        ids = rng.integers(0, V, tokens).tolist()                          # [P]
        cache = model.new_cache(tokens)
        t0 = time.perf_counter()
        model.forward(ids, cache, logits="last")
        dt = time.perf_counter() - t0
        rates.append(tokens / dt)
        seconds += dt
    return _summary(rates, tokens=tokens, seconds=seconds, repeats=repeats)


def measure_batch_decode(model, batch: int, steps: int, warmup: int = 3, seed: int = 0) -> dict:
    """Aggregate greedy decode of ``batch`` sequences through BatchDecoder (module doc, 3c)."""
    from gptevo.batching import BatchDecoder
    from gptevo.generation import check_sampling

    rng = np.random.default_rng(seed + 2)
    decoder = BatchDecoder(model, max_batch=batch)
    greedy = check_sampling(0.0)
    rids = [decoder.submit([tok], max_new_tokens=warmup + steps + 1, sampling=greedy, ignore_eos=True)
            for tok in rng.integers(0, model.config.vocab_size, batch).tolist()]
    decoder.step()                                                  # admits and prefills all of them
    for _ in range(warmup):
        decoder.step()
    t0 = time.perf_counter()
    produced = 0
    for _ in range(steps):
        produced += len(decoder.step())                             # one token per running sequence
    dt = time.perf_counter() - t0
    for rid in rids:
        decoder.cancel(rid)
    return {"batch": batch, "steps": steps, "tokens": produced, "seconds": dt, "tok_s": produced / dt}


def parse_sizes(text, flag: str) -> list[int]:
    """``"1,4,16"`` -> [1, 4, 16]; "" or "0" -> [] (skip); RequestError naming ``flag`` otherwise."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        text = str(text).strip()
        if text in ("", "0"):
            return []
        try:
            items = [int(x) for x in text.split(",")]
        except ValueError:
            raise RequestError(f"{flag} must be a comma-separated list of positive integers, got {text!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in items):
        raise RequestError(f"{flag} must be a comma-separated list of positive integers, got {text!r}")
    return list(dict.fromkeys(items))


# -- the run ---------------------------------------------------------------------------------------
def run(path: str, *, backend=None, weights=None, threads=None, tokens=64, prompt_tokens=512, warmup=3,
        bandwidth_mib=1024, llama_bench=None, gguf=None, llama_repeats=None, llama_args=(), env=None,
        log=None, prefill_sizes=(128, 512, 2048), batch_sizes=(1, 4, 16), batch_steps=16, repeats=3,
        interleave=False) -> dict:
    """Measure everything (see the module doc); returns the result dict that ``--json`` prints."""
    import gptevo
    from gptevo import bench_llama

    if (llama_bench is None) != (gguf is None):
        raise RequestError("--llama-bench PATH and --gguf FILE go together")
    if llama_bench is not None:
        bench_llama.check_paths(llama_bench, gguf)
    if interleave and llama_bench is None:
        raise RequestError("--interleave needs --llama-bench PATH and --gguf FILE")
    if tokens < 1 or prompt_tokens < 0 or warmup < 0:
        raise RequestError(f"--tokens must be >= 1 and --prompt-tokens, --warmup >= 0 "
                           f"(got {tokens}, {prompt_tokens}, {warmup})")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise RequestError(f"--repeats must be an integer >= 1, got {repeats!r}")
    prefill_sizes = parse_sizes(prefill_sizes, "--prefill-sizes")
    batch_sizes = parse_sizes(batch_sizes, "--batch-sizes")
    if isinstance(batch_steps, bool) or not isinstance(batch_steps, int) or batch_steps < 1:
        raise RequestError(f"--batch-steps must be an integer >= 1, got {batch_steps!r}")
    log = log or (lambda msg: None)
    th = set_threads(threads, env)
    n_threads = th["threads"]
    kwargs = {"weights": weights} if weights is not None else {}
    log(f"loading {path} ...")
    t0 = time.perf_counter()
    model = gptevo.load(path, backend=backend, **kwargs)
    load_s = time.perf_counter() - t0
    numba_threads = set_numba_threads(n_threads) if th["set"] else None
    ctx = model.config.context_length
    if warmup + tokens > ctx:
        raise RequestError(f"--warmup + --tokens = {warmup + tokens} exceeds the model's context of {ctx}")
    prompt_tokens = min(prompt_tokens, ctx)
    paired = None
    if interleave:
        _check_room_for_both(gguf)
        dec, paired = paired_decode(model, llama_bench, gguf, tokens, warmup, repeats, n_threads,
                                    tuple(llama_args), log)
    else:
        log(f"decode: {repeats} x ({warmup} warm-up + {tokens} tokens) ...")
        dec = measure_decode(model, tokens, warmup, repeats=repeats)
    log(f"prefill: {repeats} x {prompt_tokens} tokens ...")
    pre = measure_prefill(model, prompt_tokens, repeats=repeats)
    rss = peak_rss()
    sweep = []
    for size in dict.fromkeys(min(n, ctx) for n in prefill_sizes):
        if pre is not None and size == pre["tokens"]:
            sweep.append(pre)
            continue
        log(f"prefill: {repeats} x {size} tokens ...")
        sweep.append(measure_prefill(model, size, repeats=repeats))
    batched = []
    for size in batch_sizes:
        if 1 + warmup + batch_steps > ctx:
            raise RequestError(f"1 + --warmup + --batch-steps = {1 + warmup + batch_steps} exceeds the "
                               f"model's context of {ctx}")
        log(f"batched decode: batch {size}, {warmup} warm-up + {batch_steps} steps ...")
        batched.append(measure_batch_decode(model, size, batch_steps, warmup))
    bpt = weight_bytes_per_token(model)
    log(f"memory bandwidth: {bandwidth_mib} MiB, {n_threads} threads ...")
    bw = memory_bandwidth(bandwidth_mib << 20, threads=n_threads)
    c = model.config
    result = {
        "model": os.fspath(path), "family": c.family, "layers": c.num_layers, "vocab_size": c.vocab_size,
        "backend": getattr(model.backend, "name", str(model.backend)), "weights": weights or "stored",
        "weight_dtypes": weight_dtypes(model), "threads": n_threads, "numba_threads": numba_threads,
        "load_s": load_s, "decode": dec, "prefill": pre, "prefill_sweep": sweep, "batch_decode": batched,
        "peak_rss_bytes": rss,
        "weight_bytes_per_token": bpt, "bandwidth_bytes_s": bw,
        "bandwidth_probe": f"NumPy dot, {bandwidth_mib} MiB, {n_threads} threads, best of 3",
        "roofline_fraction": bpt * dec["tok_s"] / bw, "llama": None, "paired_decode": paired,
    }
    del model                                   # unmap the weights before llama-bench maps its own
    gc.collect()
    if llama_bench is not None:
        result["llama"] = run_llama(llama_bench, gguf, tokens, prompt_tokens, n_threads,
                                    repeats if llama_repeats is None else llama_repeats, bw, log, tuple(llama_args),
                                    decode=paired["llama"] if paired else None)
    return result


def _check_room_for_both(gguf: str) -> None:
    """RequestError unless the GGUF file fits in the memory now available (``--interleave`` keeps our
    model loaded while llama-bench maps its own copy; without room both would page from disk)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return                                          # not Linux: nothing to check against
    need = os.path.getsize(gguf)
    if need > 0.9 * avail:
        raise RequestError(f"--interleave keeps this model loaded while llama-bench maps {gguf} "
                           f"({need / 1e9:.1f} GB), but only {avail / 1e9:.1f} GB of memory is available; "
                           f"run without --interleave (one side after the other)")


def paired_decode(model, binary, gguf, tokens, warmup, repeats, threads, extra, log) -> tuple[dict, dict]:
    """Decode measured in pairs: ours (one repetition), then ``llama-bench -r 1``, ``repeats`` times.

    The machine's memory bandwidth drifts from minute to minute, which moves both engines (a
    memory-bound decode follows it); measured one after the other, a drift between the two
    halves shows up as a difference between engines. Each pair's ratio compares like with like.
    Returns (our decode summary, ``{"llama": llama's summary, "ratios": [ours / theirs per pair],
    "median_ratio"}``); a failing llama-bench ends the pairs with its error as llama's result."""
    from gptevo import bench_llama

    ours, theirs, first, meta = [], [], None, None
    for i in range(repeats):
        log(f"pair {i + 1}/{repeats}: decode {warmup} warm-up + {tokens} tokens, then llama-bench ...")
        d = measure_decode(model, tokens, warmup, seed=i)
        first = first or d
        ours.append(d["tok_s"])
        s = bench_llama.summarize(bench_llama.run_llama_bench(binary, gguf, n_prompt=0, n_gen=tokens,
                                                              threads=threads, repeats=1, extra=extra))
        if "error" in s:
            meta = s
            break
        meta = s
        theirs.append(s["tok_s"])
    dec = _summary(ours, tokens=tokens, seconds=sum(tokens / r for r in ours), warmup_s=first["warmup_s"],
                   repeats=len(ours))
    if "error" in meta:
        return dec, {"llama": meta, "ratios": [], "median_ratio": None}
    ratios = [a / b for a, b in zip(ours, theirs)]
    llama = {**meta, **_summary(theirs)}
    return dec, {"llama": llama, "ratios": ratios, "median_ratio": float(np.median(ratios))}


def run_llama(binary, gguf, tokens, prompt_tokens, threads, repeats, bw, log, extra=(), decode=None) -> dict:
    """llama-bench's decode (unless ``decode`` was measured already, in pairs) and prefill, its peak
    RSS, and the GGUF's bytes per token."""
    from gptevo import bench_llama

    dec = decode
    if dec is None:
        log(f"llama-bench: decode {tokens} tokens ...")
        dec = bench_llama.summarize(bench_llama.run_llama_bench(binary, gguf, n_prompt=0, n_gen=tokens,
                                                                threads=threads, repeats=repeats, extra=extra))
    pre = None
    if prompt_tokens > 0:
        log(f"llama-bench: prefill {prompt_tokens} tokens ...")
        pre = bench_llama.summarize(bench_llama.run_llama_bench(binary, gguf, n_prompt=prompt_tokens, n_gen=0,
                                                                threads=threads, repeats=repeats, extra=extra))
    # A child's peak RSS starts at its parent's RSS when forked: with paired decode our model was
    # loaded at those forks, so llama-bench's own peak cannot be told apart (reported as unknown).
    out = {"binary": binary, "gguf": gguf, "args": list(extra), "decode": dec, "prefill": pre,
           "peak_rss_bytes": None if decode is not None else peak_rss(resource.RUSAGE_CHILDREN)}
    try:
        out.update(bench_llama.gguf_bytes_per_token(gguf))
    except Exception as exc:                       # a header we cannot read only loses the roofline
        out["gguf_error"] = f"{type(exc).__name__}: {exc}"
    if "bytes_per_token" in out and "tok_s" in dec:
        out["roofline_fraction"] = out["bytes_per_token"] * dec["tok_s"] / bw
    return out


# -- output ----------------------------------------------------------------------------------------
def _gb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _rate(d) -> str:
    if d is None:
        return "-"
    if "error" in d:
        return "error"
    sd = f" ± {d['stddev']:.1f}" if d.get("stddev") else ""
    return f"{d['tok_s']:.1f}{sd}"


def format_table(r: dict) -> str:
    """The human-readable report: a header, then gptevo and llama.cpp side by side."""
    lines = [f"gptevo bench {r['model']}",
             f"  {r['family']}, {r['layers']} layers, vocab {r['vocab_size']}, weights {r['weight_dtypes']} "
             f"({r['weights']}); backend {r['backend']}, {r['threads']} threads"
             + (f" (numba {r['numba_threads']})" if r.get("numba_threads") else ""),
             f"  memory read bandwidth {r['bandwidth_bytes_s'] / 1e9:.1f} GB/s ({r['bandwidth_probe']})", ""]
    L = r.get("llama")
    head = ["", f"gptevo ({r['backend']})"]
    if L:
        commit = (L["decode"] or {}).get("build_commit") or ""
        head.append(f"llama.cpp {commit} ({os.path.basename(L['gguf'])})".replace("  ", " "))
    P = r["prefill"]["tokens"] if r["prefill"] else 0
    rows = [[f"decode tok/s (tg{r['decode']['tokens']})", _rate(r["decode"])],
            [f"prefill tok/s (pp{P})", _rate(r["prefill"])],
            ["peak RSS", _gb(r["peak_rss_bytes"])],
            ["weight bytes / token", _gb(r["weight_bytes_per_token"])],
            ["roofline (decode)", f"{100 * r['roofline_fraction']:.0f}%"]]
    for d in r.get("prefill_sweep") or []:
        rows.append([f"prefill tok/s (pp{d['tokens']})", _rate(d)])
    for d in r.get("batch_decode") or []:
        rows.append([f"decode tok/s, batch {d['batch']} (aggregate)", _rate(d)])
    if L:
        lrf = L.get("roofline_fraction")
        extra = [_rate(L["decode"]), _rate(L["prefill"]), _gb(L.get("peak_rss_bytes")),
                 _gb(L.get("bytes_per_token")), "-" if lrf is None else f"{100 * lrf:.0f}%"]
        for row, v in zip(rows, extra + ["-"] * (len(rows) - len(extra))):
            row.append(v)
    pr = r.get("paired_decode")
    if pr and pr.get("ratios"):
        rt = pr["ratios"]
        rows.append([f"decode, ours / llama.cpp in {len(rt)} pairs", f"median {pr['median_ratio']:.2f} "
                     f"(range {min(rt):.2f}-{max(rt):.2f})"] + (["-"] if L else []))
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
    for row in [head] + rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if L:
        for what in ("decode", "prefill"):
            if L[what] and "error" in L[what]:
                lines.append(f"  llama-bench {what} failed: {L[what]['error']}")
        if "gguf_error" in L:
            lines.append(f"  GGUF header: {L['gguf_error']}")
    lines.append(f"  (decode after {r['decode']['warmup_s']:.1f} s of warm-up incl. compilation; "
                 f"load {r['load_s']:.1f} s)")
    return "\n".join(lines) + "\n"


# -- command line ----------------------------------------------------------------------------------
def add_subparser(sub, env) -> None:
    """Add ``bench`` to the ``gptevo`` subcommands."""
    b = sub.add_parser("bench", help="decode/prefill tok/s, peak RSS and memory roofline (optionally vs llama.cpp)")
    b.add_argument("model_dir", help="model directory")
    b.add_argument("--backend", default=env.get("GPTEVO_BACKEND") or None,
                   help="reference, numba, ... (default: $GPTEVO_BACKEND, else numba when installed, else reference)")
    b.add_argument("--weights", default=None, help="weight mode passed to gptevo.load (e.g. int8)")
    b.add_argument("--threads", type=int, default=None, help="threads for numba, BLAS and llama-bench")
    b.add_argument("--tokens", type=int, default=64, help="decoded tokens timed (default 64)")
    b.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (default 512; 0 skips)")
    b.add_argument("--warmup", type=int, default=3, help="decode warm-up tokens (default 3)")
    b.add_argument("--repeats", type=int, default=3,
                   help="repetitions of each decode and prefill measurement, ours and llama-bench's -r "
                        "(default 3); tables show mean ± standard deviation")
    b.add_argument("--prefill-sizes", default="128,512,2048", metavar="LIST",
                   help="prefill lengths measured one after another (default 128,512,2048; 0 skips)")
    b.add_argument("--batch-sizes", default="1,4,16", metavar="LIST",
                   help="batched decode: sequences decoded together, aggregate tok/s (default 1,4,16; 0 skips)")
    b.add_argument("--batch-steps", type=int, default=16,
                   help="batched decode steps timed per batch size (default 16)")
    b.add_argument("--bandwidth-mib", type=int, default=1024, help="bandwidth probe buffer (default 1024 MiB)")
    b.add_argument("--llama-bench", default=None, metavar="PATH", help="llama.cpp's llama-bench binary")
    b.add_argument("--gguf", default=None, metavar="FILE", help="the same model as GGUF, for --llama-bench")
    b.add_argument("--llama-args", default="", metavar="ARGS",
                   help="extra llama-bench arguments for both runs, e.g. '--repack 0'")
    b.add_argument("--interleave", action="store_true",
                   help="with --llama-bench: measure decode in pairs, ours then llama-bench -r 1, --repeats "
                        "times, and report each pair's ratio (the model stays loaded meanwhile: both must fit "
                        "in memory)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args, env, stdin, out, err) -> int:
    show = hasattr(err, "isatty") and err.isatty()

    def log(msg):
        if show:
            err.write(msg + "\n")
            err.flush()

    r = run(args.model_dir, backend=args.backend, weights=args.weights, threads=args.threads,
            tokens=args.tokens, prompt_tokens=args.prompt_tokens, warmup=args.warmup,
            bandwidth_mib=args.bandwidth_mib, llama_bench=args.llama_bench, gguf=args.gguf,
            llama_args=shlex.split(args.llama_args), env=env, log=log, prefill_sizes=args.prefill_sizes,
            batch_sizes=args.batch_sizes, batch_steps=args.batch_steps, repeats=args.repeats,
            interleave=args.interleave)
    out.write(json.dumps(r, indent=2) + "\n" if args.json else format_table(r))
    return 0
