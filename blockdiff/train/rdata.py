"""Read R lazy-load databases (`Rdata.rdx` + `Rdata.rdb`) with the standard library only.

Contract: `read_lazyload_db(directory)` returns `{object_name: value}` for every object in an R
package's `data/Rdata.*` database. Values are plain Python: character vectors become
`list[str | None]` (None is NA), integer/logical vectors `list[int]`, doubles `list[float]`, lists
`list`, and any vector with a `names` attribute becomes a `dict`. Other attributes are dropped.
Only the subset of R's XDR serialization format that data packages use is supported; anything else
(closures, environments, bytecode) raises ValueError. Format reference: R Internals, section 1.8
("Serialization Formats"), and `src/main/serialize.c`.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

# SEXPTYPE codes (Rinternals.h) and the pseudo-types used only in serialization (serialize.c).
SYMSXP, LISTSXP, LANGSXP, CHARSXP = 1, 2, 6, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP = 10, 13, 14, 16, 19, 20
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
_IGNORED = {NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP}
_LATIN1 = 1 << 2  # CHARSXP "levels" bit: string is Latin-1 encoded, otherwise UTF-8/ASCII


class _XdrReader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int32(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int32()
        if n == -1:  # long vector: 64-bit length as two 32-bit halves
            n = (self.int32() << 32) | self.int32()
        return n

    def item(self) -> Any:
        flags = self.int32()
        kind, has_attr = flags & 0xFF, flags & (1 << 9)
        if kind in _IGNORED:
            return None
        if kind == REFSXP:  # back-reference to an earlier symbol/environment
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (LISTSXP, LANGSXP):
            return self._pairlist(flags)
        if kind == CHARSXP:
            return self._string(flags)
        value = self._vector(kind)
        if has_attr:
            value = _apply_names(value, self._attributes())
        return value

    def _attributes(self) -> list[tuple[Any, Any]]:
        attrs = self.item()
        return attrs if isinstance(attrs, list) else []

    def _pairlist(self, flags: int) -> list[tuple[Any, Any]]:
        # A pairlist is a chain of (attr?, tag?, car, cdr) cells; read it iteratively so long
        # lists do not recurse once per element.
        cells = []
        while True:
            if flags & (1 << 9):
                self.item()
            tag = self.item() if flags & (1 << 10) else None
            cells.append((tag, self.item()))
            flags = self.int32()
            if flags & 0xFF == NILVALUE_SXP:
                return cells
            if flags & 0xFF not in (LISTSXP, LANGSXP):
                raise ValueError(f"unsupported pairlist tail of type {flags & 0xFF}")

    def _string(self, flags: int) -> str | None:
        n = self.int32()
        if n == -1:
            return None  # NA_character_
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("latin-1" if (flags >> 12) & _LATIN1 else "utf-8", errors="replace")

    def _vector(self, kind: int) -> list:
        n = self.length()
        if kind in (LGLSXP, INTSXP):
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
            return values
        if kind == REALSXP:
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
            return values
        if kind in (STRSXP, VECSXP, EXPRSXP):
            return [self.item() for _ in range(n)]
        raise ValueError(f"unsupported R object type {kind}")


def _apply_names(value: list, attrs: list[tuple[Any, Any]]) -> Any:
    names = dict(attrs).get("names")
    if names is not None and len(names) == len(value):
        return dict(zip(names, value))
    return value


def unserialize(data: bytes) -> Any:
    """Decode one object written by R's `serialize(x, NULL, xdr=TRUE)`."""
    if data[:2] != b"X\n":
        raise ValueError("not an R XDR serialization (expected 'X\\n' header)")
    r = _XdrReader(data)
    r.pos = 2
    version = r.int32()
    r.int32(), r.int32()  # writer R version, minimal reader version
    if version == 3:
        n = r.int32()
        r.pos += n  # skip the native encoding name, e.g. "UTF-8"
    return r.item()


def _decompress_blob(blob: bytes, compressed: int) -> bytes:
    # Each blob starts with the 4-byte uncompressed length; compress=2/3 add a type byte.
    if compressed in (0, 1):
        return zlib.decompress(blob[4:]) if compressed else blob[4:]
    kind, payload = blob[4:5], blob[5:]
    decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    if kind not in decoders:
        raise ValueError(f"unknown lazy-load compression type {kind!r}")
    return decoders[kind](payload)


def read_lazyload_db(directory: str | Path, stem: str = "Rdata") -> dict[str, Any]:
    """Load every object in `<directory>/<stem>.rdx` / `.rdb` (an installed R package's data)."""
    directory = Path(directory)
    rdx, rdb = directory / f"{stem}.rdx", directory / f"{stem}.rdb"
    for path in (rdx, rdb):
        if not path.is_file():
            raise FileNotFoundError(f"R lazy-load database file not found: {path}")
    raw = rdx.read_bytes()
    index = unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    compressed = index.get("compressed", [1])[0]
    blobs = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(_decompress_blob(blobs[offset : offset + length], compressed))
    return out
