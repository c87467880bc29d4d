"""Storage size of the same spans in spanlake's Parquet, DuckDB's own format and ClickHouse's
MergeTree (through chdb), in one run.

    .venv/bin/pip install -r benches/requirements.txt
    .venv/bin/python benches/storage_compare.py --data DIR

DIR is a stopped spanlake data directory (e.g. from `spanlake-bench ingest --keep-data DIR`).
DuckDB and ClickHouse load every row of DIR/spans/**/*.parquet; ClickHouse's table is ordered by
(trace_id, start_time) with zstd, as a Jaeger-on-ClickHouse schema would be. Prints bytes per
span for each and the ratio to spanlake, as JSON at the end.
"""

import argparse
import glob
import json
import os
import shutil
import tempfile

import duckdb


def dir_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    files = glob.glob(os.path.join(args.data, "spans", "**", "*.parquet"), recursive=True)
    pattern = os.path.join(args.data, "spans", "**", "*.parquet")
    spanlake_bytes = sum(os.path.getsize(f) for f in files)
    rows = duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchall()[0][0]
    out = {"spans": rows, "files": len(files), "spanlake_parquet_bytes": spanlake_bytes}

    tmp = tempfile.mkdtemp()
    try:
        db = os.path.join(tmp, "spans.duckdb")
        con = duckdb.connect(db)
        con.execute(f"CREATE TABLE spans AS SELECT * FROM read_parquet('{pattern}')")
        con.execute("CHECKPOINT")
        con.close()
        out["duckdb_bytes"] = os.path.getsize(db)

        try:
            from chdb import session as chs

            path = os.path.join(tmp, "ch")
            sess = chs.Session(path)
            sess.query("CREATE DATABASE IF NOT EXISTS b")
            sess.query(
                "CREATE TABLE b.spans ENGINE = MergeTree ORDER BY (trace_id, start_time) "
                "SETTINGS index_granularity = 8192 "
                f"AS SELECT * FROM file('{pattern}', Parquet) SETTINGS "
                "schema_inference_make_columns_nullable = 0"
            )
            sess.query("OPTIMIZE TABLE b.spans FINAL")
            r = sess.query(
                "SELECT sum(bytes_on_disk) FROM system.parts WHERE database = 'b' AND table = 'spans' AND active",
                "CSV",
            )
            out["clickhouse_bytes"] = int(str(r).strip().strip('"'))
            sess.close()
        except ImportError:
            out["clickhouse_bytes"] = None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'format':<22}{'bytes':>14}{'B/span':>10}{'vs spanlake':>13}")
    for name, key in [("spanlake Parquet", "spanlake_parquet_bytes"), ("DuckDB", "duckdb_bytes"),
                      ("ClickHouse MergeTree", "clickhouse_bytes")]:
        b = out.get(key)
        if b is None:
            print(f"{name:<22}{'n/a':>14}")
            continue
        print(f"{name:<22}{b:>14,}{b / rows:>10.1f}{b / spanlake_bytes:>13.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
