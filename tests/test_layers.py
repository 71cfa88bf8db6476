"""Dependencies run one way: the interfaces (chat, api) use the services
(runners, rag, agents) and accounts; runners and rag use neither each other
nor the interfaces; agents (tools over runners and rag) uses no interface;
chat never imports api; accounts imports no interface; core (small libraries
for every app) imports no app."""

from __future__ import annotations

import ast

import pytest

from tests.support.processes import ROOT

FORBIDDEN = {
    "runners": {"chat", "api", "accounts", "rag", "agents"},
    "rag": {"chat", "api", "accounts", "runners", "agents"},
    "accounts": {"chat", "api", "agents"},
    "agents": {"chat", "api"},
    "chat": {"api"},
    "core": {"breezeweb", "chat", "api", "accounts", "runners", "rag", "agents"},
}


def imported_apps(app: str) -> dict[str, set[str]]:
    """{file: top-level packages it imports} for the app's code (not migrations)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / app).rglob("*.py"):
        if "migrations" in path.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("app", sorted(FORBIDDEN))
def test_the_app_imports_only_what_its_layer_may(app):
    wrong = {
        file: sorted(names & FORBIDDEN[app])
        for file, names in imported_apps(app).items()
        if names & FORBIDDEN[app]
    }
    assert not wrong, f"{app} must not import {sorted(FORBIDDEN[app])}: {wrong}"


def test_the_check_sees_imports():
    assert "runners" in imported_apps("chat")["chat/pipeline.py"]
