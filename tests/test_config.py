"""The daemon's configuration file: defaults, paths, environment variables, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery import Housekeeping
from delivery.config import Config, ConfigError, load_config, parse_config


def parse(data: object, environ: dict[str, str] | None = None) -> Config:
    return parse_config(data, "delivery.yaml", Path("/etc/delivery"), environ or {})


TOKENS = {"ingest_token": "i" * 20, "admin_token": "a" * 20}


def test_defaults_are_what_the_docs_say() -> None:
    config = parse(TOKENS)
    assert config.database == "sqlite:////etc/delivery/delivery.db"
    assert config.listen == "tcp:8008:interface=127.0.0.1"
    assert config.poll_interval == 1.0
    assert config.metrics_token == config.admin_token
    assert config.max_events_per_request == 1000
    assert config.max_request_bytes == 10 * 1024 * 1024
    assert config.app_service_config_files == ()
    assert config.log.level == "info"
    assert (config.start_timeout, config.database_timeout) == (60.0, 60.0)


def test_relative_paths_are_taken_from_the_config_folder() -> None:
    config = parse(
        {
            **TOKENS,
            "database": "sqlite:///data/d.db",
            "app_service_config_files": ["bridges/telegram.yaml", "/abs/x.yaml"],
        }
    )
    assert config.database == "sqlite:////etc/delivery/data/d.db"
    assert config.app_service_config_files == (
        Path("/etc/delivery/bridges/telegram.yaml"),
        Path("/abs/x.yaml"),
    )
    assert parse({**TOKENS, "database": "sqlite:////var/d.db"}).database == "sqlite:////var/d.db"


def test_secrets_come_from_the_environment() -> None:
    config = parse(
        {"ingest_token": "${IN}", "admin_token": "prefix-${AD}"}, {"IN": "xyz", "AD": "abc"}
    )
    assert (config.ingest_token, config.admin_token) == ("xyz", "prefix-abc")
    assert "xyz" not in repr(config)
    assert "abc" not in repr(config)


def test_defaults_apply_to_every_registration(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "id: r\nurl: http://127.0.0.1:9\nas_token: a\nhs_token: h\nsender_localpart: b\n"
        "delivery: {max_events: 7}\n"
    )
    (tmp_path / "c.yaml").write_text(
        "ingest_token: iiii\nadmin_token: aaaa\napp_service_config_files: [r.yaml]\n"
        "defaults: {max_events: 50, max_delay: 60}\n"
    )
    (registration,) = load_config(tmp_path / "c.yaml").registrations()
    assert registration.options.max_events == 7  # its own setting wins
    assert registration.options.max_delay == 60  # the config's default


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"admin_token": "a"}, "ingest_token", "is empty"),
        ({**TOKENS, "ingest_token": "   "}, "ingest_token", "is empty"),
        ({**TOKENS, "ingest_token": 12345}, "ingest_token", "must be a string, not int"),
        ({**TOKENS, "poll_interval": 0}, "poll_interval", "positive number"),
        ({**TOKENS, "poll_interval": True}, "poll_interval", "positive number"),
        ({**TOKENS, "database_timeout": -1}, "database_timeout", "positive number"),
        ({**TOKENS, "max_request_bytes": 1.5}, "max_request_bytes", "positive integer"),
        ({**TOKENS, "defaults": {"max_events": -1}}, "defaults.max_events", "positive integer"),
        ({**TOKENS, "defaults": {"retries": 3}}, "defaults.retries", "not a known option"),
        ({**TOKENS, "defaults": []}, "defaults", "mapping"),
        ({**TOKENS, "log": {"level": "loud"}}, "log.level", "must be one of"),
        ({**TOKENS, "log": {"file": "x"}}, "log.file", "not a known key"),
        ({**TOKENS, "app_service_config_files": "r.yaml"}, "app_service_config_files", "list"),
        ({**TOKENS, "listen": "tcp:http"}, "listen", "Twisted endpoint"),
        ({**TOKENS, "server_name": ""}, "server_name", "homeserver name"),
        ({**TOKENS, "databse": "x"}, "databse", "not a known key"),
        ({**TOKENS, "database": "mysql://h/d"}, "database", "unknown kind 'mysql'"),
        ({**TOKENS, "database": "postgresql://u:pw@h/"}, "database", "names no database"),
    ],
)
def test_mistakes_name_the_key(data: object, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert info.value.key == key
    assert words in str(info.value)
    assert str(info.value).startswith("invalid configuration delivery.yaml: key ")
    assert "i" * 20 not in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("ingest_token: [unclosed", "not valid YAML (line 1"),
        ("- a list", "expected a mapping"),
        ("\udcff", "cannot read"),
    ],
)
def test_unreadable_files_say_why(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match="invalid configuration"):
        load_config(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert words in str(info.value) or "UTF-8" in str(info.value)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it: No such file"):
        load_config(tmp_path / "nope.yaml")


def test_the_http_limits_have_defaults_and_can_be_set() -> None:
    assert (parse(TOKENS).http.max_connections, parse(TOKENS).http.body_timeout) == (512, 30.0)
    http = parse({**TOKENS, "http": {"max_connections": 20, "body_timeout": 2.5}}).http
    assert (http.max_connections, http.body_timeout) == (20, 2.5)


@pytest.mark.parametrize(
    ("http", "key", "words"),
    [
        (5, "http", "must be a mapping"),
        ({"max_connection": 5}, "http.max_connection", "is not a known key (known: body_timeout"),
        ({"max_connections": 0}, "http.max_connections", "must be a positive integer, not 0"),
        ({"max_connections": 2.5}, "http.max_connections", "must be a positive integer"),
        ({"max_connections": True}, "http.max_connections", "must be a positive integer"),
        ({"body_timeout": "30s"}, "http.body_timeout", "must be a positive number, not '30s'"),
        ({"body_timeout": -1}, "http.body_timeout", "must be a positive number"),
    ],
)
def test_a_bad_http_limit_names_its_key(http: object, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({**TOKENS, "http": http})
    assert e.value.key == key
    assert words in str(e.value)
    assert str(e.value).startswith("invalid configuration delivery.yaml: key ")


def test_housekeeping_has_defaults_and_can_be_set() -> None:
    assert parse(TOKENS).housekeeping() == Housekeeping()
    config = parse(
        {
            **TOKENS,
            "retention": 5,
            "dedupe_window": 10.5,
            "attempt_retention": 60,
            "attempts_per_service": 7,
            "housekeeping_batch_size": 50,
            "housekeeping_pace": 0,
            "housekeeping_interval": 2,
        }
    )
    assert config.housekeeping() == Housekeeping(
        retention=5,
        dedupe_window=10.5,
        attempt_retention=60,
        attempts_per_service=7,
        batch_size=50,
        pace=0,
        interval=2,
    )


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"retention": 0}, "retention", "must be a positive number, not 0"),
        ({"retention": "1h"}, "retention", "must be a positive number, not '1h'"),
        ({"retention": 100000}, "dedupe_window", "at least retention (100000 s), not 86400 s"),
        ({"dedupe_window": 60}, "dedupe_window", "must be at least retention (3600 s)"),
        ({"attempt_retention": -1}, "attempt_retention", "must be a positive number"),
        ({"attempts_per_service": 2.5}, "attempts_per_service", "must be a positive integer"),
        ({"housekeeping_batch_size": 0}, "housekeeping_batch_size", "positive integer"),
        ({"housekeeping_pace": -0.1}, "housekeeping_pace", "must be a number of seconds >= 0"),
        ({"housekeeping_pace": True}, "housekeeping_pace", "must be a number of seconds >= 0"),
        ({"housekeeping_interval": 0}, "housekeeping_interval", "must be a positive number"),
    ],
)
def test_a_bad_housekeeping_key_is_named(data: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({**TOKENS, **data})
    assert e.value.key == key
    assert words in str(e.value)


# -- cluster --

PG = {**TOKENS, "database": "postgresql://delivery@db.example.org/delivery"}


def test_without_a_cluster_section_postgres_is_a_cluster_of_one_and_sqlite_none() -> None:
    from delivery.cluster import Cluster, default_node_id

    assert parse(TOKENS).cluster is None
    assert parse(TOKENS).node() is None  # SQLite: no cluster
    config = parse(PG)
    assert config.cluster is None
    assert config.node() == Cluster()
    assert config.node() == Cluster(node_id=default_node_id(), lease_ttl=15)


def test_the_cluster_section_sets_the_node_id_and_lease_ttl() -> None:
    from delivery.cluster import Cluster

    config = parse({**PG, "cluster": {"node_id": "delivery-${N}", "lease_ttl": 30}}, {"N": "2"})
    assert config.node() == Cluster(node_id="delivery-2", lease_ttl=30)
    assert parse({**PG, "cluster": {"lease_ttl": 4.5}}).node() == Cluster(lease_ttl=4.5)
    assert parse({**PG, "cluster": {}}).node() == Cluster()
    assert parse({**PG, "cluster": None}).node() == Cluster()


@pytest.mark.parametrize(
    ("cluster", "key", "words"),
    [
        ([], "cluster", "must be a mapping, such as {node_id: delivery-1, lease_ttl: 15}"),
        ("node-1", "cluster", "must be a mapping"),
        ({"node": "x"}, "cluster.node", "is not a known key (known: lease_ttl, node_id)"),
        ({"node_id": ""}, "cluster.node_id", "must be a name of 1 to 200 characters"),
        ({"node_id": "  "}, "cluster.node_id", "must be a name of 1 to 200 characters"),
        ({"node_id": 7}, "cluster.node_id", "unique among the daemons, not 7"),
        ({"node_id": "x" * 201}, "cluster.node_id", "must be a name of 1 to 200 characters"),
        ({"node_id": "${UNSET_NODE}"}, "cluster.node_id", "UNSET_NODE, which is not set"),
        ({"lease_ttl": 2}, "cluster.lease_ttl", "must be a number of seconds >= 3, not 2"),
        ({"lease_ttl": 0}, "cluster.lease_ttl", "must be a number of seconds >= 3, not 0"),
        ({"lease_ttl": -15}, "cluster.lease_ttl", ">= 3, not -15"),
        ({"lease_ttl": "15s"}, "cluster.lease_ttl", ">= 3, not '15s'"),
        ({"lease_ttl": True}, "cluster.lease_ttl", ">= 3, not True"),
        ({"lease_ttl": float("inf")}, "cluster.lease_ttl", ">= 3, not inf"),
        ({"lease_ttl": float("nan")}, "cluster.lease_ttl", ">= 3, not nan"),
    ],
)
def test_a_bad_cluster_key_is_named(cluster: object, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({**PG, "cluster": cluster})
    assert e.value.key == key
    assert words in str(e.value)
    assert str(e.value).startswith("invalid configuration delivery.yaml: key ")
    assert "x" * 100 not in str(e.value)  # a long value is quoted short


def test_a_request_timeout_longer_than_a_lease_allows_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "id: slow\nurl: http://127.0.0.1:9\nas_token: a\nhs_token: h\nsender_localpart: b\n"
        "delivery: {request_timeout: 11}\n"
    )

    def config(extra: str) -> Config:
        (tmp_path / "c.yaml").write_text(
            "ingest_token: iiii\nadmin_token: aaaa\napp_service_config_files: [r.yaml]\n"
            "database: postgresql://delivery@db.example.org/delivery\n" + extra
        )
        return load_config(tmp_path / "c.yaml")

    # the default lease_ttl (15 s) allows 10 s, the default request_timeout
    with pytest.raises(ConfigError) as e:
        config("").registrations()
    assert e.value.key == "cluster.lease_ttl"
    assert "the request_timeout of 'slow' (11 s) is longer" in str(e.value)
    assert "at most 10 s (two thirds of lease_ttl)" in str(e.value)
    assert "lower request_timeout or raise cluster.lease_ttl" in str(e.value)
    with pytest.raises(ConfigError, match=r"with lease_ttl 6 s: at most 4 s"):
        config("cluster: {lease_ttl: 6}\n").registrations()
    (registration,) = config("cluster: {lease_ttl: 16.5}\n").registrations()
    assert registration.options.request_timeout == 11
    # SQLite has no leases: any request_timeout
    (tmp_path / "c.yaml").write_text(
        "ingest_token: iiii\nadmin_token: aaaa\napp_service_config_files: [r.yaml]\n"
    )
    assert load_config(tmp_path / "c.yaml").registrations() == [registration]


def test_a_cluster_section_on_sqlite_says_to_use_postgres() -> None:
    with pytest.raises(ConfigError) as e:
        parse({**TOKENS, "cluster": {"node_id": "a"}})
    assert e.value.key == "cluster"
    assert "SQLite is single-process" in str(e.value)
    assert "use PostgreSQL to run several daemons" in str(e.value)
    with pytest.raises(ConfigError, match="SQLite is single-process"):
        parse({**TOKENS, "cluster": {}})


def test_a_cluster_section_does_not_leak_the_database_password() -> None:
    data = {**TOKENS, "database": "postgresql://u:pw-in-url@h/d", "cluster": {"lease_ttl": 1}}
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert "pw-in-url" not in str(e.value)
    sqlite = {**TOKENS, "database": "sqlite:///pw-in-path.db", "cluster": {}}
    with pytest.raises(ConfigError) as e:
        parse(sqlite)
    assert "pw-in-path" not in str(e.value)
