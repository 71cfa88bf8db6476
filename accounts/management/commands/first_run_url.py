"""Print where to create the admin account, while none exists (`make run`)."""

from django.core.management.base import BaseCommand

from accounts import firstrun


class Command(BaseCommand):
    help = "Print the first-run URL when no account exists yet (nothing otherwise)."

    def add_arguments(self, parser):
        parser.add_argument(
            "base_url", help="Where the site will serve, e.g. http://127.0.0.1:8000"
        )

    def handle(self, *args, base_url: str, **options):
        if firstrun.is_open():
            url = base_url.rstrip("/") + firstrun.SETUP_PATH
            self.stdout.write(f"  No account yet: create the admin account at {url}")
