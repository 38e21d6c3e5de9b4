"""The demo's printed table and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def format_table(results: dict[str, Any]) -> str:
    rows = [("day model only", "day_only"), ("online", "online")]
    lines = [
        f"{'strategy':<16}{'AUC':>8}{'logloss':>10}{'PCOC':>8}{'versions':>10}{'impressions':>13}",
    ]
    for label, key in rows:
        r = results["strategies"][key]
        lines.append(
            f"{label:<16}{r['auc']:>8.4f}{r['logloss']:>10.4f}{r['pcoc']:>8.3f}"
            f"{r['versions_served']:>10d}{int(r['n']):>13,d}"
        )
    p = results["pipeline"]
    lines.append(
        f"raw events {p['raw_events']:,}; samples {p['samples']}; dead letters "
        f"{p['dead_letters']} {p['dead_letters_by_reason']}; versions exported "
        f"{p['versions_exported']}; {results['timings_s']['total_s']:.0f} s"
    )
    return "\n".join(lines)


def write_plot(hourly: list[dict[str, Any]], path: Path) -> None:
    hours = [h["hour"] for h in hourly]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(hours, [h["day_only_auc"] for h in hourly], marker="o", label="day model only")
    ax.plot(hours, [h["online_auc"] for h in hourly], marker="o", label="online (minutely)")
    ax.set_xlabel("hour of the replayed day")
    ax.set_ylabel("AUC (eventual labels)")
    ax.set_title("AUC per hour, each impression scored by the version live at its time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
