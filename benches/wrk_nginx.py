#!/usr/bin/env python3
"""Issue 11's own method, reproduced: wrk as the client, nginx serving
static files as the app, nginx (one hop) beside anp-proxy (gateway and
receiver, two hops), the targets interleaved round by round. Each run
gives req/s, wrk's p50/p99 and the CPU µs per request of every proxy
process (utime + stime from /proc over the run).

`bench.py` drives its own load generator and app; this one uses the
tools an outside measurement uses, so the two can be held side by side.
Figures are reported, never asserted. Writes bench-results/wrk-nginx.json
(wrk-nginx-tls-MODE.json with --tls).

    python3 benches/wrk_nginx.py [--bodies 1024,65536,1048576] [--conns 64]
        [--secs 5] [--rounds 3] [--baseline-bin PATH] [--tls front|all]

`--tls front`: HTTPS to nginx and to the gateway (one self-signed
certificate, made with openssl), nginx's upstream and the tunnel plain
(`tunnel_port` without TLS). `--tls all`: the same with the tunnel on the
gateway's TLS port (wss://), as a deployment across networks runs it.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the process, port and CPU helpers)

# nginx as the app, its defaults kept (keepalive_requests 1000 among them):
# only the workers, the logs and the paths are set.
APP_CONF = """
worker_processes {workers};
daemon off;
pid {dir}/app.pid;
error_log {dir}/app-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
    }}
}}
"""

LAT = re.compile(r"^\s*(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
UNIT = {"us": 1, "ms": 1e3, "s": 1e6}


def wrk(url, conns, secs, threads):
    """One wrk run: (requests, rps, p50 µs, p99 µs, errors)."""
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--latency", url],
                         capture_output=True, text=True, timeout=secs + 60).stdout
    m = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not (m and rps):
        raise RuntimeError(f"wrk gave no result for {url}:\n{out}")
    lat = {q: float(v) * UNIT[u] for q, v, u in LAT.findall(out)}
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return int(m.group(1)), float(rps.group(1)), lat.get("50"), lat.get("99"), errors


def self_signed(tmp):
    """A throwaway certificate for 127.0.0.1 (P-256, openssl): (cert, key)."""
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    os.chmod(key, 0o644)  # nginx's workers read it as another user
    return cert, key


def start_nginx(procs, name, conf_text, ndir, port):
    conf = os.path.join(ndir, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(conf_text)
    p = procs.start(name, [bench.find_nginx(), "-p", ndir, "-c", conf], ndir)
    bench.wait_port(port, p)
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bodies", default="1024,65536,1048576")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="gateway workers = nginx worker_processes")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--bin", default=os.path.join(bench.BIN, "anp-proxy"))
    ap.add_argument("--baseline-bin", help="another anp-proxy, measured as anp-base in the same rounds")
    ap.add_argument("--out", default=os.path.join(bench.ROOT, "bench-results"))
    ap.add_argument("--tls", choices=("front", "all"),
                    help="HTTPS clients; the tunnel plain (front) or wss:// (all)")
    a = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not (shutil.which(tool) or (tool == "nginx" and bench.find_nginx())):
            sys.exit(f"{tool} not found: make bench-deps installs it")
    bench.raise_fd_limit()
    bodies = [int(b) for b in a.bodies.split(",")]
    tmp = tempfile.mkdtemp(prefix="anp-wrk-")
    procs = bench.Procs()
    try:
        # nginx's workers run as another user: they must reach the files.
        os.chmod(tmp, 0o755)
        www = os.path.join(tmp, "www")
        os.makedirs(www, mode=0o755)
        for b in bodies:
            with open(os.path.join(www, str(b)), "wb") as f:
                f.write(os.urandom(b))
        app_port, px_port = bench.free_port(), bench.free_port()
        start_nginx(procs, "app", APP_CONF.format(workers=a.workers, dir=tmp, port=app_port), tmp, app_port)
        nginx_conf = bench.NGINX_CONF.format(
            workers=a.workers, nofile=65536, dir=tmp, app_port=app_port, port=px_port, app_b_port=app_port,
            access_log="off")
        scheme = "https" if a.tls else "http"
        if a.tls:
            cert, key = self_signed(tmp)
            nginx_conf = nginx_conf.replace(" reuseport backlog=4096;", f""" ssl reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};""")
        px = start_nginx(procs, "nginx", nginx_conf, tmp, px_port)
        targets = {"nginx": (f"{scheme}://127.0.0.1:{px_port}", {"nginx": (px.pid, True)})}
        notes = []  # keys a baseline ran without
        for name, binary in (("anp-proxy", a.bin), ("anp-base", a.baseline_bin)):
            if not binary:
                continue
            sfx = "" if name == "anp-proxy" else "-base"
            gw_conf, rx_conf = os.path.join(tmp, f"gateway{sfx}.toml"), os.path.join(tmp, f"receiver{sfx}.toml")
            tunnel_port = bench.free_port() if a.tls == "front" else None
            with open(gw_conf, "w") as f:
                f.write(bench.GATEWAY_CONF.format(
                    workers=a.workers, token=bench.TOKEN, access_log="false", log_dir="",
                    limits=f"tunnel_port = {tunnel_port}\n" if tunnel_port else ""))
                if a.tls:
                    f.write(f'[gateway.tls]\nenabled = true\ncert_file = "{cert}"\nkey_file = "{key}"\n')
                if tunnel_port:
                    f.write("[gateway.tunnel_tls]\nenabled = false\n")
            base = notes if sfx else None
            gw, m = bench.start_tolerant(procs, tmp, f"gateway{sfx}", [binary, "gateway", "--config", gw_conf],
                                         gw_conf, r"listening on https?://127\.0\.0\.1:(\d+)", base)
            gw_port = int(m.group(1))
            with open(rx_conf, "w") as f:
                rx_text = bench.RECEIVER_CONF.format(gw_port=tunnel_port or gw_port, app_port=app_port,
                                                     token=bench.TOKEN)
                if a.tls == "all":
                    rx_text = rx_text.replace('gateway_url = "ws://', 'gateway_url = "wss://')
                    rx_text += f'ca_file = "{cert}"\n'
                f.write(rx_text)
            rx, _ = bench.start_tolerant(procs, tmp, f"receiver{sfx}", [binary, "receiver", "--config", rx_conf],
                                         rx_conf, r"tunnel \d+ connected", base)
            url = f"{scheme}://127.0.0.1:{gw_port}"
            # tunnels = 0: one per gateway worker once load asks for them.
            for _ in range(10):
                with open(rx.out_path) as f:
                    if sum("connected" in line for line in f) >= a.workers:
                        break
                wrk(f"{url}/{bodies[0]}", a.conns, 1, a.threads)
            targets[name] = (url, {"gateway": (gw.pid, False), "receiver": (rx.pid, False)})

        runs = []
        for body in bodies:
            for rnd in range(a.rounds):
                # Reversed every other round (bench.alternate: position bias).
                for name in bench.alternate(targets, rnd):
                    url, who = targets[name]
                    n, _, _, _, errors = wrk(f"{url}/{body}", a.conns, 1, a.threads)  # warm-up
                    if errors >= n:
                        sys.exit(f"{name}: every request of the warm-up failed ({url}/{body})")
                    probe = bench.CpuProbe(who)
                    probe.window_start()
                    n, rps, p50, p99, errors = wrk(f"{url}/{body}", a.conns, a.secs, a.threads)
                    probe.window_end()
                    r = {"target": name, "body_bytes": body, "connections": a.conns, "round": rnd + 1,
                         "rps": rps, "p50_us": p50, "p99_us": p99, "errors": errors, **probe.result(n)}
                    runs.append(r)
                    by = " ".join(f"{k} {v}" for k, v in r.get("cpu_us_by_process", {}).items())
                    bench.log(f"  [{bench.fmt_bytes(body)} round {rnd + 1}] {name:10} {rps:9.0f} rps  "
                              f"p99 {p99 or 0:8.0f}us  errors {errors}  cpu {r.get('cpu_us_per_request')}us/req ({by})")
        report = {"method": "wrk client, nginx static-file app, targets interleaved by round",
                  "tls": a.tls or "off",
                  "machine": bench.machine_info(a.workers), "runs": runs, "summary": summary(runs, targets, bodies),
                  "notes": notes}
        print_summary(report["summary"])
        for n in notes:
            print(f"NOTE: {n}")
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"wrk-nginx-tls-{a.tls}.json" if a.tls else "wrk-nginx.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {path}")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def summary(runs, targets, bodies):
    """Medians per target and body, and each anp target's ratios to nginx
    (per round, then the median: the rounds are the pairs)."""
    out = []
    for body in bodies:
        for name in targets:
            mine = [r for r in runs if r["target"] == name and r["body_bytes"] == body]
            row = {"target": name, "body_bytes": body,
                   "rps": median([r["rps"] for r in mine]),
                   "p99_us": median([r["p99_us"] for r in mine]),
                   "cpu_us_per_request": median([r.get("cpu_us_per_request") for r in mine])}
            procs = {k for r in mine for k in r.get("cpu_us_by_process", {})}
            row["cpu_us_by_process"] = {k: median([r["cpu_us_by_process"].get(k) for r in mine]) for k in procs}
            if name != "nginx":
                pairs = [(r, n) for r in mine for n in runs
                         if n["target"] == "nginx" and n["body_bytes"] == body and n["round"] == r["round"]]
                row["rps_x_nginx"] = median([r["rps"] / n["rps"] for r, n in pairs if n["rps"]])
                row["cpu_x_nginx"] = median([r["cpu_us_per_request"] / n["cpu_us_per_request"] for r, n in pairs
                                             if r.get("cpu_us_per_request") and n.get("cpu_us_per_request")])
                row["p99_x_nginx"] = median([r["p99_us"] / n["p99_us"] for r, n in pairs
                                             if r["p99_us"] and n["p99_us"]])
            out.append(row)
    return out


def print_summary(rows):
    print("\nwrk + nginx app (medians of the rounds; x nginx = median of the per-round ratios)")
    print(f"{'body':>6} {'target':10} {'rps':>9} {'p99us':>8} {'cpuus/req':>10}  {'x nginx: rps':>12} {'cpu':>6} {'p99':>6}"
          "  cpu by process")
    for r in rows:
        x = (f"{r['rps_x_nginx']:12.2f} {r['cpu_x_nginx']:6.2f} {r['p99_x_nginx']:6.2f}"
             if "rps_x_nginx" in r and None not in (r["rps_x_nginx"], r["cpu_x_nginx"], r["p99_x_nginx"])
             else " " * 26)
        by = " ".join(f"{k} {v}" for k, v in sorted(r["cpu_us_by_process"].items()))
        print(f"{bench.fmt_bytes(r['body_bytes']):>6} {r['target']:10} {r['rps'] or 0:9.0f} {r['p99_us'] or 0:8.0f} "
              f"{r['cpu_us_per_request'] or 0:10.2f}  {x}  {by}")


if __name__ == "__main__":
    main()
