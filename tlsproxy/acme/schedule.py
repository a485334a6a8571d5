"""When to renew a certificate, and how long to wait after a failure.

Pure functions of times and numbers: no clock, no reactor, no I/O.

- A certificate is renewed inside the window the CA suggests through ACME
  Renewal Information (ARI) when it offers one; otherwise when one third of
  its lifetime remains (30 days of 90, 15 of 45, 2 of 6), never at a fixed
  number of days before expiry.
- A failed attempt is retried after an exponentially growing delay with
  jitter, capped; a ``Retry-After`` from the CA (rate limits) is a floor.
- However far away renewal is, the service looks again at least every
  `MAX_SLEEP`, so ARI updates (e.g. a revocation) are noticed.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable

#: The longest the service sleeps before looking at a certificate again.
MAX_SLEEP = datetime.timedelta(hours=12)
#: Fraction of the lifetime left at which a certificate is renewed without ARI.
RENEW_REMAINING = 1 / 3


def renewal_time(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    """When a certificate valid from ``not_before`` to ``not_after`` is due (⅓ left)."""
    return not_after - (not_after - not_before) * RENEW_REMAINING


def choose_renewal(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ari_time: datetime.datetime | None,
) -> datetime.datetime:
    """The renewal time: the CA's ARI choice when given, else `renewal_time`.

    An ARI time after expiry, or before the certificate was issued (an answer
    about an older certificate), is not trusted beyond the ⅓ rule.
    """
    fallback = renewal_time(not_before, not_after)
    if ari_time is None or not not_before < ari_time < not_after:
        return fallback
    return ari_time


def backoff(
    failures: int,
    initial: float,
    cap: float,
    *,
    retry_after: float | None = None,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (1 = first).

    ``initial * 2**(failures-1)``, capped at ``cap``, then scaled by a random
    factor in [0.5, 1] ("equal jitter") so many proxies do not retry in step;
    never less than the CA's ``retry_after``.
    """
    exponent = min(max(failures - 1, 0), 62)
    base = min(cap, initial * (2.0**exponent))
    delay = base * uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def sleep_until(now: datetime.datetime, when: datetime.datetime) -> float:
    """Seconds from ``now`` to ``when`` (0 if past), at most `MAX_SLEEP`."""
    seconds = (when - now).total_seconds()
    return max(0.0, min(seconds, MAX_SLEEP.total_seconds()))
