"""``summary.png``: a run's losses, ADA p and FID/KID on one page, written beside its records when it ends.

TensorBoard shows the same series live; this picture is for a run directory looked at later (a bucket browser,
a README, a report), with nothing to start.
"""

from __future__ import annotations

import io

import pandas as pd

PANELS = (  # (title, [(column or sum of columns, label)])
    ("losses", [(("loss_G",), "G"), (("loss_D_real", "loss_D_fake"), "D (real + fake)")]),
    ("D outputs", [(("D_x",), "D(x)"), (("D_G_z",), "D(G(z))")]),
    ("ADA", [(("ada_p",), "p"), (("ada_rt",), "r_t")]),
    ("FID", [(("fid",), "FID")]),
    ("KID", [(("kid",), "KID")]),
    ("IS", [(("is",), "Inception Score")]),
)
SMOOTHED_ABOVE = 50  # points: a longer series is per-iteration (losses), drawn smoothed; a shorter one evaluations


def moving_average(values: pd.Series) -> pd.Series:
    """A per-iteration series (losses) smoothed enough to read its trend: a window of 1/40 of it, 5 at least."""
    return values.rolling(max(5, len(values) // 40), min_periods=1).mean()


def summary_png(records: pd.DataFrame, title: str = "") -> bytes:
    """A PNG with one panel per series group that the records hold (losses always; ADA, FID, KID, IS when present);
    noisy per-iteration series are drawn raw and as a moving average."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    from matplotlib import pyplot

    panels = [(name, [(columns, label) for columns, label in series if set(columns) <= set(records.columns)])
              for name, series in PANELS]
    panels = [(name, series) for name, series in panels if series]
    figure, axes = pyplot.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for axis, (name, series) in zip(axes[:, 0], panels):
        for columns, label in series:
            _plot(axis, records, columns, label)
        axis.set_title(name, fontsize=10, loc="left")
        axis.legend(fontsize=8, loc="upper right")
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    pyplot.close(figure)
    return buffer.getvalue()


def _plot(axis, records: pd.DataFrame, columns: tuple[str, ...], label: str) -> None:
    rows = records.dropna(subset=list(columns))
    values = rows[list(columns)].sum(axis=1)
    if len(rows) > SMOOTHED_ABOVE:  # per-iteration series: faint raw values under a moving average
        line, = axis.plot(rows["iteration"], values, alpha=0.25, linewidth=0.8)
        axis.plot(rows["iteration"], moving_average(values), color=line.get_color(), label=label)
    else:  # evaluations: a few points
        axis.plot(rows["iteration"], values, marker="o", label=label)
