"""Single sign-on with OpenID Connect (mozilla-django-oidc), on when
settings.OIDC_ISSUER is set (docs/teams.md).

- The endpoints come from the issuer's discovery document
  (`<issuer>/.well-known/openid-configuration`), fetched once per process.
- A person is recognised by the provider's `sub` for that issuer
  (`OidcIdentity`), never by a username or an e-mail address the provider
  sends: a provider account called "admin" does not become the local admin.
  The first sign-in creates the user (username from `preferred_username`, made
  unique), with no usable password.
- Every sign-in sets the user's groups to the names in the groups claim
  (settings.OIDC_GROUPS_CLAIM), creating groups that do not exist yet; without
  the claim, groups are left as they are.
- Signing out also ends the provider's session (RP-initiated logout with the
  ID token as hint) when the provider offers `end_session_endpoint`.

The client secret is only ever sent to the token endpoint; it is never
logged or shown.
"""

from __future__ import annotations

import logging
from functools import cache
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.urls import reverse
from django.views import View

import requests
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.views import OIDCAuthenticationRequestView

from accounts.models import OidcIdentity

log = logging.getLogger(__name__)

DISCOVERY_TIMEOUT_S = 10


def enabled() -> bool:
    return bool(settings.OIDC_ISSUER)


@cache
def discovery(issuer: str) -> dict:
    """The provider's discovery document (cached for the process' life)."""
    url = f"{issuer}/.well-known/openid-configuration"
    try:
        response = requests.get(url, timeout=DISCOVERY_TIMEOUT_S)
        response.raise_for_status()
        document = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise ImproperlyConfigured(f"OIDC discovery at {url} failed: {type(exc).__name__}") from exc
    if document.get("issuer", "").rstrip("/") != issuer:
        raise ImproperlyConfigured(
            f"OIDC discovery at {url} names another issuer: {document.get('issuer')!r}"
        )
    return document


def _endpoints() -> dict:
    return discovery(settings.OIDC_ISSUER)


class OidcLoginView(OIDCAuthenticationRequestView):
    """Starts the code flow at the discovered authorization endpoint."""

    def __init__(self, *args, **kwargs) -> None:
        # Not the library's __init__: it reads the endpoint from settings.
        View.__init__(self, *args, **kwargs)
        self.OIDC_OP_AUTH_ENDPOINT = _endpoints()["authorization_endpoint"]
        self.OIDC_RP_CLIENT_ID = settings.OIDC_RP_CLIENT_ID


class OidcBackend(OIDCAuthenticationBackend):
    """Users from the provider: matched by (issuer, sub), created on first
    sign-in, groups synced from the claim on every sign-in."""

    def __init__(self, *args, **kwargs) -> None:
        document = _endpoints()
        # The library reads these at construction; they come from discovery.
        self.OIDC_OP_TOKEN_ENDPOINT = document["token_endpoint"]
        self.OIDC_OP_USER_ENDPOINT = document["userinfo_endpoint"]
        self.OIDC_OP_JWKS_ENDPOINT = document["jwks_uri"]
        self.OIDC_RP_CLIENT_ID = settings.OIDC_RP_CLIENT_ID
        self.OIDC_RP_CLIENT_SECRET = settings.OIDC_RP_CLIENT_SECRET
        self.OIDC_RP_SIGN_ALGO = settings.OIDC_RP_SIGN_ALGO
        self.OIDC_RP_IDP_SIGN_KEY = None
        from django.contrib.auth import get_user_model

        self.UserModel = get_user_model()

    def verify_claims(self, claims) -> bool:
        return bool(claims.get("sub"))

    def filter_users_by_claims(self, claims):
        return self.UserModel.objects.filter(
            oidc_identity__issuer=settings.OIDC_ISSUER, oidc_identity__subject=claims["sub"]
        )

    def describe_user_by_claims(self, claims) -> str:
        return f"subject {claims.get('sub')!r}"

    @transaction.atomic
    def create_user(self, claims):
        user = self.UserModel.objects.create_user(
            _free_username(self.UserModel, claims),
            email=claims.get("email", ""),
            first_name=str(claims.get("given_name", ""))[:150],
            last_name=str(claims.get("family_name", ""))[:150],
        )  # no password: an unusable one
        OidcIdentity.objects.create(user=user, issuer=settings.OIDC_ISSUER, subject=claims["sub"])
        log.info("single sign-on created user %s", user.get_username())
        return self.update_user(user, claims)

    def update_user(self, user, claims):
        names = claims.get(settings.OIDC_GROUPS_CLAIM)
        if isinstance(names, list):
            wanted = {str(n)[:150] for n in names if str(n).strip()}
            groups = [Group.objects.get_or_create(name=name)[0] for name in sorted(wanted)]
            user.groups.set(groups)
        return user

    def get_user(self, user_id):
        user = super().get_user(user_id)
        return user if user is not None and user.is_active else None


def _free_username(model, claims) -> str:
    """`preferred_username` (else the e-mail's local part, else the subject),
    with a number appended when a local account has it already."""
    email = str(claims.get("email", ""))
    base = str(claims.get("preferred_username") or email.split("@")[0] or claims["sub"])
    base = "".join(c for c in base if c.isalnum() or c in "@.+-_")[:140] or "user"
    name, n = base, 1
    while model.objects.filter(username=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def provider_logout_url(request) -> str:
    """Where signing out goes: the provider's end-session endpoint (which
    ends its session too and comes back to our sign-in page), or our
    sign-in page when there is no provider session to end."""
    back = request.build_absolute_uri(reverse(settings.LOGOUT_REDIRECT_URL))
    id_token = request.session.get("oidc_id_token")
    end_session = _endpoints().get("end_session_endpoint") if enabled() else None
    if not (id_token and end_session):
        return back
    return (
        f"{end_session}?{urlencode({'id_token_hint': id_token, 'post_logout_redirect_uri': back})}"
    )
