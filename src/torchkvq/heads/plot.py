"""Plot held-out perplexity against distillation steps from ``torchkvq.heads.evaluate --json`` files.

``python -m torchkvq.heads.plot RUN.json [RUN.json ...] --out recovery.png``. Each file must come
from a run with ``--recover-steps`` and ``--recover-eval-every``; every distilled variant in it
becomes one line, starting at step 0 from the merged model's perplexity. The y axis is the
excess over the original model's perplexity of the same run, with the issue's +10% target drawn.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def curves(run: dict) -> list[tuple[str, list[int], list[float]]]:
    """``(label, steps, excess %)`` for every distilled variant of one evaluate run."""
    rows = run["rows"]
    original = next(r["ppl"] for r in rows if r["variant"] == "original")
    merged = {r["variant"]: r["ppl"] for r in rows if "curve" not in r}
    out = []
    for r in rows:
        if "curve" not in r:
            continue
        if not r["curve"]:
            raise ValueError(f"{r['variant']}: no held-out points; rerun with --recover-eval-every N")
        base = r["variant"].split("+recover(")[0]
        steps = [0] + [c["step"] for c in r["curve"]]
        ppls = [merged[base]] + [c["ppl"] for c in r["curve"]]
        out.append((r["variant"], steps, [100 * (p / original - 1) for p in ppls]))
    return out


def plot(paths: list[pathlib.Path], out: pathlib.Path, target: float = 10.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for path in paths:
        run = json.loads(path.read_text())
        lines = curves(run)
        if not lines:
            raise ValueError(f"{path}: no distilled variant (run evaluate with --recover-steps)")
        for label, steps, excess in lines:
            ax.plot(steps, excess, marker="o", label=label)
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target (+{target:g}%)")
    ax.set_xlabel("distillation steps (one calibration window each)")
    ax.set_ylabel("held-out perplexity vs original (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchkvq.heads.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=pathlib.Path, help="JSON files written by heads.evaluate --json")
    p.add_argument("--out", type=pathlib.Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        plot(args.runs, args.out)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"python -m torchkvq.heads.plot: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
