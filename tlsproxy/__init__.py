"""tlsproxy: a TLS-terminating reverse proxy on Twisted with hardened defaults."""

__version__ = "0.1.0"
__all__ = ["__version__"]
