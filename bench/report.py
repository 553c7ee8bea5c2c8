#!/usr/bin/env python3
"""Turns bench/run's per-run records into the markdown of BENCHMARKS.md.

    bench/report.py results.tsv > report.md

Machine, versions and parameters come from BENCH_* environment variables
that bench/run exports.
"""
import csv
import json
import os
import re
import statistics
import sys

SCENARIOS = {
    "S1": "plain HTTP/1.1 keep-alive, 64-byte body",
    "S2": "plain downstream, upstream mutual TLS with a client certificate (the seed scenario), 64-byte body",
    "S3": "TLS termination downstream (TLS 1.3, keep-alive), plain upstream, 64-byte body",
    "S4": "a new downstream connection per request (`Connection: close`), pooled upstream, 64-byte body",
    "S5": "100 KiB bodies, keep-alive",
    "S6": "pingress with {mappings} Mappings loaded against 10 Mappings (request matches a Mapping near the end of Emissary's order)",
}
CEILING_NOTE = {
    "S2": "The origin row is the plain origin: wrk cannot present a client certificate.",
    "S3": "The origin row is the origin's own TLS port (no client certificate).",
    "S6": "haproxy and the 2-Mapping pingress are left out; nginx and the origin are the references.",
}
LABEL = {
    "origin": "origin (ceiling)",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "pingora": "bare Pingora (floor)",
    "pingress": "pingress",
    "pingress-m10": "pingress, 10 Mappings",
    "pingress-m10k": "pingress, {mappings} Mappings",
}
ORDER = ["origin", "nginx", "haproxy", "pingora", "pingress", "pingress-m10", "pingress-m10k"]

env = os.environ.get
CLK_TCK = int(env("BENCH_CLK_TCK", "100"))
MAPPINGS = env("BENCH_MAPPINGS", "10000")


def to_us(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return None
    value = float(m.group(1))
    return value * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def parse_wrk(path):
    text = open(path, errors="replace").read()
    out = {"rps": None, "requests": 0, "p50": None, "p99": None, "non2xx": 0, "socket": 0, "raw": text}
    if m := re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M):
        out["rps"] = float(m.group(1))
    if m := re.search(r"^\s*(\d+) requests in", text, re.M):
        out["requests"] = int(m.group(1))
    for pct, key in (("50", "p50"), ("99", "p99")):
        if m := re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.M):
            out[key] = to_us(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        out["socket"] = sum(int(g) for g in m.groups())
    return out


def fmt_us(us):
    if us is None:
        return "—"
    return f"{us:.0f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def fmt_num(x, digits=0):
    return "—" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}×"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load(path):
    runs = []
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            w = parse_wrk(row["wrk"])
            ticks = int(row["proxy_ticks"])
            oticks = int(row["origin_ticks"])
            total = int(row["cpu_total"])
            busy = int(row["cpu_busy"])
            irq = int(row["cpu_irq"])
            req = w["requests"]
            steady_req = int(row["steady_requests"])
            run = {
                "round": int(row["round"]),
                "scenario": row["scenario"],
                "target": row["target"],
                **w,
                "errors": w["non2xx"] + w["socket"],
                # the proxy's own CPU time per request; for the origin row, the origin's
                "cpu_us": ticks * 1e6 / CLK_TCK / req if req else None,
                "origin_cpu_us": oticks * 1e6 / CLK_TCK / req if req else None,
                "core_busy": busy / total if total else None,
                "core_irq": irq / total if total else None,
                "proxy_share": ticks / total if total else None,
                "rss_mb": int(row["rss_kb"]) / 1024,
                "hwm_mb": int(row["hwm_kb"]) / 1024,
                # measured inside the run (see bench/run): the origin's accepts and requests
                "conns_per_1k": int(row["steady_accepts"]) * 1000 / steady_req if steady_req > 0 else None,
                "tls_hs_per_1k": int(row["steady_tls_handshakes"]) * 1000 / steady_req if steady_req > 0 else None,
                "alive": row["alive"] == "1",
            }
            runs.append(run)
    return runs


def summarize(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["target"]), []).append(r)
    summary = {}
    for key, rs in groups.items():
        summary[key] = {
            "rounds": len(rs),
            "rps": median(r["rps"] for r in rs),
            "p50": median(r["p50"] for r in rs),
            "p99": median(r["p99"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "cpu_us": median(r["cpu_us"] for r in rs),
            "origin_cpu_us": median(r["origin_cpu_us"] for r in rs),
            "proxy_share": median(r["proxy_share"] for r in rs),
            "rss_mb": max(r["rss_mb"] for r in rs),
            "hwm_mb": max(r["hwm_mb"] for r in rs),
            "conns_per_1k": median(r["conns_per_1k"] for r in rs),
            "tls_hs_per_1k": median(r["tls_hs_per_1k"] for r in rs),
        }
    return summary


def label(target):
    return LABEL[target].format(mappings=f"{int(MAPPINGS):,}")


def scenario_table(s, summary):
    targets = [t for t in ORDER if (s, t) in summary]
    nginx = summary.get((s, "nginx"))
    origin = summary.get((s, "origin"))
    lines = [
        "| target | req/s | p50 | p99 | errors | proxy CPU µs/req | proxy core busy | RSS (peak) | upstream conns /1k req | req/s ÷ nginx | CPU/req ÷ nginx | req/s ÷ origin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        m = summary[(s, t)]
        is_origin = t == "origin"
        cpu = f"({fmt_num(m['origin_cpu_us'], 1)} origin)" if is_origin else fmt_num(m["cpu_us"], 1)
        lines.append(
            "| "
            + " | ".join(
                [
                    label(t),
                    fmt_num(m["rps"]),
                    fmt_us(m["p50"]),
                    fmt_us(m["p99"]),
                    f"{m['errors']:,}",
                    cpu,
                    "—" if is_origin else f"{m['proxy_share'] * 100:.0f} %",
                    "—" if is_origin else f"{m['rss_mb']:.1f} ({m['hwm_mb']:.1f}) MB",
                    "—" if is_origin else fmt_num(m["conns_per_1k"], 2),
                    fmt_ratio(ratio(m["rps"], nginx and nginx["rps"])),
                    "—" if is_origin else fmt_ratio(ratio(m["cpu_us"], nginx and nginx["cpu_us"])),
                    fmt_ratio(ratio(m["rps"], origin and origin["rps"])),
                ]
            )
            + " |"
        )
    return lines


def verdict(ok):
    return "met" if ok else "**missed**"


def targets_section(summary, scenarios):
    out = ["## Issue 7's targets, as this run measured them", ""]
    rows = ["| scenario | pingress CPU/req ÷ best of nginx, haproxy (≤ 1.00) | req/s ÷ best (≥ 0.95) | p99: pingress / nginx (≤ 1.00) | pingress CPU/req ÷ bare Pingora (≤ 1.10) | bare Pingora CPU/req ÷ best |", "|---|---:|---:|---:|---:|---:|"]
    any_row = False
    for s in scenarios:
        if s == "S6":
            continue
        p, n, h = (summary.get((s, t)) for t in ("pingress", "nginx", "haproxy"))
        if not (p and n and h):
            continue
        any_row = True
        best_cpu = min(x for x in (n["cpu_us"], h["cpu_us"]) if x)
        best_rps = max(n["rps"] or 0, h["rps"] or 0)
        rc = ratio(p["cpu_us"], best_cpu)
        rr = ratio(p["rps"], best_rps)
        rp = ratio(p["p99"], n["p99"])
        floor = summary.get((s, "pingora"))
        rf = ratio(p["cpu_us"], floor and floor["cpu_us"])
        rb = ratio(floor and floor["cpu_us"], best_cpu)
        rows.append(
            f"| {s} | {fmt_ratio(rc)} {verdict(rc is not None and rc <= 1.0)} | {fmt_ratio(rr)} {verdict(rr is not None and rr >= 0.95)} | {fmt_ratio(rp)} {verdict(rp is not None and rp <= 1.0)} | {fmt_ratio(rf)} {verdict(rf is not None and rf <= 1.10)} | {fmt_ratio(rb)} |"
        )
    if any_row:
        out += rows + [""]
    if (p := summary.get(("S2", "pingress"))) and p["tls_hs_per_1k"] is not None:
        out.append(
            f"- S2 upstream TLS handshakes per 1,000 requests (pingress `pingress_upstream_tls_handshakes_total`): "
            f"{p['tls_hs_per_1k']:.3f}; upstream connections the origin accepted per 1,000 requests: "
            f"{fmt_num(p['conns_per_1k'], 3)} (target: close to 0)."
        )
    small, large = summary.get(("S6", "pingress-m10")), summary.get(("S6", "pingress-m10k"))
    if small and large:
        r = ratio(large["rps"], small["rps"])
        rc = ratio(large["cpu_us"], small["cpu_us"])
        out.append(
            f"- S6 requests/s with {int(MAPPINGS):,} Mappings ÷ with 10: {fmt_ratio(r)} "
            f"({verdict(r is not None and r >= 0.95)}, target ≥ 0.95); CPU per request "
            f"{fmt_num(large['cpu_us'], 1)} µs against {fmt_num(small['cpu_us'], 1)} µs ({fmt_ratio(rc)}); "
            f"RSS {large['rss_mb']:.1f} MB, peak {large['hwm_mb']:.1f} MB ({verdict(large['hwm_mb'] < 150)}, target < 150 MB; "
            "see the admin endpoints' cost below the S6 table)."
        )
    out.append(
        "- The bare-Pingora floor is `bench/floor.rs` (one `ProxyHttp`, a path-prefix choice between the plain "
        "and the mutual-TLS peer, nothing else) built with pingress's release profile. Route lookup and "
        "compile/swap times belong to the criterion benches, not to this suite."
    )
    return out


def main():
    runs = load(sys.argv[1])
    summary = summarize(runs)
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in runs)]
    out = []
    out += [
        "# Benchmarks",
        "",
        f"Generated by `bench/run` (see [bench/README.md](bench/README.md)) on {env('BENCH_STARTED')}, "
        f"{env('BENCH_MINUTES')} min: {env('BENCH_ROUNDS')} rounds, targets interleaved within each round, "
        f"{env('BENCH_DURATION')} s per run after {env('BENCH_WARMUP')} s of warm-up, "
        f"`wrk -t1 -c{env('BENCH_CONNECTIONS')} --latency`, everything on 127.0.0.1. "
        f"Each proxy has one worker/thread pinned to CPU {env('BENCH_PROXY_CPU')}; wrk and the origin "
        f"(nginx, one worker) share CPU {env('BENCH_LOAD_CPU')}. Values are medians over the rounds; "
        "errors are summed over them; RSS is the largest VmRSS after a run, "
        "(peak) the largest VmHWM, the high-water mark since the process started.",
        "",
        "## Machine and versions",
        "",
        f"- {env('BENCH_NPROC')} CPUs, {env('BENCH_CPU_MODEL')}, {env('BENCH_MEM')} RAM, {env('BENCH_KERNEL')}",
        f"- {env('BENCH_NGINX')}, {env('BENCH_HAPROXY')}, {env('BENCH_WRK')}, {env('BENCH_OPENSSL')} (wrk and nginx)",
        f"- {env('BENCH_RUSTC')}; pingress at commit {env('BENCH_PINGRESS')}",
        "",
        "## Conditions",
        "",
        f"- Load average (1, 5, 15 min) at the start: {env('BENCH_LOAD_START')}; at the end: {env('BENCH_LOAD_END')}.",
    ]
    proxy_runs = [r for r in runs if r["core_busy"] is not None and r["target"] != "origin"]
    if proxy_runs:
        irq = [r["core_irq"] for r in proxy_runs]
        # Softirq that runs in the proxy's context is charged to the proxy's
        # system time and to the core's softirq ticks alike, so the
        # difference is a lower bound, and below zero means nothing.
        other = [max(0.0, r["core_busy"] - r["core_irq"] - r["proxy_share"]) for r in proxy_runs]
        out.append(
            f"- CPU {env('BENCH_PROXY_CPU')} during proxy runs, besides the proxy: interrupts and softirq "
            f"(loopback networking) median {statistics.median(irq) * 100:.0f} %; other processes at least: median "
            f"{statistics.median(other) * 100:.0f} %, max {max(other) * 100:.0f} % of the core."
        )
    out += other_work()
    if note := env("BENCH_NOTE"):
        out.append(f"- {note}")
    out.append("")

    out += ["## Results", ""]
    for s in scenarios:
        out.append(f"### {s}: {SCENARIOS[s].format(mappings=f'{int(MAPPINGS):,}')}")
        out.append("")
        out += scenario_table(s, summary)
        out.append("")
        if s in CEILING_NOTE:
            out.append(CEILING_NOTE[s])
            out.append("")
        if s == "S6":
            out += admin_costs()
            diag_dir = env("BENCH_DIAG_DIR")
            for t in ("pingress-m10", "pingress-m10k"):
                path = diag_dir and os.path.join(diag_dir, f"{t}.diag.json")
                if path and os.path.exists(path):
                    n = count_routes(path)
                    if n is not None:
                        out.append(f"- {label(t)}: the diag endpoint lists {n:,} routes.")
            out.append("")

    out += targets_section(summary, scenarios)
    out.append("")
    out += proxy_logs()

    out += [
        "## Reading the numbers",
        "",
        "- **proxy CPU µs/req** is the proxy's utime+stime (all its processes and threads, from "
        "`/proc/<pid>/stat`) over the measured window divided by the requests wrk completed in it. "
        f"Clock ticks are {1000 // CLK_TCK} ms, so a {env('BENCH_DURATION')} s run measures it to well under 1 %. "
        "On two cores wrk and the origin saturate their core, so requests/s mostly measures the load "
        "generator; CPU per request is the comparison that counts.",
        "- **proxy core busy** is the proxy's CPU time over the window's wall time: under 100 % the proxy "
        "was waiting for the load generator, not the bottleneck.",
        "- **upstream conns /1k req** counts the connections the origin accepted per 1,000 requests it "
        "served (nginx `stub_status`), sampled from 1 s after wrk starts to 1 s before it ends (a quarter "
        "of the run for runs under 4 s): near 0 means the proxy pools its upstream connections. In the "
        "origin row of S4 it is wrk's own connection per request.",
        "- **(x origin)** in the origin row is the origin's own CPU per request, for scale.",
        "",
        "## Every run",
        "",
        "<details><summary>per-run numbers</summary>",
        "",
        "| round | scenario | target | req/s | p50 | p99 | errors | proxy CPU µs/req | origin CPU µs/req | RSS (peak) | upstream conns /1k |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r["scenario"], ORDER.index(r["target"]), r["round"])):
        out.append(
            f"| {r['round']} | {r['scenario']} | {label(r['target'])} | {fmt_num(r['rps'])} | {fmt_us(r['p50'])} | "
            f"{fmt_us(r['p99'])} | {r['errors']:,} | {fmt_num(r['cpu_us'], 1)} | {fmt_num(r['origin_cpu_us'], 1)} | "
            f"{r['rss_mb']:.1f} ({r['hwm_mb']:.1f}) MB | {fmt_num(r['conns_per_1k'], 2)} |"
        )
    out += ["", "</details>", ""]
    failed = [r for r in runs if r["rps"] is None]
    if failed:
        out.append("Runs whose wrk output could not be read:")
        out.append("")
        for r in failed:
            out.append(f"- round {r['round']} {r['scenario']} {r['target']}: `{r['raw'].strip()[:300]}`")
        out.append("")
    sys.stdout.write("\n".join(out))


def admin_costs():
    """admin.tsv: one /metrics scrape and one diag request per S6 pingress, after the runs."""
    work = env("BENCH_DIAG_DIR")
    path = work and os.path.join(work, "admin.tsv")
    if not path or not os.path.exists(path):
        return []
    out = [
        "After the runs, one request to each admin endpoint of the S6 pingresses:",
        "",
        "| target | endpoint | answer | time | RSS before → after | peak RSS after |",
        "|---|---|---:|---:|---:|---:|",
    ]
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            out.append(
                f"| {label(row['target'])} | `{row['endpoint']}` | {int(row['bytes']) / 1e6:.2f} MB | "
                f"{float(row['seconds']) * 1000:.0f} ms | {int(row['rss_before_kb']) / 1024:.1f} → "
                f"{int(row['rss_after_kb']) / 1024:.1f} MB | {int(row['hwm_after_kb']) / 1024:.1f} MB |"
            )
    return out + [""]


def proxy_logs():
    """What the proxies wrote to stderr (pingress runs with RUST_LOG=error), grouped."""
    work = env("BENCH_DIAG_DIR")
    if not work:
        return []
    out = []
    for name in ORDER[1:]:
        path = os.path.join(work, f"{name}.stderr")
        if not os.path.exists(path):
            continue
        kinds = {}
        for line in open(path, errors="replace"):
            line = line.strip()
            if not line:
                continue
            key = re.sub(r"^\[[^\]]*Z ", "[", line)  # timestamp
            key = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", key)
            kinds[key] = kinds.get(key, 0) + 1
        if kinds:
            n = sum(kinds.values())
            out.append(f"- {label(name)}: {n} line{'' if n == 1 else 's'}")
            out += [f"  - {n} × `{k[:200]}`" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:5]]
    if not out:
        return ["## Proxy logs", "", "No proxy wrote anything to stderr.", ""]
    return ["## Proxy logs", "", "What the proxies wrote to stderr during the whole benchmark (pingress with `RUST_LOG=error`):", ""] + out + [""]


def snapshot():
    """Every process's CPU ticks (own + reaped children), parent and command, and /proc/stat."""
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[pid] = {
            "ppid": fields[1],
            "start": fields[19],
            "ticks": sum(int(x) for x in fields[11:15]),
            "own": int(fields[11]) + int(fields[12]),
            "cmd": cmd or stat[stat.index("(") + 1 : stat.rindex(")")],
        }
    cpus = {}
    for line in open("/proc/stat"):
        if line.startswith("cpu"):
            name, *v = line.split()
            v = [int(x) for x in v]
            cpus[name] = {"user": v[0] + v[1], "system": v[2], "idle": v[3] + v[4], "irq": v[5] + v[6], "steal": v[7]}
    json.dump({"procs": procs, "cpus": cpus}, sys.stdout)


def other_work():
    """What processes other than the benchmark's used the CPUs while it ran."""
    try:
        a = json.load(open(env("BENCH_PROCS_START")))
        b = json.load(open(env("BENCH_PROCS_END")))
    except (OSError, TypeError, ValueError):
        return []
    me = env("BENCH_SELF_PID")

    def ours(pid, procs):
        seen = 0
        while pid in procs and seen < 64:
            if pid == me:
                return True
            pid = procs[pid]["ppid"]
            seen += 1
        return False

    ours_ticks = 0
    used = []
    for pid, p in b["procs"].items():
        q = a["procs"].get(pid)
        if q and q["start"] != p["start"]:
            q = None
        if ours(pid, b["procs"]):
            # the benchmark's processes, with the wrk and curl runs it reaped
            ours_ticks += p["ticks"] - (q["ticks"] if q else 0)
            continue
        # own time only: a parent's reaped children may have run before the window
        own = p["own"] - (q["own"] if q else 0)
        if own > 0:
            used.append((own, pid, p["cmd"]))
    ca, cb = a["cpus"]["cpu"], b["cpus"]["cpu"]
    wall = sum(cb.values()) - sum(ca.values())
    if wall <= 0:
        return []
    ncpu = len(b["cpus"]) - 1
    busy = (cb["user"] + cb["system"]) - (ca["user"] + ca["system"])
    other = max(0, busy - ours_ticks)
    used.sort(reverse=True)
    top = [u for u in used if u[0] * 100 / wall >= 0.5][:8]
    out = [
        f"- Processes other than the benchmark's used about {other / wall * ncpu:.2f} of the {ncpu} CPUs "
        f"on average while it ran (all user and system time in `/proc/stat` minus the benchmark's "
        f"processes'); interrupts and softirq took {(cb['irq'] - ca['irq']) * 100 / wall:.0f} % and "
        f"hypervisor steal {(cb['steal'] - ca['steal']) * 100 / wall:.1f} % of all CPU time."
    ]
    if top:
        out += [
            "- The busiest of them alive at the end (own CPU seconds during the run; short-lived "
            "processes such as compiler runs are in the total above, not here):",
            "",
            "  ```",
        ]
        out += [f"  {d / CLK_TCK:8.1f} s  {cmd[:110]}" for d, _, cmd in top]
        out += ["  ```"]
    return out


def count_routes(path):
    """Counts the routes in the diag JSON, whatever its exact shape."""
    try:
        data = json.load(open(path))
    except (OSError, ValueError):
        return None
    best = None

    def walk(node):
        nonlocal best
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("routes", "route_table", "groups") and isinstance(value, list):
                    best = max(best or 0, len(value))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    return best


if __name__ == "__main__":
    if sys.argv[1:] == ["snapshot"]:
        snapshot()
    else:
        main()
