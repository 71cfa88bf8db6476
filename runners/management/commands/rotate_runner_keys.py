"""Re-encrypt every stored runner API key under the current SECRET_KEY.

Rotating SECRET_KEY: put the new key in SECRET_KEY, move the old one to
SECRET_KEY_FALLBACKS, run this command, then drop the old key from the
fallbacks. A key that no configured secret can decrypt is reported by runner
name (never by value) and the command exits non-zero: enter it again in the
admin.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from runners import crypto
from runners.models import RunnerConfig


class Command(BaseCommand):
    help = "Re-encrypt stored runner API keys under the current SECRET_KEY."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only report which keys can and cannot be decrypted.",
        )

    def handle(self, *args, dry_run: bool = False, **options) -> None:
        rotated: list[str] = []
        unreadable: list[str] = []
        with transaction.atomic():
            for config in RunnerConfig.objects.exclude(api_key_encrypted="").select_for_update():
                plain = crypto.decrypt(config.api_key_encrypted)
                if not plain:
                    unreadable.append(config.name)
                    continue
                rotated.append(config.name)
                if not dry_run:
                    # update(): the key itself is unchanged, so running runners
                    # need no rebuild (save() would bump the config version).
                    RunnerConfig.objects.filter(pk=config.pk).update(
                        api_key_encrypted=crypto.encrypt(plain)
                    )
        verb = "Would re-encrypt" if dry_run else "Re-encrypted"
        self.stdout.write(
            f"{verb} {len(rotated)} runner API key(s) under the current SECRET_KEY"
            + (f": {', '.join(rotated)}" if rotated else ".")
        )
        if unreadable:
            raise CommandError(
                f"{len(unreadable)} runner API key(s) cannot be decrypted with SECRET_KEY or "
                f"SECRET_KEY_FALLBACKS: {', '.join(unreadable)}. Add the SECRET_KEY they were "
                "saved under to SECRET_KEY_FALLBACKS and run this again, or enter those keys "
                "again in the admin."
            )
