"""robustness: box parsing and mask geometry by hand, the low-pass filter by its defining properties, and
accuracy curves against per-model brute force for a tiny ViT and a tiny timm CNN side by side."""

import math

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vit_lens import HookedViT
from vit_lens import robustness as rb

pytestmark = pytest.mark.usefixtures("one_thread")

XML = """<annotation>
  <folder>n01440764</folder>
  <filename>n01440764_42</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  <object><name>n01440764</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>
  <object><name>n09999999</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></object>
</annotation>"""


def test_parse_voc_xml_from_text_and_file(tmp_path):
    text = XML.format(width=40, height=30, x0=5, y0=6, x1=20, y1=12)
    path = tmp_path / "n01440764_42.xml"
    path.write_text(text)
    for source in (text, path, str(path)):
        annotation = rb.parse_voc_xml(source)
        assert (annotation.width, annotation.height, annotation.filename) == (40, 30, "n01440764_42")
        assert annotation.boxes == (rb.Box("n01440764", 5, 6, 20, 12), rb.Box("n09999999", 0, 0, 3, 3))
        assert annotation.boxes_named("n01440764") == (rb.Box("n01440764", 5, 6, 20, 12),)
    with pytest.raises(ValueError, match="<size>"):
        rb.parse_voc_xml("<annotation><object/></annotation>")
    with pytest.raises(FileNotFoundError, match="no XML file"):
        rb.parse_voc_xml(tmp_path / "missing.xml")


def test_box_mask_geometry_is_exact():
    boxes = [rb.Box("a", 2, 1, 4, 3), rb.Box("b", 6, 5, 20, 20)]  # the second runs off the image: clipped
    mask = rb.box_mask(boxes, 8, 9)
    expected = np.zeros((8, 9), dtype=bool)
    expected[1:4, 2:5] = True
    expected[5:8, 6:9] = True
    assert np.array_equal(mask.numpy(), expected)
    one_based = rb.box_mask([rb.Box("a", 2, 1, 4, 3)], 8, 9, one_based=True)
    assert np.array_equal(one_based.numpy()[0:3, 1:4], np.ones((3, 3), dtype=bool)) and int(one_based.sum()) == 9


def test_mask_boxes_blanks_exactly_one_side():
    images = torch.rand(2, 3, 8, 9, generator=torch.Generator().manual_seed(0)) + 0.1
    masks = torch.stack([rb.box_mask([rb.Box("a", 2, 1, 4, 3)], 8, 9), rb.box_mask([rb.Box("a", 0, 0, 8, 7)], 8, 9)])
    background = rb.mask_boxes(images, masks, "background")
    foreground = rb.mask_boxes(images, masks, "foreground", fill=0.5)
    inside = masks[:, None].expand_as(images)
    assert torch.equal(background[inside], torch.zeros(int(inside.sum())))
    assert torch.equal(background[~inside], images[~inside])
    assert torch.equal(foreground[inside], images[inside])
    assert torch.equal(foreground[~inside], torch.full((int((~inside).sum()),), 0.5))
    assert torch.equal(rb.mask_boxes(images, masks, "full"), images)
    # the two views add up to the image when blanked with zeros
    assert torch.equal(rb.mask_boxes(images, masks, "foreground") + background, images)


def test_box_masked_images_carry_the_mask_through_resize_and_crop(tmp_path):
    from PIL import Image

    # 32 x 40 image, resized to short side 64 (exactly x2: 64 x 80) and centre-cropped to 64 x 64 (8 px off each side)
    rgb = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "n01440764_42.png")
    (tmp_path / "n01440764_42.xml").write_text(XML.format(width=40, height=32, x0=10, y0=4, x1=19, y1=11))
    pairs = rb.find_box_pairs(tmp_path, tmp_path)
    assert pairs == [(tmp_path / "n01440764_42.png", tmp_path / "n01440764_42.xml")]
    data = rb.BoxMaskedImages(pairs, ["n00000000", "n01440764"], size=64, resize_size=64)
    image, label, mask = data[0]
    assert label == 1 and image.shape == (3, 64, 64) and mask.shape == (64, 64)
    assert 0.0 <= image.min().item() and image.max().item() <= 1.0
    expected = np.zeros((64, 64), dtype=bool)
    expected[8:24, 2 * 10 - 8 : 2 * 20 - 8] = True  # pixels 10..19 -> 20..39 after x2, minus the 8 px crop
    assert np.array_equal(mask.numpy(), expected)  # the other class's box (0..3) is ignored


def test_low_pass_identity_at_full_band_and_removes_planted_high_frequencies():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 12, generator=generator)
    assert torch.allclose(rb.low_pass(images, 1.0, norm="max"), images, atol=1e-5)
    assert torch.allclose(rb.low_pass(images, math.sqrt(2), norm="l2"), images, atol=1e-5)
    assert torch.allclose(rb.low_pass(images, 0.0), images.mean((-2, -1), keepdim=True).expand_as(images), atol=1e-5)
    # a smooth image plus a planted checkerboard at the Nyquist frequency: the filter removes the checkerboard
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(12.0), indexing="ij")
    smooth = 0.5 + 0.2 * torch.cos(2 * math.pi * xx / 12) + 0.1 * torch.sin(2 * math.pi * yy / 16)
    checker = 0.1 * (-1.0) ** (xx + yy)
    filtered = rb.low_pass((smooth + checker).expand(3, -1, -1), 0.5)
    assert torch.allclose(filtered, smooth.expand(3, -1, -1), atol=1e-5)
    # idempotent, and never adds energy
    once = rb.low_pass(images, 0.4)
    assert torch.allclose(rb.low_pass(once, 0.4), once, atol=1e-5)
    assert once.sub(once.mean((-2, -1), keepdim=True)).norm() <= images.sub(images.mean((-2, -1), keepdim=True)).norm()


def test_accuracy_curves_for_a_vit_and_a_cnn_side_by_side():
    import timm

    torch.manual_seed(0)
    vit = HookedViT(tiny_config(n_registers=0, ln_pre=False, d_proj=None, n_classes=5)).init_weights(seed=0).eval()
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    models = {"ViT": rb.as_classifier(vit, mean=mean, std=std), "CNN": rb.as_classifier(cnn, mean=mean, std=std)}
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 5
    masks = torch.zeros(12, 32, 32, dtype=torch.bool)
    masks[:, 8:20, 4:28] = True
    loader = [(images[:7], labels[:7], masks[:7]), (images[7:], labels[7:], masks[7:])]
    conditions = {**rb.box_conditions(), **rb.low_pass_conditions([0.5, 0.25])}
    curves = rb.accuracy_curves(models, loader, conditions, k=3, progress=False)
    normalise = lambda x: (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]  # noqa: E731
    with torch.no_grad():
        for name, model in (("ViT", vit), ("CNN", cnn)):
            for condition, changed in {
                "full": images,
                "foreground": images * masks[:, None],
                "background": images * ~masks[:, None],
                "0.5": rb.low_pass(images, 0.5).clamp(0, 1),
            }.items():
                scores = model(normalise(changed))
                top1 = scores.argmax(-1).eq(labels).float().mean().item()
                top3 = scores.topk(3, dim=-1).indices.eq(labels[:, None]).any(-1).float().mean().item()
                assert curves.top1[name][condition] == pytest.approx(top1), (name, condition)
                assert curves.topk[name][condition] == pytest.approx(top3), (name, condition)
    assert curves.n_images == 12
    relative = curves.relative("full")
    for name in models:
        assert relative[name]["full"] == pytest.approx(1.0)
        assert relative[name]["background"] == pytest.approx(curves.topk[name]["background"] / curves.topk[name]["full"])
    fig = curves.figure(relative_to="full")
    assert [trace.name for trace in fig.data] == ["ViT", "CNN"]
    assert list(fig.data[0].x) == list(conditions)


def test_clip_models_take_a_zero_shot_classifier():
    model = HookedViT(tiny_config()).init_weights(seed=0).eval()
    classifier = torch.nn.functional.normalize(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), dim=0)
    images = torch.rand(3, 3, 32, 32)
    run = rb.as_classifier(model, classifier=classifier)
    assert torch.allclose(run(images), torch.nn.functional.normalize(model(images), dim=-1) @ classifier, atol=1e-6)
    with pytest.raises(ValueError, match="classifier="):
        rb.as_classifier(model)(images)
    with pytest.raises(ValueError, match="box masks"):
        rb.accuracy_curves({"m": run}, [(images, torch.zeros(3, dtype=torch.long))], rb.box_conditions(), progress=False)
