"""Report plots: labels of nearby settings never overprint, axes name the metric and the unit."""
import itertools

import pytest

pytest.importorskip("matplotlib")
pd = pytest.importorskip("pandas")


def _boxes(texts):
    r = texts[0].figure.canvas.get_renderer()
    return [t.get_window_extent(r) for t in texts]


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_place_labels_never_overprint():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from vtoolkit.eval.report import place_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(3, 0.50, "keep_ratio=0.05", "C0"), (3, 0.50, "keep_ratio=0.05", "C1"), (6, 0.51, "keep_ratio=0.1", "C0"),
           (6, 0.50, "keep_ratio=0.1", "C1"), (16, 0.55, "keep_ratio=0.25", "C0"), (16, 0.56, "keep_ratio=0.25", "C1"),
           (32, 0.9, "K=2, ratio=0.5", "C2")]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    ax.margins(0.15)
    texts = place_labels(ax, pts)
    boxes = _boxes(texts)
    for a, b in itertools.combinations(boxes, 2):
        assert not _overlap(a, b), (a, b)
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    markers = ax.transData.transform([(x, y) for x, y, *_ in pts])
    for b in boxes:
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
        for mx, my in markers:
            assert not (b.x0 < mx < b.x1 and b.y0 < my < b.y1)
    # the naive placement (every label at the same offset) did overprint here: the test would catch a regression
    naive = [ax.annotate(t, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7) for x, y, t, _ in pts]
    assert any(_overlap(a, b) for a, b in itertools.combinations(_boxes(naive), 2))
    plt.close(fig)


def test_plot_axes_name_metric_and_unit(tmp_path):
    from vtoolkit.eval.report import _plot

    rows = [("none", "-", 64, 0.90), ("fastervlm", "keep_ratio=0.25", 16, 0.89), ("fastervlm", "keep_ratio=0.1", 6, 0.8),
            ("random", "keep_ratio=0.25", 16, 0.85), ("random", "keep_ratio=0.1", 6, 0.7)]
    df = pd.DataFrame([{"method": m, "options": o, "visual_tokens": x, "score": y, "bench": "pope",
                        "metric": "POPE F1 (mean over splits)"} for m, o, x, y in rows])
    texts = _plot(df, "pope", "visual_tokens", "visual tokens kept per sample [tokens]", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert len(texts) == 4
    ax = texts[0].axes
    assert ax.get_ylabel() == "POPE F1 (mean over splits) [0-1]"
    assert ax.get_xlabel().endswith("[tokens]")
