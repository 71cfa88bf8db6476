"""core.prepare_command through the two commands built on it, with their
prepare functions stood in for (no export runs here): the options reach the
build, progress lines and the closing line go to stdout, a build's failure and
an interrupt become a CommandError."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from types import SimpleNamespace

from django.core.management import CommandError, call_command

import pytest

from rag.management.commands import prepare_embeddings as embeddings_command
from rag.onnx_export import ExportError
from runners.executorch.prepare import PrepareError
from runners.management.commands import prepare_model as model_command


def _run(name: str, *args: str) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


def test_prepare_model_passes_its_options_and_says_what_happened(tmp_path, settings, monkeypatch):
    settings.MODEL_CACHE_DIR = str(tmp_path / "cache")
    seen = {}

    def fake(models_dir, cache_dir, variant, *, force, progress, gguf_path):
        seen.update(dir=models_dir, cache=cache_dir, variant=variant, force=force, gguf=gguf_path)
        progress("step one")
        manifest = {"variant": variant}
        return SimpleNamespace(action="exported", seconds=2.25, manifest=manifest, pte_path="m.pte")

    monkeypatch.setattr(model_command, "prepare_model", fake)
    out = _run("prepare_model", "--output-dir", str(tmp_path / "out"), "--variant", "fp32")
    assert seen == {
        "dir": tmp_path / "out",
        "cache": tmp_path / "cache",
        "variant": "fp32",
        "force": False,
        "gguf": None,
    }
    assert out.splitlines() == ["step one", "Model fp32 exported in 2.2 s: m.pte"]
    _run("prepare_model", "--output-dir", str(tmp_path), "--force", "--gguf", "x.gguf")
    assert seen["force"] is True and seen["gguf"] == Path("x.gguf")


def test_prepare_embeddings_says_what_happened(tmp_path, monkeypatch):
    def fake(model, output_dir, cache_dir, *, force, progress):
        manifest = {"min_cosine": 0.99}
        return SimpleNamespace(
            action="linked-from-cache", seconds=0.04, manifest=manifest, directory=output_dir
        )

    monkeypatch.setattr(embeddings_command, "prepare_embeddings", fake)
    out = _run("prepare_embeddings", "--output-dir", str(tmp_path))
    assert out.strip() == (
        "Embedding model (ONNX int8, min cosine 0.99) installed from the cache "
        f"in 0.0 s: {tmp_path}"
    )


@pytest.mark.parametrize(
    ("name", "module", "function", "raised", "message"),
    [
        ("prepare_model", model_command, "prepare_model", PrepareError("no GGUF"), "^no GGUF$"),
        (
            "prepare_embeddings",
            embeddings_command,
            "prepare_embeddings",
            ExportError("no onnx"),
            "^no onnx; embeddings will use sentence-transformers$",
        ),
        ("prepare_model", model_command, "prepare_model", KeyboardInterrupt(), "Interrupted"),
    ],
)
def test_a_failed_or_interrupted_build_is_a_command_error(
    tmp_path, monkeypatch, name, module, function, raised, message
):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(module, function, fail)
    with pytest.raises(CommandError, match=message):
        _run(name, "--output-dir", str(tmp_path))
