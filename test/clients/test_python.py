#!/usr/bin/python3
"""Python drivers against envelope: psycopg2 and SQLAlchemy.

Needs the dev environment (eval "$(test/devenv up)"): libpq reads PGHOST,
PGPORT, PGDATABASE and PGUSER; the database has envelope with KEK 'pii' as
envelope.default_kek.  Tables clients_py and clients_py_orm are made and
dropped here.  Covers:
  - psycopg2 through a clear view (envelope.create_clear_view): insert with
    RETURNING, read plaintext, update, delete, COPY;
  - the raw enc_bytea value fetched and written back unchanged into another
    row: it decrypts there, unless the column binds a row context;
  - no plaintext in the stored values (text form, and base64-decoded bytes);
  - a SQLAlchemy ORM model on the clear view (server defaults and the
    serial id come back through RETURNING);
  - SQLAlchemy TypeDecorators on the base table whose bind_expression and
    column_expression make the ORM emit enc() and dec_text()/dec_bytea().
Run:  /usr/bin/python3 test/clients/test_python.py   (exit status nonzero on failure)
"""
import base64
import io
import os
import sys
import unittest

import psycopg2
import psycopg2.errors

import sqlalchemy
from sqlalchemy import (Column, DateTime, FetchedValue, Integer, LargeBinary, Text,
                        cast, create_engine, func, select, text)
from sqlalchemy.orm import Session, declarative_base
from sqlalchemy.types import TypeDecorator, UserDefinedType

TABLE = "clients_py"
VIEW = "clients_py_clear"
ORM_TABLE = "clients_py_orm"

SECRETS = ["123-45-6789 psycopg2 secret", "Grüße, 東京, 🎉 psycopg2", "second psycopg2 secret"]
CARD = "4111-1111-1111-1111 card in row"
BLOB = b"\x00\x01binary psycopg2 blob\xff"


def connect():
    conn = psycopg2.connect(application_name="envelope clients test (python)")
    conn.autocommit = True
    return conn


def raw_bytes(value_text):
    """The binary form behind an enc_bytea text form ('enc:' + base64)."""
    assert value_text.startswith("enc:"), value_text[:10]
    return base64.b64decode(value_text[4:], validate=True)


class Plaintext:
    """Checks that stored enc_bytea values hold none of the given secrets."""

    @staticmethod
    def assert_hidden(testcase, value_text, secrets):
        testcase.assertIsNotNone(value_text)
        raw = raw_bytes(value_text)
        for s in secrets:
            b = s.encode("utf-8") if isinstance(s, str) else s
            testcase.assertNotIn(b, raw, "plaintext found in the stored bytes")
            if isinstance(s, str):
                testcase.assertNotIn(s, value_text, "plaintext found in the text form")


def setUpModule():
    for v in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER"):
        if not os.environ.get(v):
            raise RuntimeError("%s is not set; start the dev environment: eval \"$(test/devenv up)\"" % v)
    conn = connect()
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS %s, %s CASCADE" % (TABLE, ORM_TABLE))
        cur.execute("""CREATE TABLE %s (
            id serial PRIMARY KEY,
            name text NOT NULL,
            ssn enc_bytea,
            card enc_bytea,
            blob enc_bytea,
            created_at timestamptz NOT NULL DEFAULT now())""" % TABLE)
        cur.execute("SELECT envelope.set_clear_column(%s, 'card', 'text', "
                    "$$convert_to('clients_py:' || id, 'UTF8')$$)", (TABLE,))
        cur.execute("SELECT envelope.set_clear_column(%s, 'blob', 'bytea')", (TABLE,))
        cur.execute("SELECT envelope.create_clear_view(%s)", (TABLE,))
        assert cur.fetchone()[0] == VIEW
    conn.close()


def tearDownModule():
    conn = connect()
    with conn.cursor() as cur:
        cur.execute("SELECT envelope.drop_clear_view(%s)", (VIEW,))
        cur.execute("DROP TABLE IF EXISTS %s, %s" % (TABLE, ORM_TABLE))
    conn.close()


class Psycopg2(unittest.TestCase):
    """psycopg2 (text protocol) through the clear view, and raw values."""

    def setUp(self):
        self.conn = connect()
        self.cur = self.conn.cursor()

    def tearDown(self):
        self.conn.close()

    def insert(self, name, ssn, card=None, blob=None):
        self.cur.execute("INSERT INTO " + VIEW + " (name, ssn, card, blob) VALUES (%s, %s, %s, %s) "
                         "RETURNING id, name, ssn, card, blob, created_at",
                         (name, ssn, card, psycopg2.Binary(blob) if blob is not None else None))
        return self.cur.fetchone()

    def test_insert_read_update_delete(self):
        row = self.insert("ann", SECRETS[0], CARD, BLOB)
        rid = row[0]
        self.assertIsInstance(rid, int)
        self.assertEqual(row[1], "ann")
        self.assertEqual(row[2], SECRETS[0])
        self.assertEqual(row[3], CARD)
        self.assertEqual(bytes(row[4]), BLOB)
        self.assertIsNotNone(row[5])        # the table's default, through RETURNING

        self.cur.execute("SELECT name, ssn, card, blob FROM " + VIEW + " WHERE id = %s", (rid,))
        name, ssn, card, blob = self.cur.fetchone()
        self.assertEqual((name, ssn, card, bytes(blob)), ("ann", SECRETS[0], CARD, BLOB))

        # Stored: ciphertext under the default KEK, no plaintext.
        self.cur.execute("SELECT ssn::text, card::text, blob::text, envelope.kek_of(ssn) FROM "
                         + TABLE + " WHERE id = %s", (rid,))
        ssn_raw, card_raw, blob_raw, kek = self.cur.fetchone()
        self.assertEqual(kek, "pii")
        for v in (ssn_raw, card_raw, blob_raw):
            Plaintext.assert_hidden(self, v, [SECRETS[0], CARD, BLOB])

        # Update one column: the others keep their ciphertext.
        self.cur.execute("UPDATE " + VIEW + " SET ssn = %s WHERE id = %s RETURNING ssn, card",
                         (SECRETS[2], rid))
        self.assertEqual(self.cur.fetchone(), (SECRETS[2], CARD))
        self.cur.execute("SELECT ssn::text, card::text FROM " + TABLE + " WHERE id = %s", (rid,))
        ssn2, card2 = self.cur.fetchone()
        self.assertNotEqual(ssn2, ssn_raw)
        self.assertEqual(card2, card_raw)
        Plaintext.assert_hidden(self, ssn2, [SECRETS[2]])

        self.cur.execute("DELETE FROM " + VIEW + " WHERE id = %s RETURNING name, ssn", (rid,))
        self.assertEqual(self.cur.fetchone(), ("ann", SECRETS[2]))
        self.cur.execute("SELECT count(*) FROM " + TABLE + " WHERE id = %s", (rid,))
        self.assertEqual(self.cur.fetchone()[0], 0)

    def test_raw_value_copied_to_another_row(self):
        a = self.insert("src", SECRETS[1], CARD)[0]
        b = self.insert("dst", "other", "other card")[0]
        # Fetch the raw values as the driver sees them (text form) ...
        self.cur.execute("SELECT ssn, card FROM " + TABLE + " WHERE id = %s", (a,))
        ssn_raw, card_raw = self.cur.fetchone()
        self.assertTrue(ssn_raw.startswith("enc:"))
        Plaintext.assert_hidden(self, ssn_raw, [SECRETS[1]])
        Plaintext.assert_hidden(self, card_raw, [CARD])
        # ... and write them back unchanged into another row.
        self.cur.execute("UPDATE " + TABLE + " SET ssn = %s, card = %s WHERE id = %s",
                         (ssn_raw, card_raw, b))
        self.cur.execute("SELECT ssn::text FROM " + TABLE + " WHERE id = %s", (b,))
        self.assertEqual(self.cur.fetchone()[0], ssn_raw)       # byte for byte
        # No context on ssn: it decrypts in its new row.
        self.cur.execute("SELECT ssn FROM " + VIEW + " WHERE id = %s", (b,))
        self.assertEqual(self.cur.fetchone()[0], SECRETS[1])
        # card is bound to its row: the copy does not decrypt there.
        with self.assertRaises(psycopg2.Error) as cm:
            self.cur.execute("SELECT card FROM " + VIEW + " WHERE id = %s", (b,))
        self.assertEqual(cm.exception.pgcode, "XX001")
        self.assertNotIn(CARD, str(cm.exception))
        # It still decrypts in its own row.
        self.cur.execute("SELECT card FROM " + VIEW + " WHERE id = %s", (a,))
        self.assertEqual(self.cur.fetchone()[0], CARD)
        self.cur.execute("DELETE FROM " + TABLE + " WHERE id IN (%s, %s)", (a, b))

    def test_copy_round_trip(self):
        """COPY text out of the table and back in keeps every value byte for byte."""
        ids = [self.insert("copy%d" % i, s, CARD, BLOB)[0] for i, s in enumerate(SECRETS)]
        self.cur.execute("CREATE TEMP TABLE copy_back (LIKE " + TABLE + ")")
        out = io.StringIO()
        self.cur.copy_expert("COPY (SELECT * FROM " + TABLE + " WHERE id = ANY(%s)) TO STDOUT" % (
            "ARRAY[%s]" % ",".join(map(str, ids))), out)
        for s in SECRETS + [CARD]:
            self.assertNotIn(s, out.getvalue())
        out.seek(0)
        self.cur.copy_expert("COPY copy_back FROM STDIN", out)
        self.cur.execute("SELECT count(*) FROM copy_back c JOIN " + TABLE + " t USING (id) "
                         "WHERE c.ssn::text = t.ssn::text AND c.card::text = t.card::text "
                         "AND c.blob::text = t.blob::text")
        self.assertEqual(self.cur.fetchone()[0], len(ids))
        self.cur.execute("SELECT dec_text(ssn) FROM copy_back ORDER BY id")
        self.assertEqual([r[0] for r in self.cur.fetchall()], SECRETS)
        self.cur.execute("DELETE FROM " + TABLE + " WHERE id = ANY(%s)", (ids,))


# ---------------------------------------------------------------------------
# SQLAlchemy
# ---------------------------------------------------------------------------

Base = declarative_base()


class Customer(Base):
    """An ORM model on the clear view: plaintext attributes, encrypted storage."""
    __tablename__ = VIEW
    id = Column(Integer, primary_key=True)          # serial, filled through RETURNING
    name = Column(Text, nullable=False)
    ssn = Column(Text)
    card = Column(Text)                             # bound to its row by the view's context
    blob = Column(LargeBinary)                      # set_clear_column(..., 'bytea')
    created_at = Column(DateTime(timezone=True), server_default=FetchedValue())
    __mapper_args__ = {"eager_defaults": True}


class EncBytea(UserDefinedType):
    """The enc_bytea column type, for DDL."""
    cache_ok = True

    def get_col_spec(self, **kw):
        return "enc_bytea"


class EncryptedText(TypeDecorator):
    """A text attribute stored as enc_bytea: the ORM writes enc(:value) and reads dec_text(col)."""
    impl = EncBytea
    cache_ok = True

    def __init__(self, kek=None):
        super().__init__()
        self.kek = kek

    def bind_expression(self, bindvalue):
        if self.kek is None:
            return func.enc(cast(bindvalue, Text))
        return func.enc(cast(bindvalue, Text), self.kek)

    def column_expression(self, col):
        return func.dec_text(col, type_=Text)


class EncryptedBytes(TypeDecorator):
    """A bytes attribute stored as enc_bytea: enc(:value::bytea) / dec_bytea(col)."""
    impl = EncBytea
    cache_ok = True

    def bind_expression(self, bindvalue):
        return func.enc(cast(bindvalue, LargeBinary))

    def column_expression(self, col):
        return func.dec_bytea(col, type_=LargeBinary)


class Patient(Base):
    """An ORM model on a base table with TypeDecorator columns."""
    __tablename__ = ORM_TABLE
    id = Column(Integer, primary_key=True)
    name = Column(Text, nullable=False)
    diagnosis = Column(EncryptedText())
    insurer_note = Column(EncryptedText(kek="pii"))
    scan = Column(EncryptedBytes())


class SQLAlchemyTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        # No URL parts: libpq takes PGHOST, PGPORT, PGDATABASE, PGUSER.
        cls.engine = create_engine("postgresql+psycopg2://", future=True)
        Base.metadata.create_all(cls.engine, tables=[Patient.__table__])

    @classmethod
    def tearDownClass(cls):
        cls.engine.dispose()

    def test_view_model(self):
        with Session(self.engine) as s:
            c = Customer(name="orm", ssn=SECRETS[0], card=CARD, blob=BLOB)
            s.add(c)
            s.commit()
            self.assertIsInstance(c.id, int)                # from RETURNING through the trigger
            self.assertIsNotNone(c.created_at)
            cid = c.id
        with Session(self.engine) as s:
            c = s.get(Customer, cid)
            self.assertEqual((c.name, c.ssn, c.card, c.blob), ("orm", SECRETS[0], CARD, BLOB))
            c.ssn = SECRETS[2]
            s.commit()
        with self.engine.connect() as conn:
            ssn_raw, card_raw, blob_raw = conn.execute(
                text("SELECT ssn::text, card::text, blob::text FROM %s WHERE id = :id" % TABLE),
                {"id": cid}).one()
        for v in (ssn_raw, card_raw, blob_raw):
            Plaintext.assert_hidden(self, v, [SECRETS[0], SECRETS[2], CARD, BLOB])
        with Session(self.engine) as s:
            self.assertEqual(s.get(Customer, cid).ssn, SECRETS[2])
            found = s.execute(select(Customer).where(Customer.name == "orm")).scalars().all()
            self.assertEqual([x.id for x in found], [cid])
            s.delete(found[0])
            s.commit()
        with self.engine.connect() as conn:
            self.assertEqual(conn.execute(text("SELECT count(*) FROM %s WHERE id = :id" % TABLE),
                                          {"id": cid}).scalar(), 0)

    def test_view_model_copied_value(self):
        with Session(self.engine) as s:
            a, b = Customer(name="a", ssn="ssn a", card="card a"), Customer(name="b", ssn="ssn b", card="card b")
            s.add_all([a, b])
            s.commit()
            ida, idb = a.id, b.id
        with self.engine.begin() as conn:
            conn.execute(text("UPDATE %s SET ssn = (SELECT ssn FROM %s WHERE id = :a), "
                              "card = (SELECT card FROM %s WHERE id = :a) WHERE id = :b" % (TABLE, TABLE, TABLE)),
                         {"a": ida, "b": idb})
        with Session(self.engine) as s:
            self.assertEqual(s.execute(select(Customer.ssn).where(Customer.id == idb)).scalar(), "ssn a")
            with self.assertRaises(sqlalchemy.exc.DBAPIError) as cm:
                s.execute(select(Customer.card).where(Customer.id == idb)).scalar()
            self.assertEqual(cm.exception.orig.pgcode, "XX001")
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM %s WHERE id IN (:a, :b)" % TABLE), {"a": ida, "b": idb})

    def test_type_decorator(self):
        with Session(self.engine) as s:
            p = Patient(name="tdec", diagnosis=SECRETS[1], insurer_note="note for the insurer", scan=BLOB)
            s.add(p)
            s.commit()
            pid = p.id
        with Session(self.engine) as s:
            p = s.get(Patient, pid)
            self.assertEqual((p.diagnosis, p.insurer_note, p.scan), (SECRETS[1], "note for the insurer", BLOB))
            p.diagnosis = SECRETS[2]
            s.commit()
        with Session(self.engine) as s:
            self.assertEqual(s.get(Patient, pid).diagnosis, SECRETS[2])
            # Expressions in queries go through column_expression too.
            got = s.execute(select(Patient.diagnosis).where(Patient.name == "tdec")).scalar()
            self.assertEqual(got, SECRETS[2])
        # The SQL the ORM emits: enc() on the way in, dec_text() on the way out.
        stmt = str(select(Patient.diagnosis).compile(self.engine))
        self.assertIn("dec_text(%s.diagnosis)" % ORM_TABLE, stmt)
        ins = str(sqlalchemy.insert(Patient.__table__).values(diagnosis="x").compile(self.engine))
        self.assertIn("enc(CAST(", ins)
        with self.engine.connect() as conn:
            d_raw, n_raw, s_raw, kek = conn.execute(
                text("SELECT diagnosis::text, insurer_note::text, scan::text, envelope.kek_of(diagnosis) "
                     "FROM %s WHERE id = :id" % ORM_TABLE), {"id": pid}).one()
        self.assertEqual(kek, "pii")
        for v in (d_raw, n_raw, s_raw):
            Plaintext.assert_hidden(self, v, [SECRETS[1], SECRETS[2], "note for the insurer", BLOB])
        # A raw value written back unchanged into another row still decrypts (no context).
        with self.engine.begin() as conn:
            qid = conn.execute(text("INSERT INTO %s (name, diagnosis) VALUES ('copy', :raw) RETURNING id"
                                    % ORM_TABLE), {"raw": d_raw}).scalar()
        with Session(self.engine) as s:
            self.assertEqual(s.get(Patient, qid).diagnosis, SECRETS[2])
            s.execute(sqlalchemy.delete(Patient).where(Patient.id.in_([pid, qid])))
            s.commit()


if __name__ == "__main__":
    prog = unittest.main(exit=False, verbosity=2)
    r = prog.result
    print("python: %d passed, %d failed" % (r.testsRun - len(r.failures) - len(r.errors),
                                                     len(r.failures) + len(r.errors)))
    sys.exit(0 if r.wasSuccessful() else 1)
