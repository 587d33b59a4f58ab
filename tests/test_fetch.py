"""Sources fetched without installing anything: `apt-get download` + `dpkg-deb -x` into a private root
that the readers search. No network in tests: a fake `apt-get` on PATH hands out .deb files that the
real `dpkg-deb --build` made; unpacking them is the real `dpkg-deb -x`."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blockdiff.cli import main
from blockdiff.train import sources
from blockdiff.train.corpus import build_corpus
from blockdiff.train.fetch import SourceUnavailable, locate, root_dir

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian's dpkg)")

FAKE_APT = """#!{python}
import glob, os, shutil, sys
args = sys.argv[1:]
assert args[0] == "download", args
missing = [p for p in args[1:] if not glob.glob(os.path.join(os.environ["FAKE_DEBS"], p + "_*.deb"))]
if missing:
    print("E: Unable to locate package " + missing[0], file=sys.stderr)
    sys.exit(100)
for p in args[1:]:
    shutil.copy(glob.glob(os.path.join(os.environ["FAKE_DEBS"], p + "_*.deb"))[0], ".")
"""


def make_deb(out_dir: Path, name: str, files: dict[str, str]) -> Path:
    """A real .deb holding `files` (absolute path -> text), built with dpkg-deb."""
    tree = out_dir / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: test <t@example.org>\nDescription: test package\n")
    for path, text in files.items():
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    deb = out_dir / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True, capture_output=True)
    return deb


@pytest.fixture()
def fake_apt(tmp_path, monkeypatch):
    """PATH with a fake apt-get that serves the .deb files in the returned folder."""
    debs, bin_dir = tmp_path / "debs", tmp_path / "bin"
    debs.mkdir()
    bin_dir.mkdir()
    script = bin_dir / "apt-get"
    script.write_text(FAKE_APT.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEBS", str(debs))
    return debs


@pytest.mark.skipif(sources.FORTUNE_DIR.exists(), reason="fortunes are installed on this system")
def test_install_fetches_files_only_and_the_reader_finds_them(tmp_path, fake_apt):
    quotes = "A penny saved is a penny earned.\n%\nLook before you leap.\n%\n"
    make_deb(fake_apt, "fortunes-min", {f"{sources.FORTUNE_DIR}/fortunes": quotes})
    make_deb(fake_apt, "fortunes", {f"{sources.FORTUNE_DIR}/humorists": "Wit is brevity.\n%\n"})
    cache = tmp_path / "cache"
    with pytest.raises(SourceUnavailable, match="pass --install to run `apt-get download fortunes fortunes-min"):
        build_corpus(tmp_path / "out", [sources.SOURCES["fortunes"]], cache_dir=cache)
    manifest = build_corpus(tmp_path / "out", [sources.SOURCES["fortunes"]], cache_dir=cache, install=True)
    assert manifest["totals"]["documents"] == 3
    assert (root_dir(cache) / sources.FORTUNE_DIR.relative_to("/") / "fortunes").read_text() == quotes
    assert sorted(p.name for p in cache.iterdir()) == ["root"]             # the .deb files are gone
    assert locate(cache, sources.FORTUNE_DIR) == root_dir(cache) / sources.FORTUNE_DIR.relative_to("/")


@pytest.mark.skipif(sources.AUSTEN_DIR.exists(), reason="janeaustenr is installed on this system")
def test_missing_package_lists_are_one_line_errors(tmp_path, fake_apt, capsys):
    """With no package lists apt-get cannot find any package: the CLI says so in one line, exit 2."""
    argv = ["data", "--out", str(tmp_path / "out"), "--sources", "austen", "--cache-dir", str(tmp_path / "c"),
            "--install"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Unable to locate package r-cran-janeaustenr" in err and "apt-get update" in err


def test_no_apt_get_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))                            # nothing to run here
    with pytest.raises(SourceUnavailable, match="`apt-get` was not found"):
        sources.ensure_available(sources.SOURCES["pydocs"], tmp_path / "c", install=True)


def test_bible_runs_the_fetched_program_on_the_fetched_data(tmp_path):
    """The reader runs the program under the private root and points it at the data file there."""
    root = root_dir(tmp_path)
    data = root / sources.BIBLE_DATA.relative_to("/")
    data.parent.mkdir(parents=True)
    data.write_text("")
    program = root / sources.BIBLE_PROGRAM.relative_to("/")
    program.parent.mkdir(parents=True)
    program.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\n"
                       f"assert args[:4] == ['-p', {str(data.parent)!r}, '-d', 'bible.data'], args\n"
                       "print('Ge1:1 In the beginning.')\nprint('Ge1:2 And the earth.')\nprint('Ex1:1 Now these.')\n")
    program.chmod(0o755)
    assert sources.SOURCES["bible"].probe(tmp_path)
    assert list(sources.read_bible(tmp_path)) == ["In the beginning.\nAnd the earth.", "Now these."]
