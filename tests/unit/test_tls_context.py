"""gateway/servers/native/tls.py: the server's TLS context and its start-up errors."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from gateway.servers.native.tls import ALPN_PROTOCOLS, TLSConfigError, server_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pair(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def test_context_is_a_tls12_plus_server_context_offering_h2_first(pair: tuple[str, str]) -> None:
    context = server_context(*pair)
    assert ALPN_PROTOCOLS == ("h2", "http/1.1")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.verify_mode == ssl.CERT_NONE  # no client certificates asked for
    tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(c["aead"] and c["kea"] in ("kx-ecdhe", "kx-dhe") for c in tls12), tls12


def test_a_key_of_another_certificate_is_named_a_mismatch(
    ca: trustme.CA, pair: tuple[str, str], tmp_path: Path
) -> None:
    other = tmp_path / "other.pem"
    ca.issue_cert("localhost").private_key_pem.write_to_path(str(other))
    with pytest.raises(TLSConfigError, match="does not match the certificate"):
        server_context(pair[0], str(other))


def test_an_encrypted_key_is_refused_without_prompting(
    pair: tuple[str, str], tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pair[1]).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="is encrypted"):
        server_context(pair[0], str(encrypted))


@pytest.mark.parametrize("which", ["certificate", "key"])
def test_an_unreadable_file_is_named(pair: tuple[str, str], tmp_path: Path, which: str) -> None:
    missing = str(tmp_path / "missing.pem")
    cert, key = (missing, pair[1]) if which == "certificate" else (pair[0], missing)
    with pytest.raises(TLSConfigError, match=f"cannot read the TLS {which} file {missing}"):
        server_context(cert, key)


def test_files_that_are_not_pem_are_refused(pair: tuple[str, str], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    with pytest.raises(TLSConfigError, match="must hold PEM certificates"):
        server_context(str(garbage), pair[1])
    with pytest.raises(TLSConfigError, match="must hold PEM certificates"):
        server_context(pair[0], str(garbage))
