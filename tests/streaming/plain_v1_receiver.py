#!/usr/bin/env python3
"""A plain ANPX v1 receiver, standard library only, shaped like the Python
reference implementation (PROTOCOL.md sections 1-6): it offers no
extensions (no X-ANPX-Features header), uses UUID v4 request ids where it
makes ids, sends chunk_tot on every chunk and resp_meta in the LAST chunk
of a chunked response, and its decoder fails a frame with an unknown tag,
as the reference's does.

    plain_v1_receiver.py WS_URL TOKEN UPSTREAM_HOST:PORT

Prints on stdout (flushed):
    CONNECTED {"status": 101, "headers": {...lowercased 101 headers...}}
    VIOLATION <what>       for anything a reference peer could not take
    SERVED <request_id> <status> <request body bytes> <response body bytes>
The tunnel carries requests to the app over http.client, one thread each.
"""

import base64
import hashlib
import http.client
import json
import os
import socket
import struct
import sys
import threading
import urllib.parse
import zlib

CHUNK_SIZE = 65536
# Body bytes per chunk the reference encoder uses at chunk_size 65536
# (PROTOCOL.md test vector chunked_response_150k: frames of 65568 bytes).
BODY_PER_CHUNK = 65480
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KNOWN_TAGS = {0x01, 0x02, 0x03, 0x04, 0x0A, 0x0B, 0x0C}

out_lock = threading.Lock()


def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def violation(what):
    say("VIOLATION " + what)


# ---------------------------------------------------------------- WebSocket


class WebSocket:
    """RFC 6455 client side: masked frames out, unmasked frames in."""

    def __init__(self, url, token):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_lock = threading.Lock()
        self.rbuf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET {u.path or '/'} HTTP/1.1\r\n"
            f"Host: {u.hostname}:{u.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        while b"\r\n\r\n" not in self.rbuf:
            d = self.sock.recv(65536)
            if not d:
                raise SystemExit("gateway closed during the handshake")
            self.rbuf += d
        head, self.rbuf = self.rbuf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for l in lines[1:]:
            n, _, v = l.partition(":")
            self.headers[n.strip().lower()] = v.strip()
        if self.status != 101:
            raise SystemExit(f"upgrade refused: {lines[0]} {self.rbuf[:300]!r}")
        want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if self.headers.get("sec-websocket-accept") != want:
            raise SystemExit("bad Sec-WebSocket-Accept")

    def _read(self, n):
        while len(self.rbuf) < n:
            d = self.sock.recv(1 << 20)
            if not d:
                raise EOFError
            self.rbuf += d
        b, self.rbuf = self.rbuf[:n], self.rbuf[n:]
        return b

    def send(self, opcode, payload):
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        if n:
            m = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")
        with self.send_lock:
            self.sock.sendall(head + mask + payload)

    def recv(self):
        """One whole message: (opcode, payload); control frames answered."""
        parts, first_op = [], None
        while True:
            b0, b1 = self._read(2)
            fin, op = b0 & 0x80, b0 & 0x0F
            if b1 & 0x80:
                violation("server frame is masked")
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            if b1 & 0x80:
                self._read(4)
            payload = self._read(n)
            if op == 0x9:
                self.send(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op == 0x8:
                return op, payload
            if op != 0:
                first_op = op
            parts.append(payload)
            if fin:
                return first_op, b"".join(parts)


# ---------------------------------------------------------------- ANPX v1


def encode_frame(ftype, tlvs, chunked):
    body = b"".join(struct.pack(">BI", tag, len(v)) + v for tag, v in tlvs)
    total = 24 + len(body)
    head = b"ANPX" + bytes([1, ftype, 1 if chunked else 0, 0]) + struct.pack(">I", total)
    crcs = struct.pack(">II", zlib.crc32(head) & 0xFFFFFFFF, zlib.crc32(body) & 0xFFFFFFFF)
    return head + crcs + b"\0\0\0\0" + body


def decode_frame(msg):
    """Strict, as the reference decoder: returns (type, flags, {tag: value})."""
    if len(msg) < 24 or msg[:4] != b"ANPX":
        raise ValueError("bad magic or short frame")
    if msg[4] != 1:
        raise ValueError("version %d" % msg[4])
    total, hcrc, bcrc = struct.unpack(">III", msg[8:20])
    if zlib.crc32(msg[:12]) & 0xFFFFFFFF != hcrc:
        raise ValueError("bad header crc")
    if total != len(msg):
        raise ValueError("total_len %d != message %d" % (total, len(msg)))
    body = msg[24:]
    if zlib.crc32(body) & 0xFFFFFFFF != bcrc:
        raise ValueError("bad body crc")
    tlvs, i = {}, 0
    while i < len(body):
        if i + 5 > len(body):
            raise ValueError("truncated tlv head")
        tag, n = struct.unpack(">BI", body[i : i + 5])
        if i + 5 + n > len(body):
            raise ValueError("tlv overruns the body")
        if tag not in KNOWN_TAGS:
            raise ValueError("unknown tag 0x%02x" % tag)  # the reference fails here
        tlvs[tag] = body[i + 5 : i + 5 + n]
        i += 5 + n
    return msg[5], msg[6], tlvs


def encode_response(rid, meta, body):
    """The reference's framing: one frame if it fits, else chunks with
    chunk_tot on every frame and resp_meta + final_chunk in the last."""
    rid_b, meta_b = rid.encode(), json.dumps(meta).encode()
    single = [(0x01, rid_b), (0x04, meta_b), (0x03, body)]
    if 24 + sum(5 + len(v) for _, v in single) <= CHUNK_SIZE:
        return [encode_frame(0x02, single, False)]
    pieces = [body[i : i + BODY_PER_CHUNK] for i in range(0, len(body), BODY_PER_CHUNK)]
    frames = []
    for idx, p in enumerate(pieces):
        tlvs = [(0x01, rid_b), (0x0A, struct.pack(">I", idx)), (0x0B, struct.pack(">I", len(pieces)))]
        if idx == len(pieces) - 1:
            tlvs += [(0x04, meta_b), (0x0C, b"\x01")]
        tlvs.append((0x03, p))
        frames.append(encode_frame(0x02, tlvs, True))
    return frames


# ---------------------------------------------------------------- receiver


class Receiver:
    def __init__(self, ws, upstream):
        self.ws = ws
        self.host, port = upstream.rsplit(":", 1)
        self.port = int(port)
        self.assembling = {}  # request_id -> {"parts": {idx: body}, "meta": ..., "tot": ..., "final": ...}

    def run(self):
        while True:
            try:
                op, payload = self.ws.recv()
            except EOFError:
                return
            if op == 0x8:
                return
            if op == 0x1:
                try:
                    t = json.loads(payload).get("type")
                except ValueError:
                    t = None
                if t == "credit":
                    violation("credit control message sent to a plain v1 peer")
                continue
            if op != 0x2:
                violation("opcode %d" % op)
                continue
            try:
                ftype, flags, tlvs = decode_frame(payload)
            except ValueError as e:
                violation("undecodable frame: %s" % e)
                continue
            self.on_frame(ftype, flags, tlvs)

    def on_frame(self, ftype, flags, tlvs):
        if ftype != 0x01:
            violation("frame type %d from the gateway" % ftype)
            return
        rid = tlvs.get(0x01, b"").decode()
        if not rid:
            violation("frame without request_id")
            return
        if not flags & 1:
            self.start(rid, tlvs.get(0x02), tlvs.get(0x03, b""))
            return
        if 0x0A not in tlvs:
            violation("chunked frame without chunk_idx")
            return
        a = self.assembling.setdefault(rid, {"parts": {}, "meta": None, "tot": None, "final": None})
        idx = struct.unpack(">I", tlvs[0x0A])[0]
        if idx in a["parts"]:
            violation("duplicate chunk %d of %s" % (idx, rid))
        a["parts"][idx] = tlvs.get(0x03, b"")
        if 0x02 in tlvs:
            a["meta"] = tlvs[0x02]
        if 0x0B in tlvs:
            a["tot"] = struct.unpack(">I", tlvs[0x0B])[0]
        if tlvs.get(0x0C) == b"\x01":
            a["final"] = idx
        n = a["tot"] if a["tot"] is not None else (a["final"] + 1 if a["final"] is not None else None)
        if n is not None and len(a["parts"]) == n:
            del self.assembling[rid]
            body = b"".join(a["parts"][i] for i in range(n))
            self.start(rid, a["meta"], body)

    def start(self, rid, meta_b, body):
        if meta_b is None:
            violation("request %s without http_meta" % rid)
            return
        meta = json.loads(meta_b)
        if body:
            # The whole-message path promises a sized body: a chunked
            # upload's length is known once it is whole, and sent on.
            sizes = [v for k, v in (meta.get("headers") or {}).items() if k.lower() == "content-length"]
            if sizes != [str(len(body))]:
                violation("request %s: content-length %r for a body of %d bytes" % (rid, sizes, len(body)))
        for k in ("raw_target", "header_list"):
            if k in meta:
                violation("meta carries %r, an extension this peer did not ask for" % k)
        threading.Thread(target=self.serve, args=(rid, meta, body), daemon=True).start()

    def serve(self, rid, meta, body):
        try:
            path = urllib.parse.quote(meta["path"], safe="/:@!$&'()*+,;=-._~")
            q = urllib.parse.urlencode(meta.get("query") or {})
            target = path + ("?" + q if q else "")
            headers = {
                k: v
                for k, v in (meta.get("headers") or {}).items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }
            c = http.client.HTTPConnection(self.host, self.port, timeout=60)
            c.request(meta["method"], target, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            c.close()
            rh = {}
            for k, v in r.getheaders():
                if k.lower() not in ("transfer-encoding", "connection"):
                    rh[k.lower()] = v
            resp_meta = {"status": r.status, "reason": r.reason, "headers": rh}
            frames = encode_response(rid, resp_meta, data)
            status = r.status
        except Exception as e:  # noqa: BLE001 - any failure becomes an error frame
            frames = [encode_frame(0xFF, [(0x01, rid.encode()), (0x03, str(e).encode())], False)]
            data, status = b"", 0
        # Said before the frames go: the client has its answer only after
        # they went, so the line is in the pipe before the test stops us.
        say("SERVED %s %d %d %d" % (rid, status, len(body), len(data)))
        for f in frames:
            self.ws.send(0x2, f)


def main():
    url, token, upstream = sys.argv[1], sys.argv[2], sys.argv[3]
    ws = WebSocket(url, token)
    say("CONNECTED " + json.dumps({"status": ws.status, "headers": ws.headers}))
    Receiver(ws, upstream).run()


if __name__ == "__main__":
    main()
