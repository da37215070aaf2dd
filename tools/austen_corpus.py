"""Build the Jane Austen corpus for the bundled model (standard library only).

Steps:
1. fetch the Debian package ``r-cran-janeaustenr`` (``apt-get download``) and unpack it
   (``dpkg-deb -x``) into the work dir;
2. read the R lazy-load database in ``janeaustenr/data/``: ``Rdata.rdx`` is a gzip-compressed RDS
   file holding ``list(variables=<name -> c(offset, length)>, references=..., compressed=...)``;
   each object in ``Rdata.rdb`` is ``[u32 big-endian uncompressed length][compressed bytes]``
   (zlib when ``compressed`` is TRUE or 1; with 2/3 a one-byte tag 'Z' zlib, '2' bzip2, 'X' xz,
   '0' stored comes first) holding an R serialization stream in XDR format 2 or 3;
3. write ``raw/<novel>.txt`` (the R character vector's elements, each followed by "\\n"; NA -> empty)
   and check its sha256 prefix against the published values;
4. clean: join hard-wrapped lines into paragraphs, drop ``_`` italics marks, drop CHAPTER/VOLUME
   headings and the title lines before the first chapter, and write ``clean/<novel>.txt`` (one
   paragraph per line).

Usage: ``python tools/austen_corpus.py [WORKDIR]`` (default /work/work-data, outside the repo).
The R serialization format is described in R Internals, section 1.8 "Serialization Formats".
"""
from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import lzma
import os
import re
import struct
import subprocess
import sys
import zlib

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
# sha256 prefixes of the raw texts (elements joined with "\n"), from the offline-data fact sheet.
SHA256_PREFIX = {
    "emma": "7c67b598", "mansfieldpark": "98bc9051", "northangerabbey": "51f91bbe",
    "persuasion": "80615495", "prideprejudice": "dfc684d4", "sensesensibility": "105e1651",
}

# SEXP type codes and pseudo-types of the serialization stream (R Internals 1.8).
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASEENV_SXP = 255, 254, 253, 252, 251, 250
EMPTYENV_SXP, BASENAMESPACE_SXP = 242, 247
NA_INTEGER = -(2 ** 31)


class RFormatError(ValueError):
    """The bytes are not an R serialization stream this reader understands."""


class RList(list):
    """An R generic vector (or pairlist) with its attributes (``attrs``: dict name -> value)."""

    def __init__(self, items, attrs=None):
        super().__init__(items)
        self.attrs = attrs or {}


class RReader:
    """Reads one XDR (big-endian) R serialization stream into Python values.

    Supported: NULL, symbols, pairlists, logical/integer/double/character vectors, lists, references
    to earlier symbols, and the special environments (returned as strings). Attributes are kept for
    lists (``RList.attrs``) and read-and-dropped for atomic vectors.
    """

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RFormatError(f"stream truncated at byte {self.pos} (wanted {n} more)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def header(self) -> None:
        magic = self.take(2)
        if magic != b"X\n":
            raise RFormatError(f"expected XDR serialization magic b'X\\n', found {magic!r}")
        version = self.int()
        self.int(), self.int()                     # writer R version, minimal reader R version
        if version == 3:
            self.take(self.int())                  # native encoding name, e.g. "UTF-8"
        elif version != 2:
            raise RFormatError(f"serialization format {version} (expected 2 or 3)")

    def charsxp(self, flags: int):
        n = self.int()
        if n == -1:
            return None                            # NA_character_
        raw = self.take(n)
        return raw.decode("latin-1") if (flags >> 12) & 4 else raw.decode("utf-8", "replace")

    def attributes(self, flags: int) -> dict:
        if not flags & (1 << 9):
            return {}
        pl = self.item()
        return dict(pl.attrs.get("_tags", {})) if isinstance(pl, RList) else {}

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, BASENAMESPACE_SXP,
                    UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return f"<special {kind}>"
        if kind == REFSXP:
            idx = flags >> 8 or self.int()
            if not 1 <= idx <= len(self.refs):
                raise RFormatError(f"reference {idx} out of range (have {len(self.refs)})")
            return self.refs[idx - 1]
        if kind == SYMSXP:
            name = self.item()                     # a CHARSXP
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            return self.charsxp(flags)
        if kind == LISTSXP:                        # pairlist: [attr][tag] car cdr, iterated
            tags, items = {}, []
            while kind == LISTSXP:
                if flags & (1 << 9):
                    self.item()
                tag = self.item() if flags & (1 << 10) else None
                value = self.item()
                items.append(value)
                if tag is not None:
                    tags[tag] = value
                flags = self.int()
                kind = flags & 0xFF
            if kind != NILVALUE_SXP:
                raise RFormatError(f"pairlist ends with type {kind}, expected NULL (254)")
            return RList(items, {"_tags": tags})
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            vals = list(struct.unpack(f">{n}i", self.take(4 * n)))
            self.attributes(flags)
            return [None if v == NA_INTEGER else v for v in vals]
        if kind == REALSXP:
            n = self.int()
            vals = list(struct.unpack(f">{n}d", self.take(8 * n)))
            self.attributes(flags)
            return vals
        if kind == STRSXP:
            n = self.int()
            vals = []
            for _ in range(n):
                cflags = self.int()
                if cflags & 0xFF != CHARSXP:
                    raise RFormatError(f"character vector element of type {cflags & 0xFF}, expected 9")
                vals.append(self.charsxp(cflags))
            self.attributes(flags)
            return vals
        if kind == VECSXP:
            n = self.int()
            items = [self.item() for _ in range(n)]
            return RList(items, self.attributes(flags))
        raise RFormatError(f"unsupported SEXP type {kind} at byte {self.pos - 4}")


def unserialize(data: bytes):
    reader = RReader(data)
    reader.header()
    return reader.item()


def read_lazyload(data_dir: str) -> dict:
    """All objects of an R lazy-load database ``data_dir/Rdata.{rdx,rdb}`` as name -> value."""
    with gzip.open(os.path.join(data_dir, "Rdata.rdx")) as f:
        index = unserialize(f.read())
    if not isinstance(index, RList) or "names" not in index.attrs:
        raise RFormatError("Rdata.rdx: expected a named list (variables, references, compressed)")
    index = dict(zip(index.attrs["names"], index))
    variables, compressed = index["variables"], index["compressed"]
    kind = compressed[0] if isinstance(compressed, list) and compressed else compressed
    with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
        rdb = f.read()
    out = {}
    for name, (offset, length) in zip(variables.attrs["names"], variables):
        chunk = rdb[offset:offset + length]
        size = struct.unpack(">I", chunk[:4])[0]
        body = chunk[4:]
        if kind in (True, 1):
            raw = zlib.decompress(body)
        else:                                      # type 2/3: one tag byte picks the method
            tag, body = body[:1], body[1:]
            raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                   b"0": bytes}[tag](body)
        if len(raw) != size:
            raise RFormatError(f"{name}: decompressed {len(raw)} bytes, header says {size}")
        out[name] = unserialize(raw)
    return out


def fetch_package(workdir: str) -> str:
    """Download and unpack r-cran-janeaustenr into ``workdir/pkg``; return the data directory."""
    data_dir = os.path.join(workdir, "pkg/usr/lib/R/site-library/janeaustenr/data")
    if os.path.exists(os.path.join(data_dir, "Rdata.rdb")):
        return data_dir
    os.makedirs(workdir, exist_ok=True)
    debs = glob.glob(os.path.join(workdir, "r-cran-janeaustenr_*.deb"))
    if not debs:
        if subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir).returncode:
            subprocess.run(["apt-get", "update"], check=True)
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
        debs = glob.glob(os.path.join(workdir, "r-cran-janeaustenr_*.deb"))
    subprocess.run(["dpkg-deb", "-x", sorted(debs)[-1], os.path.join(workdir, "pkg")], check=True)
    return data_dir


HEADING = re.compile(r"^(CHAPTER|VOLUME|Chapter)\b[\s\w.]*$")


def clean(lines: list) -> str:
    """Paragraphs (one per line) from the hard-wrapped text; headings and front matter dropped."""
    first = next((i for i, l in enumerate(lines) if l and HEADING.match(l.strip())), 0)
    paras, cur = [], []
    for line in lines[first:]:
        line = (line or "").strip()
        if not line or HEADING.match(line):
            if cur:
                paras.append(" ".join(cur))
            cur = []
            continue
        cur.append(line)
    if cur:
        paras.append(" ".join(cur))
    text = "\n".join(re.sub(r"\s+", " ", p.replace("_", "")).strip() for p in paras)
    return text.strip() + "\n"


def main(workdir: str = "/work/work-data") -> None:
    objects = read_lazyload(fetch_package(workdir))
    for sub in ("raw", "clean"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    for name in NOVELS:
        lines = objects[name]
        raw = "\n".join("" if l is None else l for l in lines) + "\n"
        digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()
        ok = digest.startswith(SHA256_PREFIX[name])
        with open(os.path.join(workdir, "raw", name + ".txt"), "w", encoding="utf-8") as f:
            f.write(raw)
        text = clean(lines)
        with open(os.path.join(workdir, "clean", name + ".txt"), "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{name:18s} lines={len(lines):6d} sha256={digest[:8]} {'ok' if ok else 'MISMATCH'} "
              f"clean_chars={len(text)}")
        if not ok:
            raise SystemExit(f"{name}: sha256 {digest[:8]}... != expected {SHA256_PREFIX[name]}...")


if __name__ == "__main__":
    main(*sys.argv[1:2])
