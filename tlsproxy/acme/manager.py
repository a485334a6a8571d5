"""The ACME service: keeps every ``acme: true`` host's certificates current.

For each such host and key type it decides (with `tlsproxy.acme.schedule`)
when to act, and then issues through an `Issuer`: the real one runs
`tlsproxy.acme.issuance` in a bounded thread pool, publishing the challenge
answers (http-01 tokens, tls-alpn-01 certificates) on the reactor between
the order and the CA's validation and removing them afterwards.  A new
certificate is stored, then ``on_issued`` rebuilds and applies the served
configuration (the reload path), so open connections keep theirs.

Failures keep the current certificate in service and retry with capped
exponential back-off and jitter, never sooner than the CA's Retry-After.
The per-host status (next renewal, last error) goes to ``status.json`` for
``tlsproxy certs``.  State survives restarts: a valid stored certificate is
served and scheduled without contacting the CA.

Must not block the reactor: network calls run in the pool; the only file
I/O on the reactor is reading the few small stored files of one host.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from tlsproxy.acme import issuance, schedule
from tlsproxy.acme.challenges import alpn_certificate
from tlsproxy.acme.issuance import IssuanceError
from tlsproxy.acme.store import KEY_TYPES, AcmeStore, HostStatus
from tlsproxy.certs import CertifiedKey
from tlsproxy.config import AcmeSettings, Config, HostConfig
from tlsproxy.plain import ChallengeTokens
from tlsproxy.tls import ChallengeCertificates

log = Logger()

#: Threads for ACME network calls (one conversation per host and key type at a time).
POOL_THREADS = 2


def _iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(datetime.UTC).isoformat(timespec="seconds")


def _parse(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


class Issuer(Protocol):
    """Obtains certificates and renewal information (the network side)."""

    def issue(self, host: HostConfig, key_type: str) -> Deferred[bytes]:
        """Obtain and store a certificate for ``host``; fires with its full chain."""

    def renewal_info(self, fullchain: bytes) -> Deferred[datetime.datetime | None]:
        """The CA's ARI renewal time for a certificate (None: none offered)."""


class ThreadedIssuer:
    """The real `Issuer`: certbot's ``acme`` client in a bounded thread pool."""

    def __init__(
        self,
        current: Callable[[], Config],
        store: AcmeStore,
        reactor: Any,
        tokens: ChallengeTokens,
        challenges: ChallengeCertificates,
        acknowledged: Callable[[], Deferred[Any]] | None = None,
    ) -> None:
        self.current = current
        self.store = store
        self.reactor = reactor
        self.tokens = tokens
        self.challenges = challenges
        #: Fires once every process serving the challenges has them (worker
        #: processes: see `tlsproxy.supervisor`); awaited before the CA is told.
        self.acknowledged = acknowledged
        self.pool = ThreadPool(minthreads=0, maxthreads=POOL_THREADS, name="tlsproxy-acme")
        self._session: issuance.Session | None = None
        #: The callers waiting for the one connection in progress (empty: none is).
        self._waiting: list[Deferred[issuance.Session]] = []

    def start(self) -> None:
        self.pool.start()
        try:  # once, before any concurrent connection could race to create it
            self.store.account_key()
        except (OSError, ValueError) as exc:  # each attempt reports it again, with back-off
            log.error("ACME: the account key cannot be used: {error}", error=str(exc))

    def stop(self) -> None:
        self.pool.stop()

    def _thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    @property
    def settings(self) -> AcmeSettings:
        """The ``acme`` section in service (it may change on reload)."""
        return self.current().acme

    async def _connect(self) -> issuance.Session:
        """The session; concurrent callers share one connection (and account registration)."""
        settings = self.settings
        if self._session is not None and self._session.directory_url == settings.directory:
            return self._session
        waiter: Deferred[issuance.Session] = Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            self._thread(issuance.connect, settings, self.store).addBoth(self._connected)
        return await waiter

    def _connected(self, result: issuance.Session | Failure) -> None:
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            for waiter in waiting:
                waiter.errback(result)
        else:
            self._session = result
            for waiter in waiting:
                waiter.callback(result)

    async def _issue(self, host: HostConfig, key_type: str) -> bytes:
        try:
            session = await self._connect()
            config = self.current()
            preference = [c for c in config.acme.challenges if c != "http-01" or config.listen.http]
            pending = await self._thread(
                issuance.begin_order, session, host.names, key_type, preference
            )
            now = datetime.datetime.now(datetime.UTC)
            try:
                for answer in pending.answers:
                    if answer.kind == "http-01":
                        self.tokens.publish(answer.token, answer.key_authorization)
                    else:
                        key, cert = alpn_certificate(answer.name, answer.digest, now)
                        self.challenges.publish(answer.name, key, cert)
                    log.info(
                        "ACME: answering {kind} for {name}", kind=answer.kind, name=answer.name
                    )
                if self.acknowledged is not None:
                    await self.acknowledged()
                fullchain: bytes = await self._thread(issuance.complete_order, session, pending)
            finally:
                for answer in pending.answers:
                    if answer.kind == "http-01":
                        self.tokens.remove(answer.token)
                    else:
                        self.challenges.remove(answer.name)
            await self._thread(
                self.store.save_certificate,
                host,
                key_type,
                pending.key,
                fullchain,
                datetime.datetime.now(datetime.UTC),
            )
        except IssuanceError:
            self._session = None  # reconnect next time (new nonce, account, directory)
            raise
        return fullchain

    def issue(self, host: HostConfig, key_type: str) -> Deferred[bytes]:
        return Deferred.fromCoroutine(self._issue(host, key_type))

    async def _renewal_info(self, fullchain: bytes) -> datetime.datetime | None:
        try:
            session = await self._connect()
            when: datetime.datetime | None = await self._thread(
                issuance.renewal_info, session, fullchain
            )
        except IssuanceError:
            self._session = None
            raise
        return when

    def renewal_info(self, fullchain: bytes) -> Deferred[datetime.datetime | None]:
        return Deferred.fromCoroutine(self._renewal_info(fullchain))


@attrs.define
class _Slot:
    """One host's schedule."""

    timer: IDelayedCall | None = None
    running: bool = False
    status: HostStatus = attrs.field(factory=HostStatus)
    #: The retry time chosen after the last failure, exactly (the status keeps it
    #: to the second, for the store and the ``certs`` command).
    retry_at: datetime.datetime | None = None


class AcmeService(Service):
    """Schedules issuance and renewal for the ``acme: true`` hosts of the live config.

    :param current: returns the live configuration (it changes on reload).
    :param on_issued: called on the reactor after a certificate was stored;
        it rebuilds and applies what is served.
    """

    def __init__(
        self,
        current: Callable[[], Config],
        store: AcmeStore,
        issuer: Issuer,
        clock: IReactorTime,
        on_issued: Callable[[], object],
    ) -> None:
        self.current = current
        self.store = store
        self.issuer = issuer
        self.clock = clock
        self.on_issued = on_issued
        self.slots: dict[str, _Slot] = {}

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.UTC)

    def startService(self) -> None:
        super().startService()
        start = getattr(self.issuer, "start", None)
        if start is not None:
            start()
        for name, status in self.store.statuses().items():
            self.slots[name] = _Slot(status=status)
        self.refresh()

    def stopService(self) -> Any:
        for slot in self.slots.values():
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            slot.timer = None
        stop = getattr(self.issuer, "stop", None)
        if stop is not None:
            stop()
        return super().stopService()

    def refresh(self) -> None:
        """Follow the live configuration: schedule new ACME hosts, drop removed ones,
        and plan the others again (a certificate may be due now after a change)."""
        hosts = {h.name: h for h in self.current().hosts if h.acme}
        for name, slot in list(self.slots.items()):
            if name not in hosts:
                if slot.timer is not None and slot.timer.active():
                    slot.timer.cancel()
                del self.slots[name]
        for name in hosts:
            slot = self.slots.setdefault(name, _Slot())
            if slot.running:
                continue
            # Plan again even with a timer set: the names or key type may have
            # changed, making a new certificate due now.
            if slot.timer is not None and slot.timer.active():
                slot.timer.cancel()
            self._plan(name)

    def _stored(self, host: HostConfig) -> dict[str, CertifiedKey]:
        key_types = KEY_TYPES[self.current().acme.key_type]
        found, problems = self.store.load_certificates(host, key_types, self._now())
        for problem in problems:
            log.warn("ACME: {message}", message=problem.reason)
        return {c.key_type.lower(): c for c in found}

    def _plan(self, name: str) -> None:
        """Schedule the next look at ``name`` from its stored certificates and status."""
        slot = self.slots[name]
        if slot.status.failures and slot.retry_at is not None:
            when: datetime.datetime | None = slot.retry_at  # the back-off chosen after a failure
        elif slot.status.failures and slot.status.next_renewal:
            when = _parse(slot.status.next_renewal)  # as stored before a restart
        else:
            when = self._due(name)
        now = self._now()
        when = when or now
        slot.status = attrs.evolve(slot.status, next_renewal=_iso(max(when, now)))
        self._save()
        delay = schedule.sleep_until(now, when)
        slot.timer = self.clock.callLater(delay, self._fire, name)
        log.info(
            "ACME: {host}: next check at {when}",
            host=name,
            when=_iso(now + datetime.timedelta(seconds=delay)),
        )

    def _due_by_type(self, host: HostConfig) -> dict[str, datetime.datetime | None]:
        """When each wanted key type of ``host`` needs a new certificate (None: now)."""
        stored = self._stored(host)
        ari = _parse(self.slots[host.name].status.ari_renewal)
        due: dict[str, datetime.datetime | None] = {}
        for key_type in KEY_TYPES[self.current().acme.key_type]:
            certified = stored.get(key_type)
            due[key_type] = (
                None
                if certified is None
                else schedule.choose_renewal(
                    certified.leaf.not_valid_before_utc, certified.not_after, ari
                )
            )
        return due

    def _due(self, name: str) -> datetime.datetime | None:
        """When ``name`` needs a new certificate (None: now)."""
        try:
            host = self.current().host(name)
        except KeyError:
            return None
        times = list(self._due_by_type(host).values())
        if not times or any(t is None for t in times):
            return None
        return min(t for t in times if t is not None)

    def _fire(self, name: str) -> None:
        slot = self.slots.get(name)
        if slot is None or slot.running:
            return
        slot.timer = None
        slot.running = True
        d = Deferred.fromCoroutine(self._attempt(name))
        d.addErrback(lambda f: log.failure("ACME: unexpected failure for {host}", f, host=name))

    async def _attempt(self, name: str) -> None:
        slot = self.slots[name]
        try:
            host = self.current().host(name)
        except KeyError:
            slot.running = False
            return
        now = self._now()
        try:
            due = self._due_by_type(host)
            wanted = [k for k, t in due.items() if t is None or t <= now]
            if wanted:
                slot.status = attrs.evolve(slot.status, last_attempt=_iso(now))
                await self._renew(host, wanted)
            else:
                await self._check_ari(host)
        except Exception as exc:  # any failure (CA, disk full, bug) backs off; never stops
            failures = slot.status.failures + 1
            settings = self.current().acme
            retry_after = exc.retry_after if isinstance(exc, IssuanceError) else None
            delay = schedule.backoff(
                failures, settings.retry_initial, settings.retry_max, retry_after=retry_after
            )
            slot.retry_at = retry = self._now() + datetime.timedelta(seconds=delay)
            error = str(exc) or type(exc).__name__
            slot.status = attrs.evolve(
                slot.status, failures=failures, last_error=error, next_renewal=_iso(retry)
            )
            log.error(
                "ACME: {host}: attempt {failures} failed: {error}; the current certificate "
                "stays in service; retrying in {delay:.0f} s",
                host=name,
                failures=failures,
                error=error,
                delay=delay,
            )
        finally:
            slot.running = False
            if self.slots.get(name) is slot and self.running:
                self._plan(name)

    async def _renew(self, host: HostConfig, key_types: list[str]) -> None:
        slot = self.slots[host.name]
        fullchain = b""
        for key_type in key_types:
            log.info(
                "ACME: requesting an {key_type} certificate for {names}",
                key_type="RSA" if key_type == "rsa" else "ECDSA",
                names=", ".join(host.names),
            )
            fullchain = await self.issuer.issue(host, key_type)
            if key_type not in self._stored(host):  # never loop on a certificate we reject
                raise IssuanceError(
                    f"the new {key_type.upper()} certificate cannot be served (see the "
                    f"warning above)"
                )
            log.info(
                "ACME: {host}: new {key_type} certificate stored; serving it",
                host=host.name,
                key_type=key_type.upper(),
            )
            slot.status = attrs.evolve(
                slot.status,
                failures=0,
                last_error=None,
                last_success=_iso(self._now()),
                ari_renewal=None,
                next_renewal=None,
            )
            self.on_issued()
        await self._check_ari(host, fullchain)
        due = self._due(host.name)
        if due is None or due <= self._now():  # a stale answer must not renew again at once
            log.warn("ACME: {host}: ignoring a renewal window that is already open", host=host.name)
            slot.status = attrs.evolve(slot.status, ari_renewal=None)

    async def _check_ari(self, host: HostConfig, fullchain: bytes | None = None) -> None:
        """Ask the CA for its renewal window (ARI); a failure here is only logged."""
        slot = self.slots[host.name]
        if fullchain is None:
            stored = self._stored(host)
            if not stored:
                return
            fullchain = next(iter(stored.values())).chain_pem()
        try:
            ari = await self.issuer.renewal_info(fullchain)
        except Exception as exc:
            log.warn(
                "ACME: {host}: no renewal information: {error}", host=host.name, error=str(exc)
            )
            return
        slot.status = attrs.evolve(slot.status, ari_renewal=_iso(ari))
        slot.status = attrs.evolve(slot.status, next_renewal=None)

    def _save(self) -> None:
        try:
            self.store.save_statuses({n: s.status for n, s in self.slots.items()})
        except OSError as exc:
            log.warn("ACME: cannot write the status file: {error}", error=str(exc))
