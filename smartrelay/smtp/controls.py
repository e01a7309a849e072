# -*- test-case-name: tests.test_smtp_controls -*-
"""
Per-message control headers (DESIGN section 1.4): read, checked and removed
from a submitted message at the end of DATA, before it is stored.

Ours::

    X-SmartRelay-Track: opens | clicks | opens,clicks | none
    X-SmartRelay-Tag: password-reset
    X-SmartRelay-Unsubscribe: on | off
    X-SmartRelay-Metadata-<key>: text

and, so that applications can switch providers without a code change, the
common providers' equivalents, mapped to ours and removed as well::

    X-Mailgun-Track: yes | no              (opens and clicks)
    X-Mailgun-Track-Opens: yes | no
    X-Mailgun-Track-Clicks: yes | no | htmlonly
    X-Mailgun-Tag: tag                      (the first one; more become metadata)
    X-PM-Tag: tag
    X-PM-TrackOpens: true | false
    X-PM-TrackLinks: None | HtmlAndText | HtmlOnly | TextOnly
    X-SES-MESSAGE-TAGS: name=value, name=value   (metadata)

Our headers win over the providers' when both are present.  A value that
cannot be understood raises L{InvalidControlHeader}, naming the header; the
submission policy refuses the message with it (C{554 5.6.0}): a typo must
not silently send mail with tracking the sender did not ask for (or without
what they asked for).  This module knows nothing of SMTP replies.
"""

import re
from email.header import decode_header, make_header
from typing import Optional

import attrs

__all__ = [
    "Controls",
    "InvalidControlHeader",
    "readControls",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_VALUE",
]

#: At most this many metadata keys per message, each value at most this
#: many characters (they are copied into every event of the message).
MAX_METADATA_KEYS = 20
MAX_METADATA_VALUE = 1000

_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,99}")
_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_PREFIXES = (b"x-smartrelay-", b"x-mailgun-", b"x-pm-", b"x-ses-message-tags")
_OURS = "x-smartrelay-"
_METADATA = "x-smartrelay-metadata-"
#: Control headers this module does not own (SMS comes with its issue).
_NOT_OURS = frozenset(["x-smartrelay-sms-from", "x-smartrelay-id"])
_KNOWN = frozenset(
    [
        "x-smartrelay-track",
        "x-smartrelay-tag",
        "x-smartrelay-unsubscribe",
        "x-mailgun-track",
        "x-mailgun-track-opens",
        "x-mailgun-track-clicks",
        "x-mailgun-tag",
        "x-pm-tag",
        "x-pm-trackopens",
        "x-pm-tracklinks",
        "x-ses-message-tags",
    ]
)


@attrs.frozen
class Controls:
    """
    What a message's control headers ask for; L{None} means "the relay's
    default".

    @ivar opens: track opens.
    @ivar clicks: track clicks.
    @ivar unsubscribe: add C{List-Unsubscribe}.
    @ivar tag: the statistics tag.
    @ivar metadata: key → text, carried into every event.
    """

    opens: Optional[bool] = None
    clicks: Optional[bool] = None
    unsubscribe: Optional[bool] = None
    tag: Optional[str] = None
    metadata: dict = attrs.field(factory=dict)


@attrs.define(str=False)
class InvalidControlHeader(ValueError):
    """
    A control header has a value that cannot be understood.

    @ivar header: the header's name as the message spelled it (or
        C{X-SmartRelay-Metadata-*} for the number of metadata keys).
    @ivar reason: what is wrong, a sentence fragment for people.
    """

    header: str
    reason: str

    def __str__(self) -> str:
        return f"Invalid {self.header} header: {self.reason}"


def _invalid(header: str, why: str) -> InvalidControlHeader:
    return InvalidControlHeader(header, why)


def _text(raw: bytes) -> str:
    """
    A header value as text: unfolded, RFC 2047 words decoded.
    """
    value = re.sub(rb"\r?\n[ \t]+", b" ", raw).strip().decode("utf-8", "replace")
    if "=?" in value:
        try:
            value = str(make_header(decode_header(value)))
        except (ValueError, LookupError, UnicodeDecodeError):
            pass
    return value


def _split(data: bytes) -> tuple:
    """
    The header section split into fields (each with its line end), and the
    rest of the message (the blank line and the body).
    """
    end = data.find(b"\r\n\r\n")
    header, rest = (data, b"") if end < 0 else (data[: end + 2], data[end + 2 :])
    fields: list = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def _yesNo(header: str, value: str, yes: tuple, no: tuple) -> bool:
    lowered = value.strip().lower()
    if lowered in yes:
        return True
    if lowered in no:
        return False
    expected = " or ".join(repr(v) for v in (*yes[:1], *no[:1]))
    raise _invalid(header, f"expected {expected}, got {value!r}")


def readControls(data: bytes) -> tuple:
    """
    Read and remove the control headers of a message.

    @param data: the message as submitted (CRLF line ends).
    @return: C{(Controls, data without the control headers)}.  A message
        without any is returned unchanged (the same object).
    @raise InvalidControlHeader: a control header has a bad value.
    """
    lowered = data[: data.find(b"\r\n\r\n") + 2 if b"\r\n\r\n" in data else len(data)].lower()
    if not any(prefix in lowered for prefix in _PREFIXES):
        return Controls(), data
    fields, rest = _split(data)
    found: list = []
    kept: list = []
    for field in fields:
        name, colon, value = field.partition(b":")
        key = name.strip().decode("ascii", "replace").lower()
        if colon and (key in _KNOWN or key.startswith(_METADATA)) and key not in _NOT_OURS:
            found.append((name.strip().decode("ascii", "replace"), key, value))
        else:
            kept.append(field)
    if not found:
        return Controls(), data
    return _interpret(found), b"".join(kept) + rest


def _interpret(found: list) -> Controls:
    ours: dict = {}
    theirs: dict = {}
    metadata: dict = {}
    mailgunTags: list = []
    for name, key, raw in found:
        value = _text(raw)
        if key.startswith(_METADATA):
            metaKey = key[len(_METADATA) :]
            if not _KEY.fullmatch(metaKey):
                raise _invalid(name, "the key after X-SmartRelay-Metadata- must be 1-64 "
                                     "letters, digits, '_', '.' or '-'")
            if len(value) > MAX_METADATA_VALUE:
                raise _invalid(name, f"longer than {MAX_METADATA_VALUE} characters")
            metadata[metaKey] = value
        elif key == "x-mailgun-tag":
            mailgunTags.append((name, value))
        elif key == "x-ses-message-tags":
            for item in filter(None, (p.strip() for p in value.split(","))):
                tagName, eq, tagValue = item.partition("=")
                tagName = tagName.strip().lower()
                if not eq or not _KEY.fullmatch(tagName):
                    raise _invalid(name, f"expected 'name=value, ...', got {item!r}")
                metadata.setdefault(tagName, tagValue.strip()[:MAX_METADATA_VALUE])
        elif key.startswith(_OURS):
            if key in ours:
                raise _invalid(name, "given more than once")
            ours[key] = (name, value)
        else:
            theirs[key] = (name, value)

    opens = clicks = unsubscribe = tag = None
    # The providers' first, so that ours override them.
    if "x-mailgun-track" in theirs:
        opens = clicks = _yesNo(*theirs["x-mailgun-track"], ("yes", "true"), ("no", "false"))
    if "x-mailgun-track-opens" in theirs:
        opens = _yesNo(*theirs["x-mailgun-track-opens"], ("yes", "true"), ("no", "false"))
    if "x-mailgun-track-clicks" in theirs:
        clicks = _yesNo(
            *theirs["x-mailgun-track-clicks"], ("yes", "htmlonly", "true"), ("no", "false")
        )
    if "x-pm-trackopens" in theirs:
        opens = _yesNo(*theirs["x-pm-trackopens"], ("true", "yes"), ("false", "no"))
    if "x-pm-tracklinks" in theirs:
        clicks = _yesNo(
            *theirs["x-pm-tracklinks"],
            ("htmlandtext", "htmlonly", "textonly"),
            ("none",),
        )
    if mailgunTags:
        name, tag = mailgunTags[0]
        for extra, (_, value) in enumerate(mailgunTags[1:], start=2):
            metadata.setdefault(f"mailgun-tag-{extra}", value)
    if "x-pm-tag" in theirs:
        name, tag = theirs["x-pm-tag"]
    if "x-smartrelay-track" in ours:
        name, value = ours["x-smartrelay-track"]
        words = {w.strip().lower() for w in value.split(",")}
        if words == {"none"}:
            opens = clicks = False
        elif words and words <= {"opens", "clicks"}:
            opens, clicks = "opens" in words, "clicks" in words
        else:
            raise _invalid(
                name, f"expected 'opens', 'clicks', 'opens,clicks' or 'none', got {value!r}"
            )
    if "x-smartrelay-unsubscribe" in ours:
        unsubscribe = _yesNo(*ours["x-smartrelay-unsubscribe"], ("on", "yes", "true"),
                             ("off", "no", "false"))
    if "x-smartrelay-tag" in ours:
        name, tag = ours["x-smartrelay-tag"]
    if tag is not None and not _TAG.fullmatch(tag):
        raise _invalid(
            name,
            f"a tag is 1-100 letters, digits and . _ : / @ + - (starting with a "
            f"letter or digit), got {tag!r}",
        )
    if len(metadata) > MAX_METADATA_KEYS:
        raise _invalid("X-SmartRelay-Metadata-*", f"more than {MAX_METADATA_KEYS} keys")
    return Controls(opens=opens, clicks=clicks, unsubscribe=unsubscribe, tag=tag, metadata=metadata)
