"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1, and a fault proxy in front of it.

The server speaks S3's HTTP API (the same requests pyarrow sends to AWS); the proxy forwards requests to it
and, when told, resets connections (RST, as a dropped spot NIC or a load balancer does) or answers 503
SlowDown (S3's throttling answer) for a while. Both listen on 127.0.0.1 only and stop with the test.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BUCKET = "raypatch-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's server as a subprocess: start, kill (its in-memory store goes with it), restart on the same port."""

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        import os

        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(self.env or {})})
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self, **kw: Any) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1", **kw)

    def require_auth(self) -> None:
        """From now on the server checks signatures against its IAM users (moto's switch for it)."""
        req = urllib.request.Request(f"http://{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()


def snapshot(client: Any, bucket: str = BUCKET) -> dict[str, bytes]:
    """Every object of a bucket (what a store keeps on its disks across a restart)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def restore(client: Any, objects: dict[str, bytes], bucket: str = BUCKET) -> None:
    client.create_bucket(Bucket=bucket)
    for k, v in objects.items():
        client.put_object(Bucket=bucket, Key=k, Body=v)


def uri(endpoint: str, prefix: str, bucket: str = BUCKET) -> str:
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def keys(client: Any, prefix: str, bucket: str = BUCKET) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your '
             b'request rate.</Message><RequestId>fault-proxy</RequestId></Error>')
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te", "trailer"}


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` ('host:port').

    `resets = N`: the next N requests get their connection reset (no answer). `slow_down(seconds)`: every
    request answers 503 SlowDown for that long. `down = True`: requests get a reset until it is False again (a
    dead server). `delay`: seconds added before each answer (a remote store's first-byte latency). `requests`
    counts what reached the proxy; `faults` what it refused or could not forward (the server behind was down).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.resets = 0
        self.slow_until = 0.0
        self.down = False
        self.delay = 0.0
        self.requests = 0
        self.faults = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy.lock:
                    proxy.requests += 1
                    reset = proxy.down or proxy.resets > 0
                    if proxy.resets > 0:
                        proxy.resets -= 1
                    slow = not reset and time.monotonic() < proxy.slow_until
                    proxy.faults += reset or slow
                if reset:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if slow:
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN) if self.command != "HEAD" else 0))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                if proxy.delay:
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:  # the server behind is gone: the client sees a dead connection
                    with proxy.lock:
                        proxy.faults += 1
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                finally:
                    conn.close()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def slow_down(self, seconds: float) -> None:
        self.slow_until = time.monotonic() + seconds

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def iam_user(server: S3Server, name: str, allow: bool) -> dict[str, str]:
    """An IAM user with an access key (allowed s3:* or nothing), made before require_auth."""
    import boto3

    iam = boto3.client("iam", endpoint_url=f"http://{server.endpoint}", region_name="us-east-1")
    iam.create_user(UserName=name)
    if allow:
        iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
