"""
Database URLs are shown with every password hidden, in each form libpq reads one, and
what cannot be read with certainty is hidden whole.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from delivery.errors import InvalidStoreURLError, StoreConfigurationError
from delivery.store import open_store, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
        ("postgres://user:pw@host:5432/db", "postgres://user:***@host:5432/db"),
        ("postgresql://:pw@host/db", "postgresql://:***@host/db"),
        ("postgresql://user:@host/db", "postgresql://user:***@host/db"),
        # percent-encoded, and characters a URL should have encoded
        ("postgresql://user:p%40ss%2Fw%3F@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:pa#ss@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:p@ss@host/db", "postgresql://***"),
        ("postgresql://user:pa/ss@host/db", "postgresql://***"),
        ("postgresql://user:pa?ss@host/db", "postgresql://***"),
        ("postgresql://user:pw", "postgresql://***"),
        # parameters
        ("postgresql://user@host/db?password=pw", "postgresql://user@host/db?password=***"),
        (
            "postgresql://host/db?sslmode=require&password=pw&user=u",
            "postgresql://host/db?sslmode=require&password=***&user=u",
        ),
        ("postgresql://host/db?sslpassword=pw", "postgresql://host/db?sslpassword=***"),
        ("postgresql://host/db?pass%77ord=pw", "postgresql://host/db?pass%77ord=***"),
        ("postgresql://host?password=pw@x", "postgresql://host?password=***"),
        ("postgresql://host/db?password=a&b", "postgresql://host/db?***"),
        (
            "postgresql:///db?host=/run/postgresql&password=pw",
            "postgresql:///db?host=/run/postgresql&password=***",
        ),
        (
            "postgresql://u:pw@[::1]:5432,other:5433/db?target_session_attrs=any",
            "postgresql://u:***@[::1]:5432,other:5433/db?target_session_attrs=any",
        ),
        # key/value connection strings
        ("host=x password=pw dbname=y", "host=x password=*** dbname=y"),
        ("host=x  password = 'a b\\' c'  dbname=y", "host=x password=*** dbname=y"),
        ("password=p\\ w host=x", "password=*** host=x"),
        ("host=x password='unterminated", "***"),
        # nothing to hide, or nothing that can be read
        (
            "postgresql://user@host:5432/db?sslmode=require",
            "postgresql://user@host:5432/db?sslmode=require",
        ),
        ("sqlite:////var/lib/delivery@1.db", "sqlite:////var/lib/delivery@1.db"),
        ("delivery.db", "delivery.db"),
        ("user:pw@host/db", "***"),
    ],
)
def test_every_password_libpq_reads_is_hidden(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h:5432/",
        "mysql://u:hunter2@h/x",
        "host=h password=hunter2 dbname=x",
        "postgresql://u:hunter2@[::1/x",
        "sqlite://u:hunter2@h/x.db",
    ],
)
def test_errors_about_a_url_never_show_its_password(url: str) -> None:
    with pytest.raises(InvalidStoreURLError) as info:
        open_store(url)
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_a_password_quoted_back_by_libpq_is_hidden(reactor: Any) -> None:
    store = open_store("postgresql://user:hunter2%zz@127.0.0.1:1/db", reactor)
    assert "hunter2" not in repr(store)
    with pytest.raises(StoreConfigurationError) as info:
        await store.open()  # libpq: 'invalid percent-encoded token: "hunter2%zz"'
    await store.close()
    assert "percent-encoded token" in str(info.value)
    assert "hunter2" not in str(info.value)
