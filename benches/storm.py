#!/usr/bin/env python3
"""`make bench-storm` (part of `make bench`): a gateway restart with many
tunnels of distinct identities (issue 17, "a reconnect storm is absorbed").

Usage: python3 benches/storm.py [--tunnels N] [--quick] [--out DIR]
                                [--baseline-bin PATH] [--workers N]
                                [--modes before,after] [--bin-dir DIR]

Per mode, on free loopback ports, all stopped on exit:
  * gateway A with N token identities (`id{i}`, token `storm-token-{i}`, `/a{i}`),
  * `anp-storm` (benches/storm/): N token tunnels in one process, one per
    identity, answering requests itself and reconnecting with the
    receiver's own policy (`receiver::backoff`). One receiver process per
    identity would not fit 10,000 on one machine;
  * a takeover: gateway B joins the port with `--takeover`, A gets SIGTERM,
    drains and closes every tunnel with 1001; the tunnels come back to B;
  * client threads (16) requesting a sample of identities throughout
    (a logical request retries a 503 with Retry-After, or no answer at all,
    after 50 ms, like the e2e test).

Modes:
  * before: the issue-17 behaviour switched off: `handshake_rate = 0` on the
    gateway, `anp-storm --legacy` (reconnect within 100 ms of a 1001,
    Retry-After ignored). With `--baseline-bin`, that binary is the gateway.
  * after: defaults (handshake pacing, the 1001 spread hint, Retry-After).

Measured, never asserted: time from SIGTERM until all N are back, the
handshakes/s that makes, upgrades refused, and the latency of logical
requests started during the storm (p50/p99/max, retries). handshakes/s is
N / time-to-all-back; the peak is the most handshakes seen in any 1 s. Writes
DIR/storm.json (DIR defaults to bench-results/) and prints a table.
Python 3 standard library only.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BIN = os.path.join(ROOT, "target", "release")
BIN = DEFAULT_BIN


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def gateway_config(port, n, workers, paced):
    lines = [
        'mode = "gateway"',
        "[logging]",
        'level = "warn"',
        'log_dir = ""',
        "access_log = false",
        "[gateway]",
        'host = "127.0.0.1"',
        f"port = {port}",
        f"workers = {workers}",
        "max_connections = 40000",
        "shutdown_grace = 30",
        "no_tunnel_wait = 2",
        # Every tunnel comes from 127.0.0.1 here, a fleet from N addresses:
        # the per-address cap is lifted; the global one (1,024) stays.
        "max_pending_upgrades_per_ip = 100000",
    ]
    if not paced:
        lines.append("handshake_rate = 0")
    for i in range(n):
        lines += [
            "[[gateway.auth.tokens]]",
            f'name = "id{i}"',
            f'token = "storm-token-{i}"',
            f'paths = ["/a{i}"]',
        ]
    return "\n".join(lines) + "\n"


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, name, argv, cwd):
        self.name = name
        self.err = open(os.path.join(cwd, name + ".err"), "w")
        self.p = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self.err,
            text=True, start_new_session=True,
        )
        self.lines = []
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.lines.append((time.monotonic(), None))
            self.cond.notify_all()

    def wait_line(self, pred, start=0, timeout=180):
        """(index, time, line) of the first line from `start` matching."""
        deadline = time.monotonic() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if line is None:
                        raise RuntimeError(f"{self.name} exited; see {self.err.name}")
                    if pred(line):
                        return i, t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name}: timed out; last: {self.lines[-3:]}")
                self.cond.wait(left)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait()


def field(line, key):
    for f in line.split():
        if f.startswith(key + "="):
            try:
                return int(f.split("=", 1)[1])
            except ValueError:
                return None
    return None


def logical_request(port, i):
    """GET /a{i}/probe until a 200 (retrying 503 + Retry-After, or no
    answer, at most 20 times): (ok, retries, seconds)."""
    t0 = time.monotonic()
    retries = 0
    while True:
        status, retry = 0, True
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("GET", f"/a{i}/probe", headers={"Connection": "close"})
            r = c.getresponse()
            body = r.read()
            status = r.status
            retry = r.getheader("Retry-After") is not None
            c.close()
            if status == 200:
                ok = body == f"storm:{i}:/a{i}/probe".encode()
                return ok, retries, time.monotonic() - t0
        except OSError:
            pass
        if not retry or retries == 20:
            return False, retries, time.monotonic() - t0
        retries += 1
        time.sleep(0.05)


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_mode(mode, args, gateway_bin):
    paced = mode == "after"
    n = args.tunnels
    with tempfile.TemporaryDirectory(prefix=f"anp-storm-{mode}-") as tmp:
        port = free_port()
        cfg = os.path.join(tmp, "gateway.toml")
        with open(cfg, "w") as f:
            f.write(gateway_config(port, n, args.workers, paced))
        procs = []
        try:
            a = Proc("gateway-a", [gateway_bin, "gateway", "--config", cfg], tmp)
            procs.append(a)
            a.wait_line(lambda l: l.startswith("anp-proxy gateway listening on "), timeout=60)
            storm_argv = [
                os.path.join(BIN, "anp-storm"), "--gateway", f"127.0.0.1:{port}",
                "--tunnels", str(n), "--start-rate", "5", "--token-prefix", "storm-token-",
            ]
            if not paced:
                storm_argv.append("--legacy")
            storm = Proc("storm", storm_argv, tmp)
            procs.append(storm)
            i, _, _ = storm.wait_line(lambda l: field(l, "up") == n)
            log(f"[{mode}] {n} tunnels up")

            samples = []  # (start, ok, retries, seconds)
            stop = threading.Event()
            sample_ids = [(k * 7919) % n for k in range(200)]

            def client(c):
                k = c
                while not stop.is_set():
                    t = time.monotonic()
                    ok, retries, secs = logical_request(port, sample_ids[k % len(sample_ids)])
                    samples.append((t, ok, retries, secs))
                    k += args.clients

            clients = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
            for c in clients:
                c.start()
            time.sleep(1.0)  # a baseline of requests before the restart

            b = Proc("gateway-b", [gateway_bin, "gateway", "--config", cfg, "--takeover"], tmp)
            procs.append(b)
            b.wait_line(lambda l: l.startswith("anp-proxy gateway listening on "), timeout=60)
            refused_before = field(storm.lines[-1][1] or "", "refused") or 0
            i_sigterm = len(storm.lines)
            t0 = time.monotonic()
            a.p.send_signal(signal.SIGTERM)
            j, t_gone, gone = storm.wait_line(lambda l: (field(l, "going_away") or 0) >= n, start=i)
            if field(gone, "up") == n:
                t_back, back = t_gone, gone
            else:
                _, t_back, back = storm.wait_line(lambda l: field(l, "up") == n, start=j)
            a.p.wait(timeout=120)
            time.sleep(1.0)  # requests after the storm too
            stop.set()
            for c in clients:
                c.join()

            # Peak handshakes over any 1 s of the storm, from the counters.
            points = [(t, field(l, "handshakes")) for t, l in storm.lines[i_sigterm:] if l]
            points = [(t, h) for t, h in points if h is not None and t <= t_back]
            peak = 0
            for a_i, (ta, ha) in enumerate(points):
                for tb, hb in points[a_i:]:
                    if tb - ta > 1.0:
                        break
                    peak = max(peak, hb - ha)
            during = [s for s in samples if t0 <= s[0] <= t_back]
            lat = [s[3] * 1000 for s in during]
            all_back = t_back - t0
            res = {
                "mode": mode,
                "tunnels": n,
                "gateway_bin": gateway_bin,
                "all_closed_s": round(t_gone - t0, 3),
                "all_back_s": round(all_back, 3),
                "handshakes_per_s": round(n / all_back, 1) if all_back > 0 else None,
                "peak_handshakes_per_s_1s": peak,
                "upgrades_refused": (field(back, "refused") or 0) - refused_before,
                "requests_during": len(during),
                "requests_failed": sum(1 for s in samples if not s[1]),
                "requests_retried": sum(1 for s in during if s[2] > 0),
                "p50_ms": round(percentile(lat, 0.50), 1) if lat else None,
                "p99_ms": round(percentile(lat, 0.99), 1) if lat else None,
                "max_ms": round(max(lat), 1) if lat else None,
            }
            log(f"[{mode}] {json.dumps(res)}")
            return res
        finally:
            for p in reversed(procs):
                p.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tunnels", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="2,000 tunnels")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16, help="client threads")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    ap.add_argument("--baseline-bin", help="anp-proxy binary for the `before` mode")
    ap.add_argument("--modes", default="before,after")
    ap.add_argument("--bin-dir", default=DEFAULT_BIN, help="where anp-proxy and anp-storm are")
    args = ap.parse_args()
    global BIN
    BIN = args.bin_dir
    if args.quick:
        args.tunnels = 2000
    ours = os.path.join(BIN, "anp-proxy")
    results = []
    for mode in args.modes.split(","):
        gw = args.baseline_bin if (mode == "before" and args.baseline_bin) else ours
        results.append(run_mode(mode, args, gw))
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, "storm.json")
    doc = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    cols = ["mode", "tunnels", "all_back_s", "handshakes_per_s", "peak_handshakes_per_s_1s",
            "upgrades_refused",
            "requests_during", "requests_retried", "requests_failed", "p50_ms", "p99_ms", "max_ms"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
