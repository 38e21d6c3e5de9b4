"""The demo's printed table and its plot (one row pair and one panel per model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STRATEGIES = (("day model only", "day_only"), ("hourly", "hourly"), ("online", "online"))
PLOTTED = (("day model only", "day_only"), ("hourly", "hourly"), ("online (minutely)", "online"))
# By a model's label: its action, and the event its attribution window starts from.
ACTION = {"click": ("click", "impression"), "conversion": ("conversion", "click")}


def format_table(results: dict[str, Any]) -> str:
    """Each model's strategies (AUC, logloss, PCOC, versions served, requests scored) against
    the label that ends with its attribution window, then against its final label (window plus
    correction horizon), what each was judged on, the export gate's and the monitor's counts,
    and a line of pipeline counts."""
    lines = [
        f"{'model':<8}{'strategy':<16}{'AUC':>8}{'logloss':>10}{'PCOC':>8}{'versions':>10}"
        f"{'requests':>12}",
    ]
    for name, res in results["models"].items():
        for label, key in STRATEGIES:
            r = res["strategies"][key]
            lines.append(
                f"{name:<8}{label:<16}{r['auc']:>8.4f}{r['logloss']:>10.4f}{r['pcoc']:>8.3f}"
                f"{r['versions_served']:>10d}{int(r['n']):>12,d}"
            )
    lines.append(
        f"{'':<8}{'final label':<16}{'AUC':>8}{'logloss':>10}{'PCOC':>8}{'':>10}{'positives':>12}"
    )
    for name, res in results["models"].items():
        for label, key in STRATEGIES:
            r = res["final_label"]["strategies"][key]
            lines.append(
                f"{name:<8}{label:<16}{r['auc']:>8.4f}{r['logloss']:>10.4f}{r['pcoc']:>8.3f}"
                f"{'':>10}{int(r['positives']):>12,d}"
            )
    for name, res in results["models"].items():
        action, anchor = ACTION[res["label"]]
        window = res["attribution_window_s"]
        final = window + res["correction_horizon_s"]
        lines.append(
            f"{name}: {res['population']}; label: a {action} within {window:,} s of the "
            f"{anchor}; final label: within {final:,} s (window + correction horizon)"
        )
    for name, res in results["models"].items():
        gate, monitor = res["gate"], res["monitor"]
        line = (
            f"{name}: exports {gate['exported']} (warm starts included), refused by the gate "
            f"{gate['refused']}, skipped by the policy {gate['skipped']}; rollbacks "
            f"{monitor['rollbacks']}"
        )
        if gate["last_refusal"] is not None:
            line += f"; last refusal {gate['last_refusal']}"
        lines.append(line)
        for event in monitor["events"]:
            lines.append(
                f"{name}: rolled back from {event['from_version']} to {event['to_version']} at "
                f"{event['at_ms']} ({event['kind']})"
            )
    p = results["pipeline"]
    lines.append(
        f"raw events {p['raw_events']:,}; samples {p['samples']}; dead letters "
        f"{p['dead_letters']} {p['dead_letters_by_reason']}; versions exported "
        f"{p['versions_exported']}; {results['timings_s']['total_s']:.0f} s"
    )
    return "\n".join(lines)


def write_plot(hourly: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """AUC per hour of the replayed day, one line per strategy (day model, hourly model,
    online): one panel per model."""
    names = list(hourly)
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4), squeeze=False, sharex=True)
    for ax, name in zip(axes[0], names, strict=True):
        rows = hourly[name]
        hours = [h["hour"] for h in rows]
        for label, key in PLOTTED:
            ax.plot(hours, [h[f"{key}_auc"] for h in rows], marker="o", label=label)
        ax.set_xlabel("hour of the replayed day")
        ax.set_ylabel("AUC (eventual labels)")
        ax.set_title(f"{name}: AUC per hour, each request scored by the version live then")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
