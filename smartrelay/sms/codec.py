# -*- test-case-name: tests.test_sms_codec -*-
"""
SMPP 3.4 protocol data units: bytes to L{PDU} and back.

A PDU is a 16-byte header (command_length, command_id, command_status,
sequence_number, all big-endian unsigned 32-bit) followed by the mandatory
parameters of its command and optional TLVs (tag, length, value).  This
module knows the mandatory parameters of the commands an ESME needs (bind
family, outbind, submit_sm, deliver_sm, data_sm, enquire_link, unbind,
generic_nack and their responses); the body of any other command is kept
as raw bytes.  Every TLV is kept, known or not, in the order received.

L{decode} never raises anything but L{InvalidPDU}, whatever the bytes.
"""

import struct
from collections.abc import Mapping
from enum import IntEnum
from typing import Optional, Union

import attrs

#: A PDU longer than this is refused before its body is read (SMPP allows
#: a message_payload of up to 64 KiB; with the other fields this is ample).
MAX_PDU_LENGTH = 70000

HEADER = struct.Struct(">IIII")
HEADER_LENGTH = HEADER.size


class Command(IntEnum):
    """
    SMPP 3.4 command ids (section 5.1.2.1).
    """

    generic_nack = 0x80000000
    bind_receiver = 0x00000001
    bind_receiver_resp = 0x80000001
    bind_transmitter = 0x00000002
    bind_transmitter_resp = 0x80000002
    query_sm = 0x00000003
    query_sm_resp = 0x80000003
    submit_sm = 0x00000004
    submit_sm_resp = 0x80000004
    deliver_sm = 0x00000005
    deliver_sm_resp = 0x80000005
    unbind = 0x00000006
    unbind_resp = 0x80000006
    replace_sm = 0x00000007
    replace_sm_resp = 0x80000007
    cancel_sm = 0x00000008
    cancel_sm_resp = 0x80000008
    bind_transceiver = 0x00000009
    bind_transceiver_resp = 0x80000009
    outbind = 0x0000000B
    enquire_link = 0x00000015
    enquire_link_resp = 0x80000015
    submit_multi = 0x00000021
    submit_multi_resp = 0x80000021
    alert_notification = 0x00000102
    data_sm = 0x00000103
    data_sm_resp = 0x80000103


RESPONSE_BIT = 0x80000000


class Status(IntEnum):
    """
    SMPP 3.4 command_status values (section 5.1.3).
    """

    ESME_ROK = 0x00
    ESME_RINVMSGLEN = 0x01
    ESME_RINVCMDLEN = 0x02
    ESME_RINVCMDID = 0x03
    ESME_RINVBNDSTS = 0x04
    ESME_RALYBND = 0x05
    ESME_RINVPRTFLG = 0x06
    ESME_RINVREGDLVFLG = 0x07
    ESME_RSYSERR = 0x08
    ESME_RINVSRCADR = 0x0A
    ESME_RINVDSTADR = 0x0B
    ESME_RINVMSGID = 0x0C
    ESME_RBINDFAIL = 0x0D
    ESME_RINVPASWD = 0x0E
    ESME_RINVSYSID = 0x0F
    ESME_RCANCELFAIL = 0x11
    ESME_RREPLACEFAIL = 0x13
    ESME_RMSGQFUL = 0x14
    ESME_RINVSERTYP = 0x15
    ESME_RINVNUMDESTS = 0x33
    ESME_RINVDLNAME = 0x34
    ESME_RINVDESTFLAG = 0x40
    ESME_RINVSUBREP = 0x42
    ESME_RINVESMCLASS = 0x43
    ESME_RCNTSUBDL = 0x44
    ESME_RSUBMITFAIL = 0x45
    ESME_RINVSRCTON = 0x48
    ESME_RINVSRCNPI = 0x49
    ESME_RINVDSTTON = 0x50
    ESME_RINVDSTNPI = 0x51
    ESME_RINVSYSTYP = 0x53
    ESME_RINVREPFLAG = 0x54
    ESME_RINVNUMMSGS = 0x55
    ESME_RTHROTTLED = 0x58
    ESME_RINVSCHED = 0x61
    ESME_RINVEXPIRY = 0x62
    ESME_RINVDFTMSGID = 0x63
    ESME_RX_T_APPN = 0x64
    ESME_RX_P_APPN = 0x65
    ESME_RX_R_APPN = 0x66
    ESME_RQUERYFAIL = 0x67
    ESME_RINVOPTPARSTREAM = 0xC0
    ESME_ROPTPARNOTALLWD = 0xC1
    ESME_RINVPARLEN = 0xC2
    ESME_RMISSINGOPTPARAM = 0xC3
    ESME_RINVOPTPARAMVAL = 0xC4
    ESME_RDELIVERYFAILURE = 0xFE
    ESME_RUNKNOWNERR = 0xFF


def statusName(status: int) -> str:
    """
    The name of a command_status (C{ESME_RTHROTTLED}), or its hex value
    for one SMPP 3.4 does not define (C{0x00000400}).
    """
    try:
        return Status(status).name
    except ValueError:
        return "0x%08X" % (status,)


def commandName(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return "0x%08X" % (command,)


class Tag(IntEnum):
    """
    SMPP 3.4 optional parameter tags (section 5.3.2).
    """

    dest_addr_subunit = 0x0005
    dest_network_type = 0x0006
    dest_bearer_type = 0x0007
    dest_telematics_id = 0x0008
    source_addr_subunit = 0x000D
    source_network_type = 0x000E
    source_bearer_type = 0x000F
    source_telematics_id = 0x0010
    qos_time_to_live = 0x0017
    payload_type = 0x0019
    additional_status_info_text = 0x001D
    receipted_message_id = 0x001E
    ms_msg_wait_facilities = 0x0030
    privacy_indicator = 0x0201
    source_subaddress = 0x0202
    dest_subaddress = 0x0203
    user_message_reference = 0x0204
    user_response_code = 0x0205
    source_port = 0x020A
    destination_port = 0x020B
    sar_msg_ref_num = 0x020C
    language_indicator = 0x020D
    sar_total_segments = 0x020E
    sar_segment_seqnum = 0x020F
    sc_interface_version = 0x0210
    callback_num_pres_ind = 0x0302
    callback_num_atag = 0x0303
    number_of_messages = 0x0304
    callback_num = 0x0381
    dpf_result = 0x0420
    set_dpf = 0x0421
    ms_availability_status = 0x0422
    network_error_code = 0x0423
    message_payload = 0x0424
    delivery_failure_reason = 0x0425
    more_messages_to_send = 0x0426
    message_state = 0x0427
    ussd_service_op = 0x0501
    display_time = 0x1201
    sms_signal = 0x1203
    ms_validity = 0x1204
    alert_on_message_delivery = 0x130C
    its_reply_type = 0x1380
    its_session_info = 0x1383


class MessageState(IntEnum):
    """
    The message_state TLV values (section 5.2.28).
    """

    ENROUTE = 1
    DELIVERED = 2
    EXPIRED = 3
    DELETED = 4
    UNDELIVERABLE = 5
    ACCEPTED = 6
    UNKNOWN = 7
    REJECTED = 8


#: esm_class bits.
ESM_UDHI = 0x40
ESM_RECEIPT_MASK = 0x3C
#: esm_class message types that are delivery receipts / acknowledgements.
ESM_DELIVERY_RECEIPT = 0x04
ESM_INTERMEDIATE_NOTIFICATION = 0x20

DATA_CODING_DEFAULT = 0x00
DATA_CODING_UCS2 = 0x08

INTERFACE_VERSION = 0x34


class InvalidPDU(ValueError):
    """
    Bytes that are not a PDU this codec can read.

    @ivar status: the command_status for the C{generic_nack} (or response)
        that answers it: C{ESME_RINVCMDLEN} for a bad length,
        C{ESME_RINVCMDID} for an unknown command, C{ESME_RINVMSGLEN} and
        C{ESME_RINVOPTPARSTREAM} for bodies that do not parse.
    @ivar command_id: the header's command id, if it could be read.
    @ivar sequence: the header's sequence number, if it could be read.
    """

    def __init__(self, reason: str, status: int, command_id: Optional[int] = None,
                 sequence: Optional[int] = None) -> None:
        super().__init__(reason)
        self.status = status
        self.command_id = command_id
        self.sequence = sequence


@attrs.frozen
class TLV:
    """
    One optional parameter: its tag and raw value.
    """

    tag: int
    value: bytes

    @property
    def name(self) -> str:
        try:
            return Tag(self.tag).name
        except ValueError:
            return "0x%04X" % (self.tag,)


# Field kinds: ("c", N) C-octet string of at most N octets with its NUL;
# ("i", N) unsigned integer of N octets; ("sm",) sm_length + short_message.
_SUBMIT_LIKE = (
    ("service_type", "c", 6),
    ("source_addr_ton", "i", 1),
    ("source_addr_npi", "i", 1),
    ("source_addr", "c", 21),
    ("dest_addr_ton", "i", 1),
    ("dest_addr_npi", "i", 1),
    ("destination_addr", "c", 21),
    ("esm_class", "i", 1),
    ("protocol_id", "i", 1),
    ("priority_flag", "i", 1),
    ("schedule_delivery_time", "c", 17),
    ("validity_period", "c", 17),
    ("registered_delivery", "i", 1),
    ("replace_if_present_flag", "i", 1),
    ("data_coding", "i", 1),
    ("sm_default_msg_id", "i", 1),
    ("short_message", "sm", 254),
)
_BIND = (
    ("system_id", "c", 16),
    ("password", "c", 9),
    ("system_type", "c", 13),
    ("interface_version", "i", 1),
    ("addr_ton", "i", 1),
    ("addr_npi", "i", 1),
    ("address_range", "c", 41),
)
_SYSTEM_ID = (("system_id", "c", 16),)
_MESSAGE_ID = (("message_id", "c", 65),)

#: The mandatory parameters of each command this codec reads.
SCHEMAS: Mapping[int, tuple] = {
    Command.generic_nack: (),
    Command.bind_receiver: _BIND,
    Command.bind_transmitter: _BIND,
    Command.bind_transceiver: _BIND,
    Command.bind_receiver_resp: _SYSTEM_ID,
    Command.bind_transmitter_resp: _SYSTEM_ID,
    Command.bind_transceiver_resp: _SYSTEM_ID,
    Command.outbind: (("system_id", "c", 16), ("password", "c", 9)),
    Command.submit_sm: _SUBMIT_LIKE,
    Command.submit_sm_resp: _MESSAGE_ID,
    Command.deliver_sm: _SUBMIT_LIKE,
    Command.deliver_sm_resp: _MESSAGE_ID,
    Command.data_sm: (
        ("service_type", "c", 6),
        ("source_addr_ton", "i", 1),
        ("source_addr_npi", "i", 1),
        ("source_addr", "c", 65),
        ("dest_addr_ton", "i", 1),
        ("dest_addr_npi", "i", 1),
        ("destination_addr", "c", 65),
        ("esm_class", "i", 1),
        ("registered_delivery", "i", 1),
        ("data_coding", "i", 1),
    ),
    Command.data_sm_resp: _MESSAGE_ID,
    Command.enquire_link: (),
    Command.enquire_link_resp: (),
    Command.unbind: (),
    Command.unbind_resp: (),
}

#: Commands whose body may be absent when the status is not ESME_ROK
#: (section 4: "the body ... is not returned if command_status is non-zero"
#: for bind responses; SMSCs do the same with submit_sm_resp).
_BODY_OPTIONAL_ON_ERROR = frozenset(
    c for c in SCHEMAS if c & RESPONSE_BIT
)

FieldValue = Union[int, bytes]


def _checkFields(instance, attribute, value) -> None:
    if not isinstance(value, Mapping):
        raise TypeError("fields must be a mapping")


@attrs.frozen
class PDU:
    """
    One SMPP PDU.

    @ivar command_id: a L{Command} (or any 32-bit id for PDUs read from the
        wire that this codec does not know).
    @ivar sequence: the sequence_number, 1 to 0x7FFFFFFF for requests.
    @ivar status: the command_status (0 in requests).
    @ivar fields: the mandatory parameters by name: C{int} for integers,
        C{bytes} (without the NUL) for strings and the short message.
    @ivar tlvs: optional parameters in wire order, unknown ones included.
    @ivar body: the raw body of a command without a schema here.
    """

    command_id: int
    sequence: int
    status: int = 0
    fields: Mapping = attrs.field(factory=dict, validator=_checkFields)
    tlvs: tuple = ()
    body: bytes = b""

    @property
    def name(self) -> str:
        return commandName(self.command_id)

    @property
    def isResponse(self) -> bool:
        return bool(self.command_id & RESPONSE_BIT)

    def get(self, name: str, default: FieldValue = b"") -> FieldValue:
        return self.fields.get(name, default)

    def tlv(self, tag: int) -> Optional[bytes]:
        """
        The value of the first TLV with C{tag}, or L{None}.
        """
        for tlv in self.tlvs:
            if tlv.tag == tag:
                return tlv.value
        return None

    def tlvInt(self, tag: int) -> Optional[int]:
        """
        The first TLV with C{tag} read as a big-endian unsigned integer
        (L{None} if absent or empty).
        """
        value = self.tlv(tag)
        if not value:
            return None
        return int.from_bytes(value, "big")

    def tlvString(self, tag: int) -> Optional[bytes]:
        """
        The first TLV with C{tag} as a C-octet string, without its NUL.
        """
        value = self.tlv(tag)
        if value is None:
            return None
        return value.split(b"\0", 1)[0]


def makePDU(command_id: int, sequence: int, status: int = 0, tlvs: tuple = (),
            **fields: FieldValue) -> PDU:
    """
    A PDU with every mandatory parameter of its command: those not given
    are 0 or empty.  Unknown parameter names raise L{TypeError}.
    """
    schema = SCHEMAS.get(command_id, ())
    names = {name for name, *_ in schema}
    unknown = set(fields) - names
    if unknown:
        raise TypeError(f"{commandName(command_id)} has no field {sorted(unknown)[0]!r}")
    full = {}
    for name, kind, _ in schema:
        full[name] = fields.get(name, 0 if kind == "i" else b"")
    return PDU(command_id, sequence, status, full, tuple(tlvs))


def responseTo(request: PDU, status: int = 0, **fields: FieldValue) -> PDU:
    """
    The response PDU for C{request} (same sequence number).
    """
    return makePDU(request.command_id | RESPONSE_BIT, request.sequence, status, **fields)


def genericNack(sequence: int, status: int) -> PDU:
    return PDU(Command.generic_nack, sequence, status)


# -- encoding -----------------------------------------------------------------


def _encodeField(name: str, kind: str, size: int, value: FieldValue, out: list) -> None:
    if kind == "i":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << (8 * size):
            raise ValueError(f"{name} must be an integer of {size} octet(s), not {value!r}")
        out.append(value.to_bytes(size, "big"))
    elif kind == "c":
        if not isinstance(value, bytes) or b"\0" in value or len(value) >= size:
            raise ValueError(f"{name} must be at most {size - 1} octets without NUL, not {value!r}")
        out.append(value + b"\0")
    else:
        if not isinstance(value, bytes) or len(value) > size:
            raise ValueError(f"{name} must be at most {size} octets")
        out.append(bytes([len(value)]) + value)


def encode(pdu: PDU) -> bytes:
    """
    The wire form of C{pdu}.

    @raise ValueError: a field or TLV out of range, a field missing, or the
        result longer than L{MAX_PDU_LENGTH}.
    """
    parts: list = []
    schema = SCHEMAS.get(pdu.command_id)
    if schema is None:
        parts.append(pdu.body)
    elif not (pdu.status and pdu.command_id in _BODY_OPTIONAL_ON_ERROR and not pdu.fields):
        for name, kind, size in schema:
            if name not in pdu.fields:
                raise ValueError(f"{pdu.name} needs {name}")
            _encodeField(name, kind, size, pdu.fields[name], parts)
    for tlv in pdu.tlvs:
        if not 0 <= tlv.tag <= 0xFFFF or len(tlv.value) > 0xFFFF:
            raise ValueError(f"TLV {tlv.tag!r} out of range")
        parts.append(struct.pack(">HH", tlv.tag, len(tlv.value)) + tlv.value)
    body = b"".join(parts)
    length = HEADER_LENGTH + len(body)
    if length > MAX_PDU_LENGTH:
        raise ValueError(f"{pdu.name} would be {length} octets, more than {MAX_PDU_LENGTH}")
    for name, value in (("command_id", pdu.command_id), ("status", pdu.status),
                        ("sequence", pdu.sequence)):
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{name} out of range: {value!r}")
    return HEADER.pack(length, pdu.command_id, pdu.status, pdu.sequence) + body


# -- decoding -----------------------------------------------------------------


def checkLength(length: int, maximum: int = MAX_PDU_LENGTH) -> None:
    """
    Refuse a command_length before its body is read.

    @raise InvalidPDU: shorter than a header or longer than C{maximum}.
    """
    if length < HEADER_LENGTH or length > maximum:
        raise InvalidPDU(
            f"command_length {length} is not between {HEADER_LENGTH} and {maximum}",
            Status.ESME_RINVCMDLEN,
        )


def decode(data: bytes, maximum: int = MAX_PDU_LENGTH) -> PDU:
    """
    Read one whole PDU (exactly C{data}, header included).

    @raise InvalidPDU: for anything that is not a whole, well-formed PDU.
    """
    if len(data) < HEADER_LENGTH:
        raise InvalidPDU("shorter than a PDU header", Status.ESME_RINVCMDLEN)
    length, command_id, status, sequence = HEADER.unpack_from(data)
    checkLength(length, maximum)
    if length != len(data):
        raise InvalidPDU(
            f"command_length {length} but {len(data)} octets", Status.ESME_RINVCMDLEN,
            command_id, sequence,
        )
    schema = SCHEMAS.get(command_id)
    body = data[HEADER_LENGTH:]
    if schema is None:
        try:
            Command(command_id)
        except ValueError:
            raise InvalidPDU(
                f"unknown command_id 0x{command_id:08X}", Status.ESME_RINVCMDID,
                command_id, sequence,
            ) from None
        return PDU(command_id, sequence, status, {}, (), bytes(body))
    fields: dict = {}
    offset = 0
    if not (status and command_id in _BODY_OPTIONAL_ON_ERROR and not body):
        for name, kind, size in schema:
            try:
                value, offset = _decodeField(body, offset, kind, size)
            except IndexError:
                raise InvalidPDU(
                    f"{commandName(command_id)}: {name} runs past the end",
                    Status.ESME_RINVMSGLEN, command_id, sequence,
                ) from None
            fields[name] = value
    tlvs = []
    while offset < len(body):
        if offset + 4 > len(body):
            raise InvalidPDU(
                f"{commandName(command_id)}: a truncated TLV header",
                Status.ESME_RINVOPTPARSTREAM, command_id, sequence,
            )
        tag, size = struct.unpack_from(">HH", body, offset)
        offset += 4
        if offset + size > len(body):
            raise InvalidPDU(
                f"{commandName(command_id)}: TLV 0x{tag:04X} runs past the end",
                Status.ESME_RINVOPTPARSTREAM, command_id, sequence,
            )
        tlvs.append(TLV(tag, bytes(body[offset : offset + size])))
        offset += size
    return PDU(command_id, sequence, status, fields, tuple(tlvs))


def _decodeField(body: bytes, offset: int, kind: str, size: int) -> tuple:
    if kind == "i":
        if offset + size > len(body):
            raise IndexError(offset)
        return int.from_bytes(body[offset : offset + size], "big"), offset + size
    if kind == "c":
        end = body.find(b"\0", offset)
        if end < 0:
            raise IndexError(offset)
        # Lenient on reading: a string longer than the specification's
        # maximum is kept (some SMSCs send long message ids).
        return bytes(body[offset:end]), end + 1
    if offset >= len(body):
        raise IndexError(offset)
    length = body[offset]
    end = offset + 1 + length
    if end > len(body):
        raise IndexError(offset)
    return bytes(body[offset + 1 : end]), end


@attrs.define
class PDUBuffer:
    """
    Splits a byte stream into PDUs, checking each command_length against
    C{maximum} as soon as its 4 octets are in.
    """

    maximum: int = MAX_PDU_LENGTH
    _buffer: bytearray = attrs.field(factory=bytearray)

    def feed(self, data: bytes) -> list:
        """
        Add C{data}; return the whole PDUs' bytes now available.

        @raise InvalidPDU: a command_length out of range (the stream cannot
            be resynchronised after it).
        """
        self._buffer += data
        frames = []
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from(">I", self._buffer)
            checkLength(length, self.maximum)
            if len(self._buffer) < length:
                break
            frames.append(bytes(self._buffer[:length]))
            del self._buffer[:length]
        return frames


# -- typed TLV values -----------------------------------------------------------


def intTLV(tag: int, value: int, size: int) -> TLV:
    return TLV(tag, value.to_bytes(size, "big"))


def stringTLV(tag: int, value: bytes) -> TLV:
    return TLV(tag, value + b"\0")


def networkErrorCode(pdu: PDU) -> Optional[tuple]:
    """
    The network_error_code TLV as (network type, error code), or L{None}.
    """
    value = pdu.tlv(Tag.network_error_code)
    if value is None or len(value) != 3:
        return None
    return value[0], int.from_bytes(value[1:], "big")
