"""Django settings of the test run: the product's own (breezeweb.settings),
with two changes: a fast password hasher, and every JSON answer of the HTTP
APIs (and every frame of the chat websocket) checked against the OpenAPI
document.

Django's default hasher (PBKDF2, 1.2 million iterations) takes ~0.4 s per
password on our 2-core machines, and most tests create two or three users or
log in: about a second of every test's set-up went to hashing (five minutes
of the suite). Django's testing docs recommend exactly this. The product's
hashers follow it in the list, so a hash made by the product still checks;
tests/test_foundation.py checks that the product itself keeps Django's strong
default.

The checking middleware (tests/support/conformance.py) comes first in both
middleware chains, so it sees each answer as the client gets it.

tests/support/hermetic.py names this module for the run and every server a
test starts (`SETTINGS_MODULE`).
"""

from django.conf import global_settings

from breezeweb.settings import *  # noqa: F403 (the product's settings, then the change)

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.MD5PasswordHasher",
    *global_settings.PASSWORD_HASHERS,
]

_CONFORMANCE = "tests.support.conformance.ConformanceMiddleware"
MIDDLEWARE = [_CONFORMANCE, *MIDDLEWARE]  # noqa: F405
API_KEY_MIDDLEWARE = [_CONFORMANCE, *API_KEY_MIDDLEWARE]  # noqa: F405
