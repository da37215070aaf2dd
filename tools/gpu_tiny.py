"""Tiny peer models on the cupy backend against the NumPy reference, on a real GPU (model level).

    python tools/gpu_tiny.py [--json FILE]

The four tiny checkpoints of tests/_builders/tiny_models.py (Llama with a sliding window, Qwen3 bf16
with q/k norm, gpt-oss with MXFP4 experts, sinks and a sliding window, GPT-2) are written to a
temporary folder and loaded on ``cupy`` and on ``reference``. Per model: full-sequence logits,
prefill + decode logits past the window (normalized error <= 1e-4), the host transfers of a decode
step counted by the runtime (expected: 1 upload, the token id; 0 downloads), and ``generate``
(greedy, and seeded temperature + top-k + top-p) giving the same tokens. Then every registry case of
the kernel ops is run with its activations as device arrays against the reference. One JSON row
per check on stdout (``{"check", "ok", "detail"}``) and a summary line; exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import gptevo
    from _builders import tiny_models as tiny
    from gptevo.backends import get
    from gptevo.backends.cupy import runtime
    from gptevo.backends.cupy._ops import KERNEL_OPS
    from gptevo.checkpoint import Checkpoint
    from gptevo.conformance.compare import compare
    from gptevo.conformance.runner import iter_cases, tolerance_for
    from gptevo.model import Model, backend_arrays

    backend = get("cupy")
    rt = runtime()
    arrays = backend_arrays(backend)
    rows = []

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # noqa: BLE001 - reported
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        rows.append({"check": name, "ok": bool(ok), "detail": detail, "seconds": round(time.perf_counter() - t0, 2)})
        print(json.dumps(rows[-1]), flush=True)

    prompt = [3, 17, 42, 5, 9]
    with tempfile.TemporaryDirectory() as tmp:
        for name in tiny.CASES:
            config, _, ref = tiny.build_case(name, tmp)
            dev = Model.from_checkpoint(config, Checkpoint(ref.path), backend=backend, path=ref.path)

            def logits():
                err = tiny.normalized_error(dev.logits(tiny.IDS), ref.logits(tiny.IDS))
                return err < 1e-4, f"normalized error {err:.2e}"

            def decode():
                cache, rcache = dev.new_cache(24), ref.new_cache(24)
                errs = [tiny.normalized_error(dev.forward(prompt, cache), ref.forward(prompt, rcache))]
                crossings = []
                for tok in (7, 11, 2, 30, 8, 1, 9, 4):
                    u0, d0 = rt.uploads, rt.downloads
                    out = dev.forward_on_backend([tok], cache)
                    crossings.append((rt.uploads - u0, rt.downloads - d0))
                    errs.append(tiny.normalized_error(arrays.to_host(out), ref.forward([tok], rcache)))
                bad = [c for c in crossings[1:] if c != (1, 0)]
                err = max(errs)
                return err < 1e-4 and not bad, (f"max normalized error {err:.2e} over prefill + 8 steps; "
                                                f"(uploads, downloads) per step {crossings}")

            def decode_graph():
                cache, rcache = dev.new_cache(24), ref.new_cache(24)
                dev.forward_on_backend(prompt, cache)
                ref.forward(prompt, rcache)
                runner = arrays.decode_runner(dev, cache)
                errs = []
                for tok in (7, 11, 2, 30, 8, 1, 9, 4):
                    errs.append(tiny.normalized_error(arrays.to_host(runner(tok)), ref.forward([tok], rcache)))
                err = max(errs)
                ok = err < 1e-4 and runner.failed is None and runner.replays >= 7
                return ok, (f"max normalized error {err:.2e} over 8 steps; {runner.replays} graph replays"
                            + (f"; capture failed: {runner.failed}" if runner.failed else ""))

            def generate():
                for kw in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 9, "top_p": 0.8, "seed": 2}):
                    got = gptevo.generate(dev, prompt, max_new_tokens=8, **kw)
                    want = gptevo.generate(ref, prompt, max_new_tokens=8, **kw)
                    if got != want:
                        return False, f"{kw}: cupy {got} vs reference {want}"
                return True, "same tokens (greedy; temperature 0.9, top_k 9, top_p 0.8, seed 2)"

            def prefill_gemm():
                rt.gemm_min_rows = 2                     # force the cuBLAS prefill path on these short inputs
                try:
                    return logits()
                finally:
                    rt.gemm_min_rows = saved

            saved = rt.gemm_min_rows
            check(f"{name}: logits", logits)
            check(f"{name}: logits, prefill GEMM path", prefill_gemm)
            check(f"{name}: decode", decode)
            check(f"{name}: decode, CUDA graph", decode_graph)
            check(f"{name}: generate", generate)

    weight_names = {"weight", "table", "bias", "w_fc", "b_fc", "w_proj", "b_proj", "w_gate", "w_up", "w_down",
                    "b_gate", "b_up", "b_down", "w_gate_up", "b_gate_up", "sinks", "alibi_slopes", "inv_freq",
                    "blocks", "scales"}
    failed = []
    n = 0
    for spec, c in iter_cases(seed=0):
        if spec.name not in KERNEL_OPS or spec.name == "mxfp4_decode":
            continue
        n += 1
        try:
            kwargs = {k: (arrays.asarray(v) if isinstance(v, np.ndarray) and k not in weight_names
                          and v.dtype.kind in "fiu" and v.dtype.itemsize >= 4 else v) for k, v in c.kwargs.items()}
            got = backend.ops[spec.name](**kwargs)
            got = tuple(arrays.to_host(g) for g in got) if isinstance(got, tuple) else arrays.to_host(got)
            mismatch = compare(got, spec.reference(**c.kwargs), tolerance_for(spec, c), spec.exact)
            if mismatch is not None:
                failed.append(f"{spec.name}({c.label}): {mismatch}")
        except Exception as exc:  # noqa: BLE001
            failed.append(f"{spec.name}({c.label}): {type(exc).__name__}: {exc}")
    rows.append({"check": "ops with device inputs", "ok": not failed,
                 "detail": f"{n - len(failed)}/{n} cases match" + (f"; {failed[:3]}" if failed else "")})
    print(json.dumps(rows[-1]), flush=True)
    ok = sum(r["ok"] for r in rows)
    print(f"summary: {ok}/{len(rows)} checks passed")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
