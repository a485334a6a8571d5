"""A small Django project run under gunicorn behind tlsproxy by the end-to-end tests."""
