"""
Interest: which application services want an event. Matrix (Synapse) semantics: the
``users`` namespace matches the sender and the ``state_key`` of ``m.room.member`` events,
``rooms`` the ``room_id``, ``aliases`` the room's aliases (looked up through the embedder);
regexes match at the start of the string (``re.match``); ``exclusive`` plays no part in who
receives an event.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, gatherResults

from delivery import Registration
from delivery.interest import InterestIndex, RoutingFields, _Matcher, literal_prefix

from .harness import event, make_service, txn_id, txn_ids
from .receiver import HS_TOKEN, Receiver, start_receiver, stop_receiver

MEMBER = "m.room.member"


def reg(
    service_id: str,
    *,
    users: Iterable[str] = (),
    rooms: Iterable[str] = (),
    aliases: Iterable[str] = (),
    url: str | None = "http://127.0.0.1:9",
    exclusive: bool = True,
    sender_localpart: str | None = None,
) -> Registration:
    def entries(regexes: Iterable[str]) -> list[dict[str, Any]]:
        return [{"regex": r, "exclusive": exclusive} for r in regexes]

    return Registration.from_dict(
        {
            "id": service_id,
            "url": url,
            "as_token": f"as-{service_id}",
            "hs_token": HS_TOKEN,
            "sender_localpart": sender_localpart or f"{service_id}bot",
            "namespaces": {
                "users": entries(users),
                "rooms": entries(rooms),
                "aliases": entries(aliases),
            },
        }
    )


def fields(
    sender: str | None = "@alice:hs",
    room_id: str | None = "!room:hs",
    type: str | None = "m.room.message",
    state_key: str | None = None,
) -> RoutingFields:
    return RoutingFields(sender=sender, room_id=room_id, type=type, state_key=state_key)


#: compiled on our own (not the registration's ``pattern``), cached for the 1,000 case
_regex = functools.cache(re.compile)


def brute_force(
    registrations: Iterable[Registration],
    f: RoutingFields,
    aliases: Sequence[str] = (),
    server_name: str | None = None,
) -> frozenset[str]:
    """What the index must answer, the slow and obvious way (Synapse's rules)."""
    users = [f.sender] if f.sender is not None else []
    if f.type == MEMBER and f.state_key is not None:
        users.append(f.state_key)
    found = set()
    for r in registrations:
        if r.url is None:
            continue
        own = f"@{r.sender_localpart}:{server_name}" if server_name is not None else None
        if (
            any(_regex(n.regex).match(u) for n in r.users for u in users)
            or own in users
            or (f.room_id is not None and any(_regex(n.regex).match(f.room_id) for n in r.rooms))
            or any(_regex(n.regex).match(a) for n in r.aliases for a in aliases)
        ):
            found.add(r.id)
    return frozenset(found)


# -- the rules, one at a time --


def test_users_namespace_matches_the_sender() -> None:
    index = InterestIndex([reg("tg", users=[r"@telegram_.*:hs"])])
    assert index.route(fields(sender="@telegram_123:hs")) == {"tg"}
    assert index.route(fields(sender="@alice:hs")) == frozenset()
    assert index.route(fields(sender=None)) == frozenset()


def test_users_namespace_matches_the_state_key_of_member_events() -> None:
    index = InterestIndex([reg("tg", users=[r"@telegram_.*:hs"])])
    invite = fields(sender="@alice:hs", type=MEMBER, state_key="@telegram_123:hs")
    assert index.route(invite) == {"tg"}
    assert index.route(fields(sender="@alice:hs", type=MEMBER, state_key="@bob:hs")) == set()


@pytest.mark.parametrize("event_type", ["m.room.power_levels", "m.room.name", "m.custom", None])
def test_state_key_of_other_events_is_not_a_user(event_type: str | None) -> None:
    index = InterestIndex([reg("tg", users=[r"@telegram_.*:hs"])])
    other = fields(sender="@alice:hs", type=event_type, state_key="@telegram_123:hs")
    assert index.route(other) == frozenset()


def test_rooms_namespace_matches_the_room_id() -> None:
    index = InterestIndex([reg("irc", rooms=[r"!irc_.*:hs"])])
    assert index.route(fields(room_id="!irc_freenode:hs")) == {"irc"}
    assert index.route(fields(room_id="!other:hs")) == frozenset()
    assert index.route(fields(room_id=None)) == frozenset()
    # a room namespace never matches users, nor a user namespace rooms
    assert index.route(fields(sender="!irc_x:hs", room_id="!other:hs")) == frozenset()


def test_aliases_namespace_matches_the_rooms_aliases() -> None:
    index = InterestIndex([reg("slack", aliases=[r"#slack_.*:hs"]), reg("other", users=["@x.*"])])
    assert index.wants_aliases
    f = fields(room_id="!abc:hs")
    assert index.route(f) == frozenset()
    assert index.route(f, ["#general:hs"]) == frozenset()
    assert index.route(f, ["#general:hs", "#slack_general:hs"]) == {"slack"}
    # an alias is not matched as a room id, nor as a user
    assert index.route(fields(sender="#slack_x:hs", room_id="#slack_y:hs")) == frozenset()


def test_wants_aliases_only_with_an_aliases_namespace() -> None:
    assert not InterestIndex([reg("a", users=["@a.*"], rooms=["!a.*"])]).wants_aliases
    assert not InterestIndex([reg("a", aliases=["#a.*"], url=None)]).wants_aliases
    assert InterestIndex([reg("a", aliases=["#a.*"])]).wants_aliases


@pytest.mark.parametrize("exclusive", [True, False])
def test_exclusive_or_not_both_deliver(exclusive: bool) -> None:
    index = InterestIndex(
        [reg("a", users=["@a_.*"], rooms=["!a_.*"], aliases=["#a_.*"], exclusive=exclusive)]
    )
    assert index.route(fields(sender="@a_1:hs")) == {"a"}
    assert index.route(fields(room_id="!a_1:hs")) == {"a"}
    assert index.route(fields(room_id="!x:hs"), ["#a_1:hs"]) == {"a"}


def test_two_services_receive_the_same_event() -> None:
    index = InterestIndex(
        [
            reg("exclusive", users=["@bridge_.*"], exclusive=True),
            reg("watcher", users=["@.*"], exclusive=False),
            reg("rooms", rooms=["!shared:hs"], exclusive=False),
            reg("nobody", users=["@nobody:hs"]),
        ]
    )
    assert index.route(fields(sender="@bridge_1:hs", room_id="!shared:hs")) == {
        "exclusive",
        "watcher",
        "rooms",
    }
    assert index.route(fields(sender="@carol:hs", room_id="!x:hs")) == {"watcher"}


def test_sender_room_and_member_state_key_combine() -> None:
    index = InterestIndex(
        [reg("u", users=["@u_.*"]), reg("m", users=["@m_.*"]), reg("r", rooms=["!r.*"])]
    )
    f = fields(sender="@u_1:hs", room_id="!r1:hs", type=MEMBER, state_key="@m_1:hs")
    assert index.route(f) == {"u", "m", "r"}


def test_a_registration_without_url_receives_nothing() -> None:
    index = InterestIndex(
        [
            reg("silent", users=["@.*"], rooms=["!.*"], aliases=["#.*"], url=None),
            reg("loud", users=["@loud.*"]),
        ]
    )
    assert index.route(fields(sender="@anyone:hs", room_id="!r:hs"), ["#a:hs"]) == frozenset()
    assert index.route(fields(sender="@loud:hs")) == {"loud"}


@pytest.mark.parametrize(
    ("regex", "value", "matches"),
    [
        ("@bridge_.*", "@bridge_1:hs", True),
        ("bridge_.*", "@bridge_1:hs", False),  # re.search would find it
        (".*bridge_.*", "@bridge_1:hs", True),
        ("@bridge_1:hs", "@bridge_1:hs.evil", True),  # a prefix, as in Synapse
        ("@bridge_1:hs$", "@bridge_1:hs.evil", False),
        ("^@bridge_1:hs$", "@bridge_1:hs", True),
        ("@a|@b", "@b:hs", True),  # a top-level alternation stays whole
        ("@x:hs|@bridge", "@bridge_1:hs", True),
        ("@BRIDGE_.*", "@bridge_1:hs", False),  # case matters
        (r"@bridge_\d+:hs", "@bridge_12:hs", True),
        (r"@bridge_\d+:hs", "@bridge_x:hs", False),
    ],
)
def test_regexes_match_at_the_start(regex: str, value: str, matches: bool) -> None:
    regs = [reg("r", users=[regex], rooms=[regex]), reg("filler", users=["@filler_.*"])]
    index = InterestIndex(regs)
    expected = {"r"} if matches else set()
    assert index.route(fields(sender=value, room_id=None)) == expected
    assert index.route(fields(sender=None, room_id=value)) == expected
    assert bool(re.match(regex, value)) == matches


@pytest.mark.parametrize(
    ("regex", "yes", "no"),
    [
        ("(?i)@BRIDGE_.*", "@Bridge_1:hs", "@other:hs"),  # global inline flag
        ("(?s)@bridge.*:hs", "@bridge\n:hs", "@other:hs"),
        ("(?x) @bridge _ .*  # verbose", "@bridge_1:hs", "@bridge 1:hs"),
        (r"@(\w)\1_.*", "@aa_1:hs", "@ab_1:hs"),  # backreference
        (r"@(?P<c>\w)(?P=c)_.*", "@bb_1:hs", "@bc_1:hs"),  # named backreference
        (r"(?P<all>@named_.*)", "@named_1:hs", "@name_1:hs"),  # named group
        (r"@(?i:BRIDGE)_.*", "@bridge_1:hs", "@other:hs"),  # scoped flag
        (r"(?<!x)@look.*", "@look_1:hs", "@other:hs"),  # lookbehind
    ],
)
def test_patterns_that_cannot_be_combined_still_work(regex: str, yes: str, no: str) -> None:
    # Surrounded by ordinary patterns with groups of their own, which would shift group
    # numbers or clash with names if everything were joined into one regex.
    regs = [
        reg("before", users=[r"(@before)_(.*)", r"(?P<c>@c)_.*"]),
        reg("tricky", users=[regex]),
        reg("after", users=[r"(@after)_.*"]),
    ]
    index = InterestIndex(regs)
    assert index.route(fields(sender=yes)) == {"tricky"}
    assert index.route(fields(sender=no)) == brute_force(regs, fields(sender=no))
    assert "tricky" not in index.route(fields(sender=no))
    assert index.route(fields(sender="@before_1:hs")) == {"before"}
    assert index.route(fields(sender="@after_1:hs")) == {"after"}


def test_conditional_group_patterns_still_work() -> None:
    """``(?(1)...)`` refers to a group number: joined after another pattern's groups, it
    would look at the wrong group."""
    regs = [
        reg("before", users=[r"(@x)?@before_.*"]),
        reg("tricky", users=[r"(y)?(?(1)@b|@c)_.*"]),
        reg("named", users=[r"(?P<q>z)?(?(q)@d|@e)_.*"]),
    ]
    index = InterestIndex(regs)
    assert re.match(r"(y)?(?(1)@b|@c)_.*", "y@b_1:hs")
    assert index.route(fields(sender="y@b_1:hs")) == {"tricky"}
    assert index.route(fields(sender="@c_1:hs")) == {"tricky"}
    assert index.route(fields(sender="y@c_1:hs")) == frozenset()
    assert index.route(fields(sender="z@d_1:hs")) == {"named"}
    assert index.route(fields(sender="@e_1:hs")) == {"named"}
    assert index.route(fields(sender="@x@before_1:hs")) == {"before"}


def test_server_name_makes_the_services_own_user_interesting() -> None:
    regs = [
        reg("tg", users=["@telegram_.*"], sender_localpart="telegrambot"),
        reg("wa", users=["@whatsapp_.*"], sender_localpart="whatsappbot"),
    ]
    with_name = InterestIndex(regs, server_name="example.org")
    without = InterestIndex(regs)
    bot = "@telegrambot:example.org"
    assert with_name.route(fields(sender=bot)) == {"tg"}
    assert without.route(fields(sender=bot)) == frozenset()
    # invites of the bot, by someone else
    invite = fields(sender="@alice:example.org", type=MEMBER, state_key=bot)
    assert with_name.route(invite) == {"tg"}
    assert without.route(invite) == frozenset()
    # the same localpart on another server is someone else, and only the very user counts
    for other in ["@telegrambot:evil.org", "@telegrambot:exampleXorg", bot + ".evil", bot + "\n"]:
        assert with_name.route(fields(sender=other)) == frozenset(), other
    assert with_name.route(fields(sender=bot[:-1])) == frozenset()
    assert with_name.users(bot) == {"tg"}
    assert with_name.users("@whatsappbot:example.org") == {"wa"}


def test_server_name_with_shared_sender_localpart_and_no_url() -> None:
    regs = [
        reg("a", sender_localpart="bot"),
        reg("b", sender_localpart="bot"),
        reg("c", sender_localpart="bot", url=None),
    ]
    index = InterestIndex(regs, server_name="hs")
    assert index.route(fields(sender="@bot:hs")) == {"a", "b"}


def test_routing_is_cached_but_correct_on_repeats() -> None:
    index = InterestIndex([reg("a", users=["@a.*"]), reg("b", users=["@b.*"])], cache_size=2)
    for _ in range(3):
        for sender, expected in [("@a1", {"a"}), ("@b1", {"b"}), ("@c1", set()), ("@a2", {"a"})]:
            assert index.route(fields(sender=sender, room_id=None)) == expected


# -- many registrations --

N = 1000


def many_registrations(url_for: dict[int, str] | None = None) -> list[Registration]:
    """
    ``N`` bridges, each with its user namespace, every 7th with a room namespace, every
    50th with an alias namespace, every 100th non-exclusive and wider (``@bridge{i}.*``
    also takes bridge{i}0.. bridge{i}9..), and a few with no url.
    """
    url_for = url_for or {}
    regs = []
    for i in range(N):
        users = [rf"@bridge{i}_.*:hs"]
        if i % 100 == 3:
            users.append(rf"@bridge{i}.*")
        regs.append(
            reg(
                f"bridge{i}",
                users=users,
                rooms=[rf"!room{i}_.*:hs"] if i % 7 == 0 else [],
                aliases=[rf"#alias{i}_.*:hs"] if i % 50 == 0 else [],
                url=None if i % 97 == 96 else url_for.get(i, "http://127.0.0.1:9"),
                exclusive=i % 100 != 3,
            )
        )
    return regs


def random_fields(rng: random.Random) -> tuple[RoutingFields, list[str]]:
    def user() -> str:
        return rng.choice(
            [f"@bridge{rng.randrange(N)}_{rng.randrange(5)}:hs", "@alice:hs", "@bridge5:hs"]
        )

    kind = rng.random()
    room = rng.choice([f"!room{rng.randrange(N)}_x:hs", "!plain:hs"])
    aliases = [f"#alias{rng.randrange(0, N, 10)}_x:hs"] if rng.random() < 0.3 else []
    if kind < 0.3:
        return fields(sender=user(), room_id=room, type=MEMBER, state_key=user()), aliases
    return fields(sender=user(), room_id=room), aliases


def test_a_thousand_registrations_route_like_brute_force() -> None:
    regs = many_registrations()
    index = InterestIndex(regs, server_name="hs")
    rng = random.Random(1000)
    samples = [random_fields(rng) for _ in range(300)]
    routed = 0
    for f, aliases in samples:
        expected = brute_force(regs, f, aliases, server_name="hs")
        assert index.route(f, aliases) == expected, (f, aliases)
        routed += bool(expected)
    assert routed > 100
    # the wide, non-exclusive namespaces take their prefixes too
    assert index.route(fields(sender="@bridge303_1:hs", room_id=None)) == {
        "bridge303",
        "bridge3",
    }
    # the services' own bots
    assert index.route(fields(sender="@bridge42bot:hs", room_id=None)) == {"bridge42"}


# Patterns for the property test: plain and wide ones, anchors, alternations, and the kinds
# the prefilter cannot join (flags, backreferences, named groups, conditional groups).
PATTERNS = [
    r"(a)?(?(1)@a|@b).*",
    r"(@)?(?(1)a_|z).*",
    "@a_.*",
    "@a.*",
    "@b_.*:hs",
    "@.*",
    "(@a)_(.*)",
    "@a_1:hs$",
    "@a|@b",
    r"(?i)@A_.*",
    r"@(\w)\1.*",
    r"@(?P<c>\w)(?P=c).*",
    r"(?P<x>@b).*",
    "!r1.*",
    "!r.*:hs",
    "#al_.*",
    r"@a\_.*",
    "@ab?_.*",
    "@a{2}.*",
    r"^@b_\d",
    "(?s).*1.*",
    ".*:other",
]
VALUES = ["@a_1:hs", "@ab_1:hs", "@a1:hs", "@aa:hs", "@b_1:hs", "@bb:hs", "@A_1:hs", "@z:other",
          "!r1:hs", "!r2:hs", "#al_1:hs", "#al_2:other"]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(PATTERNS), max_size=3),
            st.lists(st.sampled_from(PATTERNS), max_size=2),
            st.lists(st.sampled_from(PATTERNS), max_size=2),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
    st.lists(
        st.tuples(
            st.sampled_from([*VALUES, None]),
            st.sampled_from([*VALUES, None]),
            st.sampled_from([MEMBER, "m.room.message", None]),
            st.sampled_from([*VALUES, None]),
            st.lists(st.sampled_from(VALUES), max_size=2),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_index_agrees_with_brute_force(
    specs: list[tuple[list[str], list[str], list[str], bool]],
    events: list[tuple[str | None, str | None, str | None, str | None, list[str]]],
) -> None:
    regs = [
        reg(f"s{i}", users=u, rooms=r, aliases=a, url=None if no_url else "http://h")
        for i, (u, r, a, no_url) in enumerate(specs)
    ]
    index = InterestIndex(regs, server_name="hs")
    for sender, room_id, event_type, state_key, aliases in events:
        f = fields(sender=sender, room_id=room_id, type=event_type, state_key=state_key)
        assert index.route(f, aliases) == brute_force(regs, f, aliases, server_name="hs")


# -- literal prefixes --


@pytest.mark.parametrize(
    ("regex", "prefix"),
    [
        (r"@slack_.*:example\.org", "@slack_"),
        (r"@_discord_[0-9]+:example\.org", "@_discord_"),
        ("@telegram_.*", "@telegram_"),
        (r"!abc123:example\.org", "!abc123:example.org"),  # all of it
        (r"#irc_.*:example\.org", "#irc_"),
        (r"^@whatsapp_.*:example\.org$", "@whatsapp_"),  # a leading anchor is no character
        (r"^^\A@x_.*", "@x_"),
        (r"@a\:b\_c\\d\ e\-f", "@a:b_c\\d e-f"),  # escaped punctuation is itself
        ("@é_.*", "@é_"),
        # a quantifier takes the character before it out of the prefix
        ("@ab?c", "@a"),
        ("@ab*", "@a"),
        ("@ab+", "@a"),
        ("@ab{2}", "@a"),
        ("@ab{,2}", "@a"),
        ("@ab??", "@a"),
        (r"@a\.?b", "@a"),
        (r"@a\d", "@a"),  # an escape that is a class, an anchor or a reference ends it
        (r"@a\w", "@a"),
        (r"@a\b", "@a"),
        (r"@a\Z", "@a"),
        (r"@a\nb", "@a"),
        (r"(@a)\1", ""),
        ("@a[b]", "@a"),
        ("@a(b)", "@a"),
        ("@a(?i:B)", "@a"),
        ("@a(?=b)", "@a"),
        ("@a.b", "@a"),
        ("@a$", "@a"),
        ("@a}", "@a"),
        # nothing usable
        ("a*", ""),
        (".*", ""),
        ("[@]a", ""),
        ("(@a)", ""),
        ("(?:@a)", ""),
        (r"\d@", ""),
        ("(?i)@a", ""),
        ("(?s)@a.*", ""),
        ("(?x)@a", ""),
        ("(?<!x)@a", ""),
        ("(?#note)@a", ""),
        # an alternation anywhere, even where it could not split the pattern
        ("@a|@b", ""),
        ("@a(?:b|c)", ""),
        (r"@a\|", ""),
        ("@a[|]", ""),
    ],
)
def test_literal_prefix(regex: str, prefix: str) -> None:
    assert literal_prefix(re.compile(regex)) == prefix


def test_flags_given_to_compile_mean_no_prefix() -> None:
    assert literal_prefix(re.compile("@a_.*")) == "@a_"
    assert literal_prefix(re.compile("@a_.*", re.IGNORECASE)) == ""
    assert literal_prefix(re.compile("@a_.*", re.ASCII)) == ""


def test_nested_and_neighbouring_prefixes() -> None:
    """
    A string is tried against every prefix it starts with, however many other prefixes sort
    between them.
    """
    regexes = ["@", "@a", "@a_", "@a_b", "@a_b_c", "@a_bc", "@a_c", "@ab", "@b", "@a_b:hs$", "!"]
    regs = [reg(r, users=[r + ".*" if "$" not in r else r]) for r in regexes]
    index = InterestIndex(regs)
    assert index.users("@a_b_c:hs") == {"@", "@a", "@a_", "@a_b", "@a_b_c"}
    assert index.users("@a_b:hs") == {"@", "@a", "@a_", "@a_b", "@a_b:hs$"}
    assert index.users("@a_bz") == {"@", "@a", "@a_", "@a_b"}
    assert index.users("@a_d") == {"@", "@a", "@a_"}
    assert index.users("@aa") == {"@", "@a"}
    assert index.users("@c") == {"@"}
    assert index.users("") == index.users("#") == frozenset()
    values = ["@a_b_c:hs", "@a_b:hs\n", "@a_bcd", "@a_c_", "@abc", "@b_", "!x", "@a_b:hsx"]
    for value in values + [v[:n] for v in values for n in range(len(v))]:
        assert index.users(value) == brute_force(regs, fields(sender=value, room_id=None)), value


class CountingPattern:
    """A compiled regex that records the strings it is tried on."""

    def __init__(self, regex: str) -> None:
        self._compiled = re.compile(regex)
        self.pattern = regex
        self.flags = self._compiled.flags
        self.tried: list[str] = []

    def match(self, value: str) -> re.Match[str] | None:
        self.tried.append(value)
        return self._compiled.match(value)


def test_a_string_is_tried_only_against_the_patterns_whose_prefix_it_starts_with() -> None:
    regexes = [rf"@bridge{i}_.*:hs" for i in range(300)] + ["@bridge1.*", "@b", "@.*", "!r"]
    general = ["(@).*", "@x|@y", r"(@z)\1"]  # two behind the prefilter, one alone
    counting = [CountingPattern(r) for r in regexes + general]
    matcher = _Matcher([(r.pattern, cast(re.Pattern[str], r)) for r in counting], cache_size=0)
    values = ["@bridge15_1:hs", "@bridge1_x", "@bridge1", "@bridge999_1:hs", "@b", "@", "!r1"]
    for value in values:
        expected = {r for r in regexes + general if re.match(r, value)}
        assert matcher.services(value) == expected
    by_regex = {r.pattern: r.tried for r in counting}
    for regex in regexes:
        prefix = literal_prefix(re.compile(regex))
        assert by_regex[regex] == [v for v in values if v.startswith(prefix)], regex
    assert by_regex["(@).*"] == by_regex["@x|@y"] == [v for v in values if v.startswith("@")]
    assert by_regex[r"(@z)\1"] == values


# Patterns built from pieces, each piece with a string it matches: plain and escaped
# characters, classes, groups, quantifiers (which take a character out of the prefix),
# anchors, flags, lookarounds and alternations (which leave no prefix at all). The
# alphabet is small so that prefixes often nest and strings often match several patterns.
CHARS = ["@", "a", "b", "A", "_", ":", "!", "é", " "]
ESCAPED = ["\\" + c for c in ".:_@-\\*([{^| "]
#: weights (by repetition): mostly plain characters, so that most patterns have a prefix
FLAGS = [""] * 9 + ["(?i)", "(?s)", "(?a)"]
ATOMS = ["char"] * 8 + ["escaped"] * 3 + ["dot", "class", "digit"]
NESTED = ["group", "scoped", "alternation"]
#: each with how many times the piece may then come
QUANTIFIERS = {"?": (0, 1), "??": (0, 1), "{,1}": (0, 1), "*": (0, 2), "*?": (0, 2),
               "{0,2}": (0, 2), "+": (1, 2), "+?": (1, 2), "{1,2}": (1, 2), "{2}": (2, 2),
               "{0}": (0, 0)}  # fmt: skip


def _recase(draw: Callable[[st.SearchStrategy[bool]], bool], text: str) -> str:
    """``text`` with some ASCII letters in the other case, which ``(?i)`` allows."""
    return "".join(
        c.swapcase() if c.isascii() and c.isalpha() and draw(st.booleans()) else c for c in text
    )


@st.composite
def atoms(draw: st.DrawFn, depth: int, plain: bool = False) -> tuple[str, str]:
    """A piece that a quantifier may follow, and a string it matches."""
    kinds = ["char"] * 3 + ["escaped"] if plain else ATOMS + (NESTED if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "char":
        c = draw(st.sampled_from(CHARS))
        return c, c
    if kind == "escaped":
        e = draw(st.sampled_from(ESCAPED))
        return e, e[1]
    if kind == "dot":
        return ".", draw(st.sampled_from(CHARS))
    if kind == "class":
        return draw(st.sampled_from([("[ab]", "b"), ("[^@]", "a"), ("[a-c]", "c"), ("[.]", ".")]))
    if kind == "digit":
        return draw(st.sampled_from([(r"\d", "7"), (r"\w", "a"), (r"\w", "_"), (r"\s", " ")]))
    inner, text = draw(sequences(depth + 1))
    if kind == "group":
        return draw(st.sampled_from(["({})", "(?:{})"])).format(inner), text
    if kind == "scoped":
        return f"(?i:{inner})", _recase(draw, text)
    other, other_text = draw(sequences(depth + 1))
    return f"(?:{inner}|{other})", draw(st.sampled_from([text, other_text]))


@st.composite
def sequences(draw: st.DrawFn, depth: int = 0, plain: int = 0) -> tuple[str, str]:
    """
    Pieces one after another, each perhaps quantified, the first ``plain`` of them
    characters, and a string they match.
    """
    regex, text = "", ""
    for n in range(plain + draw(st.integers(0 if plain else 1, 4))):
        if n >= plain and draw(st.integers(0, 7)) == 3:
            # lookarounds that hold anywhere in a string of our alphabet (no z in it)
            regex += draw(st.sampled_from(["(?!z)", "(?<!z)"]))
            continue
        atom, sample = draw(atoms(depth, plain=n < plain))
        quantifier = draw(st.sampled_from([""] * 16 + list(QUANTIFIERS)))
        least, most = QUANTIFIERS.get(quantifier, (1, 1))
        regex += atom + quantifier
        text += sample * draw(st.integers(least, most))
    return regex, text


@st.composite
def patterns(draw: st.DrawFn) -> tuple[str, str]:
    """A whole pattern and a string it matches (with ``re.match``)."""
    regex, text = draw(sequences(plain=draw(st.integers(0, 4))))
    if draw(st.integers(0, 7)) == 3:
        other, other_text = draw(sequences(plain=draw(st.integers(0, 4))))
        regex, text = f"{regex}|{other}", draw(st.sampled_from([text, other_text]))
    flags = draw(st.sampled_from(FLAGS))
    anchor = draw(st.sampled_from(["", "", "^", r"\A", "^^"]))
    end = draw(st.sampled_from(["", "", "", "$", r"\Z"]))
    if "|" in regex and end:
        regex = f"(?:{regex})"
    text = _recase(draw, text) if flags == "(?i)" else text
    return flags + anchor + regex + end, text


def near(data: st.DataObject, text: str) -> list[str]:
    """``text`` and strings close to it: cut short, made longer, one character changed."""
    i = data.draw(st.integers(0, len(text)))
    return [
        text,
        text[:i],
        text + data.draw(st.sampled_from(["a", "_", ":hs", "\n"])),
        text[:i] + data.draw(st.sampled_from(CHARS)) + text[i + 1 :],
        _recase(data.draw, text),
    ]


@settings(max_examples=400, deadline=None)
@given(patterns(), st.data())
def test_every_string_a_pattern_matches_starts_with_its_literal_prefix(
    spec: tuple[str, str], data: st.DataObject
) -> None:
    regex, text = spec
    pattern = re.compile(regex)
    assert pattern.match(text), "the generated string must match its pattern"
    prefix = literal_prefix(pattern)
    for value in near(data, text):
        if pattern.match(value):
            assert value.startswith(prefix), (regex, prefix, value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(patterns(), min_size=1, max_size=8), st.data())
def test_generated_patterns_route_like_brute_force(
    specs: list[tuple[str, str]], data: st.DataObject
) -> None:
    regs = [reg(f"s{i}", users=[regex], rooms=[regex]) for i, (regex, _) in enumerate(specs)]
    index = InterestIndex(regs)
    for _regex, text in specs:
        for value in near(data, text):
            for f in (fields(sender=value, room_id=None), fields(sender=None, room_id=value)):
                assert index.route(f) == brute_force(regs, f), value


# -- end to end, through DeliveryService --


@pytest_twisted.ensureDeferred
async def test_aliases_through_the_embedders_lookup(
    store: Any, reactor: Any, receiver: Receiver
) -> None:
    aliases = {"!one:hs": ["#elsewhere:hs", "#slack_general:hs"], "!two:hs": ["#other:hs"]}
    looked_up: list[str] = []

    async def alias_lookup(room_id: str) -> list[str]:
        looked_up.append(room_id)
        # answer later, as a homeserver asking its database would
        d: Deferred[None] = Deferred()
        reactor.callLater(0, d.callback, None)
        await d
        return aliases.get(room_id, [])

    regs = [reg("slack", aliases=[r"#slack_.*:hs"], url=receiver.url)]
    service, _recorder, _clock = make_service(store, regs, reactor, alias_lookup=alias_lookup)
    service.startService()
    try:
        await service.submit(
            [
                event(1, room="!one:hs"),
                event(2, room="!two:hs"),
                event(3, room="!three:hs"),
                event(4, room="!one:hs"),
            ]
        )
        await receiver.wait_for_events(2)
        # one more, to be sure nothing else was on its way
        await service.submit([event(5, room="!one:hs")])
        await receiver.wait_for_events(3)
    finally:
        await service.stopService()
    assert receiver.event_ids == ["$e1", "$e4", "$e5"]
    assert set(looked_up) == {"!one:hs", "!two:hs", "!three:hs"}


@pytest_twisted.ensureDeferred
async def test_a_failing_alias_lookup_delays_routing_but_loses_nothing(
    store: Any, reactor: Any, receiver: Receiver
) -> None:
    failed: Deferred[None] = Deferred()
    calls: list[str] = []

    async def alias_lookup(room_id: str) -> list[str]:
        calls.append(room_id)
        if len(calls) == 1:
            # let the sorter finish failing before the test goes on
            reactor.callLater(0, failed.callback, None)
            raise ConnectionError("the homeserver's database is away")
        return ["#slack_general:hs"] if room_id == "!one:hs" else []

    regs = [reg("slack", aliases=[r"#slack_.*:hs"], url=receiver.url)]
    service, _recorder, clock = make_service(
        store, regs, reactor, alias_lookup=alias_lookup, poll_interval=2.0
    )
    service.startService()
    try:
        await service.submit([event(1, room="!one:hs"), event(2, room="!two:hs")])
        await failed
        assert receiver.requests == []
        clock.advance(2.0)  # the sorter's next poll
        await receiver.wait_for_events(1)
        await service.routed()
    finally:
        await service.stopService()
    assert receiver.event_ids == ["$e1"]
    assert calls[0] == "!one:hs"
    assert sorted(calls[1:]) == ["!one:hs", "!two:hs"]


@pytest_twisted.ensureDeferred
async def test_no_alias_lookup_without_an_aliases_namespace(
    store: Any, reactor: Any, receiver: Receiver
) -> None:
    looked_up: list[str] = []

    async def alias_lookup(room_id: str) -> list[str]:
        looked_up.append(room_id)
        return []

    regs = [reg("a", users=["@alice:.*"], url=receiver.url)]
    service, _recorder, _clock = make_service(store, regs, reactor, alias_lookup=alias_lookup)
    service.startService()
    try:
        await service.submit([event(1)])
        await receiver.wait_for_events(1)
    finally:
        await service.stopService()
    assert looked_up == []


@pytest_twisted.ensureDeferred
async def test_null_url_service_queues_nothing(
    store: Any, reactor: Any, receiver: Receiver
) -> None:
    regs = [
        reg("silent", users=["@.*"], rooms=["!.*"], url=None),
        reg("loud", users=["@alice:.*"], url=receiver.url),
    ]
    service, _recorder, _clock = make_service(store, regs, reactor)
    service.startService()
    try:
        await service.submit([event(1), event(2)])
        await receiver.wait_for_events(2)
        silent = await service.status("silent")
    finally:
        await service.stopService()
    assert receiver.event_ids == ["$e1", "$e2"]
    assert silent.queued_events == 0
    assert silent.stored_transactions == 0
    assert silent.last_txn_id == txn_id(store, 0)  # none given out


@pytest_twisted.ensureDeferred
async def test_server_name_end_to_end(store: Any, reactor: Any, receiver: Receiver) -> None:
    regs = [reg("tg", users=["@telegram_.*:hs"], sender_localpart="tgbot", url=receiver.url)]
    service, _recorder, _clock = make_service(store, regs, reactor, server_name="hs")
    service.startService()
    try:
        await service.submit(
            [
                event(1, sender="@tgbot:hs"),
                event(2, sender="@alice:hs"),
                event(3, sender="@alice:hs", type=MEMBER, state_key="@tgbot:hs"),
                event(4, sender="@telegram_9:hs"),
            ]
        )
        await receiver.wait_for_events(3)
    finally:
        await service.stopService()
    assert receiver.event_ids == ["$e1", "$e3", "$e4"]


RECEIVING = [0, 3, 7, 14, 49, 50, 96, 100, 101, 203, 303, 350, 499, 500, 501, 512, 613, 700,
             777, 803, 850, 903, 950, 998, 999]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_a_thousand_registrations_end_to_end(store: Any, reactor: Any) -> None:
    """
    1,000 registrations, 25 of them (one without url) pointing at receivers of their own:
    each receiver gets exactly the events the brute force says, in stream order, and the
    services that point nowhere do not hold anyone up.
    """
    receivers = {i: await start_receiver(reactor) for i in RECEIVING}
    try:
        regs = many_registrations({i: r.url for i, r in receivers.items()})
        rng = random.Random(7)
        events: list[dict[str, Any]] = []
        aliases: dict[str, list[str]] = {}
        for n in range(600):
            i = rng.choice(RECEIVING) if rng.random() < 0.9 else rng.randrange(N)
            choice = rng.random()
            if choice < 0.4:
                e = event(n, sender=f"@bridge{i}_{n % 3}:hs", room=f"!plain{n % 5}:hs")
            elif choice < 0.6:
                e = event(n, sender="@alice:hs", room=f"!room{i}_x:hs")
            elif choice < 0.75:
                e = event(n, sender="@alice:hs", room="!plain:hs", type=MEMBER,
                          state_key=f"@bridge{i}_{n}:hs")  # fmt: skip
            elif choice < 0.85:
                e = event(n, sender="@alice:hs", room=f"!aliased{i}:hs")
                aliases[f"!aliased{i}:hs"] = [f"#alias{i}_room:hs"]
            else:
                e = event(n, sender=f"@bridge{i}bot:hs", room="!plain:hs")
            events.append(e)

        async def alias_lookup(room_id: str) -> list[str]:
            return aliases.get(room_id, [])

        service, _recorder, _clock = make_service(
            store, regs, reactor, alias_lookup=alias_lookup, server_name="hs"
        )
        expected: dict[int, list[str]] = {i: [] for i in RECEIVING}
        by_id = {r.id: r for r in regs}
        for e in events:
            f = fields(e["sender"], e["room_id"], e["type"], e.get("state_key"))
            for sid in brute_force(regs, f, aliases.get(e["room_id"], []), server_name="hs"):
                i = int(sid.removeprefix("bridge"))
                if i in expected and by_id[sid].url is not None:
                    expected[i].append(e["event_id"])
        assert all(expected[i] for i in RECEIVING if by_id[f"bridge{i}"].url is not None)
        assert expected[96] == []  # no url

        service.startService()
        try:
            await service.submit(events[:300])
            await service.submit(events[300:])
            await gatherResults([receivers[i].wait_for_events(len(expected[i])) for i in RECEIVING])
            # anything extra would have been sent with the last of the expected ones
            await service.submit([event(10_000, sender="@bridge0_x:hs")])
            await receivers[0].wait_for_events(len(expected[0]) + 1)
        finally:
            await service.stopService()
        for i in RECEIVING:
            got = receivers[i].event_ids
            want = expected[i] + (["$e10000"] if i == 0 else [])
            assert got == want, f"bridge{i}"
            assert len(set(got)) == len(got)
            assert [r.txn_id for r in receivers[i].accepted] == txn_ids(
                service.store, *range(1, len(receivers[i].accepted) + 1)
            )
    finally:
        for r in receivers.values():
            await stop_receiver(r)
