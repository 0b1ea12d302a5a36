"""TLS to a remote scheduler: a real `dask scheduler` and `dask worker` that require certificates."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from distributed.security import Security

from conftest import daskdp_cli, read_results
from daskdp.clusters import connect
from daskdp.errors import UserError

pytestmark = pytest.mark.slow

DASK = [sys.executable, "-m", "dask"]


def write_certificate(directory: Path, name: str, issuer: tuple | None = None) -> tuple:
    """``name.pem`` and ``name.key``, signed by ``issuer`` (key, certificate) or self-signed as a CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer_cert = issuer or (key, None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return key, cert


def tls_flags(directory: Path, name: str) -> list[str]:
    return [
        "--tls-ca-file",
        str(directory / "ca.pem"),
        "--tls-cert",
        str(directory / f"{name}.pem"),
        "--tls-key",
        str(directory / f"{name}.key"),
    ]


def stop(process: subprocess.Popen) -> None:
    """End a process started in its own session, with its children (the worker under a nanny)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A scheduler on tls://127.0.0.1 and one GPU=1 worker; yields (address, certificate directory)."""
    certs = tmp_path_factory.mktemp("certs")
    ca = write_certificate(certs, "ca")
    for name in ("node", "client"):
        write_certificate(certs, name, issuer=ca)
    write_certificate(certs, "stranger", issuer=write_certificate(certs, "other-ca"))
    scheduler_file = certs / "scheduler.json"
    logs = certs / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(command: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(logs / log, "wb") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        processes.append(process)
        return process

    try:
        scheduler = start(
            [
                *DASK, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file),
                *tls_flags(certs, "node"),
            ],
            "scheduler.log",
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # the scheduler writes its address once it listens
            try:
                address = json.loads(scheduler_file.read_text())["address"]
                break
            except (OSError, ValueError):
                assert scheduler.poll() is None, (logs / "scheduler.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the scheduler did not start in 30 s"
                time.sleep(0.1)
        assert address.startswith("tls://127.0.0.1:")
        start(
            [
                *DASK, "worker", address, "--nthreads", "1", "--resources", "GPU=1",
                "--preload", "daskdp.engine.plugin", "--host", "127.0.0.1", "--no-dashboard",
                "--death-timeout", "30", *tls_flags(certs, "node"),
            ],
            "worker.log",
            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "ERROR"},
        )  # fmt: skip
        security = Security(
            tls_ca_file=str(certs / "ca.pem"),
            tls_client_cert=str(certs / "client.pem"),
            tls_client_key=str(certs / "client.key"),
            require_encryption=True,
        )
        with Client(address, security=security, timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            assert all(worker.startswith("tls://") for worker in client.scheduler_info()["workers"])
        yield address, certs
    finally:
        for process in reversed(processes):
            stop(process)


@pytest.fixture
def prompts(tmp_path):
    source = tmp_path / "prompts.jsonl"
    rows = [{"id": 100 + i, "prompt": f"Short prompt number {i}."} for i in range(6)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return source, [row["id"] for row in rows]


def test_tls_scheduler_without_certificates_is_one_line(tls_cluster, prompts, tmp_path):
    address, _ = tls_cluster
    source, _ = prompts
    out = tmp_path / "out"
    done = daskdp_cli("run", source, "-o", out, "--scheduler-address", address, "--max-tokens", 4, "--quiet")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("daskdp: error:"), done.stderr[-3000:]
    assert "--tls-ca-file" in lines[0] and "Traceback" not in done.stderr
    assert not out.exists()


def test_tls_scheduler_with_certificates_generates_every_row(tls_cluster, prompts, tmp_path):
    address, certs = tls_cluster
    source, ids = prompts
    out = tmp_path / "out"
    done = daskdp_cli(
        "run", source, "-o", out, "--scheduler-address", address, "--max-tokens", 4, "--quiet",
        *tls_flags(certs, "client"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results(out)
    assert sorted(results["id"]) == ids


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls-cert": "stranger.pem", "tls-key": "stranger.key"}, "refused the TLS connection"),
        ({"tls-ca-file": "other-ca.pem"}, "presented a certificate that --tls-ca-file"),
        ({"tls-ca-file": "missing.pem"}, "cannot read --tls-ca-file"),
        ({"tls-key": "node.key"}, "with its key --tls-key"),
        ({"tls-ca-file": "client.key"}, "holds no CA certificate"),
    ],
    ids=[
        "unknown-client-certificate",
        "wrong-ca",
        "missing-file",
        "key-of-another-certificate",
        "ca-not-pem",
    ],
)
def test_tls_mistakes_name_the_file(tls_cluster, files, message):
    """Each mistake is one UserError naming the flag and path, at once, with no key in it."""
    address, certs = tls_cluster
    config = {"tls-ca-file": "ca.pem", "tls-cert": "client.pem", "tls-key": "client.key", **files}
    config = {key: str(certs / name) for key, name in config.items()}
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        connect({"scheduler-address": address, "startup-timeout": 600, **config}, tensor_parallel_size=1)
    text = str(error.value)
    assert message in text and "\n" not in text and "PRIVATE KEY" not in text
    assert time.monotonic() - started < 5
