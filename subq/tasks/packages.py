"""Data files from Debian packages, found installed or fetched once into a cache.

A data set that Debian packages (the Python documentation in ``python3.11-doc``, Fashion-MNIST
in ``dataset-fashion-mnist``) is read from ``/`` when the package is installed. Otherwise it is
fetched once, without root, with ``apt-get download`` (the only network access) and unpacked
with ``dpkg-deb -x`` into ``<cache>/debian/<package>``, where later runs find it. The cache is
``$SUBQ_CACHE``, else ``~/.cache/subq``. A package is recognised by a ``marker``: a path,
relative to the root, that only the package provides.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

SYSTEM_ROOT = Path("/")
"""Where an installed package's files live (tests point it elsewhere)."""

Download = Callable[[str, Path], Path]
"""``download(package, dest_dir) -> path of the .deb``; raises ``OSError`` when it cannot."""


def cache_dir() -> Path:
    """The cache folder: ``$SUBQ_CACHE`` when set, else ``~/.cache/subq``."""
    env = os.environ.get("SUBQ_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "subq"


def apt_download(package: str, dest_dir: Path) -> Path:
    """Fetch ``package``'s .deb into ``dest_dir`` with ``apt-get download`` (no root needed).

    Raises ``FileNotFoundError`` when apt-get is missing, fails (no network, unknown package)
    or leaves other than one .deb behind.
    """
    try:
        done = subprocess.run(["apt-get", "download", package], cwd=dest_dir,
                              capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise FileNotFoundError("apt-get is not available") from err
    if done.returncode != 0:
        raise FileNotFoundError(f"`apt-get download {package}` failed: "
                                f"{done.stderr.strip()[-500:]}")
    debs = sorted(Path(dest_dir).glob("*.deb"))
    if len(debs) != 1:
        raise FileNotFoundError(f"`apt-get download {package}` left {len(debs)} .deb files")
    return debs[0]


def extract_deb(deb: Path, target: Path, marker: str) -> None:
    """Unpack ``deb`` with ``dpkg-deb -x`` into a temporary folder beside ``target``, check
    that it holds ``marker``, then rename it to ``target`` in one step, so ``target`` is never
    seen half-written. When another process placed ``target`` first, its copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise FileNotFoundError(f"`dpkg-deb -x {deb.name}` failed: {done.stderr.strip()}")
        if not (staging / marker).exists():
            raise FileNotFoundError(f"{deb.name} has no {marker}")
        try:
            staging.rename(target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def debian_package_root(package: str, marker: str, *, cache: Path | None = None,
                        download: Download | None = None, fetch: bool = True,
                        hint: str = "") -> Path:
    """The folder that holds ``package``'s files at their installed paths.

    ``/`` when ``/<marker>`` exists (the package is installed); else ``<cache>/debian/<package>``
    when it holds ``marker`` (fetched before); else, when ``fetch``, the package is downloaded
    with ``download`` (default :func:`apt_download`) into a temporary folder and unpacked there.

    Options: ``cache`` (default :func:`cache_dir`), ``download``, ``fetch`` (default True;
    False never downloads), ``hint`` (an alternative to name in the error, e.g. a flag).
    Raises ``FileNotFoundError`` naming the package and how to install it when none works.
    """
    if (SYSTEM_ROOT / marker).exists():
        return SYSTEM_ROOT
    target = (cache if cache is not None else cache_dir()) / "debian" / package
    if (target / marker).exists():
        return target
    reason = "fetching is off"
    if fetch:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                deb = (download or apt_download)(package, Path(tmp))
                extract_deb(Path(deb), target, marker)
            return target
        except OSError as err:
            reason = str(err)
    alternative = f", or {hint}" if hint else ""
    raise FileNotFoundError(
        f"the Debian package {package} is not installed (no {SYSTEM_ROOT / marker}) and could "
        f"not be fetched into {target} ({reason}). Install it with `apt-get install {package}`"
        f"{alternative}.")
