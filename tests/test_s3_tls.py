"""S3 over https with a private CA: LENSFLOW_S3_CA_BUNDLE makes both clients trust it
(boto3, and libcurl's ObjectGetter on the predict hot path).

The endpoint is moto's server serving TLS with a certificate from a CA made for the test.
"""

from __future__ import annotations

import json

import pytest

from lensflow.cli import main as cli
from lensflow.servers import S3Server
from lensflow_core.s3 import s3_client
from lensflow_core.s3_get import ObjectGetter, Unreachable, system_ca_store
from lensflow_core.settings import Config
from tests.support.env import make_env
from tests.support.tls_certs import TestCA

S3_SECRET = "s3-secret-J3kW9pL2"


class TlsS3Server(S3Server):
    """moto's S3 server behind TLS with ``cert``/``key``."""

    def __init__(self, cert, key):
        self.cert, self.key = cert, key
        super().__init__()

    def server_command(self) -> list[str]:
        return [*super().server_command(), f"--certfile={self.cert}", f"--keyfile={self.key}"]

    @property
    def endpoint(self) -> str:
        return f"https://{self.host}:{self.port}"


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3-tls")
    ca, other = TestCA(folder, "minio"), TestCA(folder, "other")
    issued = ca.issue()
    with TlsS3Server(issued.cert, issued.key) as server:
        yield server, ca.pem, other.pem


def config_for(server, bundle) -> Config:
    extra = {"LENSFLOW_S3_CA_BUNDLE": str(bundle)} if bundle else {}
    return Config.from_env(make_env(server.endpoint, LENSFLOW_S3_SECRET_KEY=S3_SECRET, **extra))


def stored(server, ca, key: str, body: bytes) -> str:
    """Put ``body`` at ``key`` of a fresh image bucket (boto3 with the CA); the bucket."""
    config = config_for(server, ca)
    bucket = config.image_buckets[0]
    s3 = s3_client(config)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


def test_with_the_ca_bundle_both_clients_work(tls_s3):
    server, ca, _ = tls_s3
    bucket = stored(server, ca, "a.jpg", b"photo")
    got = ObjectGetter(config_for(server, ca)).get(bucket, "a.jpg", limit=100)
    assert (got.status, got.body) == (200, b"photo")


@pytest.mark.parametrize("bundle", ["none", "other CA"])
def test_without_the_right_bundle_the_certificate_is_refused(tls_s3, bundle):
    from botocore.exceptions import SSLError

    server, _, other = tls_s3
    config = config_for(server, other if bundle == "other CA" else None)
    with pytest.raises(SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        s3_client(config, retries=0).list_buckets()
    with pytest.raises(Unreachable, match="certificate"):
        ObjectGetter(config).get(config.image_buckets[0], "a.jpg", limit=100)


def test_without_a_bundle_the_get_trusts_the_system_store(tls_s3, monkeypatch):
    """LENSFLOW_S3_CA_BUNDLE empty means the system's store, as Python's ssl module finds
    it: here the private CA is the system store (SSL_CERT_FILE). The pycurl wheel's own
    default, /etc/pki/tls/certs/ca-bundle.crt, does not exist on Debian."""
    server, ca, other = tls_s3
    bucket = stored(server, ca, "system.jpg", b"trusted by the system")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(ca.parent / "no-such-dir"))
    assert system_ca_store() == (str(ca), None)
    no_bundle = config_for(server, None)
    assert not no_bundle.s3_ca_bundle
    got = ObjectGetter(no_bundle).get(bucket, "system.jpg", limit=100)
    assert (got.status, got.body) == (200, b"trusted by the system")
    monkeypatch.setenv("SSL_CERT_FILE", str(other))  # a system store without the CA
    with pytest.raises(Unreachable, match="certificate"):
        ObjectGetter(no_bundle).get(bucket, "system.jpg", limit=100)


def run_cli(monkeypatch, capfd, config: Config, argv: list[str]) -> tuple[int, str, str]:
    for name, value in config.env.items():
        if name != "LENSFLOW_S3_CA_BUNDLE":  # the test sets it
            monkeypatch.setenv(name, value)
    code = cli(argv)
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_names_the_bundle_setting_on_one_line(tls_s3, monkeypatch, capfd):
    server, ca, _ = tls_s3
    config = config_for(server, ca)
    s3_client(config).create_bucket(Bucket=config.model_bucket)
    monkeypatch.setenv("LENSFLOW_S3_CA_BUNDLE", "")
    code, out, err = run_cli(monkeypatch, capfd, config, ["models", "list"])
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "LENSFLOW_S3_CA_BUNDLE" in err and "CERTIFICATE_VERIFY_FAILED" in err
    assert S3_SECRET not in out + err
    monkeypatch.setenv("LENSFLOW_S3_CA_BUNDLE", str(ca))
    code, out, err = run_cli(monkeypatch, capfd, config, ["models", "list", "--json"])
    assert code == 0, err
    assert json.loads(out) == []


def test_a_missing_bundle_file_is_named_with_its_path(tls_s3, monkeypatch, capfd):
    server, _, _ = tls_s3
    config = config_for(server, "/etc/lensflow/s3-ca/ca.crt")
    monkeypatch.setenv("LENSFLOW_S3_CA_BUNDLE", "/etc/lensflow/s3-ca/ca.crt")
    with pytest.raises(FileNotFoundError, match="LENSFLOW_S3_CA_BUNDLE: no readable file at /etc"):
        ObjectGetter(config)
    code, out, err = run_cli(monkeypatch, capfd, config, ["models", "list", "--json"])
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "LENSFLOW_S3_CA_BUNDLE: no readable file at /etc/lensflow/s3-ca/ca.crt" in out
    assert S3_SECRET not in out + err
