"""Fixtures shared by the end-to-end tests (see `tests.e2e.harness`)."""

from tests.e2e.harness import echo_backend, tlsproxy_runner
from tests.e2e.pebble import processes

__all__ = ["echo_backend", "processes", "tlsproxy_runner"]
