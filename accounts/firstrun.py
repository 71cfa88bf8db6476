"""First run in the browser: while no account exists, the site offers to
create the admin account at /setup/, once.

`is_open()` is what the login page asks before it redirects there;
`create_first_admin()` decides races at the database: it inserts the one
`FirstRun` row (a fixed primary key) and the superuser in one transaction, so
when two browsers submit at once exactly one account is created and the other
request gets `FirstRunClosed`.

Whatever creates the first account (this page, `createsuperuser`,
`DJANGO_SUPERUSER_*`, a single sign-on user, the admin), `connect_receivers`
records the first run when it is saved, so the page never reopens after
every account is deleted.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models.signals import post_save

from accounts.models import FirstRun

SETUP_PATH = "/setup/"


class FirstRunClosed(Exception):
    """An account exists already (or another browser just created it)."""


def is_open() -> bool:
    """True while no account exists and the first-run page was never used
    (never with PASSWORD_LOGIN off: the account could not sign in)."""
    if not settings.PASSWORD_LOGIN:
        return False
    return not get_user_model().objects.exists() and not FirstRun.objects.exists()


def create_first_admin(form) -> object:
    """Save `form` (a user-creation form, already valid) as the first
    superuser. Raises FirstRunClosed when an account exists or another request
    won the race; nothing is saved then."""
    try:
        with transaction.atomic():
            FirstRun.objects.create(pk=1, username=form.cleaned_data["username"])
            if get_user_model().objects.exists():
                raise FirstRunClosed
            user = form.save(commit=False)
            user.is_staff = True
            user.is_superuser = True
            user.save()
            return user
    except IntegrityError:
        raise FirstRunClosed from None


def _account_created(sender, instance, created: bool, raw: bool = False, **kwargs) -> None:
    """The first account saved closes the first run, however it was created
    (`create_first_admin` inserted the row already: nothing to do then)."""
    if not created or raw:
        return
    if not FirstRun.objects.filter(pk=1).exists():
        FirstRun.objects.get_or_create(pk=1, defaults={"username": instance.get_username()})


def connect_receivers() -> None:
    post_save.connect(
        _account_created, sender=get_user_model(), dispatch_uid="firstrun-account-created"
    )
