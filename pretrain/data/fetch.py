"""The bytes of remote shards: a whole shard into a file, or byte ranges of one, with retries.

HTTP(S) goes through this module's own client (the standard library's http.client): a socket
timeout on every request (data.fetch_timeout_s), a bounded number of retries with exponential
backoff (data.fetch_retries, data.fetch_backoff_s), one keep-alive connection per thread and
server (a request costs a round trip, not a TCP and TLS handshake), and Range requests.
webdataset instead runs `curl --retry 30 --retry-delay 2` per shard, so a dying server stalls a
rank for minutes before a shard counts as bad. Anything else (a `pipe:` command such as
`aws s3 cp s3://bucket/{path} -`) is opened with webdataset's gopen and read whole; its exit
status is checked.

Whatever still fails after the retries raises FetchError naming the URL, which the loader counts
as a bad shard.
"""

from __future__ import annotations

import bisect
import hashlib
import http.client
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar
from urllib.parse import urlsplit

from pretrain.data.shardread import BadShard

CHUNK = 1 << 20
# Ranges separated by fewer bytes than this are read as one: a part of a multipart answer costs
# about 90 bytes of headers, so reading through a smaller gap is cheaper.
MERGE_GAP = 128
# One request's Range header stays under what servers accept (nginx: 8 KB per header line;
# Apache: 200 ranges by default).
MAX_RANGES, MAX_RANGE_HEADER = 200, 6000
PERMANENT_STATUS = {400, 401, 403, 404, 405, 410, 416}  # asking again will not help
T = TypeVar("T")


@dataclass(frozen=True)
class FetchPolicy:
    retries: int = 4  # after the first attempt
    backoff_s: float = 1.0  # before retry k: backoff_s x 2^(k-1)
    timeout_s: float = 60.0  # socket timeout: connect and each read


class FetchError(BadShard):
    """A fetch that failed for good; `permanent`: not worth a retry (404, ranges refused)."""

    def __init__(self, url: str, reason: str, permanent: bool = False):
        super().__init__(url, reason)
        self.permanent = permanent


class RangesIgnored(FetchError):
    """The server does not serve what a multi-range request asks: it answered with the whole file
    (no Range support), or with one range only (object stores serve one range per request)."""

    def __init__(self, url: str, how: str = "answered 200 with the whole shard"):
        super().__init__(url, f"the server ignores Range requests ({how})", permanent=True)


class Stopped(Exception):
    """The reader is shutting down: a transfer in flight gives up between chunks."""


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


# ---- one keep-alive connection per thread and server ------------------------------------------
_local = threading.local()


def _connections() -> dict:
    # A forked DataLoader worker inherits its parent's sockets: never share them.
    if getattr(_local, "pid", None) != os.getpid():
        _local.pid, _local.conns = os.getpid(), {}
    return _local.conns


def _forget(key: Tuple[str, str]) -> None:
    conn = _connections().pop(key, None)
    if conn is not None:
        conn.close()


def _get(url: str, headers: dict, timeout: float) -> Tuple[http.client.HTTPResponse, tuple]:
    """GET on this thread's connection to the server; a kept-alive connection the server closed
    meanwhile is reopened once (not counted as a retry)."""
    parts = urlsplit(url)
    key = (parts.scheme, parts.netloc)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    for fresh in (False, True):
        conns = _connections()
        conn = conns.get(key)
        reused = conn is not None and conn.sock is not None
        if conn is None:
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = conns[key] = cls(parts.netloc, timeout=timeout)
        try:
            conn.request("GET", target, headers={"User-Agent": "pretrain", **headers})
            return conn.getresponse(), key
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            _forget(key)
            if fresh or not reused:
                raise
    raise AssertionError("unreachable")


def _check_status(resp: http.client.HTTPResponse, url: str, want: int) -> None:
    if resp.status == want:
        return
    where = f" to {resp.getheader('Location')}" if 300 <= resp.status < 400 else ""
    raise FetchError(url, f"HTTP {resp.status} {resp.reason}{where}",
                     permanent=resp.status in PERMANENT_STATUS or bool(where))


def retrying(url: str, policy: FetchPolicy, attempt: Callable[[], T]) -> T:
    """attempt() until it succeeds, at most 1 + policy.retries times, sleeping backoff_s x 2^k
    between; network errors and FetchError count, a permanent FetchError ends at once."""
    last: Optional[FetchError] = None
    for k in range(policy.retries + 1):
        if k:
            time.sleep(policy.backoff_s * 2 ** (k - 1))
        try:
            return attempt()
        except FetchError as e:
            if e.permanent:
                raise
            last = e
        except (OSError, http.client.HTTPException, ValueError) as e:  # resets, timeouts, cut bodies
            last = FetchError(url, f"{type(e).__name__}: {e}")
    assert last is not None
    raise FetchError(url, f"{last.reason} (failed {policy.retries + 1} times)")


# ---- whole shards --------------------------------------------------------------------------------
def _http_blocks(url: str, size: int, policy: FetchPolicy) -> Iterator[bytes]:
    resp, key = _get(url, {}, policy.timeout_s)
    try:
        _check_status(resp, url, 200)
        length = resp.getheader("Content-Length")
        if length is not None and int(length) != size:
            raise FetchError(url, f"the server's copy is {length} bytes, the manifest says {size} "
                                  "(truncated or replaced on the server)")
        while True:
            block = resp.read(CHUNK)
            if not block:
                break
            yield block
        if resp.length:  # http.client returns b"" when the server closes early
            raise FetchError(url, f"the transfer ended {resp.length} bytes short")
    finally:
        if not resp.isclosed():
            _forget(key)  # an unread body: the connection cannot serve another request


def _gopen_blocks(url: str) -> Iterator[bytes]:
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    try:
        while True:
            block = stream.read(CHUNK)
            if not block:
                break
            yield block
    finally:
        stream.close()  # a pipe's exit status is checked here


def download(url: str, dest: str, size: int, sha256: str, policy: FetchPolicy,
             stop: Optional[threading.Event] = None) -> None:
    """The shard at `url` into the file `dest`, checked against the manifest's size and sha256;
    retried as the policy says, else FetchError."""

    def attempt() -> None:
        h, n = hashlib.sha256(), 0
        blocks = _http_blocks(url, size, policy) if is_http(url) else _gopen_blocks(url)
        with open(dest, "wb") as f:
            for block in blocks:
                if stop is not None and stop.is_set():
                    blocks.close()
                    raise Stopped(url)
                f.write(block)
                h.update(block)
                n += len(block)
        if n != size:
            raise FetchError(url, f"got {n} bytes, the manifest says {size} (truncated in transfer "
                                  "or on the server)")
        if h.hexdigest() != sha256:
            raise FetchError(url, "sha256 differs from the manifest (corrupted in transfer, or the "
                                  "shard was replaced on the server)")

    retrying(url, policy, attempt)


# ---- byte ranges ---------------------------------------------------------------------------------
Span = Tuple[int, int]  # [start, end) in bytes


def _content_range(value: Optional[str], url: str, total: int) -> Span:
    m = re.fullmatch(r"\s*bytes (\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        raise FetchError(url, f"a 206 answer with Content-Range {value!r}")
    if m.group(3) != str(total):
        raise FetchError(url, f"the server's copy is {m.group(3)} bytes, the manifest says {total} "
                              "(truncated or replaced on the server)")
    return int(m.group(1)), int(m.group(2)) + 1


def _multipart(body: bytes, boundary: bytes, url: str, total: int) -> List[Tuple[int, bytes]]:
    """The parts of a multipart/byteranges body, each located by its Content-Range and cut by its
    length (so that payload bytes that look like the boundary cannot confuse the parse)."""
    pieces, pos = [], 0
    marker = b"--" + boundary
    while True:
        pos = body.find(marker, pos)
        if pos < 0 or body.startswith(b"--", pos + len(marker)):
            return pieces
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise FetchError(url, "a multipart answer cut inside a part's headers")
        headers = body[pos + len(marker):head_end].decode("latin-1")
        m = re.search(r"(?im)^content-range:(.*)$", headers)
        start, end = _content_range(m.group(1).strip() if m else None, url, total)
        data = body[head_end + 4:head_end + 4 + end - start]
        if len(data) != end - start:
            raise FetchError(url, "a multipart answer ended inside a part")
        pieces.append((start, data))
        pos = head_end + 4 + len(data)


def _range_request(url: str, ranges: Sequence[Span], total: int,
                   policy: FetchPolicy) -> List[Tuple[int, bytes]]:
    value = "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in ranges)
    resp, key = _get(url, {"Range": value}, policy.timeout_s)
    try:
        if resp.status == 200:
            raise RangesIgnored(url)
        _check_status(resp, url, 206)
        body = resp.read()  # IncompleteRead when the server closes early
        ctype = resp.getheader("Content-Type", "")
        m = re.search(r'boundary="?([^";]+)"?', ctype)
        if ctype.startswith("multipart/byteranges") and m:
            return _multipart(body, m.group(1).encode(), url, total)
        start, end = _content_range(resp.getheader("Content-Range"), url, total)
        if len(body) != end - start:
            raise FetchError(url, f"a {len(body)}-byte part for the range {start}-{end - 1}")
        if start > ranges[0][0] or end < ranges[-1][1]:  # not all of them (ranges are sorted)
            raise RangesIgnored(url, f"answered {len(ranges)} ranges with one")
        return [(start, body)]
    finally:
        if not resp.isclosed():
            _forget(key)


def _requests(spans: Sequence[Span]) -> List[List[Span]]:
    """Sorted spans merged across small gaps, then grouped into requests the servers accept."""
    merged: List[List[int]] = []
    for a, b in sorted(spans):
        if merged and a - merged[-1][1] <= MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    groups: List[List[Span]] = [[]]
    chars = 0
    for a, b in merged:
        item = len(f"{a}-{b - 1},")
        if groups[-1] and (len(groups[-1]) >= MAX_RANGES or chars + item > MAX_RANGE_HEADER):
            groups.append([])
            chars = 0
        groups[-1].append((a, b))
        chars += item
    return groups


def fetch_ranges(url: str, spans: Sequence[Span], total: int, policy: FetchPolicy,
                 stop: Optional[threading.Event] = None) -> List[bytes]:
    """The bytes of each span of the `total`-byte file at `url`, in as few requests as the server
    takes (multipart ranges); each request retried on its own. RangesIgnored when the server does
    not serve ranges."""
    got: List[Tuple[int, bytes]] = []
    for group in _requests(spans):
        if stop is not None and stop.is_set():
            raise Stopped(url)
        got += retrying(url, policy, lambda g=group: _range_request(url, g, total, policy))
    got.sort(key=lambda p: p[0])
    starts = [s for s, _ in got]
    out = []
    for a, b in spans:
        j = bisect.bisect_right(starts, a) - 1
        if j < 0 or got[j][0] + len(got[j][1]) < b:
            raise FetchError(url, f"the server did not send the bytes {a}-{b - 1}")
        s, data = got[j]
        out.append(data[a - s:b - s])
    return out
