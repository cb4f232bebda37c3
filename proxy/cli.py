"""The `registry-gate` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from proxy import client_config, operator_commands
from proxy.app import build_app, build_metrics_app, build_services
from proxy.http_server import GateRunner
from proxy.logging_setup import configure_logging
from proxy.services import Services
from proxy.settings import ConfigError, Settings, host_port, load_settings

EXIT_CONFIG = 2
log = logging.getLogger("registry_gate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-gate", description="An access-policy proxy for container registries."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gate")
    serve.add_argument("--config", type=Path, help="gate.yaml (default: embedded default)")
    check = commands.add_parser("check-config", help="validate a configuration and exit")
    check.add_argument("--config", type=Path, required=True)
    policy = commands.add_parser("policy", help="explain decisions, manage pins")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    explain = policy_commands.add_parser("explain", help="why a reference is allowed or not")
    explain.add_argument("--config", type=Path)
    explain.add_argument("action", choices=["pull", "push", "delete"])
    explain.add_argument("reference")
    explain.add_argument("--user")
    explain.add_argument("--group", action="append", default=[])
    explain.add_argument("--json", action="store_true")
    pins = policy_commands.add_parser("pins", help="list or remove short-name pins")
    pins.add_argument("--config", type=Path)
    pins.add_argument("pins_command", choices=["list", "remove"])
    pins.add_argument("names", nargs="*")
    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_commands.add_parser("verify", help="check audit files, oldest first")
    audit_verify.add_argument("files", nargs="+", type=Path)
    audit_verify.add_argument("--partial", action="store_true")
    cache = commands.add_parser("cache", help="cache stats, verify, gc")
    cache.add_argument("cache_command", choices=["stats", "verify", "gc"])
    cache.add_argument("--config", type=Path)
    cache.add_argument("--remove", action="store_true", help="verify: delete corrupt entries")
    client = commands.add_parser("client-config", help="print client configuration")
    client.add_argument("client", choices=["docker", "containerd", "podman"])
    client.add_argument("--url", required=True, help="the gate's URL, e.g. http://gate:5000")
    client.add_argument("--config", type=Path, help="gate.yaml (registries to list)")
    return parser


def _config_error(exc: ConfigError) -> SystemExit:
    print(f"registry-gate: configuration error: {exc}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


def _load(path: Path | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise _config_error(exc) from exc


def serve(settings: Settings) -> None:
    """Run the gate until interrupted."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        # Building reads what the settings name (passwords, keys, htpasswd).
        services = build_services(settings)
    except ConfigError as exc:
        raise _config_error(exc) from exc
    try:
        asyncio.run(_serve(settings, services))
    except ConfigError as exc:
        raise _config_error(exc) from exc


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls.cert_file, settings.tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load certificate/key: {exc}") from exc
    return context


async def _serve(settings: Settings, services: Services) -> None:
    ssl_context = _ssl_context(settings)
    runners: list[web.AppRunner] = []
    apps = [(build_app(settings, services), settings.listen)]
    if settings.metrics.enabled and settings.metrics.listen:
        apps.append((build_metrics_app(services), settings.metrics.listen))
    for app, listen in apps:
        runner = GateRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = host_port(listen)
        main_site = listen == settings.listen
        await web.TCPSite(
            runner, host, port, ssl_context=ssl_context if main_site else None
        ).start()
        runners.append(runner)
    log.info("registry-gate listening on %s", settings.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP reloads policy; an invalid policy is refused and the old one stays.
    loop.add_signal_handler(signal.SIGHUP, services.holder.reload)
    try:
        await stop.wait()
    finally:
        for started in reversed(runners):
            await started.cleanup()


def _client_config(client: str, url: str, config: Path | None) -> int:
    settings = _load(config)
    registries = [u.registry for u in settings.upstreams]
    try:
        if client == "docker":
            files = client_config.docker(url)
        elif client == "containerd":
            files = client_config.containerd(url, registries)
        else:
            files = client_config.podman(url, registries, registries)
    except ValueError as exc:
        print(f"registry-gate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(client_config.render(files))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        serve(_load(args.config))
        return 0
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
        return asyncio.run(operator_commands.pins_remove(settings, args.names))
    if args.command == "audit":
        return operator_commands.audit_verify(args.files, partial=args.partial)
    if args.command == "cache":
        settings = _load(args.config)
        return asyncio.run(
            operator_commands.cache_command(settings, args.cache_command, remove=args.remove)
        )
    if args.command == "client-config":
        return _client_config(args.client, args.url, args.config)
    if args.command == "check-config":
        settings = _load(args.config)
        try:
            # Everything serve would read: policy files, htpasswd, keys, passwords.
            services = build_services(settings)
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
