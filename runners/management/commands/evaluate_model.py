"""`manage.py evaluate_model`: measure the prepared local model on this machine
(speed, and answer agreement with fp32) for the runner admin."""

from __future__ import annotations

import asyncio
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from core import buildcache
from runners.executorch import evaluate, prepare


class Command(BaseCommand):
    help = (
        "Measure a prepared local model on this machine: prefill and decode speed, time "
        "to first token, and on how many of a fixed set of questions its greedy answers "
        "are identical to the full-precision (fp32) model's, and at how many steps of "
        "fp32's answers it picks fp32's next token. The first run also prepares "
        "that fp32 reference (minutes; cached). The runner admin shows the result."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--model-dir",
            default=None,
            help="The prepared model to measure (default: settings.MODELS_DIR).",
        )
        parser.add_argument(
            "--gguf",
            default=None,
            help="The GGUF the model was prepared from, when it is not the packaged "
            "SmolLM2: its fp32 reference is prepared from it.",
        )
        reference = parser.add_mutually_exclusive_group()
        reference.add_argument(
            "--reference-dir",
            default=None,
            help="Compare with the answers of this prepared model instead of fp32's.",
        )
        reference.add_argument(
            "--no-reference", action="store_true", help="Measure the speed only."
        )
        parser.add_argument(
            "--questions",
            type=int,
            default=len(evaluate.QUESTIONS),
            help=f"Ask only the first N of the {len(evaluate.QUESTIONS)} questions.",
        )
        parser.add_argument("--speed-runs", type=int, default=evaluate.SPEED_RUNS)

    def handle(self, *args, **options) -> None:
        cache = Path(settings.MODEL_CACHE_DIR)
        model_dir = Path(options["model_dir"] or settings.MODELS_DIR)
        manifest = prepare.read_manifest(model_dir)
        if not manifest:
            raise CommandError(f"No prepared model in {model_dir}: run `manage.py prepare_model`.")
        if not 1 <= options["questions"] <= len(evaluate.QUESTIONS):
            raise CommandError(f"--questions must be from 1 to {len(evaluate.QUESTIONS)}.")
        if options["speed_runs"] < 1:
            raise CommandError("--speed-runs must be at least 1.")
        questions = evaluate.QUESTIONS[: options["questions"]]
        gguf = Path(options["gguf"]).expanduser() if options["gguf"] else None
        if gguf is not None and (
            not gguf.is_file() or buildcache.sha256_file(gguf) != manifest.get("gguf_sha256")
        ):
            raise CommandError(f"{model_dir} was not prepared from {gguf}.")

        try:
            reference = None
            if not options["no_reference"]:
                reference_dir = self._reference_dir(options, manifest, model_dir, gguf, cache)
                reference = self._reference(cache, reference_dir, questions, options)
            if reference is not None and reference.key == manifest.get("key"):
                result = reference  # the reference itself
            else:
                result = self._measure(model_dir, questions, options, reference)
        except prepare.PrepareError as exc:
            raise CommandError(str(exc)) from None
        if reference is not None:
            result = evaluate.compared(result, reference)
        evaluate.store(cache, result)
        self.stdout.write(self.style.SUCCESS(result.summary()))

    def _reference_dir(self, options, manifest, model_dir, gguf, cache) -> Path:
        if options["reference_dir"]:
            return Path(options["reference_dir"])
        if manifest.get("variant") == evaluate.REFERENCE_VARIANT:
            return model_dir
        if gguf is None and manifest.get("gguf_name") != prepare.GGUF_NAME:
            raise CommandError(
                f"{model_dir} was prepared from {manifest.get('gguf_name')}: pass --gguf PATH "
                "so that its fp32 reference can be prepared, or --no-reference."
            )
        directory = prepare.variant_dir(cache, evaluate.REFERENCE_VARIANT, gguf)
        self.stdout.write(
            f"Preparing the {evaluate.REFERENCE_VARIANT} reference in {directory} (about "
            f"{prepare.EXPECTED_EXPORT_MINUTES[evaluate.REFERENCE_VARIANT]:.0f} minutes the "
            "first time)"
        )
        prepare.prepare_model(
            directory, cache, evaluate.REFERENCE_VARIANT, gguf_path=gguf, progress=self.stdout.write
        )
        return directory

    def _reference(self, cache, model_dir, questions, options) -> evaluate.Evaluation:
        """The reference's answers: stored when it already gave these, else measured
        and stored (fp32 agrees with itself on every answer; a program given
        with --reference-dir keeps its own agreement unmeasured)."""
        kept = evaluate.stored(cache, model_dir)
        answered = evaluate.limited(kept, questions) if kept is not None else None
        if answered is not None and answered.paths:  # (kept before paths were recorded: no)
            return answered
        measured = self._measure(model_dir, questions, options)
        if measured.variant == evaluate.REFERENCE_VARIANT:
            evaluate.store(cache, evaluate.compared(measured, measured))
        else:
            evaluate.store(cache, measured)
        return measured

    def _measure(self, model_dir, questions, options, reference=None) -> evaluate.Evaluation:
        self.stdout.write(f"Measuring {model_dir}")
        return asyncio.run(
            evaluate.evaluate(
                model_dir,
                questions=questions,
                speed_runs=options["speed_runs"],
                progress=self.stdout.write,
                reference=reference,
            )
        )
