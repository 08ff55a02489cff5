#!/usr/bin/env python3
"""A real WebSocket app and client (the `websockets` package from PyPI, in
the test venv: tests/interop/setup_venv.sh) for tests/ws_passthrough_e2e.rs.

    ws.py app                          serve on 127.0.0.1:0
    ws.py client SCENARIO WS_BASE ...  run one scenario through the gateway

The app prints `LISTENING <port>`, then one line per event the tests wait
for (`APP_CLOSED <tag> <code>`). Its routes (any prefix, by last segment):
    /echo?tag=T      echoes every message; on close prints APP_CLOSED T code
    /push?n=N        sends N text messages `push i` at once, then waits
    /close?code=C    closes at once with code C
    /flood           sends 64 KiB binary messages for ever (counted)
    /deaf            never reads
    /http/...        plain HTTP (no upgrade): /http/flood-sent answers the
                     bytes /flood has sent so far, anything else `ok`
A client scenario prints `RESULT {json}` and exits 0, or prints `FAIL ...`
and exits 1.
"""

import asyncio
import json
import os
import random
import socket
import sys
import urllib.parse
import urllib.request

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

MAX = 4 << 20
FLOOD_SENT = [0]
# wss:// and https:// through a gateway with TLS: trust this CA file.
SSL = None
if os.environ.get("WS_CA_FILE"):
    import ssl

    SSL = ssl.create_default_context(cafile=os.environ["WS_CA_FILE"])


def tls(url):
    return {"ssl": SSL} if url.startswith("wss:") else {}


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fail(what):
    say("FAIL " + what)
    sys.exit(1)


# ---------------------------------------------------------------- app


def split(path):
    p, _, q = path.partition("?")
    return p, dict(urllib.parse.parse_qsl(q))


async def handler(ws):
    p, args = split(ws.request.path)
    last = p.rstrip("/").rsplit("/", 1)[-1]
    if last == "echo":
        try:
            async for m in ws:
                await ws.send(m)
        except ConnectionClosed:
            pass
        code = ws.close_code
        say(f"APP_CLOSED {args.get('tag', '-')} {code}")
    elif last == "push":
        for i in range(int(args["n"])):
            await ws.send(f"push {i}")
        await ws.wait_closed()
    elif last == "close":
        await ws.close(int(args["code"]), "server bye")
    elif last == "deaf":
        # Never reads: what the client sends piles up until it blocks.
        await asyncio.Future()
    elif last == "flood":
        chunk = os.urandom(65536)
        try:
            while True:
                await ws.send(chunk)
                FLOOD_SENT[0] += len(chunk)
        except ConnectionClosed:
            pass
    else:
        await ws.close(1008, "unknown path")


def http_answer(connection, request):
    p, _ = split(request.path)
    if "/http/" not in p:
        return None  # a WebSocket handshake
    if p.endswith("/flood-sent"):
        return connection.respond(200, f"{FLOOD_SENT[0]}\n")
    return connection.respond(200, "ok\n")


async def app():
    async with serve(handler, "127.0.0.1", 0, process_request=http_answer,
                     max_size=MAX, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        say(f"LISTENING {port}")
        await server.serve_forever()


# ---------------------------------------------------------------- client


def body(i):
    """Message i of the echo run: text and binary alternate; sizes from 0
    to 4000 bytes, and every 1000th is 1 MiB."""
    n = (1 << 20) if i % 1000 == 999 else (0, 1, 7, 100, 1000, 4000)[i % 6]
    if i % 2:
        return random.Random(i).randbytes(n)
    return ("%06d" % i + "é" * n)[: max(n, 6)]


async def echo(base, n=10_000, batch=100, tag="echo"):
    async with connect(f"{base}/echo?tag={tag}", max_size=MAX, ping_interval=None, **tls(base)) as ws:
        for start in range(0, n, batch):
            msgs = [body(i) for i in range(start, min(n, start + batch))]
            for m in msgs:
                await ws.send(m)
            for i, m in enumerate(msgs):
                got = await ws.recv()
                if got != m:
                    fail(f"echo {start + i}: {type(got).__name__} of {len(got)} for "
                         f"{type(m).__name__} of {len(m)}")
        return n


async def scenario_echo(base, n):
    done = await echo(base, int(n))
    return {"echoed": done}


async def scenario_ping(base):
    async with connect(f"{base}/echo?tag=ping", ping_interval=None, **tls(base)) as ws:
        for i in range(20):
            waiter = await ws.ping(f"ping-{i}".encode())
            latency = await asyncio.wait_for(waiter, 10)
            await ws.send(f"between {i}")
            if await ws.recv() != f"between {i}":
                fail(f"message after ping {i}")
        return {"pongs": 20, "last_latency": latency}


async def scenario_push(base, n):
    n = int(n)
    async with connect(f"{base}/push?n={n}", ping_interval=None) as ws:
        # Silent client: nothing is sent, the app pushes.
        for i in range(n):
            got = await ws.recv()
            if got != f"push {i}":
                fail(f"push {i}: got {got!r}")
        return {"pushed": n}


async def scenario_close(base):
    """Close codes both ways: the client closes echo sessions with each
    code (the app prints what it got), the app closes with each code (the
    client checks what it got)."""
    got = {}
    for code in (1000, 1001, 4000):
        async with connect(f"{base}/echo?tag=client{code}", ping_interval=None, **tls(base)) as ws:
            await ws.send("hi")
            await ws.recv()
            await ws.close(code, "client bye")
            if ws.close_code != code:
                fail(f"client close {code}: echoed close code {ws.close_code}")
        async with connect(f"{base}/close?code={code}", ping_interval=None, **tls(base)) as ws:
            try:
                await ws.recv()
                fail(f"server close {code}: a message instead of the close")
            except ConnectionClosed as e:
                rcvd = e.rcvd.code if e.rcvd else None
                if rcvd != code or e.rcvd.reason != "server bye":
                    fail(f"server close {code}: client got {e.rcvd!r}")
                got[code] = rcvd
    return {"server_codes": got}


def http_get(url):
    with urllib.request.urlopen(url, timeout=30, context=SSL) as r:
        return r.status, r.read()


async def scenario_many(base, http_base, sessions):
    """`sessions` WebSocket sessions at once (each echoes 20 messages),
    while HTTP requests go through the same tunnel until they are done."""
    sessions = int(sessions)
    opened = asyncio.Event()
    count = [0]

    async def one(k):
        async with connect(f"{base}/echo?tag=many{k}", ping_interval=None,
                           open_timeout=60) as ws:
            count[0] += 1
            if count[0] == sessions:
                opened.set()
            await opened.wait()  # all are open at the same time
            for i in range(20):
                m = f"s{k}m{i}"
                await ws.send(m)
                if await ws.recv() != m:
                    fail(f"session {k} message {i}")

    http = {"ok": 0, "during": 0}
    stop = asyncio.Event()

    async def http_loop():
        while not stop.is_set():
            status, text = await asyncio.to_thread(http_get, f"{http_base}/http/ping")
            if status != 200 or text != b"ok\n":
                fail(f"HTTP during sessions: {status} {text!r}")
            http["ok"] += 1
            if opened.is_set():
                http["during"] += 1

    loop = asyncio.create_task(http_loop())
    await asyncio.gather(*(one(k) for k in range(sessions)))
    stop.set()
    await loop
    if http["during"] == 0:
        fail("no HTTP request was served while all sessions were open")
    return {"sessions": sessions, "http": http}


async def scenario_stall(base, http_base):
    """A client that stops reading (the app floods it) stalls nobody: an
    echo session and HTTP requests on the same tunnel complete while the
    flood is held back, and the flood's app has sent only a bounded
    amount (windows and socket buffers), however long the others ran."""
    flood = await connect(f"{base}/flood", max_size=MAX, ping_interval=None)
    # It moves at first...
    while int((await asyncio.to_thread(http_get, f"{http_base}/http/flood-sent"))[1]) < (1 << 20):
        await asyncio.sleep(0.01)
    # ...and never read again: the others go on.
    echoed = await echo(base, 2000, tag="beside-flood")
    https = 0
    for _ in range(50):
        status, _ = await asyncio.to_thread(http_get, f"{http_base}/http/ping")
        https += status == 200
    sent1 = int((await asyncio.to_thread(http_get, f"{http_base}/http/flood-sent"))[1])
    echoed += await echo(base, 2000, tag="beside-flood-2")
    sent2 = int((await asyncio.to_thread(http_get, f"{http_base}/http/flood-sent"))[1])
    flood.transport.abort()
    if https != 50:
        fail(f"HTTP beside the stalled stream: {https} of 50")
    if sent2 > (48 << 20):
        fail(f"the flood app sent {sent2} bytes to a client that reads nothing")
    return {"echoed": echoed, "http": https, "flood_sent": [sent1, sent2]}


async def scenario_stall_app(base, http_base):
    """An app that stops reading (the client keeps sending) stalls nobody:
    the sender blocks after a bounded amount while an echo session and
    HTTP requests on the same tunnel complete."""
    deaf = await connect(f"{base}/deaf", max_size=MAX, ping_interval=None)
    sent = [0]
    chunk = os.urandom(65536)

    async def pour():
        while True:
            await deaf.send(chunk)
            sent[0] += len(chunk)

    pouring = asyncio.create_task(pour())
    while sent[0] < (1 << 20):
        await asyncio.sleep(0.01)
    echoed = await echo(base, 2000, tag="beside-deaf")
    https = 0
    for _ in range(50):
        status, _ = await asyncio.to_thread(http_get, f"{http_base}/http/ping")
        https += status == 200
    sent1 = sent[0]
    echoed += await echo(base, 2000, tag="beside-deaf-2")
    sent2 = sent[0]
    pouring.cancel()
    deaf.transport.abort()
    if https != 50:
        fail(f"HTTP beside the deaf app: {https} of 50")
    if sent2 > (48 << 20):
        fail(f"the client sent {sent2} bytes to an app that reads nothing")
    return {"echoed": echoed, "http": https, "client_sent": [sent1, sent2]}


async def scenario_kill(base):
    """Opens an echo session, says READY, then waits: the test kills the
    receiver, and the client must see its connection end."""
    ws = await connect(f"{base}/echo?tag=kill", ping_interval=None)
    await ws.send("before")
    if await ws.recv() != "before":
        fail("echo before the kill")
    say("READY")
    try:
        m = await asyncio.wait_for(ws.recv(), 60)
        fail(f"a message after the receiver died: {m!r}")
    except ConnectionClosed as e:
        return {"closed": True, "code": ws.close_code, "rcvd": str(e.rcvd)}
    except asyncio.TimeoutError:
        fail("the connection stayed open 60 s after the receiver was killed")


def scenario_garbage(base):
    """A raw client: a valid handshake, then bytes that are no WebSocket
    frames. They are relayed (the app fails the connection) or the
    connection is closed; either way it ends."""
    u = urllib.parse.urlsplit(base)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.sendall((f"GET {u.path}/echo?tag=garbage HTTP/1.1\r\nHost: {u.netloc}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(4096)
        if not b:
            fail(f"closed before the 101: {head!r}")
        head += b
    if not head.startswith(b"HTTP/1.1 101"):
        fail(f"no 101: {head!r}")
    if b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" not in head:
        fail(f"Sec-WebSocket-Accept not relayed: {head!r}")
    s.sendall(random.Random(7).randbytes(8192) + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    got = 0
    while True:
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        if not b:
            break
        got += len(b)
    return {"ended": True, "bytes_after_101": got}


def main():
    if sys.argv[1] == "app":
        asyncio.run(app())
        return
    name, args = sys.argv[2], sys.argv[3:]
    if name == "garbage":
        result = scenario_garbage(*args)
    else:
        result = asyncio.run(globals()["scenario_" + name](*args))
    say("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
