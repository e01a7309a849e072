"""
End-to-end test of the reports UI in a real browser: the installed
C{twistd smartrelay} child process (users written by the installed
C{smartrelay passwd}), real SMTP submissions to a real sink, and headless
Chromium driven by Selenium (L{tests.browser}); axe-core checks every page
and a screenshot of every page is saved in the test's directory.
"""

import base64
import os
import re
import subprocess
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.browser import startBrowser
from tests.sink import PROJECT, installedEnvironment, installedScript, waitFor
from tests.test_e2e import RelayTestMixin, events, submit
from tests.test_e2e_api import webPort

USER, PASSWORD = "operator", "a long passphrase for the test"

#: The subject decodes to markup that would run script if it were not
#: escaped (and if the page's CSP let it).
PAYLOAD = "<img src=x onerror=window.__smartrelayXSS=1>"
SUBJECT = "=?utf-8?b?" + base64.b64encode(PAYLOAD.encode()).decode() + "?="

AXE = os.path.join(PROJECT, "tests", "js", "node_modules", "axe-core", "axe.min.js")

_AXE_RUN = """
const done = arguments[arguments.length - 1];
axe.run(document, {resultTypes: ['violations']}).then(function (result) {
  done(result.violations
    .filter(function (v) { return v.impact === 'serious' || v.impact === 'critical'; })
    .map(function (v) {
      return v.id + ' (' + v.impact + '): ' + v.help + ' at ' +
        v.nodes.map(function (n) { return n.target.join(' '); }).join(', ');
    }));
}, function (error) { done(['axe failed: ' + error]); });
"""


def message(subject: str) -> str:
    return (
        f"From: App <app@example.com>\r\nTo: someone@example.org\r\nSubject: {subject}\r\n"
        "Message-ID: <e2e-ui-1@app.example>\r\n\r\nHello\r\n"
    )


class BrowserUITests(RelayTestMixin, TestCase):
    """
    An operator's session in headless Chromium.
    """

    timeout = 240

    def setUp(self):
        if not os.path.exists(AXE):
            raise SkipTest(f"axe-core is not installed ({AXE}); test.sh runs npm ci in tests/js")
        with open(AXE, encoding="utf-8") as f:
            self.axe = f.read()

    def passwd(self, path):
        """
        Write the user with the installed C{smartrelay passwd}, the
        password on standard input.
        """
        result = subprocess.run(
            [installedScript("smartrelay"), "passwd", path, USER],
            input=(PASSWORD + "\n").encode(),
            env=installedEnvironment(),
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    @inlineCallbacks
    def startRelay(self):
        sinkPort = self.startSink()
        relay = self.makeRelay(self.relayConfig(sinkPort))
        users = os.path.join(self.workdir, "ui-users")
        yield deferToThread(self.passwd, users)
        with open(relay.configPath) as f:
            text = f.read()
        with open(relay.configPath, "w") as f:
            f.write(text.replace("[web]\n", f"[web]\nusers_file = {users}\n", 1))
        relay.start()
        yield relay.waitReady(reactor)
        self.relay = relay
        self.base = f"http://127.0.0.1:{webPort(relay)}"
        self.shots = os.path.join(self.workdir, "screenshots")
        os.makedirs(self.shots, exist_ok=True)

    @inlineCallbacks
    def submitted(self, recipients, body):
        (code, text), refused = yield deferToThread(submit, self.relay.port, recipients, body)
        self.assertEqual((code, refused), (250, []), text)
        return text.split()[-1]

    # -- the browser, in threads -------------------------------------------

    def check(self, driver, name):
        """
        Blocking: the page has no serious or critical axe violation, ran
        no script of the relay's data; its screenshot is saved.
        """
        # The whole page (up to 1,600 pixels high), then the window as it was.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1024, min(max(int(height), 400), 1600))
        driver.save_screenshot(os.path.join(self.shots, f"{name}.png"))
        driver.set_window_size(1024, 768)
        driver.execute_script(self.axe)
        violations = driver.execute_async_script(_AXE_RUN)
        self.assertEqual(violations, [], f"{name}: {driver.current_url}")
        self.assertIsNone(driver.execute_script("return window.__smartrelayXSS"))
        return driver.page_source

    @inlineCallbacks
    def test_operatorSession(self):
        """
        Log in, see the charts, search an id and read its timeline (the
        hostile subject as text), add and remove a suppression, retry a
        queued message, visit every page, log out; axe finds nothing
        serious on any page.
        """
        yield self.startRelay()
        delivered = yield self.submitted(["ok@example.org"], message(SUBJECT))
        deferred = yield self.submitted(["defer@example.org"], message("later"))
        yield waitFor(reactor, lambda: {e[0] for e in events(self.workdir)} >= {
            "delivered", "deferred"})
        driver = yield startBrowser(self)
        driver.set_script_timeout(60)
        yield deferToThread(self.session, driver, delivered, deferred)
        # The retry was a real attempt: a second deferral of that message.
        yield waitFor(
            reactor,
            lambda: sum(1 for e in events(self.workdir)
                        if e[0] == "deferred" and e[1] == deferred) >= 2,
        )

    def click(self, driver, by, selector):
        """
        Blocking: click a button and wait for the page it loads.
        """
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        page = driver.find_element(By.TAG_NAME, "html")
        driver.find_element(by, selector).click()
        WebDriverWait(driver, 30).until(expected_conditions.staleness_of(page))

    def session(self, driver, delivered, deferred):
        from selenium.webdriver.common.by import By

        find = driver.find_element

        driver.get(self.base + "/")
        self.assertIn("/login", driver.current_url)
        self.check(driver, "login")
        find(By.ID, "user").send_keys(USER)
        find(By.ID, "password").send_keys("wrong password")
        self.click(driver, By.CSS_SELECTOR, "form.login button")
        self.assertIn("Wrong user name or password", driver.page_source)
        find(By.ID, "user").clear()
        find(By.ID, "user").send_keys(USER)
        find(By.ID, "password").send_keys(PASSWORD)
        self.click(driver, By.CSS_SELECTOR, "form.login button")

        # The dashboard, with its charts.
        self.assertEqual(driver.title, "Dashboard · smartrelay")
        charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
        self.assertEqual(len(charts), 2)
        self.check(driver, "dashboard")

        # Search the delivered message's id: its page and timeline.
        find(By.ID, "q").send_keys(delivered)
        self.click(driver, By.CSS_SELECTOR, "form.search button")
        self.assertIn("/messages/", driver.current_url)
        timeline = find(By.CSS_SELECTOR, "ol.timeline").text
        self.assertIn("accepted", timeline)
        self.assertIn("delivered", timeline)
        self.assertIn(PAYLOAD, find(By.TAG_NAME, "main").text)
        self.assertEqual(driver.find_elements(By.CSS_SELECTOR, "main img"), [])
        self.check(driver, "message")

        # Add a suppression, then remove it.
        driver.get(self.base + "/suppressions")
        find(By.ID, "address").send_keys("blocked@example.org")
        self.click(driver, By.CSS_SELECTOR, "form[action='/suppressions/add'] button")
        self.assertIn("The address is on the suppression list.", driver.page_source)
        self.assertIn("blocked@example.org", find(By.CSS_SELECTOR, "table").text)
        self.check(driver, "suppressions")
        self.click(driver, By.CSS_SELECTOR, "button[aria-label='Remove blocked@example.org']")
        self.assertIn("The address is off the suppression list.", driver.page_source)
        self.assertNotIn("blocked@example.org", driver.page_source)

        # The queue: retry the deferred message now.
        driver.get(self.base + "/queue")
        self.assertIn(deferred, driver.page_source)
        self.check(driver, "queue")
        self.click(driver, By.CSS_SELECTOR, f"button[aria-label='Retry {deferred} now']")
        self.assertIn("being attempted now", driver.page_source)
        driver.get(self.base + "/queue/confirm?queue_id=" + quote(deferred, safe=""))
        self.check(driver, "queue-delete")

        # The other pages.
        for name, path in [("events", "/events"), ("bounces", "/bounces"),
                           ("domains", "/domains"),
                           ("message-queued", "/messages/" + quote(deferred, safe="")),
                           ("search", "/search?q=nothing+at+all")]:
            driver.get(self.base + path)
            self.assertNotIn("Something went wrong", driver.page_source, name)
            self.check(driver, name)

        # Log out: the pages want a login again.
        self.click(driver, By.CSS_SELECTOR, "form.logout button")
        self.assertIn("/login", driver.current_url)
        driver.get(self.base + "/queue")
        self.assertIn("/login", driver.current_url)
        self.assertTrue(re.search(r"Log in", driver.title))
