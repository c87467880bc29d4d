"""Query benchmark: the same agent-analytics queries on the same Parquet files, through
spanlake (`POST /v1/sql` of a running server) and through DuckDB (in process), in one run.

    .venv/bin/python benches/query_bench.py --url http://127.0.0.1:4318 --data DIR [--runs 5]

DIR is the spanlake data directory the server uses; DuckDB reads DIR/spans/**/*.parquet. The
server should be idle and have flushed (a graceful restart flushes everything). Prints one line
per query with the median time of each engine and the ratio spanlake/DuckDB, then the geometric
mean of the ratios, as JSON at the end.
"""

import argparse
import json
import math
import statistics
import time
import urllib.error
import urllib.request

import duckdb

TRACES_DUCKDB = """
CREATE VIEW traces AS
SELECT trace_id,
  arg_min(name, CASE WHEN parent_span_id IS NULL THEN 0 ELSE 1 END) AS root_span_name,
  min(start_time) AS start_time, max(end_time) AS end_time,
  count(*) AS span_count,
  count(*) FILTER (WHERE status_code = 'error') AS error_count,
  count(*) FILTER (WHERE span_type = 'llm') AS llm_calls,
  count(*) FILTER (WHERE span_type = 'tool') AS tool_calls,
  sum(total_tokens) AS total_tokens, sum(cost_usd) AS cost_usd,
  max(session_id) AS session_id, max(user_id) AS user_id
FROM spans GROUP BY trace_id
"""

# (name, spanlake SQL, DuckDB SQL or None when identical). {T0}/{T1} are an hour's bounds,
# {TRACE} a trace id that exists.
QUERIES = [
    ("tokens_cost_by_model_per_hour",
     "SELECT date_trunc('hour', start_time) AS h, model, sum(input_tokens), sum(output_tokens), sum(cost_usd) "
     "FROM spans WHERE span_type = 'llm' GROUP BY 1, 2 ORDER BY 1, 2", None),
    ("latency_percentiles_by_tool",
     "SELECT tool_name, approx_percentile_cont(duration_ms, 0.5), approx_percentile_cont(duration_ms, 0.95), "
     "approx_percentile_cont(duration_ms, 0.99) FROM spans WHERE span_type = 'tool' GROUP BY tool_name",
     "SELECT tool_name, approx_quantile(duration_ms, 0.5), approx_quantile(duration_ms, 0.95), "
     "approx_quantile(duration_ms, 0.99) FROM spans WHERE span_type = 'tool' GROUP BY tool_name"),
    ("error_rate_by_agent",
     "SELECT agent_name, avg(CASE WHEN status_code = 'error' THEN 1.0 ELSE 0.0 END) FROM spans "
     "WHERE agent_name IS NOT NULL GROUP BY agent_name", None),
    ("top_expensive_traces",
     "SELECT trace_id, sum(cost_usd) AS c FROM spans GROUP BY trace_id ORDER BY c DESC NULLS LAST LIMIT 20", None),
    ("sessions_most_tool_errors",
     "SELECT session_id, count(*) AS e FROM spans WHERE span_type = 'tool' AND status_code = 'error' "
     "GROUP BY session_id ORDER BY e DESC, session_id LIMIT 20", None),
    ("substring_in_prompts",
     "SELECT count(*) FROM spans WHERE input LIKE '%sources cost latency%'", None),
    ("content_search_one_hour",
     "SELECT trace_id, span_id FROM spans WHERE start_time >= '{T0}' AND start_time < '{T1}' "
     "AND (input LIKE '%sources cost latency%' OR output LIKE '%sources cost latency%') ORDER BY span_id LIMIT 100", None),
    ("trace_by_id",
     "SELECT span_id, name, duration_ms FROM spans WHERE trace_id = '{TRACE}' ORDER BY start_time", None),
    ("one_hour_window",
     "SELECT span_type, count(*), sum(total_tokens) FROM spans WHERE start_time >= '{T0}' AND start_time < '{T1}' "
     "GROUP BY span_type", None),
    ("spans_join_traces",
     "SELECT t.root_span_name, count(*), sum(s.duration_ms) FROM spans s JOIN traces t ON s.trace_id = t.trace_id "
     "WHERE s.span_type = 'llm' AND t.error_count > 0 GROUP BY 1", None),
    ("spans_by_service_and_type",
     "SELECT service_name, span_type, count(*) FROM spans GROUP BY 1, 2", None),
    ("llm_calls_per_trace_histogram",
     "SELECT llm_calls, count(*) FROM traces GROUP BY llm_calls ORDER BY llm_calls", None),
    ("cost_by_user",
     "SELECT user_id, sum(cost_usd) AS c FROM spans WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY c DESC LIMIT 20",
     None),
]


def spanlake(url, sql):
    req = urllib.request.Request(url + "/v1/sql", data=json.dumps({"sql": sql}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["rows"]


def timed(f, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:4318")
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", help="comma-separated query names to run (default: all)")
    a = ap.parse_args()

    con = duckdb.connect()
    # DuckDB reads the nanosecond UTC timestamps as TIMESTAMPTZ_NS, which its date functions do
    # not take; microseconds are enough for every query here.
    con.execute(
        "CREATE VIEW spans AS SELECT * REPLACE (start_time::TIMESTAMPTZ AS start_time, end_time::TIMESTAMPTZ AS end_time) "
        f"FROM read_parquet('{a.data}/spans/**/*.parquet', hive_partitioning=false)")
    con.execute(TRACES_DUCKDB)
    n = con.execute("SELECT count(*) FROM spans").fetchone()[0]
    n_spanlake = spanlake(a.url, "SELECT count(*) FROM spans")[0][0]
    assert n == n_spanlake, f"DuckDB sees {n} spans, spanlake {n_spanlake}"
    t0 = con.execute("SELECT strftime(date_trunc('hour', min(start_time)), '%Y-%m-%dT%H:%M:%SZ') FROM spans").fetchone()[0]
    t1 = con.execute(f"SELECT strftime(TIMESTAMPTZ '{t0}' + INTERVAL 1 HOUR, '%Y-%m-%dT%H:%M:%SZ')").fetchone()[0]
    trace = con.execute("SELECT trace_id FROM spans USING SAMPLE 1 ROWS").fetchone()[0]
    results = []
    only = set(a.only.split(",")) if a.only else None
    for name, ours, theirs in QUERIES:
        if only is not None and name not in only:
            continue
        fill = lambda q: q.replace("{T0}", t0).replace("{T1}", t1).replace("{TRACE}", trace)
        ours, theirs = fill(ours), fill(theirs or ours)
        try:
            s = timed(lambda: spanlake(a.url, ours), a.runs)
        except urllib.error.HTTPError as e:
            # A refused query (e.g. over its memory limit) is reported and the suite goes on.
            error = json.load(e).get("error", str(e))
            results.append({"query": name, "error": error})
            print(f"{name:32} spanlake refused: {error}", flush=True)
            continue
        d = timed(lambda: con.execute(theirs).to_arrow_table(), a.runs)
        results.append({"query": name, "spanlake_ms": s * 1e3, "duckdb_ms": d * 1e3, "ratio": s / d})
        print(f"{name:32} spanlake {s*1e3:9.1f} ms   duckdb {d*1e3:9.1f} ms   ratio {s/d:6.2f}", flush=True)
    answered = [r for r in results if "ratio" in r]
    geo = math.exp(sum(math.log(r["ratio"]) for r in answered) / len(answered))
    print(json.dumps({"spans": n, "geomean_ratio": geo, "max_ratio": max(r["ratio"] for r in answered),
                      "refused": [r["query"] for r in results if "error" in r],
                      "queries": results}, indent=1))


if __name__ == "__main__":
    main()
