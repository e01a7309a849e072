"""
C{twistd smartrelay}: command-line options and the service maker.

Thin on purpose: the wiring lives in L{smartrelay.service.makeRelayService},
which tests call with a memory reactor.
"""

import sys

from twisted.python import usage

from smartrelay.config import ConfigError, defaultConfig, loadConfig


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "Run the smartrelay transactional mail relay.  Without --config it "
        "uses the built-in defaults: SMTP submission on 127.0.0.1:2525 and "
        "all state under ./var/."
    )
    optParameters = [
        ["config", "c", None, "Path to the INI configuration file."],
    ]

    def postOptions(self):
        try:
            if self["config"] is None:
                self.relayConfig = defaultConfig()
            else:
                self.relayConfig = loadConfig(self["config"])
        except ConfigError as e:
            # One clear line and a non-zero exit: a config mistake is not a
            # usage mistake, so no usage text and no traceback.
            sys.stderr.write("smartrelay: %s\n" % (e,))
            raise SystemExit(1)


def makeService(options):
    from twisted.internet import reactor

    from smartrelay.service import makeRelayService

    return makeRelayService(options.relayConfig, reactor)
