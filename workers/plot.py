"""``--plot PATH``: a PNG of dirty pages found and pages sent per round,
hot-adds marked; drawn from a run's result dict (either guest)."""

from __future__ import annotations

from typing import Any


def plot_rounds(result: dict[str, Any], path: str) -> None:
    """Write the PNG; raises OSError if ``path`` cannot be written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["round_log"]
    xs = [r["round"] for r in rounds]
    down = result["downtime"]
    stop = (xs[-1] + 1) if xs else 1
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(xs + [stop], [r["dirty"] for r in rounds] + [down["pages"]], "o-",
            label="dirty pages found at the sync")
    ax.bar(xs + [stop], [r["sent"] for r in rounds] + [down["pages"]], width=0.5,
           alpha=0.5, color="tab:orange", label="pages sent")
    for i, h in enumerate(result.get("hotplug", [])):
        x = h.get("round") or 0.5
        ax.axvline(x, color="tab:red", linestyle="--",
                   label="hot-add" if i == 0 else None)
        ax.annotate(f"+{h['size'] >> 20} MiB", (x, ax.get_ylim()[1] * 0.9), color="tab:red",
                    rotation=90, ha="right", va="top", fontsize=8)
    ax.set_yscale("symlog")
    ax.set_xticks(xs + [stop], [str(x) for x in xs] + ["stop"])
    ax.set_xlabel("pre-copy round (stop: stop-and-copy)")
    ax.set_ylabel("pages")
    ax.set_title(f"shmdirty migrate --guest {result['guest']}: {result['rounds']} round(s), "
                 f"downtime {result['downtime_ms']:.0f} ms")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
