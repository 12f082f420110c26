"""The three PNGs of a training run: per-layer widths, score histograms, training curves."""

from __future__ import annotations

import os


def write_plots(out: str, per_layer: list[dict], history: list[dict],
                score_hist: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # 1. widths: dense vs final per layer
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(per_layer)), 4))
    xs = range(len(per_layer))
    ax.bar(xs, [r["filters_dense"] for r in per_layer], color="#cccccc", label="dense")
    ax.bar(xs, [r["filters_final"] for r in per_layer], color="#1f77b4", label="final")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in per_layer], rotation=90, fontsize=6)
    ax.set_ylabel("filters")
    ax.set_title("filters per layer")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "widths.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    # 2. score histograms over epochs
    fig, ax = plt.subplots(figsize=(6, 4))
    if score_hist:
        cmap = plt.get_cmap("viridis")
        for i, h in enumerate(score_hist):
            centers = [(j + 0.5) / len(h["hist"]) for j in range(len(h["hist"]))]
            ax.plot(centers, h["hist"], color=cmap(i / max(1, len(score_hist) - 1)),
                    label=f"epoch {h['epoch'] + 1}" if i in (0, len(score_hist) - 1) else None)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no attention scores in this run\n(dense, slim or uniform method)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("gate g")
    ax.set_ylabel("filters")
    ax.set_title("gate distribution before selection")
    fig.tight_layout()
    paths.append(os.path.join(out, "scores.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    # 3. accuracy / loss / kept fraction
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    ep = [h["epoch"] + 1 for h in history]
    axes[0].plot(ep, [h["train_acc"] for h in history], label="train")
    axes[0].plot(ep, [h["eval_acc"] for h in history],
                 label=history[0]["eval_split"] if history else "eval")
    axes[0].set_title("top-1")
    axes[0].legend()
    axes[1].plot(ep, [h["loss"] for h in history])
    axes[1].set_title("task loss")
    axes[2].plot(ep, [h["kept_fraction"] for h in history])
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("kept fraction of params")
    for a in axes:
        a.set_xlabel("epoch")
    fig.tight_layout()
    paths.append(os.path.join(out, "curves.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
