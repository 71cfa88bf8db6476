"""BreezeWeb settings.

Everything is read once from the environment (or `.env` next to manage.py) through
django-environ, typed, with zero-config defaults: SQLite, an in-memory channel
layer, embedded Chroma and the local runner. Setting `DATABASE_URL`, `REDIS_URL`
and `CHROMA_URL` moves to PostgreSQL, Redis and a Chroma server without code
changes. A bad value fails loudly at start with a message naming the variable.
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

# Offline by design: every model comes from an installed package or DATA_DIR.
# With these set, an accidental model-hub lookup fails at once with a clear
# error instead of hanging on a network that is not there.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

env = environ.Env()
_dotenv = Path(environ.Env().str("BREEZEWEB_ENV_FILE", default=str(BASE_DIR / ".env")))
if _dotenv.is_file():
    environ.Env.read_env(str(_dotenv), overwrite=False)


def _bool(name: str, default: bool) -> bool:
    raw = env.str(name, default="")
    if raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false, 1/0), got {raw!r}")


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = env.str(name, default="")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def _redact(url: str) -> str:
    """A URL with any password replaced, so error messages never leak it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


DATA_DIR = Path(env.str("DATA_DIR", default=str(BASE_DIR / "data"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once into DATA_DIR."""
    configured = env.str("SECRET_KEY", default="")
    if configured:
        return configured
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
# Keys that used to be SECRET_KEY: sessions and encrypted runner API keys still open.
SECRET_KEY_FALLBACKS = env.list("SECRET_KEY_FALLBACKS", default=[])
DEBUG = _bool("DEBUG", False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "mozilla_django_oidc",  # single sign-on (accounts.oidc), used when OIDC_ISSUER is set
    "breezeweb",  # the project: settings, URLs, health, `bootstrap`, old migrations
    "accounts",
    "runners",
    "rag",
    "agents",
    "chat",
    "api",
]

MIDDLEWARE = [
    # First: JSON errors under /api and /v1 for whatever answers below it, and
    # refusals (a key in the query string, a declared body over the limit)
    # before anything reads the body.
    "api.middleware.ApiMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # The page's language: the language cookie (the switcher), else Accept-Language.
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    # Last: turns a login refused for too many failures into the lockout page.
    "axes.middleware.AxesMiddleware",
]
# A request under /v1 or /api (but the HTML docs page) that carries an API key
# goes through this shorter chain instead (breezeweb/asgi.py): it needs no
# session, CSRF check, messages, page language or page headers, and under
# ASGI each of those middlewares costs two hops to a worker thread and back.
API_KEY_MIDDLEWARE = [
    "api.middleware.ApiMiddleware",
    "django.middleware.security.SecurityMiddleware",
]
# A CSRF refusal under /api and /v1 is JSON; elsewhere Django's page.
CSRF_FAILURE_VIEW = "api.middleware.csrf_failure"

ROOT_URLCONF = "breezeweb.urls"
ASGI_APPLICATION = "breezeweb.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.csp",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------
_default_db = f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
_db_url = env.str("DATABASE_URL", default="") or _default_db
try:
    _db = environ.Env.db_url_config(_db_url)
except Exception as exc:  # django-environ raises several types for a bad URL
    raise ImproperlyConfigured(
        f"DATABASE_URL is not a valid database URL ({_redact(_db_url)}): {exc}. "
        "Examples: sqlite:////abs/path/db.sqlite3, postgres://user@127.0.0.1:5432/name"
    ) from None
_SUPPORTED_ENGINES = {"django.db.backends.sqlite3", "django.db.backends.postgresql"}
if _db.get("ENGINE") not in _SUPPORTED_ENGINES:
    raise ImproperlyConfigured(
        f"DATABASE_URL has an unsupported scheme ({_redact(_db_url)}); use sqlite:// or postgres://"
    )
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the chat stream write while pages read; IMMEDIATE avoids
    # "database is locked" on write upgrades under concurrency.
    _db.setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    )
# Keep each thread's connection between ORM calls (unless the URL says
# `?conn_max_age=N`): opening SQLite runs the PRAGMAs above (a disk flush), and
# a new PostgreSQL connection costs a server process and a handshake. With
# Django's default (0) every database trip of a chat turn reconnected: two
# processes on PostgreSQL answered 200 chats at once half as fast
# (docs/benchmarks.md). The connection budget this needs: docs/scaling.md.
_db.setdefault("CONN_MAX_AGE", 600)
_db.setdefault("CONN_HEALTH_CHECKS", True)
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer and cache ----------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(
            f"REDIS_URL must start with redis://, rediss:// or unix:// ({_redact(REDIS_URL)})"
        )
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "capacity": 1500, "expiry": 30},
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Serving (breezeweb/serve.py, `manage.py serve`) ---------------------------
# "auto": one uvicorn process per core when REDIS_URL and CHROMA_URL are set, one
# otherwise; or a whole number of processes.
WEB_PROCESSES = env.str("WEB_PROCESSES", default="auto")
# uvicorn's --proxy-headers: the client's address from X-Forwarded-For. Only
# behind a proxy that sets that header itself; exactly `true` turns it on.
PROXY_HEADERS = env.str("PROXY_HEADERS", default="false") == "true"
# With PROXY_HEADERS: the addresses whose X-Forwarded-* headers are believed
# (uvicorn's --forwarded-allow-ips: comma-separated IPs or networks, `*` any).
FORWARDED_ALLOW_IPS = env.str("FORWARDED_ALLOW_IPS", default="*")

# --- Chroma and RAG ------------------------------------------------------------
CHROMA_URL = env.str("CHROMA_URL", default="")
CHROMA_PATH = DATA_DIR / "chroma"
EMBEDDING_MODEL_PATH = env.str("EMBEDDING_MODEL_PATH", default="")
RAG_CONTEXT_TOKENS = _int("RAG_CONTEXT_TOKENS", 600, minimum=64)
UPLOAD_MAX_BYTES = _int("UPLOAD_MAX_BYTES", 50 * 1024 * 1024, minimum=1024)
# Where ingestion runs: "thread" (in-process, the default without Redis) or
# "channels" (`manage.py runworker ingest`, the default when REDIS_URL is set).
RAG_INGEST_WORKER = env.str("RAG_INGEST_WORKER", default="")
if RAG_INGEST_WORKER not in ("", "thread", "channels"):
    raise ImproperlyConfigured(
        f"RAG_INGEST_WORKER must be 'thread' or 'channels', got {RAG_INGEST_WORKER!r}"
    )
# An ingestion run that shows no sign of life (heartbeat) for this long is dead
# (crashed worker, thread or process): the watchdog re-queues or fails it.
RAG_INGEST_STALL_SECONDS = _int("RAG_INGEST_STALL_SECONDS", 60, minimum=1)
# On SQLite, a collection of at least this many chunks gets a top-k keyword
# index in memory (rag.topk); smaller ones, and PostgreSQL, use the database's
# full-text index alone. 0 turns the memory index off.
RAG_TOPK_MIN_CHUNKS = _int("RAG_TOPK_MIN_CHUNKS", 10_000, minimum=0)
DATA_UPLOAD_MAX_MEMORY_SIZE = 25 * 1024 * 1024  # JSON bodies (images as data URLs)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024  # larger uploads stream to a temp file
MEDIA_ROOT = DATA_DIR / "uploads"
MEDIA_URL = "/media/"

# --- Runners ------------------------------------------------------------------
MODELS_DIR = Path(env.str("MODELS_DIR", default=str(DATA_DIR / "models"))).resolve()
MODEL_CACHE_DIR = Path(
    env.str("BREEZEWEB_MODEL_CACHE", default=str(Path.home() / ".cache" / "breezeweb"))
)
LLAMASTACK_DEFAULT_ENDPOINT = env.str("LLAMASTACK_ENDPOINT", default="http://localhost:8321")
RUNNER_CIRCUIT_FAILURES = _int("RUNNER_CIRCUIT_FAILURES", 3, minimum=1)
RUNNER_CIRCUIT_COOLDOWN_SECONDS = _int("RUNNER_CIRCUIT_COOLDOWN_SECONDS", 30, minimum=1)
LLAMASTACK_MAX_CONNECTIONS = _int("LLAMASTACK_MAX_CONNECTIONS", 1000, minimum=1)
# Load the local model when the server starts, not on the first chat.
PRELOAD_LOCAL_RUNNERS = _bool("PRELOAD_LOCAL_RUNNERS", True)
# Threads ExecuTorch computes the local model with (0: its default, one per
# core). 1: a quantized program's answers repeat exactly on any CPU (with
# more they may not, depending on the CPU: docs/executorch.md).
EXECUTORCH_THREADS = _int("EXECUTORCH_THREADS", 0, minimum=0)
IMAGE_MAX_BYTES = _int("IMAGE_MAX_BYTES", 8 * 1024 * 1024, minimum=1024)

# --- Chat limits ----------------------------------------------------------------
CHAT_MAX_CONCURRENT_PER_USER = _int("CHAT_MAX_CONCURRENT_PER_USER", 3, minimum=1)
CHAT_MESSAGES_PER_MINUTE = _int("CHAT_MESSAGES_PER_MINUTE", 30, minimum=1)
API_REQUESTS_PER_MINUTE = _int("API_REQUESTS_PER_MINUTE", 60, minimum=1)
API_MAX_CONCURRENT_STREAMS = _int("API_MAX_CONCURRENT_STREAMS", 4, minimum=1)
# Requests per user per minute to /api/* (documents, search, conversations,
# runners): the chat page itself uses these, so the budget is larger.
APP_API_REQUESTS_PER_MINUTE = _int("APP_API_REQUESTS_PER_MINUTE", 300, minimum=1)
# Budgets are per user, across all of the user's keys and sessions; true gives
# each API key its own budget (and its own concurrent-stream slots).
API_RATE_LIMIT_PER_KEY = _bool("API_RATE_LIMIT_PER_KEY", False)
# A closed socket (reload, proxy timeout) lets the answer finish and be saved;
# false: it stops the answer and saves the partial text as `stopped`.
CHAT_CONTINUE_AFTER_DISCONNECT = _bool("CHAT_CONTINUE_AFTER_DISCONNECT", True)
# Share links (/s/<token>/) open only for signed-in users of this site when true.
SHARE_LINKS_REQUIRE_LOGIN = _bool("SHARE_LINKS_REQUIRE_LOGIN", False)
CHAT_MAX_FRAME_BYTES = _int("CHAT_MAX_FRAME_BYTES", 12 * 1024 * 1024, minimum=64 * 1024)
CHAT_TOKEN_FRAME_INTERVAL_MS = _int("CHAT_TOKEN_FRAME_INTERVAL_MS", 25, minimum=0)
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# --- Auth -------------------------------------------------------------------------
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
LOGOUT_REDIRECT_URL = "login"
# django-axes watches logins: after LOGIN_FAILURE_LIMIT failures for one
# username, or from one client address, logins from it are refused for
# LOGIN_LOCKOUT_MINUTES (failures older than that are forgotten). Its backend
# only checks lockouts; ModelBackend authenticates. API keys are not a login:
# they never go through these backends.
AUTHENTICATION_BACKENDS = [
    "accounts.backends.LoginThrottleBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Single sign-on with OpenID Connect (docs/teams.md): on when OIDC_ISSUER is
# set; endpoints come from the issuer's discovery document (accounts.oidc).
# PASSWORD_LOGIN=false turns local passwords off everywhere (login page, admin):
# ModelBackend leaves the list, so no password can authenticate.
OIDC_ISSUER = env.str("OIDC_ISSUER", default="").rstrip("/")
OIDC_RP_CLIENT_ID = env.str("OIDC_CLIENT_ID", default="")
OIDC_RP_CLIENT_SECRET = env.str("OIDC_CLIENT_SECRET", default="")
OIDC_RP_SCOPES = env.str("OIDC_SCOPES", default="openid email profile groups")
OIDC_GROUPS_CLAIM = env.str("OIDC_GROUPS_CLAIM", default="groups")
OIDC_PROVIDER_NAME = env.str("OIDC_PROVIDER_NAME", default="single sign-on")
PASSWORD_LOGIN = _bool("PASSWORD_LOGIN", True)
if OIDC_ISSUER and not (OIDC_RP_CLIENT_ID and OIDC_RP_CLIENT_SECRET):
    raise ImproperlyConfigured("OIDC_ISSUER is set: set OIDC_CLIENT_ID and OIDC_CLIENT_SECRET too")
if not PASSWORD_LOGIN and not OIDC_ISSUER:
    raise ImproperlyConfigured("PASSWORD_LOGIN=false needs OIDC_ISSUER: nobody could sign in")
if OIDC_ISSUER:
    AUTHENTICATION_BACKENDS.append("accounts.oidc.OidcBackend")
if not PASSWORD_LOGIN:
    AUTHENTICATION_BACKENDS.remove("django.contrib.auth.backends.ModelBackend")
OIDC_RP_SIGN_ALGO = "RS256"
OIDC_STORE_ID_TOKEN = True  # the logout's id_token_hint, so the provider's session ends too
OIDC_OP_LOGOUT_URL_METHOD = "accounts.oidc.provider_logout_url"
OIDC_AUTHENTICATE_CLASS = "accounts.oidc.OidcLoginView"
OIDC_AUTHENTICATION_CALLBACK_URL = "oidc_authentication_callback"
LOGIN_REDIRECT_URL_FAILURE = "login"
AXES_FAILURE_LIMIT = _int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "accounts.views.login_locked_out"
AXES_DISABLE_ACCESS_LOG = True  # record failures, not every successful login
AXES_VERBOSE = False
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

# --- Static files -----------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True

# Two languages (docs/i18n.md): catalogs in locale/, compiled by
# `manage.py compile_translations`.
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("zh-hant", "繁體中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Security switches (production: set behind TLS) ------------------------------
SECURE_SSL_REDIRECT = _bool("SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = _bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = _bool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = _int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = _bool("SECURE_HSTS_PRELOAD", False)
if _bool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

# Strict CSP: no inline scripts anywhere; styles allow the admin's inline style
# attributes only.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:", "blob:"],
    "connect-src": [CSP.SELF],
    "font-src": [CSP.SELF],
    "object-src": [CSP.NONE],
    "base-uri": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
    "form-action": [CSP.SELF],
}

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"redact_keys": {"()": "breezeweb.log_redaction.RedactKeysFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_keys"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # llama_stack_client and httpx log every request (URLs, headers) at INFO.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        "llama_stack_client": {"level": "WARNING"},
        "chromadb": {"level": "WARNING"},
        # uvicorn's request lines and its own messages, through the handler
        # that masks API keys (a refused `?api_key=` is still a request line).
        "uvicorn.access": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "uvicorn.error": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
    },
}
