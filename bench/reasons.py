"""
Accuracy and speed of the bounce classifier alone (smartrelay.feedback.reasons),
independent of the DSN parser.

Feeds each expected record of the corpus's answers.jsonl -- its status
(dropped where Sisimai invented one), reply code, diagnostic, action and
recipient -- to classify() and compares the reason and hard/soft with the
expected ones.  Prints the agreement, every disagreement, and the time per
record.

    python3 bench/reasons.py [CORPUS]      # default ../shared/corpus/bounces

The corpus is read in place; nothing of it is copied.
"""

import argparse
import json
import os
import sys
import time

from smartrelay.feedback.reasons import classify

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_BOUNCES = {"feedback", "vacation", "delivered"}


def load(corpus):
    with open(os.path.join(corpus, "answers.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def arguments(answer):
    """
    classify()'s arguments from an expected record: status, reply code,
    diagnostic, action, no command, no remote host (the answers name
    neither), and the recipient (whose domain may name the provider).
    """
    status = None if answer.get("status_is_sisimai_pseudo") else answer.get("status") or None
    reply = answer.get("replycode") or None
    reply = int(reply) if reply and str(reply).isdigit() else None
    return (
        status,
        reply,
        answer.get("diagnosticcode") or None,
        answer.get("action") or None,
        None,
        None,
        answer.get("recipient") or None,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument(
        "corpus", nargs="?", default=os.path.join(_ROOT, "..", "shared", "corpus", "bounces")
    )
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds (default 20)")
    options = parser.parse_args(argv)
    answers = load(options.corpus)
    # Complaints and auto-replies are the parser's to recognise (by their
    # form, not their diagnostic): only bounce records are the classifier's.
    records = [a for a in answers if a["reason"] not in ("feedback", "vacation")]
    reasonOK = kindOK = 0
    misses = []
    for answer in records:
        verdict = classify(*arguments(answer))
        expectedKind = "hard" if answer["hardbounce"] else "soft"
        if answer["reason"] in NOT_BOUNCES:
            expectedKind = None
        gotKind = verdict.kind
        sameReason = verdict.reason == answer["reason"]
        sameKind = gotKind == expectedKind
        reasonOK += sameReason
        kindOK += sameKind
        if not (sameReason and sameKind):
            misses.append((answer, verdict, expectedKind))
    for answer, verdict, expectedKind in misses:
        status, reply, diagnostic, action = arguments(answer)[:4]
        print(
            f"{answer['file']}#{answer['index']}: expected {answer['reason']}/{expectedKind}"
            f" got {verdict.reason}/{verdict.kind}"
            f"  [status={status} reply={reply} action={action}]"
            f"\n    {(diagnostic or '')[:300]!r}"
        )
    total = len(records)
    print(f"\nrecords: {total} (of {len(answers)}; complaints and auto-replies left out)")
    print(f"reason agreement:    {reasonOK}/{total} = {100 * reasonOK / total:.2f} %")
    print(f"hard/soft agreement: {kindOK}/{total} = {100 * kindOK / total:.2f} %")

    inputs = [arguments(a) for a in answers]
    best = None
    for _ in range(options.rounds):
        start = time.perf_counter()
        for args in inputs:
            classify(*args)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    perRecord = best / len(inputs)
    print(
        f"speed: {perRecord * 1e6:.1f} µs/record (best of {options.rounds} rounds"
        f" over {len(inputs)} records), {1 / perRecord:,.0f} records/s on one core"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
