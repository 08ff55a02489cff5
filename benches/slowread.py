#!/usr/bin/env python3
"""Memory per slow reader (issue 12's abuse side): `slowhttptest -X`
opens N connections that ask for a large response and read it a few
bytes at a time, and this reports what each costs every proxy process
(RSS growth divided by N, read SETTLE seconds into the attack).

Each target gets fresh processes (its own RSS baseline), in front of the
same `anp-bench-app`:
  * anp-proxy: gateway and receiver on the bench's config;
  * anp-base (--baseline-bin): another build, the same way;
  * nginx: the bench's one-hop config (`proxy_buffers 64 16k`: up to
    1 MiB buffered per response; nginx's default is 8 x 4 KiB).

Profiles (slowhttptest's read knobs):
  * stuck:   32 bytes every 3 s through a 512-1024 byte receive window;
  * trickle: 16 KiB every second through a 4-8 KiB window (a 1 MiB
    response takes a minute: none ends before the reading).

Figures are reported, never asserted. Writes bench-results/slowread.json.

    python3 benches/slowread.py [--conns 300] [--bodies 1048576,4194304]
        [--profiles stuck,trickle] [--baseline-bin PATH] [--no-nginx]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

PROFILES = {
    "stuck": ["-w", "512", "-y", "1024", "-n", "5", "-z", "32", "-k", "3"],
    "trickle": ["-w", "4096", "-y", "8192", "-n", "1", "-z", "16384", "-k", "1"],
}
# Seconds from the attack's start to the reading: every connection is open
# and its first window sent (slowhttptest opens them at --rate per second).
SETTLE = 15


def start_target(procs, tmp, name, binary, app_port, notes):
    """{process name: pid} of a fresh target, and its URL; `notes` gets
    what its start could not do as asked."""
    if name == "nginx":
        port, ndir = bench.free_port(), os.path.join(tmp, "nginx")
        os.makedirs(ndir, exist_ok=True)
        conf = os.path.join(ndir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(bench.NGINX_CONF.format(workers=2, nofile=65536, dir=ndir, app_port=app_port, port=port,
                                            app_b_port=app_port, access_log="off"))
        p = procs.start("nginx", [bench.find_nginx(), "-p", ndir, "-c", conf], tmp)
        bench.wait_port(port, p)
        return {"nginx": p.pid}, f"http://127.0.0.1:{port}"
    gw_conf, rx_conf = os.path.join(tmp, f"{name}-gw.toml"), os.path.join(tmp, f"{name}-rx.toml")
    with open(gw_conf, "w") as f:
        f.write(bench.GATEWAY_CONF.format(workers=2, token=bench.TOKEN, access_log="false", log_dir="", limits=""))
    gw, m = bench.start_tolerant(procs, tmp, f"{name}-gateway", [binary, "gateway", "--config", gw_conf], gw_conf,
                                 r"listening on http://127\.0\.0\.1:(\d+)", notes)
    port = int(m.group(1))
    with open(rx_conf, "w") as f:
        f.write(bench.RECEIVER_CONF.format(gw_port=port, app_port=app_port, token=bench.TOKEN))
    rx, _ = bench.start_tolerant(procs, tmp, f"{name}-receiver", [binary, "receiver", "--config", rx_conf], rx_conf,
                                 r"tunnel \d+ connected", notes)
    # A tunnel per gateway core, as in bench.py: a request that crosses
    # cores holds its window and the cross-core channel's pieces besides.
    bench.prime_tunnels(rx, port, 2, notes)
    return {"gateway": gw.pid, "receiver": rx.pid}, f"http://127.0.0.1:{port}"


def rss(pids):
    return {k: bench.tree_rss_kib(p) for k, p in pids.items()}


def one(procs, tmp, name, binary, app_port, body, profile, conns, notes):
    pids, url = start_target(procs, tmp, name, binary, app_port, notes)
    # One answer through first: the tunnel is up, the pools warm.
    subprocess.run(["curl", "-s", "-o", "/dev/null", f"{url}/bytes/{body}"], check=True, timeout=30)
    before = rss(pids)
    attack = subprocess.Popen(["slowhttptest", "-c", str(conns), "-X", "-r", "1000", *PROFILES[profile],
                               "-u", f"{url}/bytes/{body}", "-p", "3", "-l", str(SETTLE + 10)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(SETTLE)  # a reading taken at a point in the attack, not a synchronisation
    during = rss(pids)
    port = url.rsplit(":", 1)[1]
    ss = subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
                        capture_output=True, text=True).stdout
    attack.kill()
    attack.communicate()
    per = {k: round((during[k] - before[k]) / conns, 1) for k in pids}
    for p in list(procs.procs):
        procs.stop(p)
    procs.procs.clear()
    return {"target": name, "body_bytes": body, "profile": profile, "connections": conns,
            "connected_at_reading": len(ss.splitlines()),
            "rss_kib_before": before, "rss_kib_during": during, "kib_per_connection": per,
            "kib_per_connection_total": round(sum(per.values()), 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=300)
    ap.add_argument("--bodies", default="1048576,4194304")
    ap.add_argument("--profiles", default="stuck,trickle")
    ap.add_argument("--bin", default=os.path.join(bench.BIN, "anp-proxy"))
    ap.add_argument("--baseline-bin")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--out", default=os.path.join(bench.ROOT, "bench-results"))
    a = ap.parse_args()
    if not shutil.which("slowhttptest"):
        sys.exit("slowhttptest not found: make bench-deps installs it")
    bench.raise_fd_limit()
    targets = [("anp-proxy", a.bin)]
    if a.baseline_bin:
        targets.append(("anp-base", a.baseline_bin))
    if not a.no_nginx and bench.find_nginx():
        targets.append(("nginx", None))
    tmp = tempfile.mkdtemp(prefix="anp-slowread-")
    app_procs, procs = bench.Procs(), bench.Procs()
    runs, notes = [], []
    try:
        app = app_procs.start("app", [os.path.join(bench.BIN, "anp-bench-app"), "--threads", "1"], tmp)
        app_port = int(bench.wait_for_line(app, r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        for body in (int(b) for b in a.bodies.split(",")):
            for profile in a.profiles.split(","):
                for name, binary in targets:
                    r = one(procs, tmp, name, binary, app_port, body, profile, a.conns, notes)
                    runs.append(r)
                    by = " ".join(f"{k} {v}" for k, v in r["kib_per_connection"].items())
                    bench.log(f"  {bench.fmt_bytes(body):>6} {profile:8} {name:10} "
                              f"{r['kib_per_connection_total']:7.1f} KiB per slow reader ({by}); "
                              f"{r['connected_at_reading']} of {a.conns} open")
    finally:
        procs.stop_all()
        app_procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "slowread.json")
    with open(path, "w") as f:
        json.dump({"method": "slowhttptest -X, RSS growth per connection after "
                             f"{SETTLE} s, fresh processes per target",
                   "machine": bench.machine_info(2), "runs": runs, "notes": notes}, f, indent=1)
    for n in notes:
        print(f"NOTE: {n}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
