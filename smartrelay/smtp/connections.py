# -*- test-case-name: tests.test_smtp_submission,tests.test_smtp_feedback -*-
"""
Connection limits shared by the SMTP listeners' policies.
"""

from smartrelay.smtp.protocol import Session
from smartrelay.smtp.replies import TOO_MANY_CONNECTIONS, TOO_MANY_CONNECTIONS_FROM_CLIENT


class ConnectionLimits:
    """
    The C{connectionMade} / C{connectionLost} half of an
    L{ISubmissionPolicy <smartrelay.smtp.protocol.ISubmissionPolicy>}:
    at most C{maxConnections} sessions at once and C{maxConnectionsPerClient}
    from one peer address; more get C{421 4.7.0}.

    A mix-in for attrs policy classes, which declare the attributes
    C{maxConnections}, C{maxConnectionsPerClient}, C{connections} (an int,
    0) and C{perClient} (a dict, empty).
    """

    maxConnections: int
    maxConnectionsPerClient: int
    connections: int
    perClient: dict

    def connectionMade(self, session: Session) -> None:
        if self.connections >= self.maxConnections:
            raise TOO_MANY_CONNECTIONS
        if self.perClient.get(session.peer, 0) >= self.maxConnectionsPerClient:
            raise TOO_MANY_CONNECTIONS_FROM_CLIENT
        self.connections += 1
        self.perClient[session.peer] = self.perClient.get(session.peer, 0) + 1

    def connectionLost(self, session: Session) -> None:
        self.connections -= 1
        left = self.perClient[session.peer] - 1
        if left:
            self.perClient[session.peer] = left
        else:
            del self.perClient[session.peer]
