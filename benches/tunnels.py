#!/usr/bin/env python3
"""`make bench-tunnels` (and the tunnels section of `make bench`): what an
idle tunnel costs, and how fast tunnels are accepted (issue 17).

Usage: python3 benches/tunnels.py [--counts 1000,10000] [--workers 2]
                                  [--out DIR] [--bin PATH] [--no-receiver]

Starts everything itself on free loopback ports and stops it on exit.

* Gateway, per count N: a release gateway (`--workers`, default 2) whose
  config holds N token identities (`[[gateway.auth.tokens]]`, one prefix
  each). This script then opens N tunnels of distinct identities with raw
  WebSocket upgrades (64 handshakes in flight), answers the gateway's pings
  so they stay up, and reports:
    - KiB per idle tunnel = (RSS with N idle tunnels - RSS before) / N,
      both read once RSS has settled;
    - handshakes per second over the N upgrades (the client is this Python
      script on the same cores, so it bounds the figure), and the gateway's
      own CPU time per handshake (utime + stime from /proc, which does not
      depend on the client's speed).
* Receiver, per count N: one receiver process with `tunnels = N` (pinned)
  to a gateway with one token identity. KiB per idle tunnel =
  (RSS with N tunnels - RSS with 2 tunnels) / (N - 2): both runs have the
  same threads, runtimes and upstream pool, so what is left is what each
  tunnel holds. With `anp-loadgen` and `anp-bench-app` built, the N tunnels
  then carry 5 s of load (256 connections) and go idle again, and the RSS
  after that is reported too: buffers taken for traffic must go back.

Writes DIR/tunnels.json (DIR defaults to bench-results/) and prints a
table. Numbers are reported, never asserted. Python 3 standard library only.
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
GOAL_KIB = 16.0
CONCURRENCY = 64


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """utime + stime of every thread of `pid`, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled_rss(pid, max_wait=10.0):
    """RSS once two samples 0.5 s apart differ by less than 0.5 %: the
    allocator and the runtimes have finished what the last step started."""
    last = rss_kib(pid)
    deadline = time.time() + max_wait
    while time.time() < deadline:
        time.sleep(0.5)
        now = rss_kib(pid)
        if abs(now - last) <= max(64, last * 0.005):
            return now
        last = now
    return last


class Proc:
    def __init__(self, name, argv, cwd):
        self.name = name
        self.out_path = os.path.join(cwd, name + ".out")
        self.err_path = os.path.join(cwd, name + ".err")
        self.p = subprocess.Popen(argv, stdout=open(self.out_path, "w"), stderr=open(self.err_path, "w"),
                                  cwd=cwd, start_new_session=True)
        self.pid = self.p.pid

    def lines_matching(self, rx):
        with open(self.out_path) as f:
            return [m for m in (rx.search(line) for line in f) if m]

    def wait_line(self, pattern, count=1, timeout=60.0):
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        while time.time() < deadline:
            hits = self.lines_matching(rx)
            if len(hits) >= count:
                return hits[count - 1]
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        err = open(self.err_path).read()[-2000:]
        raise RuntimeError(f"{self.name}: {count} lines matching {pattern!r} not seen "
                           f"(exit {self.p.poll()}); stderr:\n{err}")

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(10)


GATEWAY_HEAD = """[logging]
level = "warn"
[gateway]
host = "127.0.0.1"
port = 0
workers = {workers}
max_connections = {max_conns}
max_pending_upgrades_per_ip = 4096
max_pending_upgrades = 4096
keepalive_timeout = 600.0
"""

TOKEN_ENTRY = """[[gateway.auth.tokens]]
name = "{name}"
token = "{token}"
paths = ["{path}"]
"""


def token_of(i):
    return f"bench-tunnel-token-{i:06d}"


def start_gateway(binary, tmp, workers, identities, tunnels, name="gateway"):
    conf = os.path.join(tmp, name + ".toml")
    with open(conf, "w") as f:
        f.write(GATEWAY_HEAD.format(workers=workers, max_conns=tunnels + 2000))
        for i in range(identities):
            f.write(TOKEN_ENTRY.format(name=f"id{i}", token=token_of(i), path=f"/id{i}/"))
    gw = Proc(name, [binary, "gateway", "--config", conf], tmp)
    try:
        m = gw.wait_line(r"listening on http://127\.0\.0\.1:(\d+) ")
    except BaseException:
        gw.stop()
        raise
    return gw, int(m.group(1))


# -- raw tunnels (the receiver's side of the upgrade, nothing more) ----------

class RawTunnels:
    """N WebSocket tunnels opened by hand: the upgrade, then pongs to the
    gateway's pings, nothing else (an idle receiver)."""

    def __init__(self, port):
        self.port = port
        self.writers = []
        self.tasks = []
        self.failed = 0
        self.first_error = None

    async def open_one(self, i, sem):
        async with sem:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write((
                    f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"Authorization: Bearer {token_of(i)}\r\n"
                    f"X-ANPX-Features: exact, stream, cancel\r\nX-ANPX-Instance: bench-{i}\r\n\r\n"
                ).encode())
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
                if not head.startswith(b"HTTP/1.1 101"):
                    raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            except Exception as e:  # noqa: BLE001 (counted and reported)
                self.failed += 1
                self.first_error = self.first_error or repr(e)
                return
        self.writers.append(w)
        self.tasks.append(asyncio.ensure_future(self.pong_loop(r, w)))

    @staticmethod
    async def pong_loop(r, w):
        try:
            while True:
                b0, b1 = await r.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(await r.readexactly(2), "big")
                elif n == 127:
                    n = int.from_bytes(await r.readexactly(8), "big")
                payload = await r.readexactly(n)
                if b0 & 0x0F == 0x9:
                    # A masked pong (client role), all-zero key: RFC 6455 §5.3.
                    w.write(bytes([0x8A, 0x80 | len(payload), 0, 0, 0, 0]) + payload)
                elif b0 & 0x0F == 0x8:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def open(self, n):
        sem = asyncio.Semaphore(CONCURRENCY)
        await asyncio.gather(*(self.open_one(i, sem) for i in range(n)))

    def close(self, loop):
        for t in self.tasks:
            t.cancel()
        for w in self.writers:
            w.close()
        loop.run_until_complete(asyncio.gather(*self.tasks, return_exceptions=True))


def gateway_run(args, tmp, n):
    gw, port = start_gateway(args.bin, tmp, args.workers, n, n, name=f"gateway-{n}")
    loop = asyncio.new_event_loop()
    tunnels = RawTunnels(port)
    try:
        before = settled_rss(gw.pid)
        cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
        loop.run_until_complete(tunnels.open(n))
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(gw.pid) - cpu0
        ok = len(tunnels.writers)

        # Idle: pings keep flowing (answered by the pong loops).
        async def idle():
            await asyncio.sleep(0.5)
            return await loop.run_in_executor(None, settled_rss, gw.pid)
        after = loop.run_until_complete(idle())
        r = {
            "tunnels": ok,
            "failed": tunnels.failed,
            "first_error": tunnels.first_error,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_tunnel": round((after - before) / ok, 2) if ok else None,
            "handshake_seconds": round(elapsed, 3),
            "handshakes_per_second": round(ok / elapsed) if elapsed > 0 else None,
            "gateway_cpu_us_per_handshake": round(cpu / ok * 1e6, 1) if ok else None,
            "handshakes_in_flight": CONCURRENCY,
        }
        log(f"  gateway, {n} tunnels: {r['kib_per_tunnel']} KiB/tunnel, "
            f"{r['handshakes_per_second']} handshakes/s, {r['gateway_cpu_us_per_handshake']} us CPU each"
            + (f", {tunnels.failed} failed ({tunnels.first_error})" if tunnels.failed else ""))
        return r
    finally:
        tunnels.close(loop)
        loop.close()
        gw.stop()


# -- receiver ---------------------------------------------------------------

RECEIVER_CONF = """[logging]
level = "warn"
[receiver]
gateway_url = "ws://127.0.0.1:{gw_port}/ws"
upstream = "http://127.0.0.1:{app_port}"
token = "{token}"
tunnels = {tunnels}
max_concurrent = 1024
instance_id = "bench"
"""


def start_receiver(binary, tmp, gw_port, app_port, tunnels):
    conf = os.path.join(tmp, f"receiver-{tunnels}.toml")
    with open(conf, "w") as f:
        f.write(RECEIVER_CONF.format(gw_port=gw_port, app_port=app_port, token=token_of(0), tunnels=tunnels))
    rx = Proc(f"receiver-{tunnels}", [binary, "receiver", "--config", conf], tmp)
    try:
        rx.wait_line(r"tunnel \d+ connected", count=tunnels, timeout=120 + tunnels / 50)
    except BaseException:
        rx.stop()
        raise
    return rx


def loadgen(gw_port, conns, seconds):
    argv = [f"{BIN}/anp-loadgen", "--json", "--url", f"http://127.0.0.1:{gw_port}/id0/b?size=1024",
            "-c", str(conns), "-d", str(seconds), "--warmup", "1", "-t", "2", "--timeout", "5"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f"anp-loadgen failed ({p.returncode}): {p.stderr[-1000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def receiver_run(args, tmp, n, app_port):
    """(RSS with 2 tunnels, RSS with n tunnels, and after traffic)."""
    gw, gw_port = start_gateway(args.bin, tmp, args.workers, 1, n, name=f"gateway-rx-{n}")
    try:
        base = start_receiver(args.bin, tmp, gw_port, app_port, 2)
        base_rss = settled_rss(base.pid)
        base.stop()
        rx = start_receiver(args.bin, tmp, gw_port, app_port, n)
        try:
            idle = settled_rss(rx.pid)
            r = {
                "tunnels": n,
                "rss_2_tunnels_kib": base_rss,
                "rss_kib": idle,
                "kib_per_tunnel": round((idle - base_rss) / (n - 2), 2),
            }
            if app_port:
                lg = loadgen(gw_port, 256, 5)
                after = settled_rss(rx.pid)
                r["after_traffic"] = {
                    "rps": round(lg["rps"]),
                    "errors": lg["errors"],
                    "rss_kib": after,
                    "kib_per_tunnel": round((after - base_rss) / (n - 2), 2),
                }
            log(f"  receiver, {n} tunnels: {r['kib_per_tunnel']} KiB/tunnel idle"
                + (f", {r['after_traffic']['kib_per_tunnel']} KiB/tunnel idle after load" if app_port else ""))
            return r
        finally:
            rx.stop()
    finally:
        gw.stop()


def table(report):
    rows = [("tunnels", "gw KiB/tunnel", "handshakes/s", "gw CPU us/handshake",
             "rx KiB/tunnel", "rx KiB/tunnel after load")]
    rx = {r["tunnels"]: r for r in report["receiver"]}
    gw = {g["tunnels"]: g for g in report["gateway"]}
    for n in sorted(set(rx) | set(gw)):
        g, r = gw.get(n, {}), rx.get(n, {})
        rows.append((
            str(n), str(g.get("kib_per_tunnel", "-")), str(g.get("handshakes_per_second", "-")),
            str(g.get("gateway_cpu_us_per_handshake", "-")), str(r.get("kib_per_tunnel", "-")),
            str(r.get("after_traffic", {}).get("kib_per_tunnel", "-")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append(f"goal: <= {GOAL_KIB:.0f} KiB per idle tunnel on each side (reported, not asserted)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1000,10000", help="tunnel counts, comma-separated")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    ap.add_argument("--bin", default=os.path.join(BIN, "anp-proxy"))
    ap.add_argument("--no-receiver", action="store_true", help="gateway figures only")
    ap.add_argument("--no-gateway", action="store_true", help="receiver figures only")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = max(counts) + 1000
    if hard < need:
        log(f"fd limit {hard} < {need}: counts above {hard - 1000} will fail")
    tmp = tempfile.mkdtemp(prefix="anp-tunnels-")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(),
                    "loadavg_at_start": os.getloadavg()[0]},
        "git_commit": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
        "workers": args.workers,
        "gateway": [],
        "receiver": [],
        "goal_kib_per_idle_tunnel": GOAL_KIB,
    }
    app = None
    try:
        log(f"tunnels bench: counts {counts}, {args.workers} gateway workers, logs in {tmp}")
        for n in counts if not args.no_gateway else []:
            report["gateway"].append(gateway_run(args, tmp, n))
        if not args.no_receiver:
            app_port = 0
            if all(shutil.which(p) or os.path.exists(p) for p in (f"{BIN}/anp-bench-app", f"{BIN}/anp-loadgen")):
                app = Proc("app", [f"{BIN}/anp-bench-app", "--threads", "1"], tmp)
                app_port = int(app.wait_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
            else:
                log("  anp-bench-app / anp-loadgen not built: receiver measured idle only")
            for n in counts:
                report["receiver"].append(receiver_run(args, tmp, n, app_port))
    finally:
        if app:
            app.stop()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tunnels.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(table(report))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
