#!/usr/bin/python3
"""envelope benchmarks (`make bench`): envelope against baselines measured in the same run.

test/bench/run starts a fresh throwaway dev environment (PostgreSQL with
envelope preloaded, and the test KMS), runs this script against it and tears
the environment down.  To run the script by hand, export the lines that
`test/devenv up` prints first (it needs PGHOST... and ENVELOPE_KMS_ADMIN).

    make bench                                   # BENCH_ROWS=1000000 BENCH_SECONDS=10
    BENCH_ROWS=20000 BENCH_SECONDS=3 make bench  # a quick run

Method.  Every case is one warm-up round followed by ROUNDS (3) measured
rounds.  In each round the baselines run first, then envelope, and the ratio
envelope / baseline is taken within that round; the reported ratio is the
median of the per-round ratios, reported times are the medians of each side.
Tables are regular (logged) tables, VACUUM ANALYZEd after loading; envelope.*
settings are left at their defaults; no parallelism unless the case says so.
Payload: BENCH_ROWS rows of 100 bytes, convert_to(rpad('customer-' || g || '-', 100, 'x'), 'UTF8').

Cases (keys of test/bench/results.json):
  enc_insert_vs_{plain,pgcrypto,pgp}  INSERT ... SELECT of BENCH_ROWS rows into a
      table emptied by TRUNCATE (and CHECKPOINT, untimed) before each statement:
      enc() vs the plain value, pgcrypto encrypt_iv (aes-cbc, 32-byte key,
      16-byte IV), pgcrypto pgp_sym_encrypt_bytea (options 's2k-mode=1').
  dec_scan_vs_{plain,pgcrypto,pgp}  SELECT sum(length(dec_bytea(v))) over the
      whole table vs the same aggregate over the plain column, decrypt_iv and
      pgp_sym_decrypt_bytea.
      pgp_sym_* is probed on 10,000 rows first; if a round would take more
      than PGP_BUDGET seconds it runs on a subset (pgp_rows) and its time is
      scaled to BENCH_ROWS.
  dec4k_scan_vs_detoast  min(100,000, BENCH_ROWS) rows of 4 KiB incompressible
      random bytes (pgcrypto gen_random_bytes), stored out of line
      uncompressed: sum(get_byte(dec_bytea(v), 4095)) vs sum(get_byte(v, 4095))
      (get_byte detoasts the whole value), so the difference is decryption.
  point_select_tps_vs_plain  pgbench -M prepared -c 4 -j 4, BENCH_SECONDS per
      run, a primary-key SELECT of dec_bytea(v) vs of the plain column of the
      same rows (one table bench_pk with both columns, so both read the same
      pages), the two alternating.
  parallel_dec_speedup  the full dec scan's time with
      max_parallel_workers_per_gather = 0 over its time with 2 workers
      (EXPLAIN ANALYZE checks that 2 workers were launched).  In the same rounds, for
      reference (no target): parallel_scan_only_speedup, the same table
      scanned without decrypting (SELECT count(v)), serial over 2 workers.
  kms_calls_enc  KMS calls of one enc INSERT of BENCH_ROWS rows (the most any
      round made), counted by the test KMS (admin /stats) and by
      envelope.cache_stats(); limit ceil(rows / dek_max_uses) + 2.
  kms_calls_dec_cold  KMS calls of a full dec scan (no parallelism) right after
      envelope.cache_flush(); limit distinct_deks + 2, where distinct_deks is
      the number of distinct wrapped data keys in the table.

Prints a table with PASS/MISS per target (informational: the exit status is
nonzero only if something fails) and writes test/bench/results.json.
"""
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import psycopg2

ROWS = int(os.environ.get("BENCH_ROWS", "1000000"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
ROUNDS = 3
ROWS_4K = min(100_000, ROWS)
PROBE_ROWS = min(10_000, ROWS)
PGP_BUDGET = 30.0          # seconds one pgp statement may take per round before a subset is used
CLIENTS = 4
ADMIN = os.environ["ENVELOPE_KMS_ADMIN"]
PGBENCH = os.path.join(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
                       or "/usr/lib/postgresql/15/bin", "pgbench")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")

PAYLOAD = "convert_to(rpad('customer-' || g || '-', 100, 'x'), 'UTF8')"
KEY = "'\\x" + "00" * 32 + "'::bytea"
IV = "'\\x" + "00" * 16 + "'::bytea"
PGP_PASSWORD = "'bench password'"
PGP_OPTIONS = "'s2k-mode=1'"
RANDOM_4K = " || ".join(["gen_random_bytes(1024)"] * 4)   # gen_random_bytes gives at most 1024 bytes
SETTINGS = ("dek_max_uses", "dek_max_age", "cache_ttl", "cache_size", "kms_verify", "audit")
ENVELOPE_KMS_COUNTERS = ("kms_key_info", "kms_generate", "kms_wrap", "kms_unwrap",
                         "kms_rewrap", "kms_rotate", "kms_configure")
SERIAL = ["SET max_parallel_workers_per_gather = 0"]
# Planner costs set so that even a small table gets a 2-worker plan; they change the plan, not the work.
PARALLEL = ["SET max_parallel_workers_per_gather = 2", "SET parallel_setup_cost = 0",
            "SET parallel_tuple_cost = 0", "SET min_parallel_table_scan_size = 0"]

TARGETS = (
    ("dec_scan_vs_pgcrypto", "<=", 0.8),
    ("enc_insert_vs_pgcrypto", "<=", 1.0),
    ("dec4k_scan_vs_detoast", "<=", 1.5),
    ("point_select_tps_vs_plain", ">=", 0.9),
    ("parallel_dec_speedup", ">=", 1.7),
    ("kms_calls_enc", "<=", "kms_calls_enc_limit"),
    ("kms_calls_dec_cold", "<=", "kms_calls_dec_cold_limit"),
)


def progress(message):
    """One progress line on stderr (stdout carries the header and the table)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def kms_stats():
    """The test KMS's request counters (admin /stats)."""
    with urllib.request.urlopen(ADMIN + "/stats", timeout=10) as r:
        return json.load(r)


def envelope_stats(cur):
    """Server-wide counters from envelope.cache_stats()."""
    cur.execute("SELECT * FROM envelope.cache_stats()")
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


class Counted:
    """KMS calls made while the block runs, as seen by the test KMS and by envelope."""

    def __init__(self, cur):
        """Remember the cursor used to read envelope's counters."""
        self.cur = cur

    def __enter__(self):
        """Snapshot both sets of counters."""
        self.k0, self.e0 = kms_stats(), envelope_stats(self.cur)
        return self

    def __exit__(self, *exc):
        """Take the differences."""
        if exc[0] is not None:
            return
        k1, e1 = kms_stats(), envelope_stats(self.cur)
        self.kms = k1["total"] - self.k0["total"]
        self.kms_by_kind = {k: v - self.k0["requests"].get(k, 0) for k, v in k1["requests"].items()
                            if v - self.k0["requests"].get(k, 0)}
        self.envelope_by_kind = {k: e1[k] - self.e0[k] for k in ENVELOPE_KMS_COUNTERS if e1[k] - self.e0[k]}
        self.envelope = sum(self.envelope_by_kind.values())
        self.cache = {k: e1[k] - self.e0[k] for k in ("hits", "misses", "kms_retries", "kms_errors")}

    def as_json(self):
        """The counts as a JSON-ready dict."""
        return {"kms": self.kms, "envelope": self.envelope, "kms_by_kind": self.kms_by_kind,
                "envelope_by_kind": self.envelope_by_kind, "cache": self.cache}

    def summary(self):
        """One-line description of the calls."""
        kinds = ", ".join(f"{k} {v}" for k, v in self.kms_by_kind.items()) or "none"
        return f"{self.kms} seen by the KMS ({kinds}), {self.envelope} counted by envelope"


def timed(cur, sql):
    """Run one statement; (seconds, first column of its first row or None)."""
    t0 = time.perf_counter()
    cur.execute(sql)
    seconds = time.perf_counter() - t0
    row = cur.fetchone() if cur.description else None
    return seconds, (row[0] if row else None)


def execute(cur, statements):
    """Run a list of statements, one at a time."""
    for sql in statements:
        cur.execute(sql)


def one(cur, sql):
    """The single value a query returns."""
    cur.execute(sql)
    return cur.fetchone()[0]


def interleaved(cur, label, sides, count=()):
    """Warm-up round plus ROUNDS rounds, each running every side in order.

    sides is a list of (name, statement, untimed setup statements, expected result
    or None).  Returns {name: [seconds per measured round]} and, for the sides
    named in count, {name: [Counted per round, warm-up included]}.
    """
    times = {name: [] for name, *_ in sides}
    counts = {name: [] for name in count}
    for rnd in range(ROUNDS + 1):
        progress(f"{label}: {'warm-up round' if rnd == 0 else f'round {rnd}/{ROUNDS}'}")
        for name, sql, setup, expected in sides:
            execute(cur, setup)
            if name in counts:
                with Counted(cur) as c:
                    seconds, result = timed(cur, sql)
                counts[name].append(c)
            else:
                seconds, result = timed(cur, sql)
            if expected is not None and result != expected:
                raise RuntimeError(f"{label}, {name}: got {result!r}, expected {expected!r}")
            if rnd:
                times[name].append(seconds)
    return times, counts


def compare(envelope, baseline, scale=1.0, higher_is_better=False):
    """Per-round ratios envelope / baseline (baseline times scaled); medians of the ratios and of both sides."""
    ratios = [e / (b * scale) for e, b in zip(envelope, baseline)]
    key = "tps" if higher_is_better else "s"
    return {"ratio": statistics.median(ratios), f"envelope_{key}": statistics.median(envelope),
            f"baseline_{key}": statistics.median(baseline) * scale, "ratios": ratios}


def pgbench_tps(script, seconds):
    """TPS of one pgbench run of a custom script (-M prepared, CLIENTS clients and threads)."""
    tmpdir = tempfile.mkdtemp(prefix="envelope-bench-")
    try:
        os.chmod(tmpdir, 0o755)       # readable by whoever runs pgbench
        path = os.path.join(tmpdir, "script.sql")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o644)
        out = subprocess.run([PGBENCH, "-n", "-M", "prepared", "-c", str(CLIENTS), "-j", str(CLIENTS),
                              "-T", str(seconds), "-f", path], capture_output=True, text=True)
    finally:
        shutil.rmtree(tmpdir)
    if out.returncode != 0:
        raise RuntimeError("pgbench failed:\n" + out.stdout + out.stderr)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if failed and int(failed.group(1)):
        raise RuntimeError("pgbench had failed transactions:\n" + out.stdout)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    if not m:
        raise RuntimeError("no tps in pgbench's output:\n" + out.stdout)
    return float(m.group(1))


def workers(cur, sql):
    """Run sql under EXPLAIN ANALYZE; (workers planned, workers launched) of its Gather node."""
    cur.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql)
    plan = "\n".join(r[0] for r in cur.fetchall())
    planned = re.search(r"Workers Planned: (\d+)", plan)
    launched = re.search(r"Workers Launched: (\d+)", plan)
    return (int(planned.group(1)) if planned else 0), (int(launched.group(1)) if launched else 0)


def machine(cur):
    """CPU model, core count, server version and envelope's settings."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    settings = {}
    for name in SETTINGS:
        cur.execute(f"SHOW envelope.{name}")
        settings[name] = cur.fetchone()[0]
    so = os.path.join(subprocess.run(["pg_config", "--pkglibdir"], capture_output=True, text=True).stdout.strip(),
                      "envelope.so")
    return {"cpu_model": model, "cores": cores, "postgres_version": one(cur, "SELECT version()"),
            "settings": settings,
            "envelope_version": one(cur, "SELECT extversion FROM pg_extension WHERE extname = 'envelope'"),
            "envelope_so_mtime": (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(so)))
                                  if os.path.exists(so) else None)}


def probe_pgp(cur):
    """Per-row cost of pgp_sym_* on PROBE_ROWS rows; the number of rows its rounds will use."""
    cur.execute("TRUNCATE bench_pgp")
    enc, _ = timed(cur, f"INSERT INTO bench_pgp SELECT g, pgp_sym_encrypt_bytea({PAYLOAD}, {PGP_PASSWORD}, "
                        f"{PGP_OPTIONS}) FROM generate_series(1, {PROBE_ROWS}) g")
    dec, _ = timed(cur, f"SELECT sum(length(pgp_sym_decrypt_bytea(v, {PGP_PASSWORD}, {PGP_OPTIONS}))) FROM bench_pgp")
    per_row = max(enc, dec) / PROBE_ROWS
    rows = ROWS
    if per_row * ROWS > PGP_BUDGET:
        rows = max(PROBE_ROWS, int(PGP_BUDGET / per_row) // 10_000 * 10_000)
    return {"pgp_enc_us_per_row": enc / PROBE_ROWS * 1e6, "pgp_dec_us_per_row": dec / PROBE_ROWS * 1e6}, rows


def main():
    """Load the data, run every case, print the table and write results.json."""
    conn = psycopg2.connect("")
    conn.autocommit = True
    cur = conn.cursor()
    res = {"rows": ROWS}
    res.update(machine(cur))
    version = res["postgres_version"].split(", compiled by")[0]
    print(f"envelope bench: {ROWS} rows; settings " + ", ".join(f"{k}={v}" for k, v in res["settings"].items())
          + f"; CPU {res['cpu_model']} ({res['cores']} cores); {version}", flush=True)
    print(f"envelope {res['envelope_version']}, envelope.so of {res['envelope_so_mtime']}; "
          f"{ROUNDS} rounds after a warm-up, medians", flush=True)
    res.update({"rows_4k": ROWS_4K, "rounds": ROUNDS, "bench_seconds": SECONDS, "times": {}})
    times = res["times"]
    cur.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    execute(cur, SERIAL)
    for table, typ in (("bench_plain", "bytea"), ("bench_pgc", "bytea"), ("bench_pgp", "bytea"),
                       ("bench_enc", "enc_bytea")):
        cur.execute(f"CREATE TABLE {table} (id int NOT NULL, v {typ})")

    # pgp_sym_* can be slow: probe it, and use a subset of rows if a full round would take too long.
    probe, pgp_rows = probe_pgp(cur)
    res.update(probe)
    res["pgp_rows"] = pgp_rows
    pgp_scale = ROWS / pgp_rows
    progress(f"pgp_sym_* probe: {probe['pgp_enc_us_per_row']:.1f} us/row to encrypt, "
             f"{probe['pgp_dec_us_per_row']:.1f} us/row to decrypt; pgp rounds use {pgp_rows} rows")

    # 1. enc INSERT: the tables hold the last round's rows afterwards, and the scans read them.
    def insert(table, expr, rows):
        """INSERT ... SELECT of rows payload rows through expr."""
        return f"INSERT INTO {table} SELECT g, {expr} FROM generate_series(1, {rows}) g"

    def fresh(table):
        """Untimed setup of an insert: an empty table and no checkpoint pending."""
        return [f"TRUNCATE {table}", "CHECKPOINT"]

    ins, ins_counts = interleaved(cur, "enc INSERT", [
        ("plain", insert("bench_plain", PAYLOAD, ROWS), fresh("bench_plain"), None),
        ("pgcrypto", insert("bench_pgc", f"encrypt_iv({PAYLOAD}, {KEY}, {IV}, 'aes-cbc')", ROWS),
         fresh("bench_pgc"), None),
        ("pgp", insert("bench_pgp", f"pgp_sym_encrypt_bytea({PAYLOAD}, {PGP_PASSWORD}, {PGP_OPTIONS})", pgp_rows),
         fresh("bench_pgp"), None),
        ("envelope", insert("bench_enc", f"enc({PAYLOAD})", ROWS), fresh("bench_enc"), None),
    ], count=("envelope",))
    times["enc_insert_vs_plain"] = compare(ins["envelope"], ins["plain"])
    times["enc_insert_vs_pgcrypto"] = compare(ins["envelope"], ins["pgcrypto"])
    times["enc_insert_vs_pgp"] = compare(ins["envelope"], ins["pgp"], pgp_scale)
    worst = max(ins_counts["envelope"], key=lambda c: (c.kms, c.envelope))
    res["kms_calls_enc"] = worst.kms
    res["kms_calls_enc_envelope"] = worst.envelope
    res["kms_calls_enc_rounds"] = [c.as_json() for c in ins_counts["envelope"]]
    res["kms_calls_enc_limit"] = math.ceil(ROWS / int(res["settings"]["dek_max_uses"])) + 2

    progress("primary keys, VACUUM ANALYZE")
    cur.execute("ALTER TABLE bench_plain ADD PRIMARY KEY (id)")
    cur.execute("ALTER TABLE bench_enc ADD PRIMARY KEY (id)")
    for table in ("bench_plain", "bench_pgc", "bench_pgp", "bench_enc"):
        cur.execute(f"VACUUM ANALYZE {table}")
    res["distinct_deks"] = one(cur, "SELECT count(DISTINCT envelope.metadata(v)->>'wrapped_dek_b64') FROM bench_enc")
    res["kms_calls_dec_cold_limit"] = res["distinct_deks"] + 2

    # 2. full dec scans, warm cache, no parallelism.
    dec_scan = "SELECT sum(length(dec_bytea(v))) FROM bench_enc"
    scans, _ = interleaved(cur, "dec scan", [
        ("plain", "SELECT sum(length(v)) FROM bench_plain", [], 100 * ROWS),
        ("pgcrypto", f"SELECT sum(length(decrypt_iv(v, {KEY}, {IV}, 'aes-cbc'))) FROM bench_pgc", [], 100 * ROWS),
        ("pgp", f"SELECT sum(length(pgp_sym_decrypt_bytea(v, {PGP_PASSWORD}, {PGP_OPTIONS}))) FROM bench_pgp",
         [], 100 * pgp_rows),
        ("envelope", dec_scan, [], 100 * ROWS),
    ])
    times["dec_scan_vs_plain"] = compare(scans["envelope"], scans["plain"])
    times["dec_scan_vs_pgcrypto"] = compare(scans["envelope"], scans["pgcrypto"])
    times["dec_scan_vs_pgp"] = compare(scans["envelope"], scans["pgp"], pgp_scale)

    # 3. KMS calls of a cold dec scan: serial (the target), and with 2 workers (for information).
    progress("cold dec scans")
    cur.execute("SELECT envelope.cache_flush()")
    with Counted(cur) as cold:
        timed(cur, dec_scan)
    res["kms_calls_dec_cold"] = cold.kms
    res["kms_calls_dec_cold_envelope"] = cold.envelope
    res["kms_calls_dec_cold_detail"] = cold.as_json()
    execute(cur, PARALLEL)
    cur.execute("SELECT envelope.cache_flush()")
    with Counted(cur) as cold_par:
        _, cold_launched = workers(cur, dec_scan)
    res["kms_calls_dec_cold_parallel"] = cold_par.kms
    res["kms_calls_dec_cold_parallel_detail"] = dict(cold_par.as_json(), workers_launched=cold_launched)

    # 4. the same scan with 2 parallel workers against none; for reference, in the
    #    same rounds, the same table scanned without decrypting (count(v) reads
    #    every value): what PostgreSQL's own part of the scan gains from workers.
    scan_only = "SELECT count(v) FROM bench_enc"
    par, _ = interleaved(cur, "parallel dec scan", [
        ("serial", dec_scan, SERIAL, 100 * ROWS),
        ("parallel", dec_scan, PARALLEL, 100 * ROWS),
        ("scan_serial", scan_only, SERIAL, ROWS),
        ("scan_parallel", scan_only, PARALLEL, ROWS),
    ])
    execute(cur, PARALLEL)
    planned, launched = workers(cur, dec_scan)
    execute(cur, ["RESET parallel_setup_cost", "RESET parallel_tuple_cost", "RESET min_parallel_table_scan_size"]
            + SERIAL)
    ratios = [s / p for s, p in zip(par["serial"], par["parallel"])]
    res["parallel_dec_speedup"] = statistics.median(ratios)
    res["parallel_workers_planned"] = planned
    res["parallel_workers_launched"] = launched
    times["parallel_dec_speedup"] = {"ratio": res["parallel_dec_speedup"], "serial_s": statistics.median(par["serial"]),
                                     "parallel_s": statistics.median(par["parallel"]), "ratios": ratios}
    scan_ratios = [s / p for s, p in zip(par["scan_serial"], par["scan_parallel"])]
    res["parallel_scan_only_speedup"] = statistics.median(scan_ratios)
    res["parallel_scan_only"] = {"ratio": res["parallel_scan_only_speedup"], "serial_s": statistics.median(par["scan_serial"]),
                                 "parallel_s": statistics.median(par["scan_parallel"]), "ratios": scan_ratios,
                                 "statement": scan_only}

    # 5. 4 KiB values: decrypt against detoast.
    progress(f"loading {ROWS_4K} rows of 4 KiB random bytes")
    cur.execute("CREATE TABLE bench4k_plain (id int NOT NULL, v bytea)")
    cur.execute("ALTER TABLE bench4k_plain ALTER COLUMN v SET STORAGE EXTERNAL")   # as enc_bytea: no compression
    cur.execute(f"INSERT INTO bench4k_plain SELECT g, {RANDOM_4K} FROM generate_series(1, {ROWS_4K}) g")
    cur.execute("CREATE TABLE bench4k_enc (id int NOT NULL, v enc_bytea)")
    cur.execute("INSERT INTO bench4k_enc SELECT id, enc(v) FROM bench4k_plain")
    cur.execute("VACUUM ANALYZE bench4k_plain")
    cur.execute("VACUUM ANALYZE bench4k_enc")
    inline = one(cur, "SELECT count(*) FROM bench4k_plain WHERE pg_column_compression(v) IS NOT NULL "
                      "OR pg_column_size(v) <> 4096")
    if inline:
        raise RuntimeError(f"{inline} of the 4 KiB plain values are compressed or not 4096 bytes")
    check = one(cur, "SELECT sum(get_byte(v, 4095)) FROM bench4k_plain")
    d4k, _ = interleaved(cur, "4 KiB dec scan", [
        ("detoast", "SELECT sum(get_byte(v, 4095)) FROM bench4k_plain", [], check),
        ("envelope", "SELECT sum(get_byte(dec_bytea(v), 4095)) FROM bench4k_enc", [], check),
    ])
    times["dec4k_scan_vs_detoast"] = compare(d4k["envelope"], d4k["detoast"])
    res["dec4k_values"] = ("4096 incompressible random bytes (pgcrypto gen_random_bytes), "
                           "plain column STORAGE EXTERNAL (out of line, uncompressed, as enc_bytea)")

    # 6. pgbench point selects, plain and envelope alternating, on one table
    #    holding both columns of each row.
    progress("point select table")
    cur.execute("DROP TABLE IF EXISTS bench_pk")
    cur.execute("CREATE TABLE bench_pk AS SELECT p.id, p.v AS plain, e.v AS v "
                "FROM bench_plain p JOIN bench_enc e USING (id)")
    cur.execute("ALTER TABLE bench_pk ADD PRIMARY KEY (id)")
    cur.execute("VACUUM ANALYZE bench_pk")
    plain_sql = f"\\set id random(1, {ROWS})\nSELECT plain FROM bench_pk WHERE id = :id;\n"
    enc_sql = f"\\set id random(1, {ROWS})\nSELECT dec_bytea(v) FROM bench_pk WHERE id = :id;\n"
    warm = min(SECONDS, 5)
    progress(f"pgbench point selects: warm-up ({warm} s each)")
    pgbench_tps(plain_sql, warm)
    pgbench_tps(enc_sql, warm)
    tps = {"plain": [], "envelope": []}
    for rnd in range(1, ROUNDS + 1):
        progress(f"pgbench point selects: round {rnd}/{ROUNDS} ({SECONDS} s each)")
        tps["plain"].append(pgbench_tps(plain_sql, SECONDS))
        tps["envelope"].append(pgbench_tps(enc_sql, SECONDS))
    times["point_select_tps_vs_plain"] = compare(tps["envelope"], tps["plain"], higher_is_better=True)
    times["point_select_tps_vs_plain"]["clients"] = CLIENTS

    for name, t in times.items():
        res[name] = t["ratio"]
    times["enc_insert_vs_pgp"]["baseline_rows"] = times["dec_scan_vs_pgp"]["baseline_rows"] = pgp_rows
    res["targets"] = {}
    for name, op, target in TARGETS:
        limit = res[target] if isinstance(target, str) else target
        value = res[name]
        met = value <= limit if op == "<=" else value >= limit
        if name == "parallel_dec_speedup":
            met = met and launched == 2
        res["targets"][name] = {"value": value, "op": op, "target": limit, "met": met}

    report(res)
    with open(RESULTS, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(RESULTS)}")


def report(res):
    """Print the table of results."""
    t = res["times"]
    targets = res["targets"]

    def row(label, envelope, baseline, value, name=None):
        """One line of the table, with the target and PASS/MISS when name has one."""
        goal = status = ""
        if name in targets:
            tg = targets[name]
            goal = f"{tg['op']} {tg['target']:g}"
            status = "PASS" if tg["met"] else "MISS"
        print(f"{label:<42} {envelope:>13} {baseline:>13} {value:>9}  {goal:<8} {status}")

    def secs(s):
        """Seconds, three decimals."""
        return f"{s:.3f} s"

    pgp_note = "" if res["pgp_rows"] == res["rows"] else " *"
    print()
    print(f"{'case':<42} {'envelope':>13} {'baseline':>13} {'ratio':>9}  {'target':<8} result")
    for kind, what in (("enc_insert", "enc INSERT"), ("dec_scan", "dec scan")):
        for base, label in (("plain", "plain"), ("pgcrypto", "pgcrypto AES-CBC"), ("pgp", "pgp_sym s2k-mode=1")):
            name = f"{kind}_vs_{base}"
            note = pgp_note if base == "pgp" else ""
            row(f"{what} vs {label}{note}", secs(t[name]["envelope_s"]), secs(t[name]["baseline_s"]),
                f"{t[name]['ratio']:.2f}x", name)
    name = "dec4k_scan_vs_detoast"
    row(f"4 KiB dec scan vs detoast ({res['rows_4k']} rows)", secs(t[name]["envelope_s"]),
        secs(t[name]["baseline_s"]), f"{t[name]['ratio']:.2f}x", name)
    name = "point_select_tps_vs_plain"
    row(f"point select TPS vs plain ({CLIENTS} clients)", f"{t[name]['envelope_tps']:.0f} tps",
        f"{t[name]['baseline_tps']:.0f} tps", f"{t[name]['ratio']:.2f}x", name)
    name = "parallel_dec_speedup"
    row(f"dec scan, 2 workers ({res['parallel_workers_launched']} launched) vs none",
        secs(t[name]["parallel_s"]), secs(t[name]["serial_s"]), f"{t[name]['ratio']:.2f}x", name)
    ref = res["parallel_scan_only"]
    row("  same table, no decryption (reference)", secs(ref["parallel_s"]), secs(ref["serial_s"]),
        f"{ref['ratio']:.2f}x")
    print()
    print(f"{'KMS calls':<42} {'KMS saw':>13} {'envelope':>13} {'limit':>9}")
    row("enc INSERT (most of any round)", str(res["kms_calls_enc"]), str(res["kms_calls_enc_envelope"]),
        str(res["kms_calls_enc_limit"]), "kms_calls_enc")
    row(f"cold dec scan ({res['distinct_deks']} distinct data keys)", str(res["kms_calls_dec_cold"]),
        str(res["kms_calls_dec_cold_envelope"]), str(res["kms_calls_dec_cold_limit"]), "kms_calls_dec_cold")
    detail = res["kms_calls_dec_cold_parallel_detail"]
    row(f"cold dec scan, {detail['workers_launched']} workers (info)", str(res["kms_calls_dec_cold_parallel"]),
        str(detail["envelope"]), str(res["kms_calls_dec_cold_limit"]))
    if res["kms_calls_enc"] != res["kms_calls_enc_envelope"] or res["kms_calls_dec_cold"] != res["kms_calls_dec_cold_envelope"]:
        print("note: the KMS and envelope counted different numbers of calls")
    print()
    print("ratios: envelope time / baseline time within each round (TPS: envelope / plain; speedup: "
          "serial / parallel), median of the rounds; times are medians")
    print("4 KiB values: incompressible random bytes from gen_random_bytes, both columns stored out of line "
          "uncompressed; both scans compute sum(get_byte(x, 4095)), which detoasts the whole value")
    if pgp_note:
        print(f"* pgp_sym_* ran on {res['pgp_rows']} rows per round ({res['pgp_enc_us_per_row']:.1f} us/row to "
              f"encrypt, {res['pgp_dec_us_per_row']:.1f} us/row to decrypt in the probe); its times are scaled "
              f"to {res['rows']} rows")
    met = sum(tg["met"] for tg in res["targets"].values())
    print(f"targets met: {met} of {len(res['targets'])} (informational)")


if __name__ == "__main__":
    # SIGTERM (from test/bench/run when interrupted) unwinds like an error: temporary files go, pgbench is killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
