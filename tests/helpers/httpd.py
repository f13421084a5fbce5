"""A real HTTP server for shards: nginx on 127.0.0.1 serving a directory, with Range support and an
access log of the bytes sent per request; and a small proxy in front of it that adds latency per
request or cuts chosen transfers short. For tests/data and bench/bench_remote_data.py.

nginx comes from the Debian packages (.ci/nginx_install.sh). It runs in the foreground as one
process (`master_process off`: no privileged master, no user switch), with its config, pid file,
temporary paths and logs in its own directory, and is ended by its pid.
"""

from __future__ import annotations

import http.client
import http.server
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

LOG_FORMAT = '$msec "$uri" "$args" $status $bytes_sent $body_bytes_sent "$http_range"'
CONF = """daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    log_format shards '{log_format}';
    access_log {prefix}/access.log shards;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_binary() -> Optional[str]:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def why_no_nginx() -> Optional[str]:
    """None when nginx can run here, else the reason to skip."""
    if nginx_binary() is None:
        return "no nginx: .ci/nginx_install.sh (as root) installs Debian's nginx-light"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Request:
    uri: str
    args: str
    status: int
    bytes_sent: int  # headers and body, what left the server
    body_bytes: int
    range: str


class Nginx:
    """nginx serving `root` on 127.0.0.1 at a free port; `url` is its base."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.dir = Path(root).resolve(), Path(workdir)
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None
        self._mark = 0

    def start(self, attempts: int = 5) -> "Nginx":
        binary = nginx_binary()
        assert binary, why_no_nginx()
        for _ in range(attempts):  # the free port can be taken between probe and bind
            self.port = free_port()
            conf = self.dir / "nginx.conf"
            conf.write_text(CONF.format(prefix=self.dir, port=self.port, root=self.root,
                                        log_format=LOG_FORMAT))
            self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.dir)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._ready():
                return self
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.dir / 'error.log').read_text()[-2000:]}")

    def _ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finishes the log lines
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def mark(self) -> None:
        """Count requests from here on (requests() returns only those)."""
        log = self.dir / "access.log"
        self._mark = log.stat().st_size if log.exists() else 0

    def requests(self) -> List[Request]:
        """Requests since the last mark(), in the order served."""
        log = self.dir / "access.log"
        if not log.exists():
            return []
        with open(log, "rb") as f:
            f.seek(self._mark)
            lines = f.read().decode().splitlines()
        out = []
        for line in lines:
            head, _, tail = line.partition(' "')
            uri, _, rest = tail.partition('" "')
            args, _, rest = rest.partition('" ')
            status, sent, body, rng = rest.split(" ", 3)
            out.append(Request(uri, args, int(status), int(sent), int(body), rng.strip('"')))
        return out

    def bytes_sent(self, args: Optional[str] = None) -> int:
        """Bytes sent since the mark, headers included; `args`: only requests with that query."""
        return sum(r.bytes_sent for r in self.requests() if args is None or r.args == args)


class Proxy:
    """A forwarding HTTP proxy on 127.0.0.1 in front of `upstream`: each request waits `delay_s`
    (the latency of a distant store), `cut(path, after, times)` makes the next `times` answers
    for `path` stop after `after` body bytes, the connection closed (a dropped transfer).
    ranges="none" drops Range headers (a server without Range support answers 200, whole);
    ranges="first" keeps the first range of a multi-range request (as S3 serves one range)."""

    def __init__(self, upstream: str, delay_s: float = 0.0, ranges: str = "all"):
        self.upstream = upstream.split("://", 1)[1]
        self.delay_s = delay_s
        self.ranges = ranges
        self.cuts: Dict[str, List[int]] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a store's front end offers

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # clients that hang up
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "Proxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def cut(self, path: str, after: int, times: int = 1) -> None:
        with self.lock:
            self.cuts.setdefault(path, []).extend([after] * times)

    def _forward(self, h: http.server.BaseHTTPRequestHandler) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        conn = getattr(h, "upstream_conn", None)
        if conn is None:
            conn = h.upstream_conn = http.client.HTTPConnection(self.upstream, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() == "user-agent"}
        if h.headers.get("Range") and self.ranges != "none":
            value = h.headers["Range"]
            headers["Range"] = value.split(",")[0] if self.ranges == "first" else value
        conn.request("GET", h.path, headers=headers)
        resp = conn.getresponse()
        with self.lock:
            pending = self.cuts.get(h.path.split("?", 1)[0])
            after = pending.pop(0) if pending else None
        h.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "keep-alive", "server", "date"):
                h.send_header(k, v)
        h.end_headers()
        left = after
        try:
            while True:
                block = resp.read(1 << 20 if left is None else min(1 << 20, left))
                if not block:
                    break
                h.wfile.write(block)
                if left is not None:
                    left -= len(block)
                    if not left:
                        break
            if after is not None:  # drop the connection in mid-transfer
                resp.read()
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client hung up first (it stops reading a body it does not want)
            h.close_connection = True
            conn.close()
            h.upstream_conn = None


def main() -> None:
    """`python -m tests.helpers.httpd UPSTREAM DELAY_S`: a Proxy in a process of its own (so
    that its copying does not share a GIL with what is measured); prints its URL, serves until
    stdin closes."""
    import sys

    proxy = Proxy(sys.argv[1], float(sys.argv[2])).start()
    print(proxy.url, flush=True)
    sys.stdin.read()
    proxy.stop()


if __name__ == "__main__":
    main()
