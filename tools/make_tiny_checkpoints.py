"""Write the tiny peer-test checkpoints into a directory, for manual use.

    python tools/make_tiny_checkpoints.py OUTDIR [NAME ...] [--list] [--logits]

Each fixture goes to OUTDIR/NAME (config.json + safetensors, the real on-disk layout of its family);
``--logits`` also saves the peer's float32 logits and the token ids as OUTDIR/NAME/peer_logits.npz
(``ids``, ``logits``). The builders live in tests/_builders/peer_fixtures.py (one implementation shared with
the peer tests). Needs torch and transformers; the ``gpt_oss_original`` fixture also needs the official
code: ``pip install --no-deps --ignore-requires-python gpt-oss==0.0.9``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from _builders import peer_fixtures  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?", type=Path, help="directory to write the fixtures into")
    ap.add_argument("names", nargs="*", help=f"fixtures to write (default: all): {', '.join(peer_fixtures.FIXTURES)}")
    ap.add_argument("--list", action="store_true", help="list the fixtures and exit")
    ap.add_argument("--logits", action="store_true", help="also save the peer's logits as peer_logits.npz")
    args = ap.parse_args(argv)

    if args.list:
        for spec in peer_fixtures.FIXTURES.values():
            print(f"{spec.name:22s} {spec.family:10s} T={spec.seq_len:<3d} {spec.description}")
        return 0
    if args.outdir is None:
        ap.error("OUTDIR is required (or use --list)")
    unknown = [n for n in args.names if n not in peer_fixtures.FIXTURES]
    if unknown:
        ap.error(f"unknown fixture(s) {unknown}; choose from {list(peer_fixtures.FIXTURES)}")

    failed = 0
    for name in args.names or list(peer_fixtures.FIXTURES):
        spec = peer_fixtures.FIXTURES[name]
        missing = [m for m in spec.needs if not peer_fixtures.have(m)]
        if missing:
            print(f"skip {name}: {', '.join(missing)} not installed", file=sys.stderr)
            failed += 1
            continue
        built = peer_fixtures.build_fixture(name, args.outdir / name)
        if args.logits:
            import numpy as np
            np.savez(built.path / "peer_logits.npz", ids=np.array(built.ids, dtype=np.int64),
                     logits=built.peer.logits(built.ids))
        print(f"{name:22s} -> {built.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
