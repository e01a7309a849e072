// An SMSC for the SMS end-to-end tests (tests/test_e2e_sms.py), built on the
// npm "smpp" package, so that what the relay sends is read by decoders
// nobody here wrote.
//
//   node smsc.js RECORD.jsonl
//
// Listens on 127.0.0.1 on a port the OS chooses and prints {"port": N} as
// its first line on stdout.  It accepts every bind_transceiver, answers each
// submit_sm with a message id (hex), writes what the package decoded
// (short_message text, UDH, data_coding, addresses) as one JSON line to
// RECORD.jsonl, and then sends a delivery receipt (deliver_sm with esm_class
// 0x04, the receipted_message_id and message_state TLVs and the "id:...
// stat:DELIVRD" text); the deliver_sm_resp it gets back is recorded too.
"use strict";

const fs = require("fs");
const path = require("path");
const smpp = require(path.join(__dirname, "node_modules", "smpp"));

const recordPath = process.argv[2];
if (!recordPath) {
  process.stderr.write("usage: node smsc.js RECORD.jsonl\n");
  process.exit(2);
}
const record = fs.openSync(recordPath, "a");

function write(object) {
  fs.writeSync(record, JSON.stringify(object) + "\n");
}

function text(value) {
  if (value === undefined || value === null) return null;
  return Buffer.isBuffer(value) ? value.toString("latin1") : String(value);
}

let nextID = 0x3e8a0;

const server = smpp.createServer({}, (session) => {
  session.on("error", (error) => write({ event: "error", message: String(error) }));
  session.on("bind_transceiver", (pdu) => {
    write({ event: "bind_transceiver", system_id: text(pdu.system_id), password: text(pdu.password) });
    session.send(pdu.response({ system_id: "npm-smpp" }));
  });
  session.on("enquire_link", (pdu) => session.send(pdu.response()));
  session.on("unbind", (pdu) => {
    write({ event: "unbind" });
    session.send(pdu.response());
    session.close();
  });
  session.on("deliver_sm_resp", (pdu) => {
    write({ event: "deliver_sm_resp", sequence_number: pdu.sequence_number, command_status: pdu.command_status });
  });
  session.on("submit_sm", (pdu) => {
    const id = (nextID++).toString(16).toUpperCase();
    const sm = pdu.short_message || {};
    const message = sm.message === undefined ? sm : sm.message;
    write({
      event: "submit_sm",
      message_id: id,
      text: Buffer.isBuffer(message) ? null : String(message),
      udh: (sm.udh || []).map((u) => Buffer.from(u).toString("hex")),
      data_coding: pdu.data_coding,
      esm_class: pdu.esm_class,
      registered_delivery: pdu.registered_delivery,
      source_addr: text(pdu.source_addr),
      source_addr_ton: pdu.source_addr_ton,
      source_addr_npi: pdu.source_addr_npi,
      destination_addr: text(pdu.destination_addr),
      dest_addr_ton: pdu.dest_addr_ton,
      dest_addr_npi: pdu.dest_addr_npi,
    });
    session.send(pdu.response({ message_id: id }));
    setTimeout(() => {
      session.deliver_sm({
        source_addr: pdu.destination_addr,
        destination_addr: pdu.source_addr,
        esm_class: 0x04,
        short_message:
          "id:" + id + " sub:001 dlvrd:001 submit date:2612071200 done date:2612071201 stat:DELIVRD err:000 text:",
        receipted_message_id: id,
        message_state: 2,
      });
    }, 50);
  });
});

server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
});

process.on("SIGTERM", () => process.exit(0));
