"""TransformerLens's edge hook points: hook_q/k/v_input, hook_attn_in, hook_mlp_in, and their setters.

Off by default and absent from ``hook_dict``; when on, the output is unchanged on every family
(float32, 1e-5 of the output's scale), and an edit reaches one reader only: head ``h``'s row of
``hook_k_input`` changes head ``h``'s keys and nothing else, ``hook_mlp_in`` the MLP's input and
not the residual stream.
"""

import copy
import pickle

import pytest
import torch
import torch._dynamo

from tests.conftest import tiny_config
from vit_lens import HookedCLIP, HookedViT, ViTConfig
from vit_lens.intervene.decompose import direct_contributions
from vit_lens.model import components
from vit_lens.model._transformer_lens import get_act_name
from vit_lens.model.hook_layout import HookAxes, hook_axes

SETTERS = {
    "use_split_qkv_input": ("set_use_split_qkv_input", ("hook_q_input", "hook_k_input", "hook_v_input")),
    "use_attn_in": ("set_use_attn_in", ("hook_attn_in",)),
    "use_hook_mlp_in": ("set_use_hook_mlp_in", ("hook_mlp_in",)),
}
# The flag settings each family is run with; split and attn_in exclude each other.
FLAG_SETTINGS = [
    dict(use_split_qkv_input=True),
    dict(use_attn_in=True),
    dict(use_hook_mlp_in=True),
    dict(use_split_qkv_input=True, use_hook_mlp_in=True, use_attn_result=True),
]
HEAD = 2


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def model() -> HookedViT:
    return HookedViT(tiny_config()).init_weights(seed=0).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def set_flags(model, **flags) -> None:
    for flag, on in flags.items():
        getattr(model, "set_use_attn_result" if flag == "use_attn_result" else SETTERS[flag][0])(on)


def edge_hook_names(model) -> list[str]:
    leaves = {leaf for _, names in SETTERS.values() for leaf in names}
    return [name for name in model.hook_dict if name.rpartition(".")[2] in leaves]


# ------------------------------------------------------------------ every family: output unchanged


def _open_clip_native():
    import open_clip

    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
    source = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=16,
                                                          image_size=64), text_cfg=text)
    return HookedViT.from_open_clip(source), 64


def _timm(name, size, **kwargs):
    import timm

    return HookedViT.from_timm(timm.create_model(name, pretrained=False, depth=2, img_size=size, **kwargs)), size


def _eva02():
    from tests.reference.test_eva_equivalence import small_open_clip

    return HookedViT.from_open_clip(small_open_clip("EVA02-B-16", 64)), 64


def _siglip():
    from tests.reference.test_siglip_equivalence import small_open_clip

    return HookedViT.from_open_clip(small_open_clip("ViT-B-16-SigLIP", 64)), 64


def _hf(key):
    from tests.reference.test_hf_equivalence import MODELS

    return HookedViT.from_hf(MODELS[key][2]()), 32


FAMILIES = {
    "open_clip": _open_clip_native,
    "timm_vit": lambda: _timm("vit_tiny_patch16_224", 64),
    "timm_deit_distilled": lambda: _timm("deit_tiny_distilled_patch16_224", 64),
    "timm_dinov2_registers": lambda: _timm("vit_small_patch14_reg4_dinov2", 56, embed_dim=64, num_heads=4),
    "eva02_rotary_ln_z_swiglu_mlp_norm": _eva02,
    "siglip_map_pool": _siglip,
    "hf_clip": lambda: _hf("CLIPVisionModel"),
    "hf_dinov2_swiglu": lambda: _hf("Dinov2Model-swiglu"),
}


@torch.no_grad()
def _perturbed(model: HookedViT) -> HookedViT:
    """Every parameter nudged, so that LayerNorm weights, biases and tokens all matter."""
    generator = torch.Generator().manual_seed(3)
    for param in model.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flags_on_leave_the_output_unchanged_on_every_family(family):
    model, size = FAMILIES[family]()
    model = _perturbed(model)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images)
        scale = reference.abs().max().item()
        for flags in FLAG_SETTINGS:
            set_flags(model, **flags)
            assert edge_hook_names(model), flags
            output = model(images)
            error = (output - reference).abs().max().item() / scale
            assert error < 1e-5, f"{family} {flags}: max abs diff / max abs output = {error:.2e}"
            # A full cache runs the explicit attention and LayerNorm paths and every edge hook.
            cached, cache = model.run_with_cache(images)
            assert (cached - reference).abs().max().item() / scale < 1e-5, (family, flags)
            last = f"blocks.{model.cfg.n_layers - 1}"
            if flags.get("use_split_qkv_input"):
                assert tuple(cache[f"{last}.hook_k_input"].shape) == (2, model.cfg.n_ctx, model.cfg.n_heads,
                                                                      model.cfg.d_model)
            set_flags(model, **{flag: False for flag in flags})
        assert edge_hook_names(model) == []
        assert torch.equal(model(images), reference)


# ------------------------------------------------------------------ one reader per edit


def _add_to_head(size: float):
    """An in-place edit of head HEAD's row (a constant would vanish in ln1's centring: a random direction)."""

    def edit(activation, hook):
        direction = torch.randn(activation.shape[-1], generator=torch.Generator().manual_seed(5))
        activation[:, :, HEAD] += size * direction  # in place: the copy must keep it from the residual stream

    return edit


@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_editing_one_heads_split_input_changes_only_that_heads_part(model, images, part):
    model.set_use_split_qkv_input(True)
    attn = "blocks.1.attn."
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", f"{attn}hook_q", f"{attn}hook_k", f"{attn}hook_v"]
    _, clean = model.run_with_cache(images, names_filter=names)
    _, edited = model.run_with_cache(images, names_filter=names,
                                     fwd_hooks=[(f"blocks.1.hook_{part}_input", _add_to_head(0.5))])
    # The residual stream entering the block is untouched by the in-place edit of its copy.
    assert torch.equal(edited["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"])
    for other in "qkv":
        before, after = clean[f"{attn}hook_{other}"], edited[f"{attn}hook_{other}"]
        heads_changed = [h for h in range(model.cfg.n_heads) if not torch.allclose(after[:, :, h], before[:, :, h],
                                                                                   rtol=0, atol=1e-6)]
        assert heads_changed == ([HEAD] if other == part else []), (part, other)
    assert (edited[f"{attn}hook_{part}"][:, :, HEAD] - clean[f"{attn}hook_{part}"][:, :, HEAD]).abs().max() > 1e-2
    # ... and the edit does reach the rest of the block.
    assert not torch.allclose(edited["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"], atol=1e-4)


def test_a_split_input_replaced_by_another_residual_gives_that_heads_part_from_it(model, images):
    """Patching head h's key input with another image's residual gives exactly the keys head h computes there."""
    model.set_use_split_qkv_input(True)
    other = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    _, donor = model.run_with_cache(other, names_filter=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_k"])

    def patch(activation, hook):
        activation[:, :, HEAD] = donor["blocks.1.hook_resid_pre"]

    _, patched = model.run_with_cache(images, names_filter=["blocks.1.attn.hook_k"],
                                      fwd_hooks=[("blocks.1.hook_k_input", patch)])
    torch.testing.assert_close(patched["blocks.1.attn.hook_k"][:, :, HEAD], donor["blocks.1.attn.hook_k"][:, :, HEAD],
                               rtol=0, atol=1e-6)


def test_editing_one_heads_attn_in_changes_that_heads_q_k_v_only(model, images):
    model.set_use_attn_in(True)
    names = [f"blocks.0.attn.hook_{part}" for part in "qkv"] + ["blocks.0.hook_resid_pre"]
    _, clean = model.run_with_cache(images, names_filter=names)
    _, edited = model.run_with_cache(images, names_filter=names, fwd_hooks=[("blocks.0.hook_attn_in",
                                                                             _add_to_head(0.5))])
    assert torch.equal(edited["blocks.0.hook_resid_pre"], clean["blocks.0.hook_resid_pre"])
    for part in "qkv":
        delta = (edited[f"blocks.0.attn.hook_{part}"] - clean[f"blocks.0.attn.hook_{part}"]).abs().amax(dim=(0, 1, 3))
        assert delta[HEAD] > 1e-2 and delta[torch.arange(model.cfg.n_heads) != HEAD].max() <= 1e-6, (part, delta)


def test_editing_mlp_in_changes_the_mlp_input_and_not_the_residual_stream(model, images):
    model.set_use_hook_mlp_in(True)
    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_pre"]
    _, clean = model.run_with_cache(images, names_filter=names)
    shift = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))

    def edit(activation, hook):
        activation += shift  # in place

    _, edited = model.run_with_cache(images, names_filter=names, fwd_hooks=[("blocks.1.hook_mlp_in", edit)])
    assert torch.equal(edited["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"])
    # resid_post = resid_mid + mlp_out: only the MLP's term moved.
    torch.testing.assert_close(edited["blocks.1.hook_resid_post"] - edited["blocks.1.hook_mlp_out"],
                               clean["blocks.1.hook_resid_mid"], rtol=0, atol=1e-5)
    assert (edited["blocks.1.hook_mlp_out"] - clean["blocks.1.hook_mlp_out"]).abs().max() > 1e-2
    block = model.blocks[1]
    with torch.no_grad():
        expected = block.mlp(block.ln2(clean["blocks.1.hook_resid_mid"] + shift))
    torch.testing.assert_close(edited["blocks.1.hook_mlp_out"], expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ hook_dict, names, errors


def test_edge_hook_points_exist_only_while_their_flag_is_on(model, images):
    n = model.cfg.n_layers
    assert edge_hook_names(model) == []
    _, cache = model.run_with_cache(images)
    assert not [name for name in cache.keys() if name.endswith(("_input", "attn_in", "mlp_in"))]
    for flag, (setter, leaves) in SETTERS.items():
        getattr(model, setter)(True)
        assert getattr(model.cfg, flag) is True
        assert sorted(edge_hook_names(model)) == sorted(f"blocks.{l}.{leaf}" for l in range(n) for leaf in leaves)
        assert all(model.hook_dict[name].name == name for name in edge_hook_names(model))
        assert set(model.hook_dict) == {name for name, module in model.named_modules()
                                        if type(module).__name__ == "HookPoint"}
        getattr(model, setter)(False)
        assert getattr(model.cfg, flag) is False and edge_hook_names(model) == []


def test_a_config_with_a_flag_on_builds_the_hook_points_and_old_configs_still_load(images):
    model = HookedViT(tiny_config(use_split_qkv_input=True, use_hook_mlp_in=True))
    assert "blocks.2.hook_v_input" in model.hook_dict and "blocks.0.hook_mlp_in" in model.hook_dict
    saved = tiny_config().to_dict()
    assert saved["use_split_qkv_input"] is False and saved["use_attn_in"] is False and saved["use_hook_mlp_in"] is False
    for field in ("use_split_qkv_input", "use_attn_in", "use_hook_mlp_in"):
        del saved[field]  # a config saved before the flags existed
    assert ViTConfig(**saved) == tiny_config()


@pytest.mark.parametrize("name", ["q_input", "k_input", "v_input", "attn_in", "mlp_in"])
def test_transformer_lens_names_resolve_when_the_flag_is_on(model, images, name):
    hook_name = get_act_name(name, 1)
    assert hook_name == f"blocks.1.hook_{name}"
    model.set_use_split_qkv_input(name.endswith("_input"))
    model.set_use_attn_in(name == "attn_in")
    model.set_use_hook_mlp_in(name == "mlp_in")
    _, cache = model.run_with_cache(images, names_filter=hook_name)
    assert torch.equal(cache[name, 1], cache[hook_name])
    expected = (2, model.cfg.n_ctx, model.cfg.d_model) if name == "mlp_in" else (
        2, model.cfg.n_ctx, model.cfg.n_heads, model.cfg.d_model)
    assert tuple(cache[hook_name].shape) == expected


@pytest.mark.parametrize(
    ("name", "setter"),
    [("blocks.0.hook_q_input", "set_use_split_qkv_input"), ("blocks.1.hook_k_input", "set_use_split_qkv_input"),
     ("blocks.2.hook_v_input", "set_use_split_qkv_input"), ("blocks.0.hook_attn_in", "set_use_attn_in"),
     ("blocks.1.hook_mlp_in", "set_use_hook_mlp_in")],
)
def test_an_inactive_edge_hook_is_refused_naming_its_setter(model, images, name, setter):
    with pytest.raises(ValueError, match=rf"no hook point named '{name}'.*model\.{setter}\(True\)"):
        model.add_hook(name, lambda activation, hook: None)
    with pytest.raises(ValueError, match=rf"model\.{setter}\(True\)"):
        model.run_with_hooks(images, fwd_hooks=[(name, lambda activation, hook: None)])
    with pytest.raises(ValueError, match=rf"model\.{setter}\(True\)"):
        model.run_with_cache(images, names_filter=[name])
    _, cache = model.run_with_cache(images, names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(KeyError, match=rf"model\.{setter}\(True\)"):
        cache[name]
    assert all(not point.fwd_hooks for point in model.hook_dict.values())


@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True)])
@pytest.mark.parametrize("setter", ["set_use_attn_result", "set_use_split_qkv_input", "set_use_attn_in",
                                    "set_use_hook_mlp_in"])
def test_setters_take_only_bools(model, setter, value):
    with pytest.raises(TypeError, match=rf"model\.{setter} takes True or False, got"):
        getattr(model, setter)(value)
    assert edge_hook_names(model) == [] and model.cfg.use_attn_result is False


def test_split_inputs_and_attn_in_exclude_each_other(model):
    model.set_use_split_qkv_input(True)
    with pytest.raises(ValueError, match=r"Call model\.set_use_split_qkv_input\(False\) before model\.set_use_attn_in"):
        model.set_use_attn_in(True)
    model.set_use_split_qkv_input(False)
    model.set_use_attn_in(True)
    with pytest.raises(ValueError, match=r"Call model\.set_use_attn_in\(False\) before"):
        model.set_use_split_qkv_input(True)
    assert model.cfg.use_attn_in and not model.cfg.use_split_qkv_input
    with pytest.raises(ValueError, match="cannot both be True"):
        tiny_config(use_split_qkv_input=True, use_attn_in=True)


def test_turning_a_flag_off_under_attached_hooks_is_refused(model, images):
    model.set_use_split_qkv_input(True)
    model.add_hook("blocks.1.hook_q_input", _add_to_head(1.0), is_permanent=True)
    with pytest.raises(RuntimeError, match=r"hooks are attached to \['blocks\.1\.hook_q_input'\]"):
        model.set_use_split_qkv_input(False)
    assert "blocks.1.hook_q_input" in model.hook_dict and model.cfg.use_split_qkv_input
    model.reset_hooks(including_permanent=True)
    with model.hooks(fwd_hooks=[("blocks.0.hook_v_input", _add_to_head(1.0))]):
        with pytest.raises(RuntimeError, match="blocks.0.hook_v_input"):
            model.set_use_split_qkv_input(False)
    model.set_use_split_qkv_input(False)
    assert edge_hook_names(model) == []


def test_hooks_attached_before_a_toggle_keep_working(model, images):
    zero = [("blocks.0.hook_resid_post", lambda activation, hook: torch.zeros_like(activation))]
    with model.hooks(fwd_hooks=zero):
        expected = model(images)
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-5)
    assert all(not point.fwd_hooks for point in model.hook_dict.values())


def test_set_use_attn_result_sets_what_a_default_cache_holds(model, images):
    _, cache = model.run_with_cache(images)
    assert "blocks.0.attn.hook_result" not in cache.keys()
    model.set_use_attn_result(True)
    assert model.cfg.use_attn_result is True
    _, cache = model.run_with_cache(images)
    assert tuple(cache["blocks.0.attn.hook_result"].shape) == (2, model.cfg.n_ctx, model.cfg.n_heads, model.cfg.d_model)
    model.set_use_attn_result(False)
    assert "blocks.0.attn.hook_result" not in model.run_with_cache(images)[1].keys()


def test_hooked_clip_forwards_the_setters_to_its_image_tower():
    import open_clip

    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
    source = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=16,
                                                          image_size=64), text_cfg=text).eval()
    clip = HookedCLIP.from_open_clip(source)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = clip.encode_image(images)
        clip.set_use_split_qkv_input(True)
        clip.set_use_hook_mlp_in(True)
        clip.set_use_attn_result(True)
        assert clip.vision.cfg.use_split_qkv_input and clip.vision.cfg.use_hook_mlp_in and clip.vision.cfg.use_attn_result
        assert "blocks.1.hook_k_input" in clip.hook_dict and "blocks.1.hook_mlp_in" in clip.vision.hook_dict
        torch.testing.assert_close(clip.encode_image(images), reference, rtol=0, atol=1e-5 * reference.abs().max())
    with pytest.raises(TypeError, match="set_use_attn_in takes True or False"):
        clip.set_use_attn_in("on")


# ------------------------------------------------------------------ layouts, cache helpers, cost when off


def test_hook_axes_describe_the_per_head_inputs():
    for name in ("blocks.0.hook_q_input", "blocks.3.hook_k_input", "blocks.1.hook_v_input", "blocks.0.hook_attn_in"):
        assert hook_axes(name, 4) == HookAxes(position=1, head=2)
    assert hook_axes("blocks.0.ln1.hook_scale", 4) == HookAxes(position=1, head=2)
    assert hook_axes("blocks.0.ln1.hook_normalized", 4) == HookAxes(position=1, head=2)
    assert hook_axes("blocks.0.ln1.hook_scale", 3) == HookAxes(position=1)
    assert hook_axes("blocks.0.hook_mlp_in", 3) == HookAxes(position=1)


def test_pos_slice_cuts_the_per_head_inputs_on_their_token_axis(model, images):
    model.set_use_split_qkv_input(True)
    _, full = model.run_with_cache(images)
    _, cls = model.run_with_cache(images, pos_slice=0)
    heads, d = model.cfg.n_heads, model.cfg.d_model
    for name, shape in [("blocks.1.hook_q_input", (2, 1, heads, d)), ("blocks.1.ln1.hook_scale", (2, 1, heads, 1)),
                        ("blocks.1.ln1.hook_normalized", (2, 1, heads, d))]:
        assert tuple(cls[name].shape) == shape, name
        assert torch.equal(cls[name], full[name][:, :1]), name


def test_cache_helpers_work_or_refuse_with_per_head_inputs(model, images):
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    output, cache = model.run_with_cache(images)
    for level in ("layer", "head", "neuron"):
        torch.testing.assert_close(direct_contributions(model, cache, level=level).sum(), output, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.decompose_resid(layer=2, mlp_input=True).sum(0), cache["blocks.2.hook_resid_mid"],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.accumulated_resid(layer=2, apply_ln=True, mlp_input=True)[-1],
                               (cache["blocks.2.hook_resid_mid"] - cache["blocks.2.hook_resid_mid"].mean(-1, keepdim=True))
                               / cache["blocks.2.ln2.hook_scale"], rtol=0, atol=1e-5)
    assert cache.stack_head_results(layer=2).shape[0] == 2 * model.cfg.n_heads
    for call in (lambda: cache.accumulated_resid(layer=2, apply_ln=True),
                 lambda: cache.decompose_resid(layer=1, apply_ln=True),
                 lambda: cache.stack_head_results(layer=2, apply_ln=True)):
        with pytest.raises(ValueError, match=r"'blocks\.\d\.ln1\.hook_scale' in this cache is per head"):
            call()


def test_flags_off_keep_the_fused_qkv_product(model, images, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("per-head projection ran with the flags off")

    monkeypatch.setattr(components.attention, "_per_head_projection", refuse)
    _, cache = model.run_with_cache(images)  # every hook observed: the explicit paths, still the fused product
    assert "blocks.0.attn.hook_q" in cache.keys()
    model.set_use_attn_in(True)
    with pytest.raises(AssertionError, match="per-head projection ran"):
        model(images)


def test_copies_keep_their_edge_hook_points(model, images):
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    expected = model(images)
    state = model.state_dict()
    assert state.keys() == HookedViT(tiny_config()).state_dict().keys()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert sorted(edge_hook_names(copied)) == sorted(edge_hook_names(model))
        assert copied.hook_dict["blocks.2.hook_q_input"] is copied.blocks[2].hook_q_input
        torch.testing.assert_close(copied(images), expected, rtol=0, atol=0)
        copied.set_use_split_qkv_input(False)
        assert "blocks.0.hook_q_input" in model.hook_dict  # the original keeps its own
    fresh = HookedViT(tiny_config())
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(images), expected, rtol=0, atol=1e-5)


def test_compiled_model_honours_a_toggle_and_an_edge_hook_added_after_compilation(model, images):
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True), torch.no_grad():
            compiled = torch.compile(model, backend="eager")
            before = compiled(images)
            compiled.set_use_split_qkv_input(True)
            torch.testing.assert_close(compiled(images), before, rtol=0, atol=1e-5)
            compiled.add_hook("blocks.1.hook_q_input", _add_to_head(1.0))
            edited = compiled(images)
            compiled.reset_hooks()
            assert (edited - before).abs().max() > 1e-3
            torch.testing.assert_close(edited, model.run_with_hooks(
                images, fwd_hooks=[("blocks.1.hook_q_input", _add_to_head(1.0))]), rtol=0, atol=1e-6)
            compiled.set_use_split_qkv_input(False)
            assert "blocks.1.hook_q_input" not in compiled.hook_dict
            torch.testing.assert_close(compiled(images), before, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
