"""The no-model colour-distance map: the trivial baseline that zero-shot segmentation maps are shown next to."""

import pytest
import torch

from vit_lens.methods.segmentation.maps import SegmentationMetrics, average_precision, colour_distance_maps
from vit_lens.toy import ToyWorld
from vit_lens.toy.world import COLOURS


def test_the_map_is_minus_the_euclidean_distance_to_each_images_colour():
    images = torch.tensor([[[[0.0, 0.5]], [[0.0, 0.5]], [[0.0, 1.0]]],   # pixels (0, 0, 0) and (0.5, 0.5, 1)
                           [[[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # pixels (1, 0, 0) and (0, 0, 0)
    colours = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    maps = colour_distance_maps(images, colours)
    assert maps.shape == (2, 1, 2)
    torch.testing.assert_close(maps, torch.tensor([[[-1.0, -(0.5**0.5)]], [[0.0, -1.0]]]))
    # one colour for the whole batch is broadcast
    torch.testing.assert_close(colour_distance_maps(images, colours[1]), torch.tensor([[[-1.0, -(1.5**0.5)]], [[0.0, -1.0]]]))


def test_on_toy_images_the_object_pixels_are_the_closest_but_the_mean_threshold_keeps_background():
    batch = ToyWorld(seed=3).sample(40)
    colours = torch.tensor([COLOURS[scene.colour] for scene in batch.scenes])
    maps = colour_distance_maps(batch.images, colours)
    truth = batch.foreground
    # ranked by closeness, the object's pixels come first: the pixel noise is too weak to mix them
    precision = average_precision(maps.flatten(1), truth.flatten(1))
    assert precision.min() > 0.99, precision.min()
    metrics = SegmentationMetrics()
    metrics.update(maps, truth)
    scores = metrics.compute()
    # thresholded at the mean, the map also keeps the background texture's grey closer to the colour:
    # the figures the report's segmentation section puts next to the model's maps
    assert 0.1 < scores["iou_foreground"] < 0.4 and 0.6 < scores["pixel_accuracy"] < 0.9, scores


@pytest.mark.parametrize(
    "images, colours, message",
    [
        (torch.rand(2, 3, 4), torch.rand(3), r"images must be a float tensor \[batch, channels, height, width\], got a "
                                             r"torch.float32 tensor of shape \(2, 3, 4\)"),
        (torch.rand(2, 3, 4, 4), torch.rand(2, 4), r"colours must be a tensor \[batch=2, channels=3\] .* got \(2, 4\)"),
        (torch.rand(2, 3, 4, 4), [1.0, 0.0, 0.0], r"colours must be .* got list"),
    ],
)
def test_bad_shapes_name_what_was_passed_and_what_works(images, colours, message):
    with pytest.raises(ValueError, match=message):
        colour_distance_maps(images, colours)
