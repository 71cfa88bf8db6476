"""core.prepare_command through the two commands built on it: the closing
line says what happened (here: the prepared models already up to date), and
an interrupt becomes a CommandError. A real export through the same command,
its cache and its refusals: tests/runners/test_prepare_gguf.py."""

from __future__ import annotations

import re
from io import StringIO

from django.core.management import CommandError, call_command

import pytest

from rag.management.commands import prepare_embeddings as embeddings_command
from runners.management.commands import prepare_model as model_command


def _run(name: str, *args: str) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


@pytest.mark.usefixtures("model_ready")
def test_prepare_model_finds_the_prepared_model_up_to_date():
    """The real command on the model `make setup` prepared (read only)."""
    out = _run("prepare_model")
    assert re.search(r"^Model 8da8w already up to date in [\d.]+ s: ", out, re.M), out


@pytest.mark.usefixtures("model_ready")
def test_prepare_embeddings_finds_the_prepared_model_up_to_date():
    out = _run("prepare_embeddings")
    assert re.search(
        r"^Embedding model \(ONNX int8, min cosine 0\.9\d+\) already up to date in",
        out.splitlines()[-1],
    ), out


@pytest.mark.parametrize(
    ("name", "module", "function"),
    [
        ("prepare_model", model_command, "prepare_model"),
        ("prepare_embeddings", embeddings_command, "prepare_embeddings"),
    ],
)
def test_an_interrupted_build_is_a_command_error_saying_nothing_was_installed(
    tmp_path, monkeypatch, name, module, function
):
    """Ctrl-C mid-build (raised where the build would run): the build cache
    installs nothing until a build is complete, and the command says so.
    A failing build's own errors are tested with real files in
    tests/runners/test_prepare_gguf.py."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, function, interrupted)
    with pytest.raises(CommandError, match=r"^Interrupted; nothing was installed\.$"):
        _run(name, "--output-dir", str(tmp_path))
