#!/usr/bin/python3
"""pg_dump / pg_restore and COPY round trips of enc_bytea values.

Needs the dev environment (eval "$(test/devenv up)"): it reads PGHOST,
PGPORT, PGUSER, VAULT_ADDR, VAULT_TOKEN, VAULT_CACERT, ENVELOPE_KMS_ADMIN and
ENVELOPE_DEV_DIR.  It creates a source database on the dev cluster with
envelope, two KEKs (one rotated) and a table of values (NULL, empty text,
empty bytea, multibyte text, a 1 MiB bytea, a context-bound value, values
under the rotated KEK), dumps it with pg_dump in plain format (restored
with psql) and custom format (restored with pg_restore) into fresh
databases, and checks that:
  - the KEK registry (envelope.keks) is restored as it was;
  - the raw enc_bytea text (and COPY text output) is byte-identical;
  - every value decrypts to its original in a new session;
  - enc() with the default KEK (set with ALTER DATABASE, since database
    settings are not part of a single database's dump) and with an
    explicit KEK works in the restored database;
  - COPY TO / COPY FROM in text and binary format round-trip enc_bytea
    exactly.
The databases it creates are dropped at the end.
Run:  /usr/bin/python3 test/test_dump.py   (exit status nonzero on failure)
"""
import io
import os
import subprocess
import sys
import tempfile
import unittest

import psycopg2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from envtest import SummaryResult  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PGBIN = "/usr/lib/postgresql/15/bin"
REQUIRED_ENV = ("PGHOST", "PGPORT", "PGUSER", "VAULT_ADDR", "VAULT_TOKEN", "VAULT_CACERT",
                "ENVELOPE_KMS_ADMIN", "ENVELOPE_DEV_DIR")

SUFFIX = "%d" % os.getpid()
SRC = "envelope_dump_src_" + SUFFIX
PLAIN = "envelope_dump_plain_" + SUFFIX
CUSTOM = "envelope_dump_custom_" + SUFFIX
KMS_KEY2 = "envelope_dump_k2"   # KMS key of the second (rotated) KEK
KEK2 = "dump_k2"

BIG = os.urandom(1 << 20)
# id -> (plaintext: str (text), bytes (bytea) or None (SQL NULL), kek or None, context or None)
ROWS = {
    1: (None, None, None),
    2: ("", None, None),
    3: (b"", None, None),
    4: ("Grüße aus Köln, 東京都, Ελληνικά, 🎉 emoji, \t tab", None, None),
    5: (BIG, None, None),
    6: ("context-bound secret 4111-1111-1111-1111", None, b"tenant=42/row=6"),
    7: ("under the rotated KEK", KEK2, None),
    8: (b"\x00binary\xff\x00 under the rotated KEK with context", KEK2, b"\x00ctx\xff"),
    9: ("moved to the rotated KEK by rewrap", "rewrap", None),
}
DBS_CREATED = []


def require_env():
    """Fail clearly when the dev environment's variables are missing."""
    missing = [v for v in REQUIRED_ENV if not os.environ.get(v)]
    if missing:
        raise RuntimeError("missing environment variable(s) %s; start the dev environment first: "
                           "eval \"$(test/devenv up)\"" % ", ".join(missing))


def conn_args():
    return ["-h", os.environ["PGHOST"], "-p", os.environ["PGPORT"], "-U", "postgres"]


def connect(dbname):
    """A new autocommit session as postgres."""
    conn = psycopg2.connect(host=os.environ["PGHOST"], port=os.environ["PGPORT"], dbname=dbname,
                            user="postgres", application_name="test_dump")
    conn.autocommit = True
    return conn


def run(*cmd):
    """Run a client program; raise with its stderr on failure."""
    p = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise AssertionError("%s failed (exit %d):\n%s" % (" ".join(cmd), p.returncode, p.stderr))
    return p.stdout


def createdb(name):
    run(os.path.join(PGBIN, "createdb"), *conn_args(), name)
    DBS_CREATED.append(name)


def dropdb(name):
    run(os.path.join(PGBIN, "dropdb"), *conn_args(), "--if-exists", "--force", name)


def query(dbname, sql, args=None):
    """All rows of a query in a new session."""
    conn = connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def as_bytes(p):
    return p.encode("utf-8") if isinstance(p, str) else p


def setUpModule():
    require_env()
    subprocess.run([os.path.join(HERE, "devenv"), "kms-key", "pii", KMS_KEY2], check=True,
                   stdout=subprocess.DEVNULL)
    createdb(SRC)
    conn = connect(SRC)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION envelope")
            cur.execute("SELECT envelope.create_kek('pii', 'vault', 'pii')")
            cur.execute("SELECT envelope.create_kek(%s, 'vault', %s)", (KEK2, KMS_KEY2))
            cur.execute("SELECT envelope.rotate_kek(%s)", (KEK2,))
            cur.execute("ALTER DATABASE %s SET envelope.default_kek = 'pii'" % SRC)
            cur.execute("SET envelope.default_kek = 'pii'")
            cur.execute("CREATE TABLE secrets (id int PRIMARY KEY, note text, v enc_bytea)")
            for i, (p, kek, ctx) in ROWS.items():
                c = psycopg2.Binary(ctx) if ctx is not None else None
                if p is None:
                    cur.execute("INSERT INTO secrets VALUES (%s, 'null', NULL)", (i,))
                elif kek == "rewrap":
                    cur.execute("INSERT INTO secrets VALUES (%s, 'rewrap', rewrap(enc(%s::text), %s))",
                                (i, p, KEK2))
                elif isinstance(p, str):
                    cur.execute("INSERT INTO secrets VALUES (%s, 'text', enc(%s::text, %s, %s))",
                                (i, p, kek, c))
                else:
                    cur.execute("INSERT INTO secrets VALUES (%s, 'bytea', enc(%s::bytea, %s, %s))",
                                (i, psycopg2.Binary(p), kek, c))
            # The cases must really be what they claim.
            cur.execute("SELECT id, envelope.metadata(v) FROM secrets WHERE v IS NOT NULL")
            meta = dict(cur.fetchall())
            assert meta[6]["context_bound"] and meta[8]["context_bound"], meta
            assert meta[7]["kek_id"] == KEK2 and meta[7]["kek_version"] >= 2, meta[7]
            assert meta[9]["kek_id"] == KEK2 and meta[5]["ciphertext_length"] == len(BIG), meta
    finally:
        conn.close()


def tearDownModule():
    for name in reversed(DBS_CREATED):
        dropdb(name)


def restore(fmt):
    """Dump the source database and restore it into PLAIN (plain format, psql) or CUSTOM
    (custom format, pg_restore); done once per format."""
    target = PLAIN if fmt == "plain" else CUSTOM
    if target in DBS_CREATED:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dump." + fmt)
        run(os.path.join(PGBIN, "pg_dump"), *conn_args(), "-Fp" if fmt == "plain" else "-Fc",
            "-f", path, SRC)
        createdb(target)
        if fmt == "plain":
            run(os.path.join(PGBIN, "psql"), *conn_args(), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-d", target, "-f", path)
        else:
            run(os.path.join(PGBIN, "pg_restore"), *conn_args(), "--exit-on-error", "-d", target, path)


class Base(unittest.TestCase):
    """Helpers shared by the dump and COPY tests."""

    maxDiff = 2000

    def raw_text(self, dbname, table="secrets"):
        """(id, v::text) of every row, in id order."""
        return query(dbname, "SELECT id, v::text FROM %s ORDER BY id" % table)

    def assert_decrypts(self, dbname, table="secrets"):
        """In a new session, every value decrypts to its original (with its context)."""
        conn = connect(dbname)
        try:
            with conn.cursor() as cur:
                for i, (p, _, ctx) in ROWS.items():
                    c = psycopg2.Binary(ctx) if ctx is not None else None
                    cur.execute("SELECT dec_bytea(v, %%s) FROM %s WHERE id = %%s" % table, (c, i))
                    got = cur.fetchone()[0]
                    with self.subTest(db=dbname, table=table, id=i):
                        if p is None:
                            self.assertIsNone(got)
                        else:
                            self.assertIsNotNone(got)
                            self.assertEqual(bytes(got), as_bytes(p))
                    if isinstance(p, str):
                        cur.execute("SELECT dec_text(v, %%s) FROM %s WHERE id = %%s" % table, (c, i))
                        self.assertEqual(cur.fetchone()[0], p)
        finally:
            conn.close()

    def copy_out(self, dbname, sql):
        conn = connect(dbname)
        try:
            buf = io.BytesIO()
            with conn.cursor() as cur:
                cur.copy_expert(sql, buf)
            return buf.getvalue()
        finally:
            conn.close()


class Restored:
    """Checks of one restored database (mixed into a TestCase with DB set up)."""

    DB = None

    def test_registry_restored(self):
        cols = ("name, provider, key_ref, latest_version, min_decryption_version, created_at, rotated_at")
        want = query(SRC, "SELECT %s FROM envelope.keks ORDER BY name" % cols)
        got = query(self.DB, "SELECT %s FROM envelope.keks ORDER BY name" % cols)
        self.assertEqual(len(want), 2)
        self.assertEqual(got, want)

    def test_raw_text_identical(self):
        src = self.raw_text(SRC)
        self.assertEqual(len(src), len(ROWS))
        got = self.raw_text(self.DB)
        self.assertEqual([r[0] for r in got], [r[0] for r in src])
        for (i, a), (_, b) in zip(src, got):
            with self.subTest(id=i):
                self.assertTrue(a == b, "value %d differs after the restore (%s vs %s chars)" % (
                    i, None if a is None else len(a), None if b is None else len(b)))
        copy = "COPY (SELECT id, v FROM secrets ORDER BY id) TO STDOUT"
        self.assertTrue(self.copy_out(SRC, copy) == self.copy_out(self.DB, copy),
                        "COPY text output differs between source and restored database")
        copy_bin = "COPY (SELECT id, v FROM secrets ORDER BY id) TO STDOUT (FORMAT binary)"
        self.assertTrue(self.copy_out(SRC, copy_bin) == self.copy_out(self.DB, copy_bin),
                        "COPY binary output differs between source and restored database")

    def test_values_decrypt_in_new_session(self):
        self.assert_decrypts(self.DB)

    def test_enc_after_restore(self):
        conn = connect(self.DB)
        try:
            with conn.cursor() as cur:
                cur.execute("ALTER DATABASE %s SET envelope.default_kek = 'pii'" % self.DB)
        finally:
            conn.close()
        conn = connect(self.DB)  # new session: picks up the database setting
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW envelope.default_kek")
                self.assertEqual(cur.fetchone()[0], "pii")
                cur.execute("SELECT envelope.cache_flush()")
                cur.execute("SELECT x::text, dec_text(x), envelope.metadata(x) "
                            "FROM (SELECT enc('written after the restore'::text) AS x) s")
                text, plain, meta = cur.fetchone()
                self.assertEqual(plain, "written after the restore")
                self.assertEqual(meta["kek_id"], "pii")
                cur.execute("SELECT latest_version FROM envelope.keks WHERE name = %s", (KEK2,))
                latest = cur.fetchone()[0]
                cur.execute("SELECT dec_text(x), envelope.metadata(x) "
                            "FROM (SELECT enc('explicit KEK'::text, %s) AS x) s", (KEK2,))
                plain, meta = cur.fetchone()
                self.assertEqual(plain, "explicit KEK")
                self.assertEqual((meta["kek_id"], meta["kek_version"]), (KEK2, latest))
                cur.execute("CREATE TABLE after_restore (v enc_bytea)")
                cur.execute("INSERT INTO after_restore VALUES (%s::enc_bytea)", (text,))
        finally:
            conn.close()
        self.assertEqual(query(self.DB, "SELECT dec_text(v) FROM after_restore"),
                         [("written after the restore",)])


class PlainFormat(Base, Restored):
    """pg_dump -Fp, restored with psql."""

    DB = PLAIN

    @classmethod
    def setUpClass(cls):
        restore("plain")


class CustomFormat(Base, Restored):
    """pg_dump -Fc, restored with pg_restore."""

    DB = CUSTOM

    @classmethod
    def setUpClass(cls):
        restore("custom")


class CopyRoundTrip(Base):
    """COPY TO then COPY FROM, text and binary, keeps enc_bytea byte for byte."""

    def round_trip(self, fmt):
        table = "secrets_copy_" + fmt
        conn = connect(SRC)
        try:
            with conn.cursor() as cur:
                cur.execute("DROP TABLE IF EXISTS %s" % table)
                cur.execute("CREATE TABLE %s (LIKE secrets)" % table)
                buf = io.BytesIO()
                cur.copy_expert("COPY secrets (id, note, v) TO STDOUT (FORMAT %s)" % fmt, buf)
                buf.seek(0)
                cur.copy_expert("COPY %s (id, note, v) FROM STDIN (FORMAT %s)" % (table, fmt), buf)
                cur.execute("SELECT count(*) FROM %s" % table)
                self.assertEqual(cur.fetchone()[0], len(ROWS))
        finally:
            conn.close()
        try:
            src = self.raw_text(SRC)
            got = self.raw_text(SRC, table)
            for (i, a), (j, b) in zip(src, got):
                with self.subTest(fmt=fmt, id=i):
                    self.assertEqual(i, j)
                    self.assertTrue(a == b, "value %d changed in a COPY %s round trip" % (i, fmt))
            self.assert_decrypts(SRC, table)
            # Into another database as well (the restored one has the same registry).
            out = self.copy_out(SRC, "COPY secrets (id, note, v) TO STDOUT (FORMAT %s)" % fmt)
            conn = connect(CUSTOM)
            try:
                with conn.cursor() as cur:
                    cur.execute("DROP TABLE IF EXISTS %s" % table)
                    cur.execute("CREATE TABLE %s (LIKE secrets)" % table)
                    cur.copy_expert("COPY %s (id, note, v) FROM STDIN (FORMAT %s)" % (table, fmt),
                                    io.BytesIO(out))
            finally:
                conn.close()
            self.assertEqual(self.raw_text(CUSTOM, table), src)
            self.assert_decrypts(CUSTOM, table)
        finally:
            conn = connect(SRC)
            try:
                with conn.cursor() as cur:
                    cur.execute("DROP TABLE IF EXISTS %s" % table)
            finally:
                conn.close()

    @classmethod
    def setUpClass(cls):
        restore("custom")

    def test_copy_text(self):
        self.round_trip("text")

    def test_copy_binary(self):
        self.round_trip("binary")

    def test_copy_binary_rejects_garbage(self):
        # COPY FROM binary validates enc_bytea like the text input does.
        conn = connect(SRC)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE TEMP TABLE garbage (v enc_bytea)")
                payload = b"not an enc_bytea value"
                data = (b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
                        + b"\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xff\xff")
                with self.assertRaises(psycopg2.Error) as cm:
                    cur.copy_expert("COPY garbage FROM STDIN (FORMAT binary)", io.BytesIO(data))
                self.assertEqual(cm.exception.pgcode, "22P03")
        finally:
            conn.close()



def main():
    try:
        require_env()
    except RuntimeError as e:
        print("test_dump: %s" % e, file=sys.stderr)
        return 2
    runner = unittest.TextTestRunner(resultclass=SummaryResult, verbosity=0, stream=sys.stdout)
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = runner.run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
