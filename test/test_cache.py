#!/usr/bin/python3
"""Shared-memory key cache and the resilient KMS client (issue 3).

Needs the dev environment (eval "$(test/devenv up)"): it reads PGHOST,
PGPORT, PGDATABASE, PGUSER, VAULT_ADDR, VAULT_TOKEN, VAULT_CACERT,
ENVELOPE_KMS_ADMIN, ENVELOPE_DEV_DIR and ENVELOPE_DEV_LOG, and exits with
status 2 if one is missing.  Run as root (or as the cluster's owner):

    /usr/bin/python3 test/test_cache.py [TEST_NAME ...]

What is checked (one line per test: PASS/FAIL, name, seconds):
  settings_and_stats_shape   GUCs (defaults, limits, contexts), cache_stats()
                             is one row with the documented columns, the
                             "envelope key cache sweeper" worker runs
  shared_between_sessions    a key unwrapped by one session is a hit in another
  cache_flush_server_wide    cache_flush() and cache_flush(kek) act server-wide
  dek_limits_are_global      dek_max_uses / dek_max_age count across sessions: 30 + 70 + 1 values
                             in two sessions, uses = 100 -> <= 100 values per key, 2 keys; 2 x 1000
                             concurrent inserts -> 20..22 keys, ceil(keys/4) (+1) generation requests
  dek_rollover_kms_calls     ... and the same load uses at most 22 data keys, made by
                             ceil(keys/4) (+1) KMS generation requests (batches of 4), each verified
                             by one decrypt
  rotate_kek_all_backends    rotate_kek() retires the current data key everywhere
  ttl_expiry_and_sweeper     cache_ttl (reloaded), expiry without traffic
  flush_reaches_open_session cache_flush() in one session drops another open session's local copy
  flush_reaches_running_statement  ... also inside a statement still running (a DO block), within
                             about a second
  ttl_reaches_open_session   cache_ttl = 1 s bounds local copies of an open session (idle, and
                             inside one transaction)
  idle_backend_wipes_keys    an idle backend's memory (/proc/PID/mem, private and shared) no longer
                             holds an expired data key's bytes (nor its AES schedule's first round key),
                             also after an error in between (error recovery cancels timeouts)
  dek_max_uses_server_wide   dek_max_uses = 50 across 3 x 120 one-row INSERTs and one 200-row INSERT
                             ... SELECT, concurrently; data keys <= ceil(560/50) + 2 x 4, KMS
                             generation requests <= ceil(keys/4) + 1
  reservation_no_waste_single_rows  dek_max_uses = 10: 30 one-row INSERTs -> exactly 3 data keys,
                             1 KMS generation request
  spare_keys_after_flush     dek_max_uses = 10: 40 one-row INSERTs -> 4 keys, 1 generation request
                             (+1 verification decrypt); spares used without KMS calls, wiped by
                             cache_flush(), never used after rotate_kek() or past dek_max_age
  kms_retries                503/429/refused retried with backoff, bounded by
                             statement_timeout; kms_retries = 0 fails at once
  outage_grace               kms_outage_grace: stale keys only while the KMS is
                             unreachable, logged once per statement, fail closed
  cancel_hanging_kms         pg_cancel_backend() ends a hung KMS call in < 1 s
  parallel_scan              1,000,000 rows, parallel workers: one KMS unwrap per data key
  cache_size_lru_eviction    cache_size = 16 (restart): capacity, LRU eviction
  restart_empties_cache      a restart empties the cache and resets the counters
  not_preloaded_cluster      without shared_preload_libraries: 55000, type I/O works
  pgbench_mixed_load         8 clients x 30 s of enc()/dec_text(), dek_max_uses = 1000,
                             KMS generation requests <= ceil(keys/4) + 1

"KMS generation requests" are the test KMS's encrypt (batch_input: envelope generates 4 data keys
and has them wrapped in one call) plus datakey (unbatched fallback) requests.

The test may restart the dev cluster and change settings with ALTER SYSTEM;
every change is undone at the end (settings restored to what
postgresql.auto.conf held before, reload, restart if a postmaster setting
changed, KMS fault mode "none"), also on failure.  Tables, KEK registry rows
and the temporary second cluster it creates are removed.
Exit status: 0 if every test passed, 1 if one failed, 2 if the environment is missing.
"""
import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import psycopg2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from envtest import admin, set_fault  # noqa: E402
import psycopg2.extensions
import requests

PGBIN = "/usr/lib/postgresql/15/bin"
REQUIRED_ENV = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "VAULT_ADDR", "VAULT_TOKEN",
                "VAULT_CACERT", "ENVELOPE_KMS_ADMIN", "ENVELOPE_DEV_DIR", "ENVELOPE_DEV_LOG")
RUN = "%d" % os.getpid()
PREFIX = "cache_t_" + RUN                # tables and KEKs this run creates
SAFETY_TIMEOUT = "60s"                   # statement_timeout of every session unless a test sets one

# The columns of envelope.cache_stats(), in order, with their types.
STATS_COLUMNS = [
    ("entries", "integer"), ("capacity", "integer"),
    ("hits", "bigint"), ("misses", "bigint"), ("expirations", "bigint"), ("evictions", "bigint"),
    ("stale_uses", "bigint"),
    ("kms_key_info", "bigint"), ("kms_generate", "bigint"), ("kms_wrap", "bigint"),
    ("kms_unwrap", "bigint"), ("kms_rewrap", "bigint"), ("kms_rotate", "bigint"), ("kms_configure", "bigint"),
    ("kms_retries", "bigint"), ("kms_errors", "bigint"),
    ("last_kms_error", "timestamp with time zone"),
    ("kms_connections", "bigint"), ("memory_locked", "boolean"),
]
COUNTER_COLUMNS = [n for n, t in STATS_COLUMNS if t == "bigint"]

# Settings this test may change (ALTER SYSTEM), restored at the end.
TOUCHABLE = ("envelope.cache_ttl", "envelope.cache_size", "envelope.dek_max_uses",
             "envelope.dek_max_age", "envelope.kms_retries", "envelope.kms_outage_grace")
CRASH_SCAN_OFFSET = 0
ORIGINAL_AUTO_CONF = {}                  # name -> value in postgresql.auto.conf at start
TOUCHED = set()                          # names changed by ALTER SYSTEM during the run
CREATED_KEKS = []
CREATED_TABLES = []


class Failure(AssertionError):
    """A failed hard requirement: ends the current test."""


class Interrupted(BaseException):
    """SIGTERM: end the run, but still clean up."""


# ---------------------------------------------------------------------------
# Environment: sessions, the KMS admin API, settings, restarts, the server log
# ---------------------------------------------------------------------------

def require_env():
    missing = [v for v in REQUIRED_ENV if not os.environ.get(v)]
    if missing:
        raise RuntimeError("missing environment variable(s) %s; start the dev environment first: "
                           "eval \"$(test/devenv up)\"" % ", ".join(missing))


def connect(statement_timeout=SAFETY_TIMEOUT, **kw):
    """A new autocommit session (a new backend) in the dev database."""
    args = dict(host=os.environ["PGHOST"], port=os.environ["PGPORT"],
                dbname=os.environ["PGDATABASE"], user=os.environ["PGUSER"],
                application_name="test_cache",
                options="-c statement_timeout=%s" % statement_timeout)
    args.update(kw)
    conn = psycopg2.connect(**args)
    conn.autocommit = True
    return conn


def q1(conn, sql, args=None):
    """First column of the first row."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def qrow(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def qall(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def run(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)


def kms_decrypts():
    """Decrypt (unwrap) requests that reached the KMS so far, faulted ones included."""
    return admin("GET", "/stats")["requests"]["decrypt"]


# Data keys per key generation request (src/kms.h KMS_BATCH_MAX, docs/design.md "Batched key
# generation"): envelope makes 4 keys (RAND_bytes), wraps them with one Transit encrypt call
# (batch_input) and verifies them with one decrypt call; the first becomes the KEK's current key,
# the other three are spares promoted without a KMS call.
KEYS_PER_GENERATION = 4
# Extra generation requests allowed under concurrency: a backend that finds the KEK's
# "generating" mark abandoned (its owner gone, or past the pending limit on a slow KMS) fetches a
# batch of its own, and the spares of the batch it replaces are wiped unused.  Every other
# rollover race is settled under the key slot's lock (promote a spare, or wait for the one
# generator), so one extra request per concurrent run is ample.
GENERATION_RACE_ALLOWANCE = 1


def kms_generations(requests=None):
    """Key generation requests that reached the KMS so far (or in the given kms_requests()
    snapshot): batched Transit encrypt calls (envelope generates the keys, the KMS wraps 4 per
    call) plus datakey/plaintext calls (the unbatched fallback).  Nothing else in this test
    wraps keys through encrypt."""
    r = admin("GET", "/stats")["requests"] if requests is None else requests
    return r["encrypt"] + r["datakey"]


def kms_requests():
    """The test KMS's request counters (a dict: datakey, encrypt, decrypt, ...)."""
    return dict(admin("GET", "/stats")["requests"])


def generations_for(keys):
    """Generation requests that make the given number of data keys: ceil(keys / 4)."""
    return -(-keys // KEYS_PER_GENERATION)


def cache_stats(conn):
    """envelope.cache_stats() as a dict (exactly one row expected)."""
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM envelope.cache_stats()")
        rows = cur.fetchall()
        cols = [d.name for d in cur.description]
    if len(rows) != 1:
        raise Failure("envelope.cache_stats() returned %d rows, expected exactly one" % len(rows))
    return dict(zip(cols, rows[0]))


def stat(s, name):
    if name not in s:
        raise Failure("envelope.cache_stats() has no column %r (it has: %s)" % (name, ", ".join(s)))
    return s[name]


def delta(before, after, name):
    return stat(after, name) - stat(before, name)


def setting(conn, name):
    """pg_settings.setting (in the base unit), or None if the setting does not exist."""
    row = qrow(conn, "SELECT setting FROM pg_settings WHERE name = %s", (name,))
    return row[0] if row else None


def wait_setting(name, expected, conns=(), timeout=5.0):
    """Wait until new sessions and every given session see a reloaded setting."""
    expected = str(expected)
    deadline = time.monotonic() + timeout
    while True:
        seen = []
        c = connect()
        try:
            seen.append(setting(c, name))
        finally:
            c.close()
        for c in conns:
            seen.append(setting(c, name))
        if all(v == expected for v in seen):
            return
        if time.monotonic() > deadline:
            raise Failure("after ALTER SYSTEM and pg_reload_conf(), %s is %r in sessions, expected %r"
                          % (name, seen, expected))
        time.sleep(0.05)


def alter_system(values, conns=()):
    """ALTER SYSTEM SET name = value for each, reload, wait until sessions see them.
    A postmaster setting is not waited for (restart_cluster() applies it)."""
    c = connect()
    try:
        for name, value in values.items():
            assert name in TOUCHABLE, name
            TOUCHED.add(name)
            run(c, "ALTER SYSTEM SET %s = %%s" % name, (str(value),))
        run(c, "SELECT pg_reload_conf()")
        contexts = dict(qall(c, "SELECT name, context FROM pg_settings WHERE name = ANY(%s)",
                             (list(values),)))
    finally:
        c.close()
    for name, value in values.items():
        if contexts.get(name) != "postmaster":
            wait_setting(name, value, conns)


def restore_settings(names=None):
    """Put the given (default: all touched) settings back to what postgresql.auto.conf held
    at start, reload, and restart if a postmaster setting is pending.  Returns True if restarted."""
    names = sorted(TOUCHED if names is None else set(names) & TOUCHED)
    if not names:
        return False
    c = connect()
    try:
        for name in names:
            if name in ORIGINAL_AUTO_CONF:
                run(c, "ALTER SYSTEM SET %s = %%s" % name, (ORIGINAL_AUTO_CONF[name],))
            else:
                run(c, "ALTER SYSTEM RESET %s" % name)
        run(c, "SELECT pg_reload_conf()")
        time.sleep(0.2)
        pending = q1(c, "SELECT count(*) FROM pg_settings WHERE name = ANY(%s) AND pending_restart", (names,))
    finally:
        c.close()
    TOUCHED.difference_update(names)
    if pending:
        restart_cluster()
        return True
    return False


def as_cluster_owner(cmd):
    """Run a command as the cluster's OS user (postgres) when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


def pgdata():
    return os.path.join(os.environ["ENVELOPE_DEV_DIR"], "pgdata")


def restart_cluster():
    """Restart the dev cluster (fast shutdown) and wait until it accepts connections."""
    cmd = as_cluster_owner([PGBIN + "/pg_ctl", "-D", pgdata(), "-l", os.environ["ENVELOPE_DEV_LOG"],
                            "-w", "-t", "60", "restart"])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if r.returncode != 0:
        raise Failure("pg_ctl restart failed (%d): %s" % (r.returncode, r.stdout.strip()[-500:]))
    deadline = time.monotonic() + 30
    while True:
        try:
            connect().close()
            return
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_for_server(timeout=30.0):
    """Wait until the dev cluster accepts connections (after a crash it reinitializes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect().close()
            return True
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def cluster_running():
    r = subprocess.run(as_cluster_owner([PGBIN + "/pg_ctl", "-D", pgdata(), "status"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def start_cluster():
    subprocess.run(as_cluster_owner([PGBIN + "/pg_ctl", "-D", pgdata(), "-l", os.environ["ENVELOPE_DEV_LOG"],
                                     "-w", "-t", "60", "start"]),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def log_size():
    try:
        return os.path.getsize(os.environ["ENVELOPE_DEV_LOG"])
    except OSError:
        return 0


LEVEL_RE = re.compile(r"\b(DEBUG\d?|LOG|INFO|NOTICE|WARNING|ERROR|FATAL|PANIC|DETAIL|HINT|CONTEXT|"
                      r"STATEMENT|QUERY|LOCATION):  ")
CONTINUATION = ("DETAIL", "HINT", "CONTEXT", "STATEMENT", "QUERY", "LOCATION")


def log_entries(offset):
    """Server log messages written after offset: a list of (level, text), where text is the
    primary message joined with its DETAIL/HINT/CONTEXT lines (STATEMENT/QUERY lines left out,
    since they quote the test's own SQL)."""
    with open(os.environ["ENVELOPE_DEV_LOG"], "rb") as f:
        f.seek(offset)
        data = f.read().decode("utf-8", "replace")
    entries = []
    skip = False
    for line in data.splitlines():
        m = LEVEL_RE.search(line)
        if m is None:                       # a continuation line of a multi-line message
            if entries and not skip:
                entries[-1][1].append(line)
            continue
        level, text = m.group(1), line[m.end():]
        if level in CONTINUATION:
            skip = level in ("STATEMENT", "QUERY")
            if entries and not skip:
                entries[-1][1].append(text)
        else:
            skip = False
            entries.append((level, [text]))
    return [(level, "\n".join(parts)) for level, parts in entries]


def stale_log_entries(offset):
    return [(lvl, t) for lvl, t in log_entries(offset)
            if "expired" in t.lower() and "kms" in t.lower()]


# A process killed by a signal (a crash).  Exit code 1 is not matched: parallel workers exit
# with 1 after an ERROR, and the logical replication launcher at every shutdown.
CRASH_RE = re.compile(r"(server process|background worker|worker process).*"
                      r"(terminated by signal|terminated by exception)")
CRASHES = []                             # (line, following DETAIL line) of every crash seen


def crash_count():
    """Server processes that died abnormally since the run started (from the server log)."""
    global CRASH_SCAN_OFFSET
    try:
        with open(os.environ["ENVELOPE_DEV_LOG"], "rb") as f:
            f.seek(CRASH_SCAN_OFFSET)
            data = f.read()
    except OSError:
        return len(CRASHES)
    # Only whole lines; a partial last line is read again next time.
    end = data.rfind(b"\n") + 1
    CRASH_SCAN_OFFSET += end
    lines = data[:end].decode("utf-8", "replace").splitlines()
    for i, line in enumerate(lines):
        if CRASH_RE.search(line):
            detail = lines[i + 1] if i + 1 < len(lines) and "DETAIL:" in lines[i + 1] else ""
            CRASHES.append(line[line.find("LOG:") + 4:].strip() + (" / " + detail[detail.find("DETAIL:") + 7:].strip()
                                                                   if detail else ""))
    return len(CRASHES)


def crash_lines(n):
    return CRASHES[-n:]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def new_kek(conn):
    """A fresh KEK (new Transit key in the test KMS, registered in envelope_dev)."""
    name = "%s_k%d" % (PREFIX, len(CREATED_KEKS) + 1)
    r = requests.post("%s/v1/transit/keys/%s" % (os.environ["VAULT_ADDR"], name),
                      json={"type": "aes256-gcm96"},
                      headers={"X-Vault-Token": os.environ["VAULT_TOKEN"]},
                      verify=os.environ["VAULT_CACERT"], timeout=10)
    if r.status_code != 200:
        raise Failure("could not create KMS key %s: %s %s" % (name, r.status_code, r.text[:200]))
    CREATED_KEKS.append(name)
    run(conn, "SELECT envelope.create_kek(%s, 'vault', %s)", (name, name))
    return name


def new_table(conn, suffix, columns="id bigserial PRIMARY KEY, p text, v enc_bytea", unlogged=False):
    name = "%s_%s" % (PREFIX, suffix)
    CREATED_TABLES.append(name)
    run(conn, "DROP TABLE IF EXISTS %s" % name)
    run(conn, "CREATE %sTABLE %s (%s)" % ("UNLOGGED " if unlogged else "", name, columns))
    return name


def dek_of(conn, value_text):
    """(kek_version, wrapped_dek_b64) of a value given in its text form."""
    return tuple(qrow(conn, "SELECT (m->>'kek_version')::int, m->>'wrapped_dek_b64' "
                            "FROM envelope.metadata(%s::enc_bytea) m", (value_text,)))


# ---------------------------------------------------------------------------
# A small runner: tests in a fixed order, soft and hard checks
# ---------------------------------------------------------------------------

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


class T:
    """Per-test context: sessions, soft checks (expect) and hard checks (require)."""

    def __init__(self, name):
        self.name = name
        self.problems = []
        self.notes = []
        self.conns = []
        self.cleanups = []

    def session(self, **kw):
        c = connect(**kw)
        self.conns.append(c)
        return c

    def expect(self, cond, msg):
        if not cond:
            self.problems.append(msg)
        return cond

    def require(self, cond, msg):
        if not cond:
            raise Failure(msg)

    def note(self, msg):
        self.notes.append(msg)

    def failing(self, conn, sql, args=None):
        """Run sql expecting an error: (error or None, elapsed seconds)."""
        start = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                if cur.description is not None:
                    cur.fetchall()
        except psycopg2.Error as e:
            return e, time.monotonic() - start
        return None, time.monotonic() - start

    def close(self):
        for c in self.conns:
            try:
                c.close()
            except Exception:
                pass
        self.conns = []


def describe(err):
    if err is None:
        return "no error"
    d = err.diag
    return "SQLSTATE %s %r (detail %r, hint %r)" % (err.pgcode, d.message_primary, d.message_detail,
                                                     d.message_hint)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@test
def settings_and_stats_shape(t):
    c = t.session()
    want = {
        # name: (boot_val, min_val, max_val, context); None = not checked
        "envelope.cache_ttl": ("60", None, "300", "sighup"),
        "envelope.cache_size": ("1024", "16", None, "postmaster"),
        "envelope.kms_retries": ("2", None, None, "sighup"),
        "envelope.kms_outage_grace": ("0", None, None, "sighup"),
        "envelope.dek_max_uses": (None, None, None, "superuser"),
        "envelope.dek_max_age": (None, None, None, "superuser"),
    }
    for name, (boot, lo, hi, ctx) in want.items():
        row = qrow(c, "SELECT boot_val, min_val, max_val, context FROM pg_settings WHERE name = %s", (name,))
        if not t.expect(row is not None, "setting %s does not exist" % name):
            continue
        for label, w, g in (("default", boot, row[0]), ("minimum", lo, row[1]), ("maximum", hi, row[2]),
                            ("context", ctx, row[3])):
            if w is not None:
                t.expect(g == w, "%s: %s is %r, expected %r" % (name, label, g, w))

    with c.cursor() as cur:
        cur.execute("SELECT * FROM envelope.cache_stats()")
        rows = cur.fetchall()
        names = [d.name for d in cur.description]
    t.expect(len(rows) == 1, "envelope.cache_stats() returned %d rows, expected 1" % len(rows))
    # Every documented column, in the documented order; columns added later (counters of new KMS
    # operations) are allowed and only noted.
    documented = [n for n, _ in STATS_COLUMNS]
    missing = [n for n in documented if n not in names]
    t.expect(not missing, "envelope.cache_stats() lacks the column(s) %s (it has %s)" % (missing, names))
    present = [n for n in names if n in documented]
    t.expect(present == [n for n in documented if n in names],
             "envelope.cache_stats() columns are out of the documented order: %s, expected %s" % (names, documented))
    extra = [n for n in names if n not in documented]
    if extra:
        t.note("cache_stats() has undocumented extra column(s): %s" % extra)
    have = [n for n, _ in STATS_COLUMNS if n in names]
    if have:
        types = qrow(c, "SELECT " + ", ".join("pg_typeof(%s)::text" % n for n in have)
                     + " FROM envelope.cache_stats()")
        for n, got in zip(have, types):
            w = dict(STATS_COLUMNS)[n]
            t.expect(got == w, "cache_stats().%s has type %s, expected %s" % (n, got, w))
    s = cache_stats(c)
    t.expect(stat(s, "capacity") == 1024, "capacity is %r with cache_size = 1024" % s.get("capacity"))

    # The sweeper background worker.
    types = [r[0] for r in qall(c, "SELECT backend_type FROM pg_stat_activity")]
    titles = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    titles.append(f.read().replace(b"\0", b" ").decode("utf-8", "replace"))
            except OSError:
                pass
    t.expect("envelope key cache sweeper" in types
             or any("envelope key cache sweeper" in x for x in titles),
             "no \"envelope key cache sweeper\" background worker (pg_stat_activity backend types: %s)"
             % sorted(set(types)))


@test
def shared_between_sessions(t):
    setup = t.session()
    tab = new_table(setup, "share")
    run(setup, "INSERT INTO %s (p, v) SELECT 'share-' || g, enc('share-' || g) FROM generate_series(1, 20) g"
        % tab)
    deks = q1(setup, "SELECT count(DISTINCT envelope.metadata(v)->>'wrapped_dek_b64') FROM %s" % tab)
    t.require(deks == 1, "20 values inserted by one statement use %d data keys, expected 1" % deks)

    a = t.session()
    run(a, "SELECT envelope.cache_flush()")
    s0 = cache_stats(a)
    k0 = kms_decrypts()
    t.require(q1(a, "SELECT dec_text(v) FROM %s WHERE id = (SELECT min(id) FROM %s)" % (tab, tab))
              == "share-1", "session A decrypted a wrong value")
    s1 = cache_stats(a)
    k1 = kms_decrypts()
    t.expect(k1 - k0 == 1, "session A's first dec after cache_flush(): %d KMS decrypt requests, expected 1"
             % (k1 - k0))
    t.expect(delta(s0, s1, "kms_unwrap") == 1, "cache_stats().kms_unwrap grew by %d in session A, expected 1"
             % delta(s0, s1, "kms_unwrap"))
    t.expect(stat(s1, "entries") >= 1, "entries = %d after session A's decrypt" % stat(s1, "entries"))

    b = t.session()                                  # a new backend
    s2 = cache_stats(b)
    t.expect(stat(s2, "entries") == stat(s1, "entries") and stat(s2, "misses") == stat(s1, "misses")
             and stat(s2, "kms_unwrap") == stat(s1, "kms_unwrap"),
             "a new session's cache_stats() differs from session A's (not server-wide): A %s, B %s"
             % ({k: s1[k] for k in ("entries", "misses", "kms_unwrap")},
                {k: s2.get(k) for k in ("entries", "misses", "kms_unwrap")}))
    ok = q1(b, "SELECT count(*) FILTER (WHERE dec_text(v) = p) FROM %s" % tab)
    s3 = cache_stats(b)
    k3 = kms_decrypts()
    t.expect(ok == 20, "session B decrypted %d of 20 values correctly" % ok)
    t.expect(k3 - k1 == 0, "session B made %d KMS decrypt requests for a data key session A had unwrapped, "
                           "expected 0" % (k3 - k1))
    t.expect(delta(s2, s3, "hits") >= 20, "hits grew by %d for session B's 20 decrypts, expected >= 20"
             % delta(s2, s3, "hits"))
    t.expect(delta(s2, s3, "misses") == 0, "misses grew by %d in session B, expected 0" % delta(s2, s3, "misses"))


@test
def cache_flush_server_wide(t):
    setup = t.session()
    kek = new_kek(setup)
    tab = new_table(setup, "flush")
    run(setup, "INSERT INTO %s (p, v) VALUES ('flush-pii', enc('flush-pii', 'pii')), "
               "('flush-x', enc('flush-x', %%s))" % tab, (kek,))
    dec_p = "SELECT dec_text(v) FROM %s WHERE p = 'flush-pii'" % tab
    dec_x = "SELECT dec_text(v) FROM %s WHERE p = 'flush-x'" % tab

    a = t.session()
    n = q1(a, "SELECT envelope.cache_flush()")
    t.expect(isinstance(n, int) and n >= 0, "cache_flush() returned %r, expected a count" % (n,))
    t.expect(stat(cache_stats(a), "entries") == 0, "entries is not 0 after cache_flush()")
    k0 = kms_decrypts()
    t.require(q1(a, dec_p) == "flush-pii" and q1(a, dec_x) == "flush-x", "wrong plaintext")
    k1 = kms_decrypts()
    t.expect(k1 - k0 == 2, "2 cold decrypts made %d KMS decrypt requests, expected 2" % (k1 - k0))
    t.expect(stat(cache_stats(a), "entries") == 2, "entries = %d after decrypting values of two KEKs, expected 2"
             % stat(cache_stats(a), "entries"))
    n = q1(a, "SELECT envelope.cache_flush(%s)", (kek,))
    t.expect(n == 1, "cache_flush(%r) returned %r, expected 1" % (kek, n))
    t.expect(stat(cache_stats(a), "entries") == 1, "entries = %d after cache_flush(kek), expected 1"
             % stat(cache_stats(a), "entries"))

    b = t.session()
    k2 = kms_decrypts()
    t.require(q1(b, dec_p) == "flush-pii", "wrong plaintext")
    k3 = kms_decrypts()
    t.expect(k3 - k2 == 0, "session B: the pii key (not flushed) cost %d KMS requests, expected 0" % (k3 - k2))
    t.require(q1(b, dec_x) == "flush-x", "wrong plaintext")
    k4 = kms_decrypts()
    t.expect(k4 - k3 == 1, "session B: the flushed KEK's key cost %d KMS requests, expected 1" % (k4 - k3))
    n = q1(b, "SELECT envelope.cache_flush()")
    t.expect(n == 2, "cache_flush() in session B returned %r, expected 2" % (n,))
    t.require(q1(a, dec_p) == "flush-pii", "wrong plaintext")
    k5 = kms_decrypts()
    t.expect(k5 - k4 == 1, "session A after session B's cache_flush(): %d KMS requests, expected 1 "
                           "(the flush must be server-wide)" % (k5 - k4))


@test
def dek_limits_are_global(t):
    setup = t.session()
    tab = new_table(setup, "uses", "id bigserial PRIMARY KEY, kek text, sess text, p text, v enc_bytea")
    a, b = t.session(), t.session()
    alter_system({"envelope.dek_max_uses": 100}, conns=(a, b))
    ins = ("INSERT INTO " + tab + " (kek, sess, p, v) SELECT %s, %s, 'u' || g, enc('u' || g, %s) "
           "FROM generate_series(1, %s) g")
    wrapped = ("SELECT envelope.metadata(v)->>'wrapped_dek_b64' FROM " + tab +
               " WHERE kek = %s AND sess = %s ORDER BY id")

    # Deterministic: 30 values in A, 70 in B, then 1 in A.  What the design guarantees
    # (docs/design.md, src/keylocal.c): every data key encrypts at most dek_max_uses = 100 values
    # server-wide, and the KEK's current key is shared by all sessions.  It does not promise that
    # 30 + 70 values fit one key: uses are reserved per backend (1, then doubling within a
    # statement), so A's 30-row statement reserves 1+2+4+8+16 = 31 uses and keeps the one it did
    # not need for its later statements, and B's 70th value may need the next key.  A reservation
    # is never lost while its session lives, so the 100 values of A1 and B use at most 2 keys,
    # and A's 1-value statement A2 uses the use A still holds (or a key already in use).
    k1 = new_kek(setup)
    run(a, ins, (k1, "A1", k1, 30))
    run(b, ins, (k1, "B", k1, 70))
    run(a, ins, (k1, "A2", k1, 1))
    la1 = [r[0] for r in qall(setup, wrapped, (k1, "A1"))]
    lb = [r[0] for r in qall(setup, wrapped, (k1, "B"))]
    la2 = [r[0] for r in qall(setup, wrapped, (k1, "A2"))]
    t.require(len(la1) == 30 and len(lb) == 70 and len(la2) == 1,
              "rows inserted: A1 %d, B %d, A2 %d; expected 30, 70, 1" % (len(la1), len(lb), len(la2)))
    wa1, wb, wa2 = set(la1), set(lb), set(la2)
    per_key = qall(setup, "SELECT envelope.metadata(v)->>'wrapped_dek_b64' w, count(*), "
                          "string_agg(DISTINCT sess, ',' ORDER BY sess) FROM " + tab +
                   " WHERE kek = %s GROUP BY w ORDER BY min(id)", (k1,))
    shown = ["%d (%s)" % (r[1], r[2]) for r in per_key]
    t.note("dek_max_uses = 100, 30 values in A, 70 in B, 1 in A: values per data key %s" % shown)
    most = max(r[1] for r in per_key)
    t.expect(most <= 100, "dek_max_uses = 100: a data key encrypted %d values (30 in A, 70 in B, 1 in A); "
                          "values per key: %s" % (most, shown))
    t.expect(len(wa1) == 1, "a 30-row statement with dek_max_uses = 100 used %d data keys, expected 1" % len(wa1))
    t.expect(lb[0] in wa1, "dek_max_uses = 100: session B's first value did not use the data key session A "
                           "had just encrypted 30 values with (uses left): the current data key is not shared "
                           "between sessions; values per key: %s" % shown)
    t.expect(len(wa1 | wb) <= 2, "dek_max_uses = 100: 30 values from session A and then 70 from session B used "
                                 "%d data keys, expected at most 2 (no reservation is lost while its session "
                                 "lives); values per key: %s" % (len(wa1 | wb), shown))
    t.expect(wa2 <= wa1 | wb, "session A's next one-value statement used a data key none of the first 100 "
                              "values used, although A still held a reserved use (reservations stay with the "
                              "session across statements); values per key: %s" % shown)
    t.expect(len(per_key) == 2, "101 values with dek_max_uses = 100 used %d data keys, expected exactly 2 "
                                "(at least 2 by the bound, at most 2 since no reservation was lost); values "
                                "per key: %s" % (len(per_key), shown))

    # Concurrent: two sessions insert 1000 values each, in statements of 10 rows.
    k2 = new_kek(setup)
    barrier = threading.Barrier(2)
    errors = []

    def writer(conn, sess):
        try:
            barrier.wait(10)
            for _ in range(100):
                run(conn, ins, (k2, sess, k2, 10))
        except Exception as e:                      # reported below
            errors.append("%s: %s" % (sess, e))

    threads = [threading.Thread(target=writer, args=(c, s), daemon=True) for c, s in ((a, "A"), (b, "B"))]
    gen0 = kms_generations()
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    generated = kms_generations() - gen0
    t.require(not errors, "concurrent inserts failed: %s" % errors)
    rows = qall(setup, "SELECT w, count(*), count(DISTINCT sess) FROM (SELECT envelope.metadata(v)->>"
                       "'wrapped_dek_b64' w, sess FROM " + tab + " WHERE kek = %s) s GROUP BY w", (k2,))
    total = sum(r[1] for r in rows)
    t.require(total == 2000, "%d rows inserted, expected 2000" % total)
    distinct = len(rows)
    most = max(r[1] for r in rows)
    both = sum(1 for r in rows if r[2] == 2)
    gen_bound = generations_for(distinct) + GENERATION_RACE_ALLOWANCE
    t.note("2 x 1000 concurrent values: %d data keys, %d used by both sessions, at most %d values per key; "
           "%d KMS generation requests (bound %d)" % (distinct, both, most, generated, gen_bound))
    t.expect(20 <= distinct <= 22, "2 x 1000 concurrent values with dek_max_uses = 100: %d distinct data keys, "
                                   "expected 20..22" % distinct)
    t.expect(most <= 100, "a data key encrypted %d values, more than dek_max_uses = 100" % most)
    t.expect(both >= 1, "no data key was used by both sessions: the current data key is not shared")
    t.expect(generations_for(distinct) <= generated <= gen_bound,
             "2 x 1000 concurrent values under %d data keys: %d KMS generation requests (encrypt + datakey), "
             "expected %d..%d (4 keys per request, plus %d for a race)"
             % (distinct, generated, generations_for(distinct), gen_bound, GENERATION_RACE_ALLOWANCE))
    bad = q1(setup, "SELECT count(*) FILTER (WHERE dec_text(v) IS DISTINCT FROM p) FROM " + tab)
    t.expect(bad == 0, "%d values do not decrypt to their plaintext" % bad)

    # dek_max_age holds across sessions too.
    alter_system({"envelope.dek_max_age": 2}, conns=(a, b))
    k3 = new_kek(setup)
    enc1 = "SELECT enc('age', %s)::text"
    va = dek_of(setup, q1(a, enc1, (k3,)))
    t0 = time.monotonic()
    vb = dek_of(setup, q1(b, enc1, (k3,)))
    t.expect(va == vb, "dek_max_age = 2 s: sessions A and B encrypted within %.1f s with different data keys"
             % (time.monotonic() - t0))
    time.sleep(max(0.0, 2.3 - (time.monotonic() - t0)))
    g0 = kms_generations()
    vb2 = dek_of(setup, q1(b, enc1, (k3,)))
    va2 = dek_of(setup, q1(a, enc1, (k3,)))
    g1 = kms_generations()
    t.expect(vb2 != va, "dek_max_age = 2 s: after 2.3 s session B still used the old data key")
    t.expect(va2 == vb2, "after the data key aged out, sessions A and B use different new data keys")
    # The first batch's three spares are as old as its first key: none may become current.
    t.expect(g1 - g0 == 1, "dek_max_age = 2 s: replacing the aged-out data key made %d KMS generation requests, "
                           "expected 1 (the spare keys generated with it are too old to be promoted)" % (g1 - g0))
    restore_settings(["envelope.dek_max_uses", "envelope.dek_max_age"])


@test
def dek_rollover_kms_calls(t):
    """When the shared current data key runs out, the sessions that race for the next one must not
    each create one at the KMS: "a race may create at most a few extra data keys"."""
    setup = t.session()
    tab = new_table(setup, "rollover", "id bigserial PRIMARY KEY, sess text, v enc_bytea")
    sessions = [t.session() for _ in range(2)]
    alter_system({"envelope.dek_max_uses": 100}, conns=sessions)
    kek = new_kek(setup)
    ins = "INSERT INTO " + tab + " (sess, v) SELECT %s, enc('r' || g, %s) FROM generate_series(1, 10) g"
    barrier = threading.Barrier(len(sessions))
    errors = []

    def writer(conn, sess):
        try:
            barrier.wait(10)
            for _ in range(100):
                run(conn, ins, (sess, kek))
        except Exception as e:
            errors.append("%s: %s" % (sess, e))

    threads = [threading.Thread(target=writer, args=(c, "S%d" % i), daemon=True) for i, c in enumerate(sessions)]
    r0, s0 = kms_requests(), cache_stats(setup)
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    r1, s1 = kms_requests(), cache_stats(setup)
    t.require(not errors, "concurrent inserts failed: %s" % errors)
    generated = kms_generations(r1) - kms_generations(r0)
    verified = r1["decrypt"] - r0["decrypt"]
    used = q1(setup, "SELECT count(DISTINCT envelope.metadata(v)->>'wrapped_dek_b64') FROM " + tab)
    bound = generations_for(used) + GENERATION_RACE_ALLOWANCE
    t.note("2 x 1000 concurrent values, dek_max_uses = 100: %d data keys used, %d KMS generation requests "
           "(encrypt %d, datakey %d; bound %d), %d verification decrypts; cache_stats kms_generate +%d, kms_unwrap +%d"
           % (used, generated, r1["encrypt"] - r0["encrypt"], r1["datakey"] - r0["datakey"], bound, verified,
              delta(s0, s1, "kms_generate"), delta(s0, s1, "kms_unwrap")))
    t.expect(used <= 22, "2 x 1000 concurrent values with dek_max_uses = 100 used %d data keys, expected at most "
                         "22 (20 plus a few from races)" % used)
    # Every rollover takes a spare or waits for the one backend fetching the next batch: racing
    # sessions must not each go to the KMS.  ceil(used / 4) is also a lower bound: a request
    # makes at most 4 keys.
    t.expect(generations_for(used) <= generated <= bound,
             "2 x 1000 concurrent values with dek_max_uses = 100 under %d data keys made %d KMS generation "
             "requests (encrypt + datakey); expected %d..%d (4 keys per request, plus %d for a race)"
             % (used, generated, generations_for(used), bound, GENERATION_RACE_ALLOWANCE))
    t.expect(r1["datakey"] - r0["datakey"] == 0, "%d datakey requests: the Transit provider did not use batched "
                                                 "generation (encrypt with batch_input)"
             % (r1["datakey"] - r0["datakey"]))
    # envelope.kms_verify = on: one batched decrypt verifies each batch; nothing else decrypts here.
    t.expect(verified == generated, "%d KMS decrypt requests during an insert-only load with %d generation "
                                    "requests; expected one verification decrypt per generation request"
             % (verified, generated))
    t.expect(delta(s0, s1, "kms_generate") == generated and delta(s0, s1, "kms_unwrap") == verified,
             "cache_stats() counted kms_generate +%d and kms_unwrap +%d, the KMS saw %d generation and %d decrypt "
             "requests" % (delta(s0, s1, "kms_generate"), delta(s0, s1, "kms_unwrap"), generated, verified))
    restore_settings(["envelope.dek_max_uses"])


@test
def rotate_kek_all_backends(t):
    setup = t.session()
    kek = new_kek(setup)
    a, b = t.session(), t.session()
    enc1 = "SELECT enc('rotate-me', %s)::text"
    va1 = q1(a, enc1, (kek,))
    vb1 = q1(b, enc1, (kek,))
    da1, db1 = dek_of(setup, va1), dek_of(setup, vb1)
    t.expect(da1[0] == 1 and db1[0] == 1, "KEK versions before rotation: %d, %d" % (da1[0], db1[0]))
    t.expect(da1 == db1, "sessions A and B encrypted under different current data keys before rotation")
    t.require(q1(a, "SELECT envelope.rotate_kek(%s)", (kek,)) == 2, "rotate_kek() did not return 2")
    vb2 = q1(b, enc1, (kek,))
    db2 = dek_of(setup, vb2)
    t.expect(db2[0] == 2, "session B's next enc() after rotate_kek() in session A used KEK version %d, "
                          "expected 2" % db2[0])
    t.expect(db2[1] != db1[1], "session B kept using the retired data key after rotate_kek()")
    da2 = dek_of(setup, q1(a, enc1, (kek,)))
    dc2 = dek_of(setup, q1(t.session(), enc1, (kek,)))
    t.expect(da2 == db2 == dc2, "after rotation sessions A, B and a new session C use different data keys: "
                                "versions %d/%d/%d" % (da2[0], db2[0], dc2[0]))
    for v in (va1, vb1, vb2):
        t.expect(q1(setup, "SELECT dec_text(%s::enc_bytea)", (v,)) == "rotate-me", "a value does not decrypt")


@test
def ttl_expiry_and_sweeper(t):
    setup = t.session()
    tab = new_table(setup, "ttl")
    run(setup, "INSERT INTO %s (p, v) VALUES ('ttl', enc('ttl'))" % tab)
    a = t.session()                                  # exists before the reload
    alter_system({"envelope.cache_ttl": 2}, conns=(a,))
    sql = "SELECT dec_text(v) FROM %s" % tab
    run(a, "SELECT envelope.cache_flush()")
    s0 = cache_stats(a)
    k0 = kms_decrypts()
    t.require(q1(a, sql) == "ttl", "wrong plaintext")
    put = time.monotonic()
    t.require(q1(a, sql) == "ttl", "wrong plaintext")
    k1 = kms_decrypts()
    s1 = cache_stats(a)
    t.expect(k1 - k0 == 1, "two decrypts within the TTL made %d KMS requests, expected 1" % (k1 - k0))
    t.expect(stat(s1, "entries") == 1, "entries = %d, expected 1" % stat(s1, "entries"))
    # No traffic at all until the entry must have been swept (TTL 2 s + sweep about every second).
    time.sleep(max(0.0, 3.6 - (time.monotonic() - put)))
    s2 = cache_stats(t.session())
    t.expect(stat(s2, "entries") == 0, "entries = %d 3.6 s after the only entry was cached with cache_ttl = 2 "
                                       "and no traffic: the sweeper did not wipe it" % stat(s2, "entries"))
    t.expect(delta(s1, s2, "expirations") >= 1, "expirations grew by %d, expected >= 1"
             % delta(s1, s2, "expirations"))
    t.require(q1(a, sql) == "ttl", "wrong plaintext")
    k2 = kms_decrypts()
    t.expect(k2 - k1 == 1, "decrypt after expiry made %d KMS requests, expected 1" % (k2 - k1))
    t.expect(delta(s0, cache_stats(a), "misses") == 2, "misses grew by %d, expected 2 (cold, then expired)"
             % delta(s0, cache_stats(a), "misses"))
    restore_settings(["envelope.cache_ttl"])


# ---------------------------------------------------------------------------
# Backend-local copies (src/keylocal.c, docs/design.md "Backend-local copies")
# ---------------------------------------------------------------------------

COMMIT_LABEL = b"envelope v2 AES-256-GCM key commitment"   # docs/format.md, algorithm 2


def unwrap_independently(conn, value_text):
    """The 32-byte data key of a value, unwrapped by Vault Transit over HTTP (no envelope code),
    checked against the value's key commitment (algorithm 2: SHA-256(label || DEK))."""
    m = qrow(conn, "SELECT m->>'kek_key_ref', (m->>'kek_version')::int, m->>'wrapped_dek_b64', "
                   "(m->>'algorithm')::int, m->>'commitment_b64' FROM envelope.metadata(%s::enc_bytea) m",
             (value_text,))
    key_ref, version, wrapped_b64, algo, commit_b64 = m
    r = requests.post("%s/v1/transit/decrypt/%s" % (os.environ["VAULT_ADDR"], key_ref),
                      json={"ciphertext": "vault:v%d:%s" % (version, wrapped_b64)},
                      headers={"X-Vault-Token": os.environ["VAULT_TOKEN"]},
                      verify=os.environ["VAULT_CACERT"], timeout=10)
    if r.status_code != 200:
        raise Failure("the KMS did not unwrap the value's data key: %s %s" % (r.status_code, r.text[:200]))
    dek = base64.b64decode(r.json()["data"]["plaintext"])
    if len(dek) != 32:
        raise Failure("the KMS returned a %d-byte data key" % len(dek))
    if algo == 2 and hashlib.sha256(COMMIT_LABEL + dek).digest() != base64.b64decode(commit_b64):
        raise Failure("the independently unwrapped data key does not match the value's key commitment")
    return dek


def scan_memory(pid, needle, chunk=16 << 20):
    """Every occurrence of needle in the readable memory of process pid (/proc/PID/maps and
    /proc/PID/mem; needs root or the process's owner): a list of (maps line, address).
    Regions the kernel refuses to read ([vvar] and the like) are skipped."""
    with open("/proc/%d/maps" % pid) as f:
        maps = f.read().splitlines()
    hits = []
    keep = len(needle) - 1
    with open("/proc/%d/mem" % pid, "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if fields[1][0] != "r":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pos, tail = start, b""
            while pos < end:
                n = min(chunk, end - pos)
                try:
                    mem.seek(pos)
                    data = mem.read(n)
                except (OSError, OverflowError):
                    break
                if not data:
                    break
                buf = tail + data
                base = pos - len(tail)
                i = buf.find(needle)
                while i >= 0:
                    hits.append((line, base + i))
                    i = buf.find(needle, i + 1)
                tail = buf[-keep:] if keep else b""
                pos += len(data)
    return hits


def region_is_shared(maps_line):
    """True for a shared mapping (PostgreSQL's shared memory), from the 's' in its permissions."""
    return maps_line.split()[1][3] == "s"


def describe_hits(hits):
    out = []
    for line, addr in hits:
        start = int(line.split()[0].split("-")[0], 16)
        out.append("0x%x (offset 0x%x in %s region: %s)"
                   % (addr, addr - start, "shared" if region_is_shared(line) else "private", line.strip()))
    return "; ".join(out)


@test
def flush_reaches_open_session(t):
    """envelope.cache_flush() in one session drops the local copies of another, open session."""
    setup = t.session()
    kek = new_kek(setup)
    tab = new_table(setup, "lflush")
    run(setup, "INSERT INTO %s (p, v) VALUES ('lflush', enc('lflush', %%s))" % tab, (kek,))
    sql = "SELECT dec_text(v) FROM %s" % tab
    a, b = t.session(), t.session()
    run(a, "SELECT envelope.cache_flush(%s)", (kek,))
    k0 = kms_decrypts()
    t.require(q1(a, sql) == "lflush", "wrong plaintext")          # from the KMS (not kept locally)
    t.require(q1(a, sql) == "lflush", "wrong plaintext")          # fresh shared hit: a local copy
    k1 = kms_decrypts()
    t.require(q1(a, sql) == "lflush", "wrong plaintext")          # from the local copy
    k2 = kms_decrypts()
    t.expect(k1 - k0 == 1, "session A: a cold decrypt and a warm one made %d KMS unwraps, expected 1" % (k1 - k0))
    t.expect(k2 - k1 == 0, "session A: a decrypt with a warm key made %d KMS unwraps, expected 0" % (k2 - k1))

    t.require(q1(b, "SELECT envelope.cache_flush()") >= 1, "cache_flush() in session B removed no entry")
    t.require(q1(a, sql) == "lflush", "wrong plaintext after the flush")
    k3 = kms_decrypts()
    t.expect(k3 - k2 == 1, "session A's next statement after session B's cache_flush() made %d KMS unwraps, "
                           "expected exactly 1 (its local copy must be dropped)" % (k3 - k2))
    t.require(q1(a, sql) == "lflush", "wrong plaintext")
    k4 = kms_decrypts()
    t.expect(k4 - k3 == 0, "session A's statement after the re-unwrap made %d KMS unwraps, expected 0"
             % (k4 - k3))


@test
def flush_reaches_running_statement(t):
    """A cache_flush() reaches a statement that is still running (a DO block decrypting in a
    loop) within about a second: the local copy is checked against the flush generation on
    every use, not only at statement starts."""
    setup = t.session()
    kek = new_kek(setup)
    tab = new_table(setup, "lrun")
    run(setup, "INSERT INTO %s (p, v) VALUES ('lrun', enc('lrun', %%s))" % tab, (kek,))
    a, b = t.session(), t.session()
    t.require(q1(a, "SELECT dec_text(v) FROM %s" % tab) == "lrun", "wrong plaintext")
    t.require(q1(a, "SELECT dec_text(v) FROM %s" % tab) == "lrun", "wrong plaintext")  # local copy
    # 300 decrypts over about 3 s in one statement: far fewer than the 4,096 uses after which a
    # statement re-checks its copies anyway.
    block = ("DO $$ DECLARE x text; BEGIN FOR i IN 1..300 LOOP "
             "SELECT dec_text(v) INTO x FROM %s; IF x <> 'lrun' THEN RAISE 'wrong plaintext'; END IF; "
             "PERFORM pg_sleep(0.01); END LOOP; END $$" % tab)
    errors = []

    def loop():
        """Session A's long statement."""
        try:
            run(a, block)
        except Exception as e:          # reported below
            errors.append(e)

    k0 = kms_decrypts()
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    time.sleep(1.0)
    t.require(th.is_alive(), "the DO block ended before the flush: cannot test")
    flushed = q1(b, "SELECT envelope.cache_flush(%s)", (kek,))
    th.join(30)
    t.require(not th.is_alive() and not errors, "the DO block failed or hung: %s" % errors)
    unwraps = kms_decrypts() - k0
    t.note("cache_flush() removed %d entries while the DO block ran; the block made %d KMS unwraps"
           % (flushed, unwraps))
    t.expect(unwraps == 1, "the DO block made %d KMS unwraps across a cache_flush() in another session, "
                           "expected exactly 1 (its local copy dropped within the statement, then kept)"
             % unwraps)


@test
def ttl_reaches_open_session(t):
    """cache_ttl bounds local copies of a session that stays open: idle between transactions
    (timer and statement check) and inside one open transaction (statement check only)."""
    # envelope.cache_ttl's minimum is 0, but 0 disables the cache (no local copies at all):
    # 1 s is the smallest TTL under which keys are kept.
    ttl = 1
    setup = t.session()
    kek = new_kek(setup)
    tab = new_table(setup, "lttl")
    run(setup, "INSERT INTO %s (p, v) VALUES ('lttl', enc('lttl', %%s))" % tab, (kek,))
    sql = "SELECT dec_text(v) FROM %s" % tab
    a = t.session()
    alter_system({"envelope.cache_ttl": ttl}, conns=(a,))
    margin = 1.5                                      # the sweeper runs about once a second

    # Idle between statements (autocommit).
    run(a, "SELECT envelope.cache_flush(%s)", (kek,))
    k0 = kms_decrypts()
    t.require(q1(a, sql) == "lttl", "wrong plaintext")             # KMS; the shared entry is put now
    put = time.monotonic()
    t.require(q1(a, sql) == "lttl", "wrong plaintext")             # fresh shared hit: a local copy
    k1 = kms_decrypts()
    fast = time.monotonic() - put < 0.8 * ttl
    t.expect(k1 - k0 == 1 or not fast, "two decrypts within the TTL made %d KMS unwraps, expected 1" % (k1 - k0))
    time.sleep(max(0.0, ttl + margin - (time.monotonic() - put)))
    t.require(q1(a, sql) == "lttl", "wrong plaintext after the TTL")
    k2 = kms_decrypts()
    t.expect(k2 - k1 == 1, "session A (idle, autocommit): the first decrypt %.1f s after the key was cached with "
                           "cache_ttl = %d s made %d KMS unwraps, expected exactly 1"
             % (ttl + margin, ttl, k2 - k1))

    # Inside one transaction: the timer leaves copies to the next statement's check.
    run(a, "SELECT envelope.cache_flush(%s)", (kek,))
    run(a, "BEGIN")
    try:
        k3 = kms_decrypts()
        t.require(q1(a, sql) == "lttl", "wrong plaintext")
        put = time.monotonic()
        t.require(q1(a, sql) == "lttl", "wrong plaintext")         # a local copy, in this transaction
        k4 = kms_decrypts()
        fast = time.monotonic() - put < 0.8 * ttl
        t.expect(k4 - k3 == 1 or not fast, "in a transaction, two decrypts within the TTL made %d KMS unwraps, "
                                           "expected 1" % (k4 - k3))
        time.sleep(max(0.0, ttl + margin - (time.monotonic() - put)))
        t.require(q1(a, sql) == "lttl", "wrong plaintext after the TTL")
        k5 = kms_decrypts()
        t.expect(k5 - k4 == 1, "session A inside one transaction: the next statement %.1f s after the key was cached "
                               "with cache_ttl = %d s made %d KMS unwraps, expected exactly 1 (the statement check "
                               "must drop the expired local copy)" % (ttl + margin, ttl, k5 - k4))
    finally:
        run(a, "COMMIT")
    restore_settings(["envelope.cache_ttl"])


@test
def idle_backend_wipes_keys(t):
    """An idle backend (no transaction) holds no copy of an expired data key: its raw bytes (and
    so the first round key of its AES-256 schedule, which is the key itself) are nowhere in the
    backend's memory, private or shared, once the TTL and a sweep have passed."""
    ttl = 3                                           # room for the first scan (well under a second)
    setup = t.session()
    kek = new_kek(setup)
    tab = new_table(setup, "wipe")
    run(setup, "INSERT INTO %s (p, v) VALUES ('wipe-me', enc('wipe-me', %%s))" % tab, (kek,))
    value = q1(setup, "SELECT v::text FROM %s" % tab)
    # The insert left the key as the KEK's current data key (shared memory, mapped in every backend):
    # retire it and wipe its cache entry, so that only session A's use below can bring it back.
    run(setup, "SELECT envelope.cache_flush(%s)", (kek,))
    dek = unwrap_independently(setup, value)
    setup.close()
    t.conns.remove(setup)

    a = t.session()
    alter_system({"envelope.cache_ttl": ttl}, conns=(a,))
    pid = q1(a, "SELECT pg_backend_pid()")
    try:
        before = scan_memory(pid, dek)
    except PermissionError as e:
        raise Failure("cannot read backend %d's memory (run as root or as the cluster's owner): %s" % (pid, e))
    t.expect(not before, "session A's backend %d holds the data key before using it: %s"
             % (pid, describe_hits(before)))
    sql = "SELECT dec_text(v) FROM %s" % tab
    t.require(q1(a, sql) == "wipe-me", "wrong plaintext")          # cold: through the KMS
    put = time.monotonic()
    t.require(q1(a, sql) == "wipe-me", "wrong plaintext")          # fresh shared hit: a local copy
    t0 = time.monotonic()
    found = scan_memory(pid, dek)
    took = time.monotonic() - t0
    t.note("right after the decrypts (scan %.2f s): %d occurrence(s): %s" % (took, len(found), describe_hits(found)))
    t.require(time.monotonic() - put < ttl, "the first scan ended %.1f s after the key was cached, past the "
                                            "TTL of %d s: cannot show it present" % (time.monotonic() - put, ttl))
    t.require(found, "the data key is not found in session A's memory right after it decrypted with it: "
                     "the memory scan does not work")
    t.expect(any(not region_is_shared(l) for l, _ in found),
             "right after the decrypts the data key is only in shared memory, not in a private region of "
             "backend %d: no local copy was made, so this test cannot check the timer" % pid)
    t.expect(any(region_is_shared(l) for l, _ in found),
             "right after the decrypts the data key is not in shared memory (the shared cache entry)")
    # Between transactions the key exists only in the protected pages: OpenSSL's AES schedules
    # keyed during the statements (whose first round key is the key) were re-keyed with zeros at
    # their transaction's end, the KMS answer and the one-use copy of the cold decrypt were wiped.
    # So one private occurrence, the local copy; with the VAES implementation two, both in the
    # local copy's protected region: the key and its round keys (the first two are the key).
    private = [h for h in found if not region_is_shared(h[0])]
    impl = q1(a, "SHOW envelope.crypto_implementation")
    allowed = 2 if impl == "vaes-avx512" else 1
    t.expect(len(private) <= allowed and len({l for l, _ in private}) <= 1,
             "between transactions backend %d holds the data key %d times in private memory, expected "
             "at most %d, in one region (the local copy%s): %s"
             % (pid, len(private), allowed, " and its round keys" if allowed == 2 else "",
                describe_hits(private)))

    # An error in a transaction that uses no keys: PostgreSQL's error recovery cancels every
    # timeout, and the idle wipe must be set again.
    try:
        q1(a, "SELECT 1/0")
        t.expect(False, "SELECT 1/0 did not fail")
    except psycopg2.Error:
        pass

    # A stays connected, idle and outside a transaction.  Past the TTL the timer must have wiped the
    # local copy, and within about a second more the sweeper the shared entry.
    time.sleep(max(0.0, ttl + 1.5 - (time.monotonic() - put)))
    state = qrow(t.session(), "SELECT state FROM pg_stat_activity WHERE pid = %s",
                 (pid,))
    t.expect(state is not None and state[0] == "idle", "session A is %r, expected idle" % (state,))
    left = scan_memory(pid, dek)
    waited = time.monotonic() - put
    if left and all(region_is_shared(l) for l, _ in left):
        t.note("%.1f s after caching, still in the shared region only: %s; waiting 2 s more for the sweeper"
               % (waited, describe_hits(left)))
        time.sleep(2.0)
        left = scan_memory(pid, dek)
        waited = time.monotonic() - put
    private = [h for h in left if not region_is_shared(h[0])]
    shared = [h for h in left if region_is_shared(h[0])]
    t.expect(not private, "%.1f s after the key was cached with cache_ttl = %d s, idle backend %d still holds "
                          "it in private memory: %s" % (waited, ttl, pid, describe_hits(private)))
    t.expect(not shared, "%.1f s after the key was cached with cache_ttl = %d s, shared memory still holds it: %s"
             % (waited, ttl, describe_hits(shared)))
    if not left:
        t.note("%.1f s after caching (cache_ttl = %d s): the data key is nowhere in backend %d's memory"
               % (waited, ttl, pid))
    # The session still works: the key comes back through the KMS.
    k0 = kms_decrypts()
    t.expect(q1(a, sql) == "wipe-me", "session A does not decrypt after its copy was wiped")
    t.expect(kms_decrypts() - k0 == 1, "session A's decrypt after the wipe made %d KMS unwraps, expected 1"
             % (kms_decrypts() - k0))
    restore_settings(["envelope.cache_ttl"])


@test
def dek_max_uses_server_wide(t):
    """dek_max_uses holds across sessions that reserve uses locally: single-row and bulk writers."""
    max_uses, singles, per_session, bulk = 50, 3, 120, 200
    setup = t.session()
    tab = new_table(setup, "lres", "id bigserial PRIMARY KEY, sess text, p text, v enc_bytea")
    kek = new_kek(setup)
    writers = [t.session() for _ in range(singles)]
    bulker = t.session()
    # PGC_SUSET: ALTER SYSTEM so that every session, and the counter they share, use the same limit.
    alter_system({"envelope.dek_max_uses": max_uses}, conns=writers + [bulker])
    one = "INSERT INTO " + tab + " (sess, p, v) VALUES (%s, %s, enc(%s, %s))"
    many = ("INSERT INTO " + tab + " (sess, p, v) SELECT 'bulk', 'b' || g, enc('b' || g, %s) "
            "FROM generate_series(1, %s) g")
    barrier = threading.Barrier(singles + 1)
    midway = threading.Event()
    errors = []

    def writer(conn, sess):
        try:
            barrier.wait(10)
            for i in range(per_session):
                p = "%s-%d" % (sess, i)
                run(conn, one, (sess, p, p, kek))
                if i == per_session // 3:
                    midway.set()
        except Exception as e:
            errors.append("%s: %s" % (sess, e))
            midway.set()

    def bulk_writer():
        try:
            barrier.wait(10)
            midway.wait(30)                            # while the single-row writers are busy
            run(bulker, many, (kek, bulk))
        except Exception as e:
            errors.append("bulk: %s" % e)

    threads = [threading.Thread(target=writer, args=(c, "S%d" % i), daemon=True) for i, c in enumerate(writers)]
    threads.append(threading.Thread(target=bulk_writer, daemon=True))
    g0 = kms_generations()
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    generated = kms_generations() - g0
    t.require(not errors, "inserts failed: %s" % errors)
    t.require(not any(th.is_alive() for th in threads), "the writers did not finish within 120 s")
    rows = qall(setup, "SELECT w, count(*), count(DISTINCT sess) FROM (SELECT envelope.metadata(v)->>"
                       "'wrapped_dek_b64' w, sess FROM " + tab + ") s GROUP BY w ORDER BY 2 DESC")
    total = sum(r[1] for r in rows)
    expected_total = singles * per_session + bulk
    t.require(total == expected_total, "%d rows inserted, expected %d" % (total, expected_total))
    most = rows[0][1]
    shared = sum(1 for r in rows if r[2] > 1)
    # Each data key hands out exactly dek_max_uses uses from its shared counter; a use is lost only
    # when it was reserved by a backend and never consumed.  A backend holds at most one
    # reservation per KEK (kept across statements until used up, expired or dropped), and a
    # reservation never exceeds the uses its key had left, so each writing session can strand at
    # most part of one key when it finishes (the bulk statement's last doubled batch, or whatever
    # is left when the session ends); allow one more key per session for rollover races (a session
    # finding the key exhausted while the next one is being generated).  Hence
    # ceil(total / max_uses) + 2 * sessions data keys at most.
    #
    # Keys are generated 4 per KMS request (one Transit encrypt with batch_input): the first
    # becomes current, the other three are promoted without a KMS call when it runs out.  A
    # promoted key always encrypts at least the value it was promoted for, so of the keys this
    # run generated only the spares still waiting at its end (at most 3) encrypted nothing:
    # ceil(keys / 4) requests, plus GENERATION_RACE_ALLOWANCE for a batch fetched by a backend
    # that found the generator's mark abandoned (whose replaced spares are wiped unused).  And at
    # least ceil(keys / 4), since a request makes at most 4 keys.
    sessions = singles + 1
    bound = -(-total // max_uses) + 2 * sessions
    keys = len(rows)
    gen_bound = generations_for(keys) + GENERATION_RACE_ALLOWANCE
    t.note("%d values (%d sessions x %d single-row INSERTs + one INSERT ... SELECT of %d), dek_max_uses = %d: "
           "%d data keys used (%d shared by sessions; bound %d), at most %d values per key, %d KMS generation "
           "requests (bound %d); values per key: %s"
           % (total, singles, per_session, bulk, max_uses, keys, shared, bound, most, generated, gen_bound,
              [r[1] for r in rows]))
    t.expect(most <= max_uses, "a data key encrypted %d values, more than dek_max_uses = %d" % (most, max_uses))
    t.expect(keys <= bound, "%d data keys for %d values with dek_max_uses = %d, more than "
                            "ceil(%d/%d) + 2 x %d sessions = %d"
             % (keys, total, max_uses, total, max_uses, sessions, bound))
    t.expect(generated <= gen_bound, "%d KMS generation requests (encrypt + datakey) for %d data keys, more than "
                                     "ceil(%d/4) + %d = %d"
             % (generated, keys, keys, GENERATION_RACE_ALLOWANCE, gen_bound))
    t.expect(keys <= KEYS_PER_GENERATION * generated,
             "%d data keys in use but only %d KMS generation requests (at most 4 keys each)" % (keys, generated))
    bad = q1(setup, "SELECT count(*) FILTER (WHERE dec_text(v) IS DISTINCT FROM p) FROM " + tab)
    t.expect(bad == 0, "%d values do not decrypt to their plaintext" % bad)
    restore_settings(["envelope.dek_max_uses"])


@test
def reservation_no_waste_single_rows(t):
    """A one-row INSERT reserves one use: dek_max_uses = 10, 30 one-row statements -> 3 data keys."""
    setup = t.session()
    tab = new_table(setup, "lwaste", "id bigserial PRIMARY KEY, part text, sess text, v enc_bytea")
    a, b = t.session(), t.session()
    alter_system({"envelope.dek_max_uses": 10}, conns=(a, b))
    one = "INSERT INTO " + tab + " (part, sess, v) VALUES (%s, %s, enc('w', %s))"
    per_key = ("SELECT count(*) FROM " + tab + " WHERE part = %s "
               "GROUP BY envelope.metadata(v)->>'wrapped_dek_b64' ORDER BY min(id)")

    def check(part, label, statements):
        """Run statements() under a fresh KEK: 3 keys of 10 values, 1 generation, 1 verification."""
        kek = new_kek(setup)
        g0, v0 = kms_generations(), kms_decrypts()
        statements(kek)
        generated, verified = kms_generations() - g0, kms_decrypts() - v0
        counts = [r[0] for r in qall(setup, per_key, (part,))]
        t.expect(counts == [10, 10, 10], "%s, dek_max_uses = 10: values per data key %s, expected [10, 10, 10]"
                 % (label, counts))
        t.expect(generated == 1, "%s, dek_max_uses = 10 (3 data keys): %d KMS generation requests "
                                 "(encrypt + datakey), expected 1 (4 keys per request)" % (label, generated))
        t.expect(verified == 1, "%s, dek_max_uses = 10: %d KMS decrypt requests, expected 1 "
                                "(the verification of the one batch)" % (label, verified))

    def one_session(kek):
        """30 one-row statements in one session."""
        for _ in range(30):
            run(a, one, ("one", "A", kek))

    def two_sessions(kek):
        """Two sessions taking turns, 15 one-row statements each."""
        for _ in range(15):
            run(a, one, ("two", "A", kek))
            run(b, one, ("two", "B", kek))

    # One session: 3 data keys, all from one generation request (4 keys wrapped in one Transit
    # encrypt call, verified by one decrypt call; the 4th key stays a spare).
    check("one", "one session, 30 one-row INSERTs", one_session)
    # Two sessions taking turns: a reservation of more than one use per statement would leave
    # the other session short and cost a fourth key (a spare would provide it without a KMS
    # call, so the values per key show it).
    check("two", "two sessions alternating 15 one-row INSERTs each", two_sessions)
    restore_settings(["envelope.dek_max_uses"])


@test
def spare_keys_after_flush(t):
    """Batched generation: one KMS request makes 4 data keys; the 3 spares become current without a
    KMS call, and cache_flush(), rotate_kek() and dek_max_age keep them from being used."""
    setup = t.session()
    tab = new_table(setup, "spare", "id bigserial PRIMARY KEY, part text, v enc_bytea")
    a, b = t.session(), t.session()
    alter_system({"envelope.dek_max_uses": 10}, conns=(a, b))
    kek = new_kek(setup)
    one = "INSERT INTO " + tab + " (part, v) VALUES (%s, enc('s', %s)) RETURNING v::text"
    per_key = ("SELECT count(*) FROM " + tab + " WHERE part = %s "
               "GROUP BY envelope.metadata(v)->>'wrapped_dek_b64' ORDER BY min(id)")

    def insert(part, n=1):
        """n one-row INSERTs in session A; the last value's (kek_version, wrapped_dek_b64)."""
        for _ in range(n):
            v = q1(a, one, (part, kek))
        return dek_of(setup, v)

    # 40 one-row values: 4 data keys, one generation request, one verification decrypt.
    r0, s0 = kms_requests(), cache_stats(setup)
    last = insert("batch", 40)
    r1, s1 = kms_requests(), cache_stats(setup)
    counts = [r[0] for r in qall(setup, per_key, ("batch",))]
    gen = kms_generations(r1) - kms_generations(r0)
    t.note("40 one-row values, dek_max_uses = 10: values per key %s; KMS encrypt +%d, datakey +%d, decrypt +%d; "
           "cache_stats kms_generate +%d, kms_unwrap +%d"
           % (counts, r1["encrypt"] - r0["encrypt"], r1["datakey"] - r0["datakey"], r1["decrypt"] - r0["decrypt"],
              delta(s0, s1, "kms_generate"), delta(s0, s1, "kms_unwrap")))
    t.expect(counts == [10, 10, 10, 10], "40 one-row INSERTs, dek_max_uses = 10: values per data key %s, expected "
                                         "[10, 10, 10, 10]" % counts)
    t.expect(gen == 1, "40 one-row INSERTs, dek_max_uses = 10 (4 data keys): %d KMS generation requests "
                       "(encrypt + datakey), expected exactly 1" % gen)
    t.expect(r1["datakey"] - r0["datakey"] == 0, "%d datakey requests: the keys were not generated in a batch "
                                                 "(encrypt with batch_input)" % (r1["datakey"] - r0["datakey"]))
    t.expect(r1["decrypt"] - r0["decrypt"] == 1, "40 one-row INSERTs (4 data keys): %d KMS decrypt requests, "
                                                 "expected 1 (one batched verification)" % (r1["decrypt"] - r0["decrypt"]))
    t.expect(delta(s0, s1, "kms_generate") == 1 and delta(s0, s1, "kms_unwrap") == 1,
             "cache_stats(): kms_generate +%d, kms_unwrap +%d for one batch, expected +1 and +1"
             % (delta(s0, s1, "kms_generate"), delta(s0, s1, "kms_unwrap")))
    t.require(q1(setup, "SELECT count(*) FILTER (WHERE dec_text(v) = 's') FROM " + tab) == 40,
              "not all 40 values decrypt")

    # The batch is used up: the 41st value needs a new batch (key 5, spares 6..8), and 10 more
    # values move to key 6 (a spare) with no KMS call.
    g0 = kms_generations()
    k5 = insert("flush")
    g1 = kms_generations()
    t.expect(g1 - g0 == 1, "the 41st value (the batch's 4 keys used up) made %d KMS generation requests, expected 1"
             % (g1 - g0))
    t.expect(k5 != last, "the 41st value used the 4th key, which had encrypted 10 values")
    k6 = insert("flush", 10)
    g2 = kms_generations()
    t.expect(k6 != k5 and g2 - g1 == 0, "values 42..51 (key 5 used up after 10): %s, %d KMS generation requests; "
                                        "expected a spare key and no KMS request"
             % ("a new key" if k6 != k5 else "still key 5", g2 - g1))

    # cache_flush() wipes the current key and the two spares left: the next enc() goes to the KMS.
    t.require(q1(b, "SELECT envelope.cache_flush()") >= 0, "cache_flush() failed")
    g3 = kms_generations()
    k7 = insert("flush")
    g4 = kms_generations()
    t.expect(g4 - g3 == 1, "the first enc() after cache_flush() (in another session), with two spare keys left "
                           "before it, made %d KMS generation requests, expected 1 (spares must be wiped)" % (g4 - g3))
    t.expect(k7 not in (k5, k6), "the first enc() after cache_flush() used a data key from before the flush")
    k8 = insert("flush")
    t.expect(k8 == k7 and kms_generations() == g4,
             "the enc() after that: %s, %d more KMS generation requests; expected the same key, no request"
             % ("same key" if k8 == k7 else "another key", kms_generations() - g4))

    # rotate_kek() (in another session) while the KEK has spares at version 1: the next enc() uses
    # version 2, and no version-1 spare is ever promoted.
    t.require(k7[0] == 1, "KEK version before rotation is %d, expected 1" % k7[0])
    t.require(q1(b, "SELECT envelope.rotate_kek(%s)", (kek,)) == 2, "rotate_kek() did not return 2")
    g5 = kms_generations()
    k9 = insert("rotate")
    g6 = kms_generations()
    t.expect(k9[0] == 2, "the first enc() after rotate_kek() (spare keys at version 1 existed) used KEK version %d, "
                         "expected 2" % k9[0])
    t.expect(k9[1] not in (k7[1], k8[1]), "the first enc() after rotate_kek() used the retired data key")
    t.expect(g6 - g5 == 1, "the first enc() after rotate_kek() made %d KMS generation requests, expected 1 (a batch "
                           "under version 2)" % (g6 - g5))
    insert("rotate", 24)                            # 25 values: keys 1..3 of the version-2 batch
    versions = qall(setup, "SELECT (envelope.metadata(v)->>'kek_version')::int, count(*), "
                           "count(DISTINCT envelope.metadata(v)->>'wrapped_dek_b64') FROM " + tab +
                    " WHERE part = 'rotate' GROUP BY 1 ORDER BY 1")
    t.expect(versions == [(2, 25, 3)], "25 values after rotate_kek(), dek_max_uses = 10: (kek_version, values, data "
                                       "keys) %s, expected [(2, 25, 3)]" % versions)
    t.expect(kms_generations() - g5 == 1, "25 values after rotate_kek() made %d KMS generation requests, expected 1"
             % (kms_generations() - g5))

    # dek_max_age: spares are as old as their batch; past the age limit none is promoted.
    alter_system({"envelope.dek_max_age": 2}, conns=(a, b))
    kek = new_kek(setup)
    g7 = kms_generations()
    k10 = insert("age")
    born = time.monotonic()
    g8 = kms_generations()
    t.expect(g8 - g7 == 1, "first enc() under a new KEK made %d KMS generation requests, expected 1" % (g8 - g7))
    time.sleep(max(0.0, 2.3 - (time.monotonic() - born)))
    k11 = insert("age")
    g9 = kms_generations()
    t.expect(k11 != k10, "dek_max_age = 2 s: 2.3 s later the same data key encrypted again")
    t.expect(g9 - g8 == 1, "dek_max_age = 2 s: the enc() 2.3 s after a batch was generated made %d KMS generation "
                           "requests, expected 1 (its spares are too old to be promoted)" % (g9 - g8))
    bad = q1(setup, "SELECT count(*) FILTER (WHERE dec_text(v) IS DISTINCT FROM 's') FROM " + tab)
    t.expect(bad == 0, "%d values do not decrypt" % bad)
    restore_settings(["envelope.dek_max_uses", "envelope.dek_max_age"])


@test
def kms_retries(t):
    setup = t.session()
    tab = new_table(setup, "retry")
    run(setup, "INSERT INTO %s (p, v) VALUES ('retry', enc('retry'))" % tab)
    sql = "SELECT dec_text(v) FROM %s" % tab
    a = t.session()
    t.expect(setting(a, "envelope.kms_retries") == "2", "envelope.kms_retries is %r, expected the default 2"
             % setting(a, "envelope.kms_retries"))

    # Two 503s, then success: 2 retries, 3 requests.
    run(a, "SELECT envelope.cache_flush()")
    s0, k0 = cache_stats(a), kms_decrypts()
    set_fault("503", 2)
    try:
        got = q1(a, sql)
    except psycopg2.Error as e:
        got = None
        t.expect(False, "fault 503 x 2 with kms_retries = 2: dec failed: %s" % describe(e))
    set_fault("none")
    s1, k1 = cache_stats(a), kms_decrypts()
    t.expect(got in (None, "retry"), "wrong plaintext")
    t.expect(delta(s0, s1, "kms_retries") == 2, "fault 503 x 2: cache_stats().kms_retries grew by %d, "
                                                "expected 2" % delta(s0, s1, "kms_retries"))
    t.expect(k1 - k0 == 3, "fault 503 x 2: the KMS got %d decrypt requests, expected 3" % (k1 - k0))

    # 429 is retried too.
    run(a, "SELECT envelope.cache_flush()")
    s0, k0 = cache_stats(a), kms_decrypts()
    set_fault("429", 1)
    err, el = t.failing(a, sql)
    set_fault("none")
    s1, k1 = cache_stats(a), kms_decrypts()
    t.expect(err is None, "fault 429 x 1 with kms_retries = 2: dec failed: %s" % describe(err))
    t.expect(k1 - k0 == 2 and delta(s0, s1, "kms_retries") == 1,
             "fault 429 x 1: %d KMS requests and %d retries, expected 2 and 1"
             % (k1 - k0, delta(s0, s1, "kms_retries")))

    # A refused connection is retried: the KMS comes back 0.2 s into the statement.
    alter_system({"envelope.kms_retries": 10}, conns=(a,))
    run(a, "SELECT envelope.cache_flush()")
    s0 = cache_stats(a)
    set_fault("refuse")
    timer = threading.Timer(0.2, set_fault, ("none",))
    timer.start()
    err, el = t.failing(a, sql)
    timer.join()
    s1 = cache_stats(a)
    t.expect(err is None, "KMS refusing connections for 0.2 s with kms_retries = 10: dec failed after %.2f s: %s"
             % (el, describe(err)))
    t.expect(delta(s0, s1, "kms_retries") >= 1, "refused connection: kms_retries grew by %d, expected >= 1"
             % delta(s0, s1, "kms_retries"))

    # statement_timeout bounds the retries.
    run(a, "SELECT envelope.cache_flush()")
    run(a, "SET statement_timeout = '1s'")
    set_fault("503")
    err, el = t.failing(a, sql)
    set_fault("none")
    run(a, "SET statement_timeout = %s", (SAFETY_TIMEOUT,))
    t.expect(err is not None and err.pgcode in ("57014", "08006"),
             "fault 503 with kms_retries = 10 and statement_timeout = 1s: %s, expected 57014 or 08006"
             % describe(err))
    t.expect(el < 1.6, "fault 503 with kms_retries = 10 and statement_timeout = 1s: failed after %.2f s, "
                       "expected ~1.5 s at most" % el)
    t.note("503 with statement_timeout = 1s: %s after %.2f s" % (err.pgcode if err else "ok", el))

    # kms_retries = 0: the first 503 is final.
    alter_system({"envelope.kms_retries": 0}, conns=(a,))
    run(a, "SELECT envelope.cache_flush()")
    k0 = kms_decrypts()
    set_fault("503", 2)
    err, el = t.failing(a, sql)
    set_fault("none")
    k1 = kms_decrypts()
    t.expect(err is not None and err.pgcode == "08006", "fault 503 x 2 with kms_retries = 0: %s, expected 08006"
             % describe(err))
    t.expect(k1 - k0 == 1, "kms_retries = 0: the KMS got %d decrypt requests, expected 1" % (k1 - k0))
    t.expect(q1(a, sql) == "retry", "the session does not decrypt after the fault is cleared")
    restore_settings(["envelope.kms_retries"])


@test
def outage_grace(t):
    setup = t.session()
    kek = new_kek(setup)
    tab = new_table(setup, "grace")
    run(setup, "INSERT INTO %s (p, v) SELECT 'grace-' || g, enc('grace-' || g, %%s) "
               "FROM generate_series(1, 50) g" % tab, (kek,))
    t.require(q1(setup, "SELECT count(DISTINCT envelope.metadata(v)->>'wrapped_dek_b64') FROM %s" % tab) == 1,
              "the 50 values do not share one data key")
    one_sql = "SELECT dec_text(v) FROM %s WHERE p = 'grace-1'" % tab
    all_sql = "SELECT count(*) FILTER (WHERE dec_text(v) = p) FROM %s" % tab
    a = t.session()
    alter_system({"envelope.cache_ttl": 2, "envelope.kms_outage_grace": 0}, conns=(a,))

    def warm_then_expire(wait):
        set_fault("none")
        run(a, "SELECT envelope.cache_flush()")
        t.require(q1(a, one_sql) == "grace-1", "wrong plaintext while warming the cache")
        time.sleep(wait)

    # grace = 0: an expired key is never used; the KMS is down: fail closed.
    warm_then_expire(3.0)
    set_fault("refuse")
    err, el = t.failing(a, one_sql)
    set_fault("none")
    t.note("grace = 0, refused: %s after %.2f s" % (err.pgcode if err else "success", el))
    t.expect(err is not None and err.pgcode == "08001",
             "grace = 0, key expired, KMS refusing: %s, expected 08001" % describe(err))

    # grace = 60: the expired key is used while the KMS is unreachable, logged once per statement.
    alter_system({"envelope.kms_outage_grace": 60}, conns=(a,))
    warm_then_expire(3.0)
    set_fault("refuse")
    s0 = cache_stats(a)
    # Two statements, each decrypting 50 rows that share the expired key: one log message each.
    for attempt in (1, 2):
        off = log_size()
        st = time.monotonic()
        sb = cache_stats(a)
        try:
            ok = q1(a, all_sql)
            sa = cache_stats(a)
            t.note("grace = 60, refused, statement %d (50 rows, one data key): %.2f s, stale_uses +%d, "
                   "kms_retries +%d, kms_errors +%d" % (attempt, time.monotonic() - st, delta(sb, sa, "stale_uses"),
                                                         delta(sb, sa, "kms_retries"), delta(sb, sa, "kms_errors")))
        except psycopg2.Error as e:
            t.expect(False, "grace = 60, key expired, KMS refusing: statement %d failed: %s, expected all 50 "
                            "rows to decrypt from the stale key" % (attempt, describe(e)))
            break
        time.sleep(0.3)
        lines = stale_log_entries(off)
        t.expect(ok == 50, "stale key: %d of 50 rows decrypt correctly" % ok)
        t.expect(len(lines) == 1, "statement %d decrypting 50 rows with a stale key wrote %d log messages "
                                  "containing \"expired\" and \"KMS\", expected exactly 1: %s"
                 % (attempt, len(lines), [x[1][:200] for x in lines[:3]]))
    set_fault("none")
    s1 = cache_stats(a)
    t.expect(delta(s0, s1, "stale_uses") > 0, "stale_uses grew by %d while decrypting with an expired key"
             % delta(s0, s1, "stale_uses"))

    # grace = 60 but the KMS denies access (not an outage): no stale keys.
    warm_then_expire(3.0)
    set_fault("badtoken")
    s0 = cache_stats(a)
    err, el = t.failing(a, one_sql)
    set_fault("none")
    t.note("grace = 60, badtoken: %s after %.2f s" % (err.pgcode if err else "success", el))
    t.expect(err is not None and err.pgcode == "28000",
             "grace = 60, key expired, KMS answers 403: %s, expected 28000" % describe(err))
    t.expect(delta(s0, cache_stats(a), "stale_uses") == 0, "a stale key was used although the KMS denied access")

    # Past the grace window: fail closed again.
    alter_system({"envelope.kms_outage_grace": 2}, conns=(a,))
    warm_then_expire(5.0)
    set_fault("refuse")
    err, el = t.failing(a, one_sql)
    set_fault("none")
    t.note("grace = 2, past the window, refused: %s after %.2f s" % (err.pgcode if err else "success", el))
    t.expect(err is not None and err.pgcode == "08001",
             "grace = 2, key expired 3 s ago (ttl + grace passed), KMS refusing: %s, expected 08001"
             % describe(err))
    restore_settings(["envelope.cache_ttl", "envelope.kms_outage_grace"])


@test
def cancel_hanging_kms(t):
    setup = t.session()
    tab = new_table(setup, "cancel")
    run(setup, "INSERT INTO %s (p, v) VALUES ('cancel', enc('cancel'))" % tab)
    a, b = t.session(), t.session()
    pid = q1(a, "SELECT pg_backend_pid()")
    run(a, "SELECT envelope.cache_flush()")
    k0 = kms_decrypts()
    set_fault("hang")
    out = {}

    def query():
        try:
            out["rows"] = qall(a, "SELECT dec_text(v) FROM %s" % tab)
        except psycopg2.Error as e:
            out["error"] = e
        out["end"] = time.monotonic()

    th = threading.Thread(target=query, daemon=True)
    th.start()
    time.sleep(0.5)
    t.expect(kms_decrypts() > k0, "the decrypt request had not reached the KMS after 0.5 s")
    t.require(th.is_alive(), "the query ended although the KMS hangs: %r" % out)
    start = time.monotonic()
    t.require(q1(b, "SELECT pg_cancel_backend(%s)", (pid,)), "pg_cancel_backend() returned false")
    th.join(5)
    set_fault("none")
    t.require(not th.is_alive(), "pg_cancel_backend() did not end the hung KMS call within 5 s")
    el = out["end"] - start
    t.expect("rows" not in out, "the cancelled query returned rows")
    t.expect(out.get("error") is not None and out["error"].pgcode == "57014",
             "cancelled query: %s, expected 57014" % describe(out.get("error")))
    t.expect(el < 1.0, "the cancel took %.2f s, expected < 1 s" % el)
    t.expect(q1(a, "SELECT dec_text(v) FROM %s" % tab) == "cancel", "the session does not decrypt after cancel")


@test
def parallel_scan(t):
    rows = int(os.environ.get("ENVELOPE_TEST_PARALLEL_ROWS", "1000000"))
    c = t.session(statement_timeout="120s")
    tab = new_table(c, "par", "id int, v enc_bytea", unlogged=True)
    run(c, "SET envelope.dek_max_uses = 100000")
    t0 = time.monotonic()
    run(c, "INSERT INTO %s SELECT g, enc('row-' || g) FROM generate_series(1, %d) g" % (tab, rows))
    run(c, "ANALYZE %s" % tab)
    t1 = time.monotonic()
    for s in ("max_parallel_workers_per_gather = 4", "parallel_setup_cost = 0", "parallel_tuple_cost = 0",
              "min_parallel_table_scan_size = 0"):
        run(c, "SET " + s)
    k = q1(c, "SELECT count(*) FROM (SELECT envelope.metadata(v)->>'wrapped_dek_b64' FROM %s GROUP BY 1) s"
           % tab)
    t2 = time.monotonic()
    t.note("%d rows in %.1f s, %d data keys (counted in %.1f s)" % (rows, t1 - t0, k, t2 - t1))
    query = "SELECT count(*) FILTER (WHERE dec_text(v) = 'row-' || id) FROM %s" % tab

    plan = "\n".join(r[0] for r in qall(c, "EXPLAIN " + query))
    t.expect("Parallel Seq Scan" in plan, "no Parallel Seq Scan in the plan:\n" + plan)
    run(c, "SELECT envelope.cache_flush()")
    k0 = kms_decrypts()
    launched = []
    try:
        plan = "\n".join(r[0] for r in qall(c, "EXPLAIN (ANALYZE) " + query))
    except psycopg2.Error as e:
        t.expect(False, "EXPLAIN (ANALYZE) %s failed: %s, context %r" % (query, describe(e), e.diag.context))
    else:
        k1 = kms_decrypts()
        launched = [int(x) for x in re.findall(r"Workers Launched: (\d+)", plan)]
        t.expect("Parallel Seq Scan" in plan, "no Parallel Seq Scan in the EXPLAIN ANALYZE plan:\n" + plan)
        t.expect(launched and launched[0] >= 1, "no parallel worker launched:\n" + plan)
        t.expect(k1 - k0 == k, "EXPLAIN ANALYZE with %s worker(s): %d KMS decrypt requests for %d data keys, "
                               "expected exactly %d" % (launched[0] if launched else "no", k1 - k0, k, k))

    run(c, "SELECT envelope.cache_flush()")
    k0 = kms_decrypts()
    t3 = time.monotonic()
    try:
        ok = q1(c, query)
    except psycopg2.Error as e:
        raise Failure("%s failed: %s, context %r" % (query, describe(e), e.diag.context))
    t4 = time.monotonic()
    k1 = kms_decrypts()
    t.note("parallel decrypt of %d rows in %.1f s, %s worker(s) launched" % (rows, t4 - t3, launched))
    t.expect(ok == rows, "%d of %d rows decrypted correctly" % (ok, rows))
    t.expect(k1 - k0 == k, "parallel count: %d KMS decrypt requests for %d data keys, expected exactly %d"
             % (k1 - k0, k, k))
    run(c, "DROP TABLE %s" % tab)


@test
def cache_size_lru_eviction(t):
    t.cleanups.append(lambda: restore_settings(["envelope.cache_size"]))
    alter_system({"envelope.cache_size": 16})
    restart_cluster()
    a = t.session()
    t.require(setting(a, "envelope.cache_size") == "16", "envelope.cache_size is %r after the restart"
              % setting(a, "envelope.cache_size"))
    cap = stat(cache_stats(a), "capacity")
    t.expect(cap == 16, "capacity = %r with cache_size = 16" % cap)
    kek = new_kek(a)
    tab = new_table(a, "lru", "id int PRIMARY KEY, p text, v enc_bytea")
    run(a, "SET envelope.dek_max_uses = 1")
    run(a, "INSERT INTO %s SELECT g, 'lru-' || g, enc('lru-' || g, %%s) FROM generate_series(0, 39) g" % tab,
        (kek,))
    run(a, "RESET envelope.dek_max_uses")
    n = q1(a, "SELECT count(DISTINCT envelope.metadata(v)->>'wrapped_dek_b64') FROM %s" % tab)
    t.require(n == 40, "dek_max_uses = 1 gave %d data keys for 40 values" % n)
    s = cache_stats(a)
    t.expect(stat(s, "entries") <= cap, "entries = %d > capacity %d after 40 new data keys" % (s["entries"], cap))

    all_sql = "SELECT count(*) FILTER (WHERE dec_text(v) = p) FROM %s" % tab
    run(a, "SELECT envelope.cache_flush()")
    s0, k0 = cache_stats(a), kms_decrypts()
    t.expect(q1(a, all_sql) == 40, "not all 40 values decrypt with cache_size = 16")
    s1, k1 = cache_stats(a), kms_decrypts()
    t.expect(stat(s1, "entries") <= cap, "entries = %d > capacity %d" % (s1["entries"], cap))
    t.expect(delta(s0, s1, "evictions") > 0, "40 data keys through a cache of 16: evictions grew by %d"
             % delta(s0, s1, "evictions"))
    t.expect(k1 - k0 == 40, "first pass: %d KMS decrypt requests for 40 data keys, expected 40" % (k1 - k0))
    b = t.session()
    t.expect(q1(b, all_sql) == 40, "second pass: not all 40 values decrypt")
    s2, k2 = cache_stats(b), kms_decrypts()
    t.expect(k2 - k1 >= 24, "second pass: %d KMS requests; at most 16 of 40 keys can be cached, expected >= 24"
             % (k2 - k1))
    t.expect(stat(s2, "entries") <= cap, "entries = %d > capacity %d" % (s2["entries"], cap))

    # Least recently used, not first in: a key used again survives the next insertion.
    run(a, "SELECT envelope.cache_flush()")
    one = "SELECT dec_text(v) FROM " + tab + " WHERE id = %s"
    for i in range(16):                             # fills the cache: keys 0..15
        q1(a, one, (i,))
    q1(a, one, (0,))                                # key 0 is now the most recently used
    q1(a, one, (16,))                               # evicts the least recently used: key 1
    k3 = kms_decrypts()
    q1(a, one, (0,))
    k4 = kms_decrypts()
    t.expect(k4 - k3 == 0, "LRU: the key used just before an eviction was evicted (%d KMS request)" % (k4 - k3))
    q1(a, one, (1,))
    k5 = kms_decrypts()
    t.expect(k5 - k4 == 1, "LRU: the least recently used key was not the one evicted (%d KMS requests)"
             % (k5 - k4))
    t.close()
    restored = restore_settings(["envelope.cache_size"])
    c = connect()
    try:
        t.expect(restored and setting(c, "envelope.cache_size") == "1024" and stat(cache_stats(c), "capacity") == 1024,
                 "after RESET and restart: cache_size %r, capacity %r"
                 % (setting(c, "envelope.cache_size"), cache_stats(c).get("capacity")))
    finally:
        c.close()


@test
def restart_empties_cache(t):
    a = t.session()
    tab = new_table(a, "restart")
    run(a, "INSERT INTO %s (p, v) VALUES ('restart', enc('restart'))" % tab)
    run(a, "SELECT envelope.cache_flush()")
    t.require(q1(a, "SELECT dec_text(v) FROM %s" % tab) == "restart", "wrong plaintext")
    s0 = cache_stats(a)
    t.expect(stat(s0, "entries") > 0, "entries = 0 after a decrypt")
    t.close()
    restart_cluster()
    b = t.session()
    s1 = cache_stats(b)
    t.expect(stat(s1, "entries") == 0, "entries = %d after a restart, expected 0" % s1["entries"])
    nonzero = {n: s1.get(n) for n in COUNTER_COLUMNS if s1.get(n) != 0}
    t.expect(not nonzero, "counters not reset by the restart: %s" % nonzero)
    t.expect(s1.get("last_kms_error") is None, "last_kms_error is %r after a restart" % s1.get("last_kms_error"))
    k0 = kms_decrypts()
    t.expect(q1(b, "SELECT dec_text(v) FROM %s" % tab) == "restart", "wrong plaintext after the restart")
    t.expect(kms_decrypts() - k0 == 1, "the first decrypt after a restart did not unwrap through the KMS")


@test
def not_preloaded_cluster(t):
    c = t.session()
    value = q1(c, "SELECT enc('not preloaded')::text")
    send = bytes(q1(c, "SELECT enc_bytea_send(%s::enc_bytea)", (value,)))
    latest = q1(c, "SELECT latest_version FROM envelope.kek WHERE name = 'pii'")
    tmp = tempfile.mkdtemp(prefix="envelope-nopreload-")
    data = os.path.join(tmp, "data")
    log = os.path.join(tmp, "log")
    port = free_port()
    os.chmod(tmp, 0o755)
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")

    def stop_and_remove():
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            subprocess.run(as_cluster_owner([PGBIN + "/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)

    t.cleanups.append(stop_and_remove)
    r = subprocess.run(as_cluster_owner([PGBIN + "/initdb", "-D", data, "-U", "postgres", "--auth=trust",
                                         "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    t.require(r.returncode == 0, "initdb failed: %s" % r.stdout[-500:])
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write("\nport = %d\nlisten_addresses = ''\nunix_socket_directories = '%s'\n"
                "shared_preload_libraries = ''\nfsync = off\nmax_connections = 10\n" % (port, tmp))
    r = subprocess.run(as_cluster_owner([PGBIN + "/pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start"]),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    t.require(r.returncode == 0, "the second cluster did not start: %s" % r.stdout[-500:])
    o = t.session(host=tmp, port=port, dbname="postgres")
    t.require(q1(o, "SHOW shared_preload_libraries") == "", "shared_preload_libraries is set")
    err, _ = t.failing(o, "CREATE EXTENSION envelope")
    t.require(err is None, "CREATE EXTENSION envelope without preloading failed: %s" % describe(err))
    # Register the KEK directly (create_kek would need the KMS), so that no "unknown KEK" error can
    # stand in for the missing preload.
    err, _ = t.failing(o, "INSERT INTO envelope.kek (name, provider, key_ref, latest_version) "
                          "VALUES ('pii', 'vault', 'pii', %s)", (latest,))
    if err is not None:
        t.note("could not register KEK pii by INSERT: %s" % describe(err))
    for sql, args in (("SELECT enc('x', 'pii')", None),
                      ("SELECT dec_text(%s::enc_bytea)", (value,)),
                      ("SELECT * FROM envelope.cache_stats()", None)):
        err, _ = t.failing(o, sql, args)
        shown = sql.replace("%s", "'enc:...'")
        if not t.expect(err is not None, "%s succeeded without shared_preload_libraries" % shown):
            continue
        t.note("%s: %s" % (shown, describe(err)))
        t.expect(err.pgcode == "55000", "%s: %s, expected 55000" % (shown, describe(err)))
        text = (err.diag.message_primary or "") + " " + (err.diag.message_hint or "")
        t.expect("shared_preload_libraries" in text,
                 "%s: the error does not mention shared_preload_libraries in its message or hint: %s"
                 % (shown, describe(err)))
    # The type's I/O works without the library preloaded (dump/restore).
    err, _ = t.failing(o, "CREATE TABLE io_t (v enc_bytea)")
    t.require(err is None, "CREATE TABLE with enc_bytea failed: %s" % describe(err))
    err, _ = t.failing(o, "INSERT INTO io_t VALUES (%s::enc_bytea)", (value,))
    t.expect(err is None, "text input of a valid enc_bytea failed: %s" % describe(err))
    if err is None:
        t.expect(q1(o, "SELECT v::text FROM io_t") == value, "text output differs from the input")
        t.expect(bytes(q1(o, "SELECT enc_bytea_send(v) FROM io_t")) == send,
                 "binary output differs from the preloaded cluster's")
        buf = __import__("io").BytesIO()
        with o.cursor() as cur:
            cur.copy_expert("COPY io_t TO STDOUT (FORMAT binary)", buf)
            buf.seek(0)
            cur.copy_expert("COPY io_t FROM STDIN (FORMAT binary)", buf)
        t.expect(q1(o, "SELECT count(DISTINCT v::text) FROM io_t") == 1 and q1(o, "SELECT count(*) FROM io_t") == 2,
                 "binary COPY round trip changed the value")
    o.close()
    t.conns.remove(o)


@test
def pgbench_mixed_load(t):
    n = 10000
    c = t.session(statement_timeout="120s")
    tab = new_table(c, "bench", "id bigserial PRIMARY KEY, v enc_bytea")
    alter_system({"envelope.dek_max_uses": 1000})
    run(c, "INSERT INTO %s (v) SELECT enc('bench-' || g) FROM generate_series(1, %d) g" % (tab, n))
    run(c, "VACUUM ANALYZE %s" % tab)
    s0, k0 = cache_stats(c), admin("GET", "/stats")["requests"]
    tmp = tempfile.mkdtemp(prefix="envelope-pgbench-")
    t.cleanups.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    script = os.path.join(tmp, "mixed.sql")
    with open(script, "w") as f:
        f.write("\\set id random(1, %d)\n"
                "INSERT INTO %s (v) VALUES (enc(:payload));\n"
                "SELECT dec_text(v) FROM %s WHERE id = :id;\n" % (n, tab, tab))
    cmd = [PGBIN + "/pgbench", "-n", "-c", "8", "-j", "8", "-T", "30", "-f", script,
           "-D", "payload='pgbench payload 4111-1111-1111-1111'", os.environ["PGDATABASE"]]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    out = r.stdout
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    t.expect(r.returncode == 0, "pgbench exited with %d:\n%s" % (r.returncode, out[-1500:]))
    t.expect(failed is None or int(failed.group(1)) == 0,
             "pgbench reported %s failed transactions" % (failed.group(1) if failed else "?"))
    t.expect(tps is not None and float(tps.group(1)) > 0, "pgbench reported no positive tps:\n" + out[-1500:])
    s1, k1 = cache_stats(c), admin("GET", "/stats")["requests"]
    rows = qall(c, "SELECT w, count(*) FROM (SELECT envelope.metadata(v)->>'wrapped_dek_b64' w FROM %s "
                   "WHERE id > %d) s GROUP BY w" % (tab, n))
    inserted = sum(x[1] for x in rows)
    generated = kms_generations(k1) - kms_generations(k0)
    t.note("pgbench: %s tps, %d values inserted under %d data keys; KMS generation requests %d (encrypt %d, "
           "datakey %d), decrypt %d; hits %d, misses %d"
           % (tps.group(1) if tps else "?", inserted, len(rows), generated, k1["encrypt"] - k0["encrypt"],
              k1["datakey"] - k0["datakey"], k1["decrypt"] - k0["decrypt"], delta(s0, s1, "hits"),
              delta(s0, s1, "misses")))
    print("      pgbench tps = %s" % (tps.group(1) if tps else "?"))
    t.expect(inserted > 0 and len(rows) >= 2, "pgbench inserted %d values under %d data keys; expected new data "
                                              "keys during the run" % (inserted, len(rows)))
    t.expect(max([x[1] for x in rows] or [0]) <= 1000, "a data key encrypted %d values, more than dek_max_uses = 1000"
             % max([x[1] for x in rows] or [0]))
    # Every key generated during the run encrypted at least one of its values, except the spares
    # still waiting at its end (at most 3 of the last batch); some of the run's keys may be spares
    # generated before it.  So at most ceil(keys / 4) generation requests, plus the race allowance.
    gen_bound = generations_for(len(rows)) + GENERATION_RACE_ALLOWANCE
    t.expect(generated <= gen_bound, "pgbench: %d KMS generation requests (encrypt + datakey) for %d data keys, more "
                                     "than ceil(%d/4) + %d = %d"
             % (generated, len(rows), len(rows), GENERATION_RACE_ALLOWANCE, gen_bound))
    bad = q1(c, "SELECT count(*) FILTER (WHERE dec_text(v) IS DISTINCT FROM 'pgbench payload 4111-1111-1111-1111') "
                "FROM (SELECT v FROM %s WHERE id > %d ORDER BY id DESC LIMIT 2000) s" % (tab, n))
    t.expect(bad == 0, "%d of the last 2000 values inserted by pgbench do not decrypt" % bad)
    run(c, "DROP TABLE %s" % tab)
    restore_settings(["envelope.dek_max_uses"])


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def cleanup_all():
    """Undo everything, whatever state the run ended in."""
    problems = []
    for step in (lambda: set_fault("none"),
                 lambda: None if cluster_running() else start_cluster(),
                 lambda: restore_settings(),
                 drop_created):
        try:
            step()
        except BaseException as e:
            problems.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return problems


def drop_created():
    c = connect()
    try:
        for tab in CREATED_TABLES:
            run(c, "DROP TABLE IF EXISTS %s" % tab)
        if CREATED_KEKS:
            run(c, "DELETE FROM envelope.kek WHERE name = ANY(%s)", (CREATED_KEKS,))
    finally:
        c.close()


def main(argv):
    try:
        require_env()
    except RuntimeError as e:
        print("test_cache: %s" % e, file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise Interrupted("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_term)

    selected = [f for f in TESTS if not argv[1:] or f.__name__ in argv[1:]]
    unknown = set(argv[1:]) - {f.__name__ for f in TESTS}
    if unknown:
        print("test_cache: unknown test(s) %s; known: %s" % (sorted(unknown), [f.__name__ for f in TESTS]),
              file=sys.stderr)
        return 2

    failed = []
    start_all = time.monotonic()
    global CRASH_SCAN_OFFSET
    CRASH_SCAN_OFFSET = log_size()
    try:
        set_fault("none")
        c = connect()
        try:
            for name, value in qall(c, "SELECT name, setting FROM pg_file_settings "
                                       "WHERE sourcefile LIKE '%%/postgresql.auto.conf' AND name = ANY(%s)",
                                    (list(TOUCHABLE),)):
                ORIGINAL_AUTO_CONF[name] = value
        finally:
            c.close()
        if ORIGINAL_AUTO_CONF:
            print("note: postgresql.auto.conf already sets %s; kept as the values to restore" % ORIGINAL_AUTO_CONF)
        for fn in selected:
            t = T(fn.__name__)
            t0 = time.monotonic()
            crashes0 = crash_count()
            try:
                if not wait_for_server():
                    raise Failure("the dev cluster does not accept connections")
                fn(t)
            except Failure as e:
                t.problems.append(str(e))
            except Exception as e:
                t.problems.append("%s: %s" % (type(e).__name__, str(e).strip()))
                t.notes.append(traceback.format_exc().rstrip())
            finally:
                try:
                    set_fault("none")
                except Exception as e:
                    t.problems.append("could not reset the KMS fault mode: %s" % e)
                t.close()
                for cb in reversed(t.cleanups):
                    try:
                        cb()
                    except Exception as e:
                        t.problems.append("cleanup: %s" % e)
                try:
                    restore_settings()           # whatever the test left changed
                except Exception as e:
                    t.problems.append("restoring settings: %s" % e)
            took = time.monotonic() - t0
            crashes = crash_count() - crashes0
            if crashes:
                t.problems.insert(0, "%d server process(es) crashed during this test: %s"
                                  % (crashes, "; ".join(crash_lines(crashes))))
            if t.problems:
                failed.append(fn.__name__)
                print("FAIL  %s (%.2f s): %s" % (fn.__name__, took, t.problems[0]))
                for p in t.problems[1:]:
                    print("        also: %s" % p)
            else:
                print("PASS  %s (%.2f s)" % (fn.__name__, took))
            for n in t.notes:
                print("        note: %s" % n.replace("\n", "\n              "))
            sys.stdout.flush()
    except (KeyboardInterrupt, Interrupted) as e:
        print("interrupted: %s" % (e or "KeyboardInterrupt"))
        failed.append("(interrupted)")
    finally:
        problems = cleanup_all()
        for p in problems:
            print("cleanup problem: %s" % p)
    print("%d test(s), %d failed, %.1f s%s" % (len(selected), len([f for f in failed if not f.startswith("(")]),
                                               time.monotonic() - start_all,
                                               (": " + ", ".join(failed)) if failed else ""))
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
