"""python -m gptevo.conformance -b NAME: check a backend op by op against the reference."""
from __future__ import annotations

import argparse
import sys

from gptevo.conformance.runner import run_backend
from gptevo.errors import GptevoError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptevo.conformance", description=__doc__)
    parser.add_argument("-b", "--backend", default="reference", help="backend name (default: reference)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        results = run_backend(args.backend, seed=args.seed)
    except GptevoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in results if r.mismatch is not None]
    skipped = [r for r in results if r.skipped]
    for r in failed:
        print(f"FAIL {r.test_id}: {r.mismatch}")
    for r in skipped:
        print(f"SKIP {r.test_id}: {r.skipped}")
    passed = len(results) - len(failed) - len(skipped)
    print(f"{passed} passed, {len(failed)} failed, {len(skipped)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
