#!/usr/bin/python3
"""KMS fault tests: what enc() and dec() do when the KMS misbehaves.

Needs the dev environment (eval "$(test/devenv up)"): it reads PGHOST,
PGPORT, PGDATABASE, PGUSER, VAULT_ADDR, VAULT_TOKEN, VAULT_CACERT,
ENVELOPE_KMS_ADMIN and ENVELOPE_DEV_DIR (ENVELOPE_DEV_LOG is optional).
Faults are switched through the test KMS's admin API (test/kms/README.md).

For every fault mode of the test KMS (refuse, 500, 503, 429, hang,
malformed, lying, badtoken, slow:<ms>) a KMS call is forced in a fresh
session, both to unwrap a stored value's data key (cache_flush() then
dec_text()) and to make a new data key (dek_max_uses = 1 then enc()).
Each error must carry the documented SQLSTATE and message, must not quote
the Vault token or the plaintext, must leave the backend usable, and once
the fault is cleared every value stored before it must decrypt again.
Hangs must end within the documented bounds (statement_timeout,
envelope.kms_timeout, query cancel).  Also: keep-alive (no new TCP
connection per KMS call) and retired KEK versions (min_decryption_version).

Every test puts the fault mode back to "none" and undoes its ALTER SYSTEM
changes in tearDown.  Run:  /usr/bin/python3 test/test_kms_faults.py
Exit status is nonzero if any test fails.
"""
import os
import re
import subprocess
import sys
import threading
import time
import unittest

import psycopg2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from envtest import SummaryResult, admin, set_fault  # noqa: E402
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRED_ENV = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "VAULT_ADDR", "VAULT_TOKEN",
                "VAULT_CACERT", "ENVELOPE_KMS_ADMIN", "ENVELOPE_DEV_DIR")

# A table of values stored before any fault (name unique to this run).
TABLE = "envelope_fault_rows_%d" % os.getpid()
ROWS = {  # id -> (plaintext, is_text)
    1: ("fault-test plaintext one: 4111-1111-1111-1111", True),
    2: ("fault-test Grüße, 東京, ☃ multibyte", True),
    3: (b"fault-test \x00\x01\xfe\xff binary", False),
    4: ("", True),
}
PLAINTEXTS = [p if isinstance(p, str) else p.decode("latin-1") for p, _ in ROWS.values() if p]
ENC_PLAINTEXT = "fault-test new value 5500-0000-0000-0004"

# SQLSTATEs and primary messages promised for each simple fault mode.
SIMPLE_FAULTS = {
    "refuse": ("08001", r"could not connect to the KMS"),
    "500": ("08006", r"KMS is unavailable"),
    "503": ("08006", r"KMS is unavailable"),
    "429": ("08006", r"KMS is unavailable"),
    "malformed": ("08P01", r'KMS returned a malformed answer for key "pii"'),
    "badtoken": ("28000", r'KMS denied access to key "pii"'),
}
TIMEOUT_MSG = r"KMS request timed out after 1000 ms"
CANCEL_STATE = "57014"


def require_env():
    """Fail clearly when the dev environment's variables are missing."""
    missing = [v for v in REQUIRED_ENV if not os.environ.get(v)]
    if missing:
        raise RuntimeError("missing environment variable(s) %s; start the dev environment first: "
                           "eval \"$(test/devenv up)\"" % ", ".join(missing))


def connect(dbname=None):
    """A new autocommit session (a new backend) in the dev database."""
    conn = psycopg2.connect(host=os.environ["PGHOST"], port=os.environ["PGPORT"],
                            dbname=dbname or os.environ["PGDATABASE"], user=os.environ["PGUSER"],
                            application_name="test_kms_faults")
    conn.autocommit = True
    return conn


def generate_requests():
    """Key generation requests the test KMS served (batch encrypt, or datakey)."""
    r = kms_stats()["requests"]
    return r["encrypt"] + r["datakey"]


def kms_stats():
    """The KMS's request and connection counters."""
    return admin("GET", "/stats")


def one(conn, sql, args=None):
    """First column of the first row."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def wait_for_setting(name, expected, timeout=5.0):
    """Wait until new sessions see a reloaded setting (pg_reload_conf is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = connect()
        try:
            value = one(conn, "SHOW " + name)
        finally:
            conn.close()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def setUpModule():
    require_env()
    set_fault("none")
    conn = connect()
    try:
        global KMS_TIMEOUT_DEFAULT
        KMS_TIMEOUT_DEFAULT = one(conn, "SHOW envelope.kms_timeout")
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS %s" % TABLE)
            cur.execute("CREATE TABLE %s (id int PRIMARY KEY, v enc_bytea)" % TABLE)
            for i, (p, is_text) in ROWS.items():
                if is_text:
                    cur.execute("INSERT INTO %s VALUES (%%s, enc(%%s::text))" % TABLE, (i, p))
                else:
                    cur.execute("INSERT INTO %s VALUES (%%s, enc(%%s::bytea))" % TABLE,
                                (i, psycopg2.Binary(p)))
    finally:
        conn.close()


def tearDownModule():
    try:
        set_fault("none")
    finally:
        conn = connect()
        try:
            with conn.cursor() as cur:
                cur.execute("ALTER SYSTEM RESET envelope.kms_timeout")
                cur.execute("SELECT pg_reload_conf()")
                cur.execute("DROP TABLE IF EXISTS %s" % TABLE)
        finally:
            conn.close()


class KmsFaultTest(unittest.TestCase):
    """Shared set-up and assertions."""

    maxDiff = None

    def setUp(self):
        set_fault("none")
        self.conns = []
        self.altered = False
        self.log_offset = self.log_size()

    def tearDown(self):
        # Release hung requests first, so nothing waits on them.
        set_fault("none")
        for c in self.conns:
            try:
                c.close()
            except Exception:
                pass
        if self.altered:
            conn = connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("ALTER SYSTEM RESET envelope.kms_timeout")
                    cur.execute("SELECT pg_reload_conf()")
            finally:
                conn.close()
            wait_for_setting("envelope.kms_timeout", KMS_TIMEOUT_DEFAULT)

    # -- helpers

    def session(self):
        """A fresh session, closed in tearDown."""
        conn = connect()
        self.conns.append(conn)
        return conn

    def lower_kms_timeout(self):
        """envelope.kms_timeout = 1000 ms through ALTER SYSTEM and a reload."""
        self.altered = True
        conn = self.session()
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET envelope.kms_timeout = 1000")
            cur.execute("SELECT pg_reload_conf()")
        self.assertEqual(wait_for_setting("envelope.kms_timeout", "1s"), "1s",
                         "the reloaded envelope.kms_timeout did not reach new sessions")

    @staticmethod
    def log_size():
        path = os.environ.get("ENVELOPE_DEV_LOG")
        try:
            return os.path.getsize(path) if path else 0
        except OSError:
            return 0

    def run_failing(self, conn, sql, args=None):
        """Run sql expecting an error; returns (error, elapsed seconds)."""
        start = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                rows = cur.fetchall()
        except psycopg2.Error as e:
            return e, time.monotonic() - start
        self.fail("%s succeeded (returned %d row(s)) but should have failed" % (sql, len(rows)))

    def assert_error(self, err, sqlstate, message_re, extra_secrets=()):
        """SQLSTATE and primary message as promised; no token or plaintext anywhere in the error."""
        d = err.diag
        desc = "SQLSTATE %s, message %r, detail %r, hint %r" % (
            err.pgcode, d.message_primary, d.message_detail, d.message_hint)
        self.assertEqual(err.pgcode, sqlstate, "wrong SQLSTATE: " + desc)
        self.assertIsNotNone(d.message_primary, desc)
        self.assertRegex(d.message_primary, "^(?:%s)$" % message_re, "wrong message: " + desc)
        token = os.environ["VAULT_TOKEN"]
        secrets = [token] + PLAINTEXTS + [ENC_PLAINTEXT] + list(extra_secrets)
        for field in (d.message_primary, d.message_detail, d.message_hint, d.context, err.pgerror):
            for s in secrets:
                if field and s:
                    self.assertNotIn(s, field, "the error quotes a secret (%s)" % (
                        "the Vault token" if s == token else "a plaintext"))

    def assert_alive(self, conn):
        """The backend survived: the same session still runs queries."""
        self.assertEqual(one(conn, "SELECT 1"), 1)

    def assert_rows_decrypt(self, conn, flush=True):
        """Every value stored before the fault decrypts to its plaintext in conn."""
        with conn.cursor() as cur:
            if flush:
                cur.execute("SELECT envelope.cache_flush()")
            cur.execute("SELECT id, dec_bytea(v) FROM %s ORDER BY id" % TABLE)
            got = {i: bytes(b) for i, b in cur.fetchall()}
        want = {i: (p.encode() if isinstance(p, str) else p) for i, (p, _) in ROWS.items()}
        self.assertEqual(got, want)

    def assert_recovered(self, conn):
        """After the fault is cleared: the faulted session and a new one decrypt everything,
        and the faulted session can encrypt again."""
        set_fault("none")
        self.assert_rows_decrypt(conn, flush=False)
        self.assert_rows_decrypt(conn, flush=True)
        self.assertEqual(one(conn, "SELECT dec_text(enc(%s::text))", (ENC_PLAINTEXT,)), ENC_PLAINTEXT)
        self.assert_rows_decrypt(self.session(), flush=False)

    def assert_log_has_no_token(self):
        """The server log written during the test does not contain the Vault token."""
        path = os.environ.get("ENVELOPE_DEV_LOG")
        if not path or not os.path.exists(path):
            return
        with open(path, "rb") as f:
            f.seek(self.log_offset)
            new = f.read()
        self.assertNotIn(os.environ["VAULT_TOKEN"].encode(), new, "the server log contains the Vault token")

    def dec_under_fault(self, mode, count=None):
        """Fresh session, empty cache, fault on, dec_text() of a stored value: (conn, error, s)."""
        conn = self.session()
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = '10s'")  # safety net only
            cur.execute("SELECT envelope.cache_flush()")
        before = kms_stats()["total"]
        set_fault(mode, count)
        err, elapsed = self.run_failing(conn, "SELECT dec_text(v) FROM %s WHERE id = 1" % TABLE)
        if mode != "refuse":
            self.assertGreater(kms_stats()["total"], before, "no KMS request was made")
        return conn, err, elapsed

    def enc_under_fault(self, mode, count=None):
        """Fresh session, dek_max_uses = 1, fault on, INSERT enc(): (conn, error, s)."""
        conn = self.session()
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = '10s'")  # safety net only
            cur.execute("SET envelope.dek_max_uses = 1")
        rows_before = one(conn, "SELECT count(*) FROM %s" % TABLE)
        # Keys are generated 4 per KMS call; forget the current key and the
        # spare ones, so that this enc() must ask the KMS.
        one(conn, "SELECT envelope.cache_flush()")
        before = generate_requests()
        set_fault(mode, count)
        err, elapsed = self.run_failing(
            conn, "INSERT INTO %s VALUES (100, enc(%%s::text)) RETURNING id" % TABLE, (ENC_PLAINTEXT,))
        if mode != "refuse":
            self.assertGreater(generate_requests(), before, "no key generation request was made")
        set_fault("none")
        self.assertEqual(one(conn, "SELECT count(*) FROM %s" % TABLE), rows_before,
                         "a value was stored although enc() failed")
        return conn, err, elapsed


class SimpleFaults(KmsFaultTest):
    """refuse, 500, 503, 429, malformed, badtoken: a clear error at once, then recovery."""

    def check_mode(self, mode):
        sqlstate, message = SIMPLE_FAULTS[mode]
        with self.subTest(mode=mode, path="dec"):
            conn, err, elapsed = self.dec_under_fault(mode)
            self.assert_error(err, sqlstate, message)
            self.assertLess(elapsed, 3.0)
            self.assert_alive(conn)
            self.assert_recovered(conn)
        with self.subTest(mode=mode, path="enc"):
            conn, err, elapsed = self.enc_under_fault(mode)
            self.assert_error(err, sqlstate, message)
            self.assertLess(elapsed, 3.0)
            self.assert_alive(conn)
            self.assert_recovered(conn)
        self.assert_log_has_no_token()

    def test_refuse(self):
        self.check_mode("refuse")

    def test_http_500(self):
        self.check_mode("500")

    def test_http_503(self):
        self.check_mode("503")

    def test_http_429(self):
        self.check_mode("429")

    def test_malformed(self):
        self.check_mode("malformed")

    def test_badtoken(self):
        self.check_mode("badtoken")


class Lying(KmsFaultTest):
    """A KMS that answers 200 with wrong keys must never make envelope return or store wrong data."""

    def test_lying_enc_is_refused(self):
        # The batch encrypt answer hands every new key another key's wrapped
        # form; the verification unwrap (envelope.kms_verify, on by default)
        # catches it.
        self.assertEqual(one(self.session(), "SHOW envelope.kms_verify"), "on")
        conn, err, _ = self.enc_under_fault("lying")
        self.assert_error(err, "08P01", r'KMS returned a malformed answer for key "pii"'
                                        r"|KMS returned a data key that does not match its wrapped form"
                                        r"|KMS wrapped a new data key with an old version of key \"pii\"")
        self.assert_alive(conn)
        self.assert_recovered(conn)
        self.assert_log_has_no_token()

    def test_lying_dec_fails_with_key_commitment(self):
        conn, err, _ = self.dec_under_fault("lying")
        self.assert_error(err, "XX001", r"could not decrypt value")
        self.assert_alive(conn)
        # Every stored value, each with an empty cache: an error, never data.
        for i in ROWS:
            with self.subTest(row=i):
                with conn.cursor() as cur:
                    cur.execute("SELECT envelope.cache_flush()")
                err, _ = self.run_failing(conn, "SELECT dec_bytea(v) FROM %s WHERE id = %d" % (TABLE, i))
                self.assert_error(err, "XX001", r"could not decrypt value")
        set_fault("none")
        self.assert_rows_decrypt(self.session(), flush=False)
        self.assert_rows_decrypt(conn, flush=True)
        self.assert_log_has_no_token()

    def test_lying_unwrap_is_not_cached(self):
        # A key the commitment check rejected must not stay in the session's
        # key cache: once the KMS answers correctly again, the same session
        # must decrypt without needing cache_flush().
        conn, err, _ = self.dec_under_fault("lying")
        self.assert_error(err, "XX001", r"could not decrypt value")
        set_fault("none")
        with conn.cursor() as cur:
            try:
                cur.execute("SELECT dec_text(v) FROM %s WHERE id = 1" % TABLE)
                got = cur.fetchone()[0]
            except psycopg2.Error as e:
                cur.execute("SELECT entries FROM envelope.cache_stats()")
                self.fail("after the KMS recovered, the same session still fails (SQLSTATE %s %r): the "
                          "rejected data key from the lying unwrap stayed in the key cache "
                          "(cache_stats().entries = %d)" % (e.pgcode, e.diag.message_primary, cur.fetchone()[0]))
        self.assertEqual(got, ROWS[1][0])


class Hangs(KmsFaultTest):
    """A KMS that never answers: statement_timeout, envelope.kms_timeout and cancel all end the wait."""

    def test_hang_statement_timeout(self):
        for path in ("dec", "enc"):
            with self.subTest(path=path):
                conn = self.session()
                with conn.cursor() as cur:
                    cur.execute("SET statement_timeout = '1s'")
                    cur.execute("SET envelope.dek_max_uses = 1")
                    cur.execute("SELECT envelope.cache_flush()")
                set_fault("hang")
                if path == "dec":
                    err, elapsed = self.run_failing(conn, "SELECT dec_text(v) FROM %s WHERE id = 1" % TABLE)
                else:
                    err, elapsed = self.run_failing(conn, "SELECT enc(%s::text)", (ENC_PLAINTEXT,))
                self.assert_error(err, CANCEL_STATE, r"canceling statement due to statement timeout")
                self.assertLess(elapsed, 3.0, "statement_timeout took %.2f s to end a hung KMS call" % elapsed)
                self.assert_alive(conn)
                self.assert_recovered(conn)
        self.assert_log_has_no_token()

    def test_hang_kms_timeout(self):
        # A session that already talked to the KMS before the reload must
        # follow the new setting too (SIGHUP is processed between statements).
        existing = self.session()
        self.assertEqual(one(existing, "SELECT dec_text(v) FROM %s WHERE id = 1" % TABLE), ROWS[1][0])
        self.lower_kms_timeout()
        for path in ("dec", "enc", "existing session"):
            with self.subTest(path=path):
                conn = existing if path == "existing session" else self.session()
                with conn.cursor() as cur:
                    cur.execute("SET statement_timeout = 0")
                    cur.execute("SET envelope.dek_max_uses = 1")
                    cur.execute("SELECT envelope.cache_flush()")
                self.assertEqual(one(conn, "SHOW envelope.kms_timeout"), "1s")
                set_fault("hang")
                if path == "enc":
                    err, elapsed = self.run_failing(conn, "SELECT enc(%s::text)", (ENC_PLAINTEXT,))
                else:
                    err, elapsed = self.run_failing(conn, "SELECT dec_text(v) FROM %s WHERE id = 1" % TABLE)
                self.assert_error(err, "08006", TIMEOUT_MSG)
                self.assertLess(elapsed, 3.0, "envelope.kms_timeout = 1 s took %.2f s" % elapsed)
                self.assertGreaterEqual(elapsed, 0.9, "the timeout fired before envelope.kms_timeout")
                self.assert_alive(conn)
                self.assert_recovered(conn)
        self.assert_log_has_no_token()

    def test_hang_cancel(self):
        conn = self.session()
        other = self.session()
        pid = one(conn, "SELECT pg_backend_pid()")
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = '10s'")  # safety net only
            cur.execute("SELECT envelope.cache_flush()")
        before = kms_stats()["requests"]["decrypt"]
        set_fault("hang")
        outcome = {}

        def query():
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT dec_text(v) FROM %s WHERE id = 1" % TABLE)
                    outcome["rows"] = cur.fetchall()
            except psycopg2.Error as e:
                outcome["error"] = e
            outcome["end"] = time.monotonic()

        worker = threading.Thread(target=query, daemon=True)
        worker.start()
        # Wait until the request is hanging in the KMS.
        deadline = time.monotonic() + 5
        while kms_stats()["requests"]["decrypt"] == before and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertGreater(kms_stats()["requests"]["decrypt"], before, "the decrypt request never reached the KMS")
        time.sleep(0.2)
        self.assertTrue(worker.is_alive(), "the query ended although the KMS hangs: %r" % outcome)
        start = time.monotonic()
        self.assertTrue(one(other, "SELECT pg_cancel_backend(%s)", (pid,)))
        worker.join(5)
        self.assertFalse(worker.is_alive(), "pg_cancel_backend() did not end the hung KMS call within 5 s")
        self.assertNotIn("rows", outcome, "the cancelled query returned data")
        elapsed = outcome["end"] - start
        self.assert_error(outcome["error"], CANCEL_STATE, r"canceling statement due to user request")
        self.assertLess(elapsed, 2.5, "cancel took %.2f s" % elapsed)
        self.assert_alive(conn)
        self.assert_recovered(conn)


class Slow(KmsFaultTest):
    """slow:<ms>: answers late; within envelope.kms_timeout that is fine, beyond it is a timeout."""

    def test_slow_within_timeout(self):
        conn = self.session()
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = '10s'")
            cur.execute("SET envelope.dek_max_uses = 1")
            cur.execute("SELECT envelope.cache_flush()")
        set_fault("slow:300")
        start = time.monotonic()
        self.assertEqual(one(conn, "SELECT dec_text(v) FROM %s WHERE id = 1" % TABLE), ROWS[1][0])
        self.assertGreaterEqual(time.monotonic() - start, 0.3)
        self.assertEqual(one(conn, "SELECT dec_text(enc(%s::text))", (ENC_PLAINTEXT,)), ENC_PLAINTEXT)
        self.assert_recovered(conn)

    def test_slow_beyond_kms_timeout(self):
        self.lower_kms_timeout()
        for path in ("dec", "enc"):
            with self.subTest(path=path):
                if path == "dec":
                    conn, err, elapsed = self.dec_under_fault("slow:2500")
                else:
                    conn, err, elapsed = self.enc_under_fault("slow:2500")
                self.assert_error(err, "08006", TIMEOUT_MSG)
                self.assertLess(elapsed, 3.0)
                self.assert_alive(conn)
                self.assert_recovered(conn)


class KeepAlive(KmsFaultTest):
    """KMS calls of one session share one TLS connection."""

    def test_keep_alive(self):
        conn = self.session()
        sql = "SELECT envelope.cache_flush(), dec_text(v) FROM %s WHERE id = 1" % TABLE
        # Warm-up: flush first so this session really talks to the KMS and
        # opens its connection (the shared cache would otherwise answer).
        with conn.cursor() as cur:
            cur.execute(sql)
            self.assertEqual(cur.fetchone()[1], ROWS[1][0])
        kms0 = kms_stats()
        with conn.cursor() as cur:
            cur.execute("SELECT kms_unwrap, kms_connections FROM envelope.cache_stats()")
            unwrap0, conns0 = cur.fetchone()
            for _ in range(20):
                cur.execute(sql)
                self.assertEqual(cur.fetchone()[1], ROWS[1][0])
            cur.execute("SELECT kms_unwrap, kms_connections FROM envelope.cache_stats()")
            unwrap1, conns1 = cur.fetchone()
        kms1 = kms_stats()
        self.assertEqual(unwrap1 - unwrap0, 20, "cache_stats().kms_unwrap")
        self.assertEqual(kms1["requests"]["decrypt"] - kms0["requests"]["decrypt"], 20, "KMS decrypt requests")
        self.assertEqual(conns1 - conns0, 0, "cache_stats().kms_connections grew: no keep-alive")
        self.assertEqual(kms1["connections"] - kms0["connections"], 0, "the KMS accepted new TCP connections")


class Retirement(KmsFaultTest):
    """A KEK version retired in the KMS (min_decryption_version) gives 55000; rewrapped values still read."""

    def setUp(self):
        super().setUp()
        self.kek = "faults_ret_%d_%d" % (os.getpid(), int(time.time() * 1000) % 10**9)
        subprocess.run([os.path.join(HERE, "devenv"), "kms-key", self.kek], check=True,
                       stdout=subprocess.DEVNULL)

    def tearDown(self):
        try:
            conn = connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("DELETE FROM envelope.kek WHERE name = %s", (self.kek,))
            finally:
                conn.close()
        finally:
            super().tearDown()

    def test_retired_version(self):
        conn = self.session()
        k = self.kek
        self.assertEqual(one(conn, "SELECT envelope.create_kek(%s, 'vault', %s)", (k, k)), 1)
        old = one(conn, "SELECT enc('retired-version plaintext'::text, %s)::text", (k,))
        self.assertEqual(one(conn, "SELECT (envelope.metadata(%s::enc_bytea)->>'kek_version')::int", (old,)), 1)
        self.assertEqual(one(conn, "SELECT envelope.rotate_kek(%s)", (k,)), 2)
        moved = one(conn, "SELECT rewrap(%s::enc_bytea)::text", (old,))
        self.assertEqual(one(conn, "SELECT (envelope.metadata(%s::enc_bytea)->>'kek_version')::int", (moved,)), 2)

        r = requests.post("%s/v1/transit/keys/%s/config" % (os.environ["VAULT_ADDR"], k),
                          json={"min_decryption_version": 2},
                          headers={"X-Vault-Token": os.environ["VAULT_TOKEN"]},
                          verify=os.environ["VAULT_CACERT"], timeout=10)
        self.assertEqual(r.status_code, 200, r.text)
        self.assertEqual(r.json()["data"]["min_decryption_version"], 2)

        one(conn, "SELECT envelope.cache_flush()")
        err, _ = self.run_failing(conn, "SELECT dec_text(%s::enc_bytea)", (old,))
        self.assert_error(err, "55000", r'version 1 of KMS key "%s" is retired' % re.escape(k),
                          extra_secrets=["retired-version plaintext"])
        self.assert_alive(conn)
        self.assertEqual(one(conn, "SELECT dec_text(%s::enc_bytea)", (moved,)), "retired-version plaintext")
        fresh = self.session()
        self.assertEqual(one(fresh, "SELECT dec_text(%s::enc_bytea)", (moved,)), "retired-version plaintext")
        err, _ = self.run_failing(fresh, "SELECT dec_text(%s::enc_bytea)", (old,))
        self.assertEqual(err.pgcode, "55000")



def main():
    try:
        require_env()
    except RuntimeError as e:
        print("test_kms_faults: %s" % e, file=sys.stderr)
        return 2
    runner = unittest.TextTestRunner(resultclass=SummaryResult, verbosity=0, stream=sys.stdout)
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = runner.run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
