"""The report: the table, the targets of issue 6, throughput.{json,md,png}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.throughput.drains import SHADOW_ENGINE
from benchmarks.throughput.helpers import median

# Targets of issue 6.
TARGET_RATIO = {"uint8": 0.6, "float32": 0.5}
TARGET_P50_MS, TARGET_P99_MS = 5.0, 25.0
TARGET_READY_S, TARGET_RSS_MB = 10.0, 700.0


def main_drain(results: dict[str, Any]) -> dict[str, Any]:
    """The one worker, uint8, batch 256, default engine drain: the reference of every ratio."""
    return next(
        d
        for d in results["drains"]
        if (d["dtype"], d["batch_size"], d["workers"], d.get("engine", "numpy"), d.get("detector", "default"))
        == ("uint8", 256, 1, "numpy", "default")
    )


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """The one table: scenario, msg/s, ratio to its ceiling, latency, RSS, CPU."""
    drains = results["drains"]
    ceiling = main_drain(results)
    rows: list[list[str]] = []

    def add(
        name: str, rate: float, ratio: str = "", p50: str = "", p99: str = "", rss: str = "", cpu: str = ""
    ) -> None:
        rows.append([name, f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}", ratio, p50, p99, rss, cpu])

    add("bare consumer loop, uint8, batch 256 (the ceiling)", ceiling["bare"], "1.00")
    for name, rate in results["scoring_images_per_s"].items():
        what = "forward pass + MSE alone" if name.startswith(("eager", "model.predict")) else "scoring alone"
        add(f"{what}, {name}", rate, f"{rate / ceiling['bare']:.2f}")
    for d in drains:
        who = "2 workers" if d["workers"] == 2 else "worker"
        if d.get("detector", "default") != "default":
            who += f" serving the {d['detector']} detector"
        elif d.get("engine", "numpy") == SHADOW_ENGINE:
            who += " with a shadow model (the same artifact)"
        elif d.get("engine", "numpy") != "numpy":
            who += f" ({d['engine']} engine)"
        cpu = f"{median(d['worker_cpu']):.2f} + {median(d['redis_cpu']):.2f}"
        add(
            f"bare loop, {d['dtype']}, batch {d['batch_size']}",
            d["bare"],
            f"{d['bare'] / ceiling['bare']:.2f}",
        )
        add(
            f"{who}, {d['dtype']}, batch {d['batch_size']} (vs bare loop above)",
            d["rate"],
            f"{d['ratio']:.2f}",
            rss=f"{d['rss_peak_mb']:.0f}",
            cpu=cpu,
        )
    add(
        "naive: model.predict per message",
        results["naive_msgs_per_s"],
        f"{results['naive_msgs_per_s'] / ceiling['bare']:.4f}",
    )
    for p in results["paced"]:
        rss = max(v for _, v in p["rss_mb"])
        add(
            f"paced, {p['label']} (target {p['target_rate']:,.0f}), mean batch {p['mean_batch']:.1f}",
            p["achieved_rate"],
            p50=f"{p['p50_ms']:.1f}",
            p99=f"{p['p99_ms']:.1f}",
            rss=f"{rss:.0f}",
            cpu=f"{p['worker_cpu']:.2f} + {p['redis_cpu']:.2f}",
        )
    return rows


HEADER = ["scenario", "msg/s", "ratio", "p50 ms", "p99 ms", "RSS MB", "CPU worker+redis"]


def format_table(rows: list[list[str]]) -> str:
    """Fixed-width text table."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(HEADER, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of issue 6."""
    out: list[tuple[str, str, bool]] = []
    # The targets hold for the worker as deployed: the default engine (numpy for dense models).
    default = [
        d
        for d in results["drains"]
        if d.get("engine", "numpy") == "numpy" and d.get("detector", "default") == "default"
    ]
    drains = [d for d in default if d["workers"] == 1 and d["batch_size"] == 256]
    for d in drains:
        if d["dtype"] in TARGET_RATIO:
            goal = TARGET_RATIO[d["dtype"]]
            out.append(
                (f"worker/bare loop, {d['dtype']}, >= {goal}", f"{d['ratio']:.2f}", d["ratio"] >= goal)
            )
    half = results["paced"][0]
    out.append(
        (
            f"p50 at half of max rate < {TARGET_P50_MS:g} ms",
            f"{half['p50_ms']:.1f} ms",
            half["p50_ms"] < TARGET_P50_MS,
        )
    )
    out.append(
        (
            f"p99 at half of max rate < {TARGET_P99_MS:g} ms",
            f"{half['p99_ms']:.1f} ms",
            half["p99_ms"] < TARGET_P99_MS,
        )
    )
    fixed = results["paced"][1]
    full_batch_ms = 256 / fixed["target_rate"] * 1000
    out.append(
        (
            f"at {fixed['target_rate']:,.0f} msg/s no wait for a full batch ({full_batch_ms:.0f} ms)",
            f"mean batch {fixed['mean_batch']:.1f}, p99 {fixed['p99_ms']:.1f} ms",
            fixed["mean_batch"] < 128 and fixed["p99_ms"] < full_batch_ms,
        )
    )
    ready = max(v for k, v in results["ready_seconds"].items() if not k.endswith("-tensorflow"))
    out.append(
        (f"start to ready < {TARGET_READY_S:g} s", f"{ready:.1f} s (slowest start)", ready < TARGET_READY_S)
    )
    rss = max([d["rss_peak_mb"] for d in default] + [v for p in results["paced"] for _, v in p["rss_mb"]])
    out.append((f"RSS under load < {TARGET_RSS_MB:g} MB", f"{rss:.0f} MB (peak)", rss < TARGET_RSS_MB))
    trend = next((p for p in results["paced"] if p["label"] == "memory trend"), None)
    if trend:
        series = [(t, v) for t, v in trend["rss_mb"] if t >= 30]
        if len(series) >= 3:
            t, v = np.asarray(series).T
            slope = float(np.polyfit(t / 60, v, 1)[0])
            growth = v[-1] - v[0]
            flat = growth < 0.05 * v[0]
            out.append(
                (
                    f"RSS flat over {trend['seconds'] / 60:.0f} min",
                    f"{v[0]:.0f} -> {v[-1]:.0f} MB after the first 30 s, slope {slope:+.2f} MB/min",
                    flat,
                )
            )
    two = next((d for d in results["drains"] if d["workers"] == 2), None)
    if two:
        one = main_drain(results)
        out.append(
            ("two workers on one group (report)", f"{two['rate'] / one['rate']:.2f}x one worker", True)
        )
    return out


def write_results(
    results: dict[str, Any], out_dir: Path, table: str, goals: list[tuple[str, str, bool]]
) -> None:
    """throughput.json, throughput.md and throughput.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "throughput.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    m = results["machine"]
    lines = [
        f"# Benchmark results ({results['plan']['name']} run, {results['finished']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared; load average "
        f"{m['load_average_at_start']} at start, {results['load_average_at_end']} at end), "
        f"Python {m['python']}, TensorFlow {m['tensorflow']}, "
        f"redis-py {m['redis_py']} with hiredis, Redis {results['redis_version']}.",
        "",
        "Ratio: the worker's rate over the bare consumer loop's on the same entries, measured just "
        "before it; for the ceilings, over the uint8 batch-256 bare loop. CPU: cores used by the "
        "worker(s) + by redis-server. RSS: peak VmRSS (rss_anon_peak_mb in the JSON is the private "
        "part). Workers use the numpy engine unless the row says tensorflow engine; targets are "
        "checked on the numpy-engine workers, as deployed.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {v} | {'yes' if ok else 'NO'} |" for g, v, ok in goals]
    lines += [
        "",
        "Start to ready (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["ready_seconds"].items()),
    ]
    for p in results["paced"]:
        lines += [
            "",
            f"Paced {p['label']}: batch sizes {p['batch_size_buckets']}; "
            f"worker latency histogram {p['latency_buckets']} "
            f"(histogram p50 {p['histogram_p50_ms']:.1f} ms, p99 {p['histogram_p99_ms']:.1f} ms)",
        ]
    (out_dir / "throughput.md").write_text("\n".join(lines) + "\n")
    plot(results, out_dir / "throughput.png")


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput bars (log scale) and the latency distribution of the paced runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rates, colors = [], [], []
    for d in results["drains"]:
        label = f"{d['dtype']} b{d['batch_size']}" + (" x2" if d["workers"] == 2 else "")
        label += {"numpy": "", SHADOW_ENGINE: " shadow"}.get(d.get("engine", "numpy"), " tf")
        names += [f"bare {label}", f"worker {label}"]
        rates += [d["bare"], d["rate"]]
        colors += ["#9ecae1", "#3182bd"]
    for name, rate in results["scoring_images_per_s"].items():
        names.append(f"score {name}")
        rates.append(rate)
        colors.append("#a1d99b")
    names.append("naive predict/msg")
    rates.append(results["naive_msgs_per_s"])
    colors.append("#fc9272")
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.32 * len(names) + 2))
    left.barh(names[::-1], rates[::-1], color=colors[::-1])
    left.set_xscale("log")
    left.set_xlabel("messages (images) per second, log scale")
    left.set_title("throughput: ceilings (light) vs the worker (dark)")
    for label, samples in results["latency_samples_ms"].items():
        values = np.sort(np.asarray(samples))
        right.plot(values, np.arange(1, len(values) + 1) / len(values), label=label)
    right.axvline(TARGET_P50_MS, color="grey", linestyle=":", label=f"p50 target {TARGET_P50_MS:g} ms")
    right.axvline(TARGET_P99_MS, color="grey", linestyle="--", label=f"p99 target {TARGET_P99_MS:g} ms")
    right.set_xscale("symlog", linthresh=1)
    right.set_xlim(left=0)
    right.set_xlabel("end-to-end latency, ms (XADD to committed result)")
    right.set_ylabel("share of messages")
    right.set_title("paced runs: latency CDF")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
