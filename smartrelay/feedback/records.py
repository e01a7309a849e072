# -*- test-case-name: tests.test_feedback_report -*-
"""
The model of a report that came back: what L{smartrelay.feedback.report}
reads out of a message, what C{smartrelay classify} prints, and what the
feedback processor turns into events.

Plain data, importing nothing of the relay.
"""

from typing import Optional

import attrs

__all__ = ["REPORT_TYPES", "FeedbackRecord", "Report"]

#: What a message that came back is (DESIGN 1.1 C{classify}).
REPORT_TYPES = ("bounce", "complaint", "unsubscribe", "autoreply", "none")


@attrs.frozen(kw_only=True)
class FeedbackRecord:
    """
    One recipient's part of a report: a DSN has one per failed (or
    delayed) recipient, an ARF report and an auto-reply one.

    @ivar type: one of L{REPORT_TYPES} but C{"none"}.
    @ivar recipient: the address the report is about (Final-Recipient,
        Original-Recipient, the address named in the text...), lower-case
        domain; L{None} when the report names none.
    @ivar action: the DSN action (C{failed}, C{delayed}, C{delivered},
        C{relayed}, C{expanded}), L{None} for complaints and auto-replies.
    @ivar status: the RFC 3463 status (C{"5.1.1"}), or L{None}.
    @ivar replycode: the remote SMTP reply code (C{550}), or L{None}.
    @ivar diagnostic: the remote server's diagnostic text, or L{None}.
    @ivar remote: the remote MTA (host name or address), or L{None}.
    @ivar queue_id: the relay's queue id from the returned message's
        C{X-SmartRelay-ID}, or L{None}.
    @ivar kind: C{"hard"} / C{"soft"} for bounces, else L{None}.
    @ivar reason: the Sisimai reason (C{userunknown}, ...; C{feedback} for a
        complaint, C{vacation} for an auto-reply), or L{None}.
    @ivar feedback_type: the ARF Feedback-Type (C{abuse}, C{fraud},
        C{not-spam}, C{opt-out}, ...), for complaints.
    @ivar source_ip: ARF C{Source-IP}, for complaints.
    @ivar user_agent: ARF C{User-Agent}, for complaints.
    """

    type: str = attrs.field()
    recipient: Optional[str] = None
    action: Optional[str] = None
    status: Optional[str] = None
    replycode: Optional[int] = None
    diagnostic: Optional[str] = None
    remote: Optional[str] = None
    queue_id: Optional[str] = None
    kind: Optional[str] = None
    reason: Optional[str] = None
    feedback_type: Optional[str] = None
    source_ip: Optional[str] = None
    user_agent: Optional[str] = None

    @type.validator
    def _checkType(self, attribute, value):
        if value not in REPORT_TYPES or value == "none":
            raise ValueError(f"not a record type: {value!r}")


@attrs.frozen
class Report:
    """
    A message read as a report.

    @ivar type: one of L{REPORT_TYPES}; C{"none"} for a message that is no
        report (then L{records} is empty).
    @ivar records: the L{FeedbackRecord}s, in the order the message gives
        them.
    """

    type: str
    records: tuple = ()
