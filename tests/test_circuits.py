"""Circuits: the graph, the edge-patched forward, EAP / EAP-IG / exact edge patching, and path patching.

The identities checked: no edge patched is the clean run and every edge patched is the source run; EAP
equals exact edge patching on a model made affine in every receiver input; token-group scores sum to the
ungrouped score; one exact edge patch equals the same patch made by hand with the hook points; path
patching finds the planted classifier's two-hop position route through its later head, not directly.
"""

import pytest
import torch

import vit_lens
from conftest import FAMILIES, first_minus_second as _metric, seeded_images as _images, tiny_config
from vit_lens.circuits import (
    CircuitGraph,
    eap_ig,
    edge_attribution_patching,
    exact_edge_patching,
    node_attribution_patching,
    patch_paths,
    path_patching,
    random_edge_scores,
    region_groups,
)
from vit_lens.circuits.edges import run_patched, sender_outputs, source_outputs
from vit_lens.methods.scorecard import factor_readout, logit_difference, task_data, token_groups
from vit_lens.model.hooked_vit import HookedViT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> HookedViT:
    return HookedViT(tiny_config(n_registers=1)).init_weights(seed=3).eval()


def test_graph_sizes_match_the_eap_ig_count_for_a_vit_b():
    graph = CircuitGraph(n_layers=12, n_heads=12, n_ctx=197, group_names=("all",), group_masks=None)
    assert (graph.n_senders, graph.n_receivers, graph.n_edges) == (157, 445, 32_491)


def test_graph_names_round_trip_and_only_forward_edges_exist(model):
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    assert graph.group_names == ("CLS", "registers", "patches")
    assert graph.n_edges == 3 * graph.real.sum()
    for s, r, g in graph.edges()[::17]:
        assert graph.edge_index(graph.edge_name(s, r, g)) == (s, r, g)
    assert graph.edge_index("a0.h1->a2.h3<k>@patches") == (
        graph.head_sender(0, 1), graph.head_receiver(2, 3, "k"), 2)
    with pytest.raises(ValueError, match="does not come before"):
        graph.edge_index("a2.h0->a1.h0<v>@CLS")
    with pytest.raises(ValueError, match="names no token group"):
        graph.edge_index("input->m0")
    # a head reads every earlier layer; an MLP also its own layer's heads; the output everything
    assert graph.n_upstream(graph.head_receiver(1, 0, "q")) == 1 + (model.cfg.n_heads + 1)
    assert graph.n_upstream(graph.mlp_receiver(1)) == 1 + (model.cfg.n_heads + 1) + model.cfg.n_heads
    assert graph.n_upstream(graph.output_receiver) == graph.n_senders


def test_token_groups_must_partition_the_tokens(model):
    n_ctx = model.cfg.n_ctx
    first = torch.arange(n_ctx) < 3
    with pytest.raises(ValueError, match="exactly one group"):
        CircuitGraph.from_model(model, token_groups={"a": first, "b": torch.arange(n_ctx) < 5})
    graph = CircuitGraph.from_model(model, token_groups=["object", "rest"])
    with pytest.raises(ValueError, match="differ per image"):
        graph.token_group_masks(None, 2, n_ctx)
    regions = region_groups(model, (2, 2))
    assert list(regions)[0] == "prefix" and len(regions) == 1 + 4
    assert sum(mask.long() for mask in regions.values()).eq(1).all()


@pytest.mark.parametrize("family", ["clip_like", "vit_like", "deit_distilled_like", "avg_pool_fc_norm"])
def test_no_edge_patched_is_the_clean_run_and_every_edge_the_corrupted_run(family):
    model = HookedViT(tiny_config(**FAMILIES[family])).init_weights(seed=1).eval()
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(3, 1), _images(3, 2)
    source = source_outputs(model, graph, clean, corrupted)
    groups = graph.token_group_masks(None, 3, model.cfg.n_ctx)
    outputs = {}

    def keep(output: torch.Tensor) -> torch.Tensor:
        outputs[len(outputs)] = output
        return output.sum()

    everything = graph.real[..., None].float()
    run_patched(model, graph, clean, source, torch.stack([torch.zeros(graph.shape), everything]), groups, keep)
    with torch.no_grad():
        assert torch.allclose(outputs[0], model(clean), atol=1e-5)
        assert torch.allclose(outputs[1], model(corrupted), atol=1e-4)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in  # flags restored


def test_one_exact_edge_patch_equals_the_same_patch_made_by_hand(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(4, 5), _images(4, 6)
    scores = exact_edge_patching(model, graph, clean, corrupted, _metric,
                                 edges=[(graph.head_sender(0, 2), graph.head_receiver(1, 3, "v"), 0)])
    # by hand: head 1.3's value input gets head 0.2's corrupted output instead of its clean one
    _, corrupted_cache = model.run_with_cache(corrupted, names_filter="blocks.0.attn.hook_result")
    _, clean_cache = model.run_with_cache(clean, names_filter="blocks.0.attn.hook_result")
    delta = corrupted_cache["blocks.0.attn.hook_result"][:, :, 2] - clean_cache["blocks.0.attn.hook_result"][:, :, 2]

    def patch(v_input, hook):
        v_input = v_input.clone()
        v_input[:, :, 3] += delta
        return v_input

    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            patched = _metric(model.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_v_input", patch)])).mean()
            clean_value = _metric(model(clean)).mean()
    finally:
        model.set_use_split_qkv_input(False)
    assert scores.score("a0.h2->a1.h3<v>") == pytest.approx(float(clean_value - patched), rel=1e-4, abs=1e-6)
    assert scores.baseline_clean == pytest.approx(float(clean_value), rel=1e-5)


def _affine_hooks(model: HookedViT) -> list:
    """Freeze every nonlinearity: LayerNorm scales to 1, attention patterns uniform, MLPs off. The output is
    then affine in every receiver input, so first-order attribution is exact."""
    hooks = [(name, lambda x, hook: torch.ones_like(x)) for name in model.hook_dict if name.endswith("hook_scale")]
    hooks += [(name, lambda p, hook: torch.full_like(p, 1.0 / p.shape[-1])) for name in model.hook_dict
              if name.endswith("attn.hook_pattern")]
    hooks += [(name, lambda x, hook: torch.zeros_like(x)) for name in model.hook_dict if name.endswith("mlp.hook_post")]
    return hooks


def test_eap_equals_exact_edge_patching_on_a_model_affine_in_the_patched_activations():
    model = HookedViT(tiny_config(n_layers=2, n_registers=0, d_proj=None, n_classes=4)).init_weights(seed=2).eval()
    graph = CircuitGraph.from_model(model, token_groups="tokens")
    clean, corrupted = _images(3, 7), _images(3, 8)
    with model.hooks(fwd_hooks=_affine_hooks(model)):
        eap = edge_attribution_patching(model, graph, clean, corrupted, _metric)
        exact = exact_edge_patching(model, graph, clean, corrupted, _metric)
        ig = eap_ig(model, graph, clean, corrupted, _metric, steps=3)
    assert exact.flat().abs().max() > 1e-2  # the edges do something
    assert torch.allclose(eap.scores, exact.scores, atol=2e-5, rtol=1e-4)
    assert torch.allclose(ig.scores, exact.scores, atol=2e-5, rtol=1e-4)
    # sum over all edges into the output = the whole effect of patching everything
    total = exact.baseline_clean - exact.baseline_corrupted
    assert float(exact.scores[:, graph.output_receiver].sum()) == pytest.approx(total, rel=1e-4)


def test_eap_is_not_exact_on_the_real_model_but_its_token_groups_add_up(model):
    clean, corrupted = _images(3, 9), _images(3, 10)
    single = CircuitGraph.from_model(model)
    split = CircuitGraph.from_model(model, token_groups="tokens")
    whole = edge_attribution_patching(model, single, clean, corrupted, _metric)
    parts = edge_attribution_patching(model, split, clean, corrupted, _metric)
    assert torch.allclose(parts.scores.sum(-1), whole.scores[..., 0], atol=1e-5, rtol=1e-4)
    exact = exact_edge_patching(model, single, clean, corrupted, _metric)
    assert not torch.allclose(whole.scores, exact.scores, atol=1e-3)  # the model is not linear
    assert torch.corrcoef(torch.stack([whole.flat(), exact.flat()]))[0, 1] > 0.5


def test_mean_and_zero_ablation_sources(model):
    graph = CircuitGraph.from_model(model)
    clean = _images(4, 11)
    mean = source_outputs(model, graph, clean, None, "mean")
    assert mean.shape == (graph.n_senders, 1, model.cfg.n_ctx, model.cfg.d_model)
    assert torch.allclose(mean[:, 0], sender_outputs(model, graph, clean).mean(1), atol=1e-6)
    zero = edge_attribution_patching(model, graph, clean, None, _metric, ablation="zero")
    assert zero.flat().abs().sum() > 0
    with pytest.raises(ValueError, match="takes no corrupted_images"):
        source_outputs(model, graph, clean, clean, "mean")
    with pytest.raises(ValueError, match="needs corrupted_images"):
        edge_attribution_patching(model, graph, clean, None, _metric)


def test_pairs_of_different_sizes_and_bad_inputs_raise(model):
    graph = CircuitGraph.from_model(model)
    with pytest.raises(ValueError, match="differ in shape"):
        edge_attribution_patching(model, graph, _images(3, 1), _images(2, 2), _metric)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        eap_ig(model, graph, _images(2, 1), _images(2, 2), _metric, steps=0)
    with pytest.raises(ValueError, match="interpolate must be one of"):
        eap_ig(model, graph, _images(2, 1), _images(2, 2), _metric, interpolate="pixels")
    other = HookedViT(tiny_config(n_layers=2)).init_weights(seed=0)
    with pytest.raises(ValueError, match="build it with CircuitGraph.from_model"):
        edge_attribution_patching(other, graph, _images(2, 1), _images(2, 2), _metric)
    with pytest.raises(ValueError, match="return a scalar or one value per image"):
        edge_attribution_patching(model, graph, _images(2, 1), _images(2, 2), lambda out: out)


def test_baselines_and_rankings(model):
    graph = CircuitGraph.from_model(model)
    clean, corrupted = _images(3, 12), _images(3, 13)
    nodes = node_attribution_patching(model, graph, clean, corrupted, _metric)
    eap = edge_attribution_patching(model, graph, clean, corrupted, _metric)
    assert torch.allclose(nodes.node_scores, eap.scores.sum(1), atol=1e-6)
    random = random_edge_scores(graph, seed=1)
    assert torch.equal(random.scores, random_edge_scores(graph, seed=1).scores)
    circuit = eap.top(10)
    assert int(circuit.sum()) == 10 and bool((circuit <= graph.real[..., None]).all())
    best_name, best_score = eap.ranking(k=1)[0]
    assert best_score == pytest.approx(float(eap.flat().max())) and eap.score(best_name) == best_score


@pytest.fixture(scope="module")
def position_pairs():
    planted = vit_lens.load_planted("classifier")
    data = task_data(n_images=4, n_pairs=48, factors=["position"])
    pairs = data.pairs["position"]
    readout = factor_readout(planted.model)

    def metric(output):
        return logit_difference(readout.logits(output, "position"), pairs.clean_values, pairs.corrupted_values)

    return planted.model, pairs, metric


def test_path_patching_finds_the_two_hop_position_route_through_the_later_head(position_pairs):
    model, pairs, metric = position_pairs
    direct = path_patching(model, pairs.clean, pairs.corrupted, metric, "logits").normalized().values
    # hop 2 (head 2.1) restores most of the position logit difference along its direct path to the output;
    # hop 1 (head 0.1) restores almost nothing along its own
    assert direct[2, 1] > 0.6 and abs(direct[0, 1]) < 0.1
    through_hop_2 = path_patching(model, pairs.clean, pairs.corrupted, metric, "a2.h1", through="all")
    values = through_hop_2.normalized().values
    # every path from hop 1 into hop 2's inputs carries most of it: the early head is found through the later
    assert values[0, 1] > 0.6 and values[0, 1] == values[:2].nan_to_num(-1).max()
    # ... though not along the direct edge: the measured route runs through layer 1's heads (see the model card)
    direct_edge = path_patching(model, pairs.clean, pairs.corrupted, metric, "a2.h1", through="none")
    assert abs(direct_edge.normalized().values[0, 1]) < 0.1
    assert through_hop_2.method == "path" and through_hop_2.figure() is not None


def test_patch_paths_with_every_edge_of_the_two_hops(position_pairs):
    model, pairs, metric = position_pairs
    corrupted = patch_paths(model, pairs.corrupted, pairs.clean, metric, [])
    hop_2 = patch_paths(model, pairs.corrupted, pairs.clean, metric, ["a2.h1->logits"])
    hop_1_direct = patch_paths(model, pairs.corrupted, pairs.clean, metric, ["a0.h1->logits"])
    assert hop_2 - corrupted > 5 * abs(hop_1_direct - corrupted)


def test_per_image_token_groups_on_the_planted_model(position_pairs):
    model, pairs, metric = position_pairs
    graph = CircuitGraph.from_model(model, token_groups=["object patches", "background patches", "CLS"])
    groups = token_groups(model, pairs.foreground)
    scores = edge_attribution_patching(model, graph, pairs.clean, pairs.corrupted, metric, token_groups=groups)
    # hop 2 writes into CLS: its edge to the output matters there and nowhere else
    cls = scores.score("a2.h1->logits@CLS")
    assert cls > 1.0 and abs(scores.score("a2.h1->logits@object patches")) < 0.05 * cls


def test_the_output_node_can_be_a_clip_zero_shot_difference_between_two_prompts():
    clip = vit_lens.load_toy_clip()
    from vit_lens.toy import ToyWorld

    images = ToyWorld(seed=5).sample(6, seed=5).images
    recoloured = images.flip(1)  # colour channels reversed: other colours, the same layout
    texts = clip.encode_text(["a photo of a red object", "a photo of a blue object"], normalize=True).detach()

    def zero_shot_difference(embed):  # the image tower's output is the image embedding
        return torch.nn.functional.normalize(embed, dim=-1) @ (texts[0] - texts[1])

    graph = CircuitGraph.from_model(clip)
    eap = edge_attribution_patching(clip, graph, images, recoloured, zero_shot_difference)
    exact = exact_edge_patching(clip, graph, images, recoloured, zero_shot_difference,
                                edges=[tuple(e) for e in eap.top(5, absolute=True).nonzero().tolist()])
    assert eap.baseline_clean == pytest.approx(exact.baseline_clean, rel=1e-5)
    chosen = eap.top(5, absolute=True)
    # on a CLIP's image tower too, EAP's five strongest edges move the zero-shot score when patched, by about
    # what EAP estimates (measured: within 30% each, all of one sign)
    assert torch.allclose(eap.scores[chosen], exact.scores[chosen], rtol=0.35, atol=2e-3)
    assert float(exact.scores[chosen].abs().min()) > 5e-3
