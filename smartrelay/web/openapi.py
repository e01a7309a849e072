"""
The OpenAPI 3.1 description of the HTTP API (L{smartrelay.web.api}),
served at C{GET /api/v1/openapi.json}.  C{tests/test_openapi.py} runs
schemathesis against a live relay with it, so it stays true: every route,
parameter, status and answer shape here is what the API does.
"""

import copy
from typing import Any, Optional

from smartrelay.events import EVENT_TYPES
from smartrelay.store.interfaces import MAX_LIMIT, SUPPRESSION_REASONS
from smartrelay.web.api import MAX_IMPORT
from smartrelay.web.apirequest import ADDRESS_PATTERN, DOMAIN_PATTERN, MAX_SECONDS

__all__ = ["document"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_TIME = {"type": "string", "format": "date-time"}
_ADDRESS = {"type": "string", "pattern": f"^{ADDRESS_PATTERN}$"}
_TEXT = {"type": "string", "pattern": "^[^\\x00-\\x1f\\x7f]*$"}
_TIME_PARAMETER = {
    "anyOf": [
        {
            "type": "string",
            "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
            "(\\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$",
            "format": "date-time",
        },
        {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "format": "date"},
        {"type": "string", "pattern": "^[0-9]{1,11}(\\.[0-9]{1,9})?$"},
    ]
}
_QUEUE_ID = {"type": "string", "pattern": "^[0-9A-F]{2}/[0-9A-F]{2}-[0-9]{5}-[0-9A-F]{8}$"}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_RATE = _nullable({"type": "number", "minimum": 0})
_NODE = {"type": "string", "pattern": "^[0-9A-F]{2}$"}

#: The fields a queue view adds with other nodes sharing a Redis store
#: (never on one node): who answered, who did not and why.
_CLUSTER = {
    "nodes": {"type": "array", "items": _NODE},
    "partial": {"type": "boolean"},
    "missing_nodes": {"type": "array", "items": _NODE},
    "node_errors": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["node", "code", "message"],
            "properties": {
                "node": _nullable(_NODE),
                "code": {"type": "string"},
                "message": {"type": "string"},
            },
        },
    },
}

_SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "parameter": {"type": "string"},
                },
            }
        },
    },
    "Event": {
        "type": "object",
        "required": ["id", "time", "type", "queue_id", "recipient", "tag", "metadata", "detail"],
        "properties": {
            "id": {"type": "string"},
            "time": _TIME,
            "type": {"enum": sorted(EVENT_TYPES)},
            "queue_id": _nullable({"type": "string"}),
            "recipient": _nullable({"type": "string"}),
            "tag": _nullable({"type": "string"}),
            "metadata": {"type": "object"},
            "detail": {"type": "object"},
        },
    },
    "EventPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("Event")},
            "next_cursor": _nullable({"type": "string"}),
        },
    },
    "Recipient": {
        "type": "object",
        "required": ["address", "state", "attempts", "next_attempt", "attempting", "last_reply"],
        "properties": {
            "address": {"type": "string"},
            "state": {
                "enum": [
                    "queued", "deferred", "delivered", "bounced", "expired",
                    "suppressed", "rejected",
                ]
            },
            "attempts": {"type": "integer", "minimum": 0},
            "next_attempt": _nullable(_TIME),
            "attempting": {"type": "boolean"},
            "last_reply": _nullable(
                {
                    "type": "object",
                    "properties": {
                        "code": _nullable({"type": "integer"}),
                        "status": _nullable({"type": "string"}),
                        "reply": _nullable({"type": "string"}),
                        "remote": _nullable({"type": "string"}),
                    },
                }
            ),
        },
    },
    "Envelope": {
        "type": "object",
        "required": ["sender", "recipients", "received", "size", "client", "tag", "metadata"],
        "properties": {
            "sender": _nullable({"type": "string"}),
            "recipients": {"type": "array", "items": {"type": "string"}},
            "received": _nullable(_TIME),
            "size": _nullable({"type": "integer"}),
            "client": _nullable({"type": "object"}),
            "tag": _nullable({"type": "string"}),
            "metadata": _nullable({"type": "object"}),
        },
    },
    "Message": {
        "type": "object",
        "required": ["queue_id", "queued", "envelope", "recipients", "headers", "events"],
        "properties": {
            "queue_id": _QUEUE_ID,
            "queued": {"type": "boolean"},
            "envelope": _ref("Envelope"),
            "recipients": {"type": "array", "items": _ref("Recipient")},
            "headers": _nullable({"type": "string"}),
            "events": {"type": "array", "items": _ref("Event")},
            "node": _NODE,
            **_CLUSTER,
        },
    },
    "Rates": {
        "type": "object",
        "required": [
            "delivery", "bounce", "hard_bounce", "soft_bounce", "complaint",
            "unsubscribe", "unique_open", "unique_click", "sms_delivery",
        ],
        "properties": {
            name: _RATE
            for name in [
                "delivery", "bounce", "hard_bounce", "soft_bounce", "complaint",
                "unsubscribe", "unique_open", "unique_click", "sms_delivery",
            ]
        },
    },
    "Stats": {
        "type": "object",
        "required": [
            "from", "to", "interval", "tag", "domain", "totals", "rates",
            "complaint_rate_limit", "complaint_rate_over_limit",
            "bounce_reasons_complete", "buckets",
        ],
        "properties": {
            "from": _TIME,
            "to": _TIME,
            "interval": {"enum": ["hour", "day"]},
            "tag": _nullable({"type": "string"}),
            "domain": _nullable({"type": "string"}),
            "totals": {
                "type": "object",
                "required": [
                    "counts", "hard_bounces", "soft_bounces", "unique_opens",
                    "unique_clicks", "bounce_reasons",
                ],
                "properties": {
                    "counts": _COUNTS,
                    "hard_bounces": {"type": "integer"},
                    "soft_bounces": {"type": "integer"},
                    "unique_opens": {"type": "integer"},
                    "unique_clicks": {"type": "integer"},
                    "bounce_reasons": _COUNTS,
                },
            },
            "rates": _ref("Rates"),
            "complaint_rate_limit": {"type": "number"},
            "complaint_rate_over_limit": _nullable({"type": "boolean"}),
            "bounce_reasons_complete": {"type": "boolean"},
            "buckets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "start", "counts", "hard_bounces", "soft_bounces", "unique_opens",
                        "unique_clicks", "bounce_reasons", "rates",
                    ],
                    "properties": {
                        "start": _TIME,
                        "counts": _COUNTS,
                        "hard_bounces": {"type": "integer"},
                        "soft_bounces": {"type": "integer"},
                        "unique_opens": {"type": "integer"},
                        "unique_clicks": {"type": "integer"},
                        "bounce_reasons": _COUNTS,
                        "rates": _ref("Rates"),
                    },
                },
            },
        },
    },
    "Suppression": {
        "type": "object",
        "required": ["address", "reason", "source_event", "time", "expires"],
        "properties": {
            "address": {"type": "string"},
            "reason": {"enum": sorted(SUPPRESSION_REASONS)},
            "source_event": _nullable({"type": "string"}),
            "time": _TIME,
            "expires": _nullable(_TIME),
        },
    },
    "SuppressionPage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("Suppression")},
            "next_cursor": _nullable({"type": "string"}),
        },
    },
    "NewSuppression": {
        "type": "object",
        "required": ["address"],
        "additionalProperties": False,
        "properties": {
            "address": _ADDRESS,
            "reason": {"enum": sorted(SUPPRESSION_REASONS)},
            "expires": _nullable(
                {
                    "anyOf": [
                        _TIME_PARAMETER,
                        {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
                    ]
                }
            ),
        },
    },
    "QueueSummary": {
        "type": "object",
        "required": ["messages", "recipients", "domains"],
        "properties": {
            "messages": {"type": "integer"},
            "recipients": {"type": "integer"},
            "domains": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "domain", "messages", "recipients", "queued", "deferred",
                        "attempting", "oldest", "next_attempt", "reasons",
                    ],
                    "properties": {
                        "domain": {"type": "string"},
                        "messages": {"type": "integer"},
                        "recipients": {"type": "integer"},
                        "queued": {"type": "integer"},
                        "deferred": {"type": "integer"},
                        "attempting": {"type": "integer"},
                        "oldest": _TIME,
                        "next_attempt": _nullable(_TIME),
                        "reasons": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["reason", "count"],
                                "properties": {
                                    "reason": {"type": "string"},
                                    "count": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
            },
            **_CLUSTER,
            "per_node": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["node", "messages", "recipients"],
                    "properties": {
                        "node": _NODE,
                        "messages": {"type": "integer"},
                        "recipients": {"type": "integer"},
                    },
                },
            },
        },
    },
    "QueuedMessage": {
        "type": "object",
        "required": ["queue_id", "sender", "received", "size", "tag", "recipients"],
        "properties": {
            "queue_id": _QUEUE_ID,
            "sender": {"type": "string"},
            "received": _TIME,
            "size": {"type": "integer"},
            "tag": _nullable({"type": "string"}),
            "recipients": {"type": "array", "items": _ref("Recipient")},
            "node": _NODE,
        },
    },
    "QueuePage": {
        "type": "object",
        "required": ["items", "next_cursor"],
        "properties": {
            "items": {"type": "array", "items": _ref("QueuedMessage")},
            "next_cursor": _nullable({"type": "string"}),
            **_CLUSTER,
        },
    },
    "Destination": {
        "type": "object",
        "required": ["destination", "queued", "connections", "max_connections", "throttled"],
        "properties": {
            "destination": {"type": "string"},
            "queued": {"type": "integer"},
            "connections": {"type": "integer"},
            "busy": {"type": "integer"},
            "max_connections": {"type": "integer"},
            "configured_max_connections": {"type": "integer"},
            "rate": _nullable({"type": "number"}),
            "configured_rate": _nullable({"type": "number"}),
            "throttled": {"type": "boolean"},
            "throttle_factor": {"type": "number"},
            "throttle_until": _nullable(_TIME),
            "throttle_reason": _nullable({"type": "string"}),
            "parked": {"type": "integer"},
            "suspended_until": _nullable(_TIME),
            "suspended_reason": _nullable({"type": "string"}),
            "node": _NODE,
        },
    },
}

_ERRORS = {
    "400": "A bad parameter or body (the error names the parameter)",
    "401": "No token, or a wrong one",
    "403": "The API is disabled (no [web] api_tokens)",
    "429": "Too many wrong tokens from this address",
}


_IMPORT_ITEMS = {
    "type": "array",
    "maxItems": MAX_IMPORT,
    "items": {"anyOf": [_ref("NewSuppression"), _ADDRESS]},
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*extra: str) -> dict:
    codes = dict(_ERRORS)
    more = {
        "404": "Not found",
        "409": "The message is being delivered right now",
        "413": "The body is too large",
        "415": "Not CSV or JSON",
        "405": "Another method (a path that another route's parameter matches)",
        "500": "Internal error (see the relay's log)",
        "503": "The message belongs to another node that is not running, or the store "
        "cannot be reached to ask it",
        "504": "The node that owns the message did not answer in time",
    }
    for code in extra:
        codes[code] = more[code]
    return {code: _json(_ref("Error"), text) for code, text in codes.items()}


def _query(name: str, schema: dict, description: str, required: bool = False) -> dict:
    if not required:
        # An empty value is as if the parameter were not given.
        schema = {"anyOf": [schema, {"type": "string", "maxLength": 0}]}
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


_DOMAIN = {"type": "string", "pattern": f"^{DOMAIN_PATTERN}$"}
_LIMIT = _query(
    "limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
    "Page size",
)
_CURSOR = _query(
    "cursor", {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,2048}$"},
    "The next_cursor of the previous page",
)
_QUEUE_PATH = {
    "name": "queue_id",
    "in": "path",
    "required": True,
    "description": "A queue id; its slash may be sent as is or as %2F",
    "schema": _QUEUE_ID,
}
_ADDRESS_PATH = {
    "name": "address",
    "in": "path",
    "required": True,
    "description": "The address, URL-encoded",
    "schema": _ADDRESS,
}


def _operation(
    summary: str,
    ok: dict,
    status: str = "200",
    parameters: Optional[list] = None,
    errors: tuple = (),
    body: Optional[dict] = None,
    public: bool = False,
) -> dict:
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": parameters or [],
        "responses": {status: ok, **({} if public else _errors(*errors))},
    }
    if body is not None:
        operation["requestBody"] = body
    if public:
        operation["security"] = []
    return operation


def _paths() -> dict:
    return {
        "/api/v1/messages/{queue_id}": {
            "get": _operation(
                "A message: envelope, per-recipient state, headers, events",
                _json(_ref("Message"), "The message"),
                parameters=[_QUEUE_PATH],
                errors=("404", "405", "503", "504"),
            )
        },
        "/api/v1/events": {
            "get": _operation(
                "Events, oldest first, paginated",
                _json(_ref("EventPage"), "One page of events"),
                parameters=[
                    _query("type", {"enum": sorted(EVENT_TYPES)}, "Event type"),
                    _query("queue_id", _QUEUE_ID, "Queue id"),
                    _query("recipient", _ADDRESS, "Recipient address (domain case-insensitive)"),
                    _query("tag", _TEXT, "Tag"),
                    _query("domain", _DOMAIN, "Recipient domain"),
                    _query("since", _TIME_PARAMETER, "From this time (inclusive)"),
                    _query("until", _TIME_PARAMETER, "Up to this time (exclusive)"),
                    _CURSOR,
                    _LIMIT,
                ],
            )
        },
        "/api/v1/stats": {
            "get": _operation(
                "Counts and rates per hour or day",
                _json(_ref("Stats"), "Statistics"),
                parameters=[
                    _query("from", _TIME_PARAMETER, "Start (default: a day or 30 days before to)"),
                    _query("to", _TIME_PARAMETER, "End, exclusive (default: now)"),
                    _query("interval", {"enum": ["hour", "day"], "default": "hour"}, "Bucket size"),
                    _query("tag", _TEXT, "Tag"),
                    _query("domain", _DOMAIN, "Recipient domain"),
                ],
            )
        },
        "/api/v1/suppressions": {
            "get": _operation(
                "The suppression list, by address, paginated",
                _json(_ref("SuppressionPage"), "One page of entries"),
                parameters=[
                    _query("q", _TEXT,
                           "Addresses starting with this"),
                    _query("reason", {"enum": sorted(SUPPRESSION_REASONS)}, "Reason"),
                    _CURSOR,
                    _LIMIT,
                ],
            ),
            "post": _operation(
                "Add an address",
                _json(_ref("Suppression"), "The entry added"),
                status="201",
                errors=("413",),
                body={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NewSuppression")}},
                },
            ),
        },
        "/api/v1/suppressions/import": {
            "post": _operation(
                "Add many addresses (CSV or JSON); one bad entry imports nothing",
                _json(
                    {
                        "type": "object",
                        "required": ["imported"],
                        "properties": {"imported": {"type": "integer"}},
                    },
                    "How many were added",
                ),
                parameters=[
                    _query("reason", {"enum": sorted(SUPPRESSION_REASONS), "default": "manual"},
                           "Reason of entries without one"),
                ],
                errors=("413", "415"),
                body={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "anyOf": [
                                    _IMPORT_ITEMS,
                                    {
                                        "type": "object",
                                        "required": ["items"],
                                        "additionalProperties": False,
                                        "properties": {"items": _IMPORT_ITEMS},
                                    },
                                ]
                            }
                        },
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
            )
        },
        "/api/v1/suppressions/export": {
            "get": _operation(
                "The whole list as JSON or CSV",
                {
                    "description": "Every entry",
                    "content": {
                        "application/json": {"schema": _ref("SuppressionPage")},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                parameters=[
                    _query("format", {"enum": ["json", "csv"], "default": "json"}, "Format"),
                    _query("q", _TEXT,
                           "Addresses starting with this"),
                    _query("reason", {"enum": sorted(SUPPRESSION_REASONS)}, "Reason"),
                ],
            )
        },
        "/api/v1/suppressions/{address}": {
            "get": _operation(
                "One entry",
                _json(_ref("Suppression"), "The entry"),
                parameters=[_ADDRESS_PATH],
                errors=("404", "405"),
            ),
            "delete": _operation(
                "Remove an address",
                _json(
                    {
                        "type": "object",
                        "required": ["address", "removed"],
                        "properties": {
                            "address": {"type": "string"},
                            "removed": {"const": True},
                        },
                    },
                    "Removed",
                ),
                parameters=[_ADDRESS_PATH],
                errors=("404", "405"),
            ),
        },
        "/api/v1/queue": {
            "get": _operation(
                "The queue per recipient domain (every node's, on a shared store)",
                _json(_ref("QueueSummary"), "The summary"),
                parameters=[_query("domain", _DOMAIN, "Only this domain")],
            )
        },
        "/api/v1/queue/messages": {
            "get": _operation(
                "Queued messages (every node's, on a shared store), oldest first, paginated",
                _json(_ref("QueuePage"), "One page of messages"),
                parameters=[
                    _query("domain", _DOMAIN, "With recipients at this domain"),
                    _query("state", {"enum": ["queued", "deferred"]}, "With recipients in this state"),
                    _CURSOR,
                    _LIMIT,
                ],
            )
        },
        "/api/v1/queue/retry": {
            "post": _operation(
                "Attempt every waiting message of a domain now",
                _json(
                    {
                        "type": "object",
                        "required": ["domain", "messages"],
                        "properties": {
                            "domain": {"type": "string"},
                            "messages": {"type": "integer"},
                            "nodes": _COUNTS,
                            "unanswered": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "How many messages were woken (with other nodes on the store: by node)",
                ),
                parameters=[_query("domain", _DOMAIN, "Recipient domain", required=True)],
            )
        },
        "/api/v1/queue/{queue_id}/retry": {
            "post": _operation(
                "Attempt a queued message now",
                _json(
                    {
                        "type": "object",
                        "required": ["queue_id", "retrying"],
                        "properties": {
                            "queue_id": _QUEUE_ID,
                            "retrying": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "Attempts started",
                ),
                status="202",
                parameters=[_QUEUE_PATH],
                errors=("404", "405", "409", "503", "504"),
            )
        },
        "/api/v1/queue/{queue_id}": {
            "delete": _operation(
                "Delete a queued message: it never goes out",
                _json(
                    {
                        "type": "object",
                        "required": ["queue_id", "deleted"],
                        "properties": {
                            "queue_id": _QUEUE_ID,
                            "deleted": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "The recipients given up",
                ),
                parameters=[_QUEUE_PATH],
                errors=("404", "405", "409", "503", "504"),
            )
        },
        "/api/v1/destinations": {
            "get": _operation(
                "Connections, limits and throttle state per destination",
                _json(
                    {
                        "type": "object",
                        "required": ["items", "next_cursor"],
                        "properties": {
                            "items": {"type": "array", "items": _ref("Destination")},
                            "next_cursor": {"type": "null"},
                            **_CLUSTER,
                        },
                    },
                    "Every destination seen",
                ),
            )
        },
        "/api/v1/openapi.json": {
            "get": _operation(
                "This document",
                _json({"type": "object"}, "OpenAPI 3.1"),
                public=True,
            )
        },
    }


_DOCUMENT = {
    "openapi": "3.1.0",
    "info": {
        "title": "smartrelay operator API",
        "version": "1",
        "description": "See docs/api.md. Errors are "
        '{"error": {"code": ..., "message": ...}}.',
    },
    "paths": _paths(),
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
}


def document() -> dict:
    """
    The OpenAPI document (a fresh copy).
    """
    return copy.deepcopy(_DOCUMENT)
