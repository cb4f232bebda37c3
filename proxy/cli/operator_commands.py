"""The operator commands behind the CLI: policy explain and pins, audit verify, cache care.

Each returns an exit status and prints its result; none starts the server. The `cache`
commands open the cache the way the gate does (`Cache.open`, whatever `storage.backend`
is). `cache gc` needs the gate stopped (it takes the store's lock); `cache stats` and
`cache verify` run beside a running gate.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from proxy.errors import RegistryError
from proxy.observability.audit import format_verify_result, verify
from proxy.observability.audit_chains import format_chains_result, verify_chains
from proxy.policy.explain import explain, format_explanation
from proxy.policy.principal import Principal
from proxy.policy.rules import load_policy
from proxy.settings import ConfigError, Settings
from proxy.storage.blobstore import StorageLocked
from proxy.storage.cache import Cache, close_pin_store, pin_store
from proxy.storage.pins import PinStore, PinStoreError, parse_repository
from proxy.storage.redis_client import RedisState

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@asynccontextmanager
async def open_pins(settings: Settings) -> AsyncIterator[PinStore]:
    """The pin store the gate of these settings uses (Redis, when configured)."""
    shared = RedisState.from_settings(settings.redis) if settings.redis is not None else None
    pins = pin_store(settings, shared)
    try:
        yield pins
    finally:
        await close_pin_store(pins)
        if shared is not None:
            await shared.close()


async def policy_explain(
    settings: Settings,
    action: str,
    reference: str,
    user: str | None,
    groups: Sequence[str],
    *,
    as_json: bool,
) -> int:
    """Explain a decision without touching an upstream."""
    policy = load_policy(
        list(settings.policy.files),
        settings.policy.registries_conf,
        known_registries=frozenset(u.registry for u in settings.upstreams),
    )
    principal = Principal(user, frozenset(groups))
    try:
        async with open_pins(settings) as pins:
            result = await explain(
                policy, pins, principal, action, reference, push_registry=settings.push_registry
            )
    except (RegistryError, ValueError) as exc:
        message = exc.message if isinstance(exc, RegistryError) else str(exc)
        print(f"registry-gate: {message}")
        return EXIT_USAGE
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_explanation(result))
    return EXIT_OK if result.allowed is not False else EXIT_FAILED


async def pins_list(settings: Settings) -> int:
    """Print every pin, one JSON object a line: name, repository, created, created_by
    (null: unknown, for pins written before creators were recorded)."""
    try:
        async with open_pins(settings) as store:
            pins = await store.list()
    except PinStoreError as exc:
        print(f"registry-gate: {exc.message}")
        return EXIT_FAILED
    for pin in pins:
        print(json.dumps(pin.to_dict()))
    return EXIT_OK


async def pins_set(settings: Settings, name: str, repository: str) -> int:
    """Pin (or re-pin) a short name to a fully-qualified repository of a configured
    upstream; every replica resolves it there from now on."""
    try:
        target = parse_repository(repository)
    except (ValueError, RegistryError) as exc:
        message = exc.message if isinstance(exc, RegistryError) else str(exc)
        print(f"registry-gate: {message}")
        return EXIT_USAGE
    if target.registry not in {upstream.registry for upstream in settings.upstreams}:
        print(f"registry-gate: {target.registry} is not a configured upstream")
        return EXIT_USAGE
    async with open_pins(settings) as store:
        try:
            pin = await store.set(name, target)
        except ValueError as exc:
            print(f"registry-gate: {exc}")
            return EXIT_USAGE
        except PinStoreError as exc:
            print(f"registry-gate: {exc.message}")
            return EXIT_FAILED
    print(json.dumps(pin.to_dict()))
    return EXIT_OK


async def pins_remove(settings: Settings, names: Sequence[str]) -> int:
    """Remove pins; the next pull of the name resolves (and pins) afresh."""
    status = EXIT_OK
    async with open_pins(settings) as store:
        for name in names:
            try:
                removed = await store.remove(name)
            except PinStoreError as exc:
                print(f"registry-gate: {exc.message}")
                status = EXIT_FAILED
                continue
            if removed:
                print(f"removed pin {name}")
            else:
                print(f"no pin for {name}")
                status = EXIT_FAILED
    return status


def audit_verify(paths: Sequence[Path], *, partial: bool) -> int:
    """Verify audit files (oldest first); non-zero naming the first bad line.

    Given a folder, every replica's chain in it (and in the files given beside it) is
    verified on its own and reported per replica.
    """
    if any(path.is_dir() for path in paths):
        outcome = verify_chains(paths, allow_partial=partial)
        print(format_chains_result(outcome, paths))
        return EXIT_OK if outcome.ok else EXIT_FAILED
    result = verify(list(paths), allow_partial=partial)
    print(format_verify_result(result))
    return EXIT_OK if result.ok else EXIT_FAILED


async def cache_command(settings: Settings, command: str, *, remove: bool) -> int:
    """`cache stats|verify|gc`."""
    storage = settings.storage
    try:
        cache = await Cache.open(storage, None, exclusive=command == "gc")
    except StorageLocked:
        print("registry-gate: the cache is in use by a running gate; stop it for `cache gc`")
        return EXIT_FAILED
    except ConfigError as exc:
        print(f"registry-gate: {exc}")
        return EXIT_FAILED
    blobs, manifests = cache.blobs, cache.manifests
    try:
        if command == "stats":
            blob_stats = await blobs.stats()
            manifest_stats = await manifests.stats()
            where: dict[str, str] = {"backend": storage.backend, "path": str(storage.path)}
            if storage.s3 is not None:
                where |= {"bucket": storage.s3.bucket, "prefix": storage.s3.prefix}
            print(
                json.dumps(
                    {
                        **where,
                        "blobs": blob_stats.count,
                        "blob_bytes": blob_stats.bytes,
                        # Fills of the running gate so far (its reservations and blobs
                        # removed while open are in its registry_gate_cache_bytes).
                        "filling_bytes": blob_stats.filling,
                        "used_bytes": blob_stats.used,
                        "max_size": blob_stats.max_size,
                        "manifests": manifest_stats.count,
                        "manifest_bytes": manifest_stats.bytes,
                    },
                    indent=2,
                )
            )
            return EXIT_OK
        if command == "verify":
            bad = await blobs.verify(remove=remove) + await manifests.verify(remove=remove)
            for digest in bad:
                print(f"corrupt: {digest}{' (removed)' if remove else ''}")
            print(f"{len(bad)} corrupt entr{'y' if len(bad) == 1 else 'ies'}")
            return EXIT_OK if not bad else EXIT_FAILED
        evicted = await blobs.gc()
        print(f"evicted {len(evicted)} blobs, {sum(size for _, size in evicted)} bytes")
        return EXIT_OK
    finally:
        await cache.close()
