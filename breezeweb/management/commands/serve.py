"""`manage.py serve`: BreezeWeb on one port with uvicorn, with as many
processes as the configuration allows (breezeweb/serve.py)."""

from __future__ import annotations

import os

from django.core.management.base import BaseCommand, CommandError

from breezeweb import serve


class Command(BaseCommand):
    help = (
        "Serve BreezeWeb with uvicorn: one process, or one per core when "
        "REDIS_URL and CHROMA_URL are set."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--bind", default="127.0.0.1", help="Address to listen on.")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--processes", default=None, help="'auto' or a number (default: WEB_PROCESSES)."
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Print the plan and uvicorn's command; serve nothing.",
        )
        parser.add_argument("server_extra", nargs="*", help="More uvicorn options, after `--`.")

    def handle(
        self, *args, bind: str, port: int, processes, dry_run: bool, server_extra, **options
    ):
        try:
            chosen = serve.plan(processes)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        command = serve.server_command(bind, port, chosen.processes, tuple(server_extra))
        self.stdout.write(f"  {chosen.reason}")
        if dry_run:
            self.stdout.write(" ".join(command))
            return
        self.stdout.flush()
        os.execv(command[0], command)  # noqa: S606 - our own argv, no shell
