"""The `registry-gate` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web

from proxy import __version__
from proxy.app import build_app, build_metrics_app, build_services
from proxy.cli import client_config, operator_commands, workers
from proxy.cli.preflight import describe, preflight, setting_named_in, tls_context
from proxy.http.drain import DRAIN, Drain
from proxy.http.server import GateRunner
from proxy.observability.logging_setup import configure_logging
from proxy.services import Services
from proxy.settings import ConfigError, Settings, host_port, load_settings

EXIT_CONFIG = 2
# Seconds of shutdown_timeout kept for closing (audit flush, cache) after the drain.
_CLOSE_RESERVE = 5.0
log = logging.getLogger("registry_gate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-gate", description="An access-policy proxy for container registries."
    )
    parser.add_argument("--version", action="version", version=f"registry-gate {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the gate")
    serve.add_argument("--config", type=Path, help="gate.yaml (default: embedded default)")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes (default: the cores, at most 8, when the settings let "
        "workers share the cache: redis and storage.backend s3; else 1)",
    )
    # Set by the supervisor for the workers it starts.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    check = commands.add_parser("check-config", help="validate a configuration and exit")
    check.add_argument("--config", type=Path, required=True)
    check.add_argument(
        "--check-listen",
        action="store_true",
        help="also check that the listen addresses are free (bind and release them)",
    )
    policy = commands.add_parser("policy", help="explain decisions, manage pins")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    explain = policy_commands.add_parser("explain", help="why a reference is allowed or not")
    explain.add_argument("--config", type=Path)
    explain.add_argument("action", choices=["pull", "push", "delete"])
    explain.add_argument("reference")
    explain.add_argument("--user")
    explain.add_argument("--group", action="append", default=[])
    explain.add_argument("--json", action="store_true")
    pins = policy_commands.add_parser("pins", help="list, set or remove short-name pins")
    pins.add_argument("--config", type=Path)
    pins.add_argument("pins_command", choices=["list", "set", "remove"])
    pins.add_argument("names", nargs="*", help="remove: NAME...; set: NAME REPOSITORY")
    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_commands.add_parser(
        "verify", help="check audit files, oldest first, or every replica's chain in a folder"
    )
    audit_verify.add_argument("files", nargs="+", type=Path)
    audit_verify.add_argument("--partial", action="store_true")
    cache = commands.add_parser("cache", help="cache stats, verify, gc")
    cache.add_argument("cache_command", choices=["stats", "verify", "gc"])
    cache.add_argument("--config", type=Path)
    cache.add_argument("--remove", action="store_true", help="verify: delete corrupt entries")
    client = commands.add_parser("client-config", help="print or write client configuration")
    client.add_argument("client", choices=["docker", "containerd", "podman"])
    client.add_argument("--url", required=True, help="the gate's URL, e.g. http://gate:5000")
    client.add_argument("--config", type=Path, help="gate.yaml (registries to list)")
    client.add_argument(
        "--output", type=Path, help="write the files under this folder at their real paths"
    )
    return parser


def _config_error(exc: ConfigError) -> SystemExit:
    print(f"registry-gate: configuration error: {exc}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


def _load(path: Path | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise _config_error(exc) from exc


def serve(settings: Settings, *, config: Path | None = None, asked: int | None = None) -> int:
    """Run the gate until SIGTERM/SIGINT, then drain (at most `shutdown_timeout`): one
    process, or a supervisor of several workers (`asked`, see proxy/cli/workers.py)."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        count = workers.worker_count(settings, asked)
        # Building reads what the settings name (passwords, keys, htpasswd); preflight
        # tries what start-up opens (folders, TLS files), so neither fails half-started
        # (nor, with workers, fails in every worker).
        services = build_services(settings)
        preflight(settings)
        if count > 1:
            command = [sys.executable, "-m", "proxy", "serve"]
            command += ["--config", str(config)] if config is not None else []
            supervisor = workers.Supervisor(command, count, settings.shutdown_timeout)
            return asyncio.run(supervisor.run())
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            runner.run(_serve(settings, services))
    except ConfigError as exc:
        raise _config_error(exc) from exc
    return 0


def serve_worker(settings: Settings, index: int, supervisor: int | None = None) -> None:
    """Run one worker of a supervisor's (checked by it before): a replica named after
    `index`, on the shared public port and a private one of its own."""
    workers.die_with_parent(supervisor)
    configure_logging(settings.log_level, settings.log_format)
    try:
        peer, peer_url = workers.peer_socket(settings)
        settings = workers.worker_settings(settings, index, peer_url)
        services = build_services(settings)
        with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
            runner.run(_serve(settings, services, peer=peer))
    except ConfigError as exc:
        raise _config_error(exc) from exc


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for `settings.event_loop` (None: asyncio's default loop)."""
    if name != "uvloop":
        return None
    try:
        import uvloop
    except ImportError as exc:
        raise ConfigError("event_loop: uvloop is not installed (pip install uvloop)") from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _start(
    settings: Settings, services: Services, peer: socket.socket | None = None
) -> tuple[web.Application, list[GateRunner]]:
    """Open everything and listen; a failure is a ConfigError naming the setting.

    `peer` (a worker): the public addresses are shared with the other workers
    (SO_REUSEPORT), and the app is also served on `peer`, the worker's own port.
    """
    ssl_context = tls_context(settings)
    app = build_app(settings, services)
    # Our own drain bounds the wait for requests; aiohttp's wait is for stragglers only.
    straggler_wait = min(_CLOSE_RESERVE, settings.shutdown_timeout / 4) / 2
    runners: list[GateRunner] = []
    sites = [(app, "listen", settings.listen, ssl_context)]
    if settings.metrics.enabled and settings.metrics.listen:
        sites.append((build_metrics_app(services), "metrics.listen", settings.metrics.listen, None))
    try:
        for site_app, setting, listen, context in sites:
            runner = GateRunner(
                site_app, access_log=None, handle_signals=False, shutdown_timeout=straggler_wait
            )
            runners.append(runner)
            await _starting(settings, runner.setup())
            host, port = host_port(listen)
            try:
                await web.TCPSite(
                    runner, host, port, ssl_context=context, reuse_port=peer is not None
                ).start()
                if peer is not None and site_app is app:
                    await web.SockSite(runner, peer, ssl_context=context).start()
            except OSError as exc:
                raise ConfigError(f"{setting}: cannot listen on {listen}: {describe(exc)}") from exc
    except BaseException:
        for started in reversed(runners):
            with contextlib.suppress(Exception):
                await started.cleanup()
        raise
    return app, runners


async def _starting(settings: Settings, opening: Awaitable[None]) -> None:
    """Await a start-up step, turning any failure into one line naming its setting."""
    try:
        await opening
    except ConfigError:
        raise
    except Exception as exc:
        text = describe(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None:
            text = f"{text}: {exc.filename}"
        setting = setting_named_in(settings, f"{text} {exc}") or "start-up"
        raise ConfigError(f"{setting}: {text}") from exc


async def _serve(settings: Settings, services: Services, peer: socket.socket | None = None) -> None:
    app, runners = await _start(settings, services, peer)
    extra = {"event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0]}
    if peer is not None:
        extra |= {"replica": settings.replica.id, "peer_url": settings.peer_url()}
    log.info("registry-gate listening on %s", settings.listen, extra=extra)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP reloads policy; an invalid policy is refused and the old one stays.
    loop.add_signal_handler(signal.SIGHUP, services.holder.reload)
    await stop.wait()
    await _shut_down(settings.shutdown_timeout, app[DRAIN], runners)


async def _shut_down(seconds: float, drain: Drain, runners: list[GateRunner]) -> None:
    """Drain, then close; the whole of it bounded by `seconds` (shutdown_timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    # Kept for closing (audit flush, cache) after the in-flight requests.
    reserve = min(_CLOSE_RESERVE, seconds / 4)
    drain.begin()
    log.info("draining: %d requests in flight, at most %g s", drain.inflight, seconds)
    try:
        async with asyncio.timeout_at(deadline - reserve):
            await drain.idle()
    except TimeoutError:
        log.warning("shutdown_timeout: cutting off %d requests still in flight", drain.inflight)
    try:
        async with asyncio.timeout_at(deadline):
            for runner in reversed(runners):
                await runner.cleanup()
    except TimeoutError:
        log.error("shutdown_timeout reached while closing: exiting with work left undone")
    else:
        log.info("registry-gate stopped")


def _client_config(client: str, url: str, config: Path | None, output: Path | None) -> int:
    settings = _load(config)
    registries = [u.registry for u in settings.upstreams]
    try:
        if client == "docker":
            generated = client_config.docker(url)
        elif client == "containerd":
            generated = client_config.containerd(url, registries)
        else:
            generated = client_config.podman(url, registries, registries)
    except ValueError as exc:
        print(f"registry-gate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in generated.warnings:
        print(warning, file=sys.stderr)
    if output is None:
        sys.stdout.write(client_config.render(generated.files))
        return 0
    for file in generated.files:
        path = output / client_config.relative_path(file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(file.content)
        except OSError as exc:
            print(f"registry-gate: --output: cannot write {path}: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "serve" and args.worker_index is not None:
        serve_worker(_load(args.config), args.worker_index, args.supervisor)
        return 0
    if args.command == "serve":
        return serve(_load(args.config), config=args.config, asked=args.workers)
    if args.command == "policy" and args.policy_command == "explain":
        settings = _load(args.config)
        try:
            return asyncio.run(
                operator_commands.policy_explain(
                    settings, args.action, args.reference, args.user, args.group, as_json=args.json
                )
            )
        except ConfigError as exc:
            raise _config_error(exc) from exc
    if args.command == "policy":
        settings = _load(args.config)
        if args.pins_command == "list":
            return asyncio.run(operator_commands.pins_list(settings))
        if args.pins_command == "set":
            if len(args.names) != 2:
                parser.error("policy pins set takes NAME REPOSITORY")
            return asyncio.run(operator_commands.pins_set(settings, *args.names))
        return asyncio.run(operator_commands.pins_remove(settings, args.names))
    if args.command == "audit":
        return operator_commands.audit_verify(args.files, partial=args.partial)
    if args.command == "cache":
        settings = _load(args.config)
        return asyncio.run(
            operator_commands.cache_command(settings, args.cache_command, remove=args.remove)
        )
    if args.command == "client-config":
        return _client_config(args.client, args.url, args.config, args.output)
    if args.command == "check-config":
        settings = _load(args.config)
        try:
            # Everything serve would read (policy files, htpasswd, keys, passwords) and
            # open (storage, audit and pins folders, TLS files; listen addresses if asked).
            services = build_services(settings)
            preflight(settings, listen=args.check_listen)
        except ConfigError as exc:
            raise _config_error(exc) from exc
        policy = services.holder.current.policy
        print(
            f"ok: {len(settings.upstreams)} upstreams, listen {settings.listen}, "
            f"policy {policy.fingerprint} ({len(policy.rules)} rules)"
        )
        return 0
    return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
