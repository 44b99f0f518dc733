#!/usr/bin/python3
"""Verify the tamper-evident chain of envelope's audit records in server logs.

Usage:
    audit_verify.py --key-file KEY [--format auto|stderr|csv|json]
                    [--allow-partial-start] LOGFILE...
    audit_verify.py --self-test

Reads the server log files in the order given (oldest first, as rotated),
extracts every audit record (the JSON object after "ENVELOPE AUDIT: " in a
LOG message) and checks, for each record:

  * it is a well-formed JSON object whose last field is "hmac" (64 lowercase
    hex digits);
  * its hmac is HMAC-SHA256(key, prev_hmac_hex + body), where body is the
    record text from the opening "{" up to, not including, ', "hmac": "',
    and prev_hmac_hex is the hmac of the previous record, or 64 "0" for an
    "audit_start" record (the first record after each server start);
  * seq is the previous record's seq + 1, and an audit_start record has
    seq 1 (each server start begins a new segment of the chain); seq 1
    without audit_start is a break.

Formats (--format auto, the default, picks by file: *.csv is csvlog, *.json
is jsonlog, otherwise the first line decides):

  stderr   the text after "ENVELOPE AUDIT: " on a line whose message starts
           with it (after the log_line_prefix and "LOG:  ")
  csv      csvlog, parsed with the csv module; the message is field 14
  json     jsonlog, one JSON object per line; the message is "message"

Output: "ok: N records in S segment(s)" and exit status 0, or the FIRST
break, "break: FILE line L, seq S: what is wrong", and exit status 1.  A bad
hmac means the record was edited, or a record before it was deleted, edited
or moved.  A log without any audit record is a break too (everything may
have been deleted).  Usage errors (unreadable files, a key shorter than 32
bytes) exit with status 2.

What a chain cannot show: records removed from the END of the last file
(truncation), or whole segments removed along with their server start.
Compare the last seq with a later record (or the live server) for that.

--allow-partial-start accepts a first record that is not audit_start (the
older log files were removed): that record's hmac cannot be checked and
only anchors the chain.

--self-test builds a synthetic chain (stderr, csvlog and jsonlog) with a
random key and checks that a good chain passes and that a deleted record,
a swapped pair, an edited field, a forged record, malformed JSON and a
restart without audit_start are each reported at the right line and seq.

Needs only the Python standard library.
"""

import argparse
import contextlib
import csv
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import sys
import tempfile

MARKER = "ENVELOPE AUDIT: "
HMAC_SEP = ', "hmac": "'
ZERO_HMAC = "0" * 64
HEX64 = re.compile(r"[0-9a-f]{64}")
MIN_KEY_BYTES = 32
CSV_MESSAGE_FIELD = 13      # 0-based index of "message" in csvlog
CSV_SEVERITY_FIELD = 11     # 0-based index of "error_severity" in csvlog
# In a stderr log line the message follows "<SEVERITY>:  "; envelope logs
# its records at LOG.  Anything else quoting the marker (a logged statement
# that contains it, for instance) is not a record.
STDERR_RECORD = re.compile(r"(?:^|\s)LOG:  " + re.escape(MARKER))

# File text is decoded with surrogateescape so that the exact bytes the
# server wrote can be recovered for the HMAC, whatever their encoding.
ENCODING = "utf-8"
ERRORS = "surrogateescape"


class Record:
    """One audit record as found in a log: where, and its text."""

    def __init__(self, path, line, text):
        self.path = path
        self.line = line
        self.text = text        # from the opening "{" to the end


class Break(Exception):
    """The first problem found; carries where it is."""

    def __init__(self, rec, seq, what):
        super().__init__(what)
        self.rec = rec
        self.seq = seq
        self.what = what

    def __str__(self):
        seq = "?" if self.seq is None else self.seq
        return "break: %s line %d, seq %s: %s" % (self.rec.path, self.rec.line, seq, self.what)


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

def detect_format(path):
    """csv, json or stderr, from the file name or else its first line."""
    low = path.lower()
    if low.endswith(".csv"):
        return "csv"
    if low.endswith(".json"):
        return "json"
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        first = ""
        for line in f:
            if line.strip():
                first = line
                break
    if first.lstrip().startswith("{"):
        try:
            obj = json.loads(first)
            if isinstance(obj, dict) and "message" in obj:
                return "json"
        except ValueError:
            pass
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        try:
            row = next(csv.reader(f))
            if (len(row) > CSV_MESSAGE_FIELD
                    and re.fullmatch(r"[A-Z][A-Z0-9]*", row[CSV_SEVERITY_FIELD])
                    and re.match(r"\d{4}-\d\d-\d\d", row[0])):
                return "csv"
        except (csv.Error, StopIteration):
            pass
    return "stderr"


def records_stderr(path):
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            m = STDERR_RECORD.search(line)
            if m:
                yield Record(path, lineno, line[m.end():])


def records_csv(path):
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        reader = csv.reader(f)
        start = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                rec = Record(path, start, "")
                raise Break(rec, None, "unparsable csvlog line: %s" % e)
            line = start
            start = reader.line_num + 1
            if len(row) <= CSV_MESSAGE_FIELD:
                if any(MARKER in field for field in row):
                    raise Break(Record(path, line, ""), None,
                                "csvlog line with an audit record has %d fields" % len(row))
                continue
            msg = row[CSV_MESSAGE_FIELD]
            if msg.startswith(MARKER):
                yield Record(path, line, msg[len(MARKER):])


def records_json(path):
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                if MARKER in line:
                    raise Break(Record(path, lineno, ""), None,
                                "jsonlog line with an audit record is not valid JSON (%s)" % e)
                continue
            msg = obj.get("message") if isinstance(obj, dict) else None
            if isinstance(msg, str) and msg.startswith(MARKER):
                yield Record(path, lineno, msg[len(MARKER):])


EXTRACTORS = {"stderr": records_stderr, "csv": records_csv, "json": records_json}


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------

def _pairs_no_dups(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError("duplicate field(s) %s" % ", ".join(dup))
    return pairs


def parse_record(rec):
    """(fields as an ordered list of pairs, body, hmac) or raise Break."""
    text = rec.text.rstrip()
    try:
        pairs = json.loads(text, object_pairs_hook=_pairs_no_dups)
    except ValueError as e:
        seq = None
        m = re.match(r'\{"seq": (\d+)', text)
        if m:
            seq = int(m.group(1))
        raise Break(rec, seq, "malformed JSON in the record (%s)" % e)
    if not isinstance(pairs, list):
        raise Break(rec, None, "the record is not a JSON object")
    fields = dict(pairs)
    seq = fields.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise Break(rec, None, "no valid seq field (%r)" % (seq,))
    if "hmac" not in fields:
        raise Break(rec, seq, "the record has no hmac (unsigned: was envelope.audit_hmac_key_file set?)")
    if pairs[-1][0] != "hmac":
        raise Break(rec, seq, "hmac is not the last field")
    mac = fields["hmac"]
    if not isinstance(mac, str) or not HEX64.fullmatch(mac):
        raise Break(rec, seq, "hmac is not 64 lowercase hex digits")
    cut = text.rfind(HMAC_SEP)
    if cut < 0 or text[cut + len(HMAC_SEP):] != mac + '"}':
        raise Break(rec, seq, 'the record does not end with , "hmac": "<hex>"}')
    event = fields.get("event")
    if not isinstance(event, str):
        raise Break(rec, seq, "no event field")
    return fields, text[:cut], mac


def compute_hmac(key, prev_hex, body):
    msg = (prev_hex + body).encode(ENCODING, ERRORS)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def verify(paths, key, fmt="auto", allow_partial_start=False):
    """Return (records, segments); raise Break at the first break."""
    prev_hmac = None
    prev_seq = None
    prev_where = None
    n = 0
    segments = 0
    last_rec = None
    for path in paths:
        f = detect_format(path) if fmt == "auto" else fmt
        for rec in EXTRACTORS[f](path):
            last_rec = rec
            fields, body, mac = parse_record(rec)
            seq = fields["seq"]
            event = fields["event"]
            if event == "audit_start":
                if seq != 1:
                    raise Break(rec, seq, "audit_start record with seq %d (must be 1)" % seq)
                if compute_hmac(key, ZERO_HMAC, body) != mac:
                    raise Break(rec, seq, "bad hmac on audit_start: the record was edited "
                                "(or written with another key)")
                segments += 1
            elif prev_hmac is None:
                if not allow_partial_start:
                    raise Break(rec, seq, "the chain does not begin with an audit_start record "
                                "(seq 1): records before it were deleted, or the log is "
                                "incomplete (see --allow-partial-start)")
                segments += 1        # anchored, unverifiable first record
            else:
                problems = []
                if seq == 1:
                    problems.append("the chain restarts at seq 1 without audit_start")
                elif seq != prev_seq + 1:
                    if seq > prev_seq + 1:
                        gap = seq - prev_seq - 1
                        problems.append("seq gap: expected %d after seq %d (%s), %d record(s) missing"
                                        % (prev_seq + 1, prev_seq, prev_where, gap))
                    else:
                        problems.append("seq out of order: expected %d after seq %d (%s)"
                                        % (prev_seq + 1, prev_seq, prev_where))
                if compute_hmac(key, prev_hmac, body) != mac:
                    problems.append("bad hmac: the record was edited, or a record before it "
                                    "was deleted, edited or moved")
                if problems:
                    raise Break(rec, seq, "; ".join(problems))
            prev_hmac = mac
            prev_seq = seq
            prev_where = "%s line %d" % (os.path.basename(rec.path), rec.line)
            n += 1
    if n == 0:
        where = Record(paths[-1] if paths else "-", 0, "")
        raise Break(where, None, "no audit records found")
    return n, segments


def read_key(path):
    with open(path, "rb") as f:
        key = f.read()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError("key file %s has %d bytes; at least %d are needed"
                         % (path, len(key), MIN_KEY_BYTES))
    return key


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Verify the HMAC chain of envelope audit records in server logs.")
    ap.add_argument("--key-file", help="the file named by envelope.audit_hmac_key_file")
    ap.add_argument("--format", choices=("auto", "stderr", "csv", "json"), default="auto")
    ap.add_argument("--allow-partial-start", action="store_true",
                    help="accept a chain whose first record is not audit_start")
    ap.add_argument("--self-test", action="store_true", help="run the built-in checks and exit")
    ap.add_argument("logfiles", nargs="*", metavar="LOGFILE")
    args = ap.parse_args(argv)

    if args.self_test:
        return self_test()
    if not args.key_file or not args.logfiles:
        ap.print_usage(sys.stderr)
        print("audit_verify.py: --key-file and at least one LOGFILE are required", file=sys.stderr)
        return 2
    try:
        key = read_key(args.key_file)
        for p in args.logfiles:
            with open(p, "rb"):
                pass
    except (OSError, ValueError) as e:
        print("audit_verify.py: %s" % e, file=sys.stderr)
        return 2
    try:
        n, segments = verify(args.logfiles, key, args.format, args.allow_partial_start)
    except Break as b:
        print(b)
        return 1
    except (OSError, UnicodeError) as e:
        print("audit_verify.py: %s" % e, file=sys.stderr)
        return 2
    print("ok: %d records in %d segment(s)" % (n, segments))
    return 0


# ---------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------

def _json_str(s):
    return json.dumps(s, ensure_ascii=False)


def _make_chain(key, segments):
    """Records (their JSON text) for `segments` server starts, as the server
    would write them: fields in the documented order, hmac last."""
    out = []
    for n_records in segments:
        prev = ZERO_HMAC
        for seq in range(1, n_records + 1):
            event = "audit_start" if seq == 1 else ("decrypt" if seq % 3 else "grant")
            fields = [
                ("seq", str(seq)),
                ("ts", _json_str("2024-05-01 12:00:%02d.%03d+00" % (seq % 60, seq))),
                ("event", _json_str(event)),
                ("user", _json_str("alice")),
                ("session_user", _json_str("alice")),
                ("db", _json_str("app")),
                ("app", _json_str("psql, \"quoted\" é")),
                ("client", _json_str("[local]")),
                ("pid", str(4000 + seq)),
                ("query_id", str(-1234567890123 + seq)),
                ("kek", "null" if event == "audit_start" else _json_str("k")),
                ("kek_version", "null" if event == "audit_start" else "1"),
            ]
            if event == "decrypt":
                fields += [("values", str(seq * 10)), ("cache_hits", str(seq * 10 - 1)),
                           ("kms_calls", "1"), ("outcome", _json_str("ok")), ("workers", "0")]
            body = "{" + ", ".join('"%s": %s' % (k, v) for k, v in fields)
            mac = compute_hmac(key, prev, body)
            out.append(body + HMAC_SEP + mac + '"}')
            prev = mac
    return out


def _stderr_lines(records):
    """A stderr log: each record on its own LOG line, other lines between."""
    lines = ["2024-05-01 12:00:00.000 UTC [100] LOG:  starting PostgreSQL 15"]
    for i, r in enumerate(records):
        lines.append("2024-05-01 12:00:00.%03d UTC [%d] psql LOG:  statement: SELECT %d" % (i % 1000, 200 + i, i))
        lines.append("2024-05-01 12:00:00.%03d UTC [%d] psql LOG:  %s%s" % (i % 1000, 200 + i, MARKER, r))
    # Quoted in a logged statement: not a record.
    lines.append("2024-05-01 12:00:01.000 UTC [999] psql LOG:  statement: SELECT 'ENVELOPE AUDIT: {\"seq\": 1}'")
    lines.append("2024-05-01 12:00:01.000 UTC [999] psql ERROR:  division by zero")
    return lines


def _write(path, lines):
    with open(path, "w", encoding=ENCODING, errors=ERRORS, newline="") as f:
        f.write("".join(l + "\n" for l in lines))


def _csv_text(records):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["2024-05-01 12:00:00.000 UTC", "", "", "100", "", "", "", "", "", "", "",
                "LOG", "00000", "starting PostgreSQL 15\nsecond line", "", "", "", "", "", "", "",
                "", "postmaster", "", "0"])
    for i, r in enumerate(records):
        w.writerow(["2024-05-01 12:00:00.000 UTC", "alice", "app", str(200 + i), "[local]", "s",
                    "1", "SELECT", "2024-05-01", "3/1", "0", "LOG", "00000", MARKER + r,
                    "", "", "", "", "", "", "", "", "psql", "client backend", "", "0"])
    return buf.getvalue()


def _json_lines(records):
    lines = [json.dumps({"timestamp": "2024-05-01 12:00:00.000 UTC", "pid": 100,
                         "error_severity": "LOG", "message": "starting PostgreSQL 15"})]
    for i, r in enumerate(records):
        lines.append(json.dumps({"timestamp": "2024-05-01 12:00:00.000 UTC", "user": "alice",
                                 "dbname": "app", "pid": 200 + i, "error_severity": "LOG",
                                 "message": MARKER + r, "backend_type": "client backend",
                                 "query_id": 0}, ensure_ascii=False))
    return lines


def self_test():
    checks = []
    failures = []

    def check(name, cond, detail=""):
        checks.append(name)
        if not cond:
            failures.append("%s%s" % (name, (": " + detail) if detail else ""))

    def run(args):
        out = io.StringIO()
        err = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
        return rc, out.getvalue() + err.getvalue()

    def expect_break(name, path, line, seq, what_re, extra=()):
        rc, out = run(["--key-file", keyfile] + list(extra) + [path])
        m = re.match(r"break: (.*) line (\d+), seq (\S+): (.*)", out.strip())
        ok = (rc == 1 and m is not None and int(m.group(2)) == line
              and m.group(3) == str(seq) and re.search(what_re, m.group(4)) is not None)
        check(name, ok, "rc %s, expected line %d seq %s /%s/, got: %r" % (rc, line, seq, what_re, out))

    tmp = tempfile.mkdtemp(prefix="audit_verify_selftest.")
    try:
        key = secrets.token_bytes(32)
        keyfile = os.path.join(tmp, "key")
        with open(keyfile, "wb") as f:
            f.write(key)
        os.chmod(keyfile, 0o600)
        recs = _make_chain(key, [12, 5])        # two server starts
        total = len(recs)
        lines = _stderr_lines(recs)
        # Line number (1-based) of record i in the stderr file.
        rec_line = {}
        for i, l in enumerate(lines):
            if STDERR_RECORD.search(l):
                rec_line[len(rec_line)] = i + 1

        good = os.path.join(tmp, "good.log")
        _write(good, lines)
        rc, out = run(["--key-file", keyfile, good])
        check("good stderr chain passes", rc == 0 and out.strip() == "ok: %d records in 2 segment(s)" % total, out)

        # The same chain split over two files (log rotation).
        cut = rec_line[7]
        a, b = os.path.join(tmp, "a.log"), os.path.join(tmp, "b.log")
        _write(a, lines[:cut])
        _write(b, lines[cut:])
        rc, out = run(["--key-file", keyfile, a, b])
        check("chain over two rotated files passes", rc == 0 and "ok: %d records" % total in out, out)
        rc, out = run(["--key-file", keyfile, b, a])
        check("rotated files in the wrong order fail", rc == 1, out)
        rc, out = run(["--key-file", keyfile, "--allow-partial-start", b])
        check("--allow-partial-start accepts a chain starting mid-way", rc == 0, out)
        expect_break("a chain starting mid-way fails without --allow-partial-start", b, 2, 9,
                     r"does not begin with an audit_start")

        # Other formats, auto-detected by name and forced with --format.
        csvf = os.path.join(tmp, "audit.csv")
        with open(csvf, "w", encoding=ENCODING, errors=ERRORS, newline="") as f:
            f.write(_csv_text(recs))
        rc, out = run(["--key-file", keyfile, csvf])
        check("good csvlog chain passes", rc == 0 and "ok: %d records in 2 segment(s)" % total in out, out)
        jsonf = os.path.join(tmp, "audit.json")
        _write(jsonf, _json_lines(recs))
        rc, out = run(["--key-file", keyfile, jsonf])
        check("good jsonlog chain passes", rc == 0 and "ok: %d records in 2 segment(s)" % total in out, out)
        for name, src, fmt in (("csv", csvf, "csv"), ("json", jsonf, "json")):
            other = os.path.join(tmp, "noext_" + name)
            shutil.copy(src, other)
            rc, out = run(["--key-file", keyfile, other])
            check("%s detected without its extension" % name, rc == 0, out)
            rc, out = run(["--key-file", keyfile, "--format", fmt, other])
            check("--format %s" % fmt, rc == 0, out)

        # A deleted record in the middle: reported at the next record, which
        # moves up one line.
        d = list(lines)
        del d[rec_line[5] - 1]
        p = os.path.join(tmp, "deleted.log")
        _write(p, d)
        expect_break("deleted record reported at the next one", p, rec_line[6] - 1, 7,
                     r"seq gap: expected 6.*bad hmac")

        # A swapped pair: reported at the first of the two.
        s = list(lines)
        s[rec_line[3] - 1], s[rec_line[4] - 1] = s[rec_line[4] - 1], s[rec_line[3] - 1]
        p = os.path.join(tmp, "swapped.log")
        _write(p, s)
        expect_break("swapped pair reported at the first swapped line", p, rec_line[3], 5,
                     r"seq gap: expected 4.*bad hmac")

        # An edited field (values 50 -> 51 in seq 5): reported at that line.
        e = list(lines)
        old = e[rec_line[4] - 1]
        new = old.replace('"values": 50,', '"values": 51,')
        check("self-test edits a field", new != old)
        e[rec_line[4] - 1] = new
        p = os.path.join(tmp, "edited.log")
        _write(p, e)
        expect_break("edited field reported at its line", p, rec_line[4], 5, r"^bad hmac")

        # The same edit in csvlog and jsonlog: reported at the right line.
        csv_recs = list(recs)
        csv_recs[4] = csv_recs[4].replace('"values": 50,', '"values": 51,')
        p = os.path.join(tmp, "edited.csv")
        with open(p, "w", encoding=ENCODING, errors=ERRORS, newline="") as f:
            f.write(_csv_text(csv_recs))
        # Line 1-2: the two-line first row; record i on line 3 + i.
        expect_break("edited field in csvlog reported at its line", p, 7, 5, r"^bad hmac")
        p = os.path.join(tmp, "edited.json")
        _write(p, _json_lines(csv_recs))
        expect_break("edited field in jsonlog reported at its line", p, 6, 5, r"^bad hmac")

        # An edited hmac.
        h = list(lines)
        i = rec_line[9] - 1
        h[i] = h[i][:-3] + ("0" if h[i][-3] != "0" else "1") + h[i][-2:]
        p = os.path.join(tmp, "hmac.log")
        _write(p, h)
        expect_break("edited hmac reported at its line", p, rec_line[9], 10, r"^bad hmac")

        # Malformed JSON.
        mj = list(lines)
        mj[rec_line[2] - 1] = mj[rec_line[2] - 1].replace('"db": "app"', '"db": app"')
        check("self-test breaks the JSON", mj[rec_line[2] - 1] != lines[rec_line[2] - 1])
        p = os.path.join(tmp, "malformed.log")
        _write(p, mj)
        expect_break("malformed JSON reported at its line", p, rec_line[2], 3, r"malformed JSON")

        # A forged record inserted (valid shape, unknown key).
        fg = list(lines)
        forged = _make_chain(secrets.token_bytes(32), [3])[1].replace('"seq": 2', '"seq": 5')
        fg.insert(rec_line[3], "2024-05-01 12:00:00.000 UTC [5] psql LOG:  " + MARKER + forged)
        p = os.path.join(tmp, "forged.log")
        _write(p, fg)
        expect_break("forged record reported at its line", p, rec_line[3] + 1, 5, r"^bad hmac")

        # The second segment's audit_start removed: seq 2 after seq 12.
        rs = list(lines)
        del rs[rec_line[12] - 1]
        p = os.path.join(tmp, "nostart.log")
        _write(p, rs)
        expect_break("segment without audit_start reported", p, rec_line[13] - 1, 2,
                     r"seq out of order: expected 13")
        # A record claiming seq 1 that is not audit_start.
        r1 = _make_chain(key, [3])
        fake = _make_chain(key, [2])[1].replace('"seq": 2', '"seq": 1')
        p = os.path.join(tmp, "restart.log")
        _write(p, _stderr_lines(r1 + [fake]))
        expect_break("restart without audit_start reported", p, 9, 1,
                     r"restarts at seq 1 without audit_start")

        # An unsigned record (the server ran without a key for a while).
        un = list(lines)
        un[rec_line[6] - 1] = re.sub(r', "hmac": "[0-9a-f]{64}"\}$', ', "signed": false}', un[rec_line[6] - 1])
        p = os.path.join(tmp, "unsigned.log")
        _write(p, un)
        expect_break("unsigned record reported at its line", p, rec_line[6], 7, r"no hmac")

        # Records removed from the start of a segment.
        p = os.path.join(tmp, "headless.log")
        _write(p, lines[rec_line[2]:])
        expect_break("missing audit_start at the beginning reported", p, 2, 4,
                     r"does not begin with an audit_start")

        # The wrong key: the first record already fails.
        wrong = os.path.join(tmp, "wrongkey")
        with open(wrong, "wb") as f:
            f.write(secrets.token_bytes(32))
        rc, out = run(["--key-file", wrong, good])
        check("wrong key fails at the first record", rc == 1 and "line %d, seq 1:" % rec_line[0] in out, out)

        # No records at all; a short key; a missing file.
        p = os.path.join(tmp, "empty.log")
        _write(p, ["2024-05-01 12:00:00.000 UTC [1] LOG:  nothing here"])
        rc, out = run(["--key-file", keyfile, p])
        check("a log without records fails", rc == 1 and "no audit records" in out, out)
        short = os.path.join(tmp, "short")
        with open(short, "wb") as f:
            f.write(b"x" * 31)
        rc, out = run(["--key-file", short, good])
        check("a key shorter than 32 bytes is a usage error", rc == 2, out)
        rc, out = run(["--key-file", keyfile, os.path.join(tmp, "missing.log")])
        check("a missing log file is a usage error", rc == 2, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if failures:
        for f in failures:
            print("self-test FAILED: %s" % f)
        print("self-test: %d of %d checks failed" % (len(failures), len(checks)))
        return 1
    print("self-test: ok (%d checks)" % len(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
