#!/usr/bin/python3
"""Verify the tamper-evident chain of envelope's audit records in server logs.

Usage:
    audit_verify.py --key-file KEY [--format auto|stderr|csv|json]
                    [--allow-partial-start] [--first-break-only] LOGFILE...
    audit_verify.py --self-test

Reads the server log files in the order given (oldest first, as rotated),
extracts every audit record (the JSON object after "ENVELOPE AUDIT: " in a
LOG message) and checks, for each record:

  * it is a well-formed JSON object whose last field is "hmac" (64 lowercase
    hex digits), without duplicate fields;
  * its hmac is HMAC-SHA256(key, prev_hmac_hex + body), where body is the
    record text from the opening "{" up to, not including, ', "hmac": "',
    and prev_hmac_hex is the hmac of the previous record, or 64 "0" for an
    "audit_start" record (the first record after each server start);
  * seq is the previous record's seq + 1, and an audit_start record has
    seq 1 (each server start begins a new segment of the chain); seq 1
    without audit_start is a break.

Formats (--format auto, the default, picks by file: *.csv is csvlog, *.json
is jsonlog, otherwise the first line decides):

  stderr   a line that does not start with whitespace (continuation lines of
           a multi-line message never hold a record) and contains
           "LOG:  ENVELOPE AUDIT: "; the record is the text after the first
           such occurrence whose remainder, up to the end of the line, is a
           record (see below).  A genuine record always ends its line, so an
           occurrence planted in log_line_prefix (%a, %u, %d are chosen by
           clients) is passed over: its remainder runs into the real marker
           and is never one JSON object.  Taking the first valid occurrence,
           not simply the last one, also keeps a record whose own "app",
           "user", "db" or "detail" contains the marker text.
  csv      csvlog, parsed with the csv module: a row whose error_severity
           (field 12) is LOG and whose message (field 14) starts with
           "ENVELOPE AUDIT: "
  json     jsonlog, one JSON object per line: "error_severity" is "LOG" and
           "message" starts with "ENVELOPE AUDIT: "

A candidate found this way is a record only if its text is one JSON object
with an integer "seq" and a string "event".  Anything else (not JSON, a
truncated line, some other value) is not a record: it is skipped and counted,
and a warning names the first one; by itself it does not fail the check.
(The chain still catches a genuine record made unreadable this way: the next
record fails its seq and hmac check.)  So text that an attacker without the
key gets into the log can add warnings, and at worst a reported break at a
record-shaped line, but cannot end the check early or hide later records.

Output: one line per break, "break: FILE line L, seq S: what is wrong", in
log order, then "failed: B break(s) in N records" and exit status 1; or
"ok: N records in S segment(s)" and exit status 0.  Then, if candidates
were skipped, "warning: K line(s) looked like audit records but are not
(first: FILE line L)".

After a break the check goes on: the chain is re-anchored on the record that
broke it if that record's own hmac field is 64 hex digits (otherwise the
record is passed over and the next one is checked against the record before
it).  So an edited record gives one report, a deleted one one report (at the
next record), an inserted one one or two, and records after them are still
checked.  --first-break-only stops at the first break and prints only it
(the behaviour of earlier versions), plus the warning line if any.

A bad hmac means the record was edited, or a record before it was deleted,
edited or moved.  A log without any audit record is a break too (everything
may have been deleted).  Usage errors (unreadable files, a key shorter than
32 bytes) exit with status 2.

What a chain cannot show: records removed from the END of the last file
(truncation), or whole segments removed along with their server start.
Compare the last seq with a later record (or the live server) for that.

--allow-partial-start accepts a first record that is not audit_start (the
older log files were removed): that record's hmac cannot be checked and
only anchors the chain.

--self-test builds a synthetic chain (stderr, csvlog and jsonlog) with a
random key and checks that a good chain passes; that a deleted record, a
swapped pair, an edited field, a forged record and a restart without
audit_start are each reported at the right line and seq, and later records
still checked; and that forged continuation lines, markers in the line
prefix or in a record's own fields, and lines that only look like records
(malformed JSON, other severities) neither break the chain nor hide records.

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
# envelope logs its records at LOG: in a stderr log the message follows the
# log_line_prefix and "LOG:  ".
STDERR_MARKER = "LOG:  " + MARKER
HMAC_SEP = ', "hmac": "'
ZERO_HMAC = "0" * 64
HEX64 = re.compile(r"[0-9a-f]{64}")
TRAILING_SPACE = re.compile(r"\s*\Z")
MIN_KEY_BYTES = 32
CSV_MESSAGE_FIELD = 13      # 0-based index of "message" in csvlog
CSV_SEVERITY_FIELD = 11     # 0-based index of "error_severity" in csvlog
# A logged statement can be far longer than the csv module's default field
# limit (128 kB); PostgreSQL's own limit is 1 GB.
CSV_FIELD_LIMIT = 2 ** 31 - 1

# File text is decoded with surrogateescape so that the exact bytes the
# server wrote can be recovered for the HMAC, whatever their encoding.
ENCODING = "utf-8"
ERRORS = "surrogateescape"


class JSONObject(list):
    """A parsed JSON object: its (key, value) pairs in order (duplicates kept)."""


DECODER = json.JSONDecoder(object_pairs_hook=JSONObject)


class Record:
    """A candidate found in a log: where, its text, and its fields if it is
    a record (pairs is None for a candidate that is not one)."""

    def __init__(self, path, line, text, pairs):
        self.path = path
        self.line = line
        self.text = text        # from the opening "{" to the end
        self.pairs = pairs


class Break(Exception):
    """A problem in the chain (or the log); carries where it is."""

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

def record_pairs(s, start=0):
    """The fields of s[start:] if it is a record (one JSON object, nothing but
    whitespace after it, with an integer "seq" and a string "event"), as a
    JSONObject; None otherwise."""
    try:
        obj, end = DECODER.raw_decode(s, start)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, JSONObject) or not TRAILING_SPACE.match(s, end):
        return None
    fields = dict(obj)
    seq = fields.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None
    if not isinstance(fields.get("event"), str):
        return None
    return obj


def candidate(path, line, s, start):
    """The Record for the candidate text s[start:]."""
    return Record(path, line, s[start:].rstrip(), record_pairs(s, start))


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
        except (ValueError, RecursionError):
            pass
    csv.field_size_limit(CSV_FIELD_LIMIT)
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
            # A continuation line (TAB-indented) is part of some other
            # message, whatever it contains.
            if not line or line[0].isspace():
                continue
            at = line.find(STDERR_MARKER)
            if at < 0:
                continue
            first = at + len(STDERR_MARKER)
            while at >= 0:
                start = at + len(STDERR_MARKER)
                if record_pairs(line, start) is not None:
                    break
                at = line.find(STDERR_MARKER, at + 1)
            else:
                start = first           # no record here: report the first
            yield candidate(path, lineno, line, start)


def records_csv(path):
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        reader = csv.reader(f)
        start = 1
        while True:
            line = start
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                start = reader.line_num + 1
                yield Break(Record(path, line, "", None), None, "unparsable csvlog line: %s" % e)
                continue
            start = reader.line_num + 1
            if len(row) <= max(CSV_MESSAGE_FIELD, CSV_SEVERITY_FIELD):
                if any(MARKER in field for field in row):
                    yield Record(path, line, "", None)      # a damaged row
                continue
            msg = row[CSV_MESSAGE_FIELD]
            if row[CSV_SEVERITY_FIELD] == "LOG" and msg.startswith(MARKER):
                yield candidate(path, line, msg, len(MARKER))


def records_json(path):
    with open(path, encoding=ENCODING, errors=ERRORS, newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                if MARKER in line:
                    yield Record(path, lineno, "", None)    # a damaged line
                continue
            if not isinstance(obj, dict) or obj.get("error_severity") != "LOG":
                continue
            msg = obj.get("message")
            if isinstance(msg, str) and msg.startswith(MARKER):
                yield candidate(path, lineno, msg, len(MARKER))


EXTRACTORS = {"stderr": records_stderr, "csv": records_csv, "json": records_json}


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------

def duplicate_fields(obj):
    """Sorted names of fields that occur twice in one object, at any depth."""
    dups = set()
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, JSONObject):
            keys = [k for k, _ in v]
            seen = set()
            for k in keys:
                if k in seen:
                    dups.add(k)
                seen.add(k)
            stack.extend(x for _, x in v)
        elif isinstance(v, list):
            stack.extend(v)
    return sorted(dups)


def check_form(rec, seq):
    """(body, hmac) of a record, or raise Break if its form is wrong."""
    pairs = rec.pairs
    text = rec.text
    fields = dict(pairs)
    if seq < 1:
        raise Break(rec, seq, "seq must be 1 or more")
    dups = duplicate_fields(pairs)
    if dups:
        raise Break(rec, seq, "duplicate field(s) %s" % ", ".join(dups))
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
    return text[:cut], mac


def compute_hmac(key, prev_hex, body):
    msg = (prev_hex + body).encode(ENCODING, ERRORS)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


class Result:
    def __init__(self):
        self.records = 0        # records checked
        self.segments = 0
        self.breaks = 0
        self.skipped = 0        # candidates that are not records
        self.first_skipped = None


def verify(paths, key, fmt="auto", allow_partial_start=False, first_break_only=False,
           on_break=None):
    """Check the chain; call on_break(Break) for each break found (only the
    first with first_break_only).  Returns a Result."""
    res = Result()
    prev_hmac = None
    prev_seq = None
    prev_where = None

    def report(b):
        res.breaks += 1
        if on_break is not None:
            on_break(b)
        return first_break_only

    for path in paths:
        f = detect_format(path) if fmt == "auto" else fmt
        for rec in EXTRACTORS[f](path):
            if isinstance(rec, Break):
                if report(rec):
                    return res
                continue
            if rec.pairs is None:
                res.skipped += 1
                if res.first_skipped is None:
                    res.first_skipped = rec
                continue
            res.records += 1
            fields = dict(rec.pairs)
            seq = fields["seq"]
            event = fields["event"]
            mac = fields.get("hmac")
            anchor = mac if isinstance(mac, str) and HEX64.fullmatch(mac) else None
            problems = []
            try:
                body, mac = check_form(rec, seq)
            except Break as b:
                problems.append(b.what)
            else:
                if event == "audit_start":
                    if seq != 1:
                        problems.append("audit_start record with seq %d (must be 1)" % seq)
                    if compute_hmac(key, ZERO_HMAC, body) != mac:
                        problems.append("bad hmac on audit_start: the record was edited "
                                        "(or written with another key)")
                elif prev_hmac is None:
                    if not allow_partial_start:
                        problems.append("the chain does not begin with an audit_start record "
                                        "(seq 1): records before it were deleted, or the log is "
                                        "incomplete (see --allow-partial-start)")
                else:
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
            if event == "audit_start" or prev_hmac is None:
                res.segments += 1
            if problems:
                if report(Break(rec, seq, "; ".join(problems))):
                    return res
                if anchor is None:
                    continue        # passed over: the next record is checked against prev
            prev_hmac = anchor
            prev_seq = seq
            prev_where = "%s line %d" % (os.path.basename(rec.path), rec.line)
    if res.records == 0:
        where = Record(paths[-1] if paths else "-", 0, "", None)
        report(Break(where, None, "no audit records found"))
    return res


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
    ap.add_argument("--first-break-only", action="store_true",
                    help="stop at the first break and report only it")
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
        res = verify(args.logfiles, key, args.format, args.allow_partial_start,
                     args.first_break_only, on_break=print)
    except (OSError, UnicodeError) as e:
        print("audit_verify.py: %s" % e, file=sys.stderr)
        return 2
    if res.breaks == 0:
        print("ok: %d records in %d segment(s)" % (res.records, res.segments))
    elif not args.first_break_only:
        print("failed: %d break(s) in %d records" % (res.breaks, res.records))
    if res.skipped:
        print("warning: %d line(s) looked like audit records but are not (first: %s line %d)"
              % (res.skipped, res.first_skipped.path, res.first_skipped.line))
    return 1 if res.breaks else 0


# ---------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------

def _json_str(s):
    return json.dumps(s, ensure_ascii=False)


def _make_chain(key, segments, app="psql, \"quoted\" é"):
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
                ("app", _json_str(app)),
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


def _stderr_lines(records, app="psql"):
    """A stderr log: each record on its own LOG line, other lines between
    (log_line_prefix '%m [%p] %a ')."""
    lines = ["2024-05-01 12:00:00.000 UTC [100] LOG:  starting PostgreSQL 15"]
    for i, r in enumerate(records):
        lines.append("2024-05-01 12:00:00.%03d UTC [%d] %s LOG:  statement: SELECT %d" % (i % 1000, 200 + i, app, i))
        lines.append("2024-05-01 12:00:00.%03d UTC [%d] %s LOG:  %s%s" % (i % 1000, 200 + i, app, MARKER, r))
    # Quoted in a logged statement: not a record.
    lines.append("2024-05-01 12:00:01.000 UTC [999] psql LOG:  statement: SELECT 'ENVELOPE AUDIT: {\"seq\": 1}'")
    lines.append("2024-05-01 12:00:01.000 UTC [999] psql ERROR:  division by zero")
    return lines


def _write(path, lines):
    with open(path, "w", encoding=ENCODING, errors=ERRORS, newline="") as f:
        f.write("".join(l + "\n" for l in lines))


def _csv_row(message, severity="LOG"):
    return ["2024-05-01 12:00:00.000 UTC", "alice", "app", "300", "[local]", "s",
            "1", "SELECT", "2024-05-01", "3/1", "0", severity, "00000", message,
            "", "", "", "", "", "", "", "", "psql", "client backend", "", "0"]


def _csv_text(records, extra=None):
    """csvlog text; extra: {record index: [rows written before it]}."""
    extra = extra or {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["2024-05-01 12:00:00.000 UTC", "", "", "100", "", "", "", "", "", "", "",
                "LOG", "00000", "starting PostgreSQL 15\nsecond line", "", "", "", "", "", "", "",
                "", "postmaster", "", "0"])
    for i, r in enumerate(records):
        for row in extra.get(i, ()):
            w.writerow(row)
        w.writerow(["2024-05-01 12:00:00.000 UTC", "alice", "app", str(200 + i), "[local]", "s",
                    "1", "SELECT", "2024-05-01", "3/1", "0", "LOG", "00000", MARKER + r,
                    "", "", "", "", "", "", "", "", "psql", "client backend", "", "0"])
    return buf.getvalue()


def _json_entry(message, severity="LOG"):
    return json.dumps({"timestamp": "2024-05-01 12:00:00.000 UTC", "user": "alice",
                       "dbname": "app", "pid": 300, "error_severity": severity,
                       "message": message}, ensure_ascii=False)


def _json_lines(records, extra=None):
    """jsonlog lines; extra: {record index: [lines written before it]}."""
    extra = extra or {}
    lines = [json.dumps({"timestamp": "2024-05-01 12:00:00.000 UTC", "pid": 100,
                         "error_severity": "LOG", "message": "starting PostgreSQL 15"})]
    for i, r in enumerate(records):
        lines.extend(extra.get(i, ()))
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

    BREAK_RE = re.compile(r"break: (.*) line (\d+), seq (\S+): (.*)")

    def breaks_in(out):
        return [BREAK_RE.fullmatch(l) for l in out.splitlines() if l.startswith("break: ")]

    def expect_break(name, path, line, seq, what_re, extra=(), nbreaks=None):
        """The first break is at line/seq and matches what_re; with nbreaks,
        exactly that many are reported (and counted in the failed: line)."""
        rc, out = run(["--key-file", keyfile] + list(extra) + [path])
        found = breaks_in(out)
        m = found[0] if found else None
        ok = (rc == 1 and out.startswith("break: ") and m is not None and int(m.group(2)) == line
              and m.group(3) == str(seq) and re.search(what_re, m.group(4)) is not None)
        if nbreaks is not None:
            ok = ok and len(found) == nbreaks and ("\nfailed: %d break(s) in " % nbreaks) in out
        check(name, ok, "rc %s, expected line %d seq %s /%s/%s, got: %r"
              % (rc, line, seq, what_re, "" if nbreaks is None else " x%d" % nbreaks, out))
        return found

    def expect_ok(name, path, records, segments=None, warned=None, extra=()):
        """ok: with that many records; warned: None (no warning) or
        (count, line) of the expected warning."""
        rc, out = run(["--key-file", keyfile] + list(extra) + [path])
        want = "ok: %d records in " % records
        if segments is not None:
            want += "%d segment(s)" % segments
        lines = out.splitlines()
        ok = rc == 0 and len(lines) >= 1 and lines[0].startswith(want)
        if warned is None:
            ok = ok and len(lines) == 1
        else:
            ok = ok and lines[1:] == ["warning: %d line(s) looked like audit records but are not "
                                      "(first: %s line %d)" % (warned[0], path, warned[1])]
        check(name, ok, "rc %s, expected %r%s, got: %r"
              % (rc, want, "" if warned is None else " and warning %r" % (warned,), out))

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
            if STDERR_MARKER in l:
                rec_line[len(rec_line)] = i + 1
        check("self-test finds its records", len(rec_line) == total)
        # A record as an attacker without the key could write it: the right
        # shape and the next seq, a 64-hex hmac made with another key.
        forged = _make_chain(secrets.token_bytes(32), [3])[1].replace('"seq": 2', '"seq": 5')

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
                     r"does not begin with an audit_start", nbreaks=1)

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
        # moves up one line; the chain goes on from there.
        d = list(lines)
        del d[rec_line[5] - 1]
        p = os.path.join(tmp, "deleted.log")
        _write(p, d)
        expect_break("deleted record reported at the next one (only)", p, rec_line[6] - 1, 7,
                     r"seq gap: expected 6.*bad hmac", nbreaks=1)

        # A swapped pair: reported at the first of the two.
        s = list(lines)
        s[rec_line[3] - 1], s[rec_line[4] - 1] = s[rec_line[4] - 1], s[rec_line[3] - 1]
        p = os.path.join(tmp, "swapped.log")
        _write(p, s)
        found = expect_break("swapped pair reported at the first swapped line", p, rec_line[3], 5,
                             r"seq gap: expected 4.*bad hmac")
        check("swapped pair: both lines and the record after them reported",
              [(int(m.group(2)), m.group(3)) for m in found if m]
              == [(rec_line[3], "5"), (rec_line[4], "4"), (rec_line[5], "6")], repr(found))

        # An edited field (values 50 -> 51 in seq 5): reported at that line.
        e = list(lines)
        old = e[rec_line[4] - 1]
        new = old.replace('"values": 50,', '"values": 51,')
        check("self-test edits a field", new != old)
        e[rec_line[4] - 1] = new
        p = os.path.join(tmp, "edited.log")
        _write(p, e)
        expect_break("edited field reported at its line (only)", p, rec_line[4], 5, r"^bad hmac", nbreaks=1)

        # The same edit in csvlog and jsonlog: reported at the right line.
        csv_recs = list(recs)
        csv_recs[4] = csv_recs[4].replace('"values": 50,', '"values": 51,')
        p = os.path.join(tmp, "edited.csv")
        with open(p, "w", encoding=ENCODING, errors=ERRORS, newline="") as f:
            f.write(_csv_text(csv_recs))
        # Line 1-2: the two-line first row; record i on line 3 + i.
        expect_break("edited field in csvlog reported at its line", p, 7, 5, r"^bad hmac", nbreaks=1)
        p = os.path.join(tmp, "edited.json")
        _write(p, _json_lines(csv_recs))
        expect_break("edited field in jsonlog reported at its line", p, 6, 5, r"^bad hmac", nbreaks=1)

        # An edited hmac.
        h = list(lines)
        i = rec_line[9] - 1
        h[i] = h[i][:-3] + ("0" if h[i][-3] != "0" else "1") + h[i][-2:]
        p = os.path.join(tmp, "hmac.log")
        _write(p, h)
        expect_break("edited hmac reported at its line", p, rec_line[9], 10, r"^bad hmac")

        # Malformed JSON in a genuine record: not a record any more (a
        # warning), and the next record, checked against the one before it,
        # breaks.
        mj = list(lines)
        mj[rec_line[2] - 1] = mj[rec_line[2] - 1].replace('"db": "app"', '"db": app"')
        check("self-test breaks the JSON", mj[rec_line[2] - 1] != lines[rec_line[2] - 1])
        p = os.path.join(tmp, "malformed.log")
        _write(p, mj)
        expect_break("a genuine record made malformed is caught at the next one", p, rec_line[3], 4,
                     r"seq gap: expected 3 .*1 record\(s\) missing; bad hmac", nbreaks=1)
        rc, out = run(["--key-file", keyfile, p])
        check("... and the malformed line is named in the warning",
              out.endswith("warning: 1 line(s) looked like audit records but are not (first: %s line %d)\n"
                           % (p, rec_line[2])), out)

        # A forged record inserted between two good ones (right shape, next
        # seq, hmac made with another key): reported, and so is the next
        # genuine record (checked against the forged one); everything after
        # is still checked, so a later edit is reported too.
        fg = list(lines)
        fg.insert(rec_line[3], "2024-05-01 12:00:00.000 UTC [5] psql LOG:  " + MARKER + forged)
        p = os.path.join(tmp, "forged.log")
        _write(p, fg)
        found = expect_break("forged record reported at its line", p, rec_line[3] + 1, 5, r"^bad hmac",
                             nbreaks=2)
        check("... and the record after it, then the chain goes on",
              [(int(m.group(2)), m.group(3)) for m in found if m] == [(rec_line[3] + 1, "5"), (rec_line[4] + 1, "5")]
              and re.match(r"seq out of order: expected 6 after seq 5 .*; bad hmac", found[1].group(4)) is not None,
              repr([m.group(0) for m in found if m]))
        fe = list(fg)
        fe[rec_line[10]] = fe[rec_line[10]].replace('"values": 110,', '"values": 111,')
        check("self-test edits seq 11", fe[rec_line[10]] != fg[rec_line[10]])
        p2 = os.path.join(tmp, "forged_edited.log")
        _write(p2, fe)
        found = expect_break("forged record and a later edit: every break reported", p2, rec_line[3] + 1, 5,
                             r"^bad hmac", nbreaks=3)
        check("... the later edit at its line", len(found) == 3 and found[2] is not None
              and (int(found[2].group(2)), found[2].group(3)) == (rec_line[10] + 1, "11")
              and found[2].group(4).startswith("bad hmac"), repr(found))
        rc, out = run(["--key-file", keyfile, "--first-break-only", p2])
        check("--first-break-only reports only the first break",
              rc == 1 and out.splitlines() == ["break: %s line %d, seq 5: bad hmac: the record was edited, "
                                               "or a record before it was deleted, edited or moved"
                                               % (p2, rec_line[3] + 1)], out)
        expect_break("--first-break-only: the first break", p, rec_line[3] + 1, 5, r"^bad hmac",
                     extra=["--first-break-only"])
        # Without a 64-hex hmac the forged record cannot anchor the chain:
        # it is passed over, and the next genuine record verifies.
        fn = list(lines)
        fn.insert(rec_line[3], "2024-05-01 12:00:00.000 UTC [5] psql LOG:  " + MARKER
                  + re.sub(r', "hmac": "[0-9a-f]{64}"\}$', ', "hmac": "x"}', forged))
        p = os.path.join(tmp, "forged_nohmac.log")
        _write(p, fn)
        expect_break("forged record without a valid hmac: one report", p, rec_line[3] + 1, 5,
                     r"hmac is not 64", nbreaks=1)

        # Continuation lines of a multi-line message (a logged statement
        # with newlines) start with a TAB: never records, not even counted.
        ct = list(lines)
        ct.insert(rec_line[4], "\tLOG:  " + MARKER + forged)
        ct.insert(rec_line[4], "\tLOG:  " + MARKER + "not json")
        ct.insert(rec_line[4], " LOG:  " + MARKER + forged)
        ct.insert(rec_line[1], "\tLOG:  " + MARKER + forged.replace('"seq": 5', '"seq": 3'))
        ct.insert(rec_line[1], "2024-05-01 12:00:00.000 UTC [7] psql LOG:  statement: SELECT 1,")
        p = os.path.join(tmp, "continuation.log")
        _write(p, ct)
        expect_ok("forged continuation lines are ignored", p, total, 2)

        # The marker in the log_line_prefix (%a = application_name, %u, %d):
        # the record is the text after it, however the prefix is crafted.
        px = list(lines)
        real = lines[rec_line[5] - 1]
        rtext = real[real.index(MARKER) + len(MARKER):]
        px[rec_line[5] - 1] = "2024-05-01 12:00:00.000 UTC [205] LOG:  ENVELOPE AUDIT: x LOG:  " + MARKER + rtext
        px[rec_line[6] - 1] = ('2024-05-01 12:00:00.000 UTC [206] LOG:  ENVELOPE AUDIT: {"seq": 7, '
                               '"event": "x", "a": " LOG:  ' + MARKER
                               + lines[rec_line[6] - 1].split(MARKER, 1)[1])
        px[rec_line[7] - 1] = ("2024-05-01 12:00:00.000 UTC [207] LOG:  ENVELOPE AUDIT: " + forged
                               + " LOG:  " + MARKER + lines[rec_line[7] - 1].split(MARKER, 1)[1])
        p = os.path.join(tmp, "prefix.log")
        _write(p, px)
        expect_ok("a prefix containing the marker before a real record still verifies", p, total, 2)
        # ... and a record whose own fields (application_name, also in the
        # prefix) contain the marker and a record-like object.
        app = 'x LOG:  ENVELOPE AUDIT: {"seq": 1, "event": "audit_start"}'
        arecs = _make_chain(key, [4], app=app)
        check("self-test: the marker is in the records' app", all(MARKER in r for r in arecs))
        p = os.path.join(tmp, "app.log")
        _write(p, _stderr_lines(arecs, app=app))
        # The 4 statement lines before the records now look like records too.
        expect_ok("a record whose app contains the marker verifies", p, 4, 1, warned=(4, 2))

        # Lines that look like records but are not: skipped, counted in a
        # warning, exit 0.
        gb = list(lines)
        junk = ["not json", '{"seq": 7}', '{"seq": "7", "event": "decrypt"}',
                '{"seq": true, "event": "decrypt"}', '{"seq": 7, "event": 7}', '[1, 2]',
                '{"seq": 7, "event": "decrypt"} trailing', "[" * 100000, '"ENVELOPE AUDIT"', ""]
        for j in reversed(junk):
            gb.insert(rec_line[6], "2024-05-01 12:00:00.000 UTC [9] psql LOG:  " + MARKER + j)
        p = os.path.join(tmp, "garbage.log")
        _write(p, gb)
        expect_ok("garbage candidates are ignored with a warning", p, total, 2,
                  warned=(len(junk), rec_line[6] + 1))
        p = os.path.join(tmp, "garbage1.log")
        _write(p, gb[:rec_line[6] + 1] + gb[rec_line[6] + len(junk):])
        check("self-test keeps one garbage line", gb[rec_line[6]].endswith("not json"))
        expect_ok("LOG:  ENVELOPE AUDIT: not json is ignored with a warning", p, total, 2,
                  warned=(1, rec_line[6] + 1))

        # csvlog and jsonlog: only LOG rows whose message starts with the
        # marker are candidates.
        fake = MARKER + forged
        extra_csv = {6: [_csv_row(fake, "ERROR"), _csv_row(fake, "WARNING"), _csv_row("x " + fake),
                         _csv_row(fake, "LOG ")],
                     8: [_csv_row(MARKER + "not json"), _csv_row("y" * 200000)]}
        p = os.path.join(tmp, "other.csv")
        with open(p, "w", encoding=ENCODING, errors=ERRORS, newline="") as f:
            f.write(_csv_text(recs, extra_csv))
        # The two-line first row, 8 records, 4 rows: the garbage row.
        expect_ok("csvlog: other severities and quotes are ignored, garbage warned", p, total, 2,
                  warned=(1, 3 + 8 + 4))
        extra_json = {6: [_json_entry(fake, "ERROR"), _json_entry(fake, "WARNING"), _json_entry("x " + fake),
                          json.dumps({"message": fake}), json.dumps([fake])],
                      8: [_json_entry(MARKER + "not json"), '{"message": "' + MARKER + '{"seq"']}
        p = os.path.join(tmp, "other.json")
        _write(p, _json_lines(recs, extra_json))
        expect_ok("jsonlog: other severities and quotes are ignored, garbage warned", p, total, 2,
                  warned=(2, 2 + 8 + 5))

        # The second segment's audit_start removed: seq 2 after seq 12.
        rs = list(lines)
        del rs[rec_line[12] - 1]
        p = os.path.join(tmp, "nostart.log")
        _write(p, rs)
        expect_break("segment without audit_start reported", p, rec_line[13] - 1, 2,
                     r"seq out of order: expected 13", nbreaks=1)
        # A record claiming seq 1 that is not audit_start.
        r1 = _make_chain(key, [3])
        fake1 = _make_chain(key, [2])[1].replace('"seq": 2', '"seq": 1')
        p = os.path.join(tmp, "restart.log")
        _write(p, _stderr_lines(r1 + [fake1]))
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
                     r"does not begin with an audit_start", nbreaks=1)

        # The wrong key: the first record already fails.
        wrong = os.path.join(tmp, "wrongkey")
        with open(wrong, "wb") as f:
            f.write(secrets.token_bytes(32))
        rc, out = run(["--key-file", wrong, good])
        check("wrong key fails at the first record", rc == 1 and "line %d, seq 1:" % rec_line[0] in out, out)

        # No records at all (only lines that look like one); a short key; a
        # missing file.
        p = os.path.join(tmp, "empty.log")
        _write(p, ["2024-05-01 12:00:00.000 UTC [1] LOG:  nothing here"])
        rc, out = run(["--key-file", keyfile, p])
        check("a log without records fails", rc == 1 and "no audit records" in out, out)
        _write(p, ["2024-05-01 12:00:00.000 UTC [1] LOG:  " + MARKER + "not json"])
        rc, out = run(["--key-file", keyfile, p])
        check("a log with only a garbage candidate fails (no records) and warns",
              rc == 1 and "no audit records" in out and "warning: 1 line(s)" in out, out)
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
