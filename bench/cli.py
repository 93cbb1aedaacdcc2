"""Benchmark suite: the gateway on Redis (AOF everysec) vs the Node reference server.

    bench/run                          # full run: 3 rounds, every scenario, 5 servers
    bench/run --quick                  # smoke run: 1 round, 2 s wrk runs, 200 readers, 5 MiB
    bench/run --scenarios a,b --only gateway,node-mem

Writes bench/results/latest.md (table), latest.png (chart) and latest.json (raw).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import report
from bench.procs import raise_nofile_limit
from bench.scenarios import RUN_ORDER, SCENARIOS, measures_for, wrk_version
from bench.servers import (
    GATEWAY_ENV,
    JWT_GATEWAY_ENV,
    JWT_SECRET,
    NODE_DIR,
    REDIS_SERVER,
    ROOT,
    prepare_baseline,
    select_configs,
)

FULL = {
    "rounds": 3,
    "duration": 6.0,
    "warmup": 1.0,
    "latency_seconds": 5.0,
    "catchup_mb": 50.0,
    "readers": "2000,10000",
}
QUICK = {
    "rounds": 1,
    "duration": 2.0,
    "warmup": 0.5,
    "latency_seconds": 2.0,
    "catchup_mb": 5.0,
    "readers": "200",
}
STORAGE = {
    "gateway": "Redis 7, AOF `appendonly yes`, `appendfsync everysec` (fresh per run)",
    "node-mem": "in memory",
    "node-file": "files + LMDB in a temp dir (fdatasync on every append)",
    "floor-granian": "none (bench/floor_app.py keeps only the last POST body)",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short smoke run (see above)")
    p.add_argument("--scenarios", default="a,b,c,d,e", help="subset of a,b,c,d,e")
    p.add_argument(
        "--only",
        default=None,
        help="servers: gw-native-1w, gw-granian-1w, gw-hypercorn-1w, gw-native-2w, "
        "node-mem, node-file; not in 'all': gw-granian-1w-asgi, gw-granian-2w, "
        "floor-granian, gw-granian-1w-bp, gw-native-1w-jwt, gw-native-1w-quiet, "
        "gw-native-1w-observed; or the aliases gateway (= gw-native-1w), "
        "gateways, floor, node, extra, all (default: all)",
    )
    p.add_argument("--rounds", type=int, help="rounds (full 3, quick 1)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (full 6, quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of wrk warm-up (full 1, quick 0.5)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--streams", type=int, default=1000, help="streams of scenario a (1000)")
    p.add_argument("--body-bytes", type=int, default=100, help="append body size (100)")
    p.add_argument("--latency-rate", type=float, default=200.0, help="appends/s in (b) (200)")
    p.add_argument("--latency-seconds", type=float, help="seconds per (b) run (full 5, quick 2)")
    p.add_argument("--catchup-mb", type=float, help="MiB in the (c) stream (full 50, quick 5)")
    p.add_argument("--catchup-chunk", type=int, default=65536, help="(c) append size (64 KiB)")
    p.add_argument(
        "--readers", help="comma-separated SSE reader counts of (d) (full 2000,10000; quick 200)"
    )
    p.add_argument("--fanout-procs", type=int, default=2, help="client processes in (d) (2)")
    p.add_argument(
        "--fanout-concurrency",
        type=int,
        default=50,
        help="SSE connections being opened at once per client process (50)",
    )
    p.add_argument("--fanout-open-timeout", type=float, default=240.0)
    p.add_argument("--fanout-deliver-timeout", type=float, default=30.0)
    p.add_argument(
        "--fanout-stall-timeout",
        type=float,
        default=8.0,
        help="give up opening readers once none got ready for this long (8)",
    )
    p.add_argument(
        "--fanout-settle",
        type=float,
        default=1.0,
        help="seconds to let the server settle before RSS samples (1)",
    )
    p.add_argument("--json-batch", type=int, default=100, help="messages per POST in (e) (100)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output directory")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the gateway (1 worker) at commit REV, as config gw-baseline: a same-run "
        "A/B of a change (e.g. --baseline HEAD~1 --only gw-native-1w,gw-baseline)",
    )
    p.add_argument(
        "--auth",
        choices=("none", "jwt"),
        default="none",
        help="jwt: the gateway configs run with DS_AUTH=jwt (an HS256 secret) and every "
        "client request carries a bearer token; the Node reference ignores it (default: none)",
    )
    return p


def enable_jwt(gateways: bool = True) -> None:
    """bench/run --auth jwt: a secret for the gateways (``gateways``), a token
    for the clients (gateways without DS_AUTH ignore it)."""
    import jwt

    import bench.httpc

    scopes = {op: ["**"] for op in ("read", "append", "create", "delete")}
    token = jwt.encode({"exp": int(time.time()) + 86400, "ds": scopes}, JWT_SECRET, "HS256")
    if gateways:
        GATEWAY_ENV.update(JWT_GATEWAY_ENV)
    os.environ["BENCH_AUTH_TOKEN"] = token  # wrk's append.lua, fan-out client processes
    bench.httpc.AUTH_TOKEN = token


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.readers = [int(x) for x in str(args.readers).split(",") if x.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise SystemExit(f"unknown scenarios {unknown}; choose from a,b,c,d,e")
    args.scenario_list = [s for s in RUN_ORDER if s in scenarios]
    if args.baseline:
        prepare_baseline(args.baseline)
        if args.only and "gw-baseline" not in args.only.split(","):
            args.only += ",gw-baseline"
    args.configs = select_configs(args.only)
    if args.auth == "jwt":
        enable_jwt()
    elif any(c.key.endswith("-jwt") for c in args.configs):
        enable_jwt(gateways=False)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    return args


def check_prerequisites(args) -> None:
    kinds = {c.kind for c in args.configs}
    missing = []
    if {"a", "e"} & set(args.scenario_list) and not shutil.which(
        os.environ.get("BENCH_WRK", "wrk")
    ):
        missing.append("wrk (apt-get install wrk)")
    if "gateway" in kinds and not os.access(REDIS_SERVER, os.X_OK):
        missing.append(f"{REDIS_SERVER} (apt-get install redis-server)")
    if "node" in kinds:
        if not shutil.which("node"):
            missing.append("node (Node 20)")
        if not (NODE_DIR / "node_modules" / "@durable-streams" / "server").is_dir():
            missing.append("bench/node/node_modules (run bench/run, which runs npm ci)")
    if missing:
        raise SystemExit("missing: " + "; ".join(missing))


def _cmd(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    debian = Path("/etc/debian_version")
    return {
        "nproc": _cmd(["nproc"]),
        "CPU model": model,
        "memory": mem,
        "kernel": platform.release(),
        "OS": f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform(),
        "load average at start (1/5/15 min)": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _dist(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    commit = _cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway", "lua"])
    node_pkg = NODE_DIR / "node_modules" / "@durable-streams" / "server" / "package.json"
    lmdb_pkg = NODE_DIR / "node_modules" / "lmdb" / "package.json"

    def pkg_version(p: Path) -> str:
        return json.loads(p.read_text())["version"] if p.exists() else "not installed"

    if importlib.util.find_spec("rloop"):
        loop = f"rloop {_dist('rloop')}"
    elif importlib.util.find_spec("uvloop"):
        loop = f"uvloop {_dist('uvloop')}"
    else:
        loop = "asyncio"
    return {
        "gateway": f"durable-streams-gateway {_dist('durable-streams-gateway')}, git {commit}"
        + (" (gateway/ or lua/ modified)" if dirty else ""),
        "Python": sys.version.split()[0],
        "granian": f"{_dist('granian')} (event loop: {loop})",
        "hypercorn": f"{_dist('hypercorn')} (asyncio worker)",
        "redis-py / hiredis / orjson": f"{_dist('redis')} / {_dist('hiredis')} / {_dist('orjson')}",
        "redis-server": _cmd([REDIS_SERVER, "--version"]),
        "Node": _cmd(["node", "--version"]),
        "@durable-streams/server": f"{pkg_version(node_pkg)} (lmdb {pkg_version(lmdb_pkg)})",
        "wrk": wrk_version(),
        "matplotlib": _dist("matplotlib"),
    }


def observations(results: dict) -> list[str]:
    """A few automatic remarks: CPU saturation of each side during the wrk runs."""
    notes = []
    ncpu = os.cpu_count() or 1
    labels = {c["key"]: c["label"] for c in results["configs"]}
    for key in labels:
        for run, what in (("a_one", "appends to 1 stream"), ("e_msgs", "JSON batches")):
            cpu = report._median_cpu(results, key, run)
            if not cpu:
                continue
            server, redis, wrk = cpu.get("server", 0), cpu.get("redis", 0), cpu.get("wrk", 0)
            total = server + redis + wrk
            parts = [f"server {server:.2f}"]
            if "redis" in cpu:
                parts.append(f"redis-server {redis:.2f}")
            parts.append(f"wrk {wrk:.2f}")
            verdict = ""
            workers = 2 if key.endswith("-2w") else 1
            if total > 0.85 * ncpu:
                verdict = f"all {ncpu} cores busy: the machine is saturated"
            elif server > 0.85 * workers:
                verdict = "the server's own process is CPU-bound"
            notes.append(
                f"{labels[key]}, {what}: CPU cores busy: {', '.join(parts)}"
                + (f" — {verdict}." if verdict else ".")
            )
    return notes


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally blocks


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    nofile = raise_nofile_limit()
    check_prerequisites(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measures = [m for m in measures_for(args) if m.scenario in args.scenario_list]
    started = dt.datetime.now().astimezone()
    t_start = time.monotonic()
    options = {
        "rounds": args.rounds,
        "scenarios": ",".join(args.scenario_list),
        "servers": ",".join(c.key for c in args.configs),
        "wrk": f"{args.wrk_threads} threads, {args.connections} connections, "
        f"{args.duration:g} s per run, {args.warmup:g} s warm-up",
        "append body": f"{args.body_bytes} bytes",
        "streams in (a)": args.streams,
        "latency (b)": f"{args.latency_rate:g} appends/s for {args.latency_seconds:g} s",
        "catch-up (c)": f"{args.catchup_mb:g} MiB in {args.catchup_chunk} B appends",
        "fan-out (d)": f"{','.join(map(str, args.readers))} readers over "
        f"{args.fanout_procs} client processes",
        "JSON batch (e)": f"{args.json_batch} messages per POST",
        "RLIMIT_NOFILE": f"{nofile[0]}",
        "gateway env": " ".join(
            f"{name}=…" if name == "DS_JWT_SECRET" else f"{name}={value}"
            for name, value in GATEWAY_ENV.items()
        )
        + " (else defaults)",
    }
    results: dict = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["bench/run", *(shlex.quote(a) for a in sys.argv[1:])]),
        "options": options,
        "machine": machine_info(),
        "versions": versions(),
        "configs": [
            {
                "key": c.key,
                "label": c.label,
                "command": c.command,
                "storage": STORAGE.get(c.key)
                or STORAGE["gateway" if c.kind == "gateway" else c.key],
            }
            for c in args.configs
        ],
        "measures": [m.__dict__ for m in measures],
        "rounds": [],
    }
    log(
        f"servers: {', '.join(c.key for c in args.configs)}; scenarios: "
        f"{','.join(args.scenario_list)}; rounds: {args.rounds}"
    )
    configs = list(args.configs)
    for r in range(args.rounds):
        shift = r % len(configs)
        order = configs[shift:] + configs[:shift]
        rnd = {"round": r + 1, "order": [c.key for c in order], "runs": {}}
        results["rounds"].append(rnd)
        for cfg in order:
            run_rec: dict = {"values": {}, "details": {}, "errors": []}
            rnd["runs"][cfg.key] = run_rec
            t0 = time.monotonic()
            log(f"round {r + 1}/{args.rounds}: starting {cfg.key}")
            try:
                srv = cfg.start()
            except Exception as exc:
                run_rec["errors"].append(f"start: {exc}")
                log(f"  {cfg.key} did not start: {exc}")
                continue
            try:
                tag = f"r{r + 1}"
                for sc in args.scenario_list:
                    if sc not in cfg.scenarios:
                        continue  # e.g. the floor app serves only the fan-out
                    ts = time.monotonic()
                    try:
                        values, details = SCENARIOS[sc](srv, args, tag)
                        run_rec["values"].update(values)
                        run_rec["details"].update(details)
                        shown = ", ".join(
                            f"{k}={v:,.2f}" if v is not None else f"{k}=none"
                            for k, v in values.items()
                        )
                        log(f"  ({sc}) {time.monotonic() - ts:.1f}s  {shown}")
                    except Exception as exc:
                        run_rec["errors"].append(f"scenario {sc}: {type(exc).__name__}: {exc}")
                        log(f"  ({sc}) FAILED: {exc}")
                        traceback.print_exc(file=sys.stderr)
                    if not srv.alive():
                        run_rec["errors"].append(f"server exited during scenario {sc}")
                        log(f"  {cfg.key} exited during ({sc}); skipping the rest of this run")
                        break
            finally:
                srv.stop()
            run_rec["seconds"] = round(time.monotonic() - t0, 1)
            _write_json(results, out / "latest.json")
    results["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["elapsed_s"] = time.monotonic() - t_start
    results["machine"]["load average at end (1/5/15 min)"] = " ".join(
        f"{x:.2f}" for x in os.getloadavg()
    )
    results["notes"] = observations(results)
    report.write_markdown(results, out / "latest.md")
    try:
        report.write_chart(results, out / "latest.png")
    except Exception as exc:
        log(f"chart failed: {exc}")
    _write_json(results, out / "latest.json")
    log(f"wrote {out / 'latest.md'}, latest.png, latest.json ({results['elapsed_s'] / 60:.1f} min)")
    missing = [
        (c["key"], m["key"])
        for c in results["configs"]
        for m in results["measures"]
        if results["medians"][c["key"]][m["key"]] is None
    ]
    if missing:
        log(f"{len(missing)} cells have no value, e.g. {missing[:5]}")
        return 1
    return 0


def _write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    return run(args)
