"""
Tests for L{smartrelay.sms.codec}: SMPP 3.4 PDUs, TLVs, framing, and a
differential test against an independent codec (smpp.pdu3).
"""

import io

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smartrelay.sms.codec import (
    MAX_PDU_LENGTH,
    PDU,
    SCHEMAS,
    TLV,
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
    networkErrorCode,
    responseTo,
    statusName,
    stringTLV,
)


def cString(size):
    return st.binary(max_size=size - 1).map(lambda b: b.replace(b"\0", b"x"))


def fieldValues(schema):
    values = {}
    for name, kind, size in schema:
        if kind == "i":
            values[name] = st.integers(0, (1 << (8 * size)) - 1)
        elif kind == "c":
            values[name] = cString(size)
        else:
            values[name] = st.binary(max_size=size)
    return st.fixed_dictionaries(values)


tlvs = st.lists(
    st.builds(TLV, st.integers(0, 0xFFFF), st.binary(max_size=300)), max_size=4
).map(tuple)

pdus = st.sampled_from(sorted(SCHEMAS)).flatmap(
    lambda command: st.builds(
        lambda fields, sequence, status, tlvs: PDU(command, sequence, status, fields, tlvs),
        fieldValues(SCHEMAS[command]),
        st.integers(0, 0x7FFFFFFF),
        st.integers(0, 0xFFFFFFFF),
        tlvs,
    )
)


class RoundTripTests(SynchronousTestCase):
    @given(pdus)
    def test_roundTrip(self, pdu):
        """
        Every PDU of a known command decodes to what was encoded, TLVs
        (unknown ones too) in order.
        """
        self.assertEqual(decode(encode(pdu)), pdu)

    @given(st.binary(max_size=600))
    def test_arbitraryBytesNeverRaiseOtherErrors(self, data):
        """
        Arbitrary bytes decode or raise L{InvalidPDU}, nothing else.
        """
        try:
            decode(data)
        except InvalidPDU:
            pass

    @given(pdus, st.binary(max_size=64))
    def test_arbitraryBodiesBehindAValidHeader(self, pdu, tail):
        """
        A valid header in front of arbitrary body bytes decodes or raises
        L{InvalidPDU} carrying the header's command id and sequence.
        """
        raw = encode(pdu)
        body = raw[16:][: len(tail)] + tail
        data = (16 + len(body)).to_bytes(4, "big") + raw[4:16] + body
        try:
            decode(data)
        except InvalidPDU as e:
            self.assertEqual((e.command_id, e.sequence), (pdu.command_id, pdu.sequence))

    @given(st.lists(pdus, min_size=1, max_size=5), st.integers(1, 50))
    def test_framingAnyChunks(self, pdus, chunk):
        """
        A stream of PDUs cut into chunks of any size gives back each PDU.
        """
        stream = b"".join(encode(p) for p in pdus)
        buffer = PDUBuffer()
        frames = []
        for start in range(0, len(stream), chunk):
            frames.extend(buffer.feed(stream[start : start + chunk]))
        self.assertEqual([decode(f) for f in frames], pdus)


class CodecTests(SynchronousTestCase):
    def test_submitSMBytes(self):
        """
        A submit_sm is laid out as SMPP 3.4 section 4.4.1 says.
        """
        pdu = makePDU(
            Command.submit_sm, 5, source_addr=b"abc", destination_addr=b"39333",
            registered_delivery=1, short_message=b"hello",
        )
        self.assertEqual(
            encode(pdu).hex(),
            "0000002e000000040000000000000005"
            "00" "00" "00" "61626300" "00" "00" "333933333300"
            "00" "00" "00" "00" "00" "01" "00" "00" "00" "05" "68656c6c6f",
        )

    def test_lengthCheckedBeforeBody(self):
        """
        A command_length above the maximum is refused as soon as its four
        octets arrive, with ESME_RINVCMDLEN; so is one below 16.
        """
        buffer = PDUBuffer(maximum=1000)
        e = self.assertRaises(InvalidPDU, buffer.feed, (1001).to_bytes(4, "big"))
        self.assertEqual(e.status, Status.ESME_RINVCMDLEN)
        e = self.assertRaises(InvalidPDU, PDUBuffer().feed, (15).to_bytes(4, "big"))
        self.assertEqual(e.status, Status.ESME_RINVCMDLEN)
        self.assertRaises(InvalidPDU, decode, (MAX_PDU_LENGTH + 1).to_bytes(4, "big") + bytes(12))

    def test_unknownCommand(self):
        """
        An unknown command id is ESME_RINVCMDID with its sequence number;
        a known command without a schema keeps its body raw.
        """
        data = bytes.fromhex("00000010" "00000777" "00000000" "00000009")
        e = self.assertRaises(InvalidPDU, decode, data)
        self.assertEqual((e.status, e.sequence), (Status.ESME_RINVCMDID, 9))
        query = bytes.fromhex("00000014" "00000003" "00000000" "00000002" "41420000")
        pdu = decode(query)
        self.assertEqual((pdu.name, pdu.body), ("query_sm", b"AB\0\0"))
        self.assertEqual(encode(pdu), query)

    def test_truncatedFields(self):
        """
        A body that ends inside a mandatory field is ESME_RINVMSGLEN; a
        TLV that runs past the end ESME_RINVOPTPARSTREAM.
        """
        good = encode(makePDU(Command.submit_sm, 1, short_message=b"hi"))
        cut = good[:-3]
        cut = len(cut).to_bytes(4, "big") + cut[4:]
        self.assertEqual(self.assertRaises(InvalidPDU, decode, cut).status, Status.ESME_RINVMSGLEN)
        bad = good + b"\x04\x24\x00\x09ab"
        bad = len(bad).to_bytes(4, "big") + bad[4:]
        self.assertEqual(
            self.assertRaises(InvalidPDU, decode, bad).status, Status.ESME_RINVOPTPARSTREAM
        )

    def test_errorResponseWithoutBody(self):
        """
        A bind or submit response with an error status may have no body.
        """
        for command in (Command.bind_transceiver_resp, Command.submit_sm_resp):
            data = bytes.fromhex("00000010") + command.to_bytes(4, "big") + bytes.fromhex(
                "0000000e" "00000003"
            )
            pdu = decode(data)
            self.assertEqual((pdu.status, dict(pdu.fields)), (Status.ESME_RINVPASWD, {}))
            self.assertEqual(encode(pdu), data)

    def test_encodeRefusesBadFields(self):
        """
        Fields out of range, strings too long or with NUL, unknown names
        and PDUs over the maximum are refused when encoding.
        """
        self.assertRaises(ValueError, encode, makePDU(Command.submit_sm, 1, esm_class=256))
        self.assertRaises(ValueError, encode, makePDU(Command.submit_sm, 1, source_addr=b"x" * 21))
        self.assertRaises(ValueError, encode, makePDU(Command.submit_sm, 1, source_addr=b"a\0"))
        self.assertRaises(ValueError, encode, makePDU(Command.submit_sm, 1, short_message=b"x" * 255))
        self.assertRaises(TypeError, makePDU, Command.submit_sm, 1, nonsense=1)
        big = makePDU(Command.submit_sm, 1, tlvs=(TLV(Tag.message_payload, b"x" * 0xFFFF),) * 2)
        self.assertRaises(ValueError, encode, big)

    def test_tlvAccessors(self):
        """
        TLVs are read by tag as bytes, integers, C strings and the
        network_error_code pair; an absent one is None.
        """
        pdu = makePDU(
            Command.deliver_sm, 1,
            tlvs=(
                stringTLV(Tag.receipted_message_id, b"abc"),
                intTLV(Tag.message_state, 2, 1),
                TLV(Tag.network_error_code, b"\x03\x00\x0b"),
                TLV(0x1401, b"vendor"),
            ),
        )
        pdu = decode(encode(pdu))
        self.assertEqual(pdu.tlvString(Tag.receipted_message_id), b"abc")
        self.assertEqual(pdu.tlvInt(Tag.message_state), 2)
        self.assertEqual(networkErrorCode(pdu), (3, 11))
        self.assertEqual(pdu.tlv(0x1401), b"vendor")
        self.assertEqual(pdu.tlvs[3].name, "0x1401")
        self.assertIsNone(pdu.tlv(Tag.sar_msg_ref_num))

    def test_responses(self):
        """
        responseTo keeps the sequence and sets the response bit; a
        generic_nack has no body; status names are readable.
        """
        request = makePDU(Command.enquire_link, 42)
        self.assertEqual(responseTo(request).command_id, Command.enquire_link_resp)
        self.assertEqual(responseTo(request).sequence, 42)
        self.assertEqual(len(encode(genericNack(3, Status.ESME_RINVCMDID))), 16)
        self.assertEqual(statusName(0x58), "ESME_RTHROTTLED")
        self.assertEqual(statusName(0x400), "0x00000400")


class DifferentialTests(SynchronousTestCase):
    """
    The same bytes read the same by smpp.pdu3 (an independent codec).
    """

    def setUp(self):
        from smpp.pdu.pdu_encoding import PDUEncoder

        self.other = PDUEncoder()

    def theirs(self, data):
        return self.other.decode(io.BytesIO(data))

    @given(
        source=cString(21), destination=cString(21),
        ton=st.integers(0, 6), npi=st.sampled_from([0, 1, 3, 4, 6, 8, 9, 10, 14, 18]),
        esm=st.sampled_from([0, 0x40]), coding=st.sampled_from([0, 8]),
        message=st.binary(max_size=254), sequence=st.integers(1, 0x7FFFFFFF),
        registered=st.sampled_from([0, 1]), priority=st.integers(0, 3),
    )
    def test_submitSMReadAlike(self, source, destination, ton, npi, esm, coding, message,
                               sequence, registered, priority):
        """
        A submit_sm we encode is read by smpp.pdu3 with the same fields,
        and smpp.pdu3 writes it back to the same bytes.
        """
        ours = encode(
            makePDU(
                Command.submit_sm, sequence, source_addr_ton=ton, source_addr_npi=npi,
                source_addr=source, dest_addr_ton=1, dest_addr_npi=1,
                destination_addr=destination, esm_class=esm, priority_flag=priority,
                registered_delivery=registered, data_coding=coding, short_message=message,
            )
        )
        theirs = self.theirs(ours)
        self.assertEqual(theirs.seqNum, sequence)
        self.assertEqual(theirs.params["source_addr"] or b"", source)
        self.assertEqual(theirs.params["destination_addr"] or b"", destination)
        self.assertEqual(theirs.params["short_message"] or b"", message)
        self.assertEqual(self.other.encode(theirs), ours)

    def test_theirPDUsReadByUs(self):
        """
        PDUs written by smpp.pdu3 (bind, submit_sm_resp, deliver_sm with
        receipt TLVs, enquire_link, generic_nack) decode here with the
        values it was given.
        """
        from smpp.pdu import operations as o, pdu_types as t

        bind = self.other.encode(
            o.BindTransceiver(seqNum=1, system_id=b"esme", password=b"secret",
                              system_type=b"", interface_version=0x34)
        )
        pdu = decode(bind)
        self.assertEqual(
            (pdu.name, pdu.get("system_id"), pdu.get("password"), pdu.get("interface_version")),
            ("bind_transceiver", b"esme", b"secret", 0x34),
        )
        resp = decode(self.other.encode(o.SubmitSMResp(seqNum=9, message_id=b"5B1A")))
        self.assertEqual((resp.name, resp.sequence, resp.get("message_id")), ("submit_sm_resp", 9, b"5B1A"))
        deliver = self.other.encode(
            o.DeliverSM(
                seqNum=3, source_addr=b"393331234567", destination_addr=b"Shop",
                esm_class=t.EsmClass(t.EsmClassMode.DEFAULT, t.EsmClassType.SMSC_DELIVERY_RECEIPT),
                short_message=b"id:5B1A sub:001 dlvrd:001 stat:DELIVRD err:000 text:",
                receipted_message_id=b"5B1A", message_state=t.MessageState.DELIVERED,
                network_error_code=b"\x03\x00\x00",
            )
        )
        pdu = decode(deliver)
        self.assertEqual(pdu.get("esm_class"), 0x04)
        self.assertEqual(pdu.tlvString(Tag.receipted_message_id), b"5B1A")
        self.assertEqual(pdu.tlvInt(Tag.message_state), 2)
        self.assertEqual(encode(pdu), deliver)
        self.assertEqual(decode(self.other.encode(o.EnquireLink(seqNum=77))).name, "enquire_link")
        nack = decode(self.other.encode(o.GenericNack(seqNum=4, status=t.CommandStatus.ESME_RINVCMDLEN)))
        self.assertEqual((nack.name, nack.status), ("generic_nack", Status.ESME_RINVCMDLEN))
