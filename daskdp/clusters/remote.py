"""An existing Dask scheduler: connecting to it, with TLS, and one line saying why it failed."""

from __future__ import annotations

import re
import socket
import ssl
import struct
from pathlib import Path
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client
from distributed.comm import CommClosedError
from distributed.comm.addressing import parse_address, parse_host_port
from distributed.security import Security

from daskdp.errors import UserError, exception_chain

# The client's TLS files: Security's parameter -> daskdp's key, its flag, and the Dask key that
# applies when none of daskdp's keys is set.
TLS_FILES = {
    "tls_ca_file": ("tls-ca-file", "--tls-ca-file", "distributed.comm.tls.ca-file"),
    "tls_client_cert": ("tls-cert", "--tls-cert", "distributed.comm.tls.client.cert"),
    "tls_client_key": ("tls-key", "--tls-key", "distributed.comm.tls.client.key"),
}

TLS_FLAGS = "--tls-ca-file CA.pem --tls-cert CERT.pem --tls-key KEY.pem"


def client_security(cluster_config: dict[str, Any], address: str) -> tuple[Security | None, dict[str, str]]:
    """The client's ``Security`` for the scheduler at ``address``, and a name for each of its files.

    ``cluster.tls-ca-file``/``tls-cert``/``tls-key`` when any is set, with encryption required.
    Otherwise Dask decides: ``None`` when a ``distributed.client.security-loader`` is configured
    (``Client`` calls it), else ``Security()``, which reads ``distributed.comm.tls.*``. Mistakes
    that Dask would report with a traceback, or only at the first connection, raise `UserError`.
    A file is named by its flag (or Dask key) and path; PEM text given in place of a path is
    never shown.
    """
    ours = {attr: cluster_config.get(key) for attr, (key, _, _) in TLS_FILES.items()}
    if any(ours.values()):
        security = Security(require_encryption=True, **ours)
        names = {attr: flag for attr, (_, flag, _) in TLS_FILES.items()}
    elif dask.config.get("distributed.client.security-loader"):
        return None, {}
    else:
        security = Security()
        names = {attr: dask_key for attr, (_, _, dask_key) in TLS_FILES.items()}
    files = {attr: getattr(security, attr) for attr in TLS_FILES}
    named = {attr: _named(names[attr], value) for attr, value in files.items()}
    for attr, value in files.items():
        if value and "\n" not in value:  # Dask also takes PEM text in place of a path
            try:
                with open(value, "rb"):
                    pass
            except OSError as e:
                raise UserError(f"cannot read {named[attr]} ({e.strerror or e}); check the path") from None
    key = "tls_client_key" if files["tls_client_key"] else "tls_client_cert"
    if files[key] and _passphrase_protected(files[key]):
        # ssl would ask for the passphrase on the terminal; Dask has no parameter to pass one.
        raise UserError(
            f"{named[key]} holds a passphrase-protected private key, which Dask cannot use; "
            "pass an unprotected key"
        )
    scheme, _ = parse_address(address)
    if scheme == "tcp" and security.require_encryption:
        given = [names[attr] for attr, value in ours.items() if value]
        why = f"{', '.join(given)} given" if given else "distributed.comm.require-encryption is set"
        raise UserError(f"the scheduler address {address} is not encrypted but {why}; use tls://HOST:PORT")
    if scheme == "tls" and not (files["tls_ca_file"] and files["tls_client_cert"]):
        if not any(ours.values()):
            raise UserError(
                f"the scheduler at {address} uses TLS but no certificates are given; pass {TLS_FLAGS} "
                "(or set distributed.comm.tls.ca-file and distributed.comm.tls.client.cert/key)"
            )
        missing = " and ".join(names[attr] for attr in ("tls_ca_file", "tls_client_cert") if not files[attr])
        raise UserError(
            f"TLS needs a CA file and a client certificate; pass {missing} too "
            "(--tls-key may be left out only when the key is in the certificate file)"
        )
    return security, named


def _named(name: str, value: str | None) -> str:
    return f"{name} {value}" if value and "\n" not in value else name


def _connect_error(address: str, error: OSError, security: Security | None, named: dict[str, str]) -> str:
    """One line saying why ``Client(address)`` failed and which setting to fix."""
    chain = exception_chain(error)
    text = " ".join(str(e) for e in chain)
    found = re.search(r"\[(?:SSL|X509)[^\]]*\] ([^(]+)", text)
    reason = found.group(1) if found else str(error).rpartition(">: ")[2] or type(error).__name__
    reason = " ".join(re.sub(r"\(_ssl\.c:\d+\)", "", reason).split())
    ca = named.get("tls_ca_file", "--tls-ca-file")
    cert = named.get("tls_client_cert", "--tls-cert")
    timed_out = str(error).startswith("Timed out")
    reached = timed_out or any(isinstance(e, (CommClosedError, TimeoutError)) for e in chain)
    if not reached and security is not None and security.tls_client_cert:
        # Raised by ssl while loading the client's own files, before any connection.
        if not _loads_as_ca(security.tls_ca_file):
            return f"{ca} holds no CA certificate in PEM format ({reason}); pass the CA's certificate"
        key = named.get("tls_client_key") or cert
        return (
            f"cannot load the TLS client certificate {cert} with its key {key} ({reason}); "
            "both must be PEM files and the key must belong to the certificate"
        )
    scheme = parse_address(address)[0]
    if timed_out or scheme != "tls":
        hint = ""
        if scheme == "tcp" and not timed_out:
            hint = f"; if it requires TLS, use tls://HOST:PORT with {TLS_FLAGS}"
        return (
            f"cannot reach the Dask scheduler at {address} ({reason}); "
            f"check --scheduler-address and that `dask scheduler` is running{hint}"
        )
    if "verify failed" in reason:
        return (
            f"the Dask scheduler at {address} presented a certificate that {ca} does not verify "
            f"({reason}); pass the CA that signed the scheduler's certificate"
        )
    if "wrong version number" in reason:
        return (
            f"the Dask scheduler at {address} does not speak TLS ({reason}); "
            "use its tcp:// address, or start it with --protocol tls"
        )
    # The scheduler checks the client's certificate after the client's side of the handshake:
    # the refusal arrives as an alert (unknown ca, certificate expired) or as a bare EOF.
    return (
        f"the Dask scheduler at {address} refused the TLS connection ({reason}); "
        f"{cert} must be valid and signed by a CA that the scheduler trusts"
    )


def _loads_as_ca(ca: str) -> bool:
    try:
        ssl.create_default_context(**{"cadata" if "\n" in ca else "cafile": ca})
    except (OSError, ValueError):
        return False
    return True


def _passphrase_protected(key: str) -> bool:
    try:
        text = key if "\n" in key else Path(key).read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"^-----BEGIN ENCRYPTED|^Proc-Type: 4,ENCRYPTED", text, re.MULTILINE))


def check_scheduler(address: str, security: Security, timeout: float) -> None:
    """Refuse an address where something other than a Dask scheduler listens.

    ``Client`` waits for the scheduler's handshake without a limit (a server that accepts and
    stays silent holds it forever) and reads whatever comes back as Dask frames (an HTTP
    server's answer becomes a length of exabytes). A Dask scheduler speaks first: the length
    of its handshake, as soon as it accepts. One connection made here reads those 8 bytes
    within ``timeout``. Connection errors (``OSError``) are left to the caller.
    """
    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    host, port = parse_host_port(location)
    # Loading the client's own files fails here, before any connection, as in Client.
    context = security.get_connection_args("client")["ssl_context"] if scheme == "tls" else None
    with socket.create_connection((host, port), timeout=timeout) as raw:
        raw.settimeout(timeout)
        try:
            first = _first_bytes(raw, 8, context, host)
        except TimeoutError:
            raise UserError(
                f"{address} did not answer within {timeout:g} s, as a Dask scheduler does at once; "
                "check --scheduler-address (distributed.comm.timeouts.connect sets the wait)"
            ) from None
        except ssl.SSLError as e:  # reached, and refused: as Client reports it
            raise CommClosedError(str(e)) from e
    if len(first) < 8 or struct.unpack("<Q", first)[0] > MAX_HANDSHAKE_BYTES:
        raise UserError(
            f"{address} is not a Dask scheduler (it answered {first[:8]!r}); check --scheduler-address"
        )


MAX_HANDSHAKE_BYTES = 1 << 24


def _first_bytes(raw: socket.socket, count: int, context: ssl.SSLContext | None, host: str) -> bytes:
    """Up to ``count`` bytes the server sends first, over TLS when a ``context`` is given."""
    connection = raw if context is None else context.wrap_socket(raw, server_hostname=host)
    first = b""
    while len(first) < count:
        received = connection.recv(count - len(first))
        if not received:
            break
        first += received
    return first


def connect_scheduler(cluster_config: dict[str, Any], address: str) -> Client:
    """A client on the running scheduler at ``address``.

    The scheduler is given ``distributed.comm.timeouts.connect`` (30 s by default) to answer, or
    ``cluster.startup-timeout`` when shorter; a refused TLS handshake fails at once.
    """
    security, named = client_security(cluster_config, address)
    timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
    if cluster_config.get("startup-timeout"):
        timeout = min(timeout, cluster_config["startup-timeout"])
    try:
        if security is not None:  # else a configured security-loader gives Client its own
            check_scheduler(address, security, timeout)
        return Client(address, security=security, timeout=timeout)
    except OSError as e:
        raise UserError(_connect_error(address, e, security, named)) from None
