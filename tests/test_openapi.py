"""
The OpenAPI document of the HTTP API (L{smartrelay.web.openapi}) is true:
schemathesis generates requests from it, valid and invalid, against a real
C{twistd smartrelay} on loopback ports, and checks every answer against it
(status codes, content types, response schemas, no server errors, invalid
input refused, undocumented methods refused with a correct C{Allow}).

Two of its checks are left out, on purpose:

  - C{ignored_auth} sends wrong tokens, which lock the test's address out
    (C{429}) for everything after: what it checks (no token or a wrong one
    is a C{401}) is pinned in C{tests/test_web_api.py} and
    C{tests/test_e2e_api.py} instead.
  - C{positive_data_acceptance} expects every request the schema allows
    to succeed, but some rules cannot be said in a schema: a cursor is only
    valid if the API handed it out, C{from} must be before C{to}, an import
    line must be an address, a domain cannot be only dots.
"""

import subprocess

from jsonschema import Draft202012Validator
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smartrelay.web.openapi import document
from tests.sink import installedEnvironment, installedScript
from tests.test_e2e import RelayTestMixin
from tests.test_e2e_api import webPort

TOKEN = "openapi-test-token-0123456789"


class DocumentTests(SynchronousTestCase):
    """
    The document itself.
    """

    def test_valid(self):
        """It is OpenAPI 3.1 whose schemas are valid JSON Schema 2020-12."""
        openapi = document()
        self.assertEqual(openapi["openapi"], "3.1.0")
        for name, schema in openapi["components"]["schemas"].items():
            Draft202012Validator.check_schema(schema)
        for path, operations in openapi["paths"].items():
            self.assertTrue(path.startswith("/api/v1/"), path)
            for method, operation in operations.items():
                for parameter in operation["parameters"]:
                    Draft202012Validator.check_schema(parameter["schema"])
                self.assertTrue(operation["responses"], f"{method} {path}")

    def test_fresh(self):
        """Each call gives a copy: changing one does not change the next."""
        document()["paths"].clear()
        self.assertTrue(document()["paths"])


class SchemathesisTests(RelayTestMixin, TestCase):
    """
    schemathesis against a live relay.
    """

    timeout = 240

    @inlineCallbacks
    def test_schemathesis(self):
        """schemathesis finds no answer that contradicts the document."""
        relay = self.makeRelay(
            self.relayConfig(9).replace("[web]\n", f"[web]\napi_tokens = {TOKEN}\n", 1)
        )
        relay.start()
        yield relay.waitReady(reactor)
        url = f"http://127.0.0.1:{webPort(relay)}/api/v1/openapi.json"
        result = yield deferToThread(
            subprocess.run,
            [
                installedScript("schemathesis"),
                "run",
                url,
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--checks",
                "all",
                "--exclude-checks",
                "ignored_auth,positive_data_acceptance",
                "--max-examples",
                "15",
                "--seed",
                "1",
                # One worker: with two threads, hypothesis's ast.parse of
                # filter lambdas hits CPython 3.11's "AST constructor
                # recursion depth mismatch" (not thread-safe) now and then.
                "--workers",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            env=installedEnvironment(),
            cwd=self.workdir,
            timeout=200,
        )
        output = result.stdout + result.stderr
        with open(self.workdir + "/schemathesis.txt", "w") as f:
            f.write(output)
        self.assertEqual(result.returncode, 0, output[-6000:])
        self.assertRegex(output, r"No issues found")
        self.assertNotRegex(relay.log(), r"Traceback|API error")
        yield relay.stop()
