"""
How well and how fast the relay reads the reports that come back.

Runs L{smartrelay.feedback.report.readReport} over a bounce corpus (by
default C{../shared/corpus/bounces}, read in place: its C{samples/*.eml}
and C{answers.jsonl}, one expected record per line with C{file}, C{index},
C{recipient}, C{reason}, C{hardbounce}), matches the records to the
answers by file and index, and prints the recipient, reason and hard/soft
agreement, every disagreement, and the messages read per second (one core,
best of C{--repeat} passes over the whole corpus, the files already in
memory).

    python3 bench/classify.py [--corpus DIR] [--repeat N] [--quiet]
    python3 bench/classify.py --hostile

Exit status 0 whatever the agreement; 2 if the corpus is missing.
"""

import argparse
import json
import os
import sys
import time

from smartrelay.feedback.records import Report
from smartrelay.feedback.report import readReport, splitMailbox

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CORPUS = os.path.join(HERE, "..", "..", "shared", "corpus", "bounces")


def _load(corpus: str):
    answers = []
    with open(os.path.join(corpus, "answers.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                answers.append(json.loads(line))
    files = sorted({answer["file"] for answer in answers})
    extra = os.path.join(corpus, "not-bounces")
    if os.path.isdir(extra):
        files += sorted(
            os.path.join("not-bounces", name) for name in os.listdir(extra) if name.endswith(".eml")
        )
    data = {}
    for name in files:
        with open(os.path.join(corpus, name), "rb") as f:
            data[name] = f.read()
    return answers, data


def _readFile(raw: bytes) -> Report:
    """
    Read a sample, which may be a mailbox of several messages (as
    C{smartrelay classify} does): the records of all of them, in order.
    """
    reports = [readReport(message) for message in splitMailbox(raw)]
    records = tuple(record for report in reports for record in report.records)
    kinds = [report.type for report in reports if report.type != "none"]
    return Report(kinds[0] if kinds else "none", records)


def _hostile() -> dict:
    """
    Inputs built to make a careless parser slow (long runs that regular
    expressions backtrack over, huge headers, deep nesting), each a few
    hundred kilobytes to a few megabytes.
    """
    head = b"From: MAILER-DAEMON@mx.example\r\nSubject: Undelivered Mail\r\n\r\n"
    return {
        "addresses on one line": head + b"a@b.example " * 20000,
        "address lines": head + b"  user@example.com\r\n" * 10000,
        "header fields": head + b"X-A: b\r\n" * 20000,
        "one long line": head + b"x" * 3_000_000,
        "dashes": head + b"-" * 500_000,
        "open braces": head + b"{" * 100_000,
        "RCPT TO:<": head + b"RCPT TO:<" * 50_000,
        "huge header field": b"X-Big: " + b"a" * 3_000_000 + b"\r\n\r\n",
        "nested multiparts": b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 5000,
        "DSN groups": b"Content-Type: multipart/report; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: message/delivery-status\r\n\r\n"
        + b"Final-Recipient: rfc822; a@b.example\r\nAction: failed\r\n\r\n" * 20000,
        "bad base64": b"Content-Transfer-Encoding: base64\r\n\r\n" + b"!" * 1_000_000,
    }


def hostile() -> int:
    """
    Print how long each hostile input takes to read.
    """
    for name, data in _hostile().items():
        start = time.perf_counter()
        report = readReport(data)
        elapsed = time.perf_counter() - start
        print(f"{name:22s} {len(data):>9,d} bytes {elapsed * 1000:8.1f} ms  {report.type}, {len(report.records)} records")
    return 0


def _kind(answer) -> str:
    return "hard" if answer["hardbounce"] else "soft"


def _expectedKind(answer) -> str:
    # Complaints and auto-replies are neither.
    if answer["reason"] in ("feedback", "vacation"):
        return "-"
    return _kind(answer)


def _gotKind(record) -> str:
    if record is None or record.type in ("complaint", "autoreply"):
        return "-"
    return record.kind or "soft"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quiet", action="store_true", help="do not list disagreements")
    parser.add_argument("--hostile", action="store_true", help="time hostile inputs instead")
    options = parser.parse_args(argv)
    if options.hostile:
        return hostile()
    if not os.path.isfile(os.path.join(options.corpus, "answers.jsonl")):
        print(f"no corpus at {options.corpus}", file=sys.stderr)
        return 2
    answers, data = _load(options.corpus)

    reports = {name: _readFile(raw) for name, raw in data.items()}
    best = None
    for _ in range(max(1, options.repeat)):
        start = time.perf_counter()
        for raw in data.values():
            _readFile(raw)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)

    recipientOk = reasonOk = kindOk = 0
    problems = []
    for answer in answers:
        report = reports[answer["file"]]
        index = answer["index"] - 1
        record = report.records[index] if index < len(report.records) else None
        got = record.recipient if record else None
        where = f"{answer['file']}#{answer['index']}"
        want = answer["recipient"]
        if record is not None and (got or "").lower() == (want or "").lower():
            recipientOk += 1
        else:
            problems.append(f"{where} recipient: want {answer['recipient']!r} got {got!r} ({report.type})")
        reason = record.reason if record else None
        if reason == answer["reason"]:
            reasonOk += 1
        else:
            problems.append(
                f"{where} reason: want {answer['reason']} got {reason}"
                f" (status {record.status if record else None}, want {answer['status']};"
                f" diagnostic {(record.diagnostic or '')[:160] if record else ''!r})"
            )
        if _gotKind(record) == _expectedKind(answer):
            kindOk += 1
        else:
            problems.append(f"{where} kind: want {_expectedKind(answer)} got {_gotKind(record)} ({reason})")
    for name, report in reports.items():
        want = sum(1 for answer in answers if answer["file"] == name)
        if name.startswith("not-bounces"):
            if report.type != "none":
                problems.append(f"{name}: want no report, got {report.type} {len(report.records)}")
        elif len(report.records) != want:
            problems.append(f"{name}: {len(report.records)} records, want {want}")

    if not options.quiet:
        for line in problems:
            print(line)
    total = len(answers)
    print(f"corpus: {len(data)} messages, {total} expected records")
    print(f"recipient: {recipientOk}/{total} = {100 * recipientOk / total:.1f} %")
    print(f"reason:    {reasonOk}/{total} = {100 * reasonOk / total:.1f} %")
    print(f"hard/soft: {kindOk}/{total} = {100 * kindOk / total:.1f} %")
    print(f"speed:     {len(data) / best:.0f} messages/s (one core, best of {options.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
