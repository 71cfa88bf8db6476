"""The site's URLs: each app brings its own; the project adds login, health and admin."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponsePermanentRedirect
from django.urls import include, path, re_path

from breezeweb import health

# Admin pages of models that moved out of the `breezeweb` app keep working.
_MOVED_ADMIN = {"conversation": "chat", "message": "chat", "apikey": "accounts"}


def _moved_admin(request: HttpRequest, model: str, rest: str) -> HttpResponsePermanentRedirect:
    query = f"?{request.META['QUERY_STRING']}" if request.META.get("QUERY_STRING") else ""
    return HttpResponsePermanentRedirect(f"/admin/{_MOVED_ADMIN[model]}/{model}/{rest}{query}")


admin.site.site_header = "BreezeWeb administration"
admin.site.site_title = "BreezeWeb admin"
admin.site.index_template = "admin/runners/index.html"  # adds the runner dashboard link

urlpatterns = [
    path("", include("chat.urls")),
    path("", include("api.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("", include("runners.urls")),  # /metrics and /admin/runners/dashboard/ (before admin/)
    re_path(r"^admin/breezeweb/(?P<model>conversation|message|apikey)/(?P<rest>.*)$", _moved_admin),
    path("admin/", admin.site.urls),
]
