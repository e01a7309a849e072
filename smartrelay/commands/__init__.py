"""
The sub-commands of C{smartrelay} beyond those in L{smartrelay.cli}: each
module has C{register(commands)}, which adds its sub-parsers (with
C{run=function(options, console) -> int}) to the C{argparse}
sub-parsers action C{commands}.

  - L{smartrelay.commands.checkdns}: C{check-dns DOMAIN} (offline).
  - over a running relay's JSON API (L{smartrelay.commands.client},
    L{smartrelay.commands.console}): L{smartrelay.commands.messages}
    (C{message}, C{stats}, C{events}), L{smartrelay.commands.queue},
    L{smartrelay.commands.suppress}.
  - L{smartrelay.commands.export}: C{export} (the store directly with
    C{--config}, else over the API).
"""


def register(commands) -> None:
    """
    Add every sub-command of this package to C{commands}.
    """
    from smartrelay.commands import checkdns, export, messages, queue, suppress

    checkdns.register(commands)
    messages.register(commands)
    queue.register(commands)
    suppress.register(commands)
    export.register(commands)
