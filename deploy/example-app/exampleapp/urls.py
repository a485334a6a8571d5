"""One page that shows what the app learned from tlsproxy about the request."""

from django.http import HttpRequest, JsonResponse
from django.urls import path


def whoami(request: HttpRequest, rest: str = "") -> JsonResponse:
    """The host, scheme and client address as Django sees them behind tlsproxy."""
    return JsonResponse(
        {
            "app": "django",
            "host": request.get_host(),
            "secure": request.is_secure(),
            "path": request.path,
            "client": request.META.get("HTTP_X_FORWARDED_FOR"),
        }
    )


urlpatterns = [path("", whoami), path("<path:rest>", whoami)]
