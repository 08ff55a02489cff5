#!/usr/bin/env python3
"""`make bench-fleet` (and the fleet section of `make bench`): what one
more gateway costs a receiver while idle (issue 13, sizing in
docs/DEPLOY.md). Numbers are printed and written to bench-results/fleet.json,
never asserted. RSS is read with the default pings (20 s: the tunnels are
idle); CPU in a second run where the receiver pings every second, so that
the cost of keeping tunnels alive shows within the window (at the default
interval it is a twentieth).

Usage: python3 benches/fleet.py [TUNNELS_PER_GATEWAY] [--bin=PATH] [--out=DIR]

Starts three gateways (2 workers each) on free loopback ports, then a
receiver with `tunnels = N` against the first gateway only, and another
against all three; reports each receiver's settled RSS (the least of ten
samples taken a second apart, after 5 s idle; CPU over those 10 s) and the difference per extra
gateway and per idle tunnel. Pings: one per tunnel per `ping_interval`
(20 s) each way, by configuration. Numbers are printed, never asserted.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_ticks(pid):
    """utime + stime of `pid`, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def start(binary, role, cfg, d, name):
    path = os.path.join(d, name + ".toml")
    with open(path, "w") as f:
        f.write(cfg)
    out = open(os.path.join(d, name + ".out"), "w+")
    proc = subprocess.Popen([binary, role, "--config", path], stdout=out,
                            stderr=subprocess.DEVNULL, cwd=d)
    return proc, out


def wait_lines(out, needle, n, within=60):
    deadline = time.time() + within
    while time.time() < deadline:
        out.seek(0)
        lines = [l for l in out if needle in l]
        if len(lines) >= n:
            return lines
        time.sleep(0.1)
    raise SystemExit(f"expected {n} lines with {needle!r} within {within}s")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out_dir = os.path.join(ROOT, "bench-results")
    for a in sys.argv[1:]:
        if a.startswith("--out="):
            out_dir = a.split("=", 1)[1]
    binary = os.path.join(ROOT, "target", "release", "anp-proxy")
    for a in sys.argv[1:]:
        if a.startswith("--bin="):
            binary = a.split("=", 1)[1]
    binary = os.path.abspath(binary)
    n = int(args[0]) if args else 32
    d = tempfile.mkdtemp(prefix="anp-idle-cost-")
    procs = []
    try:
        gws = []
        for i in range(3):
            cfg = ('mode = "gateway"\n[logging]\nlevel = "warn"\nlog_dir = ""\naccess_log = false\n'
                   '[gateway]\nport = 0\nworkers = 2\n'
                   f'[gateway.database]\npath = "db{i}.db"\n'
                   '[[gateway.auth.tokens]]\nname = "alice"\ntoken = "alice-secret"\npaths = ["/alice"]\n')
            p, out = start(binary, "gateway", cfg, d, f"gw{i}")
            procs.append(p)
            line = wait_lines(out, "listening on", 1)[0]
            gws.append(re.search(r"http://([0-9.:]+)", line).group(1))
        rss = {}
        cpu = {}
        hz = os.sysconf("SC_CLK_TCK")
        for k in (1, 3):
            urls = ",".join(f"ws://{a}/ws" for a in gws[:k])
            # Twice: idle at the default pings (RSS), then pinging every
            # second (CPU: the cost of keeping tunnels alive shows).
            for ping in (None, 1):
                cfg = ('mode = "receiver"\n[logging]\nlevel = "warn"\nlog_dir = ""\n'
                       f'[receiver]\ngateway_url = "{urls}"\nupstream = "http://127.0.0.1:9"\n'
                       f'token = "alice-secret"\ntunnels = {n}\ninstance_id = "idle{k}"\n'
                       'admin_enabled = false\n' + (f'ping_interval = {ping}\n' if ping else ''))
                p, out = start(binary, "receiver", cfg, d, f"rx{k}-{ping}")
                wait_lines(out, "connected to", n * k)
                time.sleep(5)
                samples = []
                t0, c0 = time.time(), cpu_ticks(p.pid)
                for _ in range(10):
                    samples.append(rss_kib(p.pid))
                    time.sleep(1)
                if ping:
                    cpu[k] = (cpu_ticks(p.pid) - c0) / hz / (time.time() - t0) * 1e3
                else:
                    rss[k] = min(samples)
                p.send_signal(signal.SIGKILL)
                p.wait()
            print(f"gateways={k} tunnels_per_gateway={n} receiver_rss_kib={rss[k]} "
                  f"cpu_ms_per_s_at_1s_pings={cpu[k]:.2f}")
        extra = rss[3] - rss[1]
        result = {
            "tunnels_per_gateway": n,
            "receiver_rss_kib": {"1_gateway": rss[1], "3_gateways": rss[3]},
            "extra_kib_per_gateway": round(extra / 2, 1),
            "extra_kib_per_idle_tunnel": round(extra / (2 * n), 2),
            "idle_cpu_ms_per_s": {"1_gateway": round(cpu[1], 2), "3_gateways": round(cpu[3], 2)},
            "ping_interval_s": 1,
            "cpu_us_per_tunnel_ping_s": round((cpu[3] - cpu[1]) * 1e3 / (2 * n), 2),
        }
        print(f"per extra gateway: {extra / 2:.0f} KiB; per idle tunnel: {extra / (2 * n):.1f} KiB; "
              f"idle CPU at 1 s pings {cpu[1]:.2f} -> {cpu[3]:.2f} ms/s "
              f"({(cpu[3] - cpu[1]) * 1e3 / (2 * n):.1f} us/s per extra tunnel; "
              f"at the default 20 s pings, a twentieth of that)")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "fleet.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {os.path.join(out_dir, 'fleet.json')}")
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
