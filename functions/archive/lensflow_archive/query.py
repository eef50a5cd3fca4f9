"""SQL over the archive: DuckDB in process, reading the Parquet files in the object store.

The files are read through pyarrow's S3 filesystem (DuckDB's httpfs extension would have
to be downloaded at run time) as a pyarrow dataset with the ``date`` Hive partition, and
registered as the DuckDB view ``predictions``: DuckDB scans it with filter and column
pushdown. Only the files ``store.current`` names are read, so a compaction caught
half-way never shows a row twice.

Read-only by construction: one statement per call, and it must be a query (SELECT,
WITH ... SELECT); DuckDB's file system access is switched off and locked before any SQL
from outside runs, and the archive is reached only through the read-only dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from lensflow_archive.records import SCHEMA
from lensflow_archive.store import PREDICTIONS, current, parse_key
from lensflow_core.settings import Config

PARTITIONING = ds.partitioning(pa.schema([("date", pa.date32())]), flavor="hive")
VIEW_SCHEMA = SCHEMA.append(pa.field("date", pa.date32()))


class QueryError(ValueError):
    """The SQL is not a valid read-only query of the archive (one line, for the user)."""


def archive_filesystem(config: Config) -> pafs.S3FileSystem:
    options: dict[str, Any] = dict(
        access_key=config.s3_access_key,
        secret_key=config.s3_secret_key,
        region=config.s3_region,
        connect_timeout=10,
        request_timeout=30,
    )
    if config.s3_endpoint:
        url = urlsplit(config.s3_endpoint)
        options |= {"endpoint_override": url.netloc, "scheme": url.scheme or "https"}
    if config.s3_ca_bundle:
        options["tls_ca_file_path"] = config.s3_ca_bundle
    return pafs.S3FileSystem(**options)


def archive_dataset(config: Config, filesystem: pafs.FileSystem | None = None) -> ds.Dataset:
    """The archive's current Parquet files as one dataset (empty if there are none)."""
    filesystem = filesystem or archive_filesystem(config)
    base = f"{config.archive_bucket}/{PREDICTIONS}"
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    try:
        if filesystem.get_file_info(config.archive_bucket).type == pafs.FileType.NotFound:
            raise QueryError(
                f"archive bucket {config.archive_bucket!r} does not exist (LENSFLOW_ARCHIVE_BUCKET)"
            )
        infos = filesystem.get_file_info(selector)
    except OSError as exc:
        raise QueryError(f"cannot list the archive s3://{base}/: {_one_line(exc)}") from None
    named = [parse_key(i.path) for i in infos if i.is_file and i.path.endswith(".parquet")]
    paths = sorted(f.key for f in current(f for f in named if f is not None))
    if not paths:
        return ds.dataset(VIEW_SCHEMA.empty_table())
    return ds.dataset(
        paths,
        schema=VIEW_SCHEMA,
        format="parquet",
        filesystem=filesystem,
        partitioning=PARTITIONING,
        partition_base_dir=base,
    )


def connect(dataset: ds.Dataset) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the view ``predictions`` and no file system access."""
    con = duckdb.connect(":memory:")
    con.register("predictions", dataset)
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\nLINE")[0].split())


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> Result:
    """Run one read-only query; ``QueryError`` with a one-line reason otherwise."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(_one_line(exc)) from None
    if len(statements) != 1:
        raise QueryError(f"give exactly one query, not {len(statements)} statements")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryError(f"the archive is read-only: only queries run, not {kind.name}")
    try:
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description]
        return Result(columns, cursor.fetchall())
    except duckdb.Error as exc:
        raise QueryError(_one_line(exc)) from None


def query(config: Config, sql: str) -> Result:
    """``sql`` over the archive's ``predictions`` view."""
    return run_sql(connect(archive_dataset(config)), sql)


# Named questions: fixed SQL, so that a person (and the dashboard) needs none.
REPORTS: dict[str, tuple[str, str]] = {
    "per-class-per-day": (
        "predictions per top-1 class per day",
        "SELECT date, label, count(*) AS predictions FROM predictions "
        "GROUP BY date, label ORDER BY date, predictions DESC, label",
    ),
    "low-confidence-by-version": (
        "share of predictions under LENSFLOW_UNCERTAIN_TOP1 per model version",
        "SELECT model_version, count(*) AS predictions, "
        "count(*) FILTER (WHERE score < {threshold}) AS low_confidence, "
        "round(avg(CASE WHEN score < {threshold} THEN 1.0 ELSE 0.0 END), 4) AS low_share, "
        "min(time) AS first_seen, max(time) AS last_seen "
        "FROM predictions GROUP BY model_version ORDER BY first_seen",
    ),
    "per-drone-per-hour": (
        "predictions per drone (the key's folder) per hour",
        "SELECT regexp_replace(key, '/[^/]*$', '') AS drone, date_trunc('hour', time) AS hour, "
        "count(*) AS predictions FROM predictions GROUP BY drone, hour ORDER BY hour, drone",
    ),
    "latency-by-day": (
        "upload-to-prediction latency (ms) per day, where the event says when it was uploaded",
        "SELECT date, count(latency_ms) AS known, "
        "round(quantile_cont(latency_ms, 0.5), 1) AS p50_ms, "
        "round(quantile_cont(latency_ms, 0.95), 1) AS p95_ms FROM predictions "
        "GROUP BY date ORDER BY date",
    ),
    "class-per-hour": (
        "predictions per top-1 class per hour (the dashboard's history)",
        "SELECT date_trunc('hour', time) AS hour, label, count(*) AS predictions "
        "FROM predictions GROUP BY hour, label ORDER BY hour, label",
    ),
}


def report_sql(name: str, config: Config) -> str:
    if name not in REPORTS:
        raise QueryError(f"no report {name!r}; one of {', '.join(REPORTS)}")
    return REPORTS[name][1].format(threshold=float(config.uncertain_top1))


def report(config: Config, name: str, con: duckdb.DuckDBPyConnection | None = None) -> Result:
    sql = report_sql(name, config)
    return run_sql(con or connect(archive_dataset(config)), sql)
