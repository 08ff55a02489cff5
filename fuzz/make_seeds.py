#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/<target>/ (README.md, "Seeds").

Seeds are real inputs: ANPX frames from tests/data/anpx-vectors.json and
frames built the way encode_frame builds them, HTTP heads and chunked bodies
as clients and apps send them, RFC 6455 §5.7's example frames, and the
DIDWba / RFC 9421 headers of tests/data/didwba/vectors.json. Each file is
in the input format its target documents (config bytes first where it has
one). Re-run after changing a format; regression inputs (regress-*) are
kept by hand and never rewritten here.
"""

import json
import os
import struct
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
# Vector frames above this size are left out: seeds stay small.
MAX_SEED = 4096


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- ANPX (PROTOCOL.md §2-3) ------------------------------------------------

REQ, RESP, ERR = 0x01, 0x02, 0xFF


def tlv(tag, value):
    return struct.pack(">BI", tag, len(value)) + value


def frame(ty, rid, meta=None, body=b"", chunk=None):
    """chunk = (idx, tot or None, final); TLV order as encode_frame."""
    b = tlv(0x01, rid.encode())
    if chunk:
        b += tlv(0x0A, struct.pack(">I", chunk[0]))
        if chunk[1] is not None:
            b += tlv(0x0B, struct.pack(">I", chunk[1]))
    if meta is not None:
        b += tlv(0x02 if ty == REQ else 0x04, meta)
    if body:
        b += tlv(0x03, body)
    if chunk and chunk[2]:
        b += tlv(0x0C, b"\x01")
    head = b"ANPX" + bytes([1, ty, 1 if chunk else 0, 0]) + struct.pack(">I", 24 + len(b))
    head += struct.pack(">I", zlib.crc32(head))
    head += struct.pack(">I", zlib.crc32(b)) + b"\0" * 4
    return head + b


REQ_META = b'{"method":"POST","path":"/agents/a","headers":{"host":"gw.example"},"query":{}}'
RESP_META = b'{"status":200,"reason":"OK","headers":{"content-type":"text/plain"}}'


def records(frames):
    return b"".join(struct.pack("<H", len(f)) + f for f in frames)


def anpx():
    with open(os.path.join(ROOT, "tests", "data", "anpx-vectors.json")) as f:
        vectors = json.load(f)["cases"]
    for case in vectors:
        frames = [bytes.fromhex(h) for h in case["frames"]]
        if all(len(fr) <= MAX_SEED for fr in frames):
            for i, fr in enumerate(frames):
                write("anpx_decode", f"vector-{case['name']}-{i}", fr)
            if len(frames) == 1:
                write("anpx_reassemble", f"vector-{case['name']}", b"\xe0" + records(frames))
    built = {
        "chunk0-meta": frame(REQ, "r1", REQ_META, b"abc", (0, 3, False)),
        "chunk-mid": frame(REQ, "r1", None, b"def", (1, 3, False)),
        "chunk-final-stream": frame(RESP, "r2", None, b"xyz", (4, None, True)),
        "error": frame(ERR, "r3", None, b"upstream gone"),
        "response-whole": frame(RESP, "r4", RESP_META, b"hello"),
    }
    for name, fr in built.items():
        write("anpx_decode", f"built-{name}", fr)

    # Whole chunked messages, in order, out of order, streamed (no tot),
    # interleaved requests, and an error cancelling a partial one.
    write("anpx_reassemble", "chunked-in-order", b"\x36" + records([
        frame(REQ, "a", REQ_META, b"0123", (0, 3, False)),
        frame(REQ, "a", None, b"4567", (1, 3, False)),
        frame(REQ, "a", None, b"89", (2, 3, True)),
    ]))
    write("anpx_reassemble", "chunked-out-of-order", b"\x36" + records([
        frame(RESP, "b", None, b"tail", (2, 3, True)),
        frame(RESP, "b", RESP_META, b"head", (0, 3, False)),
        frame(RESP, "b", None, b"mid", (1, 3, False)),
    ]))
    write("anpx_reassemble", "streamed-final-chunk", b"\x36" + records([
        frame(RESP, "c", RESP_META, b"x" * 40, (0, None, False)),
        frame(RESP, "c", None, b"y" * 40, (1, None, True)),
    ]))
    write("anpx_reassemble", "interleaved-and-cancelled", b"\x24" + records([
        frame(REQ, "d", REQ_META, b"d0", (0, 2, False)),
        frame(REQ, "e", REQ_META, b"e0", (0, 2, False)),
        frame(ERR, "d", None, b"client left"),
        frame(REQ, "e", None, b"e1", (1, 2, True)),
    ]))


# --- HTTP/1.1 (RFC 9112) ----------------------------------------------------

REQUESTS = {
    "get": b"GET /agents/alice/ad.json HTTP/1.1\r\nHost: gw.example\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    "post-cl": b"POST /api/v1/run?q=test HTTP/1.1\r\nHost: gw.example:8080\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\":\"hello\"}",
    "post-chunked-expect": b"PUT /up HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "absolute-form": b"GET http://gw.example:8089/p/a%20b?x=1 HTTP/1.1\r\nHost: gw.example:8089\r\n\r\n",
    "options-asterisk": b"OPTIONS * HTTP/1.1\r\nHost: gw.example\r\n\r\n",
    "http10-keepalive": b"\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "ws-upgrade": b"GET /ws HTTP/1.1\r\nHost: gw.example:8089\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-ANPX-Features: exact, stream, cancel\r\n\r\n",
    "pipelined": b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "smuggle-cl-te": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}

RESPONSES = {
    "200-cl": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    "204": b"HTTP/1.1 204 No Content\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "http10-close": b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.12\r\n\r\nbody until close",
    "lenient-bare-lf": b"HTTP/1.1 404  Not Found\nContent-Length : 0\n\n",
    "100-continue": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    "te-and-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
}

# Chunked bodies; the first byte is the target's config byte.
CHUNKED = {
    "simple": b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "ext-and-trailer": b"4;name=value\r\nWiki\r\n5 ;x\r\npedia\r\n0\r\nExpires: never\r\nX-T: 1\r\n\r\n",
    "upper-hex-pipelined": b"A\r\n0123456789\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
    "one-byte-chunks": b"".join(b"1\r\n" + bytes([c]) + b"\r\n" for c in b"abcdef") + b"0\r\n\r\n",
    "leading-zeros": b"000000000000000f\r\n0123456789abcde\r\n0\r\n\r\n",
}


def http():
    for name, req in REQUESTS.items():
        write("http_request_head", name, req)
    for name, resp in RESPONSES.items():
        write("http_response_head", name, resp)
    for i, (name, body) in enumerate(CHUNKED.items()):
        write("http_chunked", name, bytes([0x03 | (i << 2)]) + body)


# --- WebSocket (RFC 6455 §5.7) ----------------------------------------------

# Config byte: bit 0 = role (0 server: receives masked; 1 client: unmasked).
WS_SERVER = {
    "masked-hello": bytes.fromhex("818537fa213d7f9f4d5158"),
    "masked-ping-hello": bytes.fromhex("898537fa213d7f9f4d5158"),
    "masked-close-1000": bytes.fromhex("8882") + b"\x01\x02\x03\x04" + bytes([0x03 ^ 0x01, 0xE8 ^ 0x02]),
}
WS_CLIENT = {
    "unmasked-hello": bytes.fromhex("810548656c6c6f"),
    "fragmented-hello": bytes.fromhex("010348656c800" "2" "6c6f"),
    "pong-hello": bytes.fromhex("8a0548656c6c6f"),
    "binary-256": bytes.fromhex("827e0100") + bytes(range(256)),
    "binary-64k": bytes.fromhex("827f0000000000010000") + b"\xab" * 16,
    "ping-inside-fragments": bytes.fromhex("010348656c") + bytes.fromhex("890548656c6c6f") + bytes.fromhex("80026c6f"),
}


def ws():
    for i, (name, data) in enumerate(WS_SERVER.items()):
        write("ws_frames", name, bytes([(i << 3) | 0x06]) + data)
    for i, (name, data) in enumerate(WS_CLIENT.items()):
        write("ws_frames", name, bytes([(i << 3) | 0x07]) + data)


# --- DID-WBA ------------------------------------------------------------------


def didwba():
    with open(os.path.join(ROOT, "tests", "data", "didwba", "vectors.json")) as f:
        cases = json.load(f)["cases"]
    for c in cases:
        h = c["headers"]
        if "Authorization" in h:
            write("didwba_header", c["name"], h["Authorization"].encode())
        if "Signature-Input" in h:
            write("signature_input", c["name"],
                  (h["Signature-Input"] + "\n" + h["Signature"]).encode())
    write("didwba_header", "v11-unquoted-mixed-case",
          b'didwba V=1.1,DID=did:wba:a.example,nonce="n", Timestamp=2025-01-01T00:00:00Z '
          b'verification_method=key-1 signature="c2ln" extra="x"')
    write("signature_input", "two-members-more-components",
          b'sig0=("@path" "@query");created=1, sig1=("@method" "@scheme" "@request-target" '
          b'"content-digest" "x-dup");created=1700000000;expires=1700000300;nonce="n1";'
          b'keyid="did:wba:a.example#key-1";alg="ecdsa-p256-sha256"\n'
          b'sig1=:c2lnbmF0dXJl:, other=:YQ==:')


def binmeta():
    """docs/PROTOCOL.md §7.5: request and response metas, bytes kept."""
    def b(x):
        return struct.pack(">I", len(x)) + x

    def fields(fs):
        return struct.pack(">I", len(fs)) + b"".join(b(n) + b(v) for n, v in fs)

    def req(m, t, fs):
        return b"\xb1" + b(m) + b(t) + fields(fs)

    def resp(status, reason, fs):
        return b"\xb1" + struct.pack(">H", status) + b(reason) + fields(fs)

    write("binmeta", "request_get", req(b"GET", b"/alice/a%20b?x=1",
                                        [(b"Host", b"h"), (b"X-Dup", b"1"), (b"x-dup", b"2")]))
    write("binmeta", "request_bytes", req(b"POST", b"/\xff",
                                          [(b"X-Raw", b"caf\xe9"), (b"content-length", b"3")]))
    write("binmeta", "response_ok", resp(200, b"OK", [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")]))
    write("binmeta", "response_empty", resp(204, b"", []))


if __name__ == "__main__":
    binmeta()
    anpx()
    http()
    ws()
    didwba()
