"""Trace lookup by id alone (no time range): `GET /v1/traces/{id}` of a running spanlake
against DuckDB's `WHERE trace_id = ?` over the same Parquet files, in one run.

    .venv/bin/python benches/trace_lookup_bench.py --url http://127.0.0.1:4318 --data DIR [--n 200] [--phased]

Picks N random trace ids from the files (seeded), looks each up in both, and prints p50/p99
per engine and their ratio, as JSON at the end. By default each id is looked up in spanlake and
then in DuckDB, alternating, so each engine starts every lookup after the other's (DuckDB's
lookup scans the files on every core). `--phased` looks up every id in spanlake first, then
every id in DuckDB, as a server that only serves lookups would run.
"""

import argparse
import json
import os
import random
import statistics
import time
import urllib.request

import duckdb


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--phased", action="store_true")
    args = ap.parse_args()
    pattern = os.path.join(args.data, "spans", "**", "*.parquet")
    con = duckdb.connect()
    con.execute(f"CREATE VIEW spans AS SELECT * FROM read_parquet('{pattern}')")
    spans = con.execute("SELECT count(*) FROM spans").fetchall()[0][0]
    ids = [r[0] for r in con.execute(
        f"SELECT trace_id FROM (SELECT DISTINCT trace_id FROM spans) USING SAMPLE {args.n} ROWS (reservoir, {args.seed})"
    ).fetchall()]
    random.Random(args.seed).shuffle(ids)

    def lookup_spanlake(tid):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{args.url}/v1/traces/{tid}", timeout=60) as r:
            body = json.loads(r.read())
        return (time.perf_counter() - t0) * 1000, body["span_count"]

    def lookup_duckdb(tid):
        t0 = time.perf_counter()
        rows = con.execute("SELECT * FROM spans WHERE trace_id = ?", [tid]).to_arrow_table()
        return (time.perf_counter() - t0) * 1000, rows.num_rows

    if args.phased:
        sl_runs = [lookup_spanlake(tid) for tid in ids]
        dd_runs = [lookup_duckdb(tid) for tid in ids]
    else:
        sl_runs, dd_runs = [], []
        for tid in ids:
            sl_runs.append(lookup_spanlake(tid))
            dd_runs.append(lookup_duckdb(tid))
    for tid, (_, a), (_, b) in zip(ids, sl_runs, dd_runs):
        assert a == b, (tid, a, b)
    sl = [t for t, _ in sl_runs]
    dd = [t for t, _ in dd_runs]
    out = {
        "spans": spans, "lookups": len(ids), "phased": args.phased,
        "spanlake_p50_ms": statistics.median(sl), "spanlake_p99_ms": pct(sl, 99),
        "duckdb_p50_ms": statistics.median(dd), "duckdb_p99_ms": pct(dd, 99),
    }
    out["ratio_p50"] = out["spanlake_p50_ms"] / out["duckdb_p50_ms"]
    print(f"spanlake GET /v1/traces/ID  p50 {out['spanlake_p50_ms']:.1f} ms  p99 {out['spanlake_p99_ms']:.1f} ms")
    print(f"DuckDB WHERE trace_id = ?   p50 {out['duckdb_p50_ms']:.1f} ms  p99 {out['duckdb_p99_ms']:.1f} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
