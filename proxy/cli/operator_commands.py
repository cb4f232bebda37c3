"""The operator commands behind the CLI: policy explain and pins, audit verify, cache care.

Each returns an exit status and prints its result; none starts the server. `cache gc`
needs the gate stopped (it takes the store's lock); `cache stats` and `cache verify` run
beside a running gate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from proxy.errors import RegistryError
from proxy.observability.audit import format_verify_result, verify
from proxy.observability.audit_chains import format_chains_result, verify_chains
from proxy.policy.explain import explain, format_explanation
from proxy.policy.principal import Principal
from proxy.policy.rules import load_policy
from proxy.settings import Settings
from proxy.storage.blobstore import FilesystemBlobStore, StorageLocked
from proxy.storage.manifest_cache import FilesystemManifestStore
from proxy.storage.pins import FilePinStore

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def pin_store(settings: Settings) -> FilePinStore:
    """The pin store the gate of these settings uses."""
    path = settings.policy.pins_path
    return FilePinStore(path) if path else FilePinStore.under(settings.storage.path)


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
        result = await explain(
            policy,
            pin_store(settings),
            principal,
            action,
            reference,
            push_registry=settings.push_registry,
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
    for pin in await pin_store(settings).list():
        print(json.dumps(pin.to_dict()))
    return EXIT_OK


async def pins_remove(settings: Settings, names: Sequence[str]) -> int:
    """Remove pins; the next pull of the name resolves (and pins) afresh."""
    store = pin_store(settings)
    status = EXIT_OK
    for name in names:
        if await store.remove(name):
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
    blobs = FilesystemBlobStore(storage.path, storage.max_size)
    try:
        await blobs.open(exclusive=command == "gc")
    except StorageLocked:
        print("registry-gate: the cache is in use by a running gate; stop it for `cache gc`")
        return EXIT_FAILED
    manifests = FilesystemManifestStore(storage.path)
    await manifests.open()
    try:
        if command == "stats":
            blob_stats = await blobs.stats()
            manifest_stats = await manifests.stats()
            print(
                json.dumps(
                    {
                        "path": str(storage.path),
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
        await blobs.close()
