"""Private CAs and server certificates for TLS tests, made with ``cryptography``; a bare TLS
listener; stunnel to put TLS in front of a plaintext server."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lensflow.process import ChildProcess, free_port, port_open
from tests.support.env import system_tool


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class TestCA:
    """A self-signed CA in ``folder`` (``<name>-ca.pem``) that issues loopback certificates."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self._cert = (
            self._builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.pem = folder / f"{name}-ca.pem"
        self.pem.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject, issuer, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, host: str = "127.0.0.1") -> Issued:
        """A server certificate for ``host`` (and localhost), signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
        cert = (
            self._builder(subject, self._cert.subject, key.public_key())
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        issued = Issued(
            self.folder / f"{self.name}-server.pem", self.folder / f"{self.name}-server.key"
        )
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


class TlsListener:
    """A loopback TLS listener presenting ``issued``: it completes handshakes and then
    closes the connection, which is all a client needs to judge the certificate."""

    def __init__(self, issued: Issued):
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(issued.cert, issued.key)
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:
                with self._context.wrap_socket(conn, server_side=True):
                    self.handshakes += 1
            except OSError:
                pass  # the client refused our certificate: what the tests look for

    def __enter__(self) -> TlsListener:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def stunnel_binary() -> str:
    """Debian's stunnel (package stunnel4); in CI (CI=true) its absence fails the test,
    elsewhere skips it."""
    return system_tool(("stunnel", "stunnel4"), "apt-get install -y stunnel4")


class Stunnel(ChildProcess):
    """stunnel terminating TLS with ``issued`` on loopback ``port`` (a free one unless given)
    and forwarding the plaintext to ``target_port``: TLS in front of a server that has none."""

    def __init__(self, issued: Issued, target_port: int, folder: Path, port: int | None = None):
        self.port = port or free_port()
        config = folder / f"stunnel-{self.port}.conf"
        config.write_text(
            "foreground = yes\n"
            "pid =\n"
            "debug = info\n"
            "[tls]\n"
            f"accept = 127.0.0.1:{self.port}\n"
            f"connect = 127.0.0.1:{target_port}\n"
            f"cert = {issued.cert}\n"
            f"key = {issued.key}\n"
        )
        super().__init__(
            "stunnel", [stunnel_binary(), str(config)], log_path=folder / "stunnel.log"
        )

    def __enter__(self) -> Stunnel:
        self.spawn()
        self.wait_ready(lambda: port_open("127.0.0.1", self.port), timeout_s=10)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
