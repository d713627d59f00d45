"""deploy/ is what operators run: each file is checked by the tool that will read it, and tied to
the code it configures, so that a renamed variable, a moved port or a longer drain cannot leave
the deployment behind.

Nothing here needs Docker or a cluster: the Kubernetes manifests are validated against the
published schemas (kubernetes-validate, a pinned version, strict), HAProxy checks its own
configuration, systemd-analyze verifies the unit in a scratch root, and the image's health check
script is run against a real ``edgeproxy serve``.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from kubernetes_validate import utils as kv

from edgeproxy.config import VARIABLES, Settings
from tests.conftest import require_tool, wait_for
from tests.test_deploy_topology import describe_tree, stop_tree
from tests.test_lifecycle import ServeProcess
from tests.test_proxy_faults import closed_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# Pinned, so that a kubernetes-validate release with newer schemas cannot change the verdict; the
# manifests use nothing newer (the pod sysctl they rely on is in the "safe" set from 1.22 on).
KUBERNETES_VERSION = "1.30.0"
KNOWN = {variable.env for variable in VARIABLES}
DEFAULTS = {variable.env: variable.default for variable in VARIABLES}
# Named in deployment.yaml's comment as what Kubernetes' service links would inject: the reason
# for enableServiceLinks: false, not edgeproxy variables.
NOT_VARIABLES = {"EDGEPROXY_SERVICE_HOST", "EDGEPROXY_PORT_25_TCP"}


# -- reading the files --------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource under deploy/kubernetes by kind (one resource of each kind is expected)."""
    resources: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                assert document["kind"] not in resources, f"two {document['kind']}s in deploy/kubernetes"
                resources[document["kind"]] = document
    return resources


def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    return next(item for item in containers if item["name"] == "edgeproxy")


def dockerfile_instructions() -> list[tuple[int, str, str]]:
    """(stage, INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    instructions: list[tuple[int, str, str]] = []
    stage = -1
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue  # (comment lines inside a continuation are dropped by Docker too)
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append((stage, keyword.upper(), arguments.strip()))
    return instructions


def image_env() -> dict[str, str]:
    """The final stage's ENV, as the container starts with it."""
    instructions = dockerfile_instructions()
    final = instructions[-1][0]
    env: dict[str, str] = {}
    for stage, keyword, arguments in instructions:
        if stage == final and keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(arguments))  # type: ignore[misc]
    return env


def env_file(path: Path, commented: bool = False) -> dict[str, str]:
    """NAME=value lines of a systemd EnvironmentFile; with ``commented`` also the #NAME= examples."""
    pattern = re.compile(r"^(#?)\s*(EDGEPROXY_[A-Z0-9_]+)=(.*)$")
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = pattern.match(line)
        if match and (commented or not match.group(1)):
            found[match.group(2)] = match.group(3).strip()
    return found


def pod_env(resources: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What the pod's process sees: the image's ENV, then envFrom the ConfigMap, then env
    (Kubernetes' order of precedence, last wins)."""
    edgeproxy = container(resources)
    env = {name: value for name, value in image_env().items() if name.startswith("EDGEPROXY_")}
    for source in edgeproxy.get("envFrom", []):
        assert source["configMapRef"]["name"] == resources["ConfigMap"]["metadata"]["name"]
        env.update(resources["ConfigMap"]["data"])
    env.update({item["name"]: item["value"] for item in edgeproxy.get("env", [])})
    return env


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real certificate and key, standing in for the files the deployment points at (the
    settings load the pair, as the server will)."""
    import trustme

    directory = tmp_path_factory.mktemp("tls")
    certificate = trustme.CA().issue_cert("mx.example.com")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def settings_from(env: dict[str, str], tls_pair: tuple[str, str]) -> Settings:
    """Settings the proxy would build from ``env``, TLS paths swapped for files that exist here."""
    env = dict(env)
    if env.get("EDGEPROXY_TLS_CERT"):
        env["EDGEPROXY_TLS_CERT"], env["EDGEPROXY_TLS_KEY"] = tls_pair
    return Settings.from_env(env)


def port_of(host_port: str) -> int:
    return int(host_port.rpartition(":")[2])


def seconds(value: str) -> float:
    """HAProxy and systemd durations as used in deploy/: 30s, 11m, 500ms, 45."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|min|h)?", value.strip())
    assert match, f"unexpected duration {value!r}"
    factor = {"ms": 0.001, "s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * factor


# -- every name and value is one the code knows -------------------------------------------------


def test_every_edgeproxy_variable_named_in_deploy_exists() -> None:
    mentioned: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in re.findall(r"EDGEPROXY_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")):
                mentioned.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    unknown = {name: sorted(where) for name, where in mentioned.items() if name not in KNOWN | NOT_VARIABLES}
    assert not unknown, f"not variables of edgeproxy.config: {unknown}"
    # The names the deployment depends on, so that this test cannot pass by finding nothing.
    for name in ("EDGEPROXY_METRICS_LISTEN", "EDGEPROXY_PROXY_PROTOCOL_FROM", "EDGEPROXY_REDIS_URL",
                 "EDGEPROXY_TLS_CERT", "EDGEPROXY_DRAIN_TIMEOUT"):
        assert name in mentioned


def test_the_pods_settings_are_valid(tls_pair: tuple[str, str]) -> None:
    resources = manifests()
    env = pod_env(resources)
    settings = settings_from(env, tls_pair)
    assert settings.backend is not None  # a real deployment, never the embedded sink
    assert settings.tls_cert and settings.metrics_listen is not None
    # The commented examples are variables too, and valid once uncommented.
    text = (KUBERNETES / "configmap.yaml").read_text(encoding="utf-8")
    examples = dict(re.findall(r'^\s*#\s*(EDGEPROXY_[A-Z0-9_]+):\s*"([^"]*)"', text, re.M))
    assert {"EDGEPROXY_REDIS_URL", "EDGEPROXY_PROXY_PROTOCOL_FROM"} <= set(examples)
    settings_from({**env, **examples}, tls_pair)


def test_the_image_settings_are_valid_on_their_own() -> None:
    env = {name: value for name, value in image_env().items() if name.startswith("EDGEPROXY_")}
    settings = Settings.from_env({**env, "EDGEPROXY_HOSTNAME": "mx.example.com"})
    assert settings.listen == (("0.0.0.0", 25),)
    assert settings.metrics_listen is not None and settings.metrics_listen[1] > 1024


def test_the_systemd_environment_file_is_valid(tls_pair: tuple[str, str]) -> None:
    path = DEPLOY / "edgeproxy.env"
    settings_from(env_file(path), tls_pair)
    examples = env_file(path, commented=True)
    # The commented examples must be valid too, once uncommented: all but those naming files of
    # the target machine, and the submission listeners (alternatives to one another: implicit
    # TLS on 465 cannot go with PROXY_PROTOCOL_FROM).
    usable = {name: value for name, value in examples.items() if "@/" not in value and "LISTEN" not in name}
    assert "EDGEPROXY_PROXY_PROTOCOL_FROM" in usable and "EDGEPROXY_REDIS_URL" in usable
    settings_from({**env_file(path), **usable}, tls_pair)


# -- Kubernetes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(KUBERNETES.glob("*.yaml")), ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for resource in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if resource:
            # strict: an unknown field (a misspelt probe, a field of a newer release) is an error
            kv.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_validation_would_catch_a_misspelt_field() -> None:
    # Guards the test above against validating nothing.
    resources = copy.deepcopy(manifests())
    container(resources)["readinessprobe"] = {"tcpSocket": {"port": 25}}
    with pytest.raises(kv.ValidationError):
        kv.validate(resources["Deployment"], KUBERNETES_VERSION, strict=True)


def test_the_kinds_the_deployment_needs_are_there() -> None:
    assert set(manifests()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


def test_probes_ask_the_metrics_listener() -> None:
    resources = manifests()
    env = pod_env(resources)
    host, _, port = env["EDGEPROXY_METRICS_LISTEN"].rpartition(":")
    # The kubelet probes the pod's address, never its loopback.
    assert ipaddress.ip_address(host.strip("[]")).is_unspecified, "METRICS_LISTEN must be a wildcard"
    edgeproxy = container(resources)
    ports = {item["name"]: item["containerPort"] for item in edgeproxy["ports"]}
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        get = edgeproxy[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == int(port), probe
    annotations = resources["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port


def test_smtp_port_is_the_listen_port_and_the_service_target() -> None:
    resources = manifests()
    env = pod_env(resources)
    edgeproxy = container(resources)
    ports = {item["name"]: item["containerPort"] for item in edgeproxy["ports"]}
    listen_ports = {port_of(entry) for entry in env["EDGEPROXY_LISTEN"].split(",")}
    assert listen_ports == {ports["smtp"]}
    service = resources["Service"]["spec"]
    (smtp,) = service["ports"]  # the metrics port is for Prometheus inside, never the world
    assert smtp["port"] == 25 and ports.get(smtp["targetPort"], smtp["targetPort"]) == ports["smtp"]


def test_service_keeps_the_client_address() -> None:
    service = manifests()["Service"]["spec"]
    assert service["type"] == "LoadBalancer"
    # Cluster would SNAT every client to a node address: every rule about clients would be moot.
    assert service["externalTrafficPolicy"] == "Local"
    text = (KUBERNETES / "service.yaml").read_text(encoding="utf-8")
    assert "PROXY protocol" in text and "EDGEPROXY_PROXY_PROTOCOL_FROM" in text


def test_selectors_find_the_pods() -> None:
    resources = manifests()
    labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = (resources["Deployment"]["spec"]["selector"]["matchLabels"],
                 resources["Service"]["spec"]["selector"],
                 resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector.items() <= labels.items()
    budget = resources["PodDisruptionBudget"]["spec"]
    assert budget["maxUnavailable"] < resources["Deployment"]["spec"]["replicas"]


def test_sigterm_has_time_to_drain() -> None:
    resources = manifests()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    edgeproxy = container(resources)
    pre_stop = edgeproxy["lifecycle"]["preStop"]
    pause = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else seconds(pre_stop["exec"]["command"][-1])
    drain = seconds(pod_env(resources).get("EDGEPROXY_DRAIN_TIMEOUT", DEFAULTS["EDGEPROXY_DRAIN_TIMEOUT"]))
    # The grace period runs from the start of preStop; its end is SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > pause + drain


def test_tls_pair_comes_from_the_mounted_secret() -> None:
    resources = manifests()
    env = pod_env(resources)
    edgeproxy = container(resources)
    volumes = {volume["name"]: volume for volume in resources["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    for variable, key in (("EDGEPROXY_TLS_CERT", "tls.crt"), ("EDGEPROXY_TLS_KEY", "tls.key")):
        path = Path(env[variable])
        mount = next(mount for mount in edgeproxy["volumeMounts"] if path.parent == Path(mount["mountPath"]))
        assert mount.get("readOnly") is True
        assert "secret" in volumes[mount["name"]], f"{variable} is not in a Secret"
        assert path.name == key  # the keys of a kubernetes.io/tls Secret


def test_pod_runs_unprivileged_and_can_still_bind_25() -> None:
    resources = manifests()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    edgeproxy = container(resources)
    security = edgeproxy["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    # The image's user, so the pod's runAsUser does not silently override it.
    (user,) = [arguments for _, keyword, arguments in dockerfile_instructions() if keyword == "USER"]
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    # With no_new_privs the file capability is ignored: port 25 is bindable through the sysctl.
    sysctls = {item["name"]: int(item["value"]) for item in pod["securityContext"].get("sysctls", [])}
    smtp_port = next(item["containerPort"] for item in edgeproxy["ports"] if item["name"] == "smtp")
    if smtp_port < 1024:
        assert sysctls.get("net.ipv4.ip_unprivileged_port_start", 1024) <= smtp_port
    # A read-only root needs somewhere writable for temporary files.
    assert any(mount["mountPath"] == "/tmp" for mount in edgeproxy["volumeMounts"])
    # Service links would inject EDGEPROXY_SERVICE_HOST & co., which edgeproxy refuses at start.
    assert pod["enableServiceLinks"] is False


def test_resources_and_workers_agree() -> None:
    resources = manifests()
    limits = container(resources)["resources"]
    assert {"cpu", "memory"} <= limits["requests"].keys() and {"cpu", "memory"} <= limits["limits"].keys()
    cpu = limits["limits"]["cpu"]
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    workers = pod_env(resources)["EDGEPROXY_WORKERS"]
    assert workers != "auto", "auto counts the node's CPUs, not the container's limit"
    assert int(workers) <= max(1, cores)


# -- the image ------------------------------------------------------------------------------------


def test_dockerfile_builds_in_one_stage_and_runs_slim_unprivileged() -> None:
    instructions = dockerfile_instructions()
    stages = [arguments for _, keyword, arguments in instructions if keyword == "FROM"]
    assert len(stages) >= 2 and stages[0].endswith(" AS build")
    final = instructions[-1][0]
    final_runs = " ".join(arguments for stage, keyword, arguments in instructions
                          if stage == final and keyword == "RUN")
    build_runs = " ".join(arguments for stage, keyword, arguments in instructions
                          if stage == 0 and keyword == "RUN")
    assert "gcc" in build_runs and "pip install" in build_runs
    for tool in ("gcc", "build-essential", "cython", "pip install"):
        assert tool not in final_runs.lower(), f"{tool} in the final stage"
    assert "setcap cap_net_bind_service=+ep" in final_runs
    (user,) = [arguments for stage, keyword, arguments in instructions if stage == final and keyword == "USER"]
    assert all(part.isdigit() and int(part) != 0 for part in user.split(":")), "numeric, non-root"
    keywords = {keyword: arguments for stage, keyword, arguments in instructions if stage == final}
    assert keywords["STOPSIGNAL"] == "SIGTERM"
    assert "edgeproxy-healthcheck" in keywords["HEALTHCHECK"]
    assert "COPY deploy/healthcheck.py /usr/local/bin/edgeproxy-healthcheck" in {
        f"{keyword} {arguments}" for stage, keyword, arguments in instructions if stage == final}
    env = image_env()
    exposed = {int(port) for port in keywords["EXPOSE"].split()}
    assert {port_of(env["EDGEPROXY_LISTEN"]), port_of(env["EDGEPROXY_METRICS_LISTEN"])} == exposed


def test_dockerignore_lets_every_copied_source_through() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()]
    assert "*" in lines  # an allow list: whatever is not named stays out of the context
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for _, keyword, arguments in dockerfile_instructions():
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        for source in shlex.split(arguments)[:-1]:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), source
            assert any(source == entry or source.startswith(entry + "/") for entry in allowed), source
    assert "**/*.so" in lines  # a host-built extension must not stand in for the image's


def _healthcheck(path: str = "/healthz", listen: str | None = None) -> int:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGEPROXY_")}
    if listen is not None:
        env["EDGEPROXY_METRICS_LISTEN"] = listen
    result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), path], env=env,
                            capture_output=True, timeout=20)
    return result.returncode


def test_healthcheck_script_finds_wildcard_listeners_on_loopback() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.url("0.0.0.0:9525", "/healthz") == "http://127.0.0.1:9525/healthz"
    assert module.url("[::]:9525", "/readyz") == "http://[::1]:9525/readyz"
    assert module.url("10.1.2.3:9525", "/healthz") == "http://10.1.2.3:9525/healthz"
    assert _healthcheck(listen="") == 0  # metrics off on purpose: nothing to call unhealthy
    assert _healthcheck(listen=f"127.0.0.1:{closed_port()}") == 1


@pytest.fixture
def metrics_proxy(sink) -> Iterator[tuple[ServeProcess, str]]:
    """``edgeproxy serve`` in front of the sink, with its metrics listener on, as the image runs it."""
    metrics = f"127.0.0.1:{closed_port()}"
    proxy = ServeProcess({"EDGEPROXY_BACKEND": f"127.0.0.1:{sink.port}", "EDGEPROXY_METRICS_LISTEN": metrics})
    try:
        assert wait_for(lambda: _healthcheck(listen=metrics) == 0, 10), proxy.lines
        yield proxy, metrics
    finally:
        stop_tree(proxy)


def test_healthcheck_script_asks_a_running_proxy(metrics_proxy: tuple[ServeProcess, str]) -> None:
    proxy, metrics = metrics_proxy
    assert _healthcheck("/readyz", listen=metrics) == 0
    proxy.signal(signal.SIGTERM)
    assert wait_for(lambda: proxy.process.poll() is not None, 15), f"still running: {describe_tree(proxy)}"
    assert proxy.process.returncode == 0
    assert _healthcheck(listen=metrics) == 1


def test_an_idle_proxy_with_metrics_on_costs_no_cpu(metrics_proxy: tuple[ServeProcess, str]) -> None:
    # A container's CPU request is sized for its traffic: with none, the processes must sleep
    # (workers write a snapshot a second, the metrics process waits for requests).
    proxy, _ = metrics_proxy
    processes = [psutil.Process(proxy.process.pid), *psutil.Process(proxy.process.pid).children(recursive=True)]

    def cpu() -> float:
        return sum(sum(process.cpu_times()[:2]) for process in processes)

    before = cpu()
    time.sleep(2)
    assert cpu() - before < 0.3, describe_tree(proxy)


# -- HAProxy --------------------------------------------------------------------------------------


LB_ENV = {"SMTP_LB_BIND": "127.0.0.1:20025", "SMTP_LB_EDGE1": "127.0.0.1:20026",
          "SMTP_LB_EDGE2": "127.0.0.1:20027", "SMTP_LB_STATS": "127.0.0.1:20028"}


def _haproxy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    haproxy = require_tool("haproxy")
    base = {key: value for key, value in os.environ.items() if not key.startswith("SMTP_LB_")}
    return subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy.cfg")], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def test_haproxy_accepts_the_configuration() -> None:
    result = _haproxy_check(LB_ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


def test_haproxy_refuses_to_start_without_its_instances() -> None:
    # An unset address must fail loudly, never leave a backend without servers.
    result = _haproxy_check({name: value for name, value in LB_ENV.items() if name != "SMTP_LB_EDGE2"})
    assert result.returncode != 0


def haproxy_sections() -> dict[str, list[list[str]]]:
    """deploy/haproxy.cfg's directives (comments dropped, split into words) by section."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in (DEPLOY / "haproxy.cfg").read_text(encoding="utf-8").splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return sections


def test_haproxy_hands_on_the_client_and_outlasts_edgeproxy_timeouts() -> None:
    sections = haproxy_sections()
    directives = [line for lines in sections.values() for line in lines]
    assert ["mode", "tcp"] in directives
    assert ["option", "smtpchk", "EHLO", "healthcheck.invalid"] in directives
    default_server = next(line for line in directives if line[0] == "default-server")
    assert "send-proxy-v2" in default_server and "check" in default_server
    assert not any("shutdown-sessions" in line for line in directives)  # a draining instance finishes
    timeouts = {line[1]: seconds(line[2]) for line in sections["defaults"] if line[0] == "timeout"}
    assert not any(line[0] == "timeout" for line in sections["backend edgeproxy"] + sections["frontend smtp"])
    # edgeproxy's own silences must end first, so a client gets its reply, not a bare close:
    # the longest is the wait for the backend after the body (RFC 5321 §4.5.3.2.6, 10 minutes).
    longest = max(600.0, seconds(DEFAULTS["EDGEPROXY_TIMEOUT"]), seconds(DEFAULTS["EDGEPROXY_DATA_TIMEOUT"]))
    assert timeouts["client"] > longest and timeouts["server"] > longest


# -- systemd --------------------------------------------------------------------------------------


def _unit_dir() -> Path | None:
    return next((path for path in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                 if (path / "multi-user.target").exists()), None)


@pytest.fixture
def systemd_root(tmp_path: Path) -> Iterator[Path]:
    """A scratch root for ``systemd-analyze verify --root``: the system's own units (for the
    targets ours refers to), ours, and a stub for each program it runs, so that verify checks the
    unit, not whether edgeproxy happens to be installed at /opt here. No systemd as PID 1 needed."""
    analyze = shutil.which("systemd-analyze")
    units = _unit_dir()
    if analyze is None or units is None:
        pytest.skip("systemd-analyze or the system's unit files are not installed")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/edgeproxy").mkdir(parents=True)
    shutil.copy(DEPLOY / "edgeproxy.env", root / "etc/edgeproxy/edgeproxy.env")
    yield root


def _verify(root: Path, unit_text: str) -> str:
    unit = root / "etc/systemd/system/edgeproxy.service"
    unit.write_text(unit_text, encoding="utf-8")
    for line in unit_text.splitlines():
        if re.match(r"Exec\w+=", line):
            program = Path(line.split("=", 1)[1].lstrip("-@:+!|").split()[0])
            stub = root / program.relative_to("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no",
                             "/etc/systemd/system/edgeproxy.service"], capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown key or a bad value (it only warns): any output is a finding.
    output = (result.stdout + result.stderr).strip()
    return f"exit {result.returncode}: {output}" if result.returncode or output else ""


def test_systemd_unit_verifies(systemd_root: Path) -> None:
    text = (DEPLOY / "edgeproxy.service").read_text(encoding="utf-8")
    assert _verify(systemd_root, text) == ""


def test_systemd_verify_would_catch_a_mistake(systemd_root: Path) -> None:
    text = (DEPLOY / "edgeproxy.service").read_text(encoding="utf-8")
    assert _verify(systemd_root, text.replace("KillSignal=SIGTERM", "KillSignal=SIGTREM")) != ""


def test_systemd_stop_timeout_covers_the_drain() -> None:
    unit = dict(re.findall(r"^(\w+)=(.*)$", (DEPLOY / "edgeproxy.service").read_text(encoding="utf-8"), re.M))
    drain = env_file(DEPLOY / "edgeproxy.env").get("EDGEPROXY_DRAIN_TIMEOUT", DEFAULTS["EDGEPROXY_DRAIN_TIMEOUT"])
    assert unit["KillSignal"] == "SIGTERM"
    assert seconds(unit["TimeoutStopSec"]) > seconds(drain)


def test_readme_gives_the_build_command() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "docker build -f deploy/Dockerfile" in readme
    assert "Not there yet" not in readme or "PROXY protocol support lands" not in readme
