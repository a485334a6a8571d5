"""One ACME conversation with the CA, through certbot's ``acme`` client.

`connect` fetches the directory and registers (or finds) the account;
`begin_order` creates a key, a CSR and an order and picks a challenge per
name; `complete_order` tells the CA the challenges are ready, polls and
finalizes; `renewal_info` asks for ACME Renewal Information.  All of them
block on the network: they run in the ACME thread pool
(`tlsproxy.acme.manager`), never on the reactor.  Publishing the challenge
answers happens between `begin_order` and `complete_order`, on the reactor.

The CA's HTTPS certificate is verified by ``requests`` (hostname included)
against the system's trust store plus ``acme.ca_bundle``.  JWS and the
protocol are the ``acme`` library's; this module only sequences them and
turns failures into one readable line with the CA's problem document.
"""

from __future__ import annotations

import datetime
import email.utils
import os
from collections.abc import Sequence
from typing import Any, cast

import attrs
import certifi  # requests' own trust store
import requests
from acme import client, crypto_util, errors, messages
from acme.challenges import HTTP01
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from tlsproxy import __version__
from tlsproxy.acme.challenges import TLSALPN01, choose
from tlsproxy.acme.store import AcmeStore, key_pem, new_private_key, write_atomic
from tlsproxy.certs import ServerKey
from tlsproxy.config import AcmeSettings

#: Seconds one HTTP request to the CA may take.
REQUEST_TIMEOUT = 30
#: How long the CA may take to validate and issue one order.
ORDER_DEADLINE = datetime.timedelta(seconds=120)
USER_AGENT = f"tlsproxy/{__version__} (built-in ACME client)"
#: The challenge classes `begin_order` can answer.
challenges_answerable = (HTTP01, TLSALPN01)


class IssuanceError(Exception):
    """An attempt failed; ``str()`` is the reason for the log, ``retry_after``
    the seconds the CA asked us to wait (rate limits), if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Network(client.ClientNetwork):
    """``ClientNetwork`` that remembers the last ``Retry-After`` of a 429 or 503."""

    last_retry_after: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        response = super()._send_request(method, url, *args, **kwargs)
        if response.status_code in (429, 503):
            self.last_retry_after = response.headers.get("Retry-After")
        return response


@attrs.frozen(eq=False)
class Session:
    """A connected client: directory fetched, account known."""

    client: client.ClientV2
    network: _Network
    account_key: JWK
    directory_url: str


def _trust(settings: AcmeSettings, store: AcmeStore) -> bool | str:
    """What ``requests`` verifies the CA with: its default bundle, plus ``ca_bundle``."""
    if settings.ca_bundle is None:
        return True
    with open(certifi.where(), "rb") as f:
        bundle = f.read()
    with open(settings.ca_bundle, "rb") as f:
        extra = f.read()
    path = os.path.join(store.directory, "ca-bundle.pem")
    store.ensure()
    write_atomic(path, bundle + b"\n" + extra, mode=0o644)
    return path


def connect(settings: AcmeSettings, store: AcmeStore) -> Session:
    """Fetch the directory and find or register the account (blocking).

    :raises IssuanceError: on any failure.
    """
    network: _Network | None = None
    try:
        key = JWKEC(key=store.account_key())
        network = _Network(
            key,
            alg=ES256,
            verify_ssl=cast(bool, _trust(settings, store)),  # requests takes a path too
            user_agent=USER_AGENT,
            timeout=REQUEST_TIMEOUT,
        )
        directory = client.ClientV2.get_directory(settings.directory, network)
        acme = client.ClientV2(directory, network)
        registration = messages.NewRegistration.from_data(
            email=settings.email, terms_of_service_agreed=settings.agree_tos
        )
        try:
            account = acme.new_account(registration)
        except errors.ConflictError as exists:  # the key already has an account
            account = messages.RegistrationResource(
                uri=exists.location, body=messages.Registration()
            )
            network.account = account
        if account.uri and store.account_url(settings.directory) != account.uri:
            store.save_account_url(settings.directory, account.uri)
    except Exception as exc:
        raise describe(exc, network, settings.directory) from exc
    return Session(acme, network, key, settings.directory)


@attrs.frozen(eq=False)
class Answer:
    """One challenge to answer: its type, the name, and what to serve."""

    kind: str
    name: str
    body: messages.ChallengeBody
    #: http-01: the token and the key authorization to serve for it.
    token: str
    key_authorization: str
    #: tls-alpn-01: the SHA-256 of the key authorization (RFC 8737).
    digest: bytes


@attrs.frozen(eq=False)
class PendingOrder:
    """An order whose challenges are about to be answered."""

    order: messages.OrderResource
    key: ServerKey
    key_type: str
    answers: tuple[Answer, ...]


def begin_order(
    session: Session, names: Sequence[str], key_type: str, preference: Sequence[str]
) -> PendingOrder:
    """Create the certificate key, the CSR and the order; pick the challenges.

    :raises IssuanceError: on any failure, or if the CA offers no challenge
        type of ``preference`` for a name.
    """
    try:
        key = new_private_key(key_type)
        csr = crypto_util.make_csr(key_pem(key), list(names))
        order = session.client.new_order(csr)
        answers: list[Answer] = []
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # validated recently: nothing to answer
            name = authorization.body.identifier.value
            body = choose(authorization.body, preference)
            if body is None:
                offered = ", ".join(c.chall.typ for c in authorization.body.challenges)
                raise IssuanceError(
                    f"the CA offers {offered} for {name}, none of acme.challenges "
                    f"({', '.join(preference)})"
                )
            challenge = body.chall
            assert isinstance(challenge, challenges_answerable)
            key_authorization = challenge.key_authorization(session.account_key)
            digest = b""
            if isinstance(challenge, TLSALPN01):
                digest = challenge.validation(session.account_key)
            answers.append(
                Answer(
                    kind=challenge.typ,
                    name=name,
                    body=body,
                    token=challenge.encode("token"),
                    key_authorization=key_authorization,
                    digest=digest,
                )
            )
    except IssuanceError:
        raise
    except Exception as exc:
        raise describe(exc, session.network, session.directory_url) from exc
    return PendingOrder(order=order, key=key, key_type=key_type, answers=tuple(answers))


def complete_order(session: Session, pending: PendingOrder) -> bytes:
    """Answer the challenges, wait for validation, finalize: the full chain PEM.

    :raises IssuanceError: on any failure, with the CA's problem documents.
    """
    try:
        for answer in pending.answers:
            challenge = answer.body.chall
            assert isinstance(challenge, challenges_answerable)
            session.client.answer_challenge(answer.body, challenge.response(session.account_key))
        deadline = datetime.datetime.now() + ORDER_DEADLINE
        order = session.client.poll_and_finalize(pending.order, deadline)
    except Exception as exc:
        raise describe(exc, session.network, session.directory_url) from exc
    if not order.fullchain_pem:
        raise IssuanceError("the CA finalized the order without a certificate")
    return order.fullchain_pem.encode("ascii")


def renewal_info(session: Session, fullchain: bytes) -> datetime.datetime | None:
    """The CA's suggested renewal time (ARI), or None if it offers none.

    :raises IssuanceError: if the CA offers ARI but the request failed.
    """
    leaf = x509.load_pem_x509_certificates(fullchain)[0]
    try:
        when, _ = session.client.renewal_time(leaf.public_bytes(serialization.Encoding.PEM))
    except errors.ARIError as exc:
        raise describe(exc.__cause__ or exc, session.network, session.directory_url) from exc
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.astimezone(datetime.UTC)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _problem(error: messages.Error) -> str:
    text = f"{error.typ}: {error.detail}" if error.detail else str(error.typ)
    for sub in getattr(error, "subproblems", None) or ():
        identifier = getattr(getattr(sub, "identifier", None), "value", "")
        text += f"; {identifier}: {sub.typ}: {sub.detail}"
    return text


def describe(exc: BaseException, network: _Network | None, directory: str) -> IssuanceError:
    """One log line for a failure, with the CA's problem document and Retry-After."""
    retry_after = _retry_after(network.last_retry_after) if network is not None else None
    if isinstance(exc, IssuanceError):
        return exc
    if isinstance(exc, messages.Error):
        return IssuanceError(f"the CA answered {_problem(exc)}", retry_after)
    if isinstance(exc, errors.ValidationError):
        reasons = []
        for authorization in exc.failed_authzrs:
            name = authorization.body.identifier.value
            for challenge in authorization.body.challenges:
                if challenge.error is not None:
                    reasons.append(f"{name} ({challenge.chall.typ}): {_problem(challenge.error)}")
        return IssuanceError("validation failed: " + ("; ".join(reasons) or str(exc)))
    if isinstance(exc, requests.exceptions.RequestException):
        return IssuanceError(f"cannot reach the CA at {directory}: {exc}", retry_after)
    if isinstance(exc, errors.TimeoutError):
        return IssuanceError(f"the CA did not finish the order within {ORDER_DEADLINE}")
    if isinstance(exc, OSError):
        return IssuanceError(f"cannot use the ACME state directory: {exc}")
    return IssuanceError(f"{type(exc).__name__}: {exc}", retry_after)
