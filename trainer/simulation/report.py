"""The report directory of a simulation or demo: every round as JSON and CSV, PNG plots and
an HTML page tying them together (a static file: open it in any browser).

    rounds.json   {"meta", "runs": {label: [round records]}, "central": {...} | null}
    rounds.csv    one row per (run, round)
    hr10.png      offline HR@10 vs round: each run, the pretrained start, the central model
    online.png    online HR@10 (what the devices' recommendations hit) vs round
    epsilon.png   cumulative epsilon vs round, for runs with differential privacy
    index.html    the summary table, the plots and every round"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from device_sdk.files import atomic_write
from trainer.simulation.run import RoundRecord

CSV_FIELDS = [f for f in RoundRecord.__dataclass_fields__ if f != "phases"] + ["phases"]


def _rows(runs: Mapping[str, Sequence[RoundRecord]]) -> list[dict[str, Any]]:
    return [r.to_json() for records in runs.values() for r in records]


def summary(runs: Mapping[str, Sequence[RoundRecord]], central: Mapping[str, Any] | None
            ) -> list[dict[str, Any]]:
    """Per run: the pretrained start, the last published model, the gain and the share of
    the central model's HR@10 it reaches, at the epsilon reached."""
    out = []
    for label, records in runs.items():
        scored = [r for r in records if r.hr10 is not None]
        if not scored:
            continue
        start, end = scored[0], scored[-1]
        row = {"run": label, "rounds": sum(1 for r in records if r.round > 0),
               "published": sum(1 for r in records if r.round > 0 and r.state == "published"),
               "start_hr10": start.hr10, "final_hr10": end.hr10,
               "gain_hr10": end.hr10 - start.hr10, "final_ndcg10": end.ndcg10,
               "epsilon": end.epsilon, "delta": end.delta}
        online = [r.online_hr10 for r in records if r.online_hr10 is not None]
        row["online_hr10_last5"] = sum(online[-5:]) / len(online[-5:]) if online else None
        if central is not None and central.get("hr@10"):
            row["share_of_central"] = end.hr10 / central["hr@10"]
        out.append(row)
    return out


def write_report(out: str | Path, runs: Mapping[str, Sequence[RoundRecord]],
                 central: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(runs)
    table = summary(runs, central)
    # Replaced atomically: it is rewritten after every round while others may read it.
    atomic_write(out / "rounds.json", (json.dumps(
        {"meta": dict(meta or {}), "summary": table, "central": central,
         "runs": {k: [r.to_json() for r in v] for k, v in runs.items()}}, indent=1)
        + "\n").encode(), mode=0o644)
    with open(out / "rounds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "phases": json.dumps(row["phases"])})
    plots = _plots(out, runs, central)
    (out / "index.html").write_text(_html(runs, central, meta or {}, table, plots))
    return out / "index.html"


def _plots(out: Path, runs: Mapping[str, Sequence[RoundRecord]],
           central: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def plot(name: str, attr: str, title: str, ylabel: str,
             which: Mapping[str, Sequence[RoundRecord]],
             lines: Sequence[tuple[float, str, str, str]] = (),
             also: str | None = None) -> tuple[str, str]:
        """``also``: a second attribute drawn dashed where runs have it (fast mode's
        every-round float metrics beside the int8 model's)."""
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for label, records in which.items():
            pts = [(r.round, getattr(r, attr)) for r in records
                   if getattr(r, attr) is not None]
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                              markersize=3, label=label)
            extra = [(r.round, getattr(r, also)) for r in records
                     if also and getattr(r, also) is not None]
            if extra:
                ax.plot([p[0] for p in extra], [p[1] for p in extra], linestyle="--",
                        linewidth=1, color=line.get_color(),
                        label=f"{label} (float model, every round)")
        for y, color, style, label in lines:
            ax.axhline(y, color=color, linestyle=style, label=label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name, title

    lines = []
    first = next(iter(runs.values()), [])
    if first and first[0].hr10 is not None:
        lines.append((first[0].hr10, "grey", ":", "pretrained (public slice)"))
    if central is not None and central.get("hr@10") is not None:
        lines.append((central["hr@10"], "black", "--", "central training (all data, no DP)"))
    made = [
        plot("hr10.png", "hr10", "Offline HR@10 of each published model",
             "HR@10 (held-out, full ranking)", runs, lines, also="float_hr10"),
        plot("online.png", "online_hr10", "What the sampled devices' recommendations hit",
             "online HR@10 (next real event in the device's top 10)", runs),
    ]
    private = {k: v for k, v in runs.items() if any(r.epsilon for r in v)}
    if private:
        delta = next(r.delta for r in next(iter(private.values())))
        made.append(plot("epsilon.png", "epsilon",
                         "Cumulative user-level epsilon (RDP accountant)",
                         f"epsilon (delta = {delta:g})", private))
    return made


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _html(runs: Mapping[str, Sequence[RoundRecord]], central: Mapping[str, Any] | None,
          meta: Mapping[str, Any], table: list[dict[str, Any]],
          plots: list[tuple[str, str]]) -> str:
    e = html.escape
    head = ["run", "rounds", "published", "start HR@10", "final HR@10", "gain",
            "share of central", "online HR@10 (last 5)", "epsilon", "delta"]
    body = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in (
            e(row["run"]), row["rounds"], row["published"], _fmt(row["start_hr10"]),
            _fmt(row["final_hr10"]), _fmt(row["gain_hr10"]),
            _fmt(row.get("share_of_central"), 3), _fmt(row["online_hr10_last5"]),
            _fmt(row["epsilon"], 2), _fmt(row["delta"]))) + "</tr>"
        for row in table)
    central_line = "" if central is None else (
        f"<p>Central model (all users' training data in one place, no DP): HR@10 "
        f"{_fmt(central.get('hr@10'))}, NDCG@10 {_fmt(central.get('ndcg@10'))}.</p>")
    imgs = "".join(f'<figure><img src="{e(f)}" alt="{e(t)}"><figcaption>{e(t)}</figcaption>'
                   "</figure>" for f, t in plots)
    cols = ["round", "state", "version", "sampled", "completed", "dropped", "online_hr10",
            "hr10", "ndcg10", "epsilon", "bytes_up_per_device", "bytes_down_per_device",
            "wall_s"]
    detail = ""
    for label, records in runs.items():
        lines = "".join("<tr>" + "".join(
            f"<td>{_fmt(getattr(r, c), 2 if c in ('epsilon', 'wall_s') else 4)}</td>"
            if isinstance(getattr(r, c), float) else f"<td>{_fmt(getattr(r, c))}</td>"
            for c in cols) + "</tr>" for r in records)
        detail += (f"<h3>{e(label)}</h3><table><tr>"
                   + "".join(f"<th>{e(c)}</th>" for c in cols) + f"</tr>{lines}</table>")
    info = "".join(f"<tr><th>{e(str(k))}</th><td>"
                   f"{e(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
                   for k, v in meta.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PocketRec simulation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 75em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>PocketRec: federated learning with SecAgg+ and DP</h1>
<h2>Summary</h2>
<table><tr>{"".join(f"<th>{e(h)}</th>" for h in head)}</tr>{body}</table>
{central_line}
<p>Offline metrics: the int8 LiteRT model devices serve, full ranking over every item, on the
devices' held-out events (never logged on any device). Online HR@10: the share of sampled
devices whose user's next real event was in the top 10 they were shown that round.</p>
{imgs}
<h2>Setup</h2><table>{info}</table>
<h2>Every round</h2>{detail}
</body></html>
"""
