"""TLS for the native server (``--certfile``/``--keyfile``).

Browsers speak HTTP/2 only over TLS, and over HTTP/1.1 they open at most six
connections per origin: a page with more live readers than that stalls. So the
server offers ``h2`` and ``http/1.1`` by ALPN; a client that offers neither (or
no ALPN at all) gets HTTP/1.1.

The context is the standard library's server default
(``ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)``: no SSLv2/3,
no compression, server cipher preference), further limited to what HTTP/2
requires of TLS (RFC 9113 section 9.2): TLS 1.2 or later, AEAD ciphers with
forward secrecy only, no renegotiation.

It is built once, in the parent, so that a missing file, a key that does not
match the certificate or an encrypted key is a clear error at start-up rather
than a worker dying after the fork.
"""

from __future__ import annotations

import ssl

# In order of preference. HTTP/2 first: it is what lets a browser hold many
# live readers on one connection.
ALPN_PROTOCOLS = ("h2", "http/1.1")

# TLS 1.2 cipher suites (TLS 1.3 has its own, all of them AEAD): ephemeral key
# exchange and AEAD only, as HTTP/2 requires of TLS 1.2 (RFC 9113 section 9.2.2).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"

# A closing TLS connection flushes what it still has to send, sends
# close_notify and waits for the client's close_notify, which an idle pooled
# client connection (httpx, requests) never reads, let alone answers: past
# this, the socket is dropped. Short, because a graceful stop waits for every
# connection to end; what is left to flush at that point is at most a write
# buffer (handlers wait for the transport to drain before they finish).
SHUTDOWN_TIMEOUT_S = 2.0


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; the message says why."""


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The server's TLS context for ``certfile`` (PEM, the certificate first,
    then any intermediates) and ``keyfile`` (its PEM private key, unencrypted)."""
    for what, path in (("certificate", certfile), ("key", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or exc
            raise TLSConfigError(f"cannot read the TLS {what} file {path}: {reason}") from None

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    try:
        # The password callback stops OpenSSL from prompting on the terminal
        # for an encrypted key: a server must start unattended.
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except _EncryptedKey:
        raise TLSConfigError(
            f"the TLS key file {keyfile} is encrypted; give the server an unencrypted key"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(
                f"the TLS key in {keyfile} does not match the certificate in {certfile}"
            ) from None
        # OpenSSL says little more than "PEM lib" for a file that is not PEM.
        raise TLSConfigError(
            f"cannot load the TLS certificate {certfile} with the key {keyfile} "
            f"({exc.reason or 'not PEM'}): the certificate file must hold PEM "
            "certificates, the key file a PEM private key"
        ) from None
    return context


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey()


def selected_alpn(transport: object) -> str | None:
    """The protocol ALPN chose on a TLS transport; None without TLS or ALPN."""
    get_extra_info = getattr(transport, "get_extra_info", None)
    ssl_object = get_extra_info("ssl_object") if get_extra_info is not None else None
    return ssl_object.selected_alpn_protocol() if ssl_object is not None else None
