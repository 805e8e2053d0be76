"""TLS and mutual TLS on the gRPC port, with certificates made at test time (for 127.0.0.1 only).

Certificates come from the `cryptography` package when it is installed, else from the `openssl`
command; with neither, the tests skip and say so.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from canvaswatch.client import simulate
from canvaswatch.client.replay import replay
from canvaswatch.client.stream import channel_options
from canvaswatch.server.cli import main
from canvaswatch.server.config import ConfigError, parse_config
from canvaswatch.v1 import monitor_pb2 as pb
from canvaswatch.v1 import monitor_pb2_grpc as pb_grpc
from tests.conftest import start_sidecar


def _with_cryptography(directory: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, issuer_key=None, issuer_name=None, ca: bool = False, san: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                            critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (directory / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption()))
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, subject

    ca_key, ca_name = make("ca", ca=True)
    make("server", ca_key, ca_name, san=True)
    make("client", ca_key, ca_name)


def _with_openssl(directory: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
        "-subj", "/CN=ca", "-keyout", "ca.key", "-out", "ca.pem")
    (directory / "server.ext").write_text("subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n")
    (directory / "client.ext").write_text("basicConstraints = CA:FALSE\n")
    for name in ("server", "client"):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-extfile", f"{name}.ext", "-out", f"{name}.pem")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is here to make test certificates")
        _with_openssl(directory)
    else:
        _with_cryptography(directory)
    return directory


def _channel(target: str, certs: Path, client_cert: bool) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(certs / "client.pem").read_bytes() if client_cert else None)
    return grpc.secure_channel(target, credentials, options=channel_options())


def _list(channel: grpc.Channel) -> list[str]:
    return [m.name for m in pb_grpc.CanvasMonitorStub(channel).ListMonitors(pb.ListMonitorsRequest(), timeout=10).monitors]


def test_tls_serves_verdicts_and_refuses_plaintext(vocab, tmp_path, certs):
    server = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}
    running = start_sidecar(vocab, tmp_path, {"server": server})
    trace = simulate.scenario("surviving_phrase", vocab.encode, vocab.size, request_id="over-tls", seed=1)
    try:
        with _channel(running.target, certs, client_cert=False) as channel:
            verdict = replay(trace, channel, timeout=30)
        with running.channel() as plaintext, pytest.raises(grpc.RpcError) as refused:
            _list(plaintext)
    finally:
        running.thread.stop()
    assert verdict.request_id == "over-tls" and verdict.flags
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(vocab, tmp_path, certs):
    server = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key"),
              "tls_client_ca": str(certs / "ca.pem")}
    running = start_sidecar(vocab, tmp_path, {"server": server})
    try:
        with _channel(running.target, certs, client_cert=True) as channel:
            listed = _list(channel)
        with _channel(running.target, certs, client_cert=False) as channel, pytest.raises(grpc.RpcError) as refused:
            _list(channel)
    finally:
        running.thread.stop()
    assert "lexicon" in listed
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"tls_cert": "cert.pem"}, "server.tls_cert: tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, "server.tls_client_ca: mutual TLS needs the server's own tls_cert and tls_key"),
        ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}, "server.tls_cert: no such file"),
    ],
)
def test_tls_keys_are_validated_naming_the_key(server, message):
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": server})
    assert message in str(caught.value)


def test_serve_tls_flags_are_validated_like_the_config(capsys):
    assert main(["serve", "--tls-cert", "/nonexistent/cert.pem"]) == 2
    assert "configuration error: server.tls_cert: tls_cert and tls_key go together" in capsys.readouterr().err


def test_a_file_that_is_not_pem_is_named(vocab, tmp_path, certs):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(OSError, match=r"server.tls_cert: '.*bad.pem' is not a PEM file"):
        start_sidecar(vocab, tmp_path, {"server": {"tls_cert": str(bad), "tls_key": str(certs / "server.key")}})


def test_replay_connects_with_mutual_tls(vocab, tmp_path, certs, capsys):
    from canvaswatch.client.trace import write_traces

    trace_file = tmp_path / "one.cwtrace"
    write_traces(trace_file, [simulate.scenario("clean", vocab.encode, vocab.size, request_id="replayed-tls", seed=2)])
    server = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key"),
              "tls_client_ca": str(certs / "ca.pem")}
    running = start_sidecar(vocab, tmp_path, {"server": server})
    try:
        code = main(["replay", str(trace_file), "--target", running.target, "--json", "--tls-ca", str(certs / "ca.pem"),
                     "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")])
    finally:
        running.thread.stop()
    assert code == 0
    assert '"request_id": "replayed-tls"' in capsys.readouterr().out
