#!/usr/bin/python3
"""Local test KMS that speaks HashiCorp Vault's Transit HTTP API.

It serves the subset of /v1/<mount>/ that the envelope extension uses (keys,
rotate, config, encrypt, decrypt, rewrap, datakey) over HTTPS with a
self-signed CA, using real AES-256-GCM so that tampering is detected, and a
plain-HTTP admin listener on loopback that switches fault modes (refused
connections, 5xx, 429, hangs, slow, malformed or lying answers, rejected
tokens), manages tokens and reports request counters.

State (keys with all versions' material, tokens) is kept in
STATE_DIR/state.json, rewritten atomically after every change, so a restart
with the same directory keeps the keys.  Secrets are never logged.

Usage: vault_transit.py --dir STATE_DIR --port PORT [--admin-port APORT]
                        [--host 127.0.0.1] [--mount transit]
"""

import argparse
import base64
import binascii
import datetime
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_TYPE = "aes256-gcm96"
NONCE_LEN = 12
PREFIX = "vault:v"
NAME = r"[A-Za-z0-9_.-]+"
STAT_KINDS = ("datakey", "decrypt", "encrypt", "rewrap", "keys_read", "rotate", "config", "create")
FIXED_MODES = ("none", "refuse", "500", "503", "429", "hang", "malformed", "lying", "badtoken")

ERR_KEY_NOT_FOUND = "encryption key not found"
ERR_TOO_OLD = "cipher: ciphertext version is disallowed by policy (too old)"
ERR_TOO_NEW = "invalid key version"
ERR_AUTH_FAILED = "cipher: message authentication failed"

# Fixed answers of the status-code fault modes: (status, body, extra headers).
CANNED = {
    "500": (500, {"errors": ["internal error"]}, ()),
    "503": (503, {"errors": ["Vault is sealed"]}, ()),
    "429": (429, {"errors": ["rate limit quota exceeded"]}, (("Retry-After", "1"),)),
}
MALFORMED_BODY = b'{"data": {"plaintext": '

# Path patterns under /v1/<mount>/ and, per method, the operation (= stats kind).
ROUTES = (
    (re.compile(rf"keys/(?P<name>{NAME})"), {"GET": "keys_read", "POST": "create"}),
    (re.compile(rf"keys/(?P<name>{NAME})/rotate"), {"POST": "rotate"}),
    (re.compile(rf"keys/(?P<name>{NAME})/config"), {"POST": "config"}),
    (re.compile(rf"encrypt/(?P<name>{NAME})"), {"POST": "encrypt"}),
    (re.compile(rf"decrypt/(?P<name>{NAME})"), {"POST": "decrypt"}),
    (re.compile(rf"rewrap/(?P<name>{NAME})"), {"POST": "rewrap"}),
    (re.compile(rf"datakey/(?P<variant>plaintext|wrapped)/(?P<name>{NAME})"), {"POST": "datakey"}),
)


def log(message):
    """Write one line to stderr."""
    sys.stderr.write(f"[vault_transit] {message}\n")
    sys.stderr.flush()


class ApiError(Exception):
    """A Vault-style error answer: HTTP status and the list of error strings."""

    def __init__(self, status, *messages):
        """Remember the status and messages."""
        super().__init__(status, *messages)
        self.status = status
        self.messages = list(messages)


# ---------------------------------------------------------------- files, PKI


def atomic_write(path, data, mode=0o600):
    """Write bytes to path through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def pem_key(key):
    """Serialize a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_certificate(subject, issuer, public_key, signing_key, extensions):
    """Build and sign a 10-year certificate with the given (extension, critical) pairs."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=3650))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def key_usage(cert_sign):
    """KeyUsage for a CA (cert and CRL signing) or a TLS server (digital signature)."""
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def ensure_pki(state_dir):
    """Create the CA and the server certificate unless present; return the TLS server context."""
    ca_pem, ca_key_path = os.path.join(state_dir, "ca.pem"), os.path.join(state_dir, "ca.key")
    srv_pem, srv_key_path = os.path.join(state_dir, "server.pem"), os.path.join(state_dir, "server.key")
    fresh_ca = not (os.path.exists(ca_pem) and os.path.exists(ca_key_path))
    if fresh_ca:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "envelope test KMS CA")])
        ca_cert = new_certificate(name, name, ca_key.public_key(), ca_key, [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (key_usage(cert_sign=True), True),
        ])
        atomic_write(ca_key_path, pem_key(ca_key))
        atomic_write(ca_pem, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if fresh_ca or not (os.path.exists(srv_pem) and os.path.exists(srv_key_path)):
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
        with open(ca_pem, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        key = ec.generate_private_key(ec.SECP256R1())
        cert = new_certificate(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_cert.subject,
            key.public_key(), ca_key, [
                (x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]), False),
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (key_usage(cert_sign=False), True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
            ])
        atomic_write(srv_key_path, pem_key(key))
        atomic_write(srv_pem, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(srv_pem, srv_key_path)
    return context


def ensure_token(state_dir):
    """Return (root token, created) from STATE_DIR/token, creating it (mode 0600) if absent."""
    path = os.path.join(state_dir, "token")
    if os.path.exists(path):
        os.chmod(path, 0o600)
        with open(path, encoding="ascii") as f:
            return f.read().strip(), False
    token = "hvs." + secrets.token_urlsafe(24)
    atomic_write(path, (token + "\n").encode("ascii"))
    return token, True


# ---------------------------------------------------------------- crypto helpers


def b64encode(raw):
    """Standard padded base64 as str."""
    return base64.b64encode(raw).decode("ascii")


def b64decode_strict(text):
    """Decode canonical padded base64; None if invalid or not re-encoding to the same text."""
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if b64encode(raw) == text else None


def seal(key, version, plaintext):
    """Encrypt like Vault: vault:vN:base64(nonce || AES-GCM ciphertext || tag)."""
    nonce = os.urandom(NONCE_LEN)
    return f"{PREFIX}{version}:" + b64encode(nonce + AESGCM(key).encrypt(nonce, plaintext, None))


def split_ciphertext(text):
    """Split vault:vN:<payload> into (N, payload), with Vault's error messages."""
    if not text.startswith(PREFIX):
        raise ApiError(400, "invalid ciphertext: no prefix")
    fields = text[len(PREFIX):].split(":", 1)
    if len(fields) != 2:
        raise ApiError(400, "invalid ciphertext: wrong number of fields")
    if not re.fullmatch(r"[1-9][0-9]*", fields[0]):
        raise ApiError(400, "invalid ciphertext: version number could not be decoded")
    return int(fields[0]), fields[1]


def int_param(body, field, default):
    """An integer request field (null: default); like Vault, numeric strings are accepted too."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ApiError(400, f"invalid value for {field}: expected an integer")


def bool_param(body, field, default):
    """A boolean request field (null: default); the strings "true" and "false" are accepted too."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool):
        return value
    raise ApiError(400, f"invalid value for {field}: expected a boolean")


def str_param(body, field, missing):
    """A required string request field; missing is the error message when absent."""
    value = body.get(field)
    if value is None:
        raise ApiError(400, missing)
    if not isinstance(value, str):
        raise ApiError(400, f"invalid value for {field}: expected a string")
    return value


# ---------------------------------------------------------------- state


class Keyring:
    """Transit keys and valid tokens, persisted to state.json after every change."""

    def __init__(self, path):
        """Load the state file if it exists."""
        self.path = path
        self.lock = threading.Lock()
        self.keys = {}
        self.tokens = set()
        self.loaded = os.path.exists(path)
        if self.loaded:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            self.tokens = set(doc["tokens"])
            for name, key in doc["keys"].items():
                versions = {int(v): {"key": base64.b64decode(e["key"]), "creation_time": e["creation_time"]}
                            for v, e in key["versions"].items()}
                self.keys[name] = dict(key, versions=versions)

    def _save(self):
        """Write the whole state atomically; the caller holds the lock."""
        keys = {}
        for name, key in self.keys.items():
            versions = {str(v): {"key": b64encode(e["key"]), "creation_time": e["creation_time"]}
                        for v, e in key["versions"].items()}
            keys[name] = dict(key, versions=versions)
        doc = {"keys": keys, "tokens": sorted(self.tokens)}
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))

    def _lookup(self, name, message):
        """The key record, or a 400 error with message (404 without message if None)."""
        key = self.keys.get(name)
        if key is None:
            raise ApiError(404) if message is None else ApiError(400, message)
        return key

    @staticmethod
    def _info(name, key):
        """Key description in the shape of Vault's GET /keys/:name."""
        return {
            "name": name,
            "type": KEY_TYPE,
            "latest_version": key["latest_version"],
            "min_decryption_version": key["min_decryption_version"],
            "min_encryption_version": key["min_encryption_version"],
            "min_available_version": 0,
            "deletion_allowed": key["deletion_allowed"],
            "derived": False,
            "exportable": False,
            "allow_plaintext_backup": False,
            "auto_rotate_period": 0,
            "imported_key": False,
            "supports_encryption": True,
            "supports_decryption": True,
            "supports_derivation": True,
            "supports_signing": False,
            "keys": {str(v): e["creation_time"] for v, e in sorted(key["versions"].items())},
        }

    @staticmethod
    def _new_version():
        """Fresh key material for one version."""
        return {"key": os.urandom(32), "creation_time": int(time.time())}

    def token_valid(self, token):
        """True if token is currently accepted."""
        with self.lock:
            return token is not None and token in self.tokens

    def add_token(self, token):
        """Accept token from now on."""
        with self.lock:
            self.tokens.add(token)
            self._save()

    def revoke_token(self, token):
        """Stop accepting token; False if it was not valid."""
        with self.lock:
            if token not in self.tokens:
                return False
            self.tokens.discard(token)
            self._save()
            return True

    def create(self, name):
        """Create the key with version 1 unless it exists; return its info."""
        with self.lock:
            if name not in self.keys:
                self.keys[name] = {"latest_version": 1, "min_decryption_version": 1,
                                   "min_encryption_version": 0, "deletion_allowed": False,
                                   "versions": {1: self._new_version()}}
                self._save()
            return self._info(name, self.keys[name])

    def info(self, name):
        """Return the key's info; 404 if unknown."""
        with self.lock:
            return self._info(name, self._lookup(name, None))

    def rotate(self, name):
        """Add a new latest version; return the key's info."""
        with self.lock:
            key = self._lookup(name, "key not found")
            key["latest_version"] += 1
            key["versions"][key["latest_version"]] = self._new_version()
            self._save()
            return self._info(name, key)

    def configure(self, name, body):
        """Apply min_decryption_version, min_encryption_version and deletion_allowed."""
        with self.lock:
            key = self._lookup(name, f"no existing key named {name} could be found")
            latest = key["latest_version"]
            min_dec = int_param(body, "min_decryption_version", key["min_decryption_version"])
            min_enc = int_param(body, "min_encryption_version", key["min_encryption_version"])
            deletion = bool_param(body, "deletion_allowed", key["deletion_allowed"])
            if not 1 <= min_dec <= latest:
                raise ApiError(400, f"cannot set min decryption version of {min_dec}, "
                                    f"latest key version is {latest}")
            if not 0 <= min_enc <= latest:
                raise ApiError(400, f"cannot set min encryption version of {min_enc}, "
                                    f"latest key version is {latest}")
            if 0 < min_enc < min_dec:
                raise ApiError(400, "cannot set min encryption/decryption values; min encryption "
                                    f"version of {min_enc} must be greater than or equal to min "
                                    f"decryption version of {min_dec}")
            key.update(min_decryption_version=min_dec, min_encryption_version=min_enc,
                       deletion_allowed=deletion)
            self._save()
            return self._info(name, key)

    def encryption_key(self, name, requested):
        """(version, key bytes) to encrypt with; requested 0 means the latest version."""
        with self.lock:
            key = self._lookup(name, ERR_KEY_NOT_FOUND)
            if requested < 0:
                raise ApiError(400, "requested version for encryption is negative")
            if requested > key["latest_version"]:
                raise ApiError(400, "requested version for encryption is higher than the latest key version")
            if 0 < requested < key["min_encryption_version"]:
                raise ApiError(400, "requested version for encryption is less than the minimum "
                                    "encryption key version")
            version = requested or key["latest_version"]
            return version, key["versions"][version]["key"]

    def decryption_key(self, name, ciphertext):
        """(key bytes, base64 payload) for a ciphertext, after the key and version checks."""
        with self.lock:
            key = self._lookup(name, ERR_KEY_NOT_FOUND)
            version, payload = split_ciphertext(ciphertext)
            if version > key["latest_version"]:
                raise ApiError(400, ERR_TOO_NEW)
            if version < key["min_decryption_version"]:
                raise ApiError(400, ERR_TOO_OLD)
            return key["versions"][version]["key"], payload


def unseal(ring, name, ciphertext):
    """Decrypt a vault:vN: ciphertext with the named key, with Vault's checks and messages."""
    key, payload = ring.decryption_key(name, ciphertext)
    raw = b64decode_strict(payload)
    if raw is None:
        raise ApiError(400, "invalid ciphertext: could not decode base64")
    if len(raw) < NONCE_LEN:
        raise ApiError(400, "invalid ciphertext length")
    try:
        return AESGCM(key).decrypt(raw[:NONCE_LEN], raw[NONCE_LEN:], None)
    except InvalidTag:
        raise ApiError(400, ERR_AUTH_FAILED) from None


# ---------------------------------------------------------------- transit operations


def op_keys_read(ring, body, name):
    """GET keys/:name."""
    return ring.info(name)


def op_create(ring, body, name):
    """POST keys/:name; only aes256-gcm96 keys exist here."""
    key_type = body.get("type", KEY_TYPE)
    if key_type != KEY_TYPE:
        raise ApiError(400, f"unknown key type {key_type}")
    return ring.create(name)


def op_rotate(ring, body, name):
    """POST keys/:name/rotate."""
    return ring.rotate(name)


def op_config(ring, body, name):
    """POST keys/:name/config."""
    return ring.configure(name, body)


def batch_items(body):
    """The items of a batch_input request, or None for a single-item request."""
    items = body.get("batch_input")
    if items is None:
        return None
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ApiError(400, "batch_input must be a non-empty list of objects")
    return items


def run_batch(items, one):
    """Vault's batch semantics: one result per item, an item's failure as its "error"."""
    results = []
    for item in items:
        try:
            results.append(one(item))
        except ApiError as e:
            results.append({"error": "; ".join(e.messages)})
    if all("error" in r for r in results):
        raise ApiError(400, *[r["error"] for r in results])
    return {"batch_results": results}


def op_encrypt(ring, body, name):
    """POST encrypt/:name (also with batch_input)."""
    def one(item):
        plaintext = b64decode_strict(str_param(item, "plaintext", "missing plaintext to encrypt"))
        if plaintext is None:
            raise ApiError(400, "failed to base64-decode plaintext")
        version, key = ring.encryption_key(name, int_param(item, "key_version", 0))
        return {"ciphertext": seal(key, version, plaintext), "key_version": version}
    items = batch_items(body)
    return one(body) if items is None else run_batch(items, one)


def op_decrypt(ring, body, name):
    """POST decrypt/:name (also with batch_input)."""
    def one(item):
        ciphertext = str_param(item, "ciphertext", "missing ciphertext to decrypt")
        return {"plaintext": b64encode(unseal(ring, name, ciphertext))}
    items = batch_items(body)
    return one(body) if items is None else run_batch(items, one)


def op_rewrap(ring, body, name):
    """POST rewrap/:name: decrypt, then encrypt with the latest (or requested) version."""
    plaintext = unseal(ring, name, str_param(body, "ciphertext", "missing ciphertext to rewrap"))
    version, key = ring.encryption_key(name, int_param(body, "key_version", 0))
    return {"ciphertext": seal(key, version, plaintext), "key_version": version}


def op_datakey(ring, body, name, variant):
    """POST datakey/(plaintext|wrapped)/:name."""
    bits = int_param(body, "bits", 256)
    if bits not in (128, 256, 512):
        raise ApiError(400, "invalid bit length")
    version, key = ring.encryption_key(name, int_param(body, "key_version", 0))
    datakey = os.urandom(bits // 8)
    data = {"ciphertext": seal(key, version, datakey), "key_version": version}
    if variant == "plaintext":
        data["plaintext"] = b64encode(datakey)
    return data


OPERATIONS = {
    "keys_read": op_keys_read, "create": op_create, "rotate": op_rotate, "config": op_config,
    "encrypt": op_encrypt, "decrypt": op_decrypt, "rewrap": op_rewrap, "datakey": op_datakey,
}


def resolve(mount, method, path):
    """Map a request to (kind, path parameters, error status); kind is None on 404/405."""
    prefix = f"/v1/{mount}/"
    if path.startswith(prefix):
        for pattern, methods in ROUTES:
            match = pattern.fullmatch(path[len(prefix):])
            if match:
                kind = methods.get("POST" if method == "PUT" else method)
                return kind, match.groupdict(), None if kind else 405
    return None, {}, 404


def lie(kind, params, status, payload):
    """The plausible but wrong 200 data of the lying fault mode."""
    data = payload.get("data") if status == 200 else None
    if data and isinstance(data.get("batch_results"), list):
        # A batch: every item plausible but wrong.  Ciphertexts are passed
        # round (each a valid wrapping of another item's key); plaintexts
        # are random.
        results = data["batch_results"]
        if kind == "decrypt":
            return {"batch_results": [{"plaintext": b64encode(os.urandom(32))} for _ in results]}
        shifted = results[1:] + results[:1] if len(results) > 1 else \
            [{"ciphertext": f"{PREFIX}1:AAAA", "key_version": 1}]
        return {"batch_results": shifted}
    if kind == "decrypt":
        size = len(base64.b64decode(data["plaintext"])) if data else 32
        return {"plaintext": b64encode(os.urandom(size))}
    if kind in ("encrypt", "rewrap", "datakey"):
        fake = {"ciphertext": f"{PREFIX}1:AAAA", "key_version": 1}
        if params.get("variant") == "plaintext":
            fake["plaintext"] = b64encode(os.urandom(len(base64.b64decode(data["plaintext"])) if data else 32))
        return fake
    if kind is not None:
        info = data or {"name": params["name"], "type": KEY_TYPE, "latest_version": 1,
                        "min_decryption_version": 1, "min_encryption_version": 0,
                        "keys": {"1": int(time.time())}}
        return dict(info, latest_version=info["latest_version"] + 1)
    return {}


def envelope(data):
    """Wrap data in Vault's response envelope."""
    return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": data, "wrap_info": None, "warnings": None, "auth": None}


def parse_body(raw):
    """The JSON object of a request body ({} when empty)."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"failed to parse JSON input: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "failed to parse JSON input: expected a JSON object")
    return body


# ---------------------------------------------------------------- counters and faults


class Stats:
    """Request and connection counters of the main listener."""

    def __init__(self):
        """Start from zero."""
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        """Zero all counters."""
        with self.lock:
            self.requests = dict.fromkeys(STAT_KINDS, 0)
            self.total = 0
            self.connections = 0
            self.last_namespace = None

    def connection(self):
        """Count one accepted TCP connection."""
        with self.lock:
            self.connections += 1

    def request(self, kind, namespace):
        """Count one request of kind (None: not a transit operation); remember the namespace."""
        with self.lock:
            self.total += 1
            if kind is not None:
                self.requests[kind] += 1
            if namespace is not None:
                self.last_namespace = namespace

    def snapshot(self):
        """The counters as a JSON-ready dict."""
        with self.lock:
            return {"requests": dict(self.requests), "total": self.total,
                    "connections": self.connections, "last_namespace": self.last_namespace}


class Fault:
    """The current fault mode and how many more requests it applies to."""

    def __init__(self):
        """Start with no fault."""
        self.cond = threading.Condition()
        self.mode = "none"
        self.remaining = None
        self.generation = 0

    def set(self, mode, count):
        """Switch mode (for count requests, or until changed); release hung requests; return the old mode."""
        with self.cond:
            previous = self.mode
            self.mode, self.remaining = mode, count
            self.generation += 1
            self.cond.notify_all()
            return previous

    def take(self):
        """(mode, generation) for one incoming request, using up one unit of the count."""
        with self.cond:
            mode, generation = self.mode, self.generation
            if self.remaining is not None:
                self.remaining -= 1
                if self.remaining == 0:
                    self.mode, self.remaining = "none", None
            return mode, generation

    def wait_released(self, generation):
        """Block until the fault mode is set again through the admin API."""
        with self.cond:
            self.cond.wait_for(lambda: self.generation != generation)

    def snapshot(self):
        """The mode and remaining count as a JSON-ready dict."""
        with self.cond:
            return {"mode": self.mode, "count": self.remaining}


def valid_mode(mode):
    """True for a known fault mode name."""
    return isinstance(mode, str) and (mode in FIXED_MODES or re.fullmatch(r"slow:[0-9]+", mode) is not None)


# ---------------------------------------------------------------- HTTP plumbing


class JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler answering JSON, logging one line per request."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # headers and body leave in one write (one TLS record)
    server_version = "vault-transit-test"
    label = ""

    def version_string(self):
        """The Server header value, without the Python version."""
        return self.server_version

    def log_request(self, code="-", size="-"):
        """Log method, path (without query) and status; never headers or bodies."""
        path = getattr(self, "path", None)
        log(f"{self.label} {self.command or '-'} {urlsplit(path).path if path else '-'} {int(code)}")

    def log_message(self, format, *args):
        """Silence http.server's own messages (they could echo request data)."""

    def send_error(self, code, message=None, explain=None):
        """Answer protocol-level errors in JSON (unknown methods as 405) and close."""
        self.close_connection = True
        if code == 501:
            code, message = 405, "unsupported operation"
        self.reply(code, {"errors": [message or "bad request"]})

    def reply(self, status, payload=None, raw=None, headers=()):
        """Send a JSON (or raw) body with Content-Type and Content-Length."""
        body = raw if raw is not None else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for header, value in headers:
            self.send_header(header, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def read_body(self):
        """Read the request body by Content-Length; None (after answering 400) if unusable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_error(400, "chunked request bodies are not supported")
            return None
        length = self.headers.get("Content-Length", "0").strip()
        if not re.fullmatch(r"[0-9]+", length):
            self.send_error(400, "invalid Content-Length")
            return None
        return self.rfile.read(int(length))

    def do_GET(self):
        """Dispatch GET."""
        self.dispatch()

    def do_POST(self):
        """Dispatch POST."""
        self.dispatch()

    def do_PUT(self):
        """Dispatch PUT."""
        self.dispatch()

    def do_DELETE(self):
        """Dispatch DELETE."""
        self.dispatch()


class QuietServer(ThreadingHTTPServer):
    """Threaded HTTP server that skips reverse DNS and logs handler errors briefly."""

    def __init__(self, address, handler, kms):
        """Bind to address (IPv4 or IPv6) and keep a reference to the KMS."""
        self.kms = kms
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def server_bind(self):
        """Bind without HTTPServer's getfqdn() lookup."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        """Ignore dropped connections; print a traceback for anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            traceback.print_exc()


class TransitHandler(JsonHandler):
    """Handler of the HTTPS listener: Vault Transit API plus fault injection."""

    label = "https"

    def token(self):
        """The client token from X-Vault-Token or Authorization: Bearer."""
        token = self.headers.get("X-Vault-Token")
        auth = self.headers.get("Authorization", "")
        if token is None and auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        return token

    def dispatch(self):
        """Serve one request, applying the current fault mode."""
        kms = self.server.kms
        raw = self.read_body()
        if raw is None:
            return
        kind, params, error_status = resolve(kms.mount, self.command, urlsplit(self.path).path)
        kms.stats.request(kind, self.headers.get("X-Vault-Namespace"))
        mode, generation = kms.fault.take()
        if mode in ("refuse", "hang"):
            if mode == "hang":
                log(f"{self.label} {self.command} {urlsplit(self.path).path} hanging")
                kms.fault.wait_released(generation)
            log(f"{self.label} {self.command} {urlsplit(self.path).path} dropped ({mode})")
            self.close_connection = True
            return
        if mode.startswith("slow:"):
            time.sleep(int(mode[5:]) / 1000)
        if mode in CANNED:
            status, payload, headers = CANNED[mode]
            self.reply(status, payload, headers=headers)
            return
        if mode == "malformed":
            self.reply(200, raw=MALFORMED_BODY)
            return
        status, payload = self.answer(kind, params, error_status, raw, mode != "badtoken")
        if mode == "lying":
            status, payload = 200, envelope(lie(kind, params, status, payload))
        self.reply(status, payload)

    def answer(self, kind, params, error_status, raw, tokens_accepted):
        """(status, JSON payload) of the real Transit answer."""
        if not (tokens_accepted and self.server.kms.keyring.token_valid(self.token())):
            return 403, {"errors": ["permission denied"]}
        if error_status == 404:
            return 404, {"errors": []}
        if error_status == 405:
            return 405, {"errors": ["unsupported operation"]}
        try:
            data = OPERATIONS[kind](self.server.kms.keyring, parse_body(raw), **params)
        except ApiError as exc:
            return exc.status, {"errors": exc.messages}
        return 200, envelope(data)


class TransitServer(QuietServer):
    """The HTTPS server: TLS handshakes run in each connection's thread; connections are tracked."""

    def __init__(self, address, kms, context):
        """Bind the listening socket."""
        self.context = context
        self.conns = set()
        self.conns_lock = threading.Lock()
        super().__init__(address, TransitHandler, kms)

    def finish_request(self, request, client_address):
        """Count the connection, do the TLS handshake, then serve requests until it closes."""
        self.kms.stats.connection()
        request.settimeout(10)
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except OSError as exc:
            log(f"https TLS handshake with {client_address[0]} failed: {exc}")
            return
        conn.settimeout(None)
        with self.conns_lock:
            self.conns.add(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            with self.conns_lock:
                self.conns.discard(conn)
            conn.close()

    def abort_connections(self):
        """Shut down every open client connection (as a stopped server would)."""
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                with socket.socket(fileno=os.dup(conn.fileno())) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Listener:
    """The HTTPS listener, which the refuse fault closes and later reopens on the same port."""

    def __init__(self, kms, address, context):
        """Remember where to listen; nothing is opened yet."""
        self.kms, self.address, self.context = kms, address, context
        self.server = None

    def open(self):
        """Bind and serve in a background thread."""
        server = TransitServer(self.address, self.kms, self.context)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="https", daemon=True).start()
        self.server = server

    def close(self):
        """Stop accepting, close the listening socket and drop open connections."""
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.abort_connections()


class AdminHandler(JsonHandler):
    """Handler of the plain-HTTP loopback admin listener."""

    label = "admin"

    def dispatch(self):
        """Route /fault, /stats, /stats/reset and /tokens."""
        raw = self.read_body()
        if raw is None:
            return
        kms = self.server.kms
        routes = {
            "/fault": {"GET": lambda body: (200, kms.fault.snapshot()), "POST": kms.set_fault},
            "/stats": {"GET": lambda body: (200, kms.stats.snapshot())},
            "/stats/reset": {"POST": kms.reset_stats},
            "/tokens": {"POST": kms.add_token, "DELETE": kms.revoke_token},
        }
        methods = routes.get(urlsplit(self.path).path)
        if methods is None:
            self.reply(404, {"errors": []})
        elif self.command not in methods:
            self.reply(405, {"errors": ["unsupported operation"]})
        else:
            try:
                self.reply(*methods[self.command](parse_body(raw)))
            except ApiError as exc:
                self.reply(exc.status, {"errors": exc.messages})


# ---------------------------------------------------------------- the service


class KMS:
    """State directory, keyring, counters, fault mode and the two listeners."""

    def __init__(self, state_dir, host, port, admin_port, mount):
        """Prepare certificates, token and state; bind nothing yet."""
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.state_dir, self.mount = state_dir, mount
        context = ensure_pki(state_dir)
        token, created = ensure_token(state_dir)
        self.keyring = Keyring(os.path.join(state_dir, "state.json"))
        if created or not self.keyring.loaded:
            self.keyring.add_token(token)
        self.stats = Stats()
        self.fault = Fault()
        self.switch_lock = threading.Lock()
        self.listener = Listener(self, (host, port), context)
        self.admin_address = ("127.0.0.1", admin_port)
        self.admin = None
        self.pid_path = os.path.join(state_dir, "kms.pid")

    def start(self):
        """Open both listeners and write the pid file."""
        self.listener.open()
        self.admin = QuietServer(self.admin_address, AdminHandler, self)
        threading.Thread(target=self.admin.serve_forever, kwargs={"poll_interval": 0.05},
                         name="admin", daemon=True).start()
        with open(self.pid_path, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")

    def stop(self):
        """Close the listeners and remove the pid file."""
        if self.admin is not None:
            self.admin.shutdown()
            self.admin.server_close()
        self.listener.close()
        try:
            os.unlink(self.pid_path)
        except FileNotFoundError:
            pass

    def set_fault(self, body):
        """Admin POST /fault {"mode": ..., "count": N}."""
        mode, count = body.get("mode"), body.get("count")
        if not valid_mode(mode):
            raise ApiError(400, f"unknown fault mode {mode!r}")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ApiError(400, "count must be a positive integer")
        if mode == "refuse" and count is not None:
            raise ApiError(400, "refuse cannot take a count: refused connections are never seen")
        if mode == "none":
            count = None
        with self.switch_lock:
            previous = self.fault.set(mode, count)
            if mode == "refuse" and previous != "refuse":
                self.listener.close()
            elif previous == "refuse" and mode != "refuse":
                try:
                    self.listener.open()
                except OSError as exc:
                    self.fault.set("refuse", None)
                    raise ApiError(500, f"cannot reopen the HTTPS listener: {exc}") from None
        log(f"fault mode {mode}" + (f" for {count} requests" if count else ""))
        return 200, self.fault.snapshot()

    def reset_stats(self, body):
        """Admin POST /stats/reset."""
        self.stats.reset()
        return 200, self.stats.snapshot()

    def add_token(self, body):
        """Admin POST /tokens {"token": ...}."""
        token = body.get("token")
        if not isinstance(token, str) or not token or token != token.strip():
            raise ApiError(400, "token must be a non-empty string without surrounding spaces")
        self.keyring.add_token(token)
        return 200, {"ok": True}

    def revoke_token(self, body):
        """Admin DELETE /tokens {"token": ...}."""
        if not self.keyring.revoke_token(body.get("token")):
            raise ApiError(404, "unknown token")
        return 200, {"ok": True}


def parse_args(argv):
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Local Vault Transit API for tests.")
    parser.add_argument("--dir", required=True, help="state directory (certs, token, state.json, kms.pid)")
    parser.add_argument("--port", required=True, type=int, help="HTTPS port")
    parser.add_argument("--admin-port", type=int, help="plain-HTTP loopback admin port (default PORT+1)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTPS listen address (default 127.0.0.1)")
    parser.add_argument("--mount", default="transit", help="transit mount path (default transit)")
    args = parser.parse_args(argv)
    if args.admin_port is None:
        args.admin_port = args.port + 1
    args.mount = args.mount.strip("/")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", args.mount):
        parser.error("invalid --mount")
    return args


def main(argv=None):
    """Run until SIGTERM or SIGINT."""
    args = parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    kms = KMS(args.dir, args.host, args.port, args.admin_port, args.mount)
    try:
        kms.start()
    except OSError as exc:
        log(f"cannot start: {exc}")
        kms.stop()
        return 1
    host = f"[{args.host}]" if ":" in args.host else args.host
    log(f"serving https://{host}:{args.port}/v1/{args.mount}/, admin http://127.0.0.1:{args.admin_port}")
    print(f"READY https://{host}:{args.port}", flush=True)
    stop.wait()
    log("stopping")
    kms.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
