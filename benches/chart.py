"""The SVG chart of a bench report (benches/bench.py): throughput bars per
cell and target, latency percentiles of the fixed-rate run on a log
scale, and (with --overload) goodput under open-loop overload and
identity B's p99 alone and during identity A's flood. Hand-written SVG,
no dependencies, no network."""

import html
import math

COLORS = {"direct": "#7f8c8d", "nginx": "#27ae60", "anp-proxy": "#2c6fbb", "anp-proxy+limits": "#8e44ad",
          "anp-proxy+shed": "#d35400", "anp-proxy+shed-nopause": "#c0392b"}
ORDER = ["direct", "nginx", "anp-proxy", "anp-proxy+limits", "anp-proxy+shed", "anp-proxy+shed-nopause"]


def _fmt_bytes(n):
    if n >= 1 << 20:
        return f"{n >> 20} MiB"
    if n >= 1024:
        return f"{n >> 10} KiB"
    return f"{n} B"


def _fmt_num(x):
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _fmt_us(us):
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us} µs"


def _log_axis(out, text, vals, base, chart_h, left, W):
    """Decade grid lines and labels (µs) for `vals` on a log scale, between
    `base - chart_h` and `base`; returns the value -> y function."""
    lo = 10 ** math.floor(math.log10(max(1, min(vals or [1]))))
    hi = 10 ** math.ceil(math.log10(max(vals or [10]) + 1))

    def ypos(v):
        v = max(v, lo)
        return base - chart_h * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    d = lo
    while d <= hi:
        yy = ypos(d)
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{W - 20}" y2="{yy:.1f}" stroke="#eee"/>')
        text(left - 6, yy + 4, _fmt_us(int(d)), 10, anchor="end", fill="#555")
        d *= 10
    return ypos


def render(report):
    runs = [r for r in report["runs"] if r["mode"] in ("closed", "fixed-rate")]
    targets = [t for t in ORDER if any(r["target"] == t for r in report["runs"])]
    closed_cells = []
    for r in runs:
        if r["mode"] == "closed" and (r["body_bytes"], r["connections"]) not in closed_cells:
            closed_cells.append((r["body_bytes"], r["connections"]))
    # The lowest fixed rate (the one where no target is saturated).
    rates = sorted({r["target_rate"] for r in runs if r["mode"] == "fixed-rate"})
    fixed = [r for r in runs if r["mode"] == "fixed-rate" and r["target_rate"] == rates[0]] if rates else []

    W = 1000
    out = []
    y = 0

    def text(x, y, s, size=12, anchor="start", weight="normal", fill="#222"):
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                   f'font-weight="{weight}" fill="{fill}">{html.escape(str(s))}</text>')

    m = report.get("machine", {})
    text(20, 28, "anp-proxy benchmark", 20, weight="bold")
    text(20, 48, f"{m.get('cpu_model', '?')} · {m.get('cores', '?')} cores · kernel {m.get('kernel', '?')} · "
                 f"{m.get('date', '')} · commit {m.get('git_commit', '?')}", 11, fill="#555")
    # Legend
    lx = W - 20 - 135 * len(targets)
    for i, t in enumerate(targets):
        out.append(f'<rect x="{lx + i * 135}" y="16" width="14" height="14" fill="{COLORS[t]}"/>')
        text(lx + i * 135 + 20, 28, t, 12)
    y = 70

    # --- throughput: one small bar group per cell, each cell scaled to its
    # own maximum (bodies differ by 8000x in rps), value printed on the bar.
    if closed_cells:
        text(20, y + 14, "Throughput, closed loop (requests/s; each group scaled to its own best; label = ×direct)",
             14, weight="bold")
        y += 26
        chart_h = 180
        gw = (W - 60) / len(closed_cells)
        bw = min(36, (gw - 16) / max(1, len(targets)))
        base = y + chart_h
        out.append(f'<line x1="30" y1="{base}" x2="{W - 20}" y2="{base}" stroke="#999"/>')
        for ci, (body, conns) in enumerate(closed_cells):
            cell = {r["target"]: r for r in runs
                    if r["mode"] == "closed" and r["body_bytes"] == body and r["connections"] == conns}
            top = max((r["rps"] for r in cell.values()), default=0) or 1
            direct = cell.get("direct", {}).get("rps")
            x0 = 30 + ci * gw + (gw - bw * len(targets)) / 2
            for ti, t in enumerate(targets):
                r = cell.get(t)
                if not r:
                    continue
                h = chart_h * 0.85 * r["rps"] / top
                x = x0 + ti * bw
                out.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bw - 3:.1f}" height="{h:.1f}" '
                           f'fill="{COLORS[t]}"><title>{t}: {r["rps"]:.0f} req/s, p99 {r["p99_us"]} µs, '
                           f'errors {r["errors"]}</title></rect>')
                text(x + (bw - 3) / 2, base - h - 3, _fmt_num(r["rps"]), 9, anchor="middle")
                if direct and t != "direct":
                    text(x + (bw - 3) / 2, base - h - 13, f"{r['rps'] / direct:.2f}×", 9, anchor="middle",
                         fill="#555")
                if r["errors"]:
                    text(x + (bw - 3) / 2, base + 24, f"{r['errors']} err", 9, anchor="middle", fill="#c0392b")
            text(30 + ci * gw + gw / 2, base + 13, f"{_fmt_bytes(body)} · c{conns}", 11, anchor="middle")
        y = base + 40

    # --- latency: fixed-rate percentiles, log scale.
    if fixed:
        rate = fixed[0].get("target_rate") or 0
        text(20, y + 14, f"Latency at a fixed rate of {rate:.0f} req/s, 1 KiB, 64 connections "
                         "(coordinated-omission corrected; log scale)", 14, weight="bold")
        y += 30
        pcts = [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us"), ("max", "max_us")]
        vals = [r[k] for r in fixed for _, k in pcts if r.get(k)]
        chart_h = 200
        base = y + chart_h
        left = 80
        ypos = _log_axis(out, text, vals, base, chart_h, left, W)
        gw = (W - left - 20) / len(pcts)
        bw = min(40, (gw - 20) / max(1, len(targets)))
        for pi, (label, key) in enumerate(pcts):
            x0 = left + pi * gw + (gw - bw * len(targets)) / 2
            for ti, t in enumerate(targets):
                r = next((r for r in fixed if r["target"] == t), None)
                if not r:
                    continue
                v = r.get(key) or 0
                yy = ypos(v)
                x = x0 + ti * bw
                out.append(f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bw - 3:.1f}" height="{base - yy:.1f}" '
                           f'fill="{COLORS[t]}"><title>{t} {label}: {v} µs</title></rect>')
                text(x + (bw - 3) / 2, yy - 3, _fmt_us(v), 9, anchor="middle")
            text(left + pi * gw + gw / 2, base + 14, label, 11, anchor="middle")
        out.append(f'<line x1="{left}" y1="{base}" x2="{W - 20}" y2="{base}" stroke="#999"/>')
        y = base + 30

    y = _overload(report, out, text, targets, y, W)

    # --- memory summary line.
    mem = report.get("memory", {})
    ic = mem.get("idle_connections_gateway")
    if mem.get("idle"):
        s = (f"Memory (RSS): gateway idle {mem['idle']['gateway'] / 1024:.1f} MiB, receiver idle "
             f"{mem['idle']['receiver'] / 1024:.1f} MiB")
        if mem.get("under_load_peak"):
            s += (f"; under load peak gateway {mem['under_load_peak']['gateway'] / 1024:.1f} MiB, receiver "
                  f"{mem['under_load_peak']['receiver'] / 1024:.1f} MiB")
        text(20, y + 10, s, 12)
        y += 18
    if ic:
        s = f"Idle keep-alive connections: gateway {ic['per_connection_kib']} KiB/conn ({ic['connections']} conns)"
        nx = mem.get("idle_connections_nginx")
        if nx:
            s += f", nginx {nx['per_connection_kib']} KiB/conn"
        text(20, y + 10, s, 12)
        y += 18
    y += 10
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{y}" viewBox="0 0 {W} {y}" '
            f'font-family="DejaVu Sans, Arial, sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>')
    return head + "".join(out) + "</svg>\n"


def _overload(report, out, text, targets, y, W):
    """Goodput at 1x (the closed-loop max), 2x and 5x open loop, as a
    fraction of each target's own max, with the 0.9 goal line; then B's
    p99 alone and during A's flood (log scale). Returns the new y."""
    over = [r for r in report["runs"] if r["mode"] == "overload"]
    fair = [r for r in report["runs"] if r["mode"] == "fairness"]
    if over:
        text(20, y + 14, "Overload, open loop at 2× and 5× each proxy's own closed-loop max (1 KiB): goodput (2xx/s) "
                         "/ that max; label = goodput of offered", 14, weight="bold")
        y += 26
        chart_h = 150
        base = y + chart_h
        left = 60
        factors = sorted({r["factor"] for r in over})
        top = max(1.2, max((r["goodput_vs_max"] or 0) for r in over) * 1.1)

        def ypos(v):
            return base - chart_h * min(v, top) / top

        for v in (0.5, 0.9, 1.0):
            yy = ypos(v)
            dash = ' stroke-dasharray="4 3"' if v == 0.9 else ""
            out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{W - 20}" y2="{yy:.1f}" stroke="#bbb"{dash}/>')
            text(left - 6, yy + 4, f"{v:.1f}×", 10, anchor="end", fill="#555")
        gw = (W - left - 20) / len(factors)
        who = [t for t in targets if any(r["target"] == t for r in over)]
        bw = min(60, (gw - 40) / max(1, len(who)))
        for fi, f in enumerate(factors):
            x0 = left + fi * gw + (gw - bw * len(who)) / 2
            for ti, t in enumerate(who):
                r = next((r for r in over if r["target"] == t and r["factor"] == f), None)
                if not r:
                    continue
                v = r["goodput_vs_max"] or 0
                yy = ypos(v)
                x = x0 + ti * bw
                e = {k: n for k, n in r["errors_by_kind"].items() if n}
                out.append(f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bw - 4:.1f}" height="{base - yy:.1f}" '
                           f'fill="{COLORS[t]}"><title>{t} at {f}×: offered {r["offered_rps"]:.0f}/s, goodput '
                           f'{r["goodput_rps"]:.0f}/s, served p99 {r["p99_us"]} µs, refused p99 '
                           f'{r.get("refused_p99_us")} µs, errors {e}</title></rect>')
                text(x + (bw - 4) / 2, yy - 14, f"{v:.2f}×", 9, anchor="middle")
                text(x + (bw - 4) / 2, yy - 4, f"{_fmt_num(r['goodput_rps'])} of {_fmt_num(r['offered_rps'])}", 8,
                     anchor="middle", fill="#555")
                text(x + (bw - 4) / 2, base + 24, f"p99 {_fmt_us(r['p99_us'])}", 8, anchor="middle", fill="#555")
            text(left + fi * gw + gw / 2, base + 12, f"{f}× max", 11, anchor="middle")
        out.append(f'<line x1="{left}" y1="{base}" x2="{W - 20}" y2="{base}" stroke="#999"/>')
        y = base + 40
    if fair:
        f0 = fair[0]
        text(20, y + 14, f"Fairness: identity B open loop at 5 % of max, p99 alone and while identity A is flooded at "
                         f"{f0['a_factor']}× max (log scale)", 14, weight="bold")
        y += 30
        chart_h = 140
        base = y + chart_h
        left = 80
        vals = [v for r in fair for v in (r["b_p99_alone_us"], r["b_p99_flooded_us"]) if v]
        ypos = _log_axis(out, text, vals, base, chart_h, left, W)
        gw = (W - left - 20) / len(fair)
        bw = 60
        for i, r in enumerate(fair):
            t = r["target"]
            x0 = left + i * gw + (gw - 2 * bw) / 2
            for j, (label, key, op) in enumerate((("alone", "b_p99_alone_us", 0.45),
                                                   ("A flooded", "b_p99_flooded_us", 1.0))):
                v = r[key] or 0
                yy = ypos(v)
                x = x0 + j * bw
                out.append(f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bw - 6}" height="{base - yy:.1f}" '
                           f'fill="{COLORS[t]}" fill-opacity="{op}"><title>{t} B p99 {label}: {v} µs</title></rect>')
                text(x + (bw - 6) / 2, yy - 3, _fmt_us(v), 9, anchor="middle")
                text(x + (bw - 6) / 2, base + 12, label, 9, anchor="middle", fill="#555")
            errs = f"B errors {r['b_errors_alone']}/{r['b_errors_flooded']}"
            text(left + i * gw + gw / 2, base + 26, f"{t} · {errs}", 11, anchor="middle")
        out.append(f'<line x1="{left}" y1="{base}" x2="{W - 20}" y2="{base}" stroke="#999"/>')
        y = base + 44
    return y
