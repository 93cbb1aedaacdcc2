"""Markdown table and PNG chart of a bench run (bench/results/latest.{md,png,json})."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.servers import PRIMARY

REF_MEM, REF_FILE = "node-mem", "node-file"


def median_of(values: list) -> float | None:
    clean = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(clean) if clean else None


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "failed"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "n/a"
    return f"{num / den:.2f}x"


def detail_key(measure: str) -> str:
    """The key under which a scenario stores the details behind a measure."""
    if measure.startswith("b_lp_"):
        return "b_long_poll"
    if measure.startswith("b_sse_"):
        return "b_sse"
    if measure.startswith("c_"):
        return "c"
    if measure.startswith(("d_mem_", "d_last_")):
        return "d_" + measure.rsplit("_", 1)[1]
    return measure


def flagged(results: dict, config: str, measure: str) -> bool:
    """Whether any round of this config had a warning or error for this measure."""
    for rnd in results["rounds"]:
        run = rnd["runs"].get(config)
        if not run:
            continue
        detail = run.get("details", {}).get(detail_key(measure))
        if isinstance(detail, dict) and detail.get("warning"):
            return True
        if measure not in run.get("values", {}) and run.get("errors"):
            return True
    return False


def medians(results: dict) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for cfg in results["configs"]:
        key = cfg["key"]
        out[key] = {}
        for m in results["measures"]:
            vals = [
                rnd["runs"][key]["values"].get(m["key"])
                for rnd in results["rounds"]
                if key in rnd["runs"]
            ]
            out[key][m["key"]] = median_of(vals)
    return out


def _median_cpu(results: dict, key: str, run: str) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    for rnd in results["rounds"]:
        detail = rnd["runs"].get(key, {}).get("details", {}).get(run)
        if detail and "cpu" in detail:
            for name, v in detail["cpu"].items():
                samples.setdefault(name, []).append(v)
    return {name: statistics.median(v) for name, v in samples.items()}


def write_markdown(results: dict, path: Path) -> None:
    configs = results["configs"]
    keys = [c["key"] for c in configs]
    med = medians(results)
    results["medians"] = med
    has_mem, has_file = REF_MEM in keys, REF_FILE in keys
    primary = PRIMARY if PRIMARY in keys else None
    lines: list[str] = []
    add = lines.append
    add("# Durable Streams: gateway (Redis) vs the Node reference server")
    add("")
    add(
        f"Run {results['started']} → {results['finished']} ({results['elapsed_s'] / 60:.1f} min), "
        f"{results['options']['rounds']} round(s), server order rotated each round; "
        "every cell is the **median over rounds**."
    )
    add("")
    add(f"Command: `{results['command']}`")
    add("")
    add("## Results")
    add("")
    header = ["measure", "better"] + [c["label"] for c in configs]
    if primary and has_mem:
        header.append("gateway / Node in-memory")
    if primary and has_file:
        header.append("gateway / Node file-backed")
    add("| " + " | ".join(header) + " |")
    add("|" + "|".join(["---", ":-:"] + ["--:"] * (len(header) - 2)) + "|")
    for m in results["measures"]:
        row = [f"{m['label']} ({m['unit']})", "higher ↑" if m["higher_is_better"] else "lower ↓"]
        row += [
            fmt(med[k][m["key"]], m["digits"]) + (" †" if flagged(results, k, m["key"]) else "")
            for k in keys
        ]
        if primary and has_mem:
            row.append(fmt_ratio(med[primary][m["key"]], med[REF_MEM][m["key"]]))
        if primary and has_file:
            row.append(fmt_ratio(med[primary][m["key"]], med[REF_FILE][m["key"]]))
        add("| " + " | ".join(row) + " |")
    add("")
    if primary and (has_mem or has_file):
        add(
            "Ratios compare the primary figure, "
            f"**{next(c['label'] for c in configs if c['key'] == primary)}**, with Node: "
            "for *higher ↑* rows a ratio above 1 favours the gateway, for *lower ↓* rows a "
            "ratio below 1 does."
        )
        add("")

    notes = results.get("notes") or []
    if notes:
        add("## Observations")
        add("")
        for note in notes:
            add(f"- {note}")
        add("")

    add("## Servers")
    add("")
    add("| config | command | storage |")
    add("|---|---|---|")
    for c in configs:
        add(f"| {c['label']} | `{c['command']}` | {c['storage']} |")
    add("")

    add("## Machine and versions")
    add("")
    for k, v in results["machine"].items():
        add(f"- **{k}**: {v}")
    for k, v in results["versions"].items():
        add(f"- **{k}**: {v}")
    add("")

    add("## Settings")
    add("")
    for k, v in results["options"].items():
        add(f"- `{k}` = {v}")
    add("")
    add("Method, per scenario:")
    add("")
    for line in METHOD:
        add(f"- {line}")
    add("")

    wrk_runs = [
        ("a_one", "appends, 1 stream"),
        ("a_many", "appends, many streams"),
        ("e_msgs", "JSON batches"),
    ]
    cpu_rows = []
    for k in keys:
        for run, what in wrk_runs:
            cpu = _median_cpu(results, k, run)
            if cpu:
                cpu_rows.append((k, what, cpu))
    if cpu_rows:
        add("## CPU during the wrk runs (cores busy, median; 1.00 = one core)")
        add("")
        add("| config | run | server processes | redis-server | wrk |")
        add("|---|---|--:|--:|--:|")
        label = {c["key"]: c["label"] for c in configs}
        for k, what, cpu in cpu_rows:
            redis = f"{cpu['redis']:.2f}" if "redis" in cpu else "-"
            add(
                f"| {label[k]} | {what} | {cpu.get('server', 0):.2f} | {redis} | "
                f"{cpu.get('wrk', 0):.2f} |"
            )
        add("")

    fan = []
    for rnd in results["rounds"]:
        for k in keys:
            for name, d in rnd["runs"].get(k, {}).get("details", {}).items():
                if name.startswith("d_") and isinstance(d, dict) and not d.get("skipped"):
                    fan.append((rnd["round"], k, d))
    if fan:
        add("## Fan-out details (every round)")
        add("")
        add(
            "| round | config | readers ready | open (s) | server RSS before → after (MiB) "
            "| KiB/reader | redis-server RSS change (MiB) | first / p50 / p99 / last (ms) |"
        )
        add("|--:|---|--:|--:|--:|--:|--:|--:|")
        label = {c["key"]: c["label"] for c in configs}
        for r, k, d in fan:
            rss = f"{d['rss_before_kib'] / 1024:.0f} → {d['rss_after_kib'] / 1024:.0f}"
            delays = " / ".join(
                f"{d[x]:.1f}" if d.get(x) is not None else "-"
                for x in ("first_ms", "p50_ms", "p99_ms", "last_ms")
            )
            add(
                f"| {r} | {label[k]} | {d['ready']:,}/{d['readers']:,} | {d['open_seconds']:.1f} "
                f"| {rss} | {d['kib_per_reader']:.1f} | {_redis_change(d)} | {delays} |"
            )
        add("")

    add("## Every round")
    add("")
    add("| measure | " + " | ".join(c["label"] for c in configs) + " |")
    add("|---|" + "|".join(["--:"] * len(configs)) + "|")
    for m in results["measures"]:
        cells = []
        for k in keys:
            vals = [
                rnd["runs"][k]["values"].get(m["key"])
                for rnd in results["rounds"]
                if k in rnd["runs"]
            ]
            cells.append(" / ".join(fmt(v, m["digits"]) for v in vals) or "-")
        add(f"| {m['label']} | " + " | ".join(cells) + " |")
    add("")
    add(
        "Order of the servers in each round: "
        + "; ".join(f"round {rnd['round']}: {', '.join(rnd['order'])}" for rnd in results["rounds"])
        + "."
    )
    add("")

    problems = []
    for rnd in results["rounds"]:
        for k, run in rnd["runs"].items():
            for e in run.get("errors", []):
                problems.append(f"round {rnd['round']}, {k}: ERROR {e}")
            for name, d in run.get("details", {}).items():
                if isinstance(d, dict) and d.get("warning"):
                    problems.append(f"round {rnd['round']}, {k}, {name}: {d['warning']}")
    add("## Errors and warnings")
    add("")
    if problems:
        for p in problems:
            add(f"- {p}")
    else:
        add("None: every request of every measured run succeeded.")
    add("")
    path.write_text("\n".join(lines))


def _redis_change(d: dict) -> str:
    before, after = d.get("redis_rss_before_kib"), d.get("redis_rss_after_kib")
    if before is None or after is None:
        return "-"
    return f"{(after - before) / 1024:+.1f}"


METHOD = [
    "(a) `wrk -t2 -c32` POSTs a 100-byte `text/plain` body, to one stream, then to one of "
    "1,000 pre-created streams picked at random per request (`bench/lua/append.lua`); "
    "appends/s counts 2xx answers only; a short warm-up run precedes them.",
    "(b) one asyncio client holds a reader (a long-poll loop that follows "
    "`Stream-Next-Offset` and echoes `Stream-Cursor`, or one SSE connection at "
    "`offset=now`) and appends at a steady rate on 4 keep-alive connections; latency = "
    "reader's receipt of a message minus the moment its POST was sent.",
    "(c) the stream is filled with 64 KiB `application/octet-stream` appends, then read "
    "from `offset=-1` following `Stream-Next-Offset` until `Stream-Up-To-Date: true` on "
    "one keep-alive connection (no `Accept-Encoding`, so no compression); MB = 10^6 bytes. "
    "The gateway pages at `DS_MAX_READ_BYTES` (4 MiB default); the Node server answers "
    "the whole range in one response.",
    "(d) N raw-socket SSE readers at `offset=now`, spread over several client processes, "
    "each ready once it got its first control event with `upToDate:true`; memory per "
    "reader = (RSS with N idle readers - RSS before) / N, each N on a freshly "
    "started server (and Redis) that has served one warm-up SSE reader; RSS summed over "
    "the HTTP server's process tree (workers included; the gateway's redis-server is not "
    "included, its RSS change is listed in the fan-out details); then "
    "one append and the time until the last reader has it (as seen by the client processes).",
    "(e) `wrk -t2 -c32` POSTs a JSON array of 100 small objects (~70 bytes each) to one "
    "`application/json` stream; messages/s = 2xx requests/s * 100.",
]


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    keys = [c["key"] for c in configs]
    med = results.get("medians") or medians(results)
    ref = REF_MEM if REF_MEM in keys else keys[0]
    ref_label = next(c["label"] for c in configs if c["key"] == ref)
    measures = [m for m in results["measures"] if med[ref].get(m["key"])]
    if not measures:
        return
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(measures) + 3), 6.5))
    # Gateway configs in blues, then the Node configs in reds and greys: one
    # colour per config for up to eight configs.
    colors = [
        "#1f77b4",
        "#6baed6",
        "#08519c",
        "#9ecae1",
        "#d62728",
        "#ff9896",
        "#7f7f7f",
        "#bcbd22",
    ]
    missing = []  # (x, why): no bar can be drawn on a log axis
    for i, k in enumerate(keys):
        heights = []
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(measures))]
        for x, m in zip(xs, measures, strict=True):
            v, r = med[k].get(m["key"]), med[ref].get(m["key"])
            if v is None or not r:
                heights.append(0)
                missing.append((x, "failed"))
            elif v / r <= 0:
                heights.append(0)
                missing.append((x, "n/a (≤0)"))
            else:
                heights.append(v / r)
        label = next(c["label"] for c in configs if c["key"] == k)
        ax.bar(xs, heights, width, label=label, color=colors[i % len(colors)])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    bottom = ax.get_ylim()[0]
    for x, why in missing:
        ax.text(x, bottom * 1.15, why, rotation=90, ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(measures)))
    ax.set_xticklabels(
        [
            f"({m['scenario']}) {m['label']}\n{'↑ higher' if m['higher_is_better'] else '↓ lower'}"
            " is better"
            for m in measures
        ],
        rotation=35,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel(f"ratio to {ref_label} (log scale)")
    ax.set_title(
        f"Durable Streams servers, median of {results['options']['rounds']} round(s), "
        f"relative to {ref_label}"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
