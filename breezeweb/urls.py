"""The site's URLs: each app brings its own; the project adds login, health and admin."""

from django.contrib import admin
from django.http import HttpRequest, HttpResponsePermanentRedirect
from django.urls import include, path, re_path, register_converter
from django.utils.translation import gettext_lazy as _
from django.views.i18n import JavaScriptCatalog

from api.inputs import IdConverter
from breezeweb import health, pwa

# `<id:name>`: a positive 64-bit id in ASCII digits; anything else is an unknown URL.
register_converter(IdConverter, "id")

# Django's own error pages answer JSON under /api and /v1 (api.middleware).
handler400 = "api.middleware.bad_request"
handler403 = "api.middleware.permission_denied"
handler404 = "api.middleware.page_not_found"
handler500 = "api.middleware.server_error"

admin.site.site_header = _("BreezeWeb administration")
admin.site.site_title = _("BreezeWeb admin")
admin.site.index_template = "admin/runners/index.html"  # adds the runner dashboard link

# Admin pages of models that moved out of the `breezeweb` app keep working.
_MOVED_ADMIN = {"conversation": "chat", "message": "chat", "apikey": "accounts"}


def _moved_admin(request: HttpRequest, model: str, rest: str) -> HttpResponsePermanentRedirect:
    query = f"?{request.META['QUERY_STRING']}" if request.META.get("QUERY_STRING") else ""
    target = f"/admin/{_MOVED_ADMIN[model]}/{model}/{rest}{query}"
    return HttpResponsePermanentRedirect(target, preserve_request=True)  # 308: a POST stays a POST


urlpatterns = [
    path("", include("chat.urls")),
    path("", include("api.urls")),
    # The language switcher's POST (set_language) and the JavaScript catalog (gettext in JS).
    path("i18n/", include("django.conf.urls.i18n")),
    path("jsi18n/", JavaScriptCatalog.as_view(), name="javascript-catalog"),
    path("", include("accounts.urls")),  # login, logout, the first-run page
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    # Installing as an app: served from the root (a service worker's scope is its folder).
    path("favicon.ico", pwa.favicon, name="favicon"),
    path("manifest.webmanifest", pwa.manifest, name="web-manifest"),
    path("sw.js", pwa.service_worker, name="service-worker"),
    path("", include("runners.urls")),  # /metrics and /admin/runners/dashboard/ (before admin/)
    re_path(r"^admin/breezeweb/(?P<model>conversation|message|apikey)/(?P<rest>.*)$", _moved_admin),
    path("admin/", admin.site.urls),
]
