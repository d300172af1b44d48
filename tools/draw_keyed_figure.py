"""Draw docs/figures/keyed_adapter.png: the keyed adapter on one MLP output projection (a schematic).

    .venv/bin/python tools/draw_keyed_figure.py [--out docs/figures/keyed_adapter.png]   # needs matplotlib (make test)

Left: the data flow of one adapted down_proj — the frozen product and, beside it, the rank-n LoRA path whose A is
fixed to the facts' whitened subject keys and whose B alone trains. Right: what A reads — one row per fact,
1 on its own subject's key, about 0 on the other facts' keys and on the preserved inputs (A·K = I with the least
A·C·Aᵀ). The right panel is a drawing of that condition, not a measurement.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FROZEN, FIXED, TRAINED, TEXT = "#d9d9d9", "#9ecae1", "#fdae6b", "#252525"


def box(ax, x, y, w, h, label, color, size=10, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec=TEXT,
                                lw=1.2))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=size, color=TEXT, weight=weight)


def arrow(ax, x0, y0, x1, y1, text=None, dx=0.0, dy=0.12):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14, lw=1.3, color=TEXT))
    if text:
        ax.text((x0 + x1) / 2 + dx, (y0 + y1) / 2 + dy, text, ha="center", va="bottom", fontsize=9, color=TEXT)


def data_flow(ax):
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6.2)
    ax.axis("off")
    ax.set_title("One adapted projection (MLP down_proj, early layers)", fontsize=11, loc="left")
    # input and output
    box(ax, 0.1, 2.6, 1.3, 1.0, "x\n(MLP hidden)", "white", 9)
    box(ax, 8.7, 2.6, 1.2, 1.0, "y", "white", 11, "bold")
    # frozen path
    box(ax, 3.6, 4.4, 2.8, 1.1, "W  (frozen)\ny₀ = x·Wᵀ", FROZEN, 10)
    arrow(ax, 1.4, 3.3, 3.6, 4.9)
    arrow(ax, 6.4, 4.9, 8.7, 3.4)
    # adapter path
    box(ax, 2.2, 0.6, 2.3, 1.5, "A  (fixed)\nrow i = fact i's\nwhitened subject key", FIXED, 9)
    box(ax, 5.8, 0.6, 2.3, 1.5, "B  (trained)\ncolumn i = what the\nlayer writes for fact i", TRAINED, 9)
    arrow(ax, 1.4, 2.9, 2.6, 2.1)
    arrow(ax, 4.5, 1.35, 5.8, 1.35, "sᵢ = aᵢ·x", dy=0.1)
    arrow(ax, 8.1, 1.9, 8.9, 2.6, "+ Σᵢ sᵢ bᵢ", dx=-0.9, dy=0.05)
    ax.text(5.0, 3.35, "y = x·Wᵀ + Σᵢ (aᵢ·x) bᵢ", ha="center", va="center", fontsize=11, color=TEXT,
            style="italic")
    ax.text(0.1, 0.05, "A = (KᵀC⁻¹K)⁻¹KᵀC⁻¹    K: the facts' keys    C: second moment of preserved inputs",
            fontsize=8.5, color=TEXT)


def reads(ax):
    facts = ["Japan's capital", "Monet's birthplace", "1984's author"]
    cols = facts + ["other subjects,\nsame template", "listed\nneighbours", "preservation\ntext"]
    m = np.zeros((len(facts), len(cols)))
    m[np.arange(len(facts)), np.arange(len(facts))] = 1.0
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1.25, aspect="auto")
    ax.set_xticks(range(len(cols)))
    labels = [c if i >= len(facts) else "key of\n" + c.replace(" ", "\n", 1) for i, c in enumerate(cols)]
    ax.set_xticklabels(labels, fontsize=8, rotation=0)
    ax.set_yticks(range(len(facts)))
    ax.set_yticklabels([f"row of {f}" for f in facts], fontsize=8.5)
    for i in range(len(facts)):
        for j in range(len(cols)):
            ax.text(j, i, "1" if i == j else "≈0", ha="center", va="center", fontsize=10,
                    color="white" if i == j else TEXT)
    ax.axvline(len(facts) - 0.5, color=TEXT, lw=1.2)
    ax.set_title("What A reads: A·K = I on the facts' keys,\nabout 0 on the preserved inputs (right of the line)",
                 fontsize=11, loc="left")
    ax.tick_params(length=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures" / "keyed_adapter.png"))
    a = ap.parse_args()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    data_flow(left)
    reads(right)
    legend = [plt.Rectangle((0, 0), 1, 1, fc=c, ec=TEXT) for c in (FROZEN, FIXED, TRAINED)]
    fig.legend(legend, ["frozen weight", "fixed by the keys (not trained)", "trained"], loc="lower center",
               ncol=3, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
