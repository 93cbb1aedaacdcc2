"""The deployment artifacts under deploy/ agree with each other and with the gateway.

* Every Kubernetes manifest parses and has the expected kind and apiVersion; the
  kustomization lists them all (except the example Secret, on purpose).
* The Deployment's probe paths are answered 200 by a real gateway (the session
  ``gateway`` fixture: hypercorn on a real Redis); ports, labels, the HPA target,
  the PDB selector, the Secret reference and the shutdown timing line up; the
  container command is accepted by the console script's own argument parser.
* ``deploy/haproxy/haproxy.cfg`` passes ``haproxy -c``; its health check path is
  answered 200 by the gateway; its timeouts outlast the gateway's live reads; and,
  run for real in front of the gateway, it streams SSE events unbuffered, serves
  its stats page, and never sends a POST twice when a replica dies mid-request.
* ``deploy/nginx/nginx.conf`` passes ``nginx -t`` (when nginx is installed) and
  keeps the same contract; ``deploy/Dockerfile`` runs the console script as the
  non-root user the Deployment expects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support.procs import free_port, spawn, stop_process, tail

from gateway.cli import DEFAULT_PORT, build_parser
from gateway.config import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
DOCKERFILE = DEPLOY / "Dockerfile"

# file -> the (apiVersion, kind) of each document in it, in order.
EXPECTED_MANIFESTS = {
    "deployment.yaml": [("apps/v1", "Deployment")],
    "service.yaml": [("v1", "Service")],
    "pdb.yaml": [("policy/v1", "PodDisruptionBudget")],
    "hpa.yaml": [("autoscaling/v2", "HorizontalPodAutoscaler")],
    "secret.example.yaml": [("v1", "Secret")],
    "kustomization.yaml": [("kustomize.config.k8s.io/v1beta1", "Kustomization")],
}

# Upper bound of a replica's shutdown after SIGTERM: live reads end at once and the
# process exits in about 2 s; in-flight appends and catch-up reads are bounded by the
# 2 s Redis command timeout. Generous on purpose: it is a budget, not a measurement.
DRAIN_BOUND_S = 10

HAPROXY_INSTALL_HINT = (
    "haproxy is not installed: run scripts/test (it installs it as root), or "
    "`apt-get update && apt-get install -y haproxy`."
)


# --- helpers --------------------------------------------------------------------


def load_docs(name: str) -> list[dict[str, Any]]:
    with open(K8S / name) as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def load_one(name: str) -> dict[str, Any]:
    docs = load_docs(name)
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return load_one("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"port name {port!r} is not one of the container's {named}"
    return named[port]


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: container[kind]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        if kind in container
    }


def haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """``{"defaults": [[word, ...], ...], "backend gateways": [...], ...}``, comments dropped."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = line.split()
        if not raw[0].isspace():
            current = sections.setdefault(" ".join(words), [])
        else:
            assert current is not None, f"directive outside a section: {raw!r}"
            current.append(words)
    return sections


def haproxy_directives(section: list[list[str]], *prefix: str) -> list[list[str]]:
    return [words for words in section if words[: len(prefix)] == list(prefix)]


def haproxy_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, f"not an HAProxy time: {value!r}"
    factor = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(match.group(1)) * factor[match.group(2)]


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        pytest.fail(HAPROXY_INSTALL_HINT)
    return found


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments), ...]`` with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


# --- Kubernetes manifests --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_MANIFESTS))
def test_manifest_parses_with_the_expected_kinds(name: str) -> None:
    docs = load_docs(name)
    assert [(d.get("apiVersion"), d.get("kind")) for d in docs] == EXPECTED_MANIFESTS[name]


def test_no_manifest_goes_untested() -> None:
    assert {p.name for p in K8S.glob("*.y*ml")} == set(EXPECTED_MANIFESTS)


def test_kustomization_applies_everything_but_the_example_secret() -> None:
    kustomization = load_one("kustomization.yaml")
    resources = kustomization["resources"]
    assert sorted(resources) == sorted(
        name
        for name in EXPECTED_MANIFESTS
        if name not in ("kustomization.yaml", "secret.example.yaml")
    )
    assert all((K8S / name).is_file() for name in resources)
    # The image kustomize rewrites is the one the Deployment uses.
    image_names = {entry["name"] for entry in kustomization.get("images", [])}
    deployment_image = load_one("deployment.yaml")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert image_names <= {deployment_image.split(":")[0]}


def test_all_resources_share_one_name() -> None:
    names = {
        load_one(name)["metadata"]["name"]
        for name in ("deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml")
    }
    assert names == {"durable-streams-gateway"}


def test_probes_use_the_health_endpoints(container: dict[str, Any]) -> None:
    found = probes(container)
    assert set(found) == {"startupProbe", "livenessProbe", "readinessProbe"}
    assert found["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert found["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert found["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_probe_paths_answer_200_on_a_running_gateway(
    container: dict[str, Any], gateway: str
) -> None:
    with httpx.Client(base_url=gateway, timeout=5) as http:
        for kind, probe in probes(container).items():
            path = probe["httpGet"]["path"]
            response = http.get(path)
            assert response.status_code == 200, f"{kind} {path}: {response.status_code}"


def test_probe_timing_fits_the_readiness_check(container: dict[str, Any]) -> None:
    # /readyz waits at most 1 s for Redis: a probe timeout must be longer than that.
    for kind, probe in probes(container).items():
        assert probe.get("timeoutSeconds", 1) > 1, kind


def test_ports_line_up(container: dict[str, Any]) -> None:
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": DEFAULT_PORT, "metrics": 9464}
    assert DEFAULT_PORT == 4437
    for kind, probe in probes(container).items():
        assert resolve_port(container, probe["httpGet"]["port"]) == DEFAULT_PORT, kind
    service = load_one("service.yaml")
    assert service["spec"]["type"] == "ClusterIP"
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == 80
    assert resolve_port(container, service_port["targetPort"]) == DEFAULT_PORT
    assert service["spec"].get("sessionAffinity", "None") == "None"


def test_container_command_is_accepted_by_the_console_script(container: dict[str, Any]) -> None:
    command = container["command"]
    assert command[0] == "durable-streams-gateway"
    assert all(isinstance(arg, str) for arg in command)
    args = build_parser().parse_args(command[1:])
    assert (args.host, args.port, args.workers) == ("0.0.0.0", DEFAULT_PORT, 1)
    assert args.metrics_port == 9464  # the container's "metrics" port


def test_redis_url_comes_from_the_secret(container: dict[str, Any]) -> None:
    env = {item["name"]: item for item in container.get("env", [])}
    ref = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = load_one("secret.example.yaml")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert secret["stringData"][ref["key"]].startswith(("redis://", "rediss://"))
    # With a Redis URL the embedded Redis (and so DS_DATA_DIR) is never used.
    assert "DS_DATA_DIR" not in env
    assert "REDIS_CLUSTER_URL" not in env  # commented alternative, not both at once


def test_selectors_match_the_pod_labels(deployment: dict[str, Any]) -> None:
    labels = pod_labels(deployment)
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": load_one("service.yaml")["spec"]["selector"],
        "PodDisruptionBudget": load_one("pdb.yaml")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector, kind
        assert selector.items() <= labels.items(), f"{kind} selector {selector} vs {labels}"


def test_pdb_leaves_replicas_serving(deployment: dict[str, Any]) -> None:
    spec = load_one("pdb.yaml")["spec"]
    hpa = load_one("hpa.yaml")["spec"]
    if "maxUnavailable" in spec:
        assert spec["maxUnavailable"] == 1
    else:
        assert 1 <= spec["minAvailable"] < hpa["minReplicas"]


def test_hpa_scales_the_deployment_on_cpu(deployment: dict[str, Any]) -> None:
    hpa = load_one("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": deployment["kind"],
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # CPU utilization is relative to the request, so the container must declare one.
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    assert deployment["spec"]["replicas"] >= hpa["minReplicas"]


def test_grace_period_covers_pre_stop_and_drain(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = int(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        sleep_s = int(command[1])
    assert 2 <= sleep_s <= 15
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > sleep_s + DRAIN_BOUND_S


def test_pod_runs_unprivileged_on_a_read_only_root(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    # The image's USER is the same numeric id (runAsNonRoot can only verify numeric ids).
    (user,) = [args for name, args in dockerfile_instructions() if name == "USER"]
    assert user.split(":")[0] == str(pod["runAsUser"])


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_runs_the_console_script() -> None:
    instructions = dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, args in instructions:
        by_name.setdefault(name, []).append(args)
    assert by_name["FROM"] == ["python:3.11-slim"]
    assert any(re.search(r"\bpip install \.(\s|$)", args) for args in by_name["RUN"])
    (cmd,) = by_name["CMD"]
    cmd_args = json.loads(cmd)  # exec form: the console script is PID 1 and gets SIGTERM
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd_args[0] in scripts and scripts[cmd_args[0]] == "gateway.cli:main"
    assert build_parser().parse_args(cmd_args[1:]).host == "0.0.0.0"
    assert by_name["EXPOSE"] == [str(DEFAULT_PORT)]
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    user = by_name["USER"][-1].split(":")[0]
    assert user.isdigit() and user != "0"


def test_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    copied = {
        src.rstrip("/")
        for name, args in dockerfile_instructions()
        if name == "COPY"
        for src in args.split()[:-1]
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", "setup.py", project["project"]["readme"]}
    needed |= {package.rstrip("*") for package in packages}
    assert needed <= copied, f"missing from COPY: {needed - copied}"


# --- HAProxy ---------------------------------------------------------------------------


def test_haproxy_config_is_valid() -> None:
    result = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_health_check_path_answers_200(gateway: str) -> None:
    backend = haproxy_sections(HAPROXY_CFG.read_text())["backend gateways"]
    (check,) = haproxy_directives(backend, "option", "httpchk")
    assert check[2:4] == ["GET", "/readyz"], check
    assert haproxy_directives(backend, "http-check", "expect") == [
        ["http-check", "expect", "status", "200"]
    ]
    with httpx.Client(timeout=5) as http:
        assert http.get(f"{gateway}{check[3]}").status_code == 200


def test_haproxy_settings_suit_live_reads() -> None:
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    defaults = sections["defaults"]
    assert ["mode", "http"] in defaults
    timeouts = {w[1]: haproxy_seconds(w[2]) for w in haproxy_directives(defaults, "timeout")}
    settings = Settings()
    longest_live_s = max(settings.long_poll_timeout_ms, settings.sse_max_duration_ms) / 1000
    for name in ("client", "server", "tunnel"):
        assert timeouts[name] >= longest_live_s + 15, (name, timeouts[name])
    assert "http-keep-alive" in timeouts
    # No replays: only connection failures (the request was never sent) are retried.
    assert haproxy_directives(defaults, "retry-on") == [["retry-on", "conn-failure"]]
    every_line = [words for section in sections.values() for words in section]
    assert ["option", "http-buffer-request"] not in every_line
    assert not any(words[0] == "compression" for words in every_line)
    assert ["option", "forwardfor"] in sections["frontend durable_streams"]
    backend = sections["backend gateways"]
    assert haproxy_directives(backend, "balance")[0][1] in ("roundrobin", "leastconn")
    # The stats page listens on loopback only.
    stats = [name for name, lines in sections.items() if ["stats", "enable"] in lines]
    assert stats, "no stats page"
    for name in stats:
        for bind in haproxy_directives(sections[name], "bind"):
            assert bind[1].startswith("127.0.0.1:"), bind


def _local_haproxy_config(backends: list[tuple[str, int]], port: int, stats_port: int, tmp: Path):
    """The shipped config with only addresses, ports and paths changed for this host."""
    text = HAPROXY_CFG.read_text()
    replacements = [
        (r"(?m)^(\s*)bind :80$", rf"\g<1>bind 127.0.0.1:{port}"),
        (r"(?m)^(\s*)bind 127\.0\.0\.1:8404$", rf"\g<1>bind 127.0.0.1:{stats_port}"),
        (r"(?m)^(\s*stats socket )/run/haproxy/admin\.sock", rf"\g<1>{tmp}/admin.sock"),
        (r"(?m)^\s*(user|group) haproxy\n", ""),  # stay the user running the tests
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text)
        assert count >= 1, f"{pattern!r} not found in {HAPROXY_CFG}: update this test"
    servers = "".join(
        f"    server gw{i} {host}:{bport}\n" for i, (host, bport) in enumerate(backends, 1)
    )
    text, count = re.subn(r"(?m)^    server gw\d+ .*\n", "", text)
    assert count >= 1
    text = text.replace("    # The replicas.", servers + "    # The replicas.", 1)
    path = tmp / "haproxy.cfg"
    path.write_text(text)
    return path


class RunningHAProxy:
    def __init__(self, backends: list[tuple[str, int]], tmp: Path) -> None:
        self.port = free_port()
        self.stats_port = free_port()
        while self.stats_port == self.port:
            self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}"
        config = _local_haproxy_config(backends, self.port, self.stats_port, tmp)
        self.log_path = tmp / "haproxy.log"
        self.proc = spawn([haproxy_binary(), "-f", str(config), "-db"], self.log_path, cwd=tmp)

    def wait_until(self, path: str, status: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(timeout=2) as http:
            while True:
                assert self.proc.poll() is None, f"haproxy exited:\n{tail(self.log_path)}"
                try:
                    response = http.get(f"{self.url}{path}")
                    if response.status_code == status:
                        return
                    last = f"HTTP {response.status_code}"
                except httpx.TransportError as exc:
                    last = repr(exc)
                assert time.monotonic() < deadline, (
                    f"{path} through haproxy never answered {status} ({last}):\n"
                    f"{tail(self.log_path)}"
                )
                time.sleep(0.05)  # poll interval, not a wait for readiness

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def haproxy_in_front_of(tmp_path: Path) -> Iterator[Any]:
    started: list[RunningHAProxy] = []

    def start(backends: list[tuple[str, int]]) -> RunningHAProxy:
        lb = RunningHAProxy(backends, tmp_path)
        started.append(lb)
        return lb

    try:
        yield start
    finally:
        for lb in started:
            lb.stop()


def test_haproxy_streams_sse_and_serves_stats(gateway: str, haproxy_in_front_of) -> None:
    gateway_port = int(gateway.rsplit(":", 1)[1])
    lb = haproxy_in_front_of([("127.0.0.1", gateway_port)])
    lb.wait_until("/readyz", 200)
    url = f"{lb.url}/v1/stream/deploy-test/{uuid.uuid4().hex}"
    with httpx.Client(timeout=5) as http:
        assert http.put(url, headers={"content-type": "text/plain"}).status_code == 201
        tail_offset = http.head(url).headers["stream-next-offset"]
        # The SSE response lasts 60 s; the event must arrive long before that (read
        # timeout 5 s), i.e. HAProxy forwards it as the gateway writes it.
        params = {"offset": tail_offset, "live": "sse"}
        with http.stream("GET", url, params=params) as sse:
            assert sse.status_code == 200
            assert sse.headers["content-type"].startswith("text/event-stream")
            posted = http.post(
                url, content=b"through-haproxy", headers={"content-type": "text/plain"}
            )
            assert posted.status_code in (200, 204)
            for line in sse.iter_lines():
                if line == "data:through-haproxy":
                    break
            else:
                pytest.fail("the SSE response ended without the appended data")
        stats = http.get(f"{lb.stats_url}/stats")
        assert stats.status_code == 200 and "gateways" in stats.text
        metrics = http.get(f"{lb.stats_url}/metrics")
        assert metrics.status_code == 200 and "haproxy_backend_" in metrics.text


class _DyingReplica(socketserver.ThreadingTCPServer):
    """Passes health checks, then dies on every POST after reading it: the request
    reached the replica (it may have appended) but no response comes back."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _DyingHandler)
        self.posts = 0
        self.lock = threading.Lock()


class _DyingHandler(socketserver.StreamRequestHandler):
    server: _DyingReplica

    def handle(self) -> None:
        request_line = self.rfile.readline()
        length = 0
        while (header := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if request_line.startswith(b"POST "):
            self.rfile.read(length)
            with self.server.lock:
                self.server.posts += 1
            self.connection.shutdown(socket.SHUT_RDWR)  # no response at all
            return
        self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")


def _post_in_one_segment(port: int, body: bytes) -> int:
    """POST with headers and body in one write, so HAProxy holds the complete request
    before it connects: the case in which an L7 retry could replay it."""
    request = (
        b"POST /v1/stream/x HTTP/1.1\r\nhost: lb\r\ncontent-type: text/plain\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return int(response.split(b" ", 2)[1])


def test_haproxy_forwarded_headers_name_the_gateway_and_cannot_be_spoofed(
    gateway: str, haproxy_in_front_of
) -> None:
    """Through the shipped configuration the 201 Location names the balancer's
    URL as the client used it: HAProxy overwrites the X-Forwarded-* headers a
    client sends, and the gateway believes them from HAProxy (on loopback, the
    default DS_FORWARDED_ALLOW_IPS)."""
    gateway_port = int(gateway.rsplit(":", 1)[1])
    lb = haproxy_in_front_of([("127.0.0.1", gateway_port)])
    lb.wait_until("/readyz", 200)
    path = f"/v1/stream/deploy-test/{uuid.uuid4().hex}"
    spoofed = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    with httpx.Client(timeout=5) as http:
        created = http.put(f"{lb.url}{path}", headers=spoofed)
    assert created.status_code == 201
    assert created.headers["location"] == f"{lb.url}{path}"


def test_haproxy_never_sends_a_post_twice(haproxy_in_front_of) -> None:
    replicas = [_DyingReplica(), _DyingReplica()]
    threads = [threading.Thread(target=r.serve_forever, daemon=True) for r in replicas]
    for thread in threads:
        thread.start()
    try:
        lb = haproxy_in_front_of([r.server_address for r in replicas])
        lb.wait_until("/readyz", 200)
        # With "retry-on empty-response" (and more so with option http-buffer-request)
        # HAProxy 2.6 sends this POST to both replicas, three times in all.
        assert _post_in_one_segment(lb.port, b"once") == 502
        assert sum(r.posts for r in replicas) == 1
        with httpx.Client(timeout=10) as http:
            assert http.post(f"{lb.url}/v1/stream/x", content=b"twice").status_code == 502
        assert sum(r.posts for r in replicas) == 2
    finally:
        for replica in replicas:
            replica.shutdown()
            replica.server_close()
        for thread in threads:
            thread.join(5)


# --- nginx -----------------------------------------------------------------------------


def test_nginx_config_keeps_the_contract() -> None:
    directives = [
        line.split("#", 1)[0].strip().rstrip(";").split()
        for line in NGINX_CONF.read_text().splitlines()
    ]
    directives = [d for d in directives if d]
    assert ["proxy_buffering", "off"] in directives
    assert ["proxy_request_buffering", "off"] in directives
    assert ["proxy_http_version", "1.1"] in directives
    assert ["proxy_set_header", "Connection", '""'] in directives
    assert any(d[0] == "keepalive" for d in directives)
    (read_timeout,) = [d for d in directives if d[0] == "proxy_read_timeout"]
    assert int(read_timeout[1].rstrip("s")) >= 90
    (next_upstream,) = [d for d in directives if d[0] == "proxy_next_upstream"]
    assert "non_idempotent" not in next_upstream


def test_nginx_config_is_valid() -> None:
    nginx = nginx_binary()
    if nginx is None:
        pytest.fail("nginx is missing: scripts/test installs it (apt-get install nginx-light)")
    result = subprocess.run(
        [nginx, "-t", "-c", str(NGINX_CONF)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
