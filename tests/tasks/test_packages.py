"""Debian package data: installed root, cache reuse, fetch with a locally built .deb, errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from subq.tasks import packages
from subq.tasks.packages import apt_download, cache_dir, debian_package_root

PACKAGE = "subq-fake-data"
MARKER = "usr/share/subq-fake-data"

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


@pytest.fixture(autouse=True)
def no_system_package(tmp_path, monkeypatch):
    """Nothing is installed: the system root is an empty folder."""
    empty = tmp_path / "system"
    empty.mkdir()
    monkeypatch.setattr(packages, "SYSTEM_ROOT", empty)
    return empty


def build_deb(folder: Path, files: dict[str, bytes], package: str = PACKAGE) -> Path:
    """A .deb of ``files`` (relative path -> bytes) built with ``dpkg-deb -b``."""
    tree = folder / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: subq tests <tests@example.org>\nDescription: generated test data\n")
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    deb = folder / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


class FakeDownload:
    """Copies a prepared .deb into the download folder, counting calls."""

    def __init__(self, deb: Path) -> None:
        self.deb, self.calls = deb, []

    def __call__(self, package: str, dest: Path) -> Path:
        self.calls.append(package)
        return Path(shutil.copy(self.deb, dest))


def test_cache_dir_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBQ_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SUBQ_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "subq"


@needs_dpkg
def test_fetch_extracts_deb_then_reuses_cache(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 3
    deb = build_deb(tmp_path, {f"{MARKER}/data.bin": payload, "usr/share/doc/x/README": b"hi"})
    monkeypatch.setenv("SUBQ_CACHE", str(tmp_path / "cache"))
    download = FakeDownload(deb)
    root = debian_package_root(PACKAGE, MARKER, download=download)
    assert root == tmp_path / "cache" / "debian" / PACKAGE
    assert (root / MARKER / "data.bin").read_bytes() == payload
    assert (root / "usr/share/doc/x/README").read_bytes() == b"hi"
    assert download.calls == [PACKAGE]
    assert [p.name for p in root.parent.iterdir()] == [PACKAGE]  # no staging folder left
    assert debian_package_root(PACKAGE, MARKER, download=download) == root
    assert debian_package_root(PACKAGE, MARKER, download=download, fetch=False) == root
    assert download.calls == [PACKAGE]


def test_installed_package_is_used_without_download(no_system_package, tmp_path):
    (no_system_package / MARKER).mkdir(parents=True)

    def download(package, dest):
        raise AssertionError("an installed package must not be downloaded")

    assert debian_package_root(PACKAGE, MARKER, cache=tmp_path / "c",
                               download=download) == no_system_package


def test_missing_package_error_names_package_and_install(tmp_path):
    calls = []

    def offline(package, dest):
        calls.append(package)
        raise FileNotFoundError("no network here")

    with pytest.raises(FileNotFoundError) as err:
        debian_package_root(PACKAGE, MARKER, cache=tmp_path / "c", download=offline,
                            hint="pass your own with --text")
    message = str(err.value)
    assert f"apt-get install {PACKAGE}" in message and "--text" in message
    assert "no network here" in message and calls == [PACKAGE]
    with pytest.raises(FileNotFoundError, match=f"apt-get install {PACKAGE}"):
        debian_package_root(PACKAGE, MARKER, cache=tmp_path / "c", download=offline, fetch=False)
    assert calls == [PACKAGE]
    assert not (tmp_path / "c" / "debian" / PACKAGE).exists()


@needs_dpkg
def test_deb_without_marker_is_rejected_and_not_cached(tmp_path):
    deb = build_deb(tmp_path, {"usr/share/other/file": b"x"})
    with pytest.raises(FileNotFoundError, match=f"has no {MARKER}"):
        debian_package_root(PACKAGE, MARKER, cache=tmp_path / "c", download=FakeDownload(deb))
    assert list((tmp_path / "c" / "debian").iterdir()) == []


@needs_dpkg
def test_concurrent_fetch_keeps_the_first_copy(tmp_path):
    deb = build_deb(tmp_path, {f"{MARKER}/data.bin": b"from the deb"})
    target = tmp_path / "c" / "debian" / PACKAGE

    def racing(package, dest):
        (target / MARKER).mkdir(parents=True)          # another process finished first
        (target / MARKER / "data.bin").write_bytes(b"theirs")
        return Path(shutil.copy(deb, dest))

    assert debian_package_root(PACKAGE, MARKER, cache=tmp_path / "c", download=racing) == target
    assert (target / MARKER / "data.bin").read_bytes() == b"theirs"
    assert [p.name for p in target.parent.iterdir()] == [PACKAGE]


def test_apt_download_without_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get"):
        apt_download(PACKAGE, tmp_path)
