"""
The sub-commands of C{smartrelay} beyond those in L{smartrelay.cli}: each
module has C{register(commands)}, which adds its sub-parsers (with
C{run=function(options, console) -> int}) to the C{argparse}
sub-parsers action C{commands}.

  - L{smartrelay.commands.checkdns}: C{check-dns DOMAIN} (offline).
  - L{smartrelay.commands.api}: C{message}, C{queue}, C{suppress},
    C{stats}, C{events}, over a running relay's JSON API.
"""


def register(commands) -> None:
    """
    Add every sub-command of this package to C{commands}.
    """
    from smartrelay.commands import api, checkdns

    checkdns.register(commands)
    api.register(commands)
