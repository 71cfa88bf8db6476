"""core.buildcache: a build happens once per key, is linked from the cache
into any target, and a failed or interrupted build leaves nothing behind."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from core import buildcache

FILES = ("model.bin", "tokenizer.json")


class Builder:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, work: Path) -> dict:
        with self.lock:
            self.calls += 1
        (work / "model.bin").write_bytes(b"\x00" * 1000)
        if self.fail:
            raise RuntimeError("the exporter crashed")
        (work / "tokenizer.json").write_text("{}")
        return {"note": "built"}


def test_built_once_then_up_to_date_then_linked_into_another_target(tmp_path):
    key = buildcache.inputs_key({"weights": "abc", "variant": "8da8w"})
    build = Builder()
    first, action = buildcache.ensure(tmp_path / "a", tmp_path / "cache", key, FILES, build)
    assert action == "exported" and build.calls == 1
    assert first["key"] == key and first["note"] == "built"
    assert first["sizes"] == {"model.bin": 1000, "tokenizer.json": 2}

    again, action = buildcache.ensure(tmp_path / "a", tmp_path / "cache", key, FILES, build)
    assert (action, again) == ("up-to-date", first)

    seen: list[Path] = []
    other, action = buildcache.ensure(
        tmp_path / "b", tmp_path / "cache", key, FILES, build, on_cached=seen.append
    )
    assert (action, other, build.calls) == ("linked-from-cache", first, 1)
    assert seen == [tmp_path / "cache" / key[:24]]
    # Hard links: the second checkout costs no disk.
    assert (tmp_path / "b" / "model.bin").stat().st_ino == (
        tmp_path / "a" / "model.bin"
    ).stat().st_ino


def test_other_inputs_are_another_build_and_force_builds_again(tmp_path):
    build = Builder()
    one = buildcache.inputs_key({"variant": "8da8w"})
    two = buildcache.inputs_key({"variant": "fp32"})
    assert one != two
    buildcache.ensure(tmp_path / "t", tmp_path / "cache", one, FILES, build)
    _, action = buildcache.ensure(tmp_path / "t", tmp_path / "cache", two, FILES, build)
    assert (action, build.calls) == ("exported", 2)
    _, action = buildcache.ensure(tmp_path / "t", tmp_path / "cache", two, FILES, build, force=True)
    assert (action, build.calls) == ("exported", 3)


def test_a_failed_build_leaves_nothing_in_the_cache_or_the_target(tmp_path):
    key = buildcache.inputs_key({"x": 1})
    with pytest.raises(RuntimeError, match="exporter crashed"):
        buildcache.ensure(tmp_path / "t", tmp_path / "cache", key, FILES, Builder(fail=True))
    assert not (tmp_path / "t").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{key[:24]}.lock"]


def test_a_truncated_file_is_not_taken_for_a_complete_build(tmp_path):
    key = buildcache.inputs_key({"x": 2})
    build = Builder()
    buildcache.ensure(tmp_path / "t", tmp_path / "cache", key, FILES, build)
    (tmp_path / "t" / "model.bin").unlink()
    (tmp_path / "t" / "model.bin").write_bytes(b"\x00" * 10)  # a copy cut short
    assert buildcache.complete(tmp_path / "t", FILES, key) is None
    _, action = buildcache.ensure(tmp_path / "t", tmp_path / "cache", key, FILES, build)
    assert (action, build.calls) == ("linked-from-cache", 1)
    assert (tmp_path / "t" / "model.bin").stat().st_size == 1000


def test_four_callers_at_once_build_once_each_holding_its_own_file_lock(tmp_path):
    key = buildcache.inputs_key({"x": 3})
    build = Builder()
    actions: list[str] = []

    def ask(target: str) -> None:
        actions.append(
            buildcache.ensure(tmp_path / target, tmp_path / "cache", key, FILES, build)[1]
        )

    threads = [threading.Thread(target=ask, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert build.calls == 1
    assert sorted(actions) == ["exported", *["linked-from-cache"] * 3]
