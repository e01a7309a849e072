"""
The Redis event store: the back end for several relay nodes that share one
suppression list, rate limits, events and statistics (DESIGN section 1.2,
C{[smartrelay] store = redis://host:port/db}).

Layout (every key starts with the store's prefix, C{smartrelay:} unless
told otherwise):

    - C{seq}: the event sequence, bumped with INCRBY once per batch;
    - C{e:b:<bucket>}: a hash per L{BUCKET_SECONDS} of event time (the
      bucket's name is its start, as L{_number} writes it) holding the
      events of that minute: C{r:<seq>} (the sequence number as 16 hex
      digits) to one event's JSON record as appended, C{z:<seq>:<count>}
      to a zlib-compressed JSON list of (seq, record) pairs (its lowest
      seq and how many).  Once L{COMPACT_AT} raw events are in a bucket,
      the appending node packs them into a block, together with the
      bucket's smallest block under L{BLOCK_EVENTS} (the records of a
      minute repeat queue ids, recipients, tags, metadata and reply texts,
      so a block takes about a tenth of their JSON).  The bucket's other fields:
      C{c} events, C{n} raw events, C{v} a version bumped by every change
      (pruning rewrites a bucket only if it is unchanged since read), and
      C{#y:<type>} / C{#t:<tag>} counts that let filtered queries skip
      buckets without such events;
    - C{e:buckets}: a sorted set of the bucket names scored by their
      start; C{e:maxseq} and C{e:minseq} the highest and lowest sequence
      number in each bucket (what L{claimedEvents} reads by);
    - C{e:raw}: a set of the buckets that hold raw events; those more
      than a bucket behind the newest one an append wrote to are packed
      too, however few their raw events;
    - C{e:q} and C{e:r}: hashes from queue id and from normalised
      recipient to the space-separated names of the buckets that hold
      their events.  A query reads whole buckets (those of these index
      entries when it filters by queue id or recipient, else every bucket
      in its time range) and filters and orders the events itself, in
      (time, seq) order, the order of the contract and of the cursors: a
      later bucket holds only later events, so it stops at the first
      bucket after the page is full;
    - C{events} and C{ev:*} (layout version 2: one hash of every event
      and a sorted set per index) are moved into buckets by L{start};
    - C{supp}: a hash from normalised address to the suppression entry as
      JSON, C{supp:time} the entry's time alone (for the upsert rule in Lua),
      C{supp:all} and C{supp:reason:<reason>} sorted sets with every score 0
      so that ZRANGEBYLEX lists addresses in code point (UTF-8 byte) order;
    - C{stats:<interval>:<dimension>:<key>:buckets}: a sorted set of the
      bucket starts of one counter series, and
      C{stats:<interval>:<dimension>:<key>:<bucket start>} a hash from
      counter type to count;
    - C{seenat:<type>}: a sorted set of the (queue id, recipient) pairs
      already counted as a unique open or click, scored by the time of that
      first open or click (so that L{RedisStore.pruneEvents} can drop the
      old ones); C{seen:<type>}, a plain set of such pairs, is what layout
      version 1 wrote: it is still consulted, never written, never pruned;
    - C{bucket:<key>}: a token bucket (C{tokens}, C{updated});
    - C{epoch}: a random value set once (SET NX) by the first node to
      connect to a Redis without it.  A node that reconnects and finds it
      gone or changed knows the server came back without its data (a
      restart without persistence, a new instance, a flush) and tells
      L{RedisStore.observeDataLoss}'s observers.

Every write that must be atomic (a batch of events with its counters, a
suppression upsert or removal, a token bucket take) is one Lua script,
loaded when the connection is made and run with EVALSHA (EVAL if the server
forgot it).  All commands go over one connection, written in call order, so
operations apply in the order they were called.
"""

import hashlib
import json
import math
import os
import zlib
from collections import Counter
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements, implementer

from smartrelay.events import Event
from smartrelay.store.interfaces import (
    BatchCounters,
    BatchJSON,
    ILeases,
    IMailboxes,
    IThrottles,
    checkMailboxPost,
    checkMailboxTake,
    LeaseGrant,
    MAX_THROTTLE_LEVEL,
    SlotAndTokenGrant,
    checkLeaseAndTokenArguments,
    ThrottleState,
    checkThrottleArguments,
    checkThrottleState,
    checkLeaseArguments,
    checkLeaseName,
    checkLeasePairs,
    ISMSSubmissions,
    SMSSubmission,
    normaliseSMSMessageID,
    SUPPRESSION_REASONS,
    UNIQUE_TYPES,
    EventClaim,
    EventPage,
    IEventStreams,
    IStore,
    OutboxBatch,
    StoreClosed,
    SuppressionEntry,
    SuppressionPage,
    TokenResult,
    buildStatistics,
    checkAddresses,
    checkBatches,
    checkClaim,
    checkClaimArguments,
    checkLimit,
    checkPruneArguments,
    checkReason,
    checkStatisticsArguments,
    checkStreamName,
    checkTakeArguments,
    checkTime,
    checkTokenArguments,
    claimCursor,
    claimPage,
    counterBumps,
    decodeCursor,
    decodeSuppressionCursor,
    encodeCursor,
    encodeSuppressionCursor,
    normaliseAddress,
    normalisePrefix,
    normaliseRecipient,
    prefixUpperBound,
    uniqueKey,
)

DEFAULT_PORT = 6379
DEFAULT_PREFIX = "smartrelay:"

# The data layout version this code writes; start() refuses a newer one
# and raises an older one (version 2: unique opens and clicks are recorded
# in the seenat:<type> sorted sets, which version 1 code would not see;
# version 3: events in compressed time buckets instead of one hash of
# every event and a sorted set per index, moved over by start()).
SCHEMA_VERSION = 3

# Events are kept in buckets of this many seconds of event time.
BUCKET_SECONDS = 60


class RedisConnectionFailed(Exception):
    """
    The store could not connect to (or authenticate with, or select the
    database of) its Redis server.
    """


class UnsupportedSchema(Exception):
    """
    The Redis data was written by a newer smartrelay.
    """


# -- URLs ----------------------------------------------------------------


@attrs.frozen
class RedisAddress:
    """
    Where a Redis server is and how to log in to it.

    @ivar tls: connect with TLS (C{rediss://}).
    @ivar host: host name or IP address (L{None} for a UNIX socket).
    @ivar port: TCP port (L{None} for a UNIX socket).
    @ivar path: UNIX socket path (L{None} for TCP).
    @ivar db: the database number to SELECT.
    @ivar username: ACL user name for AUTH, if any.
    @ivar password: password for AUTH, if any.
    @ivar caFile: PEM file of the certificate authority to trust for TLS
        (C{?ssl_ca_certs=PATH}); by default the system's trust store.
    """

    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    db: int = 0
    tls: bool = False
    username: Optional[str] = None
    password: Optional[str] = attrs.field(default=None, repr=False)
    caFile: Optional[str] = None

    def __str__(self) -> str:
        """
        The address without its credentials, for log lines and errors.
        """
        if self.path is not None:
            return f"unix://{self.path}?db={self.db}"
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float = 30):
        """
        A client endpoint for this address.
        """
        if self.path is not None:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls:
            from twisted.internet.ssl import Certificate, optionsForClientTLS

            trustRoot = None
            if self.caFile is not None:
                with open(self.caFile, "rb") as f:
                    trustRoot = Certificate.loadPEM(f.read())
            endpoint = wrapClientTLS(
                optionsForClientTLS(self.host, trustRoot=trustRoot), endpoint
            )
        return endpoint


def _parseDB(text: str, url: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(
            f"Redis database must be a non-negative integer, not {text!r} in {url!r}"
        )
    return int(text)


def parseRedisURL(url: str) -> RedisAddress:
    """
    Parse C{redis://[[user]:password@]host[:port][/db]},
    C{rediss://...[?ssl_ca_certs=PATH]} (TLS; the server's certificate is
    verified against the system's trust store or the given CA file) or
    C{unix://[[user]:password@]/path[?db=N]}.

    @raise ValueError: with a message that says what is wrong.
    """
    if not isinstance(url, str):
        raise ValueError(f"Redis URL must be a string, not {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"malformed Redis URL {url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"Redis URL must start with redis://, rediss:// or unix://, not {url!r}"
        )
    if parts.fragment:
        raise ValueError(f"Redis URL must not have a fragment: {url!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password == "":
        password = None
    if password is None and username is not None:
        # redis://secret@host: a lone user info is the password, as in
        # redis-cli and redis-py.
        username, password = None, username
    query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    options = dict(query)
    if len(options) != len(query):
        raise ValueError(f"Redis URL repeats a query parameter: {url!r}")
    unknown = set(options) - {"db", "ssl_ca_certs"}
    if unknown:
        raise ValueError(
            f"unknown Redis URL parameter(s) {', '.join(sorted(unknown))} in {url!r}"
        )
    db = _parseDB(options["db"], url) if "db" in options else None

    if scheme == "unix":
        host = parts.netloc.rpartition("@")[2]
        if host:
            raise ValueError(
                f"a unix:// Redis URL has no host; write unix:///path: {url!r}"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError(f"a unix:// Redis URL needs an absolute socket path: {url!r}")
        return RedisAddress(
            path=path,
            db=0 if db is None else db,
            username=username,
            password=password,
        )

    caFile = options.get("ssl_ca_certs") or None
    if caFile is not None and scheme != "rediss":
        raise ValueError(f"ssl_ca_certs needs a rediss:// (TLS) URL: {url!r}")
    if caFile is not None and not os.path.isfile(caFile):
        raise ValueError(f"ssl_ca_certs file {caFile!r} does not exist")
    if not parts.hostname:
        raise ValueError(f"Redis URL has no host: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"Redis URL has a bad port: {url!r}") from None
    if port is None:
        if parts.netloc.endswith(":"):
            raise ValueError(f"Redis URL has an empty port: {url!r}")
        port = DEFAULT_PORT
    if port == 0:
        raise ValueError(f"Redis URL port must be 1 to 65535: {url!r}")
    path = parts.path
    if path in ("", "/"):
        pathDB = None
    else:
        pathDB = _parseDB(path[1:], url)
    if pathDB is not None and db is not None and pathDB != db:
        raise ValueError(f"Redis URL gives two different databases: {url!r}")
    db = pathDB if pathDB is not None else (0 if db is None else db)
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=db,
        tls=scheme == "rediss",
        username=username,
        password=password,
        caFile=caFile,
    )


# -- Lua scripts ---------------------------------------------------------

# Scores as Redis writes them ("inf", "-inf", "+inf" included) as numbers.
_NUMBER = """
local function num(s)
  if s == '-inf' then return -math.huge end
  if s == 'inf' or s == '+inf' then return math.huge end
  return tonumber(s)
end
"""

# The buckets a query needs, oldest first, with everything in them: those
# of the queue id and / or recipient index entries when one is given, else
# every bucket in the score range; buckets whose summary says they hold no
# event of the type or tag asked for are skipped.  Stops once the buckets
# sent hold at least "want" events or "most" buckets.
#
# KEYS: bucket set, queue id index, recipient index.
# ARGV: bucket key prefix, queue id, recipient, type, tag (each "" for
#   none, else one character and the value), lowest score, highest score
#   (ZRANGEBYSCORE syntax), continue after this score ("" from the start),
#   want, most.
# Returns [score to continue after ("" when done), then per bucket: its
#   field count, its fields and values...].
# Shared by the append and migrate scripts: store one event in its bucket.
# KEYS (both scripts): sequence, bucket set, bucket max seqs, bucket min
# seqs, queue id index, recipient index, buckets with raw events.
_STORE_EVENT = _NUMBER + """
local function addIndex(hash, field, bucket)
  local old = redis.call('HGET', hash, field)
  if not old then
    redis.call('HSET', hash, field, bucket)
    return
  end
  local n, b = #old, #bucket
  if old == bucket or (n > b and string.sub(old, n - b) == ' ' .. bucket) then
    return
  end
  if not string.find(' ' .. old .. ' ', ' ' .. bucket .. ' ', 1, true) then
    redis.call('HSET', hash, field, old .. ' ' .. bucket)
  end
end
local full = {}
local newest = nil
-- What a batch does to each bucket, written once per bucket by
-- flushBuckets: events added, lowest and highest seq, type / tag counts.
local touched, order, indexed = {}, {}, {}
local function storeEvent(bp, seq, bucket, score, record, etype, tag, qid, rcpt)
  local t = touched[bucket]
  if t == nil then
    t = {score = score, n = 0, low = seq, high = seq, counts = {}}
    touched[bucket] = t
    order[#order + 1] = bucket
  end
  redis.call('HSET', bp .. bucket, 'r:' .. string.format('%016x', seq), record)
  t.n = t.n + 1
  if seq < t.low then t.low = seq end
  if seq > t.high then t.high = seq end
  local field = '#y:' .. etype
  t.counts[field] = (t.counts[field] or 0) + 1
  if tag ~= '' then
    field = '#t:' .. string.sub(tag, 2)
    t.counts[field] = (t.counts[field] or 0) + 1
  end
  if qid ~= '' and not indexed['q' .. bucket .. ' ' .. qid] then
    indexed['q' .. bucket .. ' ' .. qid] = true
    addIndex(KEYS[5], string.sub(qid, 2), bucket)
  end
  if rcpt ~= '' and not indexed['r' .. bucket .. ' ' .. rcpt] then
    indexed['r' .. bucket .. ' ' .. rcpt] = true
    addIndex(KEYS[6], string.sub(rcpt, 2), bucket)
  end
end
local function flushBuckets(bp, threshold)
  for _, bucket in ipairs(order) do
    local t = touched[bucket]
    local key = bp .. bucket
    local n = redis.call('HINCRBY', key, 'n', t.n)
    redis.call('HINCRBY', key, 'c', t.n)
    redis.call('HINCRBY', key, 'v', 1)
    for field, count in pairs(t.counts) do
      redis.call('HINCRBY', key, field, count)
    end
    redis.call('ZADD', KEYS[2], t.score, bucket)
    local top = redis.call('ZSCORE', KEYS[3], bucket)
    if not top or tonumber(top) < t.high then redis.call('ZADD', KEYS[3], t.high, bucket) end
    local bottom = redis.call('ZSCORE', KEYS[4], bucket)
    if not bottom or tonumber(bottom) > t.low then redis.call('ZADD', KEYS[4], t.low, bucket) end
    redis.call('SADD', KEYS[7], bucket)
    if n >= threshold then full[#full + 1] = bucket end
    local start = num(t.score)
    if newest == nil or start > newest then newest = start end
  end
end
-- Buckets with raw events that end more than a bucket before the newest
-- one written to: late events are no longer expected there, so their last
-- raw events are packed too, however few.
local function staleBuckets()
  local span = """ + str(BUCKET_SECONDS) + """
  if newest == nil then return end
  local listed = {}
  for _, b in ipairs(full) do listed[b] = true end
  for _, b in ipairs(redis.call('SMEMBERS', KEYS[7])) do
    if not listed[b] then
      local s = redis.call('ZSCORE', KEYS[2], b)
      if not s then
        redis.call('SREM', KEYS[7], b)
      elseif num(s) + 2 * span <= newest then
        full[#full + 1] = b
      end
    end
  end
end
"""

# Append a batch: one INCRBY for the batch's sequence numbers, each event
# stored in its bucket and indexed, counters bumped, unique opens and
# clicks counted when their (queue id, recipient) is new.
#
# ARGV: bucket key prefix, n, compaction threshold, then per event:
#   bucket, score, record, type, tag, queue id, recipient (the last three
#   "" for none, else one character and the value),
#   seen sorted set, legacy seen set, seen member ("" for none),
#   unique bump count, (hash, field, bucket set, bucket)...;
#   then bump count, (hash, field, count, bucket set, bucket)...
# Returns [last sequence number, buckets due for compaction...].
_APPEND = _STORE_EVENT + """
local bp, n, threshold = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local last = redis.call('INCRBY', KEYS[1], n)
local seq = last - n
local i = 4
for e = 1, n do
  seq = seq + 1
  storeEvent(bp, seq, ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
             ARGV[i + 4], ARGV[i + 5], ARGV[i + 6])
  i = i + 7
  local seenKey, legacyKey = ARGV[i], ARGV[i + 1]
  local seenMember, nu = ARGV[i + 2], tonumber(ARGV[i + 3])
  local etime = ARGV[i + 4]
  i = i + 5
  if seenMember ~= ''
     and redis.call('SISMEMBER', legacyKey, seenMember) == 0
     and redis.call('ZADD', seenKey, 'NX', etime, seenMember) == 1 then
    for j = 0, nu - 1 do
      local b = i + 4 * j
      redis.call('HINCRBY', ARGV[b], ARGV[b + 1], 1)
      redis.call('ZADD', ARGV[b + 2], ARGV[b + 3], ARGV[b + 3])
    end
  end
  i = i + 4 * nu
end
local nb = tonumber(ARGV[i])
i = i + 1
for j = 0, nb - 1 do
  local b = i + 5 * j
  redis.call('HINCRBY', ARGV[b], ARGV[b + 1], ARGV[b + 2])
  redis.call('ZADD', ARGV[b + 3], ARGV[b + 4], ARGV[b + 4])
end
flushBuckets(bp, threshold)
staleBuckets()
local out = {last}
for k = 1, #full do out[#out + 1] = full[k] end
return out
"""

# Move events of layout version 2 (members of the old events hash) into
# their buckets, with their own sequence numbers, and delete them from the
# old hash in the same step: nothing is lost or stored twice.
#
# KEYS: as for _APPEND, then the old events hash.
# ARGV: bucket key prefix, n, compaction threshold, then per event: old
#   member, sequence number, bucket, score, record, type, tag, queue id,
#   recipient.
# Returns the buckets due for compaction.
_MIGRATE = _STORE_EVENT + """
local bp, n, threshold = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
for e = 1, n do
  if redis.call('HDEL', KEYS[8], ARGV[i]) == 1 then
    storeEvent(bp, tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3],
               ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8])
  end
  i = i + 9
end
flushBuckets(bp, threshold)
staleBuckets()
return full
"""

_SCAN = _NUMBER + """
local bp, qid, rcpt, etype, tag = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local low, high, after = ARGV[6], ARGV[7], ARGV[8]
local want, most = tonumber(ARGV[9]), tonumber(ARGV[10])
local highOpen = string.sub(high, 1, 1) == '('
local highN = num(highOpen and string.sub(high, 2) or high)
local lowN = num(low)
local afterN = nil
if after ~= '' then afterN = num(after) end
local out = {''}
local got, sent = 0, 0
local function take(bucket)
  local key = bp .. bucket
  if etype ~= '' and not redis.call('HGET', key, '#y:' .. string.sub(etype, 2)) then
    return true
  end
  if tag ~= '' and not redis.call('HGET', key, '#t:' .. string.sub(tag, 2)) then
    return true
  end
  local flat = redis.call('HGETALL', key)
  out[#out + 1] = #flat
  for k = 1, #flat do
    out[#out + 1] = flat[k]
    if flat[k] == 'c' and k % 2 == 1 then got = got + tonumber(flat[k + 1]) end
  end
  sent = sent + 1
  return got < want and sent < most
end
if qid ~= '' or rcpt ~= '' then
  local lists = {}
  if qid ~= '' then lists[#lists + 1] = redis.call('HGET', KEYS[2], string.sub(qid, 2)) or '' end
  if rcpt ~= '' then lists[#lists + 1] = redis.call('HGET', KEYS[3], string.sub(rcpt, 2)) or '' end
  local other = nil
  if #lists == 2 then
    other = {}
    for b in string.gmatch(lists[2], '%S+') do other[b] = true end
  end
  local found = {}
  for b in string.gmatch(lists[1], '%S+') do
    if other == nil or other[b] then
      local s = redis.call('ZSCORE', KEYS[1], b)
      if s then
        local n = num(s)
        if n >= lowN and (n < highN or (not highOpen and n == highN))
           and (afterN == nil or n > afterN) then
          found[#found + 1] = {n, b, s}
        end
      end
    end
  end
  table.sort(found, function(x, y) return x[1] < y[1] end)
  for k = 1, #found do
    if not take(found[k][2]) then
      if k < #found then out[1] = found[k][3] end
      break
    end
  end
else
  local min = low
  if after ~= '' then min = '(' .. after end
  local offset = 0
  local going = true
  while going do
    local batch = redis.call('ZRANGEBYSCORE', KEYS[1], min, high, 'WITHSCORES',
                             'LIMIT', offset, 200)
    for k = 1, #batch, 2 do
      if not take(batch[k]) then
        out[1] = batch[k + 1]
        going = false
        break
      end
    end
    if #batch < 400 then break end
    offset = offset + 200
  end
end
return out
"""

# The buckets that may hold events with sequence numbers after ARGV[2] up
# to ARGV[3] (a bucket's lowest is at most the last, its highest after the
# first), with everything in them.
# KEYS: bucket max seqs, bucket min seqs.  ARGV: bucket key prefix, after,
# up to.  Returns [per bucket: field count, fields and values...].
_SEQ_SCAN = """
local bp, after, upto = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local buckets = {}
local above = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf')
local below = redis.call('ZCOUNT', KEYS[2], '-inf', ARGV[3])
if above <= below then
  for _, b in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf')) do
    local s = redis.call('ZSCORE', KEYS[2], b)
    if s and tonumber(s) <= upto then buckets[#buckets + 1] = b end
  end
else
  for _, b in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])) do
    local s = redis.call('ZSCORE', KEYS[1], b)
    if s and tonumber(s) > after then buckets[#buckets + 1] = b end
  end
end
local out = {}
for _, b in ipairs(buckets) do
  local flat = redis.call('HGETALL', bp .. b)
  out[#out + 1] = #flat
  for k = 1, #flat do out[#out + 1] = flat[k] end
end
return out
"""

# The raw (not yet packed) events of a bucket and its smallest block of
# fewer than ARGV[1] events (block fields are "z:<lowest seq>:<events>"),
# so that packing makes fewer, bigger blocks (which compress better).
# KEYS: the bucket.
# Returns [block field or "", block or "", field, record, ...].
_RAW_EVENTS = """
local flat = redis.call('HGETALL', KEYS[1])
local most = tonumber(ARGV[1])
local out = {'', ''}
local smallest = nil
for k = 1, #flat, 2 do
  local field = flat[k]
  local head = string.sub(field, 1, 2)
  if head == 'r:' then
    out[#out + 1] = field
    out[#out + 1] = flat[k + 1]
  elseif head == 'z:' then
    local count = tonumber(string.match(field, '^z:%x+:(%d+)$') or '')
    if count and count < most and (smallest == nil or count < smallest) then
      smallest = count
      out[1], out[2] = field, flat[k + 1]
    end
  end
end
return out
"""

# Replace raw events of a bucket (and the block they are merged with) by
# one compressed block, unless one of them is gone (pruned or packed by
# another node meanwhile).
# KEYS: the bucket, buckets with raw events.
# ARGV: new block field, block, merged block field ("" for none), the
#   bucket's name, the raw events' fields...
_COMPACT = """
for k = 5, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[k]) == 0 then return 0 end
end
if ARGV[3] ~= '' then
  if redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0 then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[3])
end
for first = 5, #ARGV, 500 do
  redis.call('HDEL', KEYS[1], unpack(ARGV, first, math.min(first + 499, #ARGV)))
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('HINCRBY', KEYS[1], 'n', -(#ARGV - 4)) <= 0 then
  redis.call('SREM', KEYS[2], ARGV[4])
end
redis.call('HINCRBY', KEYS[1], 'v', 1)
return 1
"""

# Prune: rewrite one bucket without its deleted events (or delete it when
# none is left), unless it changed since it was read (then -1: read it
# again), and drop it from the index entries of the queue ids and
# recipients none of whose events is left in it.
#
# KEYS: the bucket, bucket set, bucket max seqs, bucket min seqs, queue id
#   index, recipient index, buckets with raw events.
# ARGV: bucket, version read, events deleted, events left, block field,
#   block, lowest seq left, highest seq left, summary count,
#   (field, count)..., queue id count, queue ids..., recipient count,
#   recipients...
_REWRITE = """
local function removeIndex(hash, field, bucket)
  local old = redis.call('HGET', hash, field)
  if not old then return end
  local kept = {}
  for b in string.gmatch(old, '%S+') do
    if b ~= bucket then kept[#kept + 1] = b end
  end
  if #kept == 0 then
    redis.call('HDEL', hash, field)
  else
    redis.call('HSET', hash, field, table.concat(kept, ' '))
  end
end
local bucket = ARGV[1]
local version = redis.call('HGET', KEYS[1], 'v')
if version ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[7], bucket)
local left = tonumber(ARGV[4])
local i = 10
local ns = tonumber(ARGV[9])
if left > 0 then
  redis.call('HSET', KEYS[1], ARGV[5], ARGV[6], 'n', 0, 'c', left,
             'v', tonumber(version) + 1)
  for j = 0, ns - 1 do
    redis.call('HSET', KEYS[1], ARGV[i + 2 * j], ARGV[i + 2 * j + 1])
  end
  redis.call('ZADD', KEYS[3], ARGV[8], bucket)
  redis.call('ZADD', KEYS[4], ARGV[7], bucket)
else
  redis.call('ZREM', KEYS[2], bucket)
  redis.call('ZREM', KEYS[3], bucket)
  redis.call('ZREM', KEYS[4], bucket)
end
i = i + 2 * ns
local nq = tonumber(ARGV[i])
for j = 1, nq do removeIndex(KEYS[5], ARGV[i + j], bucket) end
i = i + nq + 1
local nr = tonumber(ARGV[i])
for j = 1, nr do removeIndex(KEYS[6], ARGV[i + j], bucket) end
return tonumber(ARGV[3])
"""

# Unique open / click records older than ARGV[1] (ZRANGEBYSCORE syntax),
# at most ARGV[2] of them.  KEYS: the seen sorted sets.
_PRUNE_SEEN = """
local budget = tonumber(ARGV[2])
local deleted = 0
for k = 1, #KEYS do
  if budget <= 0 then break end
  local old = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[1],
                         'LIMIT', 0, budget)
  for first = 1, #old, 500 do
    local last = math.min(first + 499, #old)
    deleted = deleted + redis.call('ZREM', KEYS[k], unpack(old, first, last))
  end
  budget = budget - #old
end
return deleted
"""


# Upsert a suppression entry unless the stored one is newer.
# KEYS: entries, times, all addresses, the four reason sets.
# ARGV: address, time, entry, index in KEYS of the new reason's set.
_ADD_SUPPRESSION = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old and tonumber(old) > tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
for k = 4, #KEYS do
  redis.call('ZREM', KEYS[k], ARGV[1])
end
redis.call('ZADD', KEYS[tonumber(ARGV[4])], 0, ARGV[1])
return 1
"""

# KEYS: as for _ADD_SUPPRESSION; ARGV: address.
_REMOVE_SUPPRESSION = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
for k = 3, #KEYS do
  redis.call('ZREM', KEYS[k], ARGV[1])
end
return removed
"""

# KEYS: address set (all or one reason), entries.
# ARGV: min, max (ZRANGEBYLEX syntax), limit + 1.
# Returns [address, entry, address, entry, ...] as JSON.
_LIST_SUPPRESSIONS = """
local addresses = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2],
                             'LIMIT', 0, tonumber(ARGV[3]))
if #addresses == 0 then return '[]' end
local entries = redis.call('HMGET', KEYS[2], unpack(addresses))
local out = {}
for i = 1, #addresses do
  out[#out + 1] = addresses[i]
  out[#out + 1] = entries[i]
end
return cjson.encode(out)
"""

# KEYS: a series' bucket set.  ARGV: the series' hash prefix, min, max.
# Returns bucket, {type, count, ...}, bucket, ...
_STATISTICS = """
local buckets = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], ARGV[3])
local out = {}
for i = 1, #buckets do
  out[#out + 1] = buckets[i]
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. buckets[i])
end
return out
"""

# The token bucket arithmetic of interfaces.takeFromBucket, operation for
# operation in IEEE doubles, so that both back ends answer alike.  Numbers
# travel as shortest round-trip (Python) and %.17g (Lua) text: exact.
#
# KEYS: the bucket.  ARGV: rate, burst, now, count.
# Returns allowed (0/1), remaining, retry after.
_TAKE_TOKENS = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated
if not state[1] or not state[2] then
  tokens, updated = burst, now
else
  tokens, updated = tonumber(state[1]), tonumber(state[2])
  if now > updated then
    tokens = tokens + (now - updated) * rate
    updated = now
  end
  if burst < tokens then
    tokens = burst
  end
end
local allowed, wait = 0, 0.0
if tokens >= count then
  tokens = tokens - count
  allowed = 1
else
  local ahead = updated - now
  if ahead < 0 then ahead = 0.0 end
  wait = (count - tokens) / rate + ahead
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'updated', string.format('%.17g', updated))
-- Once it has had time to fill up (counted in the caller's clock, plus the
-- time its last update lies ahead) an idle bucket equals a new one: let
-- Redis forget it a minute after that.
local idle = burst / rate + math.max(0, updated - now)
if idle < 2592000 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(idle * 1000) + 60000)
else
  redis.call('PERSIST', KEYS[1])
end
return {allowed, string.format('%.17g', tokens), string.format('%.17g', wait)}
"""

# -- event streams and outboxes (IEventStreams) --------------------------
#
# A stream is a hash: "cursor" (the last sequence number claimed) and
# "claim:<owner>" ("after,last,time" of that owner's open claim).  An
# outbox is a hash from batch id to [body, created] (JSON), a sorted set of
# the ids scored by due time and a hash of attempts.

# KEYS: stream, event sequence.  ARGV: owner, now, limit ("" for none),
# begin.  Returns the claim as "after,last,time", or nil.
_CLAIM_EVENTS = """
local field = 'claim:' .. ARGV[1]
local open = redis.call('HGET', KEYS[1], field)
if open then return open end
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
local cursor = redis.call('HGET', KEYS[1], 'cursor')
if cursor then
  cursor = tonumber(cursor)
else
  if ARGV[4] == 'newest' then cursor = top else cursor = 0 end
  redis.call('HSET', KEYS[1], 'cursor', string.format('%d', cursor))
end
if top <= cursor then return false end
local last = top
if ARGV[3] ~= '' then last = math.min(top, cursor + tonumber(ARGV[3])) end
local claim = string.format('%d,%d,', cursor, last) .. ARGV[2]
redis.call('HSET', KEYS[1], field, claim, 'cursor', string.format('%d', last))
return claim
"""

# KEYS: stream.  ARGV: field, claim.  Returns 1 if it was the open claim.
_FINISH_CLAIM = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# KEYS: batches, due set, stream.  ARGV: claim field, claim ("" for none),
# n, then per batch: id, record, due, attempts.
_OUTBOX_ADD = """
local n = tonumber(ARGV[3])
local attempts = KEYS[2] .. ':attempts'
for b = 0, n - 1 do
  local i = 4 + 4 * b
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
    redis.call('HSET', attempts, ARGV[i], ARGV[i + 3])
  end
end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[3], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return n
"""

# KEYS: batches, due set, attempts.  ARGV: now, new due, limit.
# Returns [id, record, attempts, ...] as JSON.
_OUTBOX_TAKE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1],
                       'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i = 1, #ids do
  redis.call('ZADD', KEYS[2], ARGV[2], ids[i])
  out[#out + 1] = ids[i]
  out[#out + 1] = redis.call('HGET', KEYS[1], ids[i])
  out[#out + 1] = redis.call('HGET', KEYS[3], ids[i]) or '0'
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""

# KEYS: due set, attempts.  ARGV: id, due.
_OUTBOX_DEFER = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return 1
"""

# KEYS: batches, due set, attempts.  ARGV: id.
_OUTBOX_REMOVE = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# SMS submissions (issue 15).  KEYS: the id hash, the time index, the
# recipient's index; an id moving to another recipient leaves the old
# one's index (named in the old record).
_SMS_ADD = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  redis.call('ZREM', cjson.decode(old)['rkey'], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""

_SMS_PRUNE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  local old = redis.call('HGET', KEYS[1], id)
  if old then
    redis.call('ZREM', cjson.decode(old)['rkey'], id)
  end
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
return #ids
"""

_SCRIPTS = {
    "smsAdd": _SMS_ADD,
    "smsPrune": _SMS_PRUNE,
    "claimEvents": _CLAIM_EVENTS,
    "finishClaim": _FINISH_CLAIM,
    "outboxAdd": _OUTBOX_ADD,
    "outboxTake": _OUTBOX_TAKE,
    "outboxDefer": _OUTBOX_DEFER,
    "outboxRemove": _OUTBOX_REMOVE,
    "append": _APPEND,
    "migrate": _MIGRATE,
    "scan": _SCAN,
    "seqScan": _SEQ_SCAN,
    "rawEvents": _RAW_EVENTS,
    "compact": _COMPACT,
    "rewrite": _REWRITE,
    "pruneSeen": _PRUNE_SEEN,
    "addSuppression": _ADD_SUPPRESSION,
    "removeSuppression": _REMOVE_SUPPRESSION,
    "listSuppressions": _LIST_SUPPRESSIONS,
    "statistics": _STATISTICS,
    "takeTokens": _TAKE_TOKENS,
}


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode("utf-8")).hexdigest()


# The reason sets' order in the suppression scripts' KEYS (after 3 others).
_REASONS = sorted(SUPPRESSION_REASONS)

_SHAS = {name: _sha1(script) for name, script in _SCRIPTS.items()}

# A bucket's raw events are packed into one compressed block once this many
# have been appended to it (or once it is two buckets behind the newest one
# written to).
COMPACT_AT = 64

# Raw events are packed together with the smallest block of the bucket that
# holds fewer than this many events (bigger blocks compress better).
BLOCK_EVENTS = 128

# How often one pruneEvents call reads a bucket again that changed between
# its read and its rewrite.
_PRUNE_RETRIES = 10

# Old events moved per migration script call.
_MIGRATE_CHUNK = 500

# Buckets sent per scan script call.
_SCAN_BUCKETS = 20


# -- encoding ------------------------------------------------------------


def _txredisapi():
    """
    txredisapi, imported when first needed: importing it installs the
    global reactor, which library code must not do at import time.
    """
    import txredisapi

    return txredisapi


_protocolClass = None


def _fastProtocol():
    """
    txredisapi's C{BaseRedisProtocol}, cheaper per command:

      - after each bulk string followed by more data in the same read
        (every reply of more than one string, and pipelined replies),
        txredisapi pauses the transport and handles the rest in a
        C{callLater(0)}: two C{epoll_ctl} calls, a timed call and a reactor
        iteration per string.  Here the rest is handled in a loop in the
        same C{dataReceived} (no recursion, the order kept);
      - the command encoder builds one bytes template per argument instead
        of a bytearray token by token (the store's arguments are short,
        most already text or bytes).
    """
    global _protocolClass
    if _protocolClass is None:
        base = _txredisapi().BaseRedisProtocol

        class FastRedisProtocol(base):
            _extra = None

            def setLineMode(self, extra=b""):
                self.line_mode = 1
                if extra:
                    self._extra = extra

            def dataReceived(self, data, unpause=False):
                why = base.dataReceived(self, data, unpause)
                while self._extra is not None:
                    extra, self._extra = self._extra, None
                    if why or (self.transport is not None and self.transport.disconnecting):
                        break
                    why = base.dataReceived(self, extra)
                return why

            def _build_command(self, *args, **kwargs):
                parts = [b"*%d\r\n" % len(args)]
                append = parts.append
                for arg in args:
                    if type(arg) is bytes:
                        pass
                    elif type(arg) is str:
                        arg = arg.encode("utf-8")
                    else:
                        arg = self._encode_value(arg)
                    append(b"$%d\r\n%s\r\n" % (len(arg), arg))
                return b"".join(parts)

        _protocolClass = FastRedisProtocol
    return _protocolClass


def _number(value: float) -> str:
    """
    A float as text that Redis and Lua read back bit for bit.
    """
    return repr(float(value))


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _eventTime(event: Event) -> float:
    time = event.time
    if isinstance(time, bool) or not isinstance(time, (int, float)):
        raise ValueError(f"event time must be POSIX seconds, not {time!r}")
    if math.isnan(time):
        raise ValueError("event time must not be NaN")
    return time


def _record(event: Event) -> str:
    return json.dumps(
        [
            event.id,
            event.time,
            event.type,
            event.queue_id,
            event.recipient,
            event.tag,
            event.metadata,
            event.detail,
        ]
    )


def _globEscape(text: str) -> str:
    """
    C{text} matched literally by a Redis glob pattern.
    """
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _present(value) -> str:
    """
    An optional script argument: "" for L{None}, else "=" and the value
    (so that an empty string is not taken for none).
    """
    return "" if value is None else "=" + str(value)


def _bucketOf(time: float) -> tuple[str, float]:
    """
    The bucket of an event time: its name and its score, the start of its
    L{BUCKET_SECONDS} (the time itself when it is infinite).  A later
    bucket holds only later events.
    """
    if math.isfinite(time):
        start = float(math.floor(time / BUCKET_SECONDS) * BUCKET_SECONDS)
    else:
        start = float(time)
    return _number(start), start


def _recordCached(event: Event, encode: BatchJSON) -> str:
    """
    L{_record}'s text, with the batch's C{metadata} and C{detail} JSON from
    C{encode} (each shared dict encoded once).
    """
    head = json.dumps(
        [event.id, event.time, event.type, event.queue_id, event.recipient, event.tag]
    )
    return "%s, %s, %s]" % (head[:-1], encode(event.metadata), encode(event.detail))


def _eventArgs(event: Event, time: float, encode: Optional[BatchJSON] = None) -> list[str]:
    bucket, start = _bucketOf(time)
    return [
        bucket,
        _number(start),
        _record(event) if encode is None else _recordCached(event, encode),
        str(event.type),
        _present(event.tag),
        _present(event.queue_id),
        _present(normaliseRecipient(event.recipient)),
    ]


def _blockField(rows: list) -> str:
    """
    The field of a block of (seq, record) pairs sorted by seq: its lowest
    seq and how many events it holds.
    """
    return "z:%016x:%d" % (rows[0][0], len(rows))


def _blockText(rows: list) -> str:
    """
    The JSON list of a block: one list per (sequence number, record) pair,
    the seq followed by the record's items (as L{_record} wrote them).
    """
    return "[" + ",".join("[%d,%s" % (seq, record[1:]) for seq, record in rows) + "]"


def _packBlock(rows: list) -> bytes:
    """
    A compressed block of (sequence number, record) pairs.
    """
    return zlib.compress(_blockText(rows).encode("utf-8"), 6)


def _buckets(flat: list) -> list[dict]:
    """
    The buckets of a scan script's reply (per bucket: its field count, its
    fields and values) as dicts from field name to value.
    """
    buckets, i = [], 0
    while i < len(flat):
        n = int(flat[i])
        fields = flat[i + 1 : i + 1 + n]
        i += 1 + n
        buckets.append({_text(f): v for f, v in zip(fields[0::2], fields[1::2])})
    return buckets


def _rows(fields: dict, needle: Optional[bytes] = None) -> list:
    """
    The events of one bucket as (sequence number, row) pairs, in no
    particular order; a row is the record's list with its time a float.

    @param needle: if given, records and blocks whose JSON does not
        contain it are not decoded (their events are left out): a cheap
        first filter, for a value whose JSON text every matching record
        holds.
    """
    rows = []
    for field, value in fields.items():
        if field.startswith("r:"):
            if needle is not None and needle not in value:
                continue
            row = json.loads(value)
            row[1] = float(row[1])
            rows.append((int(field[2:], 16), row))
        elif field.startswith("z:"):
            text = zlib.decompress(value)
            if needle is not None and needle not in text:
                continue
            for item in json.loads(text):
                row = item[1:]
                row[1] = float(row[1])
                rows.append((item[0], row))
    return rows


def _fromRow(row: list) -> Event:
    id, time, type, queue_id, recipient, tag, metadata, detail = row
    return Event(
        type=type,
        queue_id=queue_id,
        recipient=recipient,
        # Like the SQLite back end's REAL column: always a float.
        time=float(time),
        tag=tag,
        metadata=metadata,
        detail=detail,
        id=id,
    )


def _rewriteArgs(bucket: str, version: str, gone: list, kept: list) -> list:
    """
    The arguments of the rewrite script for a bucket that loses the events
    C{gone} and keeps C{kept} (both lists of (time, seq, row)).
    """
    summary: Counter = Counter()
    for _, _, row in kept:
        summary["#y:" + str(row[2])] += 1
        if row[5] is not None:
            summary["#t:" + str(row[5])] += 1
    block, blockField, low, high = b"", "", "0", "0"
    if kept:
        seqs = sorted(seq for _, seq, _ in kept)
        rows = sorted((seq, json.dumps(row)) for _, seq, row in kept)
        block, blockField = _packBlock(rows), _blockField(rows)
        low, high = str(seqs[0]), str(seqs[-1])
    queues = {row[3] for _, _, row in gone if row[3] is not None} - {
        row[3] for _, _, row in kept
    }
    recipients = {
        normaliseRecipient(row[4]) for _, _, row in gone if row[4] is not None
    } - {normaliseRecipient(row[4]) for _, _, row in kept}
    args = [bucket, version, str(len(gone)), str(len(kept)), blockField, block, low, high]
    args.append(str(len(summary)))
    for field, count in sorted(summary.items()):
        args += [field, str(count)]
    args += [str(len(queues)), *sorted(map(str, queues))]
    args += [str(len(recipients)), *sorted(map(str, recipients))]
    return args


def _fromRecord(record: bytes) -> Event:
    id, time, type, queue_id, recipient, tag, metadata, detail = json.loads(record)
    return Event(
        type=type,
        queue_id=queue_id,
        recipient=recipient,
        # Like the SQLite back end's REAL column: always a float.
        time=float(time),
        tag=tag,
        metadata=metadata,
        detail=detail,
        id=id,
    )


def _entryJSON(entry: SuppressionEntry) -> str:
    return json.dumps([entry.reason, entry.source_event, entry.time, entry.expires])


def _entryFromJSON(address: str, value: bytes) -> SuppressionEntry:
    reason, source_event, time, expires = json.loads(value)
    return SuppressionEntry(
        address=address,
        reason=reason,
        source_event=source_event,
        time=time,
        expires=expires,
    )


def _pairs(flat: list) -> list[tuple]:
    return list(zip(flat[0::2], flat[1::2]))


# -- the store -----------------------------------------------------------


@implementer(IStreamClientEndpoint)
@attrs.frozen(repr=False)
class _WatchedEndpoint:
    """
    A client endpoint that tells C{failed(failure)} about each connection
    attempt that fails, before the L{ClientService} that made it hears of
    it.
    """

    endpoint: Any
    failed: Callable[[Failure], None]

    def __repr__(self) -> str:
        # ClientService names the endpoint in its retry log lines.
        return repr(self.endpoint)

    def connect(self, factory: Any) -> Deferred:
        def attemptFailed(failure: Failure) -> Failure:
            self.failed(failure)
            return failure

        return self.endpoint.connect(factory).addErrback(attemptFailed)


@implementer(IStore, IEventStreams, ISMSSubmissions)
@attrs.define
class RedisStore:
    """
    An L{IStore} on a Redis server, through one txredisapi connection kept
    up by a L{ClientService}.

    @ivar address: where the server is.
    @ivar _reactor: provides C{IReactorTCP} (or C{IReactorUNIX}),
        C{IReactorTime}.
    @ivar prefix: the start of every key the store uses.
    @ivar connectTimeout: seconds a connection attempt may take.
    @ivar replyTimeout: seconds to wait for a reply before dropping the
        connection (and failing what waits on it), or L{None} for ever.

    While the server cannot be reached, an operation fails at once with
    L{RedisConnectionFailed} once a connection attempt has failed, rather
    than each waiting for the next attempt, which the back-off puts up to a
    minute away: callers (the event log's journal, the suppression
    replica, the 1/N limits) then do without the store straight away.  An
    operation issued between the loss of a connection and the first failed
    attempt waits for that attempt (a second or so).
    """

    address: RedisAddress
    _reactor: Any = attrs.field(alias="reactor")
    prefix: str = DEFAULT_PREFIX
    connectTimeout: float = 30
    replyTimeout: Optional[float] = 30
    _service: Optional[ClientService] = attrs.field(default=None, init=False)
    #: Why the last connection attempt failed, until one connects again.
    _unreachable: Optional[Failure] = attrs.field(default=None, init=False)
    #: The server's C{epoch} as this store last saw it (None: never).
    _epoch: Optional[bytes] = attrs.field(default=None, init=False)
    _dataLossObservers: list = attrs.field(factory=list, init=False)
    _started: bool = attrs.field(default=False, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _closing: Optional[Deferred] = attrs.field(default=None, init=False)
    _pending: set = attrs.field(factory=set, init=False)
    #: The last connection handed out (used directly while it is up).
    _protocol: Any = attrs.field(default=None, init=False)

    log = Logger()

    @classmethod
    def fromURL(cls, url: str, reactor: Any, **kwargs) -> "RedisStore":
        """
        A store for the server at C{url} (see L{parseRedisURL}).

        @raise ValueError: for a bad URL.
        """
        return cls(parseRedisURL(url), reactor, **kwargs)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- connection ------------------------------------------------------

    def _factory(self) -> Factory:
        reactor = self._reactor
        replyTimeout = self.replyTimeout

        protocolClass = _fastProtocol()

        def build():
            protocol = protocolClass(
                charset=None, convertNumbers=False, replyTimeout=replyTimeout
            )
            # txredisapi takes the global reactor for this; use ours.
            protocol.callLater = reactor.callLater
            return protocol

        return Factory.forProtocol(build)

    def _prepare(self, protocol) -> Deferred:
        """
        Log in, select the database and load the scripts before the
        connection is handed out.
        """
        commands = []
        if self.address.password is not None:
            if self.address.username is not None:
                commands.append(("AUTH", self.address.username, self.address.password))
            else:
                commands.append(("AUTH", self.address.password))
        if self.address.db:
            commands.append(("SELECT", str(self.address.db)))
        for script in _SCRIPTS.values():
            commands.append(("SCRIPT", "LOAD", script))
        epoch = self._key("epoch")
        commands.append(("SET", epoch, os.urandom(16).hex(), "NX"))
        commands.append(("GET", epoch))
        # Pipelined: one round trip; the first failure fails the lot.
        ds = [protocol.execute_command(*command) for command in commands]
        d = DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)

        def ready(results):
            self._unreachable = None
            self._protocol = protocol
            found = results[-1][1]
            known, self._epoch = self._epoch, found
            if known is not None and found != known:
                # Written before anything else on this connection.
                protocol.execute_command(
                    "SET", self._key("schema"), str(SCHEMA_VERSION), "NX"
                ).addErrback(
                    lambda f: self.log.failure("could not set the schema key again", f)
                )
                self._dataLost()
            return protocol

        def failed(failure):
            self._unreachable = failure.value.subFailure
            # ClientService treats a failed preparation as a failed attempt
            # but leaves the connection open, and its state machine has no
            # transition for that connection's loss once it is waiting to
            # retry: close the connection without telling it.
            if hasattr(protocol, "_lostNotification"):
                protocol._lostNotification = lambda reason: None
            protocol.transport.loseConnection()
            return failure.value.subFailure

        return d.addCallbacks(ready, failed)

    def start(self) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        if self._service is not None:
            return self._connected().addCallback(lambda protocol: None)
        self._unreachable = None
        self._service = ClientService(
            _WatchedEndpoint(
                self.address.endpoint(self._reactor, self.connectTimeout),
                self._attemptFailed,
            ),
            self._factory(),
            retryPolicy=backoffPolicy(),
            clock=self._reactor,
            prepareConnection=self._prepare,
        )
        self._service.startService()
        d = self._service.whenConnected(failAfterFailures=1)

        def cannotConnect(failure):
            service, self._service = self._service, None
            # Not from inside the service's own failure notification.
            stopped = deferLater(self._reactor, 0, service.stopService)
            reason = failure.getErrorMessage() or failure.type.__name__
            error = RedisConnectionFailed(
                f"cannot connect to the Redis event store at {self.address}: {reason}"
            )
            return stopped.addBoth(lambda _: Failure(error))

        def connected(protocol):
            return self._checkSchema(protocol)

        d.addCallbacks(connected, cannotConnect)
        return self._track(d)

    def _checkSchema(self, protocol) -> Deferred:
        key = self._key("schema")
        d = protocol.execute_command("SET", key, str(SCHEMA_VERSION), "NX")
        d.addCallback(lambda _: protocol.execute_command("GET", key))

        def check(found):
            version = int(found)
            if version > SCHEMA_VERSION:
                raise UnsupportedSchema(
                    f"Redis event store data under {self.prefix!r} has version"
                    f" {version}, newer than the newest this smartrelay knows"
                    f" ({SCHEMA_VERSION})"
                )
            # Mark older data upgraded first, so that older code, which
            # would not see the new layout, refuses it from now on; then
            # move the events of layout 1 and 2 into buckets (also when a
            # start that was doing so stopped halfway, or an old node kept
            # writing).  Version 1's unique open and click records are
            # still read where they are.
            d = succeed(None)
            if version < SCHEMA_VERSION:
                d = protocol.execute_command("SET", key, str(SCHEMA_VERSION))
            d.addCallback(lambda _: Deferred.fromCoroutine(self._migrate(protocol)))
            return d.addCallback(lambda _: announce())

        def announce():
            if not self._started:
                self._started = True
                self.log.info(
                    "Connected to the Redis event store {address} (prefix {prefix})",
                    address=str(self.address),
                    prefix=self.prefix,
                )

        return d.addCallback(check)

    async def _migrate(self, protocol) -> None:
        """
        Move the events of layout version 2 (one hash of every event, a
        sorted set per index) into buckets, a chunk per script so that each
        event is moved exactly once whatever happens in between, then
        delete the old indexes.
        """
        events = self._key("events")
        if not int(await protocol.execute_command("EXISTS", events)):
            return
        keys = [*self._eventKeys(), events]
        moved = 0
        while int(await protocol.execute_command("EXISTS", events)):
            cursor = "0"
            while True:
                cursor, flat = await protocol.execute_command(
                    "HSCAN", events, cursor, "COUNT", str(_MIGRATE_CHUNK)
                )
                cursor = _text(cursor)
                pairs = _pairs(flat)
                if pairs:
                    args = [self._bucketPrefix(), str(len(pairs)), str(COMPACT_AT)]
                    for member, record in pairs:
                        member = _text(member)
                        event = _fromRecord(record)
                        args += [member, str(int(member, 16))]
                        args += _eventArgs(event, event.time)
                    full = await self._script(protocol, "migrate", keys, args)
                    await self._compact(protocol, full)
                    moved += len(pairs)
                if cursor == "0":
                    break
        pattern = _globEscape(self.prefix) + "ev:*"
        cursor = "0"
        while True:
            cursor, found = await protocol.execute_command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", "1000"
            )
            cursor = _text(cursor)
            if found:
                await protocol.execute_command("DEL", *found)
            if cursor == "0":
                break
        self.log.info(
            "Moved {count} events of the Redis event store under {prefix} to"
            " layout version {version}",
            count=moved,
            prefix=self.prefix,
            version=SCHEMA_VERSION,
        )

    def _connected(self) -> Deferred:
        """
        The connection, now if there is one (so that commands are written
        in call order), else after the next connection attempt.
        """
        if self._service is None:
            return fail(StoreClosed("the event store is not started"))
        if self._unreachable is not None:
            reason = self._unreachable.getErrorMessage() or self._unreachable.type.__name__
            return fail(
                RedisConnectionFailed(
                    f"the Redis event store at {self.address} cannot be reached: {reason}"
                )
            )
        return self._service.whenConnected(failAfterFailures=1)

    def observeDataLoss(self, observer: Callable[[], None]) -> None:
        """
        Call C{observer()} whenever the store reconnects to a server that
        has lost its data (see C{epoch} in the module docstring), before
        any operation runs on that connection.
        """
        self._dataLossObservers.append(observer)

    def _dataLost(self) -> None:
        self.log.error(
            "the Redis event store {address} came back without its data (prefix"
            " {prefix}): the events, statistics, suppressions and limits written"
            " before are gone from it",
            address=str(self.address),
            prefix=self.prefix,
        )
        for observer in self._dataLossObservers:
            try:
                observer()
            except Exception:
                self.log.failure("a data loss observer failed")

    def _attemptFailed(self, failure: Failure) -> None:
        """
        A connection attempt failed: fail operations at once until one
        connects (see the class docstring).
        """
        self._unreachable = failure

    def _track(self, d: Deferred) -> Deferred:
        """
        Remember C{d} until it has its result, so that C{close} can wait for
        it.
        """
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            return result

        return d.addBoth(done)

    def _do(self, operation, *args) -> Deferred:
        """
        Run C{operation(protocol, *args)} on the connection.
        """
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        protocol = self._protocol
        if (
            protocol is not None
            and protocol.connected
            and self._service is not None
            and self._unreachable is None
        ):
            # The connection is up: what whenConnected would hand out now,
            # without its state machine and a Deferred per operation.
            try:
                d = operation(protocol, *args)
            except Exception:
                d = fail()
            else:
                if not isinstance(d, Deferred):
                    d = succeed(d)
            return self._track(d)
        d = self._connected()
        d.addCallback(lambda protocol: operation(protocol, *args))
        return self._track(d)

    def _command(self, *args) -> Deferred:
        return self._do(lambda protocol: protocol.execute_command(*args))

    def _script(self, protocol, name: str, keys: list, args: list) -> Deferred:
        numbers = [str(len(keys))]
        d = protocol.execute_command("EVALSHA", _SHA_BYTES[name], *numbers, *keys, *args)

        def noScript(failure):
            # Scripts are loaded on every (re)connection, so this happens
            # only after a SCRIPT FLUSH; the EVAL then runs after commands
            # sent meanwhile.
            failure.trap(_txredisapi().ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            self.log.warn("Redis forgot script {name}; sending it again", name=name)
            return protocol.execute_command(
                "EVAL", _SCRIPTS[name], *numbers, *keys, *args
            )

        return d.addErrback(noScript)

    def close(self) -> Deferred:
        if self._closing is None:
            # From now on every operation fails with StoreClosed; those
            # already issued finish before the connection is closed.
            self._closed = True
            d = DeferredList(list(self._pending))
            d.addCallback(lambda _: self._stopService())
            d.addErrback(
                lambda failure: self.log.failure(
                    "Closing the Redis event store failed", failure
                )
            )
            self._closing = d
        waiter = Deferred()

        def fire(result):
            waiter.callback(None)
            return result

        self._closing.addBoth(fire)
        return waiter

    def _stopService(self) -> Optional[Deferred]:
        service, self._service = self._service, None
        if service is None:
            return None
        return service.stopService()

    # -- events ----------------------------------------------------------

    def _eventKeys(self) -> list[str]:
        return [
            self._key("seq"),
            self._key("e", "buckets"),
            self._key("e", "maxseq"),
            self._key("e", "minseq"),
            self._key("e", "q"),
            self._key("e", "r"),
            self._key("e", "raw"),
        ]

    def _bucketPrefix(self) -> str:
        return self._key("e", "b", "")

    def _series(self, interval: str, dim: str, key: str) -> str:
        return self._key("stats", interval, dim, key)

    def _bump(self, bump: tuple) -> tuple[str, str, str, str]:
        interval, bucket, dim, key, type = bump
        series = self._series(interval, dim, key)
        return (series + ":" + str(bucket), type, series + ":buckets", str(bucket))

    def appendEvents(self, events: list[Event]) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        # Encode everything before sending anything: a batch that cannot be
        # encoded fails as a whole, and the batch is a snapshot.
        try:
            args = self._encodeBatch(list(events))
        except Exception:
            return fail()
        if args is None:
            return self._do(lambda protocol: None)

        def append(protocol):
            d = self._script(protocol, "append", self._eventKeys(), args)
            # The batch is stored once the script has run; compaction
            # afterwards is housekeeping whose failure loses nothing.
            d.addCallback(lambda reply: self._compact(protocol, reply[1:]))
            return d

        return self._do(append).addCallback(lambda _: None)

    def _encodeBatch(self, events: list[Event]) -> Optional[list[str]]:
        if not events:
            return None
        args = [self._bucketPrefix(), str(len(events)), str(COMPACT_AT)]
        encode = BatchJSON()
        counters = BatchCounters()
        for event in events:
            time = _eventTime(event)
            args += _eventArgs(event, time, encode)
            counters.add(event)
            unique = uniqueKey(event)
            if unique is None:
                args += ["", "", "", "0", ""]
            else:
                queue_id, recipient, type = unique
                uniqueBumps = counterBumps(event, [UNIQUE_TYPES[type]])
                args += [
                    self._key("seenat", type),
                    self._key("seen", type),
                    json.dumps([queue_id, recipient]),
                    str(len(uniqueBumps)),
                    _number(time),
                ]
                for bump in uniqueBumps:
                    args += self._bump(bump)
        bumps = counters.total()
        args.append(str(len(bumps)))
        for bump, count in bumps.items():
            hashKey, type, zset, bucket = self._bump(bump)
            args += [hashKey, type, str(count), zset, bucket]
        # Refuse what cannot be sent (text that is not UTF-8) now, not
        # halfway through writing the command.
        for arg in args:
            arg.encode("utf-8")
        return args

    def _compact(self, protocol, buckets) -> Deferred:
        """
        Pack the raw events of each bucket in C{buckets} into one
        compressed block.  Failures are logged, not passed on: the events
        are stored either way, and the next append that fills the bucket
        tries again.
        """

        async def compact():
            for bucket in dict.fromkeys(_text(b) for b in buckets):
                key = self._bucketPrefix() + bucket
                reply = await self._script(
                    protocol, "rawEvents", [key], [str(BLOCK_EVENTS)]
                )
                merged, block, flat = _text(reply[0]), reply[1], reply[2:]
                fields, rows = [], []
                for field, record in _pairs(flat):
                    field = _text(field)
                    fields.append(field)
                    rows.append((int(field[2:], 16), _text(record)))
                if not rows:
                    if bucket:
                        await protocol.execute_command(
                            "SREM", self._key("e", "raw"), bucket
                        )
                    continue
                rows.sort()
                text = _blockText(rows)
                low, count = rows[0][0], len(rows)
                if merged:
                    # The block's JSON list and the raw events' joined as
                    # text, not decoded and encoded again; a block's
                    # events need not be in seq order.
                    _, first, size = merged.split(":")
                    old = zlib.decompress(block).decode("utf-8")
                    text = old[:-1] + "," + text[1:]
                    low, count = min(low, int(first, 16)), count + int(size)
                await self._script(
                    protocol,
                    "compact",
                    [key, self._key("e", "raw")],
                    [
                        "z:%016x:%d" % (low, count),
                        zlib.compress(text.encode("utf-8"), 6),
                        merged,
                        bucket,
                        *fields,
                    ],
                )

        def failed(failure):
            self.log.failure("Compacting Redis event buckets failed", failure)

        return Deferred.fromCoroutine(compact()).addErrback(failed)

    async def _gather(self, protocol, *, queue_id=None, recipient=None, type=None,
                      tag=None, low="-inf", high="+inf", accept, want) -> list:
        """
        The events of the buckets a query needs that C{accept(seq, row)}
        takes, as C{(time, seq, row)} sorted: bucket by bucket, oldest
        first, until C{want} are found (every later bucket holds only later
        events) or no bucket is left.
        """
        found = []
        after = ""
        # Every record of the queue id holds it as _record's json.dumps
        # wrote it, every record of the recipient its local part and "@"
        # (the domain may differ in case): blocks without that text are not
        # decoded.
        needle = None
        if queue_id is not None:
            needle = json.dumps(queue_id).encode("utf-8")
        elif recipient is not None and "@" in recipient:
            local = recipient.rpartition("@")[0]
            needle = json.dumps(local + "@")[:-1].encode("utf-8")
        while True:
            reply = await self._script(
                protocol,
                "scan",
                self._eventKeys()[1:2] + self._eventKeys()[4:6],
                [
                    self._bucketPrefix(),
                    _present(queue_id),
                    _present(normaliseRecipient(recipient)),
                    _present(type),
                    _present(tag),
                    low,
                    high,
                    after,
                    str(max(want - len(found), 1)),
                    str(_SCAN_BUCKETS),
                ],
            )
            after = _text(reply[0])
            for fields in _buckets(reply[1:]):
                for seq, row in _rows(fields, needle):
                    if accept(seq, row):
                        found.append((row[1], seq, row))
            if len(found) >= want or not after:
                break
        found.sort(key=lambda item: (item[0], item[1]))
        return found

    def eventsForMessage(self, queue_id: str) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        if queue_id is None:
            return self._do(lambda protocol: [])
        try:
            queue_id = str(queue_id)
            queue_id.encode("utf-8")
        except Exception:
            return fail()

        def read(protocol):
            return Deferred.fromCoroutine(
                self._gather(
                    protocol,
                    queue_id=queue_id,
                    accept=lambda seq, row: row[3] == queue_id,
                    want=2**53,
                )
            )

        d = self._do(read)
        return d.addCallback(lambda rows: [_fromRow(row) for _, _, row in rows])

    def queryEvents(
        self,
        *,
        type: Optional[str] = None,
        queue_id: Optional[str] = None,
        recipient: Optional[str] = None,
        tag: Optional[str] = None,
        since: Optional[float] = None,
        until: Optional[float] = None,
        cursor: Optional[str] = None,
        limit: int = 100,
    ) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            limit = checkLimit(limit)
            since = checkTime("since", since)
            until = checkTime("until", until)
            after = None if cursor is None else decodeCursor(cursor)
            wanted = normaliseRecipient(recipient)
            for value in (type, queue_id, wanted, tag):
                if value is not None:
                    str(value).encode("utf-8")
        except Exception:
            return fail()
        low = "-inf" if since is None else _number(_bucketOf(since)[1])
        if after is not None and (since is None or after[0] >= since):
            low = _number(_bucketOf(after[0])[1])
        high = "+inf" if until is None else "(" + _number(until)

        def accept(seq, row):
            time = row[1]
            if since is not None and time < since:
                return False
            if until is not None and time >= until:
                return False
            if after is not None and (time, seq) <= after:
                return False
            if type is not None and row[2] != type:
                return False
            if queue_id is not None and row[3] != queue_id:
                return False
            if wanted is not None and (
                row[4] is None or normaliseRecipient(row[4]) != wanted
            ):
                return False
            if tag is not None and row[5] != tag:
                return False
            return True

        def read(protocol):
            return Deferred.fromCoroutine(
                self._gather(
                    protocol,
                    queue_id=queue_id,
                    recipient=recipient,
                    type=type,
                    tag=tag,
                    low=low,
                    high=high,
                    accept=accept,
                    want=limit + 1,
                )
            )

        def page(rows):
            # One more than asked for tells whether there is a next page.
            more = len(rows) > limit
            del rows[limit:]
            events = [_fromRow(row) for _, _, row in rows]
            nextCursor = None
            if more:
                nextCursor = encodeCursor(events[-1].time, rows[-1][1])
            return EventPage(events=events, cursor=nextCursor)

        return self._do(read).addCallback(page)

    def pruneEvents(self, before: float, limit: int = 10000) -> Deferred:
        """
        Bucket by bucket, oldest first: read a bucket whose time range
        starts before C{before}, and rewrite it without its events older
        than C{before} (at most what is left of C{limit}), or delete it when
        none is left, dropping it from the index entries of the queue ids
        and recipients that have no event left in it; a bucket another
        node changed in between is read again.  Then unique open / click
        records with what is left of C{limit}.
        """
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            before, limit = checkPruneArguments(before, limit)
        except ValueError:
            return fail()
        high = "(" + _number(before)
        keys = self._eventKeys()

        async def prune(protocol):
            budget, deleted, after, retries = limit, 0, "", 0
            while budget > 0:
                reply = await self._script(
                    protocol,
                    "scan",
                    keys[1:2] + keys[4:6],
                    [self._bucketPrefix(), "", "", "", "", "-inf", high, after, "1", "1"],
                )
                buckets = _buckets(reply[1:])
                if not buckets:
                    break
                fields = buckets[0]
                rows = sorted(
                    ((row[1], seq, row) for seq, row in _rows(fields)),
                    key=lambda item: (item[0], item[1]),
                )
                old = [item for item in rows if item[0] < before]
                gone, kept = old[:budget], rows[len(old[:budget]):]
                if not gone:
                    if not _text(reply[0]):
                        break
                    after = _text(reply[0])
                    continue
                bucket = _bucketOf(gone[0][0])[0]
                done = await self._script(
                    protocol,
                    "rewrite",
                    [self._bucketPrefix() + bucket, *keys[1:]],
                    _rewriteArgs(bucket, _text(fields["v"]), gone, kept),
                )
                if int(done) < 0:
                    # Changed since it was read (an append, another
                    # node's prune): read it again, a few times at most;
                    # the next call carries on.
                    retries += 1
                    if retries > _PRUNE_RETRIES:
                        return deleted
                    continue
                deleted += int(done)
                budget -= int(done)
                if len(gone) < len(old):
                    break
            if budget > 0:
                seen = [self._key("seenat", type) for type in sorted(UNIQUE_TYPES)]
                deleted += int(
                    await self._script(protocol, "pruneSeen", seen, [high, str(budget)])
                )
            return deleted

        return self._do(lambda protocol: Deferred.fromCoroutine(prune(protocol)))

    # -- suppression list ------------------------------------------------

    def _suppressionKeys(self) -> list[str]:
        return [
            self._key("supp"),
            self._key("supp", "time"),
            self._key("supp", "all"),
            *[self._key("supp", "reason", reason) for reason in _REASONS],
        ]

    def addSuppression(self, entry: SuppressionEntry) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        if not isinstance(entry, SuppressionEntry):
            return fail(TypeError(f"not a SuppressionEntry: {entry!r}"))
        try:
            entry.address.encode("utf-8")
        except Exception:
            return fail()
        args = [
            entry.address,
            _number(entry.time),
            _entryJSON(entry),
            str(4 + _REASONS.index(entry.reason)),
        ]
        d = self._do(self._script, "addSuppression", self._suppressionKeys(), args)
        return d.addCallback(lambda replaced: None)

    def removeSuppression(self, address: str) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            address = normaliseAddress(address)
            address.encode("utf-8")
        except Exception:
            return fail()
        d = self._do(
            self._script,
            "removeSuppression",
            self._suppressionKeys(),
            [address],
        )
        return d.addCallback(lambda removed: removed > 0)

    def checkSuppressions(self, addresses: list[str], now: float) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            pairs = checkAddresses(addresses)
            now = checkTime("now", now)
            if now is None:
                raise ValueError("now is required")
            wanted = sorted({normalised for _, normalised in pairs})
            for address in wanted:
                address.encode("utf-8")
        except Exception:
            return fail()
        if not wanted:
            return self._do(lambda protocol: {})
        # One HMGET: one round trip for every recipient of a message.
        d = self._command("HMGET", self._key("supp"), *wanted)

        def found(values):
            entries = {}
            for address, value in zip(wanted, values):
                if value is not None:
                    entry = _entryFromJSON(address, value)
                    if entry.activeAt(now):
                        entries[address] = entry
            return {
                given: entries[normalised]
                for given, normalised in pairs
                if normalised in entries
            }

        return d.addCallback(found)

    def listSuppressions(
        self,
        *,
        prefix: Optional[str] = None,
        reason: Optional[str] = None,
        cursor: Optional[str] = None,
        limit: int = 100,
    ) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            limit = checkLimit(limit)
            reason = checkReason(reason)
            prefix = normalisePrefix(prefix)
            after = None if cursor is None else decodeSuppressionCursor(cursor)
            low, high = "-", "+"
            if prefix:
                low = "[" + prefix
                upper = prefixUpperBound(prefix)
                if upper is not None:
                    high = "(" + upper
            if after is not None and (not prefix or after >= prefix):
                low = "(" + after
            low.encode("utf-8")
            high.encode("utf-8")
        except Exception:
            return fail()
        if reason is None:
            index = self._key("supp", "all")
        else:
            index = self._key("supp", "reason", reason)
        d = self._do(
            self._script,
            "listSuppressions",
            [index, self._key("supp")],
            [low, high, str(limit + 1)],
        )

        def page(reply):
            flat = json.loads(reply)
            entries = [
                _entryFromJSON(_text(address), value)
                for address, value in _pairs(flat)
            ]
            nextCursor = None
            if len(flat) // 2 > limit:
                del entries[limit:]
                nextCursor = encodeSuppressionCursor(_text(flat[2 * limit - 2]))
            return SuppressionPage(entries=entries, cursor=nextCursor)

        return d.addCallback(page)

    # -- statistics ------------------------------------------------------

    def statistics(
        self,
        *,
        since: float,
        until: float,
        interval: str = "hour",
        tag: Optional[str] = None,
        domain: Optional[str] = None,
    ) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            since, until, size, dim, key, first = checkStatisticsArguments(
                since, until, interval, tag, domain
            )
            series = self._series(interval, dim, key)
            series.encode("utf-8")
        except Exception:
            return fail()
        d = self._do(
            self._script,
            "statistics",
            [series + ":buckets"],
            [series + ":", str(first), "(" + _number(until)],
        )

        def build(flat):
            counters = []
            for bucket, counts in _pairs(flat):
                for type, count in _pairs(counts):
                    counters.append((int(bucket), _text(type), int(count)))
            return buildStatistics(
                since=since,
                until=until,
                interval=interval,
                tag=tag,
                domain=domain,
                counters=counters,
            )

        return d.addCallback(build)

    # -- token buckets ---------------------------------------------------

    def takeTokens(
        self, key: str, rate: float, burst: float, now: float, count: float = 1
    ) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            key, rate, burst, now, count = checkTokenArguments(
                key, rate, burst, now, count
            )
            bucket = self._key("bucket", key)
            bucket.encode("utf-8")
        except Exception:
            return fail()
        d = self._do(
            self._script,
            "takeTokens",
            [bucket],
            [_number(rate), _number(burst), _number(now), _number(count)],
        )

        def result(reply):
            allowed, remaining, wait = reply
            return TokenResult(bool(allowed), float(remaining), float(wait))

        return d.addCallback(result)

    # -- event streams and outboxes (IEventStreams) ----------------------

    def _claimFrom(self, stream: str, owner: str, reply) -> Optional[EventClaim]:
        if reply is None:
            return None
        after, last, time = _text(reply).split(",")
        return EventClaim(stream, owner, int(after), int(last), float(time))

    def _claimText(self, claim: EventClaim) -> str:
        return "%d,%d,%s" % (claim.after, claim.last, _number(claim.time))

    def claimEvents(self, stream, owner, now, limit=None, begin="oldest") -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            stream, owner, now, limit, begin = checkClaimArguments(
                stream, owner, now, limit, begin
            )
            owner.encode("utf-8")
        except Exception:
            return fail()
        d = self._do(
            self._script,
            "claimEvents",
            [self._key("stream", stream), self._key("seq")],
            [owner, _number(now), "" if limit is None else str(limit), begin],
        )
        return d.addCallback(lambda reply: self._claimFrom(stream, owner, reply))

    def claimedEvents(self, claim, cursor=None, limit=1000) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            after, upTo = claimPage(claim, cursor, limit)
        except Exception:
            return fail()
        if upTo > after:
            keys = self._eventKeys()
            d = self._do(
                self._script,
                "seqScan",
                [keys[2], keys[3]],
                [self._bucketPrefix(), str(after), str(upTo)],
            )
        else:
            d = self._do(lambda protocol: [])

        def page(reply):
            rows = sorted(
                (seq, row)
                for fields in _buckets(reply)
                for seq, row in _rows(fields)
                if after < seq <= upTo
            )
            return EventPage(
                events=[_fromRow(row) for _, row in rows],
                cursor=claimCursor(claim, upTo),
            )

        return d.addCallback(page)

    def finishClaim(self, claim) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkClaim(claim)
        except Exception:
            return fail()
        d = self._do(
            self._script,
            "finishClaim",
            [self._key("stream", claim.stream)],
            ["claim:" + claim.owner, self._claimText(claim)],
        )
        return d.addCallback(lambda done: bool(int(done)))

    def _outboxKeys(self, outbox: str) -> list[str]:
        due = self._key("outbox", outbox, "due")
        return [self._key("outbox", outbox), due, due + ":attempts"]

    def addToOutbox(self, outbox, batches, claim=None) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkStreamName(outbox)
            batches = checkBatches(batches)
            field = text = ""
            stream = self._key("stream", "-")
            if claim is not None:
                checkClaim(claim)
                field, text = "claim:" + claim.owner, self._claimText(claim)
                stream = self._key("stream", claim.stream)
            args = [field, text, str(len(batches))]
            for batch in batches:
                args += [
                    batch.id,
                    json.dumps([batch.body, batch.created]),
                    _number(batch.due),
                    str(batch.attempts),
                ]
            for arg in args:
                arg.encode("utf-8")
        except Exception:
            return fail()
        keys = self._outboxKeys(outbox)[:2] + [stream]
        d = self._do(self._script, "outboxAdd", keys, args)
        return d.addCallback(lambda n: None)

    def takeFromOutbox(self, outbox, now, lease, limit=10) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            outbox, now, lease, limit = checkTakeArguments(outbox, now, lease, limit)
        except Exception:
            return fail()
        due = now + lease
        d = self._do(
            self._script,
            "outboxTake",
            self._outboxKeys(outbox),
            [_number(now), _number(due), str(limit)],
        )

        def batches(reply):
            flat = json.loads(reply)
            taken = []
            for i in range(0, len(flat), 3):
                id, record, attempts = flat[i : i + 3]
                body, created = json.loads(record)
                taken.append(
                    OutboxBatch(
                        id=_text(id), body=body, created=created, due=due,
                        attempts=int(attempts),
                    )
                )
            return taken

        return d.addCallback(batches)

    def deferInOutbox(self, outbox, id, due) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkStreamName(outbox)
            due = checkTime("due", due)
            if due is None:
                raise ValueError("due is required")
            id.encode("utf-8")
        except Exception:
            return fail()
        d = self._do(
            self._script, "outboxDefer", self._outboxKeys(outbox)[1:], [id, _number(due)]
        )
        return d.addCallback(lambda done: bool(int(done)))

    def removeFromOutbox(self, outbox, id) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkStreamName(outbox)
            id.encode("utf-8")
        except Exception:
            return fail()
        d = self._do(self._script, "outboxRemove", self._outboxKeys(outbox), [id])
        return d.addCallback(lambda removed: int(removed) > 0)

    def outboxSize(self, outbox) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkStreamName(outbox)
        except Exception:
            return fail()
        d = self._command("ZCARD", self._outboxKeys(outbox)[1])
        return d.addCallback(int)

    # -- SMS submissions (ISMSSubmissions, issue 15) ----------------------

    def _smsRecipientKey(self, queue_id: str, recipient: str) -> str:
        return self._key("sms", "r", queue_id, recipient)

    def addSMSSubmission(self, submission) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        if not isinstance(submission, SMSSubmission):
            return fail(TypeError("an SMSSubmission is needed"))
        rkey = self._smsRecipientKey(submission.queue_id, submission.recipient)
        try:
            record = json.dumps({**submission.asDict(), "rkey": rkey})
        except (TypeError, ValueError):
            return fail()
        d = self._do(
            self._script,
            "smsAdd",
            [self._key("sms", "id"), self._key("sms", "time"), rkey],
            [submission.message_id, record, _number(submission.time), str(submission.part)],
        )
        return d.addCallback(lambda _: None)

    @staticmethod
    def _smsFromRecord(value) -> SMSSubmission:
        fields = json.loads(value)
        fields.pop("rkey", None)
        return SMSSubmission(**fields)

    def findSMSSubmission(self, message_id) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            message_id = normaliseSMSMessageID(message_id)
        except ValueError:
            return fail()
        d = self._command("HGET", self._key("sms", "id"), message_id)
        return d.addCallback(lambda value: None if value is None else self._smsFromRecord(value))

    def smsSubmissions(self, queue_id, recipient) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        rkey = self._smsRecipientKey(str(queue_id), str(recipient))

        async def read(protocol):
            ids = await protocol.execute_command("ZRANGE", rkey, 0, -1)
            if not ids:
                return []
            values = await protocol.execute_command("HMGET", self._key("sms", "id"), *ids)
            found = [self._smsFromRecord(v) for v in values if v is not None]
            return sorted(found, key=lambda s: (s.part, s.time))

        return self._do(lambda protocol: Deferred.fromCoroutine(read(protocol)))

    def pruneSMSSubmissions(self, before, limit=10000) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            before, limit = checkPruneArguments(before, limit)
        except ValueError:
            return fail()
        return self._do(
            self._script,
            "smsPrune",
            [self._key("sms", "id"), self._key("sms", "time")],
            [_number(before), str(limit)],
        )


    # -- connection-slot leases (ILeases; issue 17) -------------------------
    #
    # C{lease:<resource>}: a sorted set of lease names scored by expiry
    # (the callers' clock); dead members are dropped by the next script
    # that touches the set, and the key expires a minute after its longest
    # lease would.

    def _leaseKey(self, resource: str) -> str:
        return self._key("lease", resource)

    def acquireLease(self, resource, lease, limit, now, ttl) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            resource, lease, limit, now, ttl = checkLeaseArguments(
                resource, lease, limit, now, ttl
            )
        except ValueError:
            return fail()
        d = self._do(
            self._script,
            "leaseAcquire",
            [self._leaseKey(resource)],
            [lease, str(limit), _number(now), _number(ttl)],
        )

        def grant(reply):
            granted, held, wait = reply
            return LeaseGrant(bool(int(granted)), int(held), float(wait))

        return d.addCallback(grant)

    def acquireLeaseAndTokens(
        self, resource, lease, limit, now, ttl, key, rate, burst, count=1
    ) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            resource, lease, limit, now, ttl, key, rate, burst, count = (
                checkLeaseAndTokenArguments(
                    resource, lease, limit, now, ttl, key, rate, burst, count
                )
            )
        except ValueError:
            return fail()
        d = self._do(
            self._script,
            "leaseAndTokens",
            [self._leaseKey(resource), self._key("bucket", key)],
            [
                lease,
                str(limit),
                _number(now),
                _number(ttl),
                _number(rate),
                _number(burst),
                _number(count),
            ],
        )
        return d.addCallback(_slotAndToken)

    def renewLeases(self, leases, now, ttl) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            pairs = checkLeasePairs(leases)
            _, _, _, now, ttl = checkLeaseArguments("r", "l", 1, now, ttl)
        except ValueError:
            return fail()
        if not pairs:
            return succeed([])
        d = self._do(
            self._script,
            "leaseRenew",
            [self._leaseKey(resource) for resource, _ in pairs],
            [_number(now), _number(ttl), *[lease for _, lease in pairs]],
        )
        return d.addCallback(lambda lost: [pairs[int(i) - 1] for i in lost])

    def releaseLease(self, resource, lease) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkLeaseName("resource", resource)
            checkLeaseName("lease", lease)
        except ValueError:
            return fail()
        d = self._command("ZREM", self._leaseKey(resource), lease)
        return d.addCallback(lambda _: None)

    def liveLeases(self, resource, now) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkLeaseName("resource", resource)
            now = checkTime("now", now)
            if now is None:
                raise ValueError("now must be POSIX seconds, not None")
        except ValueError:
            return fail()
        d = self._command(
            "ZRANGEBYSCORE", self._leaseKey(resource), "(" + _number(now), "+inf"
        )
        return d.addCallback(lambda names: sorted(n.decode("utf-8") for n in names))

    # -- adaptive throttles (IThrottles; issue 17) --------------------------
    #
    # C{throttle:<destination>}: a hash (level, until, cooldown, reason)
    # expiring a minute after its level reaches 0; C{throttles}: a sorted
    # set of the throttled destinations scored by that time (the callers'
    # clock), so that reading them costs nothing when none is.

    def _throttleKey(self, destination: str) -> str:
        return self._key("throttle", destination)

    def triggerThrottle(self, destination, seen, reason, now, cooldown) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            destination, seen, reason, now, cooldown = checkThrottleArguments(
                destination, seen, reason, now, cooldown
            )
        except ValueError:
            return fail()
        d = self._do(
            self._script,
            "throttleTrigger",
            [self._throttleKey(destination), self._key("throttles")],
            [
                destination,
                str(seen),
                reason,
                _number(now),
                _number(cooldown),
                str(MAX_THROTTLE_LEVEL),
            ],
        )
        return d.addCallback(lambda reply: _throttleState(reply))

    def replayThrottle(self, destination, state, now) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            checkLeaseName("destination", destination)
            state = checkThrottleState("state", state)
            now = checkTime("now", now)
            if now is None or not math.isfinite(now):
                raise ValueError("now must be finite POSIX seconds")
        except ValueError:
            return fail()
        d = self._do(
            self._script,
            "throttleReplay",
            [self._throttleKey(destination), self._key("throttles")],
            [
                destination,
                str(state.level),
                _number(state.until),
                _number(state.cooldown),
                state.reason,
                _number(now),
            ],
        )
        return d.addCallback(lambda reply: _throttleState(reply) if reply else None)

    def throttleStates(self, now) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            now = checkTime("now", now)
            if now is None:
                raise ValueError("now must be POSIX seconds, not None")
        except ValueError:
            return fail()
        d = self._do(
            self._script,
            "throttleStates",
            [self._key("throttles")],
            [_number(now), self._throttleKey("")],
        )

        def states(reply) -> dict:
            found = {}
            for i in range(0, len(reply), 5):
                state = _throttleState(reply[i + 1 : i + 5])
                if state.levelAt(now) > 0:
                    found[_text(reply[i])] = state
            return found

        return d.addCallback(states)

    # -- mailboxes between the nodes (IMailboxes; issue 17) -------------------
    #
    # C{mbox:<name>}: a list of messages, expiring C{ttl} after its last
    # post.

    def postToMailbox(self, mailbox, message, ttl) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            mailbox, message, ttl = checkMailboxPost(mailbox, message, ttl)
        except ValueError:
            return fail()
        d = self._do(
            self._script,
            "mailboxPost",
            [self._key("mbox", mailbox)],
            [message, str(math.ceil(ttl * 1000))],
        )
        return d.addCallback(lambda _: None)

    def takeFromMailbox(self, mailbox, limit) -> Deferred:
        if self._closed:
            return fail(StoreClosed("the event store is closed"))
        try:
            mailbox, limit = checkMailboxTake(mailbox, limit)
        except ValueError:
            return fail()
        d = self._do(self._script, "mailboxTake", [self._key("mbox", mailbox)], [str(limit)])
        return d.addCallback(lambda messages: [_text(m) for m in messages])


# KEYS: the lease set.  ARGV: lease, limit, now, ttl.
# Returns granted (0/1), live leases afterwards, seconds until the earliest
# live lease expires (when refused).
_LEASE_ACQUIRE = """
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local held = redis.call('ZCARD', KEYS[1])
local granted = 0
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  granted = 1
elseif held < tonumber(ARGV[2]) then
  granted = 1
  held = held + 1
end
if granted == 1 then
  redis.call('ZADD', KEYS[1], string.format('%.17g', now + ttl), ARGV[1])
  local keep = math.ceil(ttl * 1000) + 60000
  if redis.call('PTTL', KEYS[1]) < keep then
    redis.call('PEXPIRE', KEYS[1], keep)
  end
  return {1, held, '0'}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, held, string.format('%.17g', tonumber(first[2]) - now)}
"""

# KEYS: the lease set of each lease.  ARGV: now, ttl, the leases.
# Returns the (1-based) positions of the leases that were not live.
_LEASE_RENEW = """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local expiry = string.format('%.17g', now + ttl)
local keep = math.ceil(ttl * 1000) + 60000
local lost = {}
for i, key in ipairs(KEYS) do
  local lease = ARGV[i + 2]
  local score = redis.call('ZSCORE', key, lease)
  if score and tonumber(score) > now then
    redis.call('ZADD', key, expiry, lease)
    if redis.call('PTTL', key) < keep then
      redis.call('PEXPIRE', key, keep)
    end
  else
    if score then
      redis.call('ZREM', key, lease)
    end
    lost[#lost + 1] = i
  end
end
return lost
"""

def _slotAndToken(reply) -> SlotAndTokenGrant:
    status, held, wait, remaining = reply
    status = int(status)
    return SlotAndTokenGrant(
        status == 1,
        _MISSING[status],
        int(held),
        float(wait),
        None if status == 0 else float(remaining),
    )


_MISSING = {0: "slot", 1: None, 2: "token"}

# A lease (as _LEASE_ACQUIRE) and tokens (as _TAKE_TOKENS, the same bucket
# keys and arithmetic) together: both or neither; a refusal writes nothing.
#
# KEYS: the lease set, the bucket.  ARGV: lease, limit, now, ttl, rate,
# burst, count.  Returns status (1 granted, 0 no slot, 2 no token), live
# leases afterwards, the wait (until the earliest lease expires, or until
# the bucket holds the tokens), the tokens left ('' when no slot).
_LEASE_AND_TOKENS = """
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local held = redis.call('ZCARD', KEYS[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if held >= tonumber(ARGV[2]) then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, held, string.format('%.17g', tonumber(first[2]) - now), ''}
  end
  held = held + 1
end
local rate = tonumber(ARGV[5])
local burst = tonumber(ARGV[6])
local count = tonumber(ARGV[7])
local state = redis.call('HMGET', KEYS[2], 'tokens', 'updated')
local tokens, updated
if not state[1] or not state[2] then
  tokens, updated = burst, now
else
  tokens, updated = tonumber(state[1]), tonumber(state[2])
  if now > updated then
    tokens = tokens + (now - updated) * rate
    updated = now
  end
  if burst < tokens then
    tokens = burst
  end
end
if tokens < count then
  local ahead = updated - now
  if ahead < 0 then ahead = 0.0 end
  local wait = (count - tokens) / rate + ahead
  return {2, redis.call('ZCARD', KEYS[1]), string.format('%.17g', wait),
          string.format('%.17g', tokens)}
end
tokens = tokens - count
redis.call('HSET', KEYS[2], 'tokens', string.format('%.17g', tokens),
           'updated', string.format('%.17g', updated))
local idle = burst / rate + math.max(0, updated - now)
if idle < 2592000 then
  redis.call('PEXPIRE', KEYS[2], math.ceil(idle * 1000) + 60000)
else
  redis.call('PERSIST', KEYS[2])
end
redis.call('ZADD', KEYS[1], string.format('%.17g', now + ttl), ARGV[1])
local keep = math.ceil(ttl * 1000) + 60000
if redis.call('PTTL', KEYS[1]) < keep then
  redis.call('PEXPIRE', KEYS[1], keep)
end
return {1, held, '0', string.format('%.17g', tokens)}
"""

_SCRIPTS["leaseAndTokens"] = _LEASE_AND_TOKENS
_SHAS["leaseAndTokens"] = _sha1(_LEASE_AND_TOKENS)
_SCRIPTS["leaseAcquire"] = _LEASE_ACQUIRE
_SCRIPTS["leaseRenew"] = _LEASE_RENEW
_SHAS["leaseAcquire"] = _sha1(_LEASE_ACQUIRE)
_SHAS["leaseRenew"] = _sha1(_LEASE_RENEW)
classImplements(RedisStore, ILeases)


def _throttleState(reply) -> ThrottleState:
    level, until, cooldown, reason = reply
    return ThrottleState(int(level), float(until), float(cooldown), _text(reason or b""))


# KEYS: the destination's state, the index.  ARGV: destination, seen,
# reason, now, cooldown, the deepest level.  The state afterwards: level,
# until, cooldown, reason (smartrelay.store.interfaces.triggered).
_THROTTLE_TRIGGER = """
local now = tonumber(ARGV[4])
local cooldown = tonumber(ARGV[5])
local level = 0
local s = redis.call('HMGET', KEYS[1], 'level', 'until', 'cooldown')
if s[1] then
  local l, u, c = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
  if now < u then
    level = l
  else
    level = math.max(0, l - 1 - math.floor((now - u) / c))
  end
end
level = math.min(tonumber(ARGV[6]), math.max(level, tonumber(ARGV[2]) + 1))
local untilText = string.format('%.17g', now + cooldown)
local finish = now + cooldown + (level - 1) * cooldown
redis.call('HSET', KEYS[1], 'level', level, 'until', untilText,
  'cooldown', ARGV[5], 'reason', ARGV[3])
local keep = math.ceil((finish - now) * 1000) + 60000
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('ZADD', KEYS[2], string.format('%.17g', finish), ARGV[1])
if redis.call('PTTL', KEYS[2]) < keep then
  redis.call('PEXPIRE', KEYS[2], keep)
end
return {level, untilText, ARGV[5], ARGV[3]}
"""

# KEYS: the index.  ARGV: now, the prefix of the state keys.  Flat
# (destination, level, until, cooldown, reason) of every throttled one.
_THROTTLE_STATES = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local names = redis.call('ZRANGE', KEYS[1], 0, 999)
local out = {}
for _, name in ipairs(names) do
  local s = redis.call('HMGET', ARGV[2] .. name, 'level', 'until', 'cooldown', 'reason')
  if s[1] then
    out[#out + 1] = name
    out[#out + 1] = s[1]
    out[#out + 1] = s[2]
    out[#out + 1] = s[3]
    out[#out + 1] = s[4] or ''
  else
    redis.call('ZREM', KEYS[1], name)
  end
end
return out
"""

# A trigger replayed after an outage (smartrelay.store.interfaces.merged).
# KEYS: the destination's state, the index.  ARGV: destination, level,
# until, cooldown, reason (the replayed state), now.  The state afterwards
# (level, until, cooldown, reason), or an empty list when neither is
# throttled at now (nothing written).
_THROTTLE_REPLAY = """
local now = tonumber(ARGV[6])
local function at(l, u, c)
  if now < u then
    return l
  end
  return math.max(0, l - 1 - math.floor((now - u) / c))
end
local b = {tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5],
  ARGV[3], ARGV[4]}
local live = {}
local s = redis.call('HMGET', KEYS[1], 'level', 'until', 'cooldown', 'reason')
if s[1] then
  local a = {tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), s[4] or '', s[2], s[3]}
  if at(a[1], a[2], a[3]) > 0 then
    live[#live + 1] = a
  end
end
if at(b[1], b[2], b[3]) > 0 then
  live[#live + 1] = b
end
if #live == 0 then
  return {}
end
local r = live[1]
if #live == 2 then
  local a = live[1]
  local la, lb = at(a[1], a[2], a[3]), at(b[1], b[2], b[3])
  local ea, eb = a[2] + (a[1] - 1) * a[3], b[2] + (b[1] - 1) * b[3]
  if la >= lb and ea >= eb then
    r = a
  elseif lb >= la and eb >= ea then
    r = b
  else
    local later = a
    if eb > ea then later = b end
    local level = math.max(la, lb)
    local e = later[2] + (later[1] - 1) * later[3]
    local u = e - (level - 1) * later[3]
    r = {level, u, later[3], later[4], string.format('%.17g', u), later[6]}
  end
end
local finish = r[2] + (r[1] - 1) * r[3]
redis.call('HSET', KEYS[1], 'level', r[1], 'until', r[5], 'cooldown', r[6],
  'reason', r[4])
local keep = math.ceil((finish - now) * 1000) + 60000
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('ZADD', KEYS[2], string.format('%.17g', finish), ARGV[1])
if redis.call('PTTL', KEYS[2]) < keep then
  redis.call('PEXPIRE', KEYS[2], keep)
end
return {r[1], r[5], r[6], r[4]}
"""

_SCRIPTS["throttleReplay"] = _THROTTLE_REPLAY
_SHAS["throttleReplay"] = _sha1(_THROTTLE_REPLAY)
_SCRIPTS["throttleTrigger"] = _THROTTLE_TRIGGER
_SCRIPTS["throttleStates"] = _THROTTLE_STATES
_SHAS["throttleTrigger"] = _sha1(_THROTTLE_TRIGGER)
_SHAS["throttleStates"] = _sha1(_THROTTLE_STATES)
classImplements(RedisStore, IThrottles)


# KEYS: the mailbox.  ARGV: the message, its TTL in milliseconds.
_MAILBOX_POST = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the mailbox.  ARGV: how many.  The oldest that many, removed.
_MAILBOX_TAKE = """
local n = tonumber(ARGV[1])
local taken = redis.call('LRANGE', KEYS[1], 0, n - 1)
if #taken > 0 then
  redis.call('LTRIM', KEYS[1], n, -1)
end
return taken
"""

_SCRIPTS["mailboxPost"] = _MAILBOX_POST
_SCRIPTS["mailboxTake"] = _MAILBOX_TAKE
_SHAS["mailboxPost"] = _sha1(_MAILBOX_POST)
_SHAS["mailboxTake"] = _sha1(_MAILBOX_TAKE)
classImplements(RedisStore, IMailboxes)

_SHA_BYTES = {name: sha.encode("ascii") for name, sha in _SHAS.items()}

__all__ = [
    "RedisAddress",
    "RedisConnectionFailed",
    "RedisStore",
    "UnsupportedSchema",
    "parseRedisURL",
]
