"""Views of the test Django project: what Django believes about a request, and a
CSRF-protected form."""

from __future__ import annotations

import html
import json
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token


class ForwardedClientMiddleware:
    """``REMOTE_ADDR`` from tlsproxy's ``X-Forwarded-For``.

    tlsproxy sends exactly one ``X-Forwarded-For`` address (the client's) and
    drops any the client sent, so the value can be used as it is.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.META["PROXY_ADDR"] = request.META.get("REMOTE_ADDR")
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
        if forwarded:
            request.META["REMOTE_ADDR"] = forwarded
        return self.get_response(request)


def info(request: HttpRequest) -> JsonResponse:
    """What Django makes of the request."""
    return JsonResponse(
        {
            "is_secure": request.is_secure(),
            "scheme": request.scheme,
            "host": request.get_host(),
            "absolute_uri": request.build_absolute_uri("/x"),
            "remote_addr": request.META.get("REMOTE_ADDR"),
            "proxy_addr": request.META.get("PROXY_ADDR"),
            "x_forwarded_for": request.META.get("HTTP_X_FORWARDED_FOR"),
            "forwarded": request.META.get("HTTP_FORWARDED"),
            "x_real_ip": request.META.get("HTTP_X_REAL_IP"),
        }
    )


def form(request: HttpRequest) -> HttpResponse:
    """GET: a form with a CSRF token (and a session); POST: accepted if CSRF passes."""
    if request.method == "POST":
        return HttpResponse(
            json.dumps({"name": request.POST.get("name"), "visits": request.session.get("visits")}),
            content_type="application/json",
        )
    request.session["visits"] = request.session.get("visits", 0) + 1
    token = html.escape(get_token(request))
    return HttpResponse(
        '<form method="post" action="/form">'
        f'<input type="hidden" name="csrfmiddlewaretoken" value="{token}">'
        '<input name="name"><button>Send</button></form>'
    )
