"""The `registry-gate` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from proxy import client_config
from proxy.app import build_app
from proxy.settings import ConfigError, Settings, host_port, load_settings

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-gate", description="An access-policy proxy for container registries."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gate")
    serve.add_argument("--config", type=Path, help="gate.yaml (default: embedded default)")
    check = commands.add_parser("check-config", help="validate a configuration and exit")
    check.add_argument("--config", type=Path, required=True)
    client = commands.add_parser("client-config", help="print client configuration")
    client.add_argument("client", choices=["docker", "containerd", "podman"])
    client.add_argument("--url", required=True, help="the gate's URL, e.g. http://gate:5000")
    client.add_argument("--config", type=Path, help="gate.yaml (registries to list)")
    return parser


def _load(path: Path | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"registry-gate: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from exc


def serve(settings: Settings) -> None:
    """Run the gate until interrupted."""
    logging.basicConfig(level=settings.log_level.upper())
    host, port = host_port(settings.listen)
    web.run_app(build_app(settings), host=host, port=port, print=None, access_log=None)


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
    if args.command == "client-config":
        return _client_config(args.client, args.url, args.config)
    if args.command == "check-config":
        settings = _load(args.config)
        print(f"ok: {len(settings.upstreams)} upstreams, listen {settings.listen}")
        return 0
    return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
