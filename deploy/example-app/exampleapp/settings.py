"""Settings of the example app: no database, no sessions; behind a TLS-terminating proxy.

``DJANGO_ALLOWED_HOSTS`` (comma-separated) and ``DJANGO_SECRET_KEY`` come from the
environment.  ``SECURE_PROXY_SSL_HEADER`` makes ``request.is_secure()`` true for requests
tlsproxy received over HTTPS; that is safe only because the app is reachable through
tlsproxy alone, which drops client-sent forwarding headers.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h]
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "exampleapp.urls"
WSGI_APPLICATION = "exampleapp.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
USE_TZ = True
LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
