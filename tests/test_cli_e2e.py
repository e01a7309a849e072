"""
End to end: the installed C{smartrelay} console script against a real
C{twistd smartrelay} child process (its API on an OS-chosen loopback
port), with real submissions and a real SMTP sink.
"""

import json
import subprocess

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.sink import installedEnvironment, installedScript, waitFor
from tests.test_e2e import RelayTestMixin, events, submit
from tests.test_e2e_api import webPort

TOKEN = "cli-e2e-token-0123456789abcdef"


class ConsoleTests(RelayTestMixin, TestCase):
    """
    C{smartrelay message/queue/suppress/stats/events} on a running relay.
    """

    timeout = 120

    async def startRelay(self) -> None:
        sinkPort = self.startSink()
        self.relay = self.makeRelay(
            self.relayConfig(sinkPort).replace("[web]\n", f"[web]\napi_tokens = {TOKEN}\n", 1))
        self.relay.start()
        await self.relay.waitReady(reactor)
        self.url = f"http://127.0.0.1:{webPort(self.relay)}"

    def console(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        """
        The installed C{smartrelay ARGV}, the token from the relay's
        configuration file, the URL from the flag (the file listens on
        port 0).
        """
        return subprocess.run(
            [installedScript("smartrelay"), *argv, "--config", self.relay.configPath,
             "--url", self.url],
            input=stdin, capture_output=True, text=True, timeout=60,
            env=installedEnvironment(), cwd=self.relay.workdir,
        )

    async def run_(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        return await deferToThread(self.console, *argv, stdin=stdin)

    async def test_console(self) -> None:
        """
        A delivered message's timeline, the events and stats counting it;
        a suppression added stops the next message and removed lets it
        through; an unknown id is exit status 1 with the API's message.
        """
        await self.startRelay()
        (code, text), _ = await deferToThread(submit, self.relay.port, ["ok@example.org"])
        self.assertEqual(code, 250, text)
        queueID = text.split()[-1]
        await waitFor(reactor, lambda: any(e[0] == "delivered" for e in events(self.workdir)))

        result = await self.run_("message", queueID)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"message {queueID} (no longer queued)", result.stdout)
        self.assertRegex(result.stdout, r"ok@example.org +delivered")
        self.assertRegex(result.stdout, r"accepted +ok@example.org")

        result = await self.run_("events", "--json", "--queue-id", queueID)
        self.assertEqual([json.loads(line)["type"] for line in result.stdout.splitlines()],
                         ["accepted", "delivered"])
        result = await self.run_("stats", "--json")
        self.assertEqual(json.loads(result.stdout)["totals"]["counts"]["delivered"], 1)
        result = await self.run_("queue")
        self.assertEqual((result.returncode, result.stdout),
                         (0, "0 message(s), 0 recipient(s) queued\n"))

        result = await self.run_("suppress", "add", "blocked@example.org")
        self.assertEqual(result.returncode, 0, result.stderr)
        result = await self.run_("suppress", "list", "--json")
        self.assertEqual([i["address"] for i in json.loads(result.stdout)["items"]],
                         ["blocked@example.org"])
        (code, text), _ = await deferToThread(submit, self.relay.port, ["blocked@example.org"])
        await waitFor(reactor, lambda: any(e[0] == "suppressed" for e in events(self.workdir)))
        result = await self.run_("suppress", "remove", "blocked@example.org")
        self.assertEqual(result.stdout, "removed blocked@example.org\n")
        result = await self.run_("suppress", "import", "-",
                                 stdin="address\na@example.org\nb@example.org\n")
        self.assertEqual(result.stdout, "imported 2 address(es) from -\n")
        result = await self.run_("suppress", "export")
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], "address,reason,source_event,time,expires")
        self.assertEqual(sorted(line.split(",")[0] for line in lines[1:]),
                         ["a@example.org", "b@example.org"])

        result = await self.run_("message", "2A/01-00000-FFFFFFFF")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.splitlines(), [
            "smartrelay: error: no message 2A/01-00000-FFFFFFFF (in the queue or the events)"
            " (404 not_found)"])
        result = await self.run_("events", "--since", "garbage")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        await self.relay.stop()
