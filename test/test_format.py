#!/usr/bin/python3
"""Decrypt enc_bytea values without envelope: docs/format.md, followed literally.

Values are made by enc() in PostgreSQL; this program parses them as
docs/format.md describes, unwraps the data key with the independent hvac
Vault client, derives the key, checks the commitment and opens the GCM box.
Needs the dev environment (eval "$(test/devenv up)").
"""
import base64
import hashlib
import hmac
import os
import struct
import sys
import unittest

import hvac
import psycopg2
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

INFO = b"envelope v1 AES-256-GCM value key and commitment"


def vault():
    """An hvac client for the dev environment's KMS."""
    return hvac.Client(url=os.environ["VAULT_ADDR"], token=os.environ["VAULT_TOKEN"],
                       verify=os.environ["VAULT_CACERT"])


def unwrap(provider, key_ref, version, wrapped):
    """The data key, unwrapped by Vault Transit from the stored raw bytes."""
    assert provider == b"vault"
    ct = "vault:v%d:%s" % (version, base64.b64encode(wrapped).decode())
    r = vault().secrets.transit.decrypt_data(name=key_ref.decode(), ciphertext=ct)
    return base64.b64decode(r["data"]["plaintext"])


def parse(value):
    """The fields of a value, as docs/format.md lays them out."""
    assert value[0] == 1 and value[1] == 1
    f = {"header": value[:88], "flags": struct.unpack(">H", value[2:4])[0],
         "created_at": struct.unpack(">q", value[4:12])[0],
         "salt": value[12:44], "nonce": value[44:56], "commit": value[56:88]}
    p = 88
    n = value[p]; f["kek_name"] = value[p + 1:p + 1 + n]; p += 1 + n
    n = value[p]; f["provider"] = value[p + 1:p + 1 + n]; p += 1 + n
    n = struct.unpack(">H", value[p:p + 2])[0]; f["key_ref"] = value[p + 2:p + 2 + n]; p += 2 + n
    f["version"] = struct.unpack(">I", value[p:p + 4])[0]; p += 4
    n = struct.unpack(">H", value[p:p + 2])[0]; f["wrapped"] = value[p + 2:p + 2 + n]; p += 2 + n
    f["ct_and_tag"] = value[p:]
    return f


def decrypt(value, context=b""):
    """Plaintext of a value, or an exception."""
    f = parse(value)
    dek = unwrap(f["provider"], f["key_ref"], f["version"], f["wrapped"])
    prk = hmac.new(f["salt"], dek, hashlib.sha256).digest()
    t1 = hmac.new(prk, INFO + b"\x01", hashlib.sha256).digest()
    t2 = hmac.new(prk, t1 + INFO + b"\x02", hashlib.sha256).digest()
    if not hmac.compare_digest(t2, f["commit"]):
        raise ValueError("key commitment mismatch")
    aad = f["header"] + struct.pack(">I", len(context)) + context
    return AESGCM(t1).decrypt(f["nonce"], f["ct_and_tag"], aad)


class IndependentDecrypt(unittest.TestCase):
    """Values written by enc() decrypt with this program alone."""

    @classmethod
    def setUpClass(cls):
        cls.conn = psycopg2.connect("")
        cls.conn.autocommit = True

    def value(self, sql, *args):
        """Raw bytes of an enc_bytea from its text form."""
        cur = self.conn.cursor()
        cur.execute("SELECT (" + sql + ")::text", args)
        text = cur.fetchone()[0]
        self.assertTrue(text.startswith("enc:"))
        return base64.b64decode(text[4:], validate=True)

    def test_text_and_bytes(self):
        for pt in [b"", b"\x00", "naïve 東京".encode(), os.urandom(70000)]:
            v = self.value("enc(%s::bytea, 'pii')", psycopg2.Binary(pt))
            self.assertEqual(decrypt(v), pt)
            self.assertEqual(len(v), 185 + len(pt))

    def test_context(self):
        v = self.value("enc('ctx'::text, 'pii', 'row:7'::bytea)")
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

    def test_wrong_key_refused_by_commitment(self):
        a = parse(self.value("enc('a'::text, 'pii')"))
        b = self.value("enc('b'::text, 'pii')")
        # Graft a's salt onto b: the derived commitment no longer matches.
        forged = b[:12] + a["salt"] + b[44:]
        with self.assertRaisesRegex(ValueError, "commitment"):
            decrypt(forged)


if __name__ == "__main__":
    sys.exit(0 if unittest.main(exit=False, verbosity=2).result.wasSuccessful() else 1)
