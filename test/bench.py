#!/usr/bin/python3
"""envelope benchmarks: ratios against baselines run in the same session.

Each case runs a baseline and the envelope variant in one connection, several
times, and reports the median time of each and their ratio, plus the KMS calls
the envelope variant made, counted twice: by the extension
(envelope.cache_stats()) and by the test KMS itself (its admin /stats).

    make bench                 # ROWS=100000 by default
    ROWS=20000 make bench
"""
import json
import os
import statistics
import time
import urllib.request

import psycopg2

ROWS = int(os.environ.get("ROWS", "100000"))
REPEAT = int(os.environ.get("REPEAT", "3"))
ADMIN = os.environ["ENVELOPE_KMS_ADMIN"]


def kms_stats():
    """Requests the test KMS has served, by endpoint."""
    with urllib.request.urlopen(ADMIN + "/stats") as r:
        return json.load(r)["requests"]


def cache_stats(cur):
    """This session's counters from envelope.cache_stats()."""
    cur.execute("SELECT * FROM envelope.cache_stats()")
    return dict(zip([d[0] for d in cur.description], cur.fetchone()))


def timed(cur, sql):
    """Seconds one statement takes."""
    t = time.perf_counter()
    cur.execute(sql)
    return time.perf_counter() - t


def median_time(cur, setup, sql):
    """Median over REPEAT runs, each after its setup statement."""
    times = []
    for _ in range(REPEAT):
        if setup:
            cur.execute(setup)
        times.append(timed(cur, sql))
    return statistics.median(times)


def delta(after, before, keys):
    """Differences of counters."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def main():
    """Run every case and print a table."""
    conn = psycopg2.connect("")
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SHOW envelope.dek_max_uses")
    max_uses = cur.fetchone()[0]
    cur.execute("SHOW envelope.cache_ttl")
    ttl = cur.fetchone()[0]
    print(f"envelope benchmarks: {ROWS} rows, median of {REPEAT}, "
          f"dek_max_uses={max_uses}, cache_ttl={ttl}, kms_verify=on")
    cur.execute("DROP TABLE IF EXISTS bench_plain, bench_enc")
    cur.execute("CREATE UNLOGGED TABLE bench_plain (id int, v bytea)")
    cur.execute("CREATE UNLOGGED TABLE bench_enc (id int, v enc_bytea)")
    cur.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    cur.execute("DROP TABLE IF EXISTS bench_pgcrypto")
    cur.execute("CREATE UNLOGGED TABLE bench_pgcrypto (id int, v bytea)")

    src = f"FROM generate_series(1, {ROWS}) g"
    payload = "convert_to('customer-' || g || '-123-45-6789', 'UTF8')"
    rows = []

    # 1. INSERT ... SELECT enc(): baseline plain bytea, and pgcrypto's AES.
    base = median_time(cur, "TRUNCATE bench_plain", f"INSERT INTO bench_plain SELECT g, {payload} {src}")
    pgc = median_time(cur, "TRUNCATE bench_pgcrypto",
                      f"INSERT INTO bench_pgcrypto SELECT g, encrypt_iv({payload}, '\\x{'00' * 32}'::bytea, "
                      f"'\\x{'00' * 16}'::bytea, 'aes-cbc') {src}")
    cur.execute("TRUNCATE bench_enc")
    cur.execute("SELECT envelope.cache_flush()")
    k0, c0 = kms_stats(), cache_stats(cur)
    t_enc = timed(cur, f"INSERT INTO bench_enc SELECT g, enc({payload}) {src}")
    k1, c1 = kms_stats(), cache_stats(cur)
    rows.append(("INSERT ... SELECT enc()", base, t_enc, pgc, delta(k1, k0, k1.keys()),
                 delta(c1, c0, ["kms_generate", "kms_unwrap"])))

    # 2. SELECT dec() with the data keys cached (warm).
    base = median_time(cur, None, "SELECT sum(length(v)) FROM bench_plain")
    pgc = median_time(cur, None, f"SELECT sum(length(decrypt_iv(v, '\\x{'00' * 32}'::bytea, "
                      f"'\\x{'00' * 16}'::bytea, 'aes-cbc'))) FROM bench_pgcrypto")
    cur.execute("SELECT sum(length(dec_bytea(v))) FROM bench_enc")
    k0, c0 = kms_stats(), cache_stats(cur)
    t_dec = median_time(cur, None, "SELECT sum(length(dec_bytea(v))) FROM bench_enc")
    k1, c1 = kms_stats(), cache_stats(cur)
    rows.append(("SELECT dec(), cache warm", base, t_dec, pgc, delta(k1, k0, k1.keys()),
                 delta(c1, c0, ["kms_unwrap", "hits", "misses"])))

    # 3. SELECT dec() in a new session (cold cache): one unwrap per data key.
    conn2 = psycopg2.connect("")
    cur2 = conn2.cursor()
    k0, c0 = kms_stats(), cache_stats(cur2)
    t_cold = timed(cur2, "SELECT sum(length(dec_bytea(v))) FROM bench_enc")
    k1, c1 = kms_stats(), cache_stats(cur2)
    rows.append(("SELECT dec(), new session", base, t_cold, None, delta(k1, k0, k1.keys()),
                 delta(c1, c0, ["kms_unwrap", "hits", "misses"])))
    conn2.close()

    # 4. The KMS cost of one call per value: dec_max_uses = 1, 1000 rows.
    n = min(ROWS, 1000)
    base1 = median_time(cur, None, f"SELECT count({payload}) FROM generate_series(1, {n}) g")
    cur.execute("SET envelope.dek_max_uses = 1")
    k0, c0 = kms_stats(), cache_stats(cur)
    t_one = timed(cur, f"SELECT count(enc({payload})) FROM generate_series(1, {n}) g")
    k1, c1 = kms_stats(), cache_stats(cur)
    cur.execute("RESET envelope.dek_max_uses")
    rows.append((f"enc() x{n}, dek_max_uses=1", base1, t_one, None, delta(k1, k0, k1.keys()),
                 delta(c1, c0, ["kms_generate", "kms_unwrap"])))

    print()
    print(f"{'case':32} {'baseline s':>10} {'envelope s':>10} {'ratio':>7} {'vs pgcrypto':>11}  KMS calls (KMS side | extension side)")
    for name, b, t, p, k, c in rows:
        ks = ", ".join(f"{key}={val}" for key, val in k.items() if val) or "none"
        cs = ", ".join(f"{key}={val}" for key, val in c.items())
        vs = f"{t / p:10.2f}x" if p else f"{'-':>11}"
        print(f"{name:32} {b:10.3f} {t:10.3f} {t / b:6.1f}x {vs}  {ks} | {cs}")
    cur.execute("DROP TABLE bench_plain, bench_enc, bench_pgcrypto")


if __name__ == "__main__":
    main()
