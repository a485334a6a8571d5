"""Settings of the test Django project: what a production site behind tlsproxy uses.

``SECURE_PROXY_SSL_HEADER`` and ``USE_X_FORWARDED_HOST`` trust tlsproxy's
forwarding headers (it drops every client-sent one); cookies are ``Secure``;
plain-HTTP requests would be redirected, so a proxied request that Django did
not see as HTTPS would show up as a 301.
"""

from __future__ import annotations

SECRET_KEY = "tlsproxy-e2e-tests-only-not-a-secret"  # a test project: not a secret
DEBUG = False
ALLOWED_HOSTS = ["app.test"]
ROOT_URLCONF = "djangoapp.urls"
INSTALLED_APPS = ["django.contrib.sessions"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "djangoapp.views.ForwardedClientMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
DATABASES: dict[str, object] = {}
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
USE_TZ = True

# Behind tlsproxy.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
USE_X_FORWARDED_HOST = True
SECURE_SSL_REDIRECT = True
CSRF_COOKIE_SECURE = True
SESSION_COOKIE_SECURE = True
