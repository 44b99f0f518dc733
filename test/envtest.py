"""Helpers shared by envelope's Python integration tests (test/test_*.py)."""
import json
import os
import time
import unittest
import urllib.request


def admin(method, path, body=None):
    """Call the test KMS's admin API; returns the decoded JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(os.environ["ENVELOPE_KMS_ADMIN"] + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def set_fault(mode, count=None):
    """Switch the KMS's fault mode (releases hung requests)."""
    body = {"mode": mode}
    if count is not None:
        body["count"] = count
    return admin("POST", "/fault", body)


class SummaryResult(unittest.TextTestResult):
    """One line per test: PASS/FAIL/ERROR, name, time and the first problem."""

    def startTest(self, test):
        self._t0 = time.monotonic()
        self._problems = []
        unittest.TestResult.startTest(self, test)

    def _note(self, status, what, err):
        text = str(err[1]).strip().splitlines()
        self._problems.append((status, what, text[0][:240] if text else err[0].__name__))

    def addFailure(self, test, err):
        unittest.TestResult.addFailure(self, test, err)
        self._note("FAIL", test, err)

    def addError(self, test, err):
        unittest.TestResult.addError(self, test, err)
        if not hasattr(self, "_problems") or not isinstance(test, unittest.TestCase):
            # setUpModule / setUpClass errors come without startTest
            self.stream.writeln("ERROR %s: %s" % (test, str(err[1]).strip().splitlines()[0][:240]))
            return
        self._note("ERROR", test, err)

    def addSubTest(self, test, subtest, err):
        unittest.TestResult.addSubTest(self, test, subtest, err)
        if err is not None:
            self._note("FAIL" if issubclass(err[0], test.failureException) else "ERROR", subtest, err)

    def stopTest(self, test):
        unittest.TestResult.stopTest(self, test)
        name = test.id().split(".", 1)[-1]
        took = time.monotonic() - self._t0
        if not self._problems:
            status, why = ("SKIP", "") if any(t is test for t, _ in self.skipped) else ("PASS", "")
        else:
            status = "ERROR" if any(p[0] == "ERROR" for p in self._problems) else "FAIL"
            first = self._problems[0]
            where = first[1]._subDescription() if hasattr(first[1], "_subDescription") else ""
            more = " (+%d more)" % (len(self._problems) - 1) if len(self._problems) > 1 else ""
            why = ": %s%s%s" % (where + " " if where else "", first[2], more)
        self.stream.writeln("%-5s %s (%.2f s)%s" % (status, name, took, why))
        self.stream.flush()
        self._problems = []
