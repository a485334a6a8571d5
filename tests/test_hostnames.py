"""Tests for `tlsproxy.hostnames`: how SNI names and Host headers are compared."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsproxy.hostnames import (
    HostTable,
    InvalidHostname,
    candidates,
    matches,
    normalize,
    normalize_pattern,
)

LDH = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# One DNS label: letters, digits and inner hyphens, 1-63 characters, any case.
labels = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
# A valid ASCII host name of one to four labels (well under 253 characters).
ascii_names = st.lists(labels, min_size=1, max_size=4).map(".".join)
# A name with at least two labels, so that ``*.`` + it is an acceptable wildcard.
parent_names = st.lists(labels, min_size=2, max_size=4).map(".".join)


def random_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.swapcase() if f else c for c, f in zip(name, flips, strict=True))


@st.composite
def spellings(draw: st.DrawFn, name: str) -> str | bytes:
    """The same name as a client might send it: any case, maybe a final dot, maybe bytes."""
    spelt = random_case(draw, name) + draw(st.sampled_from(["", "."]))
    return spelt.encode("ascii") if draw(st.booleans()) else spelt


# --- normalize ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.Com", "example.com"),
        ("example.com.", "example.com"),
        ("WWW.Example.COM.", "www.example.com"),
        (b"Example.COM.", "example.com"),
        ("localhost", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example.", "xn--bcher-kva.example"),
        ("例え.jp", "xn--r8jz45g.jp"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),
    ],
)
def test_normalize_canonical_form(raw: str | bytes, canonical: str) -> None:
    """Names compare lower case, without one final dot, and IDNs as their xn-- form."""
    assert normalize(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "host name is empty"),
        (".", "host name is empty"),
        (b"", "host name is empty"),
        ("example.com..", "host name has an invalid label ''"),
        ("example..com", "host name has an invalid label ''"),
        (".example.com", "host name has an invalid label ''"),
        ("exa_mple.com", "host name has an invalid label 'exa_mple'"),
        ("-example.com", "host name has an invalid label '-example'"),
        ("example-.com", "host name has an invalid label 'example-'"),
        ("exa mple.com", "host name has an invalid label 'exa mple'"),
        ("example.com:443", "host name has an invalid label 'com:443'"),
        ("[::1]", "host name has an invalid label '[::1]'"),
        ("*.example.com", "host name has an invalid label '*'"),
        ("example.com\n", "host name has an invalid label 'com\\n'"),
        ("example.com\r\n", "host name has an invalid label 'com\\r\\n'"),
        ("a" * 64 + ".com", f"host name has an invalid label '{'a' * 64}'"),
        (".".join(["a" * 63] * 3 + ["b" * 62]), "host name is longer than 253 characters"),
        (b"b\xc3\xbccher.example", "host name is not ASCII"),
        (b"\xff", "host name is not ASCII"),
    ],
)
def test_normalize_rejects_invalid_names(raw: str | bytes, reason: str) -> None:
    """Names that are not DNS host names are refused with a reason a user can act on."""
    with pytest.raises(InvalidHostname) as info:
        normalize(raw)
    assert str(info.value) == reason


def test_normalize_rejects_bad_internationalised_names() -> None:
    """A Unicode name that IDNA forbids is refused as an invalid internationalised name."""
    with pytest.raises(InvalidHostname, match=r"^not a valid internationalised host name \("):
        normalize("a\u200db.example")


def test_invalid_hostname_is_a_value_error() -> None:
    """Callers that catch ValueError also catch bad host names."""
    assert issubclass(InvalidHostname, ValueError)


@given(st.one_of(st.text(), st.binary()))
def test_normalize_only_ever_raises_invalid_hostname(raw: str | bytes) -> None:
    """Any input either normalises or raises InvalidHostname, never another exception."""
    with contextlib.suppress(InvalidHostname):
        normalize(raw)


@given(st.one_of(st.text(), st.binary(), ascii_names))
def test_normalize_result_is_canonical_and_idempotent(raw: str | bytes) -> None:
    """A normalised name is lower-case LDH labels, at most 253 long, and stays as it is."""
    try:
        canonical = normalize(raw)
    except InvalidHostname:
        return
    assert len(canonical) <= 253
    assert all(LDH.fullmatch(label) for label in canonical.split("."))
    assert normalize(canonical) == canonical
    assert normalize(canonical + ".") == canonical
    assert normalize(canonical.upper()) == canonical
    assert normalize(canonical.encode("ascii")) == canonical


@given(st.data(), ascii_names)
def test_normalize_ignores_case_trailing_dot_and_bytes(data: st.DataObject, name: str) -> None:
    """Every spelling of a valid name (case, final dot, str or bytes) is the same name."""
    assert normalize(data.draw(spellings(name))) == name.lower()


# --- wildcard patterns --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "canonical"),
    [
        ("*.example.com", "*.example.com"),
        ("*.EXAMPLE.Com.", "*.example.com"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("www.example.com", "www.example.com"),
        ("Example.COM.", "example.com"),
    ],
)
def test_normalize_pattern_accepts_names_and_wildcards(pattern: str, canonical: str) -> None:
    """Configured names may be plain names or ``*.`` wildcards, normalised like names."""
    assert normalize_pattern(pattern) == canonical


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("*.com", "a wildcard must have at least two labels after '*.'"),
        ("*.com.", "a wildcard must have at least two labels after '*.'"),
        ("*.localhost", "a wildcard must have at least two labels after '*.'"),
        ("a.*.com", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("*", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("*example.com", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("w*.example.com", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("example.*", "'*' is only allowed as the whole leftmost label, as in *.example.com"),
        ("*.*.example.com", "host name has an invalid label '*'"),
        ("*.", "host name is empty"),
        ("*.exa_mple.com", "host name has an invalid label 'exa_mple'"),
    ],
)
def test_normalize_pattern_refuses_bad_wildcards(pattern: str, reason: str) -> None:
    """A wildcard must be ``*.`` over at least two labels; ``*`` anywhere else is refused."""
    with pytest.raises(InvalidHostname) as info:
        normalize_pattern(pattern)
    assert str(info.value) == reason


@given(parent_names)
def test_normalize_pattern_is_idempotent(parent: str) -> None:
    """Normalising an already normalised wildcard changes nothing."""
    pattern = normalize_pattern("*." + parent)
    assert pattern == "*." + parent.lower()
    assert normalize_pattern(pattern) == pattern


def test_candidates_are_exact_then_wildcard() -> None:
    """A name is looked up as itself first, then as the wildcard one label up."""
    assert list(candidates("a.example.com")) == ["a.example.com", "*.example.com"]
    assert list(candidates("a.b.example.com")) == ["a.b.example.com", "*.b.example.com"]


def test_candidates_never_offer_a_wildcard_over_a_tld() -> None:
    """``example.com`` is never looked up as ``*.com``, nor a single label as a wildcard."""
    assert list(candidates("example.com")) == ["example.com"]
    assert list(candidates("localhost")) == ["localhost"]


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "a.example.org", False),
        ("*.example.com", "aexample.com", False),
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("www.example.com", "example.com", False),
    ],
)
def test_matches_wildcard_covers_exactly_one_label(pattern: str, name: str, expected: bool) -> None:
    """``*.example.com`` covers ``a.example.com`` but not ``example.com`` or ``a.b.example.com``."""
    assert matches(pattern, name) is expected


@given(labels, parent_names)
def test_wildcard_matches_any_one_extra_label(label: str, parent: str) -> None:
    """Any single label in front of the parent is covered by the wildcard."""
    parent = parent.lower()
    assert matches("*." + parent, f"{label.lower()}.{parent}")
    assert not matches("*." + parent, parent)


@given(st.lists(labels, min_size=2, max_size=3), parent_names)
def test_wildcard_never_matches_two_extra_labels(extra: list[str], parent: str) -> None:
    """A wildcard never covers a name two or more labels deeper."""
    parent = parent.lower()
    name = ".".join([*(x.lower() for x in extra), parent])
    assert not matches("*." + parent, name)


# --- HostTable --------------------------------------------------------------------


def make_table() -> HostTable[str]:
    table: HostTable[str] = HostTable()
    table.add("example.com", "apex")
    table.add("*.example.com", "wildcard")
    table.add("api.example.com", "api")
    table.add("xn--bcher-kva.example", "books")
    return table


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("example.com", "apex"),
        ("EXAMPLE.COM.", "apex"),
        (b"example.com", "apex"),
        ("www.example.com", "wildcard"),
        (b"WWW.Example.Com.", "wildcard"),
        ("api.example.com", "api"),
        ("API.example.com.", "api"),
        ("bücher.example", "books"),
        ("BÜCHER.example.", "books"),
        (b"xn--bcher-kva.example", "books"),
    ],
)
def test_lookup_finds_names_in_any_spelling(raw: str | bytes, value: str) -> None:
    """Lookups ignore case and a final dot, accept SNI bytes and Unicode names."""
    assert make_table().lookup(raw) == value


def test_exact_name_beats_wildcard() -> None:
    """An exact entry wins over a wildcard that would also match."""
    table = make_table()
    assert table.lookup("api.example.com") == "api"
    assert table.lookup("app.example.com") == "wildcard"


def test_exact_name_beats_wildcard_whatever_the_insertion_order() -> None:
    """Exact-before-wildcard does not depend on the order entries were added."""
    table: HostTable[str] = HostTable()
    table.add("api.example.com", "api")
    table.add("*.example.com", "wildcard")
    assert table.lookup("api.example.com") == "api"


@pytest.mark.parametrize(
    "raw", ["a.b.example.com", "example.org", "com", "xexample.com", "www.api.example.com"]
)
def test_lookup_of_unconfigured_names_is_none(raw: str) -> None:
    """Names not covered by any entry (including two labels under a wildcard) find nothing."""
    assert make_table().lookup(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "",
        b"",
        ".",
        "*.example.com",
        "*",
        "[::1]",
        "example.com:443",
        " example.com",
        "example.com\n",
        "exa_mple.com",
        b"\xff\xfe",
        b"b\xc3\xbccher.example",
        "a" * 300,
        "\x00",
    ],
)
def test_lookup_of_garbage_is_none(raw: str | bytes | None) -> None:
    """Invalid or missing names match nothing rather than raising."""
    assert make_table().lookup(raw) is None


def test_client_cannot_ask_for_the_wildcard_entry_itself() -> None:
    """A client sending the literal name ``*.example.com`` does not get the wildcard's value."""
    assert make_table().lookup("*.example.com") is None


def test_table_contains_patterns() -> None:
    """``in`` tells whether a normalised pattern is in the table."""
    table = make_table()
    assert "*.example.com" in table
    assert "www.example.com" not in table


def test_adding_a_pattern_twice_is_refused() -> None:
    """Each pattern maps to one value; adding it again raises ValueError."""
    table = make_table()
    with pytest.raises(ValueError, match=r"^\*\.example\.com is already mapped$"):
        table.add("*.example.com", "again")
    assert table.lookup("x.example.com") == "wildcard"


def test_empty_table_finds_nothing() -> None:
    """An empty table returns None for every name."""
    assert HostTable[str]().lookup("example.com") is None


@given(st.data(), ascii_names)
def test_exact_entry_is_found_in_any_spelling(data: st.DataObject, name: str) -> None:
    """A configured name is found whatever the case or final dot a client uses."""
    table: HostTable[str] = HostTable()
    table.add(normalize(name), "site")
    assert table.lookup(data.draw(spellings(name))) == "site"


@given(st.data(), labels, parent_names)
def test_wildcard_entry_is_found_in_any_spelling(
    data: st.DataObject, label: str, parent: str
) -> None:
    """A name one label under a configured wildcard is found in any spelling."""
    table: HostTable[str] = HostTable()
    table.add(normalize_pattern("*." + parent), "wild")
    assert table.lookup(data.draw(spellings(f"{label}.{parent}"))) == "wild"
    assert table.lookup(data.draw(spellings(parent))) is None


@given(st.data(), labels, parent_names)
def test_exact_entry_beats_wildcard_property(data: st.DataObject, label: str, parent: str) -> None:
    """Whenever both an exact name and its wildcard are configured, the exact one wins."""
    table: HostTable[str] = HostTable()
    table.add(normalize_pattern("*." + parent), "wild")
    table.add(normalize(f"{label}.{parent}"), "exact")
    assert table.lookup(data.draw(spellings(f"{label}.{parent}"))) == "exact"


@given(st.one_of(st.none(), st.text(), st.binary()))
def test_lookup_never_raises(raw: str | bytes | None) -> None:
    """Whatever a client sends as SNI or Host, lookup answers a value or None."""
    table = make_table()
    result = table.lookup(raw)
    assert result in (None, "apex", "wildcard", "api", "books")


@given(st.text(), ascii_names)
def test_lookup_only_matches_names_that_normalise_to_the_entry(raw: str, name: str) -> None:
    """A lookup succeeds only for input that is, once normalised, the configured name."""
    table: HostTable[str] = HostTable()
    canonical = normalize(name)
    table.add(canonical, "site")
    try:
        same = normalize(raw) == canonical
    except InvalidHostname:
        same = False
    assert (table.lookup(raw) == "site") is same
