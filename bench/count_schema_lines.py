"""Lines of hand-written request schema and validation, before issue 13 and now.

    .venv/bin/python bench/count_schema_lines.py [--before REV] [--after REV]

Issue 13's bar: these lines shrink by at least half. "Before" is commit
4ec478c (the app split, before the pydantic models); "after" is HEAD (or the
working tree with `--after worktree`). Both sides are read from git and
measured the same way: physical lines (blank lines, comments and docstrings
included) of whole files, or of named top-level definitions / `Class.method`s
(decorators included) where a file also holds other things.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# path -> None (the whole file) or the definitions that are schema/validation.
BEFORE = {
    # The hand-written OpenAPI dict and its docs renderer.
    "api/openapi.py": None,
    # /v1's hand-written request parsing.
    "api/openai_api.py": (
        "MAX_STOP_SEQUENCES MAX_MESSAGES MAX_TOOLS MAX_TEXT_CHARS MAX_JSON_DEPTH _ROLES "
        "_TOOL_NAME _EXTENSION_KEYS _bad ImageRef CompletionRequest _is_int _is_number "
        "_number _text_parts _tool_calls _messages _stop _tools _extension "
        "parse_completion_request"
    ),
    # The websocket's hand-written frame parsing.
    "chat/consumers.py": (
        "MAX_FRAME_BYTES MAX_TEXT_CHARS MAX_IMAGES MAX_REQUEST_ID_CHARS MAX_COLLECTIONS "
        "MAX_RUNNER_NAME_CHARS GENERATING_TYPES FrameError GenerateFrame _field "
        "_check_storable MAX_ID _short _id _kinds _kind_name _params _text "
        "parse_generate_frame validate_images ChatConsumer.receive ChatConsumer._receive"
    ),
    # The /api bodies' validation.
    "api/documents.py": "_is_int search_view",
    "api/views.py": "conversation",
    # The home-made JSON-Schema-to-Hypothesis translator.
    "tests/api/test_api_fuzz.py": "json_values from_schema",
}
AFTER = {
    "api/schemas.py": None,
    "api/openapi.py": None,
    "chat/frames.py": None,
    "chat/server_frames.py": None,  # new: the frames the server sends, which 4ec478c left to prose
    "core/schema.py": None,  # the declaring helpers both of those use
    "api/openai_api.py": "ImageRef CompletionRequest parse_completion_request",
    "chat/consumers.py": "ChatConsumer.receive ChatConsumer._receive",
    "api/documents.py": "_is_int search_view",
    "api/views.py": "conversation",
    "tests/support/jsonschema_strategies.py": None,
}


def source(rev: str, path: str) -> str | None:
    if rev == "worktree":
        file = ROOT / path
        return file.read_text() if file.exists() else None
    out = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True
    )
    return out.stdout if out.returncode == 0 else None


def _span(node: ast.AST) -> int:
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
    return node.end_lineno - first + 1


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Assign | ast.AnnAssign):
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        return target.id if isinstance(target, ast.Name) else None
    return getattr(node, "name", None)


def measure(rev: str, spec: dict[str, str | None]) -> dict[str, int]:
    counts = {}
    for path, names in spec.items():
        text = source(rev, path)
        if text is None:
            continue
        if names is None:
            counts[path] = len(text.splitlines())
            continue
        wanted, found = set(names.split()), 0
        for node in ast.parse(text).body:
            if _name(node) in wanted:
                found += _span(node)
            for child in getattr(node, "body", ()) if isinstance(node, ast.ClassDef) else ():
                if f"{node.name}.{_name(child)}" in wanted:
                    found += _span(child)
        if found:
            counts[f"{path} ({names if len(names) < 60 else names[:57] + '...'})"] = found
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="4ec478c")
    parser.add_argument("--after", default="HEAD")
    args = parser.parse_args()
    totals = []
    for label, rev, spec in (("before", args.before, BEFORE), ("after", args.after, AFTER)):
        counts = measure(rev, spec)
        print(f"{label} ({rev}):")
        for where, n in counts.items():
            print(f"  {n:5}  {where}")
        totals.append(sum(counts.values()))
        print(f"  {totals[-1]:5}  total")
    before, after = totals
    verdict = "met" if after * 2 <= before else "not met"
    print(f"after/before = {after}/{before} = {after / before:.2f} (bar: <= 0.50, {verdict})")


if __name__ == "__main__":
    main()
