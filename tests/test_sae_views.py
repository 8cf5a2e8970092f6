"""vit_lens.sae views, names, dashboard, truth scores and the `vit-lens sae` command, on the toy CLIP."""

import html
import re
from pathlib import Path

import pytest
import torch

import vit_lens
from vit_lens import HookedViT
from vit_lens.cli import main
from vit_lens.sae import SAE, SAEConfig, load_sae, run_with_cache_with_saes
from vit_lens.sae.dashboard import write_sae_dashboard
from vit_lens.sae.scoring import auroc, mentions, score_sae_features
from vit_lens.sae.views import (
    _Histograms,
    feature_image_scores,
    feature_views,
    image_batches,
    name_features,
    output_directions,
)
from vit_lens.toy import FACTORS, ToyWorld, description_pool

from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def clip():
    return vit_lens.load_toy_clip()


@pytest.fixture(scope="module")
def trained_sae(clip):
    """A TopK SAE trained for a few hundred Adam steps on the toy CLIP's last residual stream."""
    images = ToyWorld(seed=0).sample(300).images
    with torch.no_grad():
        _, cache = clip.run_with_cache(images, names_filter=HOOK)
    activations = cache[HOOK].flatten(0, 1)
    sae = SAE(SAEConfig(d_in=128, d_sae=128, architecture="topk", k=8, hook_name=HOOK)).init_weights(seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(activations.mean(0))
    optimiser = torch.optim.Adam(sae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        batch = activations[torch.randint(len(activations), (1024,), generator=generator)]
        loss = (sae(batch) - batch).pow(2).sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            sae.set_decoder_norm_to_unit_norm()
    return sae.eval()


@pytest.fixture(scope="module")
def toy_batch():
    return ToyWorld(seed=1).sample(120)


# ------------------------------------------------------------------ streaming views


def test_streamed_top_images_equal_a_full_sort(clip, trained_sae, toy_batch):
    features = [3, 17, 40, 99]
    scores = feature_image_scores(clip, trained_sae, toy_batch.images, features=features, progress=False)
    uneven = [toy_batch.images[:7], toy_batch.images[7:50], toy_batch.images[50:51], toy_batch.images[51:]]
    views = feature_views(clip, trained_sae, iter(uneven), features=features, k=5, progress=False)
    for column, view in enumerate(views):
        expected = scores[:, column].sort(descending=True, stable=True)
        kept = expected.values[:5] > 0
        assert view.top_indices.tolist() == expected.indices[:5][kept].tolist()
        torch.testing.assert_close(view.top_scores, expected.values[:5][kept])
        assert torch.equal(view.top_images, toy_batch.images[view.top_indices])
    assert sum(len(view.top_indices) for view in views) > 10  # the features fire: the comparison is not vacuous


def test_heatmap_is_the_feature_activation_at_each_patch_token(clip, trained_sae, toy_batch):
    view = feature_views(clip, trained_sae, toy_batch.images, features=[17], k=3, batch_size=32, progress=False)[0]
    _, cache = run_with_cache_with_saes(clip, toy_batch.images[view.top_indices], saes=[trained_sae],
                                        use_error_term=True)
    acts = cache[f"{HOOK}.hook_sae_acts_post"][..., 17]  # [k, 65]
    torch.testing.assert_close(view.heatmaps, acts[:, 1:].reshape(-1, 8, 8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view.top_scores, acts.amax(1), atol=1e-5, rtol=1e-5)
    pixels = view.pixel_heatmaps()
    assert pixels.shape == (len(view.top_indices), 64, 64)
    # bilinear upsampling keeps each 8x8 patch's centre value between its neighbours' and the grid's range
    assert pixels.max() <= view.heatmaps.max() + 1e-6 and pixels.min() >= view.heatmaps.min() - 1e-6


def test_densities_and_histogram_count_every_nonzero_activation(clip, trained_sae, toy_batch):
    features = [3, 17, 40]
    view_list = feature_views(clip, trained_sae, toy_batch.images, features=features, batch_size=25, n_bins=10,
                              progress=False)
    with torch.no_grad():
        _, cache = clip.run_with_cache(toy_batch.images, names_filter=HOOK)
        acts = trained_sae.encode(cache[HOOK])[..., features]  # [n, 65, 3]
    for column, view in enumerate(view_list):
        values = acts[..., column]
        assert view.token_density == pytest.approx((values > 0).float().mean().item())
        assert view.image_density == pytest.approx((values > 0).any(1).float().mean().item())
        assert view.max_activation == pytest.approx(values.max().item(), rel=1e-5)
        positive = values[values > 0]
        assert int(view.histogram.sum()) == len(positive)
        edges = view.histogram_edges
        assert edges[0] == 0 and edges[-1] > positive.max()
        expected = torch.histogram(positive.double(), bins=edges).hist.long()
        assert torch.equal(view.histogram, expected)


def test_histograms_double_their_bins_exactly_when_values_outgrow_them():
    histograms = _Histograms(n_features=2, n_bins=4)
    batches = [torch.tensor([[0.5, 0.0], [1.0, 2.0]]), torch.tensor([[3.9, 0.0], [0.2, 9.0]]),
               torch.tensor([[20.0, 1.0], [0.0, 0.0]])]
    for batch in batches:
        histograms.add(batch)
    everything = torch.cat(batches)
    for feature in range(2):
        edges = histograms.edges(feature)
        positive = everything[:, feature][everything[:, feature] > 0].double()
        assert torch.equal(histograms.counts[feature], torch.histogram(positive, bins=edges).hist.long())
        assert edges[-1] > positive.max()
    # feature 0 started at width 1 / 3.5 (its first max over 3.5 bins) and doubled until 20 fitted
    assert histograms.width[0].item() == pytest.approx(2**5 / 3.5)


# ------------------------------------------------------------------ names


def _sae_writing(directions: torch.Tensor, hook: str, **fields) -> SAE:
    sae = SAE(SAEConfig(d_in=directions.shape[1], d_sae=directions.shape[0], hook_name=hook, **fields))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
    return sae.eval()


def test_a_feature_writing_a_texts_residual_direction_is_named_by_that_text(clip):
    texts = description_pool()[0]
    chosen = ["red object", "striped background", "three objects", "triangle on the left"]
    sae = _sae_writing(clip.tokens_to_residual_directions(chosen), "blocks.2.hook_resid_post")
    names = name_features(clip, sae, texts, n_texts=3)
    assert [name.texts[0] for name in names] == chosen
    assert all(name.scores[0] > 0.95 and (name.scores[:-1] >= name.scores[1:]).all() for name in names)


@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_z", "blocks.2.mlp.hook_post", "blocks.3.hook_mlp_out"])
def test_directions_through_w_o_and_w_out_are_named_exactly(clip, hook):
    """Decoder rows chosen so that their output direction is exactly a text embedding: cosine 1 with that text."""
    texts = ["red object", "blue object", "striped background", "circle"]
    embeddings = clip.encode_text(texts, normalize=True).detach()
    to_residual = {
        "blocks.1.attn.hook_z": clip.blocks[1].attn.W_O.detach().flatten(0, 1),
        "blocks.2.mlp.hook_post": clip.blocks[2].mlp.W_out.detach(),
        "blocks.3.hook_mlp_out": torch.eye(128),
    }[hook]
    readout = to_residual @ clip.W_U.detach()  # [d_in, 64]
    rows = embeddings[[2, 0]] @ torch.linalg.pinv(readout)  # striped, red
    fields = {"reshape_activations": "hook_z"} if hook.endswith("hook_z") else {}
    sae = _sae_writing(rows, hook, **fields)
    torch.testing.assert_close(torch.nn.functional.normalize(output_directions(clip, sae), dim=-1),
                               embeddings[[2, 0]], atol=1e-4, rtol=1e-4)
    names = name_features(clip, sae, texts, n_texts=2)
    assert [name.texts[0] for name in names] == ["striped background", "red object"]
    assert names[0].scores[0].item() == pytest.approx(1.0, abs=1e-4)


def test_a_classifier_names_features_by_its_classes_with_one_hot_vectors():
    model = HookedViT(tiny_config(n_registers=0, d_proj=None, n_classes=5)).init_weights(seed=0).eval()
    class_names = [f"class {i}" for i in range(5)]
    rows = torch.eye(5)[[3, 1]] @ torch.linalg.pinv(model.W_U.detach())  # raise exactly class 3, class 1
    sae = _sae_writing(rows, "blocks.2.hook_resid_post")
    names = name_features(model, sae, class_names, text_embeddings=torch.eye(5))
    assert [str(name) for name in names] == ["class 3", "class 1"]
    with pytest.raises(TypeError, match="no text tower.*text_embeddings.*torch.eye"):
        name_features(model, sae, class_names)


def test_hooks_without_a_direct_path_are_refused_with_the_supported_list(clip):
    sae = SAE(SAEConfig(d_in=128, d_sae=4, hook_name="blocks.1.attn.hook_q", reshape_activations="hook_z"))
    with pytest.raises(ValueError, match=r"not from 'blocks.1.attn.hook_q'.*blocks.\{l\}.hook_resid_post"):
        name_features(clip, sae, ["red object"])
    flat_z = SAE(SAEConfig(d_in=32, d_sae=4, hook_name="blocks.1.attn.hook_z"))
    with pytest.raises(ValueError, match="reshape_activations='hook_z'"):
        name_features(clip, flat_z, ["red object"])
    normalised = HookedViT(tiny_config(attn_norm=True, mlp_norm=True)).init_weights(seed=0)
    on_z = SAE(SAEConfig(d_in=32, d_sae=4, hook_name="blocks.1.attn.hook_z", reshape_activations="hook_z"))
    with pytest.raises(ValueError, match="normalises z \\(attn.ln_z\\) before W_O"):
        output_directions(normalised, on_z)
    on_post = SAE(SAEConfig(d_in=64, d_sae=4, hook_name="blocks.1.mlp.hook_post"))
    with pytest.raises(ValueError, match="mlp.ln_hidden"):
        output_directions(normalised, on_post)


# ------------------------------------------------------------------ scores against the truth


def test_auroc_on_hand_made_scores():
    labels = torch.tensor([False, False, True, True])
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels).item() == pytest.approx(0.75)
    assert auroc(torch.tensor([0.0, 0.0, 1.0, 2.0]), labels).item() == 1.0
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), labels).item() == 0.0
    assert auroc(torch.zeros(4), labels).item() == 0.5  # ties count one half
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 3), generator=generator).float()  # many ties
    labels = torch.rand(50, generator=generator) > 0.6
    positive, negative = scores[labels], scores[~labels]
    pairs = (positive[:, None] > negative[None]).float() + 0.5 * (positive[:, None] == negative[None]).float()
    torch.testing.assert_close(auroc(scores, labels), pairs.mean((0, 1)))
    with pytest.raises(ValueError, match="positives and negatives.*0 positive"):
        auroc(scores, torch.zeros(50, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"labels must be a \[n=50\] bool"):
        auroc(scores, labels.long())


def test_mentions_reads_whole_words_and_plurals():
    assert mentions("three red crosses", "cross") and mentions("red object", "red")
    assert not mentions("striped background", "red") and not mentions("object on the left", "one")


def test_score_sae_features_finds_the_best_feature_per_value_and_checks_its_name(clip, trained_sae, toy_batch):
    texts = description_pool()[0]
    card = score_sae_features(clip, trained_sae, toy_batch, texts=texts, progress=False)
    assert len(card.rows) == 23 and card.n_images == 120
    scores = feature_image_scores(clip, trained_sae, toy_batch.images, progress=False)
    red = next(row for row in card.rows if row.value == "red")
    areas = auroc(scores, toy_batch.factors["colour"] == FACTORS["colour"].index("red"))
    assert red.feature == int(areas.argmax()) and red.auroc == pytest.approx(areas.max().item())
    assert red.name == name_features(clip, trained_sae, texts, features=[red.feature], n_texts=1)[0].texts[0]
    assert red.name_mentions_value == mentions(red.name, "red")
    assert card.detected_share == sum(row.auroc >= 0.95 for row in card.rows) / 23
    # An untrained SAE (random directions) is the baseline the trained one must beat.
    untrained = SAE(SAEConfig(d_in=128, d_sae=128, architecture="topk", k=8, hook_name=HOOK)).init_weights(seed=0)
    baseline = score_sae_features(clip, untrained, toy_batch, texts=texts, progress=False)
    assert card.mean_auroc > baseline.mean_auroc + 0.03, (card.mean_auroc, baseline.mean_auroc)
    assert card.named_share > baseline.named_share, (card.named_share, baseline.named_share)
    assert "23 factor values, 120 images" in card.table()
    small_pool = score_sae_features(clip, trained_sae, toy_batch, texts=["red object", "blue object", "circle",
                                                                         "striped background"], progress=False)
    assert small_pool.named_by_chance == pytest.approx(4 * (1 / 4) / 23)  # four values, each in one text of four


# ------------------------------------------------------------------ dashboard


def test_the_dashboard_is_self_contained_and_names_each_feature(clip, trained_sae, toy_batch, tmp_path):
    texts = description_pool()[0]
    path = write_sae_dashboard(clip, trained_sae, toy_batch.images, n_features=3, k=4, texts=texts,
                               path=tmp_path / "dashboard.html", progress=False)
    page = path.read_text()
    assert not re.search(r"<script[^>]+src=[\"']?https?:", page)
    assert not re.search(r"<(link|img)[^>]+(href|src)=[\"']?https?:", page)
    assert page.count("<h2>feature ") == 3
    features = [int(f) for f in re.findall(r"<h2>feature (\d+): ", page)]
    for name in name_features(clip, trained_sae, texts, features=features, n_texts=1):
        assert f"<h2>feature {name.feature}: {html.escape(name.texts[0])}</h2>" in page
    embedded = re.findall(r'"source":"data:image(?:/|\\u002f)png;base64,', page)
    assert len(embedded) >= 3  # the top images are embedded, not linked


def test_dashboard_errors_name_the_problem(clip, trained_sae, toy_batch, tmp_path):
    batches = iter([toy_batch.images[:10]])
    with pytest.raises(ValueError, match="iterator can be read once: pass features"):
        write_sae_dashboard(clip, trained_sae, batches, path=tmp_path / "d.html", progress=False)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_sae_dashboard(clip, trained_sae, toy_batch.images, features=[1], path=tmp_path, progress=False)


def test_a_feature_that_never_fires_has_an_empty_view_and_a_section_that_says_so(clip, toy_batch, tmp_path):
    sae = SAE(SAEConfig(d_in=128, d_sae=2, hook_name=HOOK)).init_weights(seed=0)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([1e4, -1e4]))  # feature 0 fires on every token, feature 1 on none
    views = feature_views(clip, sae, toy_batch.images[:10], features=[0, 1], k=3, progress=False)
    assert (views[0].token_density, views[0].image_density, len(views[0].top_indices)) == (1.0, 1.0, 3)
    assert (views[1].token_density, int(views[1].histogram.sum()), len(views[1].top_indices)) == (0.0, 0, 0)
    page = write_sae_dashboard(clip, sae, toy_batch.images[:10], features=[1, 0], k=3, path=tmp_path / "d.html",
                               progress=False).read_text()
    assert page.count("No image scores above 0 for this feature.") == 1
    assert page.count("%{y} tokens") == 1  # a histogram (its hover text) for the feature that fires only
    assert page.count("(no text pool)") == 2  # no texts: the overview says so for each feature


# ------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors(clip, trained_sae, toy_batch):
    images = toy_batch.images[:4]
    with pytest.raises(ValueError, match="feature 128 is out of range: the SAE has d_sae=128"):
        feature_views(clip, trained_sae, images, features=[1, 128], progress=False)
    with pytest.raises(ValueError, match=r"names feature\(s\) \[2\] more than once"):
        feature_views(clip, trained_sae, images, features=[2, 2], progress=False)
    with pytest.raises(ValueError, match=r"images must be \[n, channels, height, width\], got shape \(3, 64, 64\)"):
        list(image_batches(images[0], 8))
    with pytest.raises(ValueError, match=r"batch 1 of images must be a \[batch, C, H, W\] tensor, got str"):
        list(image_batches([images, "cat.png"], 8))
    with pytest.raises(ValueError, match="image_score must be one of"):
        feature_image_scores(clip, trained_sae, images, image_score="top")
    patches = SAE(SAEConfig(d_in=128, d_sae=8, hook_name=HOOK, token_selection="patches")).init_weights(seed=0)
    with pytest.raises(ValueError, match="image_score='cls' needs the SAE to read the CLS token.*'patches'"):
        feature_image_scores(clip, patches, images, image_score="cls", progress=False)
    with pytest.raises(ValueError, match=r"text_embeddings must be \[n_texts=2, d_out=64\]"):
        name_features(clip, trained_sae, ["red object", "blue object"], text_embeddings=torch.zeros(2, 63))
    wrong_hook = SAE(SAEConfig(d_in=128, d_sae=8, hook_name="blocks.9.hook_resid_post"))
    with pytest.raises(ValueError, match="'blocks.9.hook_resid_post' is no hook point of vit_lens-toy-clip"):
        feature_views(clip, wrong_hook, images, features=[0], progress=False)


def test_cls_only_sae_has_no_heatmaps_but_ranks_images_by_cls(clip, trained_sae, toy_batch):
    cls_sae = SAE(SAEConfig(d_in=128, d_sae=128, architecture="topk", k=8, hook_name=HOOK, token_selection="cls"))
    cls_sae.load_state_dict(trained_sae.state_dict())
    view = feature_views(clip, cls_sae.eval(), toy_batch.images, features=[5], image_score="cls", progress=False)[0]
    assert view.heatmaps is None
    with pytest.raises(ValueError, match="no patch heatmaps"):
        view.pixel_heatmaps()
    with torch.no_grad():
        _, cache = clip.run_with_cache(toy_batch.images, names_filter=HOOK)
    on_cls = trained_sae.encode(cache[HOOK][:, 0])[:, 5]
    assert view.top_indices.tolist() == on_cls.sort(descending=True, stable=True).indices[: len(view.top_indices)].tolist()


# ------------------------------------------------------------------ the docs page


def test_the_docs_feature_and_scoring_examples_run(clip, trained_sae, tmp_path, monkeypatch):
    """docs/sae.md from "Read the features" on, with the SAE of the training section stood in for by this file's."""
    page = (Path(__file__).parents[1] / "docs" / "sae.md").read_text()
    section = page[page.index("\n## Read the features"):]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"clip": clip, "sae": trained_sae}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/sae.md feature block {index}", "exec"), namespace)
    views = namespace["views"]
    assert [view.feature for view in views] == namespace["busiest"] and len(views) == 3
    assert all(view.name.texts[0] in namespace["texts"] and view.heatmaps.shape[1:] == (8, 8) for view in views)
    assert (tmp_path / "sae_dashboard.html").read_text().count("<h2>feature ") == 6
    card = namespace["card"]
    assert len(card.rows) == 23 and card.named_share > card.named_by_chance


# ------------------------------------------------------------------ the command


def test_sae_train_and_dashboard_commands_on_a_tiny_run(tmp_path, capsys):
    folder = tmp_path / "sae"
    argv = ["sae", "train", "--hook", "blocks.2.hook_resid_post", "--architecture", "topk", "--k", "4", "--d-sae",
            "64", "--steps", "5", "--batch-tokens", "256", "--n-images", "16", "--out", str(folder), "--threads", "1"]
    assert main(argv) == 0
    sae = load_sae(folder)
    assert (sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == ("blocks.2.hook_resid_post", 128, 64, 4)
    assert "Saved in SAELens's format" in capsys.readouterr().out
    page = tmp_path / "dashboard.html"
    argv = ["sae", "dashboard", "--sae", str(folder), "--out", str(page), "--features", "1,5", "--n-images", "24",
            "--top-k", "3", "--threads", "1"]
    assert main(argv) == 0
    text = page.read_text()
    assert "<h2>feature 1: " in text and "<h2>feature 5: " in text


def test_sae_train_refuses_a_hook_point_the_toy_clip_lacks(tmp_path, capsys):
    argv = ["sae", "train", "--hook", "blocks.9.hook_resid_post", "--k", "4", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--hook blocks.9.hook_resid_post is no hook point of the toy CLIP" in err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def no_model_is_loaded(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    import vit_lens.toy

    monkeypatch.setattr(vit_lens.toy, "load_toy_clip", loaded)


@pytest.mark.parametrize(("argv", "message"), [
    (["sae", "train", "--architecture", "topk", "--out", "{tmp}/x"], "--architecture topk needs --k"),
    (["sae", "train", "--architecture", "standard", "--k", "3", "--out", "{tmp}/x"], "--k applies to"),
    (["sae", "train", "--k", "2.5", "--out", "{tmp}/x"], "--k 2.5: a topk SAE keeps a whole number"),
    (["sae", "train", "--model", "open_clip:ViT-B-32", "--k", "8", "--out", "{tmp}/x"], "runs on 'toy'"),
    (["sae", "train", "--k", "8", "--out", "{tmp}"], "exists (a folder); add --overwrite"),
    (["sae", "train", "--k", "8", "--out", "{tmp}/no/such/x"], "does not exist; create it first"),
    (["sae", "dashboard", "--sae", "{tmp}/missing"], "--sae {tmp}/missing: no such folder"),
    (["sae", "dashboard", "--sae", "{tmp}", "--features", "3,x"], "separated by commas"),
])
def test_sae_command_errors_come_before_the_model_is_loaded(tmp_path, capsys, no_model_is_loaded, argv, message):
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vit-lens {argv[0]} {argv[1]}: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err[0]


def test_the_command_knows_every_sae_architecture():
    from vit_lens.cli import _SAE_ARCHITECTURES, _SAE_TOKENS
    from vit_lens.sae.model import ARCHITECTURES, TOKEN_SELECTIONS

    assert _SAE_ARCHITECTURES == ARCHITECTURES and _SAE_TOKENS == TOKEN_SELECTIONS
