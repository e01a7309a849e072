"""
An in-process fake SMSC for unit tests: an SMPP server protocol whose
answers a test scripts (bind status, per-submit statuses, silence,
generic_nack, unbind mid-stream, receipts before the submit_sm_resp).
It records every PDU it reads.  Used over L{twisted.test.iosim} or a
C{StringTransport}; it never touches a real socket or the global reactor.
"""

from collections import deque
from typing import Optional

import attrs
from twisted.internet.protocol import Factory, Protocol

from smartrelay.sms.codec import (
    PDU,
    Command,
    InvalidPDU,
    PDUBuffer,
    Status,
    Tag,
    decode,
    encode,
    genericNack,
    intTLV,
    makePDU,
    responseTo,
    stringTLV,
)


@attrs.define
class SMSCScript:
    """
    What the fake SMSC answers.

    @ivar bindStatus: the bind response's status.
    @ivar submitStatuses: statuses for the next submit_sm, in order (then
        C{ESME_ROK}); C{None} in the list means "do not answer that one";
        C{"nack"} means answer with a generic_nack (ESME_RSYSERR).
    @ivar receiptFirst: send a delivery receipt before each
        submit_sm_resp.
    @ivar receipts: send a delivery receipt after each accepted submit.
    @ivar receiptState: the receipt's C{stat:} word.
    @ivar messageIDs: C{"hex"} or C{"decimal"}: the form of the ids in
        submit_sm_resp; receipts give them in the other form when
        C{crossForms}.
    @ivar unbindAfter: after this many submits, send an unbind instead of
        answering.
    """

    bindStatus: int = Status.ESME_ROK
    submitStatuses: deque = attrs.field(factory=deque, converter=deque)
    receiptFirst: bool = False
    receipts: bool = False
    receiptState: str = "DELIVRD"
    receiptTLVs: bool = True
    crossForms: bool = False
    unbindAfter: Optional[int] = None
    answerEnquireLink: bool = True


class FakeSMSC(Protocol):
    """
    The SMSC end of one session.

    @ivar received: every PDU read, in order.
    @ivar submits: the submit_sm PDUs among them.
    """

    def __init__(self, script: Optional[SMSCScript] = None) -> None:
        self.script = script or SMSCScript()
        self.received: list = []
        self.submits: list = []
        self.answered: list = []
        self.nextID = 0x1A0
        self.sequence = 1000
        self._frames = PDUBuffer()
        self.bound = False

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
        except InvalidPDU:
            self.transport.loseConnection()
            return
        for frame in frames:
            pdu = decode(frame)
            self.received.append(pdu)
            self.handle(pdu)

    def send(self, pdu: PDU) -> None:
        self.transport.write(encode(pdu))

    def nextSequence(self) -> int:
        self.sequence += 1
        return self.sequence

    def handle(self, pdu: PDU) -> None:
        command = pdu.command_id
        if command in (Command.bind_transceiver, Command.bind_transmitter, Command.bind_receiver):
            status = self.script.bindStatus
            self.bound = status == 0
            if status:
                self.send(PDU(command | 0x80000000, pdu.sequence, status))
            else:
                self.send(responseTo(pdu, system_id=b"FakeSMSC"))
        elif command == Command.submit_sm:
            self.submitted(pdu)
        elif command == Command.enquire_link:
            if self.script.answerEnquireLink:
                self.send(responseTo(pdu))
        elif command == Command.unbind:
            self.send(responseTo(pdu))
            self.transport.loseConnection()
        elif pdu.isResponse:
            self.answered.append(pdu)
        else:
            self.send(genericNack(pdu.sequence, Status.ESME_RINVCMDID))

    def submitted(self, pdu: PDU) -> None:
        self.submits.append(pdu)
        script = self.script
        if script.unbindAfter is not None and len(self.submits) > script.unbindAfter:
            self.send(makePDU(Command.unbind, self.nextSequence()))
            return
        status = script.submitStatuses.popleft() if script.submitStatuses else Status.ESME_ROK
        if status is None:
            return
        if status == "nack":
            self.send(genericNack(pdu.sequence, Status.ESME_RSYSERR))
            return
        if status:
            self.send(PDU(Command.submit_sm_resp, pdu.sequence, status))
            return
        number = self.nextID
        self.nextID += 1
        messageID = "%X" % number
        if script.receiptFirst:
            self.sendReceipt(pdu, number)
        self.send(responseTo(pdu, message_id=messageID.encode("ascii")))
        if script.receipts and not script.receiptFirst:
            self.sendReceipt(pdu, number)

    def sendReceipt(self, submit: PDU, number: int, state: Optional[str] = None) -> None:
        """
        A deliver_sm receipt for the message C{number} (as the SMSC
        numbered it): TLVs and the text form.
        """
        state = state or self.script.receiptState
        textID = str(number) if self.script.crossForms else "%X" % number
        text = (
            f"id:{textID} sub:001 dlvrd:{'001' if state == 'DELIVRD' else '000'} "
            f"submit date:2612070800 done date:2612070801 stat:{state} err:000 text:hello"
        )
        tlvs = ()
        if self.script.receiptTLVs:
            states = {"DELIVRD": 2, "EXPIRED": 3, "DELETED": 4, "UNDELIV": 5, "REJECTD": 8}
            tlvs = (
                stringTLV(Tag.receipted_message_id, ("%X" % number).encode("ascii")),
                intTLV(Tag.message_state, states.get(state, 7), 1),
            )
        self.send(
            makePDU(
                Command.deliver_sm,
                self.nextSequence(),
                source_addr=submit.get("destination_addr"),
                destination_addr=submit.get("source_addr"),
                esm_class=0x04,
                short_message=text.encode("ascii"),
                tlvs=tlvs,
            )
        )


@attrs.define(eq=False, slots=False)
class FakeSMSCFactory(Factory):
    """
    Builds L{FakeSMSC}s sharing one script; remembers them.
    """

    script: SMSCScript = attrs.field(factory=SMSCScript)
    sessions: list = attrs.field(factory=list)

    def buildProtocol(self, addr):
        protocol = FakeSMSC(self.script)
        protocol.factory = self
        self.sessions.append(protocol)
        return protocol
