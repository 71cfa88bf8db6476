"""What the `prepare_*` management commands share: each builds files derived
from model weights into MODELS_DIR through core.buildcache, with --output-dir
and --force, its progress lines on stdout, and one closing line saying what
happened (already there, linked from the cache, or exported) and how long it
took."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

# core.buildcache.ensure's actions, as the closing line says them.
ACTIONS = {
    "up-to-date": "already up to date",
    "linked-from-cache": "installed from the cache",
    "exported": "exported",
}


class PrepareCommand(BaseCommand):
    """A subclass builds (`build`) and names the result (`summary`); a
    `failure` becomes a CommandError with the text `failed` gives it."""

    failure: type[Exception] = Exception

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--output-dir", default=None, help="Where to put it (default: settings.MODELS_DIR)."
        )
        parser.add_argument(
            "--force", action="store_true", help="Export again even if a cached build exists."
        )

    def build(self, output_dir: Path, cache_dir: Path, options: dict, **common: Any) -> Any:
        """The build's result (with `.action` and `.seconds`); `common` holds
        `force` and `progress`, for the prepare function."""
        raise NotImplementedError

    def summary(self, result: Any, what: str) -> str:
        raise NotImplementedError

    def failed(self, exc: Exception) -> str:
        return str(exc)

    def handle(self, *args, **options) -> None:
        try:
            result = self.build(
                Path(options["output_dir"] or settings.MODELS_DIR),
                Path(settings.MODEL_CACHE_DIR),
                options,
                force=options["force"],
                progress=self.stdout.write,
            )
        except self.failure as exc:
            raise CommandError(self.failed(exc)) from None
        except KeyboardInterrupt:
            raise CommandError("Interrupted; nothing was installed.") from None
        self.stdout.write(self.style.SUCCESS(self.summary(result, ACTIONS[result.action])))
