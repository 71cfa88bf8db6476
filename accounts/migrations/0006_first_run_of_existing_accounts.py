"""An install whose first account was made without the first-run page
(`createsuperuser`, `DJANGO_SUPERUSER_*`, single sign-on) has no FirstRun row:
record it now, so /setup/ never reopens if every account is deleted."""

from django.conf import settings
from django.db import migrations


def record_first_run(apps, schema_editor):
    FirstRun = apps.get_model("accounts", "FirstRun")
    User = apps.get_model(*settings.AUTH_USER_MODEL.split("."))
    first = User.objects.order_by("pk").first()
    if first is not None and not FirstRun.objects.exists():
        FirstRun.objects.create(pk=1, username=getattr(first, "username", str(first.pk)))


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0005_sessions_and_invites"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [migrations.RunPython(record_first_run, migrations.RunPython.noop)]
