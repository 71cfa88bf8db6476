"""Docs that cannot drift: every variable settings.py reads is in README's
settings table and in .env.example, and no document points outside the
repository."""

from __future__ import annotations

import ast
import re

from tests.support.processes import ROOT

SETTINGS = ROOT / "breezeweb" / "settings.py"
_NAME = re.compile(r"^[A-Z][A-Z0-9_]+$")


def settings_variables() -> set[str]:
    """Environment variables settings.py reads: the first argument of
    `env.<type>("NAME", ...)` and of its own `_bool` / `_int` / ... helpers."""
    names = set()
    for node in ast.walk(ast.parse(SETTINGS.read_text())):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        first = node.args[0]
        func = node.func
        reads_env = (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "env"
        ) or (isinstance(func, ast.Name) and func.id.startswith("_") and func.id[1:].islower())
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        if reads_env and literal and _NAME.match(first.value):
            names.add(first.value)
    return names


def readme_table_variables() -> set[str]:
    names = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return names


def env_example_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))


def test_the_settings_reader_finds_the_settings():
    found = settings_variables()
    assert {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY"} <= found


def test_every_setting_is_in_the_readme_table():
    missing = settings_variables() - readme_table_variables()
    assert not missing, f"README's settings table lacks {sorted(missing)}"


def test_every_setting_is_in_env_example():
    missing = settings_variables() - env_example_variables()
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_no_project_file_points_outside_the_repository():
    tracked = [
        *ROOT.glob("*.md"),
        *ROOT.glob("docs/**/*.md"),
        *(
            p
            for app in ("breezeweb", "chat", "api", "accounts", "runners", "rag", "tests", "bench")
            for p in (ROOT / app).rglob("*.py")
        ),
    ]
    outside = re.compile(r"\.\./shared|(?<![\w/])(DESIGN|STYLE)\.md")
    offenders = [
        str(path.relative_to(ROOT))
        for path in tracked
        if path.name != "test_docs.py" and outside.search(path.read_text(errors="replace"))
    ]
    assert not offenders, f"these files refer to documents outside the repository: {offenders}"
