"""
Registrations: Matrix registration YAML as bridges write it loads unchanged, our own
``delivery:`` options parse, and every mistake is an InvalidRegistrationError that names
the file and the field.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delivery import DeliveryOptions, InvalidRegistrationError, Namespace, Registration

from .harness import event, make_service, txn_id
from .receiver import HS_TOKEN, Receiver

AS_TOKEN = "wfghWEGh3wgWHEf3478sHFWE"
SECRET = "ugw8243igya57aaABGFfgeyu"

# What mautrix-telegram (Python) writes, trailing slash on the url included.
TELEGRAM_YAML = f"""\
id: telegram
as_token: {AS_TOKEN}
hs_token: {SECRET}
namespaces:
    users:
    - exclusive: true
      regex: '@telegram_.*:example\\.com'
    - exclusive: true
      regex: '@telegrambot:example\\.com'
    aliases:
    - exclusive: true
      regex: '\\#telegram_.*:example\\.com'
url: http://localhost:29317/
sender_localpart: 5GY3nBqcXpTSUkMJtCeVAuKhMX4Rv9u2
rate_limited: false
de.sorunome.msc2409.push_ephemeral: true
push_ephemeral: true
protocols:
- telegram
"""

# What mautrix-whatsapp (Go, bridgev2) writes.
WHATSAPP_YAML = f"""\
id: whatsapp
url: http://localhost:29318
as_token: "{AS_TOKEN}"
hs_token: "{SECRET}"
sender_localpart: SH98XxA4xvgFtlbx1NxJm9VYW6q3BdYg
rate_limited: false
namespaces:
    users:
        - regex: ^@whatsappbot:example\\.com$
          exclusive: true
        - regex: ^@whatsapp_.*:example\\.com$
          exclusive: true
    rooms: []
    aliases: []
de.sorunome.msc2409.push_ephemeral: true
receive_ephemeral: true
push_ephemeral: true
org.matrix.msc3202: true
io.element.msc4190: true
"""

VALID: dict[str, Any] = {
    "id": "bridge",
    "url": "http://127.0.0.1:29999",
    "as_token": AS_TOKEN,
    "hs_token": SECRET,
    "sender_localpart": "bridgebot",
    "namespaces": {
        "users": [{"regex": "@bridge_.*:hs", "exclusive": True}],
        "rooms": [{"regex": "!bridged.*:hs", "exclusive": False}],
        "aliases": [{"regex": "#bridge_.*:hs", "exclusive": True}],
    },
}


def write(tmp_path: Path, text: str, name: str = "registration.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def mutated(**changes: Any) -> dict[str, Any]:
    """VALID with top-level keys replaced; a value of ``...`` removes the key."""
    data = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return data


def with_namespaces(namespaces: object) -> dict[str, Any]:
    return mutated(namespaces=namespaces)


def with_options(**options: object) -> dict[str, Any]:
    return mutated(delivery=options)


# -- what loads --


def test_mautrix_telegram_registration_loads_unchanged(tmp_path: Path) -> None:
    reg = Registration.from_file(write(tmp_path, TELEGRAM_YAML))
    assert reg.id == "telegram"
    assert reg.url == "http://localhost:29317"  # the trailing slash would double the path's
    assert reg.as_token == AS_TOKEN
    assert reg.hs_token == SECRET
    assert reg.sender_localpart == "5GY3nBqcXpTSUkMJtCeVAuKhMX4Rv9u2"
    assert [(n.regex, n.exclusive) for n in reg.users] == [
        (r"@telegram_.*:example\.com", True),
        (r"@telegrambot:example\.com", True),
    ]
    assert reg.rooms == ()
    assert [(n.regex, n.exclusive) for n in reg.aliases] == [(r"\#telegram_.*:example\.com", True)]
    assert reg.aliases[0].pattern.match("#telegram_123:example.com")
    assert reg.options == DeliveryOptions()
    # (its ``push_ephemeral`` without a prefix is no key of any spec: it is left alone)
    assert (reg.receive_ephemeral, reg.push_ephemeral, reg.msc3202) == (False, True, False)


def test_mautrix_whatsapp_registration_loads_unchanged(tmp_path: Path) -> None:
    reg = Registration.from_file(write(tmp_path, WHATSAPP_YAML))
    assert reg.id == "whatsapp"
    assert reg.url == "http://localhost:29318"
    assert (reg.as_token, reg.hs_token) == (AS_TOKEN, SECRET)
    assert [n.regex for n in reg.users] == [
        r"^@whatsappbot:example\.com$",
        r"^@whatsapp_.*:example\.com$",
    ]
    assert all(n.exclusive for n in reg.users)
    assert reg.rooms == reg.aliases == ()
    assert reg.options == DeliveryOptions()
    assert (reg.receive_ephemeral, reg.push_ephemeral, reg.msc3202) == (True, True, True)


def test_without_opt_ins_a_registration_wants_no_ephemeral_or_device_data() -> None:
    reg = Registration.from_dict(VALID)
    assert (reg.receive_ephemeral, reg.push_ephemeral, reg.msc3202) == (False, False, False)
    nulls = {"receive_ephemeral": None, "org.matrix.msc3202": None}
    assert Registration.from_dict(mutated(**nulls)) == reg


def test_from_dict_and_from_file_agree(tmp_path: Path) -> None:
    from_file = Registration.from_file(write(tmp_path, TELEGRAM_YAML))
    from_dict = Registration.from_dict(yaml.safe_load(TELEGRAM_YAML))
    assert from_file == from_dict


def test_null_url_and_no_namespaces_load() -> None:
    reg = Registration.from_dict(mutated(url=None, namespaces=...))
    assert reg.url is None
    assert reg.users == reg.rooms == reg.aliases == ()


def test_namespace_kinds_may_be_null_or_empty() -> None:
    reg = Registration.from_dict(with_namespaces({"users": None, "rooms": [], "aliases": None}))
    assert reg.users == reg.rooms == reg.aliases == ()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://localhost:29317/", "http://localhost:29317"),
        ("https://bridge.example.com", "https://bridge.example.com"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("http://bridge.example.com/prefix/", "http://bridge.example.com/prefix"),
    ],
)
def test_urls(url: str, expected: str) -> None:
    assert Registration.from_dict(mutated(url=url)).url == expected


def test_delivery_options_parse(tmp_path: Path) -> None:
    text = TELEGRAM_YAML + (
        "delivery:\n"
        "  max_events: 50\n"
        "  max_bytes: 65536\n"
        "  initial_delay: 0.5\n"
        "  max_delay: 60\n"
        "  jitter: 0\n"
        "  probe_interval: 2.5\n"
        "  probe: false\n"
        "  connect_timeout: 3\n"
        "  request_timeout: 7.5\n"
        "  protocol: matrix\n"
    )
    reg = Registration.from_file(write(tmp_path, text))
    assert reg.options == DeliveryOptions(
        max_events=50,
        max_bytes=65536,
        initial_delay=0.5,
        max_delay=60,
        jitter=0,
        probe_interval=2.5,
        probe=False,
        connect_timeout=3,
        request_timeout=7.5,
        protocol="matrix",
    )


def test_some_delivery_options_keep_the_other_defaults() -> None:
    reg = Registration.from_dict(with_options(max_events=10, max_delay=1))
    defaults = DeliveryOptions()
    assert reg.options.max_events == 10
    assert reg.options.max_delay == 1
    assert reg.options.initial_delay == defaults.initial_delay
    assert reg.options.max_bytes == defaults.max_bytes
    assert Registration.from_dict(mutated(delivery=None)).options == defaults
    assert Registration.from_dict(mutated(delivery={})).options == defaults


@pytest_twisted.ensureDeferred
async def test_trailing_slash_url_sends_to_the_right_path(
    store: Any, reactor: Any, receiver: Receiver
) -> None:
    """With ``url: http://host:port/`` the transaction goes to ``/_matrix/...``, not ``//``."""
    reg = Registration.from_dict(
        mutated(
            url=receiver.url + "/",
            hs_token=HS_TOKEN,
            namespaces={"users": [{"regex": "@alice:.*", "exclusive": False}]},
        )
    )
    service, _recorder, _clock = make_service(store, [reg], reactor)
    service.startService()
    try:
        await service.submit([event(1)])
        await receiver.wait_for_events(1)
    finally:
        await service.stopService()
    assert receiver.event_ids == ["$e1"]
    assert receiver.requests[0].txn_id == str(txn_id(store, 1))


# -- secrets --


def test_secrets_are_not_in_repr(tmp_path: Path) -> None:
    for reg in (
        Registration.from_file(write(tmp_path, TELEGRAM_YAML)),
        Registration.from_dict(VALID),
    ):
        for text in (repr(reg), str(reg), f"{reg}", repr([reg]), repr({"r": reg})):
            assert AS_TOKEN not in text
            assert SECRET not in text
        assert reg.id in repr(reg)


def test_secrets_are_not_in_errors_about_other_fields(tmp_path: Path) -> None:
    for data in (mutated(url="ftp://h"), with_options(max_events=0), mutated(id=5)):
        with pytest.raises(InvalidRegistrationError) as info:
            Registration.from_dict(data)
        assert AS_TOKEN not in str(info.value)
        assert SECRET not in str(info.value)


@pytest.mark.parametrize("key", ["as_token", "hs_token"])
@pytest.mark.parametrize("value", [82734562348761234, 8273456.2348761234, ["8273456234876"]])
def test_a_token_of_the_wrong_type_is_not_echoed(key: str, value: object) -> None:
    """An unquoted numeric token is a number in YAML: the error must not log its digits."""
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_dict(mutated(**{key: value}))
    assert info.value.field == key
    assert "8273456" not in str(info.value)
    assert "non-empty string" in str(info.value)


# -- what does not load --

INVALID: list[Any] = [
    # the opt-ins to ephemeral and device data are booleans
    *[
        (mutated(**{key: value}), key, f"must be true or false, not {words}")
        for key in ("receive_ephemeral", "de.sorunome.msc2409.push_ephemeral", "org.matrix.msc3202")
        for value, words in (("yes", "the string 'yes'"), (1, "the number 1"), ([], "a list"))
    ],
    # required strings
    *[
        (mutated(**{key: ...}), key, "is required")
        for key in ("id", "as_token", "hs_token", "sender_localpart", "url")
    ],
    *[
        (mutated(**{key: value}), key, "non-empty string")
        for key, value in [
            ("id", 5),
            ("id", ""),
            ("id", None),
            ("id", ["a"]),
            ("as_token", True),
            ("as_token", ""),
            ("hs_token", {"a": 1}),
            ("hs_token", 1.5),
            ("sender_localpart", None),
            ("sender_localpart", []),
        ]
    ],
    # url
    (mutated(url=5), "url", "string or null"),
    (mutated(url=["http://h"]), "url", "string or null"),
    (mutated(url="ftp://example.com"), "url", "http:// or https://"),
    (mutated(url="localhost:8080"), "url", "http:// or https://"),
    (mutated(url="example.com"), "url", "http:// or https://"),
    (mutated(url="http://"), "url", "with a host"),
    (mutated(url="http:///path"), "url", "with a host"),
    (mutated(url="http://:8080"), "url", "with a host"),
    (mutated(url=""), "url", "http:// or https://"),
    (mutated(url="http://h:99999"), "url", "port"),
    (mutated(url="http://h:port"), "url", "port"),
    (mutated(url="http://h:-1"), "url", "port"),
    (mutated(url="http://h:0"), "url", "port 0"),
    (mutated(url="http://h:8080 "), "url", "port"),
    # urlsplit itself refuses these (ValueError)
    (mutated(url="http://[::1:8080"), "url", "not a valid URL"),
    (mutated(url="http://bridge\uff0fx@example.com"), "url", "not a valid URL"),
    (mutated(url="http://h:8080?token=x"), "url", "query or fragment"),
    (mutated(url="http://h:8080/#frag"), "url", "query or fragment"),
    (mutated(url="http://bridge host:8080"), "url", "white space"),
    # namespaces
    (with_namespaces("users"), "namespaces", "mapping"),
    (with_namespaces(5), "namespaces", "mapping"),
    (with_namespaces([{"regex": "@a:.*", "exclusive": True}]), "namespaces", "mapping"),
    (with_namespaces([]), "namespaces", "mapping"),
    (with_namespaces(""), "namespaces", "mapping"),
    (with_namespaces(False), "namespaces", "mapping"),
    (with_namespaces({"users": "@a:.*"}), "namespaces.users", "list"),
    (with_namespaces({"rooms": {"regex": "!a", "exclusive": True}}), "namespaces.rooms", "list"),
    (with_namespaces({"users": {}}), "namespaces.users", "list"),
    (with_namespaces({"aliases": 0}), "namespaces.aliases", "list"),
    (with_namespaces({"users": ["@a:.*"]}), "namespaces.users[0]", "mapping"),
    (with_namespaces({"aliases": [None]}), "namespaces.aliases[0]", "mapping"),
    (
        with_namespaces({"users": [{"exclusive": True}]}),
        "namespaces.users[0].regex",
        "non-empty string",
    ),
    (
        with_namespaces({"users": [{"regex": "", "exclusive": True}]}),
        "namespaces.users[0].regex",
        "non-empty string",
    ),
    (
        with_namespaces({"users": [{"regex": 5, "exclusive": True}]}),
        "namespaces.users[0].regex",
        "non-empty string",
    ),
    (
        with_namespaces({"users": [{"regex": "@a:.*"}]}),
        "namespaces.users[0].exclusive",
        "true or false",
    ),
    (
        with_namespaces({"users": [{"regex": "@a:.*", "exclusive": "yes"}]}),
        "namespaces.users[0].exclusive",
        "true or false",
    ),
    (
        with_namespaces({"users": [{"regex": "@a:.*", "exclusive": 1}]}),
        "namespaces.users[0].exclusive",
        "true or false",
    ),
    (
        with_namespaces(
            {"rooms": [{"regex": "!a", "exclusive": True}, {"regex": "!b", "exclusive": None}]}
        ),
        "namespaces.rooms[1].exclusive",
        "true or false",
    ),
    (
        with_namespaces({"users": [{"regex": "@a_(.*:hs", "exclusive": True}]}),
        "namespaces.users[0].regex",
        "not a valid regular expression",
    ),
    (
        with_namespaces(
            {"aliases": [{"regex": "#a", "exclusive": True}, {"regex": "*#b", "exclusive": False}]}
        ),
        "namespaces.aliases[1].regex",
        "not a valid regular expression",
    ),
    (
        with_namespaces({"users": [{"regex": "@a.*(?i)", "exclusive": True}]}),
        "namespaces.users[0].regex",
        "not a valid regular expression",
    ),
    (
        with_namespaces({"users": [{"regex": "@a{4294967296}", "exclusive": True}]}),
        "namespaces.users[0].regex",
        "not a valid regular expression",
    ),
    # delivery options
    (mutated(delivery="fast"), "delivery", "mapping"),
    (mutated(delivery=["max_events"]), "delivery", "mapping"),
    (mutated(delivery=[]), "delivery", "mapping"),
    (mutated(delivery=0), "delivery", "mapping"),
    (with_options(max_event=10), "delivery.max_event", "not a known option"),
    (with_options(maxEvents=10), "delivery.maxEvents", "not a known option"),
    (with_options(retry_delay=10), "delivery.retry_delay", "not a known option"),
    *[
        (with_options(**{name: value}), f"delivery.{name}", "positive")
        for name in (
            "max_events",
            "max_bytes",
            "initial_delay",
            "max_delay",
            "probe_interval",
            "connect_timeout",
            "request_timeout",
        )
        for value in (0, -1, True, False, "10", None)
    ],
    (with_options(max_events=1.5), "delivery.max_events", "positive integer"),
    (with_options(max_bytes=1000.0), "delivery.max_bytes", "positive integer"),
    *[
        (with_options(jitter=value), "delivery.jitter", "from 0 to below 1")
        for value in (-0.1, 1, 1.5, True, "0.2", None)
    ],
    (with_options(probe="yes"), "delivery.probe", "true or false"),
    (with_options(probe=1), "delivery.probe", "true or false"),
    (with_options(initial_delay=10, max_delay=5), "delivery.max_delay", "initial_delay"),
    (with_options(initial_delay=400), "delivery.max_delay", "initial_delay"),
    (with_options(protocol="xmpp"), "delivery.protocol", "matrix"),
    (with_options(protocol=None), "delivery.protocol", "matrix"),
    *[
        (with_options(**{name: value}), f"delivery.{name}", "positive")
        for name in ("initial_delay", "request_timeout", "probe_interval")
        for value in (math.nan, math.inf, -math.inf)
    ],
    (with_options(max_delay=math.inf), "delivery.max_delay", "positive"),
    (with_options(jitter=math.nan), "delivery.jitter", "from 0 to below 1"),
    *[
        (with_options(**{name: 10**400}), f"delivery.{name}", name)
        for name in ("initial_delay", "jitter")
    ],
]


def _check(
    info: pytest.ExceptionInfo[InvalidRegistrationError], source: str, field: str, words: str
) -> None:
    error = info.value
    message = str(error)
    assert error.source == source
    assert error.field == field
    assert source in message
    assert repr(field) in message
    assert words.lower() in message.lower()
    assert AS_TOKEN not in message
    assert SECRET not in message


def _case_id(index: int, case: Any) -> str:
    values = case.values if hasattr(case, "values") else case
    return f"{index}-{values[1]}"


INVALID_IDS = [_case_id(i, case) for i, case in enumerate(INVALID)]


@pytest.mark.parametrize(("data", "field", "words"), INVALID, ids=INVALID_IDS)
def test_invalid_mapping(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_dict(data, source="bridges/bridge.yaml")
    _check(info, "bridges/bridge.yaml", field, words)


@pytest.mark.parametrize(("data", "field", "words"), INVALID, ids=INVALID_IDS)
def test_invalid_file(tmp_path: Path, data: dict[str, Any], field: str, words: str) -> None:
    """The same mistakes in a YAML file: the error names the file."""
    path = write(tmp_path, yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_file(path)
    _check(info, str(path), field, words)


def test_default_source_is_named() -> None:
    with pytest.raises(InvalidRegistrationError, match=r"<mapping>: field 'url'"):
        Registration.from_dict(mutated(url="ftp://x"))


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_dict(with_options(max_event=10))
    assert "max_events" in info.value.reason


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("id: a\nurl: [unclosed\nas_token: x\n", None),
        ("id: a\nurl: http://h\n  as_token: x\n", 3),
        ("id: a\n\tas_token: x\n", None),
        ("id: 'a\n", None),
        ("namespaces:\n  users:\n  - regex: '@a:.*'\n    exclusive: true\n   - x\n", 5),
    ],
)
def test_invalid_yaml_names_the_file_and_line(tmp_path: Path, text: str, line: int | None) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_file(path)
    message = str(info.value)
    assert info.value.field is None
    assert str(path) in message
    assert "not valid YAML" in message
    found = re.search(r"\(line (\d+), column (\d+)\)", message)
    assert found is not None, message
    if line is not None:
        assert int(found.group(1)) == line


def test_invalid_yaml_on_a_token_line_does_not_repeat_the_token(tmp_path: Path) -> None:
    text = TELEGRAM_YAML.replace(f"hs_token: {SECRET}", f"hs_token: {SECRET}: oops")
    path = write(tmp_path, text)
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_file(path)
    assert "line 3" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("- id: a\n- id: b\n", "list"),
        ("just a string\n", "str"),
        ("42\n", "int"),
        ("", "NoneType"),
        ("# only a comment\n", "NoneType"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, found: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_file(path)
    assert info.value.field is None
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value)
    assert found in str(info.value)


@pytest.mark.parametrize("data", [None, [], "id: a", 5, [VALID]])
def test_from_dict_needs_a_mapping(data: object) -> None:
    with pytest.raises(InvalidRegistrationError, match="expected a mapping"):
        Registration.from_dict(data)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "registration.yaml"
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_file(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)
    assert "No such file" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_file(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "cannot read" in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, TELEGRAM_YAML)
    path.chmod(0)
    try:
        with pytest.raises(InvalidRegistrationError) as info:
            Registration.from_file(path)
    finally:
        path.chmod(0o600)
    assert str(path) in str(info.value)
    assert "Permission denied" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "registration.yaml"
    path.write_bytes(TELEGRAM_YAML.encode("utf-8") + b"description: caf\xe9\n")
    with pytest.raises(InvalidRegistrationError) as info:
        Registration.from_file(path)
    assert str(path) in str(info.value)
    assert "UTF-8" in str(info.value)


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "id: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InvalidRegistrationError, match="not valid YAML"):
        Registration.from_file(path)


def test_namespace_of() -> None:
    ns = Namespace.of("@a_.*", exclusive=True)
    assert ns == Namespace.of("@a_.*", True)
    assert ns.pattern.match("@a_1:hs")


# -- never anything but InvalidRegistrationError --

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400)])  # no float can hold these
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

KEYS = ("id", "url", "as_token", "hs_token", "sender_localpart", "namespaces", "delivery")
OPTION_NAMES = (
    "max_events",
    "max_bytes",
    "initial_delay",
    "max_delay",
    "jitter",
    "probe_interval",
    "probe",
    "connect_timeout",
    "request_timeout",
    "protocol",
)

good_option_values: dict[str, st.SearchStrategy[Any]] = {
    "max_events": st.integers(1, 1000),
    "max_bytes": st.integers(1, 10**7),
    "initial_delay": st.floats(0.001, 100),
    "max_delay": st.floats(0.001, 1000) | st.integers(1, 1000),
    "jitter": st.floats(0, 0.99),
    "probe_interval": st.floats(0.1, 100),
    "probe": st.booleans(),
    "connect_timeout": st.integers(1, 60),
    "request_timeout": st.floats(0.5, 600),
    "protocol": st.just("matrix"),
}

regexes = st.one_of(
    st.sampled_from(
        ["@a_.*:hs", "(?i)@A.*", "(a)\\1", "(?P<x>a)", "(", "a{2,1}", "[z-a]", "!r.*", "#a.*"]
    ),
    st.sampled_from(["@bridge_.*:hs", "!room.*", "#alias_.*:hs", ".*"]),
    st.text(max_size=12),
)

namespace_entries = st.fixed_dictionaries(
    {"regex": regexes}, optional={"exclusive": st.booleans() | st.booleans() | json_values}
)

good_urls = st.sampled_from(["http://h", "https://h:8443/", "http://127.0.0.1:29317/p/", None])
urls = st.one_of(
    good_urls,
    good_urls,
    good_urls,
    good_urls,
    st.sampled_from(["ftp://h", "http://:1", "http://h:99999", "h:80", "https://"]),
    st.text(max_size=20).map(lambda s: "http://" + s),
    st.text(max_size=20),
)


@st.composite
def registration_data(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid registrations with a few things broken (or not)."""

    def maybe_broken(good: st.SearchStrategy[Any]) -> Any:
        # one time in 16, something else (hypothesis likes bounds, so not 0 or 15)
        return draw(json_values) if draw(st.integers(0, 15)) == 5 else draw(good)

    namespaces: dict[str, Any] = {}
    for kind in draw(st.lists(st.sampled_from(["users", "rooms", "aliases"]), unique=True)):
        namespaces[kind] = maybe_broken(st.lists(namespace_entries, max_size=3))
    options: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from([*OPTION_NAMES, "max_event"]), max_size=4)):
        good = good_option_values.get(name, json_values)
        options[name] = maybe_broken(good)
    data: dict[str, Any] = {
        "id": maybe_broken(st.text(min_size=1, max_size=8)),
        "url": maybe_broken(urls),
        "as_token": maybe_broken(st.text(min_size=1, max_size=8)),
        "hs_token": maybe_broken(st.text(min_size=1, max_size=8)),
        "sender_localpart": maybe_broken(st.text(min_size=1, max_size=8)),
        "namespaces": maybe_broken(st.just(namespaces)),
        "delivery": maybe_broken(st.just(options)),
        "rate_limited": draw(json_values),
    }
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=1)):
        del data[key]
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(registration_data(), json_values))
def test_from_dict_raises_only_invalid_registration_error(data: object) -> None:
    error: InvalidRegistrationError | None = None
    try:
        reg = Registration.from_dict(data, source="prop.yaml")
    except InvalidRegistrationError as e:
        error = e
    if error is not None:
        assert error.source == "prop.yaml"
        assert str(error).startswith("invalid registration prop.yaml")
        return
    assert isinstance(reg, Registration)
    assert isinstance(data, dict)
    assert reg.id == data["id"]
    assert reg.hs_token == data["hs_token"]
    assert reg.url is None or reg.url.startswith(("http://", "https://"))
    assert not (reg.url or "").endswith("/")


def _corrupted(case: tuple[dict[str, Any], int, str]) -> str:
    """A registration as YAML, with some text put in somewhere."""
    data, where, junk = case
    text = yaml.safe_dump(data, allow_unicode=True)
    where %= len(text) + 1
    return text[:where] + junk + text[where:]


yaml_texts = st.one_of(
    st.text(max_size=200),
    st.tuples(
        registration_data(),
        st.integers(0, 10_000),
        st.sampled_from(["", ":", "- ", "\t", "'", "{"]),
    ).map(_corrupted),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_texts)
def test_from_file_raises_only_invalid_registration_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            Registration.from_file(path)
        except InvalidRegistrationError as e:
            message = str(e)
        else:
            message = str(path)
    assert str(path) in message
