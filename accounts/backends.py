"""Login throttling (django-axes) that leaves non-request authentication alone."""

from __future__ import annotations

from axes.backends import AxesStandaloneBackend


class LoginThrottleBackend(AxesStandaloneBackend):
    """django-axes' lockout check for logins that come with a request (the
    login page, the admin). `authenticate()` without a request (the test
    client's `login()`, management commands) has no client address to
    throttle; axes would raise there, so it is skipped and ModelBackend
    decides alone. API keys never come through authentication backends."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)
