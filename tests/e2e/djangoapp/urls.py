"""URLs of the test Django project."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("info", views.info),
    path("form", views.form),
]
