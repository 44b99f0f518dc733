#!/usr/bin/python3
"""Decrypt and encrypt enc_bytea values without envelope: docs/format.md, followed literally.

Values made by enc() in PostgreSQL are parsed as docs/format.md describes,
their data key is unwrapped with the independent hvac Vault client, the
per-value key is derived (algorithm 2: AES-256 under the data key;
algorithm 1: HKDF-SHA256), the commitment is checked and the GCM box opened.
The other way round, values of both algorithms are sealed here, under a
data key from the KMS's datakey endpoint and a KEK section built for a KEK
in envelope.kek, and envelope's dec() must open them; tampered copies
(algorithm byte, salt) must fail with SQLSTATE XX001.
Needs the dev environment (eval "$(test/devenv up)").
"""
import base64
import functools
import hashlib
import hmac
import os
import re
import struct
import sys
import time
import unittest

import hvac
import psycopg2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INFO = b"envelope v1 AES-256-GCM value key and commitment"
COMMIT_LABEL = b"envelope v2 AES-256-GCM key commitment"
KEK = "pii"                     # registered by test/devenv up
DATA_CORRUPTED = "XX001"        # what dec() raises for a value that does not open (funcs.c)
COMMITMENT_DETAIL = "The key commitment does not match"
AUTH_DETAIL = "Authentication failed"


@functools.lru_cache(maxsize=None)
def vault():
    """An hvac client for the dev environment's KMS (one, kept open)."""
    return hvac.Client(url=os.environ["VAULT_ADDR"], token=os.environ["VAULT_TOKEN"],
                       verify=os.environ["VAULT_CACERT"])


def unwrap(provider, key_ref, version, wrapped):
    """The data key, unwrapped by Vault Transit from the stored raw bytes."""
    assert provider == b"vault"
    ct = "vault:v%d:%s" % (version, base64.b64encode(wrapped).decode())
    r = vault().secrets.transit.decrypt_data(name=key_ref.decode(), ciphertext=ct)
    return base64.b64decode(r["data"]["plaintext"])


def datakey(key_ref):
    """A fresh data key from Vault Transit: (DEK, KEK version, raw wrapped bytes)."""
    r = vault().secrets.transit.generate_data_key(name=key_ref, key_type="plaintext")
    m = re.fullmatch(r"vault:v(\d+):([A-Za-z0-9+/=]+)", r["data"]["ciphertext"])
    assert m, r["data"]["ciphertext"]
    return (base64.b64decode(r["data"]["plaintext"]), int(m.group(1)),
            base64.b64decode(m.group(2), validate=True))


def parse(value):
    """The fields of a value, as docs/format.md lays them out."""
    assert value[0] == 1 and value[1] in (1, 2)
    f = {"algo": value[1], "header": value[:88], "flags": struct.unpack(">H", value[2:4])[0],
         "created_at": struct.unpack(">q", value[4:12])[0],
         "salt": value[12:44], "nonce": value[44:56], "commit": value[56:88]}
    p = 88
    n = value[p]; f["kek_name"] = value[p + 1:p + 1 + n]; p += 1 + n
    n = value[p]; f["provider"] = value[p + 1:p + 1 + n]; p += 1 + n
    n = struct.unpack(">H", value[p:p + 2])[0]; f["key_ref"] = value[p + 2:p + 2 + n]; p += 2 + n
    f["version"] = struct.unpack(">I", value[p:p + 4])[0]; p += 4
    n = struct.unpack(">H", value[p:p + 2])[0]; f["wrapped"] = value[p + 2:p + 2 + n]; p += 2 + n
    f["kek_section"] = value[88:p]
    f["ct_and_tag"] = value[p:]
    return f


def aes_block(dek, block):
    """AES-256-ECB(DEK, one 16-byte block)."""
    assert len(block) == 16
    enc = Cipher(algorithms.AES(dek), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def derive(algo, dek, salt):
    """(value key, commitment) of a value, step 3 of "Decrypting a value"."""
    if algo == 2:
        key = aes_block(dek, b"\x01" + salt[:15]) + aes_block(dek, b"\x02" + salt[:15])
        return key, hashlib.sha256(COMMIT_LABEL + dek).digest()
    assert algo == 1
    prk = hmac.new(salt, dek, hashlib.sha256).digest()
    t1 = hmac.new(prk, INFO + b"\x01", hashlib.sha256).digest()
    t2 = hmac.new(prk, t1 + INFO + b"\x02", hashlib.sha256).digest()
    return t1, t2


def open_value(value, dek, context=b""):
    """Plaintext of a value under a known data key, or an exception."""
    f = parse(value)
    key, expected = derive(f["algo"], dek, f["salt"])
    if not hmac.compare_digest(expected, f["commit"]):
        raise ValueError("key commitment mismatch")
    aad = f["header"] + struct.pack(">I", len(context)) + context
    return AESGCM(key).decrypt(f["nonce"], f["ct_and_tag"], aad)


def value_dek(value):
    """The data key of a value, from the KMS."""
    f = parse(value)
    return unwrap(f["provider"], f["key_ref"], f["version"], f["wrapped"])


def decrypt(value, context=b""):
    """Plaintext of a value, or an exception."""
    return open_value(value, value_dek(value), context)


def kek_section(kek_name, provider, key_ref, version, wrapped):
    """Bytes 88 up to the ciphertext, per the Layout table."""
    return (bytes([len(kek_name)]) + kek_name + bytes([len(provider)]) + provider +
            struct.pack(">H", len(key_ref)) + key_ref + struct.pack(">I", version) +
            struct.pack(">H", len(wrapped)) + wrapped)


def seal(algo, dek, section, plaintext, context=b"", text=False):
    """A complete value sealed here with the given algorithm (no envelope code)."""
    salt, nonce = os.urandom(32), os.urandom(12)
    if algo == 2:
        # The value key exactly as docs/format.md states it, block by block.
        key = aes_block(dek, b"\x01" + salt[0:15]) + aes_block(dek, b"\x02" + salt[0:15])
        commit = hashlib.sha256(COMMIT_LABEL + dek).digest()
    else:
        # HKDF-SHA256 from the cryptography package, not the HMACs of derive().
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=INFO).derive(dek)
        key, commit = okm[:32], okm[32:]
    flags = (1 if context else 0) | (2 if text else 0)
    header = (bytes([1, algo]) + struct.pack(">H", flags) +
              struct.pack(">q", int(time.time() * 1e6)) + salt + nonce + commit)
    assert len(header) == 88
    aad = header + struct.pack(">I", len(context)) + context
    return header + section + AESGCM(key).encrypt(nonce, plaintext, aad)


def text_form(value):
    """The text form of a value: 'enc:' + base64."""
    return "enc:" + base64.b64encode(value).decode()


def with_byte(value, i, b):
    """A copy of value with byte i replaced by b."""
    return value[:i] + bytes([b]) + value[i + 1:]


class Session(unittest.TestCase):
    """A connection to the dev database and helpers around it."""

    @classmethod
    def setUpClass(cls):
        cls.conn = psycopg2.connect("")
        cls.conn.autocommit = True

    @classmethod
    def tearDownClass(cls):
        cls.conn.close()

    def value(self, sql, *args, conn=None):
        """Raw bytes of an enc_bytea from its text form."""
        cur = (conn or self.conn).cursor()
        cur.execute("SELECT (" + sql + ")::text", args)
        text = cur.fetchone()[0]
        self.assertTrue(text.startswith("enc:"))
        return base64.b64decode(text[4:], validate=True)

    def dec(self, value, context=None):
        """envelope's dec() of a raw value, given in text form (DEC is a keyword: quoted)."""
        cur = self.conn.cursor()
        if context is None:
            cur.execute('SELECT "dec"(%s::enc_bytea)', (text_form(value),))
        else:
            cur.execute('SELECT "dec"(%s::enc_bytea, %s)', (text_form(value), psycopg2.Binary(context)))
        return bytes(cur.fetchone()[0])

    def assert_dec_fails(self, value, context=None, detail=None):
        """dec() refuses the value with SQLSTATE XX001 (and detail, if given)."""
        with self.assertRaises(psycopg2.Error) as cm:
            self.dec(value, context)
        err = cm.exception
        self.assertEqual(err.pgcode, DATA_CORRUPTED, "%s (detail %r)" % (err.pgerror, err.diag.message_detail))
        if detail is not None:
            self.assertIn(detail, err.diag.message_detail or "")


class IndependentDecrypt(Session):
    """Values written by enc() decrypt with this program alone."""

    def test_text_and_bytes(self):
        for pt in [b"", b"\x00", "naïve 東京".encode(), os.urandom(70000)]:
            v = self.value("enc(%s::bytea, 'pii')", psycopg2.Binary(pt))
            self.assertEqual(v[1], 2, "enc() writes algorithm 2")
            self.assertEqual(decrypt(v), pt)
            self.assertEqual(len(v), 185 + len(pt))

    def test_context(self):
        v = self.value("enc('ctx'::text, 'pii', 'row:7'::bytea)")
        self.assertEqual(v[1], 2)
        self.assertEqual(decrypt(v, b"row:7"), b"ctx")
        self.assertEqual(parse(v)["flags"] & 1, 1)
        with self.assertRaises(Exception):
            decrypt(v, b"row:8")

    def test_rewrapped(self):
        cur = self.conn.cursor()
        cur.execute("SELECT enc('rotate me'::text, 'pii')::text")
        before = base64.b64decode(cur.fetchone()[0][4:])
        cur.execute("SELECT envelope.rotate_kek('pii')")
        v = self.value("rewrap(%s::enc_bytea)", "enc:" + base64.b64encode(before).decode())
        self.assertEqual(parse(v)["version"], parse(before)["version"] + 1)
        self.assertEqual(parse(v)["header"], parse(before)["header"])
        self.assertEqual(parse(v)["ct_and_tag"], parse(before)["ct_and_tag"])
        self.assertEqual(decrypt(v), b"rotate me")

    def test_commitment_per_data_key(self):
        # Three values in one statement: at least two share the current data key.
        cur = self.conn.cursor()
        cur.execute("SELECT enc('same key ' || i, 'pii')::text FROM generate_series(1, 3) i")
        by_key = {}
        for (text,) in cur.fetchall():
            v = base64.b64decode(text[4:], validate=True)
            by_key.setdefault(parse(v)["kek_section"], []).append(v)
        shared = max(by_key.values(), key=len)
        self.assertGreaterEqual(len(shared), 2, "no two values under one data key")
        a, b = parse(shared[0]), parse(shared[1])
        self.assertNotEqual(a["salt"], b["salt"])
        self.assertEqual(a["commit"], b["commit"], "one data key, one commitment")
        dek = value_dek(shared[0])
        self.assertEqual(a["commit"], hashlib.sha256(COMMIT_LABEL + dek).digest())

        # With dek_max_uses = 1 every value gets its own data key, and its own commitment.
        fresh = psycopg2.connect("", options="-c envelope.dek_max_uses=1")
        fresh.autocommit = True
        try:
            c = self.value("enc('key 1'::text, 'pii')", conn=fresh)
            d = self.value("enc('key 2'::text, 'pii')", conn=fresh)
        finally:
            fresh.close()
        self.assertNotEqual(parse(c)["wrapped"], parse(d)["wrapped"])
        self.assertNotEqual(value_dek(c), value_dek(d))
        self.assertNotEqual(parse(c)["commit"], parse(d)["commit"])
        self.assertEqual(parse(c)["commit"], hashlib.sha256(COMMIT_LABEL + value_dek(c)).digest())
        self.assertEqual(decrypt(c), b"key 1")
        self.assertEqual(decrypt(d), b"key 2")

    def test_wrong_key_refused_by_commitment(self):
        fresh = psycopg2.connect("", options="-c envelope.dek_max_uses=1")
        fresh.autocommit = True
        try:
            a = self.value("enc('a'::text, 'pii')", conn=fresh)
            b = self.value("enc('b'::text, 'pii')", conn=fresh)
        finally:
            fresh.close()
        self.assertNotEqual(parse(a)["wrapped"], parse(b)["wrapped"])
        # Graft a's wrapped data key onto b: the commitment no longer matches.
        fb = parse(b)
        forged = b[:88] + parse(a)["kek_section"] + fb["ct_and_tag"]
        with self.assertRaisesRegex(ValueError, "commitment"):
            decrypt(forged)
        self.assert_dec_fails(forged, detail=COMMITMENT_DETAIL)
        # Algorithm 2's commitment does not depend on the salt: a grafted
        # salt leaves it matching, and GCM (salt in the key and the AAD) refuses.
        grafted = b[:12] + parse(self.value("enc('c'::text, 'pii')"))["salt"] + b[44:]
        with self.assertRaises(InvalidTag):
            decrypt(grafted)
        self.assert_dec_fails(grafted, detail=AUTH_DETAIL)

    def test_salt_tampering(self):
        v = self.value("enc('salt check'::text, 'pii')")
        dek = value_dek(v)
        self.assertEqual(open_value(v, dek), b"salt check")
        self.assertEqual(self.dec(v), b"salt check")
        # Bytes 0..14 of the salt feed the value key; 15..31 are only authenticated.
        for i in range(32):
            with self.subTest(salt_byte=i):
                bad = with_byte(v, 12 + i, v[12 + i] ^ 0x01)
                with self.assertRaises(InvalidTag):
                    open_value(bad, dek)
                self.assert_dec_fails(bad, detail=AUTH_DETAIL)


class IndependentEncrypt(Session):
    """Values sealed here, per docs/format.md, open with envelope's dec()."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cur = cls.conn.cursor()
        cur.execute("SELECT name, provider, key_ref FROM envelope.keks WHERE name = %s", (KEK,))
        row = cur.fetchone()
        assert row is not None, "KEK %s is not registered" % KEK
        cls.kek = [s.encode() for s in row]
        cls.dek, cls.version, cls.wrapped = datakey(row[2])
        cls.section = kek_section(*cls.kek, cls.version, cls.wrapped)
        cur.execute("CREATE TEMP TABLE indep (id int PRIMARY KEY, v enc_bytea)")

    def insert_and_dec(self, value, context=None, text=False):
        """Insert a value in text form, then envelope's dec() (or dec_text()) of the stored row."""
        cur = self.conn.cursor()
        cur.execute("INSERT INTO indep VALUES ((SELECT coalesce(max(id), 0) + 1 FROM indep), %s) RETURNING id",
                    (text_form(value),))
        rid = cur.fetchone()[0]
        fn = "dec_text" if text else '"dec"'
        cur.execute("SELECT %s(v, %%s), v::text = %%s FROM indep WHERE id = %%s" % fn,
                    (None if context is None else psycopg2.Binary(context), text_form(value), rid))
        out, same = cur.fetchone()
        self.assertTrue(same, "the stored value is not byte-identical")
        return out if text else bytes(out)

    def test_datakey_and_kek_section(self):
        self.assertEqual(len(self.dek), 32)
        self.assertEqual(unwrap(self.kek[1], self.kek[2], self.version, self.wrapped), self.dek)
        v = seal(2, self.dek, self.section, b"layout")
        f = parse(v)
        self.assertEqual((f["kek_name"], f["provider"], f["key_ref"]), tuple(self.kek))
        self.assertEqual((f["version"], f["wrapped"]), (self.version, self.wrapped))
        self.assertEqual(len(v), 88 + len(self.section) + len(b"layout") + 16)
        # The library's HKDF and the HMACs of docs/format.md agree.
        salt = os.urandom(32)
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=INFO).derive(self.dek)
        self.assertEqual(derive(1, self.dek, salt), (okm[:32], okm[32:]))

    def test_envelope_decrypts_both_algorithms(self):
        for algo in (1, 2):
            for pt in [b"", b"\x00\xff", os.urandom(1000)]:
                with self.subTest(algo=algo, length=len(pt)):
                    v = seal(algo, self.dek, self.section, pt)
                    self.assertEqual(v[1], algo)
                    self.assertEqual(decrypt(v), pt)
                    self.assertEqual(self.insert_and_dec(v), pt)
                    self.assertEqual(self.insert_and_dec(v, b""), pt, "empty context = none")
                    self.assert_dec_fails(v, b"ctx", detail=AUTH_DETAIL)

    def test_envelope_decrypts_with_context(self):
        for algo in (1, 2):
            with self.subTest(algo=algo):
                pt = ("algorithm %d, bound to row 42" % algo).encode()
                v = seal(algo, self.dek, self.section, pt, b"row:42")
                self.assertEqual(parse(v)["flags"], 1)
                self.assertEqual(self.insert_and_dec(v, b"row:42"), pt)
                self.assert_dec_fails(v, b"row:43", detail=AUTH_DETAIL)
                self.assert_dec_fails(v, None, detail=AUTH_DETAIL)

    def test_envelope_decrypts_text(self):
        for algo in (1, 2):
            with self.subTest(algo=algo):
                s = "algorithm %d: Grüße, 東京" % algo
                v = seal(algo, self.dek, self.section, s.encode(), b"t", text=True)
                self.assertEqual(parse(v)["flags"], 3)
                self.assertEqual(self.insert_and_dec(v, b"t", text=True), s)

    def test_metadata_names_algorithm(self):
        cur = self.conn.cursor()
        for algo, kdf in ((1, "HKDF-SHA256"), (2, "AES-256")):
            with self.subTest(algo=algo):
                v = seal(algo, self.dek, self.section, b"meta", b"c")
                cur.execute("SELECT envelope.metadata(%s::enc_bytea)", (text_form(v),))
                m = cur.fetchone()[0]
                f = parse(v)
                self.assertEqual(m.get("algorithm"), algo)
                self.assertEqual(m.get("kdf"), kdf)
                self.assertEqual((m["kek_id"], m["kek_provider"], m["kek_key_ref"]),
                                 tuple(s.decode() for s in self.kek))
                self.assertEqual(m["kek_version"], self.version)
                self.assertEqual(base64.b64decode(m["salt_b64"]), f["salt"])
                self.assertEqual(base64.b64decode(m["commitment_b64"]), f["commit"])
                self.assertEqual((m["ciphertext_length"], m["context_bound"]), (4, True))

    def test_algorithm_byte_swapped(self):
        for algo, other in ((1, 2), (2, 1)):
            with self.subTest(sealed=algo, claimed=other):
                v = seal(algo, self.dek, self.section, b"swap me")
                self.assertEqual(self.insert_and_dec(v), b"swap me")
                bad = with_byte(v, 1, other)
                # The commitment of the claimed algorithm differs from the stored one.
                with self.assertRaisesRegex(ValueError, "commitment"):
                    open_value(bad, self.dek)
                self.assert_dec_fails(bad, detail=COMMITMENT_DETAIL)
                # Even with the claimed algorithm's commitment put in, the
                # header (in the AAD) and the value key no longer match.
                forged = bad[:56] + derive(other, self.dek, parse(v)["salt"])[1] + bad[88:]
                with self.assertRaises(InvalidTag):
                    open_value(forged, self.dek)
                self.assert_dec_fails(forged, detail=AUTH_DETAIL)
        # And a value written by enc() (algorithm 2) claimed as algorithm 1.
        v = self.value("enc('from enc'::text, 'pii')")
        self.assertEqual(v[1], 2)
        self.assert_dec_fails(with_byte(v, 1, 1), detail=COMMITMENT_DETAIL)

    def test_algorithm_2_salt_tampering(self):
        v = seal(2, self.dek, self.section, b"salted")
        self.assertEqual(self.insert_and_dec(v), b"salted")
        for i in (0, 7, 14, 15, 23, 31):   # inside salt[0:15] (key input), inside salt[15:32] (AAD only)
            with self.subTest(salt_byte=i):
                bad = with_byte(v, 12 + i, v[12 + i] ^ 0x80)
                with self.assertRaises(InvalidTag):
                    open_value(bad, self.dek)
                self.assert_dec_fails(bad, detail=AUTH_DETAIL)


class BothImplementations(IndependentEncrypt):
    """envelope.crypto_backend = auto (src/aesgcm.c where the CPU has VAES/AVX-512)
    and openssl write and read the same bytes: every length up to 70 and the
    lengths around 64-, 256- and 4096-byte boundaries, contexts that fit the
    512-byte AAD buffer and one that does not, inline and TOASTed rows (a
    TOASTed row is decrypted into the front of its own detoasted copy).
    Each value written opens with Python's cryptography package.  The tests
    inherited from IndependentEncrypt run again here with openssl."""

    LENGTHS = (list(range(0, 70)) + [95, 96, 97, 127, 128, 129, 255, 256, 257, 1000, 2047,
                                     4095, 4096, 4097, 8192 + 13, 70001])
    CONTEXTS = (None, b"c", b"x" * 500)

    def set_backend(self, name):
        self.conn.cursor().execute("SET envelope.crypto_backend = %s", (name,))

    def setUp(self):
        self.set_backend("openssl")

    def tearDown(self):
        self.conn.cursor().execute("RESET envelope.crypto_backend")

    def test_implementation_matches_cpu(self):
        # Guards against testing OpenSSL twice on a CPU that has the instructions.
        cur = self.conn.cursor()
        cur.execute("SHOW envelope.crypto_implementation")
        impl = cur.fetchone()[0]
        with open("/proc/cpuinfo") as f:
            flags = set(next(l for l in f if l.startswith("flags")).split())
        needed = {"aes", "pclmulqdq", "avx2", "avx512f", "avx512bw", "avx512vl", "vaes", "vpclmulqdq"}
        self.assertEqual(impl, "vaes-avx512" if needed <= flags else "openssl", sorted(needed - flags))
        with self.assertRaises(psycopg2.Error) as cm:
            cur.execute("SET envelope.crypto_implementation = 'openssl'")
        self.assertEqual(cm.exception.pgcode, "55P02")   # cant_change_runtime_param

    def test_each_writes_what_both_read(self):
        cur = self.conn.cursor()
        cur.execute("CREATE TEMP TABLE both_impl (id int PRIMARY KEY, len int, ctx bytea, v enc_bytea)")
        cur.execute("ALTER TABLE both_impl ALTER COLUMN v SET STORAGE EXTERNAL")
        rows = {}
        rid = 0
        for writer in ("auto", "openssl"):
            self.set_backend(writer)
            for ctx in self.CONTEXTS:
                for n in self.LENGTHS:
                    rid += 1
                    pt = os.urandom(n)
                    cur.execute("INSERT INTO both_impl VALUES (%s, %s, %s, enc(%s::bytea, %s, %s)) RETURNING v::text",
                                (rid, n, None if ctx is None else psycopg2.Binary(ctx), psycopg2.Binary(pt), KEK,
                                 None if ctx is None else psycopg2.Binary(ctx)))
                    v = base64.b64decode(cur.fetchone()[0][4:])
                    with self.subTest(writer=writer, length=n, context=ctx and len(ctx)):
                        self.assertEqual(decrypt(v, ctx or b""), pt)
                    rows[rid] = (writer, n, ctx, pt, v)
        self.assertGreater(len(rows), 500)
        for reader in ("auto", "openssl"):
            self.set_backend(reader)
            # stored rows (TOASTed when large): one statement
            cur.execute('SELECT id, "dec"(v, ctx) FROM both_impl ORDER BY id')
            got = {r[0]: bytes(r[1]) for r in cur.fetchall()}
            for rid, (writer, n, ctx, pt, v) in rows.items():
                with self.subTest(reader=reader, writer=writer, length=n, context=ctx and len(ctx)):
                    self.assertEqual(got[rid], pt)
            # a flipped tag bit fails under both, also for TOASTed rows
            forged = [rid for rid, r in rows.items() if rid % 5 == 0]
            for rid in forged:
                v = rows[rid][4]
                cur.execute("UPDATE both_impl SET v = %s::enc_bytea WHERE id = %s",
                            (text_form(with_byte(v, len(v) - 1, v[-1] ^ 0x01)), rid))
            for rid in forged:
                writer, n, ctx, pt, v = rows[rid]
                with self.subTest(reader=reader, forged=rid, length=n):
                    with self.assertRaises(psycopg2.Error) as cm:
                        cur.execute('SELECT "dec"(v, ctx) FROM both_impl WHERE id = %s', (rid,))
                    self.assertEqual(cm.exception.pgcode, DATA_CORRUPTED)
            for rid in forged:
                cur.execute("UPDATE both_impl SET v = %s::enc_bytea WHERE id = %s", (text_form(rows[rid][4]), rid))

    def test_fresh_values_open_with_both(self):
        # dec(enc(...)) in one expression: the value is a fresh in-memory datum and the
        # plaintext goes to a new buffer that may lie before or after it (both layouts
        # must work; the OpenSSL path once took a separate buffer after the input for an
        # overlapping one and crashed).
        cur = self.conn.cursor()
        for backend in ("auto", "openssl"):
            self.set_backend(backend)
            for n in (0, 1, 15, 16, 17, 100, 1000, 5000):
                with self.subTest(backend=backend, length=n):
                    cur.execute("SELECT dec_text(enc(repeat('x', %s), %s)), "
                                "\"dec\"(enc(convert_to(repeat('y', %s), 'UTF8'), %s, 'c'::bytea), 'c'::bytea)",
                                (n, KEK, n, KEK))
                    text, raw = cur.fetchone()
                    self.assertEqual(text, "x" * n)
                    self.assertEqual(bytes(raw), b"y" * n)

    def test_python_sealed_open_with_both(self):
        for reader in ("auto", "openssl"):
            self.set_backend(reader)
            for n in (0, 1, 16, 17, 100, 256, 4096, 4100):
                for ctx in (None, b"x" * 600):
                    with self.subTest(reader=reader, length=n, context=ctx and len(ctx)):
                        pt = os.urandom(n)
                        v = seal(2, self.dek, self.section, pt, ctx or b"")
                        self.assertEqual(self.insert_and_dec(v, ctx), pt)


if __name__ == "__main__":
    sys.exit(0 if unittest.main(exit=False, verbosity=2).result.wasSuccessful() else 1)
