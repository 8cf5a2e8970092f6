"""featureviz: objectives against the cache, augmentations by their definitions, TV by loops, dataset
examples against a brute-force sort, and the optimisation against random and average images."""

import math

import pytest
import torch

import vit_lens
from tests.conftest import assert_rel_close
from vit_lens import featureviz as fv
from vit_lens.toy import ToyWorld, factor_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def world_images() -> torch.Tensor:
    return ToyWorld(seed=3).sample(96).images


def most_variable_neuron(clip, images, layer):
    _, cache = clip.vision.run_with_cache(images, names_filter=f"blocks.{layer}.mlp.hook_post")
    per_image = cache[f"blocks.{layer}.mlp.hook_post"][:, clip.vision.cfg.n_prefix_tokens :].mean(1)
    index = int(per_image.std(0).argmax())
    return index, per_image[:, index]


# ------------------------------------------------------------------------------ the optimisation


def test_optimised_image_activates_neuron_far_more_than_random_and_average_images(clip, world_images):
    index, dataset_values = most_variable_neuron(clip, world_images, layer=1)
    objective = fv.neuron(1, index)
    result = fv.visualize(clip, objective, steps=60, ensemble=4, progress=False)
    random_images = torch.rand(32, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    random_best = fv.evaluate(clip, objective, random_images).max().item()
    average_image = fv.evaluate(clip, objective, world_images.mean(0, keepdim=True)).item()
    spread = dataset_values.std().item()
    assert result.activation > max(random_best, average_image) + 1.5 * spread
    assert result.activation > dataset_values.mean().item() + 2 * spread
    # the returned image is what was evaluated, and a valid image
    assert result.image.shape == (3, 64, 64)
    assert 0.0 <= result.image.min().item() and result.image.max().item() <= 1.0
    assert math.isclose(fv.evaluate(clip, objective, result.image[None]).item(), result.activation, rel_tol=1e-5)
    assert result.losses.shape == (60,) and result.activations.shape == (60,)
    assert result.activations[-10:].mean() > result.activations[:10].mean()


def test_text_direction_image_is_classified_as_that_colour(clip, world_images):
    objective = fv.text_direction(clip, "red object")
    result = fv.visualize(clip, objective, steps=60, ensemble=4, parameterization="fourier", progress=False)
    colours = clip.encode_text(factor_prompts("colour"), normalize=True)
    scores = clip.encode_image(result.image[None], normalize=True) @ colours.T
    assert factor_prompts("colour")[scores.argmax().item()] == "red object"
    assert result.activation > fv.evaluate(clip, objective, world_images).mean().item() + 0.2
    assert 0.0 < result.image.min().item() and result.image.max().item() < 1.0  # a sigmoid never reaches 0 or 1


def test_ensemble_reductions_scale_the_feature_loss(clip):
    """With no TV, the first loss (same seed, same augmentations) is -K * mean for "sum", -mean / K for "code"."""
    objective = fv.neuron(2, 3)
    k = 4
    losses = {
        reduction: fv.visualize(clip, objective, steps=1, ensemble=k, tv_weight=0.0, ensemble_reduction=reduction,
                                progress=False).losses[0].item()
        for reduction in ("mean", "sum", "code")
    }
    assert math.isclose(losses["sum"], k * losses["mean"], rel_tol=1e-5)
    assert math.isclose(losses["code"], losses["mean"] / k, rel_tol=1e-5)


def test_normalisation_is_applied_before_the_model(clip, world_images):
    objective = fv.neuron(2, 7)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    normalised = (world_images[:4] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    expected = fv.evaluate(clip, objective, normalised)
    assert_rel_close(fv.evaluate(clip, objective, world_images[:4], mean=mean, std=std), expected, rtol=1e-6)
    assert_rel_close(fv.evaluate(clip, objective, world_images[:4], preprocess=lambda x: (x - 0.4) / 0.2),
                     fv.evaluate(clip, objective, (world_images[:4] - 0.4) / 0.2), rtol=1e-6)


# ------------------------------------------------------------------------------ objectives


def test_neuron_objective_is_the_patch_mean_of_mlp_post(clip, world_images):
    _, cache = clip.vision.run_with_cache(world_images[:5])
    post = cache["blocks.2.mlp.hook_post"]
    assert_rel_close(fv.evaluate(clip, fv.neuron(2, 11), world_images[:5]), post[:, 1:, 11].mean(1), rtol=1e-5)
    assert_rel_close(fv.evaluate(clip, fv.neuron(2, 11, reduce="sum"), world_images[:5]), post[:, 1:, 11].sum(1), rtol=1e-5)
    assert_rel_close(fv.evaluate(clip, fv.neuron(2, 11, tokens="cls"), world_images[:5]), post[:, 0, 11], rtol=1e-5)
    combined = fv.neuron(2, 11) - 0.5 * fv.neuron(2, 12)
    assert_rel_close(fv.evaluate(clip, combined, world_images[:5]),
                     post[:, 1:, 11].mean(1) - 0.5 * post[:, 1:, 12].mean(1), rtol=1e-5)


def test_head_direction_is_the_head_result_along_the_direction(clip, world_images):
    direction = torch.randn(128, generator=torch.Generator().manual_seed(0))
    _, cache = clip.vision.run_with_cache(world_images[:3], names_filter="blocks.3.attn.hook_z")
    result = torch.einsum("bpd,dm->bpm", cache["blocks.3.attn.hook_z"][:, :, 2], clip.vision.blocks[3].attn.W_O[2])
    expected = (result @ direction / direction.norm())[:, 0]
    got = fv.evaluate(clip, fv.head_direction(clip, 3, 2, direction, tokens="cls"), world_images[:3])
    assert_rel_close(got, expected, rtol=1e-5)


def test_text_and_layer_objectives(clip, world_images):
    text = clip.encode_text(["red object"], normalize=True)[0]
    embed = clip.encode_image(world_images[:4], normalize=True)
    assert_rel_close(fv.evaluate(clip, fv.text_direction(clip, "red object"), world_images[:4]), embed @ text, rtol=1e-5)
    assert_rel_close(fv.evaluate(clip, fv.text_direction(None, 3 * text), world_images[:4]), embed @ text, rtol=1e-5)
    _, cache = clip.vision.run_with_cache(world_images[:4], names_filter="blocks.1.hook_resid_post")
    assert_rel_close(fv.evaluate(clip, fv.layer("blocks.1.hook_resid_post"), world_images[:4]),
                     cache["blocks.1.hook_resid_post"].pow(2).mean((1, 2)), rtol=1e-5)


def test_class_logit_on_a_classifier():
    from tests.conftest import tiny_config

    model = vit_lens.HookedViT(tiny_config(n_registers=0, ln_pre=False, d_proj=None, n_classes=5)).init_weights(seed=1)
    images = torch.rand(3, 3, 32, 32)
    assert_rel_close(fv.evaluate(model, fv.class_logit(2), images), model(images)[:, 2], rtol=1e-6)


# ------------------------------------------------------------------------------ augmentations and TV


def test_augmentations_keep_shape_and_their_defined_value_ranges():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 20, generator=generator)
    # Jitter is a roll: the same values, rearranged, within the allowed shift
    jitter = fv.Jitter(3)
    out = jitter(images, generator=generator)
    assert out.shape == images.shape
    assert torch.equal(out.flatten().sort().values, images.flatten().sort().values)
    rolls = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4) if torch.equal(torch.roll(images, (dy, dx), (-2, -1)), out)]
    assert rolls
    per_sample = fv.Jitter(3, per_sample=True)(images, generator=generator)
    for image, moved in zip(images, per_sample):
        assert any(torch.equal(torch.roll(image, (dy, dx), (-2, -1)), moved) for dy in range(-3, 4) for dx in range(-3, 4))
    # ColorShift: per copy and channel an affine map with sigma in [1/e, e] and mu in [-1, 1]
    for form in ("paper", "code"):
        shift = fv.ColorShift(form=form)
        out = shift(images, generator=generator)
        mu, sigma = shift.last
        assert out.shape == images.shape
        assert bool((mu.abs() <= 1).all()) and bool(((sigma >= math.exp(-1) - 1e-6) & (sigma <= math.e + 1e-6)).all())
        expected = sigma * images + mu if form == "paper" else (images - mu) / sigma
        assert torch.allclose(out, expected, atol=1e-6)
        low, high = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
        ends = torch.stack([sigma * low + mu, sigma * high + mu]) if form == "paper" else torch.stack([(low - mu) / sigma, (high - mu) / sigma])
        assert torch.allclose(out.amin((2, 3), keepdim=True), ends.amin(0), atol=1e-6)
        assert torch.allclose(out.amax((2, 3), keepdim=True), ends.amax(0), atol=1e-6)
    assert torch.equal(fv.ColorShift(0.0, 0.0)(images, generator=generator), images)
    # noise: per channel it is a constant offset; per pixel its std is the std asked for; decay ends at zero
    per_channel = fv.AdditiveNoise(0.5, per="channel")(images, generator=generator) - images
    assert per_channel.shape == images.shape
    assert torch.allclose(per_channel, per_channel[..., :1, :1].expand_as(per_channel), atol=1e-6)
    per_pixel = fv.AdditiveNoise(1.0)(images, generator=generator) - images
    assert abs(per_pixel.std().item() - 1.0) < 0.05
    assert torch.equal(fv.AdditiveNoise(0.5, per="channel", decay=True)(images, progress=1.0, generator=generator), images)
    # the paper's pipeline, composed, keeps the shape
    composed = images
    for augmentation in fv.paper_augmentations(20):
        composed = augmentation(composed, progress=0.3, generator=generator)
    assert composed.shape == images.shape and torch.isfinite(composed).all()


def test_total_variation_against_loops():
    x = torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    expected = torch.zeros(2)
    for b in range(2):
        for c in range(3):
            h = v = d1 = d2 = 0.0
            for i in range(5):
                for j in range(6):
                    if j + 1 < 6:
                        h += (x[b, c, i, j + 1] - x[b, c, i, j]) ** 2
                    if i + 1 < 5:
                        v += (x[b, c, i + 1, j] - x[b, c, i, j]) ** 2
                    if i + 1 < 5 and j + 1 < 6:
                        d1 += (x[b, c, i + 1, j + 1] - x[b, c, i, j]) ** 2
                    if i + 1 < 5 and j >= 1:
                        d2 += (x[b, c, i + 1, j - 1] - x[b, c, i, j]) ** 2
            expected[b] += (h**0.5 + v**0.5 + d1**0.5 + d2**0.5) / 3
    assert_rel_close(fv.total_variation(x), expected, rtol=1e-5)
    assert fv.total_variation(torch.full((1, 3, 4, 4), 0.3)).item() < 1e-5


def test_parameterisations_give_images_in_range():
    pixel = fv.PixelImage((16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixel.pixels.add_(2.0)
    pixel.post_step()
    assert pixel().shape == (1, 3, 16, 16) and pixel().max().item() == 1.0
    matrix = fv.colour_correlation_sqrt(torch.rand(4, 3, 8, 8))
    fourier = fv.FourierImage((16, 12), colour_matrix=matrix, generator=torch.Generator().manual_seed(0))
    image = fourier()
    assert image.shape == (1, 3, 16, 12) and 0 < image.min().item() and image.max().item() < 1
    with torch.no_grad():
        fourier.spectrum.zero_()
    assert torch.allclose(fourier(), torch.full((1, 3, 16, 12), 0.5))  # a zero spectrum is mid-grey


def test_colour_correlation_sqrt_is_a_scaled_square_root_of_the_covariance():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    images[:, 1] = 0.7 * images[:, 0] + 0.3 * images[:, 1]  # correlated channels
    matrix = fv.colour_correlation_sqrt(images).double()
    covariance = torch.cov(images.permute(1, 0, 2, 3).reshape(3, -1).double())
    product = matrix @ matrix.T
    assert_rel_close(product / product.trace(), covariance / covariance.trace(), rtol=1e-5)
    assert abs(matrix.norm(dim=0).max().item() - 1.0) < 1e-6


# ------------------------------------------------------------------------------ dataset examples


def test_dataset_examples_streaming_equals_brute_force(clip, world_images):
    objective = fv.neuron(2, 9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(world_images), batch_size=7)
    top = fv.dataset_examples(clip, loader, objective, k=5, progress=False)
    everything = fv.evaluate(clip, objective, world_images)
    order = everything.argsort(descending=True)[:5]
    assert torch.equal(top.indices, order)
    assert_rel_close(top.scores, everything[order], rtol=1e-5)
    assert torch.equal(top.images, world_images[order])
    assert_rel_close(top.all_scores, everything, rtol=1e-5)
    _, cache = clip.vision.run_with_cache(world_images[order], names_filter="blocks.2.mlp.hook_post")
    assert_rel_close(top.maps, cache["blocks.2.mlp.hook_post"][:, 1:, 9].reshape(5, 8, 8), rtol=1e-5)
    assert_rel_close(top.maps.mean((1, 2)), top.scores, rtol=1e-5)  # the score is the mean of its map


def test_figures(clip, world_images):
    objective = fv.neuron(2, 9)
    top = fv.dataset_examples(clip, [world_images[:16]], objective, k=3, progress=False)
    result = fv.visualize(clip, objective, steps=2, ensemble=2, progress=False)
    fig = fv.feature_figure(result, top, n_examples=3)
    assert [trace.type for trace in fig.data].count("image") == 1 + 3 + 3
    assert [trace.type for trace in fig.data].count("heatmap") == 3
    assert len(result.loss_figure().data) == 2


def test_errors_name_what_would_work(clip):
    with pytest.raises(TypeError, match="Objective"):
        fv.visualize(clip, "blocks.2.mlp.hook_post", steps=1, progress=False)
    with pytest.raises(ValueError, match="ensemble_reduction"):
        fv.visualize(clip, fv.neuron(1, 0), steps=1, ensemble_reduction="median", progress=False)
    with pytest.raises(ValueError, match="tokens"):
        fv.neuron(1, 0, tokens="patch")
    with pytest.raises(ValueError, match="parameterization"):
        fv.visualize(clip, fv.neuron(1, 0), steps=1, parameterization="wavelet", progress=False)
    with pytest.raises(ValueError, match="both mean= and std="):
        fv.evaluate(clip, fv.neuron(1, 0), torch.rand(1, 3, 64, 64), mean=(0.5, 0.5, 0.5))
