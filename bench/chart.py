"""Draw a run's chart: ``python bench/chart.py RESULTS.json OUT.png``.

Run by the peers' virtualenv, which has matplotlib, so that matplotlib stays out of the
project's dependencies; hence this file imports nothing from ``bench``. One column per
scenario: its rate (throughput, or KiB per idle connection) on top and its p99 latency
(or peak RSS, for the idle scenarios) below, one bar per contender, with the min..max
range over repetitions as error bars.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "direct": "#999999",
    "nginx": "#009639",
    "fastapi-reverse-proxy": "#05998b",
    "velithon": "#d62728",
    "trioproxy": "#1f77b4",
    "trioproxy-h11": "#6baed6",
}


def _bars(ax, cells, contenders, metric, title):
    names, values, lows, highs, colors = [], [], [], [], []
    for contender in contenders:
        cell = cells.get(contender)
        names.append(contender.replace("fastapi-reverse-proxy", "fastapi-rp"))
        colors.append(COLORS.get(contender, "#333333"))
        spread = cell["metrics"].get(metric) if cell and cell["status"] == "ok" else None
        if spread is None:
            values.append(0.0)
            lows.append(0.0)
            highs.append(0.0)
            label = "n/a" if cell is None or cell["status"] == "n/a" else cell["status"]
            ax.annotate(label, (len(names) - 1, 0), ha="center", va="bottom", fontsize=7)
            continue
        values.append(spread["median"])
        lows.append(spread["median"] - spread["min"])
        highs.append(spread["max"] - spread["median"])
    x = range(len(names))
    ax.bar(x, values, color=colors, yerr=[lows, highs], capsize=2)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def draw(data, out):
    scenarios = data["scenarios"]
    contenders = data["meta"]["contenders"]
    cols = len(scenarios)
    fig, axes = plt.subplots(2, cols, figsize=(max(4, 2.6 * cols), 6.5), squeeze=False)
    for i, scenario in enumerate(scenarios):
        cells = data["summary"].get(scenario["name"], {})
        rate = scenario["rate"]
        _bars(axes[0][i], cells, contenders, rate, f"{scenario['title']}\n{scenario['rate_unit']}")
        lower = "peak_rss_mib" if rate == "kib_per_conn" else "p99_ms"
        unit = "peak RSS MiB" if lower == "peak_rss_mib" else "p99 ms"
        _bars(axes[1][i], cells, contenders, lower, unit)
    meta = data["meta"]
    fig.suptitle(
        f"trioproxy bench, {meta['mode']} run {meta['started']}"
        f" ({meta['duration_s']:g} s x {meta['reps']} reps; bars: median, whiskers: min-max)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    with open(sys.argv[1]) as f:
        data = json.load(f)
    draw(data, sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
