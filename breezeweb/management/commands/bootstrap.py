"""Idempotent first-run set-up: the default runner configs, and an admin
account when DJANGO_SUPERUSER_USERNAME / _PASSWORD are set."""

import os

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from runners.models import RunnerConfig


class Command(BaseCommand):
    help = "Create the default runner configs (and an admin from DJANGO_SUPERUSER_*)."

    @staticmethod
    def default_runners() -> dict[str, dict]:
        """The local model, enabled; a Llama Stack runner, off until configured."""
        return {
            "local": {
                "kind": "executorch",
                "enabled": True,
                "priority": 100,
                "model_id": "SmolLM2-135M-Instruct",
                "temperature": 0.7,
                "max_tokens": 512,
                "context_tokens": 2048,
                "timeout_seconds": 120,
            },
            "llamastack": {
                "kind": "llamastack",
                "enabled": False,
                "priority": 50,
                "endpoint": settings.LLAMASTACK_DEFAULT_ENDPOINT,
                "model_id": "",
                "enable_vision": True,
                "context_tokens": 8192,
            },
        }

    def handle(self, *args, **options):
        for name, defaults in self.default_runners().items():
            _, created = RunnerConfig.objects.get_or_create(name=name, defaults=defaults)
            self.stdout.write(("Created" if created else "Kept") + f" runner config {name!r}")

        username = os.environ.get("DJANGO_SUPERUSER_USERNAME")
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        User = get_user_model()
        if username and password and not User.objects.filter(username=username).exists():
            User.objects.create_superuser(
                username=username,
                email=os.environ.get("DJANGO_SUPERUSER_EMAIL", ""),
                password=password,
            )
            self.stdout.write(f"Created admin account {username!r}")
        if not User.objects.filter(is_superuser=True).exists():
            self.stdout.write(
                self.style.WARNING(
                    "No admin account yet: create it in the browser at /setup/ (offered "
                    "until an account exists), run `make admin`, or set "
                    "DJANGO_SUPERUSER_USERNAME and DJANGO_SUPERUSER_PASSWORD in .env."
                )
            )
