"""Plot helpers: the figures carry the numbers they were given, on the scales promised."""

import numpy as np
import pytest
import torch

from vit_lens import plot


def test_image_heatmap_upsamples_the_map_and_centres_signed_maps():
    image = torch.rand(3, 64, 48)
    heatmap = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    fig = plot.image_heatmap(image, heatmap, title="t")
    picture, overlay = fig.data
    assert np.asarray(picture.z).shape == (64, 48, 3) and np.asarray(picture.z).dtype == np.uint8
    z = np.asarray(overlay.z)
    assert z.shape == (64, 48) and overlay.zmid == 0.0 and overlay.colorscale[0][1] != overlay.colorscale[-1][1]
    # bilinear upsampling keeps each quadrant's centre value near the grid value
    assert abs(z[48, 36] - 3.0) < 0.6 and abs(z[16, 12] - 1.0) < 0.6
    positive = plot.image_heatmap(image.permute(1, 2, 0), heatmap.abs())
    assert positive.data[1].zmid is None


def test_image_heatmap_grid_shares_one_symmetric_scale():
    maps = torch.stack([torch.full((4, 4), -1.0), torch.full((4, 4), 2.0), torch.zeros(4, 4)])
    fig = plot.image_heatmap_grid(torch.rand(3, 32, 32), maps, titles=["a", "b", "c"], cols=2)
    overlays = [t for t in fig.data if t.type == "heatmap"]
    assert len(overlays) == 3 and all(t.zmin == -2.0 and t.zmax == 2.0 for t in overlays)
    assert [a.text for a in fig.layout.annotations] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="got 2 titles for 3 maps"):
        plot.image_heatmap_grid(None, maps, titles=["a", "b"])


def test_layer_head_grid_and_curves_hold_the_values():
    values = torch.arange(12.0).reshape(3, 4) - 5
    fig = plot.layer_head_grid(values)
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), values.numpy())
    assert list(fig.data[0].y) == ["L0", "L1", "L2"] and fig.data[0].text[2][3] == "6.00"
    curves = plot.layer_curves({"a": torch.tensor([1.0, 2.0]), "b": [3, 4]}, x=[5, 6])
    assert [list(t.y) for t in curves.data] == [[1.0, 2.0], [3.0, 4.0]] and list(curves.data[1].x) == [5, 6]
    with pytest.raises(ValueError, match="curve 'a' has 2 values for 3 x values"):
        plot.layer_curves({"a": [1, 2]}, x=[0, 1, 2])
    with pytest.raises(ValueError, match=r"values must be \[n_layers, n_heads\]"):
        plot.layer_head_grid(torch.zeros(3))


def test_html_report_is_self_contained(tmp_path):
    figures = [plot.layer_head_grid(torch.randn(2, 2)), plot.layer_curves([1, 2, 3])]
    out = plot.write_html_report([("grids", figures), ("notes", "plain <text>"), ("table", plot.HTML("<b>bold</b>"))], tmp_path / "r.html")
    text = out.read_text()
    assert text.count("<h2>") == 3 and "&lt;text&gt;" in text and "<b>bold</b>" in text
    assert "<script src=\"http" not in text and text.count("Plotly.newPlot(") == 2
    assert len(text) > 3_000_000  # plotly.js is inlined once, so the file opens offline
