"""Fixtures shared by the end-to-end tests (see `tests.e2e.harness`)."""

from tests.e2e.harness import tlsproxy_runner

__all__ = ["tlsproxy_runner"]
