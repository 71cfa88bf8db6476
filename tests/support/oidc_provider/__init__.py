"""A real OpenID Connect provider for the single sign-on tests: a small
Django project built on django-oidc-provider (a maintained provider library
from PyPI), run as its own process on 127.0.0.1 by tests.support.oidc_server.
Nothing here is mocked: discovery, the authorization code flow, the token
endpoint (client secret checked), RS256-signed ID tokens with a JWKS,
userinfo and RP-initiated logout are the library's."""
