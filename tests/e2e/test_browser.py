"""A real browser against the HTTPS gateway: headless Chromium (Debian's
``chromium``) driven by ``puppeteer-core`` (tests/browser/, installed by
scripts/test).

Over HTTP/1.1 a browser opens at most six connections per origin, so a page
with twenty live readers stalls after six of them. Over TLS the gateway offers
HTTP/2, and the page's twenty EventSources share one connection: all of them
open, and all of them receive an append made afterwards.

Chromium trusts the test certificate by its public key
(``--ignore-certificate-errors-spki-list``), not by ignoring certificate errors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.gateway_server import REPO_ROOT, GatewayServer

pytestmark = pytest.mark.timeout(180)

BROWSER_DIR = REPO_ROOT / "tests" / "browser"
CHROMIUM = "/usr/bin/chromium"
READERS = 20


class ServerCert:
    def __init__(self, directory: Path) -> None:
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1", "localhost")
        self.ca = str(directory / "ca.pem")
        self.cert = str(directory / "cert.pem")
        self.key = str(directory / "key.pem")
        ca.cert_pem.write_to_path(self.ca)
        issued.cert_chain_pems[0].write_to_path(self.cert)
        issued.private_key_pem.write_to_path(self.key)
        leaf = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
        spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.spki_sha256 = base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return ServerCert(tmp_path_factory.mktemp("browser-tls"))


@pytest.fixture(scope="module")
def https_gateway(redis_url: str, server_cert: ServerCert) -> Iterator[GatewayServer]:
    args = ["--certfile", server_cert.cert, "--keyfile", server_cert.key]
    with GatewayServer(
        redis_url=redis_url, server="console-script", args=args, tls_ca=server_cert.ca
    ) as server:
        yield server


def _run_page(gateway_url: str, spki_sha256: str) -> dict:
    # Missing tools are a failure, not a skip: scripts/test installs them.
    node = shutil.which("node")
    assert node is not None, "node is not installed"
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing: scripts/test installs chromium"
    assert (BROWSER_DIR / "node_modules" / "puppeteer-core").is_dir(), (
        "tests/browser/node_modules missing: scripts/test runs npm ci there"
    )
    env = {
        **os.environ,
        "GATEWAY_URL": gateway_url,
        "SPKI_SHA256": spki_sha256,
        "READERS": str(READERS),
        "TIMEOUT_MS": "30000",
        "CHROMIUM": CHROMIUM,
    }
    done = subprocess.run(
        [node, "many-readers.mjs"],
        cwd=BROWSER_DIR,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_twenty_event_sources_on_one_https_origin_all_get_the_append_over_h2(
    https_gateway: GatewayServer, server_cert: ServerCert
) -> None:
    report = _run_page(https_gateway.url, server_cert.spki_sha256)
    summary = json.dumps(report, indent=1)
    print(
        f"\n{report['browser']}: {report['opened']}/{READERS} EventSources open in "
        f"{report.get('openMs')} ms; {report['received']}/{READERS} received the append "
        f"{report.get('deliveredMs')} ms after it was sent; protocols "
        f"{sorted(set(report['sseResponseProtocols']))}"
    )
    assert report["stream"].startswith(f"{https_gateway.url}/v1/stream/"), summary
    assert report["createStatus"] == 201, summary
    assert report["timedOut"] is None, summary
    assert report["opened"] == READERS, summary
    assert report["appendStatus"] == 204, summary
    assert report["received"] == READERS, summary
    assert report["ok"] is True, summary
    # The page's own view: its requests to the origin went over HTTP/2 ...
    protocols = [entry["nextHopProtocol"] for entry in report["resources"]]
    assert len(protocols) == 2 and set(protocols) == {"h2"}, summary  # the PUT and the POST
    assert report["navigationProtocol"] == "h2", summary
    # ... and so did every one of the readers' responses, as the browser saw them.
    assert report["sseResponseProtocols"] == ["h2"] * READERS, summary

    with open(https_gateway.log_path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    assert "Traceback" not in text and "[ERROR]" not in text, text[-4000:]
