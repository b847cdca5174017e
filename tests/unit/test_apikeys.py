"""API keys stored hashed (storage/apikeys.py): the plaintext never reaches Redis."""

from __future__ import annotations

import asyncio
import hashlib

import fakeredis
import pytest
import redis

from storage import keys
from storage.apikeys import (
    KEY_PREFIX,
    ApiKeyStore,
    AsyncApiKeyStore,
    KeyInfo,
    UnknownPlan,
    hash_key,
)


@pytest.fixture
def store(client: redis.Redis) -> ApiKeyStore:
    return ApiKeyStore(client)


def async_lookup(server: fakeredis.FakeServer, key: str | None) -> KeyInfo | None:
    async def scenario() -> KeyInfo | None:
        return await AsyncApiKeyStore(fakeredis.aioredis.FakeRedis(server=server)).lookup(key)

    return asyncio.run(scenario())


def everything_stored(client: redis.Redis) -> list[bytes]:
    """Every key name, field and value on the fake server."""
    found: list[bytes] = []
    for name in client.scan_iter():
        found.append(name)
        kind = client.type(name)
        if kind == b"hash":
            for field, value in client.hgetall(name).items():
                found += [field, value]
        elif kind == b"string":
            found.append(client.get(name))
        elif kind == b"set":
            found += list(client.smembers(name))
        elif kind == b"zset":
            found += list(client.zrange(name, 0, -1))
        elif kind == b"list":
            found += client.lrange(name, 0, -1)
        else:
            pytest.fail(f"unexpected key type {kind!r}")
    return found


def test_create_returns_a_prefixed_random_key(store: ApiKeyStore) -> None:
    key, info = store.create("alice")
    other, other_info = store.create("alice")
    assert key.startswith(KEY_PREFIX)
    assert len(key) >= len(KEY_PREFIX) + 40
    assert key != other
    assert info.id != other_info.id
    assert info.name == "alice"
    assert info.revoked is False


def test_the_plaintext_is_stored_nowhere(store: ApiKeyStore, client: redis.Redis) -> None:
    key, _ = store.create("alice")
    secret = key.removeprefix(KEY_PREFIX).encode()
    stored = everything_stored(client)
    assert stored  # the scan saw the key's records
    assert not any(secret in item for item in stored)
    assert not any(key.encode() in item for item in stored)
    # What is stored is the digest.
    assert any(hash_key(key).encode() in item for item in stored)


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("dq_abc") == hashlib.sha256(b"dq_abc").hexdigest()


def test_lookup_finds_the_created_key(store: ApiKeyStore, server: fakeredis.FakeServer) -> None:
    key, info = store.create("alice")
    assert store.lookup(key) == info
    assert async_lookup(server, key) == info


def test_lookup_distinguishes_keys(store: ApiKeyStore) -> None:
    alice, alice_info = store.create("alice")
    bob, bob_info = store.create("bob")
    assert store.lookup(alice) == alice_info
    assert store.lookup(bob) == bob_info
    assert store.lookup(alice + "x") is None


def test_register_is_idempotent(store: ApiKeyStore, client: redis.Redis) -> None:
    first = store.register("dq_devstack-fixed-key", "dev")
    names_before = client.hgetall(keys.API_KEY_NAMES)
    again = store.register("dq_devstack-fixed-key", "renamed")
    assert again == first
    assert again.name == "dev"
    assert client.hgetall(keys.API_KEY_NAMES) == names_before
    assert names_before == {first.id.encode(): hash_key("dq_devstack-fixed-key").encode()}
    assert store.lookup("dq_devstack-fixed-key") == first


def test_revoked_keys_are_not_found(
    store: ApiKeyStore, client: redis.Redis, server: fakeredis.FakeServer
) -> None:
    key, _ = store.create("alice")
    client.hset(keys.api_key(hash_key(key)), "revoked", "1")
    assert store.lookup(key) is None
    assert async_lookup(server, key) is None


def test_async_lookup_of_an_unknown_key_is_none(server: fakeredis.FakeServer) -> None:
    assert async_lookup(server, KEY_PREFIX + "x" * 43) is None


@pytest.mark.parametrize("key", [None, "", "no-prefix-key", "DQ_upper-prefix"])
def test_async_lookup_refuses_malformed_keys_even_when_stored(
    store: ApiKeyStore, server: fakeredis.FakeServer, key: str | None
) -> None:
    if key:
        store.register(key, "stored without the prefix")
    assert async_lookup(server, key) is None


def test_async_lookup_refuses_keys_over_128_characters(
    store: ApiKeyStore, server: fakeredis.FakeServer
) -> None:
    longest = KEY_PREFIX + "a" * (128 - len(KEY_PREFIX))
    too_long = longest + "a"
    info = store.register(longest, "longest")
    store.register(too_long, "too long")
    assert async_lookup(server, longest) == info
    assert async_lookup(server, too_long) is None


def test_a_key_gets_a_webhook_secret_and_a_given_one_replaces_it(store: ApiKeyStore) -> None:
    from dreamq.signing import is_secret, new_secret

    _, info = store.create("tenant")
    found = store.webhook_secrets(info.id)
    assert found is not None and is_secret(found.primary) and found.previous is None
    assert found.signing(0.0) == [found.primary]
    assert store.webhook_secrets("unknown") is None
    assert store.rotate_webhook_secret("unknown", window_seconds=1) is None

    fixed = new_secret()
    dev = store.register("dq_dev-key", "dev", webhook_secret=fixed)
    assert store.webhook_secrets(dev.id).primary == fixed  # type: ignore[union-attr]
    again = new_secret()
    store.register("dq_dev-key", "dev", webhook_secret=again)  # a restarted dev stack
    assert store.webhook_secrets(dev.id).primary == again  # type: ignore[union-attr]


# ---------------------------------------------------------------- plans, revocation, listing

PLANS = ("basic", "unlimited")


def test_a_key_keeps_its_plan_and_lookup_returns_it(
    client: redis.Redis, server: fakeredis.FakeServer
) -> None:
    store = ApiKeyStore(client, plans=PLANS)
    key, info = store.create("customer", plan="basic")
    default_key, default_info = store.create("operator")
    assert info.plan == "basic"
    assert default_info.plan is None  # the deployment's default plan applies
    assert store.lookup(key) == info
    assert async_lookup(server, key) == info
    found = async_lookup(server, default_key)
    assert found is not None and found.plan is None


def test_an_unknown_plan_is_refused_and_nothing_is_stored(client: redis.Redis) -> None:
    store = ApiKeyStore(client, plans=PLANS)
    with pytest.raises(UnknownPlan, match="unknown plan 'gold' \\(plans: basic, unlimited\\)"):
        store.create("customer", plan="gold")
    assert client.keys() == []
    _, info = store.create("customer", plan="basic")
    with pytest.raises(UnknownPlan):
        store.set_plan(info.id, "gold")
    assert store.get(info.id) == info


def test_set_plan_applies_to_the_next_lookup(
    client: redis.Redis, server: fakeredis.FakeServer
) -> None:
    store = ApiKeyStore(client, plans=PLANS)
    key, info = store.create("customer")
    changed = store.set_plan(info.id, "basic")
    assert changed is not None and changed.plan == "basic"
    found = async_lookup(server, key)
    assert found is not None and found.plan == "basic"
    assert store.set_plan("no-such-id", "basic") is None


def test_a_revoked_key_is_refused_from_the_next_lookup(
    store: ApiKeyStore, server: fakeredis.FakeServer
) -> None:
    key, info = store.create("alice")
    other, _ = store.create("bob")
    assert async_lookup(server, key) == info
    revoked = store.revoke(info.id)
    assert revoked is not None and revoked.revoked
    assert store.lookup(key) is None
    assert async_lookup(server, key) is None
    assert async_lookup(server, other) is not None  # only that key
    assert store.revoke(info.id) is not None  # idempotent
    assert store.revoke("no-such-id") is None


def test_list_shows_every_key_oldest_first_and_never_the_key_or_its_hash(
    client: redis.Redis,
) -> None:
    store = ApiKeyStore(client, plans=PLANS)
    created = [store.create(name, plan=plan) for name, plan in [("a", "basic"), ("b", None)]]
    store.revoke(created[0][1].id)
    listed = store.list()
    shown_fields = [(i.name, i.plan, i.revoked) for i in listed]
    assert shown_fields == [("a", "basic", True), ("b", None, False)]
    assert [i.id for i in listed] == [info.id for _, info in created]
    shown = repr(listed)
    for key, _ in created:
        assert key not in shown and key.removeprefix(KEY_PREFIX) not in shown
        assert hash_key(key) not in shown
    assert ApiKeyStore(fakeredis.FakeRedis()).list() == []


def lookup_with_get(
    server: fakeredis.FakeServer, key: str | None, name: str
) -> tuple[KeyInfo | None, list[object]]:
    async def lookup() -> tuple[KeyInfo | None, list[object]]:
        keys_store = AsyncApiKeyStore(fakeredis.aioredis.FakeRedis(server=server))
        return await keys_store.lookup_with(key, [("GET", name)])

    return asyncio.run(lookup())


def test_lookup_with_reads_the_key_and_more_in_one_go(
    store: ApiKeyStore, client: redis.Redis, server: fakeredis.FakeServer
) -> None:
    """The fetch's round trip: the key's lookup and the record, whatever the key turns out."""
    key, info = store.create("alice")
    client.set("other", "value")
    assert lookup_with_get(server, key, "other") == (info, [b"value"])
    client.hset(keys.api_key(hash_key(key)), "revoked", "1")
    assert lookup_with_get(server, key, "other") == (None, [b"value"])
    assert lookup_with_get(server, KEY_PREFIX + "x" * 43, "other") == (None, [b"value"])


@pytest.mark.parametrize("key", [None, "no-prefix-key", KEY_PREFIX + "a" * 128])
def test_lookup_with_a_malformed_key_reads_nothing(
    store: ApiKeyStore, client: redis.Redis, server: fakeredis.FakeServer, key: str | None
) -> None:
    client.set("other", "value")
    assert lookup_with_get(server, key, "other") == (None, [])
