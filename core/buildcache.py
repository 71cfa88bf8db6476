"""Files derived from model weights (an ExecuTorch program, an ONNX export),
built once per machine and cached by the hash of their inputs.

A build is a directory holding the output files and `manifest.json`, written
last: its presence, with the recorded key and file sizes, means the directory
is complete. `ensure()` makes a target directory hold the build for a key:
already there ("up-to-date"), hard-linked from the cache ("linked-from-cache"),
or built now ("exported"), under a file lock so two processes (two checkouts,
two `make` runs) never build the same thing at once: the second waits, then
links. Nothing here touches Django.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inputs_key(inputs: dict) -> str:
    """The cache key of a build: the hash of everything its output depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def complete(directory: Path, files: tuple[str, ...], key: str | None = None) -> dict | None:
    """The manifest of `directory` if it holds a finished build (for `key`)."""
    manifest = read_manifest(directory)
    if not manifest or (key is not None and manifest.get("key") != key):
        return None
    for name in files:
        path = Path(directory) / name
        if not path.is_file() or path.stat().st_size != manifest.get("sizes", {}).get(name):
            return None
    return manifest


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or no hard links: copy instead
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def install(source: Path, target: Path, files: tuple[str, ...], manifest: dict) -> None:
    """Put a finished build into `target`, the manifest last."""
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until rewritten
    for name in files:
        _link_or_copy(source / name, target / name)
    write_json(target / MANIFEST_NAME, manifest)


Build = Callable[[Path], dict]


def ensure(
    target: Path,
    cache_root: Path,
    key: str,
    files: tuple[str, ...],
    build: Build,
    *,
    force: bool = False,
    on_cached: Callable[[Path], None] | None = None,
) -> tuple[dict, str]:
    """Make `target` hold the build for `key`; (its manifest, how it came).

    `build(work)` writes `files` into the empty directory `work` and returns
    the manifest's fields; the key and the file sizes are added here. A failed
    build leaves nothing behind, in the cache or in `target`. `force` builds
    again even when the cache has it."""
    target, cache_root = Path(target), Path(cache_root)
    if not force and (manifest := complete(target, files, key)):
        return manifest, "up-to-date"
    cached = cache_root / key[:24]
    with locked(cache_root / f".{key[:24]}.lock"):
        manifest = None if force else complete(cached, files, key)
        action = "linked-from-cache"
        if manifest is None:
            manifest = _build_into(cached, key, files, build)
            action = "exported"
        elif on_cached is not None:
            on_cached(cached)
        install(cached, target, files, manifest)
    return manifest, action


def _build_into(cached: Path, key: str, files: tuple[str, ...], build: Build) -> dict:
    cached.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=cached.parent))
    try:
        manifest = {
            **build(work),
            "key": key,
            "sizes": {name: (work / name).stat().st_size for name in files},
        }
        write_json(work / MANIFEST_NAME, manifest)
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(work, cached)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
