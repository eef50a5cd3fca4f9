"""The Knative manifests as the tests see them: built overlays and a strict validator.

Shared by ``tests/test_knative*.py``. Everything comes from the repository itself:

- ``build(overlay)`` runs ``kubectl kustomize`` on ``knative/overlays/<overlay>`` (kubectl is a
  required tool: without it the checks fail, they are never skipped);
- ``validate(doc)`` checks one object against the CRDs vendored in ``knative/crds/`` (the
  releases ``knative/versions.yaml`` pins), made strict the way the API server's strict field
  validation is: an unknown field is an error, except under
  ``x-kubernetes-preserve-unknown-fields``. A kind or apiVersion no vendored CRD serves is an
  error too (``kafka.strimzi.io/v1beta2`` is gone since Strimzi 1.0). The Job inside a JobSink
  (which the CRD leaves open) is checked against a Job schema whose containers and volumes are
  the Knative Service CRD's own, strict. Core kinds (ConfigMap, Secret, ServiceAccount,
  NetworkPolicy) get smaller hand-written schemas: required fields and known keys.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KNATIVE = REPO / "knative"
CRDS = KNATIVE / "crds"
OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "lensflow-dev", "prod": "lensflow"}
VERSIONS: dict[str, str] = {
    k: str(v) for k, v in yaml.safe_load((KNATIVE / "versions.yaml").read_text()).items()
}

Doc = dict[str, Any]


# ---------------------------------------------------------------- building the overlays


def kubectl() -> str:
    found = shutil.which("kubectl") or (
        "/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None
    )
    if found is None:
        pytest.fail("kubectl is required to build knative/overlays (`kubectl kustomize`)")
    return found


def kustomize(path: Path) -> tuple[Doc, ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def build(overlay: str) -> tuple[Doc, ...]:
    return kustomize(KNATIVE / "overlays" / overlay)


def of_kind(docs: tuple[Doc, ...], kind: str, group: str | None = None) -> list[Doc]:
    return [
        d
        for d in docs
        if d["kind"] == kind and (group is None or d["apiVersion"].split("/")[0] == group)
    ]


def one(docs: tuple[Doc, ...], kind: str, name: str, group: str | None = None) -> Doc:
    found = [d for d in of_kind(docs, kind, group) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def config_map(docs: tuple[Doc, ...]) -> Doc:
    cms = [
        d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("lensflow-config")
    ]
    assert len(cms) == 1, "expected exactly one generated lensflow-config ConfigMap"
    return cms[0]


def pod_spec(doc: Doc) -> Doc:
    """The pod spec of a Knative Service or of the Job a JobSink starts."""
    if doc["kind"] == "JobSink":
        return doc["spec"]["job"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------- validators


def strict(schema: Any) -> Any:
    """Close every object schema that lists properties (unknown fields -> error)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


STRING_MAP: Doc = {"type": "object", "additionalProperties": {"type": "string"}}

# What lensflow's objects may carry in metadata (the API server accepts more, set by it).
METADATA: Doc = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}


def _root(schema: Doc, api_version: str, kind: str) -> Doc:
    """A CRD's schema with the fields every object has, pinned to this apiVersion and kind."""
    schema = copy.deepcopy(schema)
    schema["properties"] = {
        **schema.get("properties", {}),
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": METADATA,
    }
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], tuple[Doc, str]]:
    """(apiVersion, kind) -> (strict schema, the vendored file), for every served version."""
    found: dict[tuple[str, str], tuple[Doc, str]] = {}
    for path in sorted(CRDS.glob("*/*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            api_version = f"{group}/{version['name']}"
            schema = strict(version["schema"]["openAPIV3Schema"])
            found[(api_version, kind)] = (
                _root(schema, api_version, kind),
                str(path.relative_to(KNATIVE)),
            )
    assert found, f"no CRDs under {CRDS}"
    return found


def _service_pod_schema() -> Doc:
    """The Knative Service CRD's (strict) pod spec: its containers and volumes are reused."""
    schema, _ = crd_schemas()[("serving.knative.dev/v1", "Service")]
    return schema["properties"]["spec"]["properties"]["template"]["properties"]["spec"]


def _int(minimum: int) -> Doc:
    return {"type": "integer", "minimum": minimum}


@functools.cache
def job_schema() -> Doc:
    """batch/v1 Job, the fields a JobSink template may use; containers/volumes strict."""
    pod = _service_pod_schema()["properties"]
    pod_spec = {
        "type": "object",
        "required": ["containers", "restartPolicy"],
        "additionalProperties": False,
        "properties": {
            "restartPolicy": {"enum": ["Never", "OnFailure"]},
            "containers": pod["containers"],
            "volumes": pod["volumes"],
            "automountServiceAccountToken": {"type": "boolean"},
            "serviceAccountName": {"type": "string"},
            "securityContext": pod["securityContext"],
            "nodeSelector": STRING_MAP,
            "tolerations": pod["tolerations"],
            "priorityClassName": {"type": "string"},
        },
    }
    template_meta = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"labels": STRING_MAP, "annotations": STRING_MAP},
    }
    return {
        "type": "object",
        "required": ["spec"],
        "additionalProperties": False,
        "properties": {
            "metadata": template_meta,
            "spec": {
                "type": "object",
                "required": ["template"],
                "additionalProperties": False,
                "properties": {
                    "backoffLimit": _int(0),
                    "activeDeadlineSeconds": _int(1),
                    "ttlSecondsAfterFinished": _int(0),
                    "completions": _int(1),
                    "parallelism": _int(0),
                    "template": {
                        "type": "object",
                        "required": ["spec"],
                        "additionalProperties": False,
                        "properties": {"metadata": template_meta, "spec": pod_spec},
                    },
                },
            },
        },
    }


def _closed(required: list[str], **properties: Doc) -> Doc:
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
    }


_SELECTOR = _closed([], matchLabels=STRING_MAP, matchExpressions={"type": "array"})
_PEER = _closed(
    [],
    podSelector=_SELECTOR,
    namespaceSelector=_SELECTOR,
    ipBlock=_closed(["cidr"], cidr={"type": "string"}, **{"except": {"type": "array"}}),
)
_PORT = _closed(
    ["port"],
    protocol={"enum": ["TCP", "UDP", "SCTP"]},
    port={"type": ["integer", "string"]},
    endPort={"type": "integer"},
)

# Core kinds: a looser check (no vendored OpenAPI for them), still closed where lensflow
# writes them so a misspelt key fails.
CORE_SCHEMAS: dict[tuple[str, str], Doc] = {
    ("v1", "ConfigMap"): _closed(["data"], data=STRING_MAP),
    ("v1", "Secret"): _closed([], type={"type": "string"}, data=STRING_MAP, stringData=STRING_MAP),
    ("v1", "ServiceAccount"): _closed([], automountServiceAccountToken={"type": "boolean"}),
    ("networking.k8s.io/v1", "NetworkPolicy"): _closed(
        ["spec"],
        spec=_closed(
            ["podSelector", "policyTypes"],
            podSelector=_SELECTOR,
            policyTypes={"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            ingress={
                "type": "array",
                "items": _closed(
                    [], **{"from": {"type": "array", "items": _PEER}}, ports={"items": _PORT}
                ),
            },
            egress={
                "type": "array",
                "items": _closed([], to={"type": "array", "items": _PEER}, ports={"items": _PORT}),
            },
        ),
    ),
}


def _errors(schema: Doc, doc: Any, prefix: str = "") -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{prefix}{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def validate(doc: Doc) -> list[str]:
    """Every reason the API server (or the JobSink's Job) would reject this object."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if (api_version, kind) in CORE_SCHEMAS:
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        return _errors(METADATA, doc.get("metadata"), "metadata.") + _errors(
            CORE_SCHEMAS[(api_version, kind)], body
        )
    known = crd_schemas()
    if (api_version, kind) not in known:
        served = sorted(v for v, k in known if k == kind)
        return [f"{api_version} {kind}: no vendored CRD serves it (served: {served or 'none'})"]
    errors = _errors(known[(api_version, kind)][0], doc)
    if kind == "JobSink":
        errors += _errors(job_schema(), doc.get("spec", {}).get("job", {}), "spec.job.")
    return errors


# ------------------------------------------------------------ durations and quantities


_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def go_duration(text: str) -> float:
    """Seconds in a Go duration such as ``60s``, ``2m``, ``1h30m`` (Knative annotations)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {text!r}"
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def iso_duration(text: str) -> float:
    """Seconds in an ISO-8601 duration such as ``PT0.5S``, ``PT60S`` (Knative delivery)."""
    m = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", text)
    assert m and text != "PT", f"not an ISO-8601 duration: {text!r}"
    h, mins, s = m.groups()
    return int(h or 0) * 3600 + int(mins or 0) * 60 + float(s or 0)


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
