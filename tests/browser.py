"""
Real-browser plumbing for tests of web pages (DESIGN: pages are tested with
a real browser): headless Chromium driven by Selenium, and loopback HTTP
servers that tests can shut down cleanly.

Selenium blocks, so every call on a driver must run in a thread
(L{twisted.internet.threads.deferToThread}) while the reactor keeps serving
the pages.  L{startBrowser} does that and registers the browser's C{quit}
as a cleanup; if Chromium, its driver or Selenium is missing, or the
browser does not start, the test is skipped with the reason.

Binaries: C{$SMARTRELAY_CHROMIUM} / C{$SMARTRELAY_CHROMEDRIVER} if set,
else the first of L{CHROMIUM_NAMES} / L{CHROMEDRIVER_NAMES} found on the
C{PATH} or under C{/usr/bin} and C{/usr/lib/chromium} (Debian:
C{apt-get install chromium chromium-driver}).

Trial has no C{setUpClass}, so tests start one browser each (about a
second); start it in C{setUp} or in the test.
"""

import os
import shutil
import subprocess

from twisted.internet.defer import Deferred, inlineCallbacks, returnValue, succeed
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest

__all__ = [
    "BrowserUnavailable",
    "DESKTOP_USER_AGENT",
    "findBinary",
    "launchChromium",
    "startBrowser",
    "listenLoopback",
]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMEDRIVER_NAMES = ("chromedriver",)
_SEARCH = ("/usr/bin", "/usr/lib/chromium", "/usr/local/bin")

#: What the test browser says it is: an ordinary desktop Chrome, so that
#: its requests are not taken for a headless link scanner.
DESKTOP_USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)


class BrowserUnavailable(Exception):
    """
    No browser can be started here; the message says why.
    """


def findBinary(envVariable: str, names) -> str:
    """
    The path of the first executable named in C{names}, or the one in the
    environment variable C{envVariable}.

    @raise BrowserUnavailable: if there is none.
    """
    configured = os.environ.get(envVariable)
    if configured:
        if os.access(configured, os.X_OK):
            return configured
        raise BrowserUnavailable(f"${envVariable}={configured} is not executable")
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for directory in _SEARCH:
            path = os.path.join(directory, name)
            if os.access(path, os.X_OK):
                return path
    raise BrowserUnavailable(
        f"none of {', '.join(names)} is installed "
        "(Debian: apt-get install chromium chromium-driver)"
    )


def launchChromium(userAgent: str = DESKTOP_USER_AGENT, pageTimeout: float = 30):
    """
    Start headless Chromium under Selenium.  Blocking: call it in a thread.

    @return: a Selenium C{WebDriver}; C{quit} it when done.
    @raise BrowserUnavailable: if it cannot be started.
    """
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserUnavailable("selenium is not installed (pip install selenium)")
    chromium = findBinary("SMARTRELAY_CHROMIUM", CHROMIUM_NAMES)
    driverPath = findBinary("SMARTRELAY_CHROMEDRIVER", CHROMEDRIVER_NAMES)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in [
        "--headless=new",
        # The sandbox needs user namespaces and refuses to run as root.
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        "--window-size=1024,768",
        f"--user-agent={userAgent}",
    ]:
        options.add_argument(argument)
    service = Service(executable_path=driverPath, log_output=subprocess.DEVNULL)
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except WebDriverException as e:
        raise BrowserUnavailable(f"{chromium} did not start: {e.msg or e}")
    driver.set_page_load_timeout(pageTimeout)
    return driver


@inlineCallbacks
def startBrowser(testCase, userAgent: str = DESKTOP_USER_AGENT):
    """
    Start a browser for one test (in a thread) and quit it in the test's
    cleanup; skip the test if there is no browser.

    @return: a L{Deferred} firing with the Selenium driver.
    """
    try:
        driver = yield deferToThread(launchChromium, userAgent)
    except BrowserUnavailable as e:
        raise SkipTest(f"no headless browser: {e}")
    testCase.addCleanup(deferToThread, driver.quit)
    returnValue(driver)


class _TrackingFactory(WrappingFactory):
    """
    Remembers its connections so that they can all be dropped, and tells
    when the last one is gone.
    """

    def __init__(self, wrappedFactory):
        super().__init__(wrappedFactory)
        self._idle: list[Deferred] = []

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def dropAll(self) -> Deferred:
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


def listenLoopback(testCase, reactor, factory) -> str:
    """
    Serve C{factory} on 127.0.0.1, on a port the system picks, until the
    end of the test: the cleanup stops listening and drops every open
    connection (browsers keep them alive), so the reactor is left clean.

    @return: the base URL, C{http://127.0.0.1:<port>}.
    """
    tracking = _TrackingFactory(factory)
    port = reactor.listenTCP(0, tracking, interface="127.0.0.1")

    @inlineCallbacks
    def stop():
        yield port.stopListening()
        yield tracking.dropAll()

    testCase.addCleanup(stop)
    return f"http://127.0.0.1:{port.getHost().port}"
