"""dd.show: display choices only (scales, rounding, pixel-exact sample mosaics)."""
import matplotlib
import pandas as pd
import torch

from dd import show

matplotlib.use("Agg")


def test_log_scale_only_for_a_wide_positive_range():
    assert isinstance(show.scale([1.0, 50.0]), show.PlainLogScale)
    assert show.scale([10.0, 12.0, 19.0]) == "linear"
    assert show.scale([0.0, 100.0]) == "linear"  # zero has no place on a log axis
    assert isinstance(show.scale([float("nan"), 2.0, 30.0]), show.PlainLogScale)


def test_log_ticks_are_plain_numbers_without_minor_labels():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([20, 430], [1, 2])
    ax.set(xscale=show.scale([20, 430]))
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "50" in labels and "100" in labels and not any("times" in t or "^" in t for t in labels)
    assert not [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    plt.close(fig)


def test_table_keeps_the_named_columns_rounded():
    t = show.table(pd.DataFrame({"a": [1.23456], "b": [2.0], "c": ["x"]}), ["a", "c", "missing"], digits=2)
    assert list(t.columns) == ["a", "c"] and t.loc[0, "a"] == 1.23


def test_summary_keeps_significant_digits_and_the_rest():
    s = show.summary({"psnr": 21.23456, "mse": 0.00123456, "codes": 64, "dataset": "fashion-mnist"}, digits=3)
    assert s["value"].tolist() == [21.2, 0.00123, 64, "fashion-mnist"]


def test_mosaic_draws_pixel_for_pixel():
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    y = torch.arange(20) % 4
    fig = show.mosaic_figure({"a": x, "b": x[:6]}, y, num_classes=4, per_class=3, classes=list("wxyz"), zoom=2)
    (ax,) = fig.axes
    w, h = ax.get_window_extent().width, ax.get_window_extent().height
    canvas = ax.get_images()[0].get_array()
    assert (w, h) == (2 * canvas.shape[1], 2 * canvas.shape[0])
    assert canvas.shape[0] == 4 * 9 + 1  # one row per class, even where a panel has fewer samples


def test_sheet_stacks_one_strip_per_method(tmp_path):
    x = torch.rand(12, 1, 8, 8) * 2 - 1
    y = torch.arange(12) % 3
    fig = show.sheet({"llamagen": {"teacher": x, "dd1 1-step": x}, "var": {"teacher": x, "other": x}},
                     {"llamagen": y, "var": y}, ("teacher", "dd1 1-step"), 3, 2, ["p", "q", "r"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["LlamaGen · teacher", "LlamaGen · DD1 1-step", "VAR · teacher"]
    assert show.save(fig, tmp_path / "s.png").stat().st_size > 0


def test_table_shows_whole_floats_as_counts():
    t = show.table(pd.DataFrame({"n": [20.0, 10.0], "fid": [1.23456, 2.0]}))
    assert t["n"].dtype == "int64" and t["fid"].tolist() == [1.235, 2.0]


def test_mosaic_is_a_small_png_and_leaves_no_figure_open():
    import matplotlib.pyplot as plt

    x = torch.rand(20, 1, 8, 8) * 2 - 1
    before = len(plt.get_fignums())
    image = show.mosaic({"a": x}, torch.arange(20) % 4, 4, 3)
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n" and len(plt.get_fignums()) == before
