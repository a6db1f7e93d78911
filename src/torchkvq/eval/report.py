"""Tables, files and the plot of an evaluation run."""

from __future__ import annotations

import csv
import json
import pathlib

from .methods import BASELINE
from .protocol import MethodResult

COLUMNS = ["method", "kind", "ppl", "d_ppl", "d_ppl_pct", "kl", "top1", "bytes_per_token",
           "bytes_in_use_per_token", "ratio_vs_fp16", "decode_tok_s", "decode_peak_rss_mib"]


def rows(results: dict[str, MethodResult], fp16_bytes_per_token: float) -> list[dict]:
    """One dict per method with every figure of the table."""
    base = results[BASELINE].perplexity
    out = []
    for name, r in results.items():
        bpt = r.bytes_per_token
        out.append({
            "method": name,
            "kind": r.method.kind,
            "ppl": r.perplexity,
            "d_ppl": r.perplexity - base,
            "d_ppl_pct": 100 * (r.perplexity - base) / base,
            "kl": r.mean_kl,
            "top1": r.top1_agreement,
            "bytes_per_token": bpt,
            "bytes_in_use_per_token": r.bytes_in_use_per_token,
            "ratio_vs_fp16": fp16_bytes_per_token / bpt,
            "decode_tok_s": r.decode_tokens_per_s,
            "decode_peak_rss_mib": r.decode_peak_rss_mib,
            "description": r.method.description,
        })
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(table_rows: list[dict]) -> str:
    """A Markdown table (it reads fine on a terminal too)."""
    head = ["method", "ppl", "Δppl", "Δppl %", "KL", "top-1", "bytes/token", "in use", "× vs fp16",
            "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows:
        cells = [r["method"], _fmt(r["ppl"], ".3f"), _fmt(r["d_ppl"], "+.3f"), _fmt(r["d_ppl_pct"], "+.2f"),
                 _fmt(r["kl"], ".4f"), _fmt(r["top1"], ".3f"), _fmt(r["bytes_per_token"], ",.0f"),
                 _fmt(r["bytes_in_use_per_token"], ",.0f"),
                 _fmt(r["ratio_vs_fp16"], ".2f"), _fmt(r["decode_tok_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(table_rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["description"])
        w.writeheader()
        w.writerows(table_rows)


def write_json(table_rows: list[dict], settings: dict, machine: dict, path: pathlib.Path) -> None:
    path.write_text(json.dumps({"settings": settings, "machine": machine, "results": table_rows}, indent=2))


def _annotate(ax, fig, table_rows: list[dict]) -> None:
    """Method names beside their points, each moved to the first of a few offsets where it covers
    no point and no name already placed (points of similar methods sit close together)."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    r_px = 5  # the markers (s=40) are about 7 px across: keep names off them too
    placed = [Bbox.from_extents(x - r_px, y - r_px, x + r_px, y + r_px) for x, y in
              ax.transData.transform([(r["ratio_vs_fp16"], r["d_ppl_pct"]) for r in table_rows])]
    for r in sorted(table_rows, key=lambda r: (r["ratio_vs_fp16"], r["d_ppl_pct"])):
        xy = (r["ratio_vs_fp16"], r["d_ppl_pct"])
        for dx, dy in ((5, 4), (5, -11), (-5, 4), (-5, -11), (5, 14), (-5, 14), (5, -21), (-5, -21)):
            text = ax.annotate(r["method"], xy, textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               ha="left" if dx > 0 else "right")
            box = text.get_window_extent(fig.canvas.get_renderer())
            if not any(box.overlaps(b) for b in placed):
                break
            text.remove()
        else:
            text = ax.annotate(r["method"], xy, textcoords="offset points", xytext=(5, 4), fontsize=8)
            box = text.get_window_extent(fig.canvas.get_renderer())
        placed.append(box)


def plot(table_rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Compression ratio vs fp16 against Δperplexity, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "black", "torchkvq": "tab:blue", "peer": "tab:red", "heads": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in table_rows:
        ax.scatter(r["ratio_vs_fp16"], r["d_ppl_pct"], color=colors[r["kind"]], s=40, zorder=3)
    for kind, c in colors.items():
        if kind != "heads" or any(r["kind"] == kind for r in table_rows):
            ax.scatter([], [], color=c, label=kind)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)  # near-lossless methods and collapses on one plot
    d = [r["d_ppl_pct"] for r in table_rows]
    ax.set_ylim(min(-0.5, 3 * min(d)), max(2.0, 5 * max(d)))  # room above the worst for its label
    ax.set_xlim(0, 1.15 * max(r["ratio_vs_fp16"] for r in table_rows))
    _annotate(ax, fig, table_rows)
    ax.set_xlabel("KV bytes held: compression vs an fp16 cache (×, metadata and fp windows included)")
    ax.set_ylabel("Δ perplexity vs full-precision cache (%, symlog)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
