"""Built-in ACME (RFC 8555): certificates that obtain and renew themselves.

`tlsproxy.acme.store` keeps the account key and certificates on disk,
`tlsproxy.acme.schedule` decides when to renew and how to back off,
`tlsproxy.acme.challenges` answers http-01 and tls-alpn-01,
`tlsproxy.acme.issuance` runs certbot's ``acme`` client (in a thread),
`tlsproxy.acme.manager` is the Twisted service that ties them together.
"""

__all__ = ["challenges", "issuance", "manager", "schedule", "store"]
