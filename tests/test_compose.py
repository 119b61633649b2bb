"""The compose stack and the image, checked without a Docker engine.

``docker compose config`` needs the compose plugin, which this machine's docker client
lacks; instead the file is parsed by ``compose-spec`` (a strict compose-specification
parser: unknown keys, bad durations/sizes/ports fail) after ``${VAR:-default}``
interpolation with the defaults, and then checked for what the stack needs: health checks,
localhost-only ports, a GPU reservation, one image version, commands that exist in the
image and configs that exist and agree with the services. Building the image and starting
the stack are not done here (no Docker engine, no GPU).
"""

from __future__ import annotations

import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from compose_spec import PyOptions

from talkforge.cli import app
from talkforge.config import load_config
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def interpolated(text: str, env: dict[str, str] | None = None) -> str:
    """``${VAR:-default}`` / ``${VAR}`` as compose substitutes them with ``env`` (else '')."""
    env = env or {}
    return INTERPOLATION.sub(lambda m: env.get(m.group(1), m.group(2) or ""), text)


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    text = interpolated(COMPOSE.read_text())
    parsed = PyOptions(apply_merge=True).from_yaml(text)  # raises on anything off-spec
    parsed.validate()  # every volume / network / config a service names is defined
    return parsed.to_dict()


def dockerfile_instruction(name: str) -> list[str]:
    """The JSON-form arguments of the Dockerfile's last ``name`` instruction."""
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    found = [line for line in lines if line.startswith(f"{name} ")]
    assert found, name
    args = found[-1][len(name) :].strip()
    if name == "HEALTHCHECK":
        args = args.split(" CMD ", 1)[1]
    return yaml.safe_load(args)


def talkforge_services(stack: dict[str, Any]) -> dict[str, dict]:
    return {n: s for n, s in stack["services"].items() if s["image"].startswith("talkforge:")}


def test_the_file_parses_and_the_core_services_are_health_checked(stack: dict) -> None:
    services = stack["services"]
    assert {"postgres", "prefect", "ray-head", "ray-worker", "serve", "dashboard"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for target in service.get("depends_on", {}):
            assert target in services, (name, target)
    assert services["prefect"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["serve"]["depends_on"]["prefect"]["condition"] == "service_healthy"
    assert "PREFECT_UI_API_URL" in services["prefect"]["environment"]


def test_ports_are_bound_to_localhost_unless_configured(stack: dict) -> None:
    ports = [p for s in stack["services"].values() for p in s.get("ports", [])]
    assert ports
    assert all(str(p).startswith("127.0.0.1:") for p in ports), ports
    exposed = yaml.safe_load(interpolated(COMPOSE.read_text(), {"TALKFORGE_BIND": "0.0.0.0"}))
    opened = [p for s in exposed["services"].values() for p in s.get("ports", [])]
    assert all(str(p).startswith("0.0.0.0:") for p in opened), opened


def test_ray_worker_reserves_gpus_and_shared_memory(stack: dict) -> None:
    worker = stack["services"]["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    size = str(worker["shm_size"]).lower()
    assert size.endswith("gb") and int(size[:-2]) >= 8, size  # Ray's object store


def test_one_image_version_for_every_talkforge_service(stack: dict) -> None:
    services = talkforge_services(stack)
    assert {"ray-head", "ray-worker", "serve", "dashboard"} <= set(services)
    images = {name: s["image"] for name, s in services.items()}
    cpu = {i for n, i in images.items() if n != "ray-worker"}
    assert len(cpu) == 1, images
    assert images["ray-worker"] == f"{cpu.pop()}-cuda"  # same Dockerfile, TORCH=cuda
    for name, service in services.items():
        torch = service["build"]["args"]["TORCH"]
        assert torch == ("cuda" if name == "ray-worker" else "cpu"), name


def _argv(service: dict) -> list[str]:
    entry = service.get("entrypoint") or dockerfile_instruction("ENTRYPOINT")
    command = service.get("command") or ([] if "entrypoint" in service else None)
    if command is None:
        command = dockerfile_instruction("CMD")
    return [*entry, *command]


def _check_talkforge_argv(argv: list[str]) -> None:
    """``talkforge ARGS`` must parse as a real command with real options and configs."""
    group = typer.main.get_command(app)
    sub = group.get_command(group.context_class(group), argv[0])
    assert sub is not None, f"no talkforge command {argv[0]!r}"
    ctx = sub.make_context(argv[0], list(argv[1:]), resilient_parsing=False)
    config = ctx.params.get("config")
    if config is not None:
        assert (REPO / config).is_file(), config
        load_config(REPO / config, list(ctx.params.get("set_") or []))


def test_every_command_exists_in_the_image_and_names_real_configs(stack: dict) -> None:
    scripts = {e.name for e in entry_points(group="console_scripts")}
    assert {"talkforge", "ray"} <= scripts
    for name, service in talkforge_services(stack).items():
        argv = _argv(service)
        assert argv[0] in scripts, (name, argv)
        if argv[0] == "talkforge":
            _check_talkforge_argv(argv[1:])
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        if test[1] == "python":
            assert test[2] == "-m" and test[3] == "flows.health", test
        else:
            assert test[1] in scripts, (name, test)
    _check_talkforge_argv(dockerfile_instruction("CMD"))  # the image's default role


def test_cluster_config_matches_the_stack(stack: dict) -> None:
    cfg = load_config(REPO / "configs" / "cluster.yaml")
    services = stack["services"]
    serve = services["serve"]
    assert cfg.data_root == Path("/data")
    assert "talkforge-data:/data" in serve["volumes"]  # data_root is the shared volume
    uri = cfg.catalog.uri or ""
    assert uri.startswith("ducklake:postgres:")
    params = dict(part.split("=", 1) for part in uri.split(":", 2)[2].split())
    postgres = services["postgres"]
    assert params["host"] == "postgres"
    assert params["user"] == postgres["environment"]["POSTGRES_USER"]
    created = stack["configs"]["create-catalog-database"]["content"]
    assert f"CREATE DATABASE {params['dbname']}" in created
    assert "PGPASSWORD" in serve["environment"]
    assert cfg.ray.address == "auto"
    join = serve["command"][serve["command"].index("--join-ray") + 1]  # the driver's node
    host, port = join.split(":")
    assert host == "ray-head" and f"--port={port}" in services["ray-head"]["entrypoint"]
    assert f"--address={join}" in services["ray-worker"]["entrypoint"]


def test_dockerfile_runs_as_a_user_with_a_health_check_and_no_pip_cache() -> None:
    text = DOCKERFILE.read_text()
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert dockerfile_instruction("HEALTHCHECK")[:3] == ["python", "-m", "flows.health"]
    installs = [c for c in re.split(r"&&|\n", text.replace("\\\n", " ")) if "pip install" in c]
    assert installs and all("--no-cache-dir" in c for c in installs), installs
    assert "tests" in (REPO / ".dockerignore").read_text().split()


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_image_requirements_drop_test_tools_and_keep_downloaders(variant: str) -> None:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "image-requirements.sh"), variant],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pins = dict(
        line.split("==", 1) for line in out.splitlines() if "==" in line and " " not in line
    )
    for tool in ("pytest", "pytest-timeout", "ruff", "compose-spec"):
        assert tool not in pins, tool
    assert {"deno", "yt-dlp", "yt-dlp-ejs", "prefect", "ray", "streamlit"} <= set(pins)
    lock = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line
    )
    if variant == "cpu":
        assert pins["torch"] == lock["torch"] + "+cpu"
        assert not [p for p in pins if p.startswith(("nvidia-", "triton"))]
        assert "download.pytorch.org/whl/cpu" in out
    else:
        assert pins["torch"] == lock["torch"]
        assert any(p.startswith("nvidia-") for p in pins)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_health_check_module() -> None:
    from flows.health import healthy, main

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert healthy(f"{base}/health") and main([f"{base}/health"]) == 0
        assert not healthy(f"{base}/other") and main([f"{base}/other"]) == 1
    finally:
        server.shutdown()
    assert not healthy(f"{base}/health", timeout_s=1)  # nothing listens any more
    with pytest.raises(ValueError):
        healthy("file:///etc/passwd")
