#!/usr/bin/python3
"""Tests of the local Vault Transit test KMS (vault_transit.py).

The server is driven with the independent hvac client and, where hvac has no
call or validates too much, with raw requests.  Each test class starts its
own server on free ports in a fresh temporary directory.

Run: /usr/bin/python3 test/kms/test_vault_transit.py
"""

import base64
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import statistics
import subprocess
import tempfile
import time
import unittest

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vault_transit.py")
CIPHERTEXT_RE = re.compile(r"vault:v(\d+):([A-Za-z0-9+/]+={0,2})")
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(raw):
    """Standard base64 as str."""
    return base64.b64encode(raw).decode("ascii")


def free_ports(count):
    """count distinct currently free TCP ports on 127.0.0.1."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class KmsProcess:
    """One vault_transit.py process and helpers to talk to it."""

    def __init__(self, state_dir, log_path):
        """Choose ports; nothing is started yet."""
        self.state_dir, self.log_path = state_dir, log_path
        self.port, self.admin_port = free_ports(2)
        self.proc = None

    @property
    def url(self):
        """Base URL of the HTTPS listener."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self):
        """Path of the CA certificate."""
        return os.path.join(self.state_dir, "ca.pem")

    @property
    def token(self):
        """The root token from the token file."""
        with open(os.path.join(self.state_dir, "token"), encoding="ascii") as f:
            return f.read().strip()

    def start(self):
        """Start the server and wait for its READY line."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/bin/python3", SERVER, "--dir", self.state_dir, "--port", str(self.port),
                 "--admin-port", str(self.admin_port)],
                stdout=subprocess.PIPE, stderr=log)
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline().decode() if ready else ""
        if line.strip() != f"READY {self.url}":
            self.proc.kill()
            raise RuntimeError(f"server did not become ready: {line!r}")

    def stop(self, signum=signal.SIGTERM):
        """Signal the server and return its exit status."""
        self.proc.send_signal(signum)
        status = self.proc.wait(10)
        self.proc.stdout.close()
        return status

    def client(self, token=None):
        """An hvac client with the root token (or the given one)."""
        return hvac.Client(url=self.url, token=token or self.token, verify=self.ca)

    def session(self):
        """A keep-alive requests session trusting the test CA."""
        session = requests.Session()
        session.verify = self.ca
        return session

    def call(self, method, path, body=None, token="root", session=None, headers=None, **kwargs):
        """Raw request to /v1/transit/<path>; token "root" means the root token, None no token."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["X-Vault-Token"] = self.token if token == "root" else token
        sender = session or requests
        return sender.request(method, f"{self.url}/v1/transit/{path}", json=body, headers=all_headers,
                              verify=self.ca, **kwargs)

    def admin(self, method, path, body=None, expect=200):
        """Admin API call returning the decoded JSON answer."""
        resp = requests.request(method, f"http://127.0.0.1:{self.admin_port}{path}", json=body, timeout=5)
        if resp.status_code != expect:
            raise AssertionError(f"admin {method} {path}: {resp.status_code} {resp.text}")
        return resp.json()

    def fault(self, mode, count=None):
        """Set the fault mode."""
        body = {"mode": mode} if count is None else {"mode": mode, "count": count}
        return self.admin("POST", "/fault", body)


class KmsTestCase(unittest.TestCase):
    """Base class: one server per test class."""

    @classmethod
    def setUpClass(cls):
        """Start a server in a fresh temporary directory."""
        cls.tmp = tempfile.mkdtemp(prefix="kms-test-")
        cls.kms = KmsProcess(os.path.join(cls.tmp, "state"), os.path.join(cls.tmp, "kms.log"))
        cls.kms.start()

    @classmethod
    def tearDownClass(cls):
        """Stop the server and remove the directory."""
        if cls.kms.proc.poll() is None:
            cls.kms.stop()
        shutil.rmtree(cls.tmp)

    def client(self, token=None):
        """An hvac client closed at the end of the test."""
        client = self.kms.client(token)
        self.addCleanup(client.adapter.close)
        return client

    def assertVaultError(self, resp, status, message=None):
        """Check a raw response is a Vault error with that status (and message)."""
        self.assertEqual(resp.status_code, status, resp.text)
        self.assertEqual(resp.headers["Content-Type"], "application/json")
        errors = resp.json()["errors"]
        if message is not None:
            self.assertEqual(errors, [message])
        return errors

    def data(self, resp):
        """The data of a successful raw response."""
        self.assertEqual(resp.status_code, 200, resp.text)
        self.assertEqual(resp.headers["Content-Type"], "application/json")
        return resp.json()["data"]


class TransitApiTest(KmsTestCase):
    """Endpoints, errors, keep-alive, admin API and fault modes on one server."""

    def setUp(self):
        """Fresh clients; no fault."""
        self.vault = self.client()
        self.http = self.kms.session()
        self.transit = self.vault.secrets.transit

    def tearDown(self):
        """Clear any fault and close the clients."""
        self.kms.fault("none")
        self.http.close()

    def key(self, name):
        """Create key name and return it."""
        self.transit.create_key(name)
        return name

    # ------------------------------------------------------------ files

    def test_state_files(self):
        """Certificates, token, state and pid files exist with safe modes."""
        d = self.kms.state_dir
        for name in ("ca.pem", "ca.key", "server.pem", "server.key", "token", "state.json", "kms.pid"):
            self.assertTrue(os.path.exists(os.path.join(d, name)), name)
        for name in ("ca.key", "server.key", "token", "state.json"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode), 0o600, name)
        with open(os.path.join(d, "kms.pid"), encoding="ascii") as f:
            self.assertEqual(int(f.read()), self.kms.proc.pid)
        with open(os.path.join(d, "server.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)), ["127.0.0.1", "::1"])
        context = ssl.create_default_context(cafile=self.kms.ca)
        with socket.create_connection(("127.0.0.1", self.kms.port)) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                self.assertIn(tls.version(), ("TLSv1.2", "TLSv1.3"))

    # ------------------------------------------------------------ auth

    def test_auth(self):
        """Missing or unknown tokens get 403; Bearer works; namespace is recorded."""
        self.key("auth")
        self.assertVaultError(self.kms.call("GET", "keys/auth", token=None), 403, "permission denied")
        self.assertVaultError(self.kms.call("GET", "keys/auth", token="nope"), 403, "permission denied")
        self.assertVaultError(self.kms.call("GET", "nothing/here", token=None), 403, "permission denied")
        with self.assertRaises(hvac.exceptions.Forbidden):
            self.client(token="nope").secrets.transit.read_key("auth")
        resp = self.kms.call("GET", "keys/auth", token=None,
                             headers={"Authorization": f"Bearer {self.kms.token}", "X-Vault-Namespace": "ns1/"})
        self.assertEqual(self.data(resp)["name"], "auth")
        self.assertEqual(self.kms.admin("GET", "/stats")["last_namespace"], "ns1/")

    def test_tokens(self):
        """Tokens added through the admin API work until revoked."""
        self.key("tok")
        self.assertVaultError(self.kms.call("GET", "keys/tok", token="second-token"), 403)
        self.kms.admin("POST", "/tokens", {"token": "second-token"})
        self.assertEqual(self.client(token="second-token").secrets.transit.read_key("tok")["data"]["name"], "tok")
        self.kms.admin("DELETE", "/tokens", {"token": "second-token"})
        self.assertVaultError(self.kms.call("GET", "keys/tok", token="second-token"), 403, "permission denied")
        self.kms.admin("DELETE", "/tokens", {"token": "second-token"}, expect=404)
        self.kms.admin("POST", "/tokens", {"token": ""}, expect=400)
        self.data(self.kms.call("GET", "keys/tok"))

    # ------------------------------------------------------------ keys

    def test_create_and_read_key(self):
        """Create returns key info; read has Vault's fields; create again is a no-op."""
        created = self.transit.create_key("pii")
        self.assertEqual(created["data"]["latest_version"], 1)
        info = self.transit.read_key("pii")["data"]
        self.assertEqual(info["name"], "pii")
        self.assertEqual(info["type"], "aes256-gcm96")
        self.assertEqual((info["latest_version"], info["min_decryption_version"], info["min_encryption_version"]),
                         (1, 1, 0))
        self.assertIs(info["deletion_allowed"], False)
        self.assertIs(info["exportable"], False)
        for flag in ("supports_encryption", "supports_decryption", "supports_derivation"):
            self.assertIs(info[flag], True)
        self.assertEqual(list(info["keys"]), ["1"])
        self.assertIsInstance(info["keys"]["1"], int)
        self.assertLessEqual(abs(info["keys"]["1"] - time.time()), 60)
        again = self.data(self.kms.call("POST", "keys/pii", {"type": "aes256-gcm96"}))
        self.assertEqual(again["keys"], info["keys"])
        self.data(self.kms.call("PUT", "keys/pii-put", {}))

    def test_key_errors(self):
        """Unknown keys, bad names and unsupported types."""
        with self.assertRaises(hvac.exceptions.InvalidPath):
            self.transit.read_key("missing")
        self.assertVaultError(self.kms.call("GET", "keys/missing"), 404, None)
        self.assertEqual(self.kms.call("GET", "keys/missing").json(), {"errors": []})
        self.assertVaultError(self.kms.call("POST", "keys/rsa", {"type": "rsa-2048"}), 400)
        self.assertVaultError(self.kms.call("GET", "keys/rsa"), 404)
        self.assertVaultError(self.kms.call("POST", "keys/bad%20name"), 404)
        self.assertVaultError(self.kms.call("POST", "keys/a/b"), 404)
        self.assertVaultError(self.kms.call("POST", "keys/missing/rotate"), 400)
        self.assertVaultError(self.kms.call("POST", "keys/missing/config", {"deletion_allowed": True}), 400)
        self.data(self.kms.call("POST", "keys/Ok_name-1.2"))

    def test_rotation_and_policy(self):
        """Rotate, min_decryption/min_encryption_version, deletion_allowed, rewrap."""
        self.key("rot")
        secret = os.urandom(32)
        c1 = self.transit.encrypt_data("rot", b64(secret))["data"]["ciphertext"]
        self.assertTrue(c1.startswith("vault:v1:"))
        rotated = self.transit.rotate_key("rot")
        self.assertEqual(rotated["data"]["latest_version"], 2)
        info = self.transit.read_key("rot")["data"]
        self.assertEqual((info["latest_version"], sorted(info["keys"])), (2, ["1", "2"]))
        enc = self.transit.encrypt_data("rot", b64(secret))["data"]
        self.assertEqual(enc["key_version"], 2)
        self.assertTrue(enc["ciphertext"].startswith("vault:v2:"))
        self.assertEqual(self.transit.decrypt_data("rot", c1)["data"]["plaintext"], b64(secret))
        old = self.transit.encrypt_data("rot", b64(secret), key_version=1)["data"]
        self.assertEqual(old["key_version"], 1)
        rewrapped = self.transit.rewrap_data("rot", c1)["data"]
        self.assertEqual(rewrapped["key_version"], 2)
        self.assertTrue(rewrapped["ciphertext"].startswith("vault:v2:"))
        self.assertEqual(self.transit.decrypt_data("rot", rewrapped["ciphertext"])["data"]["plaintext"], b64(secret))
        self.assertVaultError(self.kms.call("POST", "encrypt/rot", {"plaintext": "", "key_version": 3}), 400)
        self.assertVaultError(self.kms.call("POST", "rewrap/rot", {"ciphertext": c1, "key_version": 3}), 400)

        too_new = "vault:v3:" + c1.split(":", 2)[2]
        self.assertVaultError(self.kms.call("POST", "decrypt/rot", {"ciphertext": too_new}), 400, "invalid key version")

        self.transit.update_key_configuration("rot", min_decryption_version=2)
        self.assertEqual(self.transit.read_key("rot")["data"]["min_decryption_version"], 2)
        too_old = "cipher: ciphertext version is disallowed by policy (too old)"
        self.assertVaultError(self.kms.call("POST", "decrypt/rot", {"ciphertext": c1}), 400, too_old)
        self.assertVaultError(self.kms.call("POST", "rewrap/rot", {"ciphertext": c1}), 400, too_old)
        with self.assertRaises(hvac.exceptions.InvalidRequest) as ctx:
            self.transit.decrypt_data("rot", c1)
        self.assertEqual(ctx.exception.errors, [too_old])
        self.assertEqual(self.transit.decrypt_data("rot", enc["ciphertext"])["data"]["plaintext"], b64(secret))

        for bad in (0, 3, -1):
            self.assertVaultError(self.kms.call("POST", "keys/rot/config", {"min_decryption_version": bad}), 400)
        self.assertVaultError(self.kms.call("POST", "keys/rot/config", {"min_encryption_version": 1}), 400)
        self.assertVaultError(self.kms.call("POST", "keys/rot/config", {"min_encryption_version": 3}), 400)
        self.assertVaultError(self.kms.call("POST", "keys/rot/config", {"min_decryption_version": "x"}), 400)
        self.transit.rotate_key("rot")
        conf = self.data(self.kms.call("POST", "keys/rot/config",
                                       {"min_encryption_version": 3, "deletion_allowed": True}))
        self.assertEqual((conf["min_encryption_version"], conf["deletion_allowed"]), (3, True))
        self.assertVaultError(self.kms.call("POST", "encrypt/rot", {"plaintext": "", "key_version": 2}), 400)
        self.assertEqual(self.transit.encrypt_data("rot", "")["data"]["key_version"], 3)
        info = self.transit.read_key("rot")["data"]
        self.assertEqual((info["latest_version"], info["min_decryption_version"], info["min_encryption_version"],
                          info["deletion_allowed"]), (3, 2, 3, True))

    # ------------------------------------------------------------ crypto

    def test_encrypt_decrypt_roundtrip(self):
        """Round trips of several sizes; random nonces; Vault's ciphertext layout."""
        self.key("rt")
        for size in (0, 1, 31, 32, 1000):
            secret = os.urandom(size)
            enc = self.transit.encrypt_data("rt", b64(secret))["data"]
            self.assertEqual(enc["key_version"], 1)
            match = CIPHERTEXT_RE.fullmatch(enc["ciphertext"])
            self.assertIsNotNone(match, enc["ciphertext"])
            self.assertEqual(len(base64.b64decode(match.group(2))), 12 + size + 16)
            self.assertEqual(self.transit.decrypt_data("rt", enc["ciphertext"])["data"]["plaintext"], b64(secret))
        first = self.transit.encrypt_data("rt", b64(b"same"))["data"]["ciphertext"]
        second = self.transit.encrypt_data("rt", b64(b"same"))["data"]["ciphertext"]
        self.assertNotEqual(first, second)

    def test_batch_encrypt_decrypt(self):
        """batch_input as hvac sends it: one result per item, an item's failure as its error."""
        self.key("bt")
        secrets = [os.urandom(32) for _ in range(4)]
        enc = self.transit.encrypt_data("bt", plaintext=None,
                                        batch_input=[{"plaintext": b64(x)} for x in secrets])["data"]
        self.assertEqual(len(enc["batch_results"]), 4)
        cts = [r["ciphertext"] for r in enc["batch_results"]]
        self.assertEqual(len(set(cts)), 4)
        for ct, x in zip(cts, secrets):
            self.assertIsNotNone(CIPHERTEXT_RE.fullmatch(ct), ct)
            self.assertEqual(self.transit.decrypt_data("bt", ct)["data"]["plaintext"], b64(x))
        dec = self.transit.decrypt_data("bt", ciphertext=None,
                                        batch_input=[{"ciphertext": c} for c in cts])["data"]
        self.assertEqual([r["plaintext"] for r in dec["batch_results"]], [b64(x) for x in secrets])
        # one bad item: its own error, the others still answered
        dec = self.transit.decrypt_data("bt", ciphertext=None,
                                        batch_input=[{"ciphertext": cts[0]},
                                                     {"ciphertext": "vault:v1:AAAA"}])["data"]
        self.assertEqual(dec["batch_results"][0]["plaintext"], b64(secrets[0]))
        self.assertIn("error", dec["batch_results"][1])
        self.assertNotIn("plaintext", dec["batch_results"][1])
        # every item bad: 400
        with self.assertRaises(hvac.exceptions.InvalidRequest):
            self.transit.decrypt_data("bt", ciphertext=None, batch_input=[{"ciphertext": "vault:v1:AAAA"}])

    def test_ciphertext_is_aes_gcm_with_stored_key(self):
        """The ciphertext opens with AES-256-GCM and the key material kept in state.json."""
        self.key("layout")
        enc = self.transit.encrypt_data("layout", b64(b"layout check"))["data"]["ciphertext"]
        with open(os.path.join(self.kms.state_dir, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        key = base64.b64decode(state["keys"]["layout"]["versions"]["1"]["key"])
        self.assertEqual(len(key), 32)
        raw = base64.b64decode(enc.split(":", 2)[2])
        self.assertEqual(AESGCM(key).decrypt(raw[:12], raw[12:], None), b"layout check")
        self.assertIn(self.kms.token, state["tokens"])

    def test_encrypt_decrypt_errors(self):
        """Unknown key, missing fields, bad base64, JSON errors."""
        self.key("errs")
        with self.assertRaises(hvac.exceptions.InvalidRequest) as ctx:
            self.transit.encrypt_data("nokey", b64(b"x"))
        self.assertEqual(ctx.exception.errors, ["encryption key not found"])
        self.assertVaultError(self.kms.call("GET", "keys/nokey"), 404)  # encrypt did not upsert
        ct = self.transit.encrypt_data("errs", b64(b"x"))["data"]["ciphertext"]
        self.assertVaultError(self.kms.call("POST", "decrypt/nokey", {"ciphertext": ct}), 400,
                              "encryption key not found")
        self.assertVaultError(self.kms.call("POST", "rewrap/nokey", {"ciphertext": ct}), 400,
                              "encryption key not found")
        self.assertVaultError(self.kms.call("POST", "encrypt/errs", {}), 400, "missing plaintext to encrypt")
        self.assertVaultError(self.kms.call("POST", "encrypt/errs", {"plaintext": "not base64!"}), 400)
        self.assertVaultError(self.kms.call("POST", "decrypt/errs", {}), 400, "missing ciphertext to decrypt")
        self.assertVaultError(self.kms.call("POST", "decrypt/errs", {"ciphertext": 5}), 400)
        resp = requests.post(f"{self.kms.url}/v1/transit/encrypt/errs", data=b"{not json",
                             headers={"X-Vault-Token": self.kms.token}, verify=self.kms.ca)
        self.assertVaultError(resp, 400)
        resp = requests.post(f"{self.kms.url}/v1/transit/encrypt/errs", data=b"[1]",
                             headers={"X-Vault-Token": self.kms.token}, verify=self.kms.ca)
        self.assertVaultError(resp, 400)

    def test_malformed_ciphertexts(self):
        """Each class of malformed ciphertext gets Vault's message."""
        self.key("mal")
        secret = os.urandom(31)  # 12 + 31 + 16 = 59 bytes: base64 ends in one "="
        ct = self.transit.encrypt_data("mal", b64(secret))["data"]["ciphertext"]
        payload = ct.split(":", 2)[2]
        self.assertTrue(payload.endswith("=") and not payload.endswith("=="))
        # Same bytes, non-canonical final character (its low bits are unused).
        last = B64_ALPHABET.index(payload[-2])
        non_canonical = payload[:-2] + B64_ALPHABET[last ^ 1] + "="
        self.assertEqual(base64.b64decode(non_canonical), base64.b64decode(payload))
        no_prefix = "invalid ciphertext: no prefix"
        bad_b64 = "invalid ciphertext: could not decode base64"
        auth = "cipher: message authentication failed"
        cases = [
            ("x" + ct[1:], no_prefix),
            (payload, no_prefix),
            ("", no_prefix),
            ("vault:v1", "invalid ciphertext: wrong number of fields"),
            ("vault:vx:" + payload, "invalid ciphertext: version number could not be decoded"),
            ("vault:v0:" + payload, "invalid ciphertext: version number could not be decoded"),
            ("vault:v01:" + payload, "invalid ciphertext: version number could not be decoded"),
            ("vault:v1:" + non_canonical, bad_b64),
            ("vault:v1:" + payload[:-1], bad_b64),
            ("vault:v1:" + payload + "\n", bad_b64),
            ("vault:v1:" + "!" + payload[1:], bad_b64),
            ("vault:v1:AAAA", "invalid ciphertext length"),
            ("vault:v1:" + b64(b"\0" * 20), auth),
            ("vault:v1:" + payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:], auth),
            ("vault:v2:" + payload, "invalid key version"),
        ]
        for text, message in cases:
            with self.subTest(ciphertext=text):
                self.assertVaultError(self.kms.call("POST", "decrypt/mal", {"ciphertext": text}, session=self.http),
                                      400, message)
        self.assertEqual(self.data(self.kms.call("POST", "decrypt/mal", {"ciphertext": ct}))["plaintext"], b64(secret))

    def test_every_single_character_change_is_detected(self):
        """Substituting any one character of a ciphertext makes decrypt and rewrap fail."""
        self.key("tamper")
        for size in (31, 32, 33):
            ct = self.transit.encrypt_data("tamper", b64(os.urandom(size)))["data"]["ciphertext"]
            operations = ("decrypt", "rewrap") if size == 32 else ("decrypt",)
            for i, char in enumerate(ct):
                for other in {B64_ALPHABET[(B64_ALPHABET.find(char) + 1) % 64], "=", ":", "2"} - {char}:
                    bad = ct[:i] + other + ct[i + 1:]
                    for operation in operations:
                        resp = self.kms.call("POST", f"{operation}/tamper", {"ciphertext": bad}, session=self.http)
                        self.assertEqual(resp.status_code, 400, (operation, i, bad))

    def test_datakey(self):
        """Plaintext and wrapped data keys of every size decrypt to the key."""
        self.key("dk")
        for bits in (128, 256, 512):
            data = self.transit.generate_data_key("dk", "plaintext", bits=bits)["data"]
            self.assertEqual(len(base64.b64decode(data["plaintext"])), bits // 8)
            self.assertEqual(data["key_version"], 1)
            self.assertRegex(data["ciphertext"], CIPHERTEXT_RE)
            self.assertEqual(self.transit.decrypt_data("dk", data["ciphertext"])["data"]["plaintext"],
                             data["plaintext"])
        default = self.transit.generate_data_key("dk", "plaintext")["data"]
        self.assertEqual(len(base64.b64decode(default["plaintext"])), 32)
        wrapped = self.transit.generate_data_key("dk", "wrapped")["data"]
        self.assertNotIn("plaintext", wrapped)
        opened = self.transit.decrypt_data("dk", wrapped["ciphertext"])["data"]["plaintext"]
        self.assertEqual(len(base64.b64decode(opened)), 32)
        self.assertVaultError(self.kms.call("POST", "datakey/plaintext/dk", {"bits": 100}), 400)
        self.assertVaultError(self.kms.call("POST", "datakey/wrapped/nokey", {}), 400, "encryption key not found")
        self.assertVaultError(self.kms.call("POST", "datakey/other/dk", {}), 404)

    # ------------------------------------------------------------ HTTP

    def test_routing_and_methods(self):
        """Unknown paths 404, wrong methods 405, JSON content type everywhere."""
        self.key("http")
        self.assertEqual(self.kms.call("GET", "nothing/here").json(), {"errors": []})
        self.assertVaultError(self.kms.call("GET", "nothing/here"), 404)
        resp = requests.get(f"{self.kms.url}/v1/other/keys/http", headers={"X-Vault-Token": self.kms.token},
                            verify=self.kms.ca)
        self.assertVaultError(resp, 404)
        resp = requests.get(f"{self.kms.url}/v2/transit/keys/http", headers={"X-Vault-Token": self.kms.token},
                            verify=self.kms.ca)
        self.assertVaultError(resp, 404)
        self.assertVaultError(self.kms.call("GET", "encrypt/http"), 405)
        self.assertVaultError(self.kms.call("DELETE", "keys/http"), 405)
        self.assertVaultError(self.kms.call("GET", "keys/http/rotate"), 405)
        self.assertVaultError(self.kms.call("PATCH", "keys/http"), 405)
        enc = self.data(self.kms.call("PUT", "encrypt/http", {"plaintext": b64(b"put")}))
        self.assertEqual(self.data(self.kms.call("PUT", "decrypt/http", {"ciphertext": enc["ciphertext"]})),
                         {"plaintext": b64(b"put")})

    def test_keepalive_stats_and_latency(self):
        """One connection serves a whole sequence, counted by kind, without Nagle stalls."""
        self.key("ka")
        ct = self.transit.encrypt_data("ka", b64(b"ka"))["data"]["ciphertext"]
        self.kms.admin("POST", "/stats/reset")
        self.assertEqual(self.kms.admin("GET", "/stats"),
                         {"requests": dict.fromkeys(("datakey", "decrypt", "encrypt", "rewrap", "keys_read",
                                                     "rotate", "config", "create"), 0),
                          "total": 0, "connections": 0, "last_namespace": None})
        s = self.http
        self.data(self.kms.call("POST", "keys/ka", session=s))
        self.data(self.kms.call("GET", "keys/ka", session=s, headers={"X-Vault-Namespace": "team-a"}))
        self.data(self.kms.call("POST", "encrypt/ka", {"plaintext": ""}, session=s))
        self.data(self.kms.call("POST", "rewrap/ka", {"ciphertext": ct}, session=s))
        self.data(self.kms.call("POST", "datakey/wrapped/ka", {}, session=s))
        self.data(self.kms.call("POST", "datakey/plaintext/ka", {}, session=s))
        self.data(self.kms.call("POST", "keys/ka/rotate", session=s))
        self.data(self.kms.call("POST", "keys/ka/config", {"deletion_allowed": False}, session=s))
        self.assertVaultError(self.kms.call("GET", "nothing", session=s), 404)
        timings = []
        for _ in range(40):
            start = time.perf_counter()
            self.data(self.kms.call("POST", "decrypt/ka", {"ciphertext": ct}, session=s))
            timings.append(time.perf_counter() - start)
        stats = self.kms.admin("GET", "/stats")
        self.assertEqual(stats["requests"], {"datakey": 2, "decrypt": 40, "encrypt": 1, "rewrap": 1,
                                             "keys_read": 1, "rotate": 1, "config": 1, "create": 1})
        self.assertEqual(stats["total"], 49)
        self.assertEqual(stats["connections"], 1)
        self.assertEqual(stats["last_namespace"], "team-a")
        self.assertLess(statistics.median(timings), 0.02, timings)
        self.assertLess(sorted(timings)[-3], 0.035, timings)  # no 40 ms delayed-ACK stalls
        self.assertEqual(self.kms.admin("POST", "/stats/reset")["total"], 0)

    def test_logs_have_no_secrets(self):
        """The request log has one line per request and no token, plaintext or ciphertext."""
        self.key("logs")
        secret = b64(b"very secret log marker")
        ct = self.transit.encrypt_data("logs", secret)["data"]["ciphertext"]
        dk = self.transit.generate_data_key("logs", "plaintext")["data"]
        self.transit.decrypt_data("logs", ct)
        with open(self.kms.log_path, encoding="utf-8") as f:
            log = f.read()
        self.assertIn("POST /v1/transit/encrypt/logs 200", log)
        self.assertIn("POST /v1/transit/decrypt/logs 200", log)
        with open(os.path.join(self.kms.state_dir, "state.json"), encoding="utf-8") as f:
            material = [v["key"] for k in json.load(f)["keys"].values() for v in k["versions"].values()]
        for needle in [self.kms.token, secret, ct.split(":")[2], dk["plaintext"], *material]:
            self.assertNotIn(needle, log)

    # ------------------------------------------------------------ admin and faults

    def test_admin_validation(self):
        """The admin API rejects unknown modes, bad counts and unknown paths."""
        for body in ({"mode": "explode"}, {"mode": "slow:x"}, {"mode": "500", "count": 0},
                     {"mode": "500", "count": "2"}, {"mode": "refuse", "count": 1}, {}):
            self.kms.admin("POST", "/fault", body, expect=400)
        self.assertEqual(self.kms.admin("GET", "/fault"), {"mode": "none", "count": None})
        self.kms.admin("GET", "/nothing", expect=404)
        self.kms.admin("DELETE", "/fault", expect=405)
        resp = requests.post(f"http://127.0.0.1:{self.kms.admin_port}/fault", data=b"{", timeout=5)
        self.assertEqual(resp.status_code, 400)

    def test_fault_status_codes(self):
        """500, 503 and 429 answer with Vault-style errors for count requests, then recover."""
        self.key("f5")
        cases = (("500", 500, "internal error", hvac.exceptions.InternalServerError),
                 ("503", 503, "Vault is sealed", hvac.exceptions.VaultDown),
                 ("429", 429, "rate limit quota exceeded", hvac.exceptions.RateLimitExceeded))
        for mode, status, message, exc in cases:
            with self.subTest(mode=mode):
                self.assertEqual(self.kms.fault(mode, 2), {"mode": mode, "count": 2})
                resp = self.kms.call("POST", "encrypt/f5", {"plaintext": ""}, session=self.http)
                self.assertVaultError(resp, status, message)
                if mode == "429":
                    self.assertEqual(resp.headers["Retry-After"], "1")
                self.assertEqual(self.kms.admin("GET", "/fault"), {"mode": mode, "count": 1})
                with self.assertRaises(exc):
                    self.transit.read_key("f5")
                self.assertEqual(self.kms.admin("GET", "/fault"), {"mode": "none", "count": None})
                self.data(self.kms.call("POST", "encrypt/f5", {"plaintext": ""}, session=self.http))
        self.kms.fault("503")
        for _ in range(3):
            self.assertVaultError(self.kms.call("GET", "keys/f5", session=self.http), 503)
        self.kms.fault("none")
        self.data(self.kms.call("GET", "keys/f5", session=self.http))

    def test_fault_slow(self):
        """slow:<ms> answers correctly after the delay."""
        self.key("slow")
        self.kms.fault("slow:300", 1)
        start = time.monotonic()
        self.assertEqual(self.transit.read_key("slow")["data"]["name"], "slow")
        self.assertGreaterEqual(time.monotonic() - start, 0.3)
        start = time.monotonic()
        self.transit.read_key("slow")
        self.assertLess(time.monotonic() - start, 0.2)

    def test_fault_malformed(self):
        """malformed answers 200 with a truncated, non-JSON body."""
        self.key("malf")
        self.kms.fault("malformed", 1)
        resp = self.kms.call("POST", "encrypt/malf", {"plaintext": ""}, session=self.http)
        self.assertEqual(resp.status_code, 200)
        self.assertEqual(resp.headers["Content-Type"], "application/json")
        self.assertEqual(int(resp.headers["Content-Length"]), len(resp.content))
        with self.assertRaises(ValueError):
            resp.json()
        self.data(self.kms.call("POST", "encrypt/malf", {"plaintext": ""}, session=self.http))

    def test_fault_lying(self):
        """lying answers 200 with valid JSON and wrong content."""
        self.key("lie")
        secret = os.urandom(24)
        ct = self.transit.encrypt_data("lie", b64(secret))["data"]["ciphertext"]
        self.kms.fault("lying")
        lied = self.transit.decrypt_data("lie", ct)["data"]["plaintext"]
        self.assertEqual(len(base64.b64decode(lied)), 24)
        self.assertNotEqual(lied, b64(secret))
        self.assertEqual(self.transit.encrypt_data("lie", b64(secret))["data"]["ciphertext"], "vault:v1:AAAA")
        dk = self.transit.generate_data_key("lie", "plaintext")["data"]
        self.assertEqual(dk["ciphertext"], "vault:v1:AAAA")
        self.assertEqual(len(base64.b64decode(dk["plaintext"])), 32)
        self.assertNotIn("plaintext", self.transit.generate_data_key("lie", "wrapped")["data"])
        self.assertEqual(self.transit.rewrap_data("lie", ct)["data"]["ciphertext"], "vault:v1:AAAA")
        self.assertEqual(self.transit.read_key("lie")["data"]["latest_version"], 2)
        self.assertEqual(self.data(self.kms.call("POST", "decrypt/lie", {"ciphertext": ct}, token=None))
                         .keys(), {"plaintext"})
        self.kms.fault("none")
        self.assertEqual(self.transit.decrypt_data("lie", ct)["data"]["plaintext"], b64(secret))
        self.assertEqual(self.transit.read_key("lie")["data"]["latest_version"], 1)

    def test_fault_badtoken(self):
        """badtoken rejects even the root token."""
        self.key("bt")
        self.kms.fault("badtoken")
        with self.assertRaises(hvac.exceptions.Forbidden):
            self.transit.read_key("bt")
        self.assertVaultError(self.kms.call("GET", "keys/bt"), 403, "permission denied")
        self.kms.fault("none")
        self.transit.read_key("bt")

    @staticmethod
    def read_response(tls):
        """Read one HTTP response (headers and Content-Length body) from a socket."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(4096)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += tls.recv(4096)
        return head + b"\r\n\r\n" + body

    def raw_request(self, path):
        """Open a TLS connection and send one request without reading the answer."""
        context = ssl.create_default_context(cafile=self.kms.ca)
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", self.kms.port)),
                                  server_hostname="127.0.0.1")
        tls.sendall(f"GET /v1/transit/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"X-Vault-Token: {self.kms.token}\r\n\r\n".encode())
        return tls

    def wait_total(self, total):
        """Wait until the server has counted total requests since the last reset."""
        deadline = time.monotonic() + 5
        while self.kms.admin("GET", "/stats")["total"] < total:
            self.assertLess(time.monotonic(), deadline, "request never arrived")
            time.sleep(0.01)

    def test_fault_hang(self):
        """hang never answers, blocks nothing else, and drops the connection when cleared."""
        self.key("hang")
        self.kms.admin("POST", "/stats/reset")
        self.kms.fault("hang", 1)
        hung = self.raw_request("keys/hang")
        try:
            self.wait_total(1)
            self.assertEqual(self.kms.admin("GET", "/fault")["mode"], "none")
            self.assertEqual(self.transit.read_key("hang")["data"]["name"], "hang")  # other handlers run
            hung.settimeout(0.3)
            with self.assertRaises(socket.timeout):
                hung.recv(1)
            self.kms.fault("none")  # clearing releases and closes hung connections
            hung.settimeout(5)
            self.assertEqual(hung.recv(1), b"")
        finally:
            hung.close()
        self.kms.fault("hang")
        with self.assertRaises(requests.exceptions.ReadTimeout):
            self.kms.call("GET", "keys/hang", timeout=0.4)
        self.assertEqual(self.kms.admin("GET", "/fault")["mode"], "hang")
        self.kms.fault("none")
        self.assertEqual(self.transit.read_key("hang")["data"]["name"], "hang")

    def test_fault_refuse(self):
        """refuse closes the port (ECONNREFUSED) and open connections; none reopens it."""
        self.key("ref")
        self.data(self.kms.call("GET", "keys/ref", session=self.http))
        idle = self.raw_request("keys/ref")
        idle.settimeout(5)
        self.assertTrue(self.read_response(idle).startswith(b"HTTP/1.1 200"))
        self.kms.fault("refuse")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.kms.port), timeout=2).close()
        self.assertEqual(idle.recv(4096), b"")  # the kept-alive connection was closed
        idle.close()
        with self.assertRaises(requests.exceptions.ConnectionError):
            self.kms.call("GET", "keys/ref", session=self.http, timeout=2)
        with self.assertRaises(requests.exceptions.ConnectionError):
            self.transit.read_key("ref")
        self.assertEqual(self.kms.admin("GET", "/fault")["mode"], "refuse")
        self.kms.fault("503")  # leaving refuse for another mode reopens the port too
        self.assertVaultError(self.kms.call("GET", "keys/ref", session=self.http), 503)
        self.kms.fault("refuse")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", self.kms.port), timeout=2).close()
        self.kms.fault("none")
        self.assertEqual(self.transit.read_key("ref")["data"]["name"], "ref")
        self.data(self.kms.call("GET", "keys/ref", session=self.http))


class RestartTest(KmsTestCase):
    """Persistence across restarts and clean shutdown."""

    def test_restart_keeps_state(self):
        """Keys, versions, policy and tokens survive SIGTERM and a restart; files are reused."""
        kms = self.kms
        transit = self.client().secrets.transit
        transit.create_key("persist")
        secret = b64(os.urandom(40))
        c1 = transit.encrypt_data("persist", secret)["data"]["ciphertext"]
        transit.rotate_key("persist")
        c2 = transit.encrypt_data("persist", secret)["data"]["ciphertext"]
        transit.update_key_configuration("persist", min_decryption_version=2, deletion_allowed=True)
        kms.admin("POST", "/tokens", {"token": "kept-token"})
        kms.admin("POST", "/tokens", {"token": "revoked-token"})
        kms.admin("DELETE", "/tokens", {"token": "revoked-token"})
        info = transit.read_key("persist")["data"]
        files = {}
        for name in ("ca.pem", "ca.key", "server.pem", "server.key", "token"):
            with open(os.path.join(kms.state_dir, name), "rb") as f:
                files[name] = f.read()
        with open(os.path.join(kms.state_dir, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        entry = state["keys"]["persist"]
        self.assertEqual(sorted(entry["versions"]), ["1", "2"])
        self.assertEqual((entry["latest_version"], entry["min_decryption_version"], entry["min_encryption_version"],
                          entry["deletion_allowed"]), (2, 2, 0, True))
        self.assertEqual(sorted(state["tokens"]), sorted([kms.token, "kept-token"]))

        self.assertEqual(kms.stop(signal.SIGTERM), 0)
        self.assertFalse(os.path.exists(os.path.join(kms.state_dir, "kms.pid")))
        with self.assertRaises(requests.exceptions.ConnectionError):
            requests.get(f"{kms.url}/v1/transit/keys/persist", verify=kms.ca, timeout=2)

        kms.start()
        transit = self.client().secrets.transit
        for name, content in files.items():
            with open(os.path.join(kms.state_dir, name), "rb") as f:
                self.assertEqual(f.read(), content, name)
        self.assertEqual(transit.read_key("persist")["data"], info)
        self.assertEqual(transit.decrypt_data("persist", c2)["data"]["plaintext"], secret)
        self.assertVaultError(kms.call("POST", "decrypt/persist", {"ciphertext": c1}), 400,
                              "cipher: ciphertext version is disallowed by policy (too old)")
        transit.update_key_configuration("persist", min_decryption_version=1)
        self.assertEqual(transit.decrypt_data("persist", c1)["data"]["plaintext"], secret)
        self.data(kms.call("GET", "keys/persist", token="kept-token"))
        self.assertVaultError(kms.call("GET", "keys/persist", token="revoked-token"), 403)

        self.assertEqual(kms.stop(signal.SIGINT), 0)
        self.assertFalse(os.path.exists(os.path.join(kms.state_dir, "kms.pid")))


if __name__ == "__main__":
    unittest.main()
