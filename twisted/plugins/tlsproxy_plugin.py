"""The twistd plugin: makes ``twistd tlsproxy --config proxy.yaml`` work.

Only names the module that builds the service, so that listing plugins stays
cheap; there must be no ``__init__.py`` in ``twisted/`` or ``twisted/plugins/``.
"""

from twisted.application.service import ServiceMaker

tlsproxy = ServiceMaker(
    "tlsproxy",
    "tlsproxy.tap",
    "A TLS-terminating reverse proxy with hardened defaults, SNI and certificate checks.",
    "tlsproxy",
)
