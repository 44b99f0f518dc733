#!/usr/bin/python3
"""pg_dump / pg_restore of a database with clear views (envelope.create_clear_view).

Needs the dev environment (eval "$(test/devenv up)"): PGHOST, PGPORT, PGUSER.
Creates a source database on the dev cluster with envelope, KEK 'pii', two
tables with clear views (a row context and a bytea column on one, an
identity column on the other), rows written through the views, then dumps it
in custom format (restored with pg_restore) and plain format (restored with
psql) into fresh databases, and checks in each that:
  - the dump holds the views, their trigger functions and triggers as
    ordinary objects, the tables' data as COPY into the tables (never into
    the views), and the set_clear_column choices (extension configuration);
  - the stored ciphertext is byte-identical (nothing was encrypted again);
  - reading through the views decrypts, contexts included;
  - inserting, updating and deleting through the views works (sequences go
    on, new values are encrypted, unchanged columns keep their ciphertext);
  - the views can be dropped and made again from the restored choices
    (which apply by name: the restored tables have new OIDs).
The databases are dropped at the end.
Run:  /usr/bin/python3 test/clients/test_clear_view_dump.py
"""
import os
import subprocess
import sys
import tempfile
import unittest

import psycopg2

PGBIN = "/usr/lib/postgresql/15/bin"
SUFFIX = "%d" % os.getpid()
SRC = "envelope_cvdump_src_" + SUFFIX
CUSTOM = "envelope_cvdump_custom_" + SUFFIX
PLAIN = "envelope_cvdump_plain_" + SUFFIX
DBS = []

ACCOUNTS = [("ann", "111-11-1111", b"\x00scan ann\xff"), ("bob", "222-22-2222", None), ("cy", None, b"")]
NOTES = ["first note", "zweite Notiz, Grüße", ""]


def conn_args():
    return ["-h", os.environ["PGHOST"], "-p", os.environ["PGPORT"], "-U", os.environ.get("PGUSER", "postgres")]


def run(*cmd):
    p = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise AssertionError("%s failed (exit %d):\n%s" % (" ".join(cmd), p.returncode, p.stderr))
    return p.stdout


def connect(db):
    c = psycopg2.connect(dbname=db, application_name="envelope clear view dump test")
    c.autocommit = True
    return c


def query(db, sql, args=None):
    c = connect(db)
    try:
        with c.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None
    finally:
        c.close()


def createdb(name):
    run(os.path.join(PGBIN, "createdb"), *conn_args(), name)
    DBS.append(name)


def setUpModule():
    for v in ("PGHOST", "PGPORT"):
        if not os.environ.get(v):
            raise RuntimeError("%s is not set; start the dev environment: eval \"$(test/devenv up)\"" % v)
    createdb(SRC)
    c = connect(SRC)
    with c.cursor() as cur:
        cur.execute("CREATE EXTENSION envelope")
        cur.execute("SELECT envelope.create_kek('pii', 'vault', 'pii')")
        cur.execute("ALTER DATABASE %s SET envelope.default_kek = 'pii'" % SRC)
        cur.execute("SET envelope.default_kek = 'pii'")
        cur.execute("""CREATE TABLE accounts (id serial PRIMARY KEY, login text NOT NULL,
                       ssn enc_bytea, scan enc_bytea, opened timestamptz NOT NULL DEFAULT now())""")
        cur.execute("SELECT envelope.set_clear_column('accounts', 'ssn', 'text', "
                    "$$convert_to('accounts:' || id, 'UTF8')$$)")
        cur.execute("SELECT envelope.set_clear_column('accounts', 'scan', 'bytea')")
        cur.execute("SELECT envelope.create_clear_view('accounts', 'accounts_clear', 'pii')")
        cur.execute("""CREATE TABLE notes (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                       body enc_bytea DEFAULT enc(''))""")
        cur.execute("SELECT envelope.create_clear_view('notes')")
        for login, ssn, scan in ACCOUNTS:
            cur.execute("INSERT INTO accounts_clear (login, ssn, scan) VALUES (%s, %s, %s)",
                        (login, ssn, psycopg2.Binary(scan) if scan is not None else None))
        for n in NOTES:
            cur.execute("INSERT INTO notes_clear (body) VALUES (%s)", (n,))
    c.close()


def tearDownModule():
    for name in reversed(DBS):
        run(os.path.join(PGBIN, "dropdb"), *conn_args(), "--if-exists", "--force", name)


def restore(fmt):
    target = CUSTOM if fmt == "custom" else PLAIN
    if target in DBS:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dump")
        run(os.path.join(PGBIN, "pg_dump"), *conn_args(), "-Fc" if fmt == "custom" else "-Fp", "-f", path, SRC)
        createdb(target)
        if fmt == "custom":
            run(os.path.join(PGBIN, "pg_restore"), *conn_args(), "--exit-on-error", "-d", target, path)
        else:
            run(os.path.join(PGBIN, "psql"), *conn_args(), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-d", target, "-f", path)
    # Database settings are not in a single database's dump.
    query(target, "ALTER DATABASE %s SET envelope.default_kek = 'pii'" % target)
    return target


def raw(db):
    return (query(db, "SELECT id, login, ssn::text, scan::text FROM accounts ORDER BY id"),
            query(db, "SELECT id, body::text FROM notes ORDER BY id"))


def definitions(db):
    """What the views are made of: view definitions, defaults, trigger functions, triggers."""
    return (
        query(db, "SELECT c.relname, pg_get_viewdef(c.oid), c.reloptions FROM pg_class c "
                  "WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace ORDER BY 1"),
        query(db, "SELECT c.relname, a.attname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d "
                  "JOIN pg_class c ON c.oid = d.adrelid JOIN pg_attribute a ON a.attrelid = d.adrelid "
                  "AND a.attnum = d.adnum WHERE c.relkind = 'v' ORDER BY 1, 2"),
        query(db, "SELECT proname, prosrc, proconfig FROM pg_proc "
                  "WHERE pronamespace = 'public'::regnamespace AND prorettype = 'trigger'::regtype ORDER BY 1"),
        query(db, "SELECT tgrelid::regclass::text, tgname, tgfoid::regproc::text, tgtype FROM pg_trigger "
                  "WHERE NOT tgisinternal ORDER BY 1, 2"),
    )


class DumpText(unittest.TestCase):
    def test_plain_dump_contents(self):
        out = run(os.path.join(PGBIN, "pg_dump"), *conn_args(), "-Fp", SRC)
        for needle in ("CREATE VIEW public.accounts_clear WITH (security_invoker='true') AS",
                       "public.dec_text(accounts.ssn, convert_to(",
                       "CREATE FUNCTION public.accounts_clear_insert() RETURNS trigger",
                       "public.enc(NEW.ssn, 'pii'::pg_catalog.text, _env_new_1)",
                       "CREATE TRIGGER envelope_clear_insert INSTEAD OF INSERT ON public.accounts_clear",
                       "CREATE TRIGGER envelope_clear_update INSTEAD OF UPDATE ON public.notes_clear",
                       "ALTER TABLE ONLY public.notes_clear ALTER COLUMN body SET DEFAULT public.dec_text(public.enc(''::text));",
                       "COPY public.accounts (id, login, ssn, scan, opened) FROM stdin;",
                       "COPY envelope.clear_view_column ",
                       "COPY envelope.kek "):
            self.assertIn(needle, out)
        # Data goes into the tables, never through the views.
        self.assertNotIn("COPY public.accounts_clear", out)
        self.assertNotIn("INSERT INTO public.accounts_clear", out)
        for _, ssn, _ in ACCOUNTS:
            if ssn:
                self.assertNotIn(ssn, out)
        for n in NOTES:
            if n:
                self.assertNotIn(n, out)


class Restored(unittest.TestCase):
    maxDiff = None

    def check_restored(self, fmt):
        db = restore(fmt)
        # Same objects, same ciphertext.
        self.assertEqual(definitions(db), definitions(SRC))
        self.assertEqual(raw(db), raw(SRC))
        # The choices came along (with the source's OIDs: they apply by name).
        self.assertEqual(query(db, "SELECT relschema, relname, column_name, as_type, context_expr "
                                   "FROM envelope.clear_view_column ORDER BY 2, 3"),
                         query(SRC, "SELECT relschema, relname, column_name, as_type, context_expr "
                                    "FROM envelope.clear_view_column ORDER BY 2, 3"))
        # Reading through the views decrypts.
        got = query(db, "SELECT login, ssn, scan FROM accounts_clear ORDER BY id")
        self.assertEqual([(l, s, bytes(b) if b is not None else None) for l, s, b in got], ACCOUNTS)
        self.assertEqual([r[0] for r in query(db, "SELECT body FROM notes_clear ORDER BY id")], NOTES)

        # Writing through the views, in a new session.
        c = connect(db)
        with c.cursor() as cur:
            cur.execute("INSERT INTO accounts_clear (login, ssn) VALUES ('dee', '444-44-4444') "
                        "RETURNING id, ssn, opened IS NOT NULL")
            nid, ssn, has_default = cur.fetchone()
            self.assertEqual((nid, ssn, has_default), (len(ACCOUNTS) + 1, "444-44-4444", True))
            cur.execute("SELECT envelope.kek_of(ssn), position(convert_to('444-44-4444', 'UTF8') IN "
                        "decode(substr(ssn::text, 5), 'base64')), "
                        "dec_text(ssn, convert_to('accounts:' || id, 'UTF8')) FROM accounts WHERE id = %s", (nid,))
            self.assertEqual(cur.fetchone(), ("pii", 0, "444-44-4444"))
            cur.execute("INSERT INTO notes_clear DEFAULT VALUES RETURNING id, body")
            self.assertEqual(cur.fetchone(), (len(NOTES) + 1, ""))
            cur.execute("SELECT ssn::text FROM accounts WHERE id = 1")
            before = cur.fetchone()[0]
            cur.execute("UPDATE accounts_clear SET login = 'ann2' WHERE id = 1 RETURNING login, ssn")
            self.assertEqual(cur.fetchone(), ("ann2", "111-11-1111"))
            cur.execute("SELECT ssn::text = %s FROM accounts WHERE id = 1", (before,))
            self.assertTrue(cur.fetchone()[0])
            cur.execute("DELETE FROM accounts_clear WHERE id = %s RETURNING login", (nid,))
            self.assertEqual(cur.fetchone(), ("dee",))

            # Drop and make the views again from the restored choices.
            cur.execute("SELECT pg_get_viewdef('accounts_clear'::regclass)")
            viewdef = cur.fetchone()[0]
            cur.execute("SELECT envelope.drop_clear_view('accounts_clear', keep_config => true)")
            cur.execute("SELECT envelope.create_clear_view('accounts', 'accounts_clear', 'pii')")
            cur.execute("SELECT pg_get_viewdef('accounts_clear'::regclass)")
            self.assertEqual(cur.fetchone()[0], viewdef)
            cur.execute("SELECT login, ssn FROM accounts_clear WHERE id = 2")
            self.assertEqual(cur.fetchone(), ("bob", "222-22-2222"))
        c.close()

    def test_custom_format(self):
        self.check_restored("custom")

    def test_plain_format(self):
        self.check_restored("plain")


if __name__ == "__main__":
    prog = unittest.main(exit=False, verbosity=2)
    r = prog.result
    print("dumps: %d passed, %d failed" % (r.testsRun - len(r.failures) - len(r.errors),
                                                      len(r.failures) + len(r.errors)))
    sys.exit(0 if r.wasSuccessful() else 1)
