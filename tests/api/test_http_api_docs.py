"""docs/http-api.md lists exactly the error codes the HTTP APIs can emit.

The codes are collected from the source with `ast`, not from a hand list:
every literal code given to an error constructor (json_error, openai_error,
api_error, ApiError, InputError, UploadRejected, FileRejected,
ChatError, ...) in the modules that answer /api and /v1, following calls into
the service modules only as far as the views reach; the codes of a failed
turn from their one table, `api.errors.HTTP_ERRORS`; and the codes of a refused
request body from the one mapping of pydantic's errors, `api.schemas`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from api import schemas
from api.errors import HTTP_ERRORS
from tests.support.processes import ROOT

DOC = ROOT / "docs" / "http-api.md"

# Error constructor -> position of its `code` argument.
CODE_ARG = {
    "json_error": 1,
    "openai_error": 1,
    "error": 1,  # the `error=` callable api_view is given (json_error or openai_error)
    "ApiError": 1,
    "InputError": 1,
    "UploadRejected": 0,
    "_status_error": None,  # maps statuses through STATUS_CODES
    "api_error": 2,
    "ChatError": 0,
    "FileRejected": 0,
}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _functions(tree: ast.Module) -> dict[str, ast.AST]:
    return {
        node.name: node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


def _codes_in(node: ast.AST) -> set[str]:
    codes: set[str] = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and _name(call.func) in CODE_ARG:
            name = _name(call.func)
            index = CODE_ARG[name]
            if index is None:
                continue
            if len(call.args) > index:
                arg = call.args[index]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    codes.add(arg.value)
            for keyword in call.keywords:
                if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                    codes.add(keyword.value.value)
        if isinstance(call, ast.Call):  # read_json(..., syntax_code="invalid_json")
            for keyword in call.keywords:
                if keyword.arg == "syntax_code" and isinstance(keyword.value, ast.Constant):
                    codes.add(keyword.value.value)
        if isinstance(call, ast.FunctionDef):  # read_json's default syntax_code
            args = call.args.kwonlyargs
            for arg, default in zip(args, call.args.kw_defaults, strict=True):
                if arg.arg == "syntax_code" and isinstance(default, ast.Constant):
                    codes.add(default.value)
        if isinstance(call, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "STATUS_CODES" for t in call.targets
        ):
            codes.update(v.value for v in call.value.values)
            codes.add("internal_error")  # _status_error's fallback for 5xx
        if (isinstance(call, ast.FunctionDef) and call.name == "rate_limited") or (
            isinstance(call, ast.Call) and _name(call.func) == "rate_limited"
        ):
            codes.add("rate_limit_exceeded")
    return codes


def _reachable_codes(path: Path, entries: set[str]) -> set[str]:
    """Codes in the functions of `path` reachable from `entries` by calls."""
    tree = ast.parse(path.read_text())
    functions = _functions(tree)
    todo, done = [e for e in entries if e in functions], set()
    codes: set[str] = set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        codes |= _codes_in(functions[name])
        for call in ast.walk(functions[name]):
            if isinstance(call, ast.Call) and _name(call.func) in functions:
                todo.append(_name(call.func))
    return codes


def _called(path: Path, module_alias: str) -> set[str]:
    """Names `path` calls as `module_alias.name(...)` or imports from it."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and _name(node.func.value) == module_alias
        ):
            names.add(node.func.attr)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith(module_alias):
            names.update(a.name for a in node.names)
    return names


def codes_from_source() -> set[str]:
    whole = [
        "api/openai_api.py",
        "accounts/auth.py",
        "api/decorators.py",
        "api/errors.py",
        "api/inputs.py",
        "chat/inputs.py",
        "api/middleware.py",
        "api/views.py",
        "api/documents.py",
        "rag/uploads.py",
    ]
    codes: set[str] = set()
    for file in whole:
        codes |= _codes_in(ast.parse((ROOT / file).read_text()))
    views = ROOT / "api" / "views.py"
    codes |= _reachable_codes(ROOT / "chat" / "services.py", _called(views, "services"))
    uploads = ROOT / "rag" / "uploads.py"
    codes |= _reachable_codes(ROOT / "rag" / "parsing.py", _called(uploads, "parsing"))
    # A failed turn's errors: the one table (api.errors.HTTP_ERRORS).
    codes |= {row.code for row in HTTP_ERRORS.values()}
    # A refused request body: the one mapping from pydantic's errors (api.schemas).
    codes |= schemas.emitted_codes()
    return codes


def codes_in_docs() -> set[str]:
    """Codes in the error tables of docs/http-api.md: rows `| 4xx | `code` … |`."""
    codes: set[str] = set()
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\|\s*[45]\d\d(?:\s*/\s*[45]\d\d)?\s*\|([^|]*)\|", line)
        if match:
            codes.update(re.findall(r"`([a-z0-9_]+)`", match.group(1)))
    return codes


def test_the_collector_finds_codes_from_every_layer():
    codes = codes_from_source()
    for code in (
        "invalid_json",  # /v1 body reader
        "bad_json",  # /api body reader
        "nesting_too_deep",
        "unknown_url",  # Django's 404 under the API
        "csrf_failed",
        "not_found",  # chat service, through the conversation views
        "duplicate",  # uploads
        "not_a_pdf",  # parsing, through uploads
        "rate_limit_exceeded",
        "invalid_value",  # a request body's value (api.schemas)
        "array_too_long",  # e.g. more than MAX_MESSAGES messages
        "bad_mode",  # /api/search's `mode`, named after the field
    ):
        assert code in codes, code


def test_docs_list_every_error_code_the_http_apis_emit():
    source, docs = codes_from_source(), codes_in_docs()
    assert not source - docs, f"emitted but not documented: {sorted(source - docs)}"
    assert not docs - source, f"documented but never emitted: {sorted(docs - source)}"
