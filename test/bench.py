#!/usr/bin/python3
"""envelope benchmarks: ratios against plain baselines measured in the same run.

For ROWS rows (default 100,000) of 100-byte values:
  1. INSERT ... SELECT enc(...) versus the same INSERT of plain bytea;
  2. a full SELECT dec(...) with a cold cache (after cache_flush) and a warm
     one, versus SELECT of the plain column;
     and the cost of envelope.audit = statement and value on the warm scan,
     as ratios to audit = off;
  3. pgbench TPS of a primary-key point select returning dec(col) versus the
     plain column, at 1, 4 and 8 clients;
with the KMS calls each step made, counted twice: by the extension
(envelope.cache_stats(), server-wide) and by the test KMS itself (/stats).
pgcrypto's AES (a fixed key, no KMS) is shown for scale.

    make bench                        # ROWS=100000 BENCH_SECONDS=10
    ROWS=20000 BENCH_SECONDS=5 make bench
"""
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request

import psycopg2

ROWS = int(os.environ.get("ROWS", "100000"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
REPEAT = 3
ADMIN = os.environ["ENVELOPE_KMS_ADMIN"]
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
PAYLOAD = "convert_to(rpad('customer-' || g || '-', 100, 'x'), 'UTF8')"
KEY = "'\\x" + "00" * 32 + "'::bytea"
IV = "'\\x" + "00" * 16 + "'::bytea"


def kms_requests():
    """Requests the test KMS has served, by endpoint."""
    with urllib.request.urlopen(ADMIN + "/stats") as r:
        return json.load(r)["requests"]


def ext_stats(cur):
    """Server-wide counters from envelope.cache_stats()."""
    cur.execute("SELECT * FROM envelope.cache_stats()")
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


class Counted:
    """KMS calls made while the block runs, seen by the KMS and by envelope."""

    def __init__(self, cur):
        self.cur = cur

    def __enter__(self):
        self.k0, self.e0 = kms_requests(), ext_stats(self.cur)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        k1, e1 = kms_requests(), ext_stats(self.cur)
        self.kms = {k: k1[k] - self.k0.get(k, 0) for k in k1 if k1[k] - self.k0.get(k, 0)}
        self.ext = {k: e1[k] - self.e0[k] for k in ("kms_generate", "kms_unwrap", "hits", "misses")}

    def calls(self):
        """One-line summary of the KMS calls."""
        kms = ", ".join(f"{k}={v}" for k, v in self.kms.items()) or "none"
        return f"KMS saw: {kms}; envelope counted: " + ", ".join(f"{k}={v}" for k, v in self.ext.items())


def median_time(cur, sql, setup=None):
    """Median seconds over REPEAT runs."""
    times = []
    for _ in range(REPEAT):
        if setup:
            cur.execute(setup)
        t = time.perf_counter()
        cur.execute(sql)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pgbench_tps(script, clients, audit=None):
    """TPS of a pgbench run of a custom script."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    os.chmod(path, 0o644)
    env = dict(os.environ)
    if audit:
        env["PGOPTIONS"] = f"-c envelope.audit={audit}"
    out = subprocess.run([PGBENCH, "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients),
                          "-T", str(SECONDS), "-f", path], capture_output=True, text=True, env=env)
    os.unlink(path)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if failed and int(failed.group(1)):
        raise RuntimeError("pgbench had failed transactions:\n" + out.stdout)
    return float(m.group(1))


def main():
    """Run the cases and print the tables."""
    conn = psycopg2.connect("")
    conn.autocommit = True
    cur = conn.cursor()
    settings = {}
    for name in ("dek_max_uses", "dek_max_age", "cache_ttl", "cache_size", "kms_verify"):
        cur.execute(f"SHOW envelope.{name}")
        settings[name] = cur.fetchone()[0]
    cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'background worker'")
    print(f"envelope benchmarks: {ROWS} rows of 100 bytes; "
          + ", ".join(f"{k}={v}" for k, v in settings.items()))
    cur.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    cur.execute("DROP TABLE IF EXISTS bench_plain, bench_enc, bench_pgc, bench_pk")
    cur.execute("CREATE UNLOGGED TABLE bench_plain (id int, v bytea)")
    cur.execute("CREATE UNLOGGED TABLE bench_enc (id int, v enc_bytea)")
    cur.execute("CREATE UNLOGGED TABLE bench_pgc (id int, v bytea)")
    src = f"FROM generate_series(1, {ROWS}) g"

    print("\n1. bulk encryption")
    base = median_time(cur, f"INSERT INTO bench_plain SELECT g, {PAYLOAD} {src}", "TRUNCATE bench_plain")
    pgc = median_time(cur, f"INSERT INTO bench_pgc SELECT g, encrypt_iv({PAYLOAD}, {KEY}, {IV}, 'aes-cbc') {src}",
                      "TRUNCATE bench_pgc")
    cur.execute("SELECT envelope.cache_flush()")
    with Counted(cur) as c:
        cur.execute(f"INSERT INTO bench_enc SELECT g, enc({PAYLOAD}) {src}")
    print(f"   INSERT ... SELECT enc()      {c.seconds:7.3f} s   {c.seconds / base:5.1f}x plain ({base:.3f} s), "
          f"{c.seconds / pgc:4.1f}x pgcrypto ({pgc:.3f} s)")
    print(f"   {c.calls()}")

    print("\n2. full-table decryption")
    base = median_time(cur, "SELECT sum(length(v)) FROM bench_plain")
    pgc = median_time(cur, f"SELECT sum(length(decrypt_iv(v, {KEY}, {IV}, 'aes-cbc'))) FROM bench_pgc")
    cur.execute("SELECT envelope.cache_flush()")
    with Counted(cur) as c:
        cur.execute("SELECT sum(length(dec_bytea(v))) FROM bench_enc")
    print(f"   SELECT dec(), cold cache     {c.seconds:7.3f} s   {c.seconds / base:5.1f}x plain ({base:.3f} s)")
    print(f"   {c.calls()}")
    with Counted(cur) as c:
        warm = median_time(cur, "SELECT sum(length(dec_bytea(v))) FROM bench_enc")
    print(f"   SELECT dec(), warm cache     {warm:7.3f} s   {warm / base:5.1f}x plain, "
          f"{warm / pgc:4.1f}x pgcrypto ({pgc:.3f} s)  ({REPEAT} runs)")
    print(f"   {c.calls()}")
    cur.execute("EXPLAIN (ANALYZE, COSTS OFF) SELECT sum(length(dec_bytea(v))) FROM bench_enc")
    workers = [r[0] for r in cur.fetchall() if "Workers Launched" in r[0]]
    print(f"   plan: {workers[0].strip() if workers else 'no parallel workers'}")

    print("\n   audit cost on the warm scan (envelope.audit; ratios to off, same session)")
    scan = "SELECT sum(length(dec_bytea(v))) FROM bench_enc"
    audit = {}
    for level in ("off", "statement", "value"):
        cur.execute(f"SET envelope.audit = {level}")
        audit[level] = median_time(cur, scan)
    cur.execute("RESET envelope.audit")
    for level in ("off", "statement", "value"):
        records = {"off": "no records", "statement": "1 record per scan",
                   "value": f"{ROWS} records per scan"}[level]
        print(f"   audit = {level:<9}           {audit[level]:7.3f} s   {audit[level] / audit['off']:5.2f}x off   ({records})")

    print(f"\n3. pgbench point selects by primary key ({SECONDS} s each, -M prepared)")
    cur.execute(f"CREATE UNLOGGED TABLE bench_pk AS SELECT g AS id, {PAYLOAD} AS plain, enc({PAYLOAD}) AS v {src}")
    cur.execute("ALTER TABLE bench_pk ADD PRIMARY KEY (id)")
    cur.execute("VACUUM ANALYZE bench_pk")
    plain = f"\\set id random(1, {ROWS})\nSELECT plain FROM bench_pk WHERE id = :id;\n"
    encd = f"\\set id random(1, {ROWS})\nSELECT dec_bytea(v) FROM bench_pk WHERE id = :id;\n"
    print("   (dec() with the default envelope.audit = statement: one audit record per transaction;")
    print("    and with audit = off, to show what the records cost)")
    print(f"   {'clients':>7} {'plain tps':>10} {'dec() tps':>10} {'ratio':>6} {'audit off':>10} {'ratio':>6}")
    for clients in (1, 4, 8):
        tp = pgbench_tps(plain, clients)
        with Counted(cur) as c:
            te = pgbench_tps(encd, clients)
        toff = pgbench_tps(encd, clients, audit="off")
        print(f"   {clients:7d} {tp:10.0f} {te:10.0f} {te / tp:6.2f} {toff:10.0f} {toff / tp:6.2f}   {c.calls()}")

    cur.execute("DROP TABLE bench_plain, bench_enc, bench_pgc, bench_pk")


if __name__ == "__main__":
    main()
