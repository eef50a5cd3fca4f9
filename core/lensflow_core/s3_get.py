"""The predict function's S3 requests: libcurl (pycurl), SigV4-signed as MinIO's signer signs.

The image GET, the model pointer's conditional GET, and the labelling queue's
conditional PUTs (a batch in parallel) and LIST. Kept-alive connections per thread. Measured per GET on this project's stack: about 0.25 ms of CPU,
against 0.75 ms for the MinIO client and 1.7 ms for boto3 (docs/benchmarks.md), which
was most of what a replica spent outside the model; the queue's PUT through boto3 cost
a replica a quarter of its throughput while a new model version filled the queue.

Its own module, imported only by the predict function: pycurl refuses to load in a
process where TensorFlow (which bundles an older libcurl) was imported first.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import io
import re
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import pycurl
from minio.credentials import Credentials
from minio.helpers import quote

from lensflow_core.s3 import ca_bundle
from lensflow_core.settings import Config

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ETAG = re.compile(rb'^etag:\s*"?([^"\r\n]*)"?\s*$', re.IGNORECASE | re.MULTILINE)
_KEY = re.compile(rb"<Key>([^<]*)</Key>")
_TOKEN = re.compile(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>")
ERROR_BYTES = 64 * 1024  # more than any S3 error document
PARALLEL = 16  # conditional PUTs in flight at once, per thread


class ObjectTooLarge(Exception):
    """The object is over the caller's limit (its length says so, or its bytes did)."""


class Unreachable(OSError):
    """No answer from the store: connection refused or reset, timeout, TLS refused."""


@dataclass(frozen=True)
class GetResult:
    status: int
    body: bytes  # the object, or the store's error document
    etag: str = ""

    @property
    def error_code(self) -> str:
        """The S3 error code of a non-2xx answer (``NoSuchKey``, ``AccessDenied``...)."""
        try:
            code = ElementTree.fromstring(self.body).findtext("Code")
        except ElementTree.ParseError:
            code = None
        return code or ("NoSuchKey" if self.status == 404 else f"HTTP {self.status}")


class ObjectGetter:
    """Signed, path-style requests to one S3 endpoint: ``get(bucket, key, limit)``, one
    object's bytes; ``put_if_absent`` and ``list_keys`` for the labelling queue.

    Safe from many threads: each thread keeps its own libcurl handles (one for reads, a
    multi handle and its pool for writes), and so its own kept-alive connections. One
    quick retry after a 5xx or a failed connection.
    """

    def __init__(self, config: Config, timeout_s: float = 5.0):
        endpoint = config.s3_endpoint or f"https://s3.{config.s3_region}.amazonaws.com"
        self.base = endpoint.rstrip("/")
        self.host = urlsplit(self.base).netloc
        self.base_path = urlsplit(self.base).path  # before the bucket, if any
        self.region = config.s3_region
        self.credentials = Credentials(config.s3_access_key, config.s3_secret_key)
        self.ca = ca_bundle(config)
        self.timeout_ms = int(timeout_s * 1000)
        self._local = threading.local()
        self._key: tuple[str, bytes] = ("", b"")  # (day, SigV4 signing key)

    def get(self, bucket: str, key: str, limit: int, if_none_match: str = "") -> GetResult:
        """The answer to GET ``bucket/key`` (304 with no body when ``if_none_match`` is
        its ETag). Raises ``ObjectTooLarge`` past ``limit`` bytes (never reading more than
        ``max(limit, ERROR_BYTES)``: a larger declared length is refused before the body)
        and ``Unreachable`` when the store does not answer."""
        extra = {"If-None-Match": if_none_match} if if_none_match else {}
        return self._retried(lambda: self._get(f"{bucket}/{quote(key)}", limit, extra))

    def put_if_absent(
        self, bucket: str, key: str, body: bytes, content_type: str = "application/json"
    ) -> GetResult:
        """PUT ``body`` with If-None-Match ``*``: 200 when written, 412 (or 409, a
        concurrent write) when ``key`` exists already. Raises ``Unreachable``."""
        result = self.put_many_if_absent(bucket, [(key, body)], content_type)[0]
        if isinstance(result, Unreachable):
            raise result
        return result

    def put_many_if_absent(
        self, bucket: str, items: Sequence[tuple[str, bytes]], content_type: str
    ) -> list[GetResult | Unreachable]:
        """``put_if_absent`` for each (key, body), up to ``PARALLEL`` at a time on as many
        kept-alive connections (libcurl's multi interface): a batch costs one wait for
        the store's answers, not one per request (a signed PUT's CPU 0.17 ms alone, 0.08
        in batches of 8: docs/benchmarks.md, "The labelling queue on the replica's
        core"). Answers in order; an item the store did not answer (after the one quick
        retry) is its ``Unreachable``."""
        results: list[GetResult | Unreachable] = []
        for start in range(0, len(items), PARALLEL):
            chunk = items[start : start + PARALLEL]
            answers = self._put_round(bucket, chunk, content_type)
            again = [i for i, a in enumerate(answers) if _retry(a)]
            if again:
                retried = self._put_round(bucket, [chunk[i] for i in again], content_type)
                for i, answer in zip(again, retried, strict=True):
                    answers[i] = answer
            results += answers
        return results

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        """Every key under ``prefix`` (ListObjectsV2, page by page). Raises
        ``Unreachable``, or ``OSError`` with the store's error code."""
        keys: list[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            encoded = "&".join(f"{k}={_quote_all(v)}" for k, v in sorted(query.items()))
            page = self._retried(lambda q=encoded: self._get(f"{bucket}?{q}", ERROR_BYTES * 64))
            if page.status != 200:
                raise OSError(f"LIST s3://{bucket}/{prefix}: {page.error_code}")
            keys += [html.unescape(k.decode()) for k in _KEY.findall(page.body)]
            token = _TOKEN.search(page.body)
            if token is None:
                return keys
            token = html.unescape(token.group(1).decode())

    def _retried(self, request) -> GetResult:
        try:
            result = request()
        except Unreachable as exc:
            result = exc
        return request() if _retry(result) else result  # the one quick retry

    def _get(self, path: str, limit: int, extra: dict[str, str] | None = None) -> GetResult:
        curl = self._curl("curl")
        curl.setopt(pycurl.HTTPHEADER, self._signed("GET", path, _EMPTY_SHA256, extra or {}))
        # libcurl refuses a declared length over this before reading the body, and stops
        # a body that grows past it; an error document is far below ERROR_BYTES.
        curl.setopt(pycurl.MAXFILESIZE_LARGE, max(limit, ERROR_BYTES))
        result = self._perform(curl, "curl", f"{self.base}/{path}", limit)
        if result.status == 200 and len(result.body) > limit:
            raise ObjectTooLarge(f"over the limit of {limit} bytes")
        return result

    def _put_round(
        self, bucket: str, items: Sequence[tuple[str, bytes]], content_type: str
    ) -> list[GetResult | Unreachable]:
        """One PUT per item, all in flight at once on this thread's multi handle."""
        multi, pool = self._multi()
        while len(pool) < len(items):
            pool.append(self._new_curl(put=True))
        started = []
        for curl, (key, body) in zip(pool, items, strict=False):  # the pool may be larger
            path = f"{bucket}/{quote(key)}"
            extra = {"Content-Type": content_type, "If-None-Match": "*"}
            digest = hashlib.sha256(body).hexdigest()
            # "Expect:" off: no 100-continue round trip for a small body
            curl.setopt(pycurl.HTTPHEADER, [*self._signed("PUT", path, digest, extra), "Expect:"])
            curl.setopt(pycurl.POSTFIELDS, body)
            started.append((curl, self._prepare(curl, f"{self.base}/{path}")))
            multi.add_handle(curl)
        failed = _run(multi)
        results: list[GetResult | Unreachable] = []
        for curl, buffers in started:
            multi.remove_handle(curl)
            if curl in failed:
                pool.remove(curl)  # a fresh handle (and connection) next time
                curl.close()
                results.append(Unreachable(f"object store unreachable: {failed[curl]}"))
            else:
                results.append(_result(curl, *buffers))
        return results

    def _multi(self) -> tuple[pycurl.CurlMulti, list[pycurl.Curl]]:
        """This thread's multi handle and its PUT handles (their connections kept)."""
        multi = getattr(self._local, "multi", None)
        if multi is None:
            multi = self._local.multi = (pycurl.CurlMulti(), [])
        return multi

    def _signed(self, method: str, path: str, digest: str, extra: dict[str, str]) -> list[str]:
        """The request's headers, signed (SigV4), as MinIO's ``sign_v4_s3`` signs them (a
        test holds them equal) with less work a request: the day's signing key is kept
        (four HMACs fewer) and the headers are already canonical. Cold, between two
        requests of a busy replica, this took a PUT's signature from ~0.12 to ~0.06 ms of
        CPU (docs/benchmarks.md, "Labelling queue")."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers = {"host": self.host, "x-amz-content-sha256": digest, "x-amz-date": stamp}
        headers.update((name.lower(), value.strip()) for name, value in extra.items())
        names = sorted(headers)
        signed = ";".join(names)
        path, _, query = path.partition("?")
        canonical = "\n".join(
            [method, f"{self.base_path}/{path}", _canonical_query(query)]
            + [f"{name}:{headers[name]}" for name in names]
            + ["", signed, digest]
        )
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{_sha256(canonical.encode())}"
        signature = hmac.digest(self._signing_key(stamp[:8]), to_sign.encode(), "sha256").hex()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.credentials.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return [f"{name}: {value}" for name, value in headers.items()]

    def _signing_key(self, day: str) -> bytes:
        """SigV4's key for ``day`` (YYYYMMDD), derived once a day."""
        cached = self._key
        if cached[0] != day:
            key = f"AWS4{self.credentials.secret_key}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._key = cached = (day, key)
        return cached[1]

    def _perform(self, curl: pycurl.Curl, kind: str, url: str, limit: int) -> GetResult:
        buffers = self._prepare(curl, url)
        try:
            curl.perform()
        except pycurl.error as exc:
            if exc.args[0] == pycurl.E_FILESIZE_EXCEEDED:
                raise ObjectTooLarge(f"over the limit of {limit} bytes") from None
            setattr(self._local, kind, None)  # a fresh handle (and connection) next time
            curl.close()
            raise Unreachable(f"object store unreachable: {exc.args[-1]}") from None
        return _result(curl, *buffers)

    @staticmethod
    def _prepare(curl: pycurl.Curl, url: str) -> tuple[io.BytesIO, io.BytesIO]:
        """Point ``curl`` at ``url``, its answer's body and head going to fresh buffers."""
        body, head = io.BytesIO(), io.BytesIO()
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.WRITEFUNCTION, body.write)  # C methods: no Python frame per chunk
        curl.setopt(pycurl.HEADERFUNCTION, head.write)
        return body, head

    def _curl(self, kind: str) -> pycurl.Curl:
        curl = getattr(self._local, kind, None)
        if curl is None:
            curl = self._new_curl()
            setattr(self._local, kind, curl)
        return curl

    def _new_curl(self, put: bool = False) -> pycurl.Curl:
        curl = pycurl.Curl()
        curl.setopt(pycurl.NOSIGNAL, 1)  # timeouts without signals: threads
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, self.timeout_ms)
        curl.setopt(pycurl.TIMEOUT_MS, 2 * self.timeout_ms)
        if put:
            curl.setopt(pycurl.CUSTOMREQUEST, "PUT")
        cafile, capath = (self.ca, None) if self.ca else system_ca_store()
        if cafile:
            curl.setopt(pycurl.CAINFO, cafile)
        if capath:
            curl.setopt(pycurl.CAPATH, capath)
        return curl


def _result(curl: pycurl.Curl, body: io.BytesIO, head: io.BytesIO) -> GetResult:
    status = curl.getinfo(pycurl.RESPONSE_CODE)
    etag = _ETAG.findall(head.getvalue())  # the last answer's (after a 100 Continue)
    return GetResult(status, body.getvalue(), etag[-1].decode("latin-1") if etag else "")


def _retry(answer: GetResult | Unreachable) -> bool:
    """Whether an answer earns the one quick retry: none, or a 5xx."""
    return isinstance(answer, Unreachable) or answer.status >= 500


def _run(multi: pycurl.CurlMulti) -> dict[pycurl.Curl, str]:
    """Drive ``multi``'s transfers to their ends; the failed ones, with libcurl's reason."""
    while True:
        code, active = multi.perform()
        if code == pycurl.E_CALL_MULTI_PERFORM:
            continue
        if not active:
            break
        if multi.select(1.0) == 0:
            # 0 at once when libcurl has no socket select() can watch (a descriptor past
            # FD_SETSIZE): a short sleep instead of a busy loop
            time.sleep(0.001)
    failed = {}
    while True:
        queued, _, errors = multi.info_read()
        failed.update((curl, message) for curl, _, message in errors)
        if not queued:
            return failed


def system_ca_store() -> tuple[str | None, str | None]:
    """(CA file, CA directory) of the system's store, found as Python's ``ssl`` finds it
    (``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` honoured), else certifi's bundle. The pycurl
    wheel's libcurl was built to look in /etc/pki/tls/certs/ca-bundle.crt (Red Hat's path),
    absent on Debian, so without this an https endpoint fails with no bundle configured."""
    paths = ssl.get_default_verify_paths()
    if paths.cafile or paths.capath:
        return paths.cafile, paths.capath
    import certifi

    return certifi.where(), None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_query(query: str) -> str:
    """SigV4's query string: ``name=value`` pairs (already escaped) sorted by name."""
    return "&".join("=".join(pair) for pair in sorted(p.split("=") for p in query.split("&")))


def _quote_all(value: str) -> str:
    """A query value as SigV4 canonicalises it (every reserved character escaped)."""
    return quote(value, safe="-_.~")
