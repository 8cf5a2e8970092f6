"""What every converter needs: parameters handed out once each, activations and norms identified."""

import torch
from torch import Tensor, nn


class SourceParams:
    """A source module's parameters, handed out by name; any left untaken at the end is an error.

    This is the guard against converters that silently drop a weight the source model uses
    (the ``strict=False`` failure mode): a parameter vit_lens has no place for means an
    architecture feature it does not implement.
    """

    def __init__(self, module: nn.Module, model_name: str):
        self.model_name = model_name
        self.params = dict(module.named_parameters())
        self.taken: set[str] = set()

    def take(self, name: str) -> Tensor:
        if name not in self.params:
            raise KeyError(f"{self.model_name}: expected a parameter {name!r} in the source model")
        self.taken.add(name)
        return self.params[name].detach().clone()

    def take_optional(self, name: str) -> Tensor | None:
        return self.take(name) if name in self.params else None

    def check_all_taken(self) -> None:
        left = sorted(set(self.params) - self.taken)
        if left:
            shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            raise NotImplementedError(
                f"{self.model_name}: the source model has parameters that HookedViT has no place for ({shown}); "
                "this architecture uses a feature vit_lens does not implement, so it is refused rather than "
                "loaded with missing weights."
            )


def unsupported(model_name: str, feature: str) -> NotImplementedError:
    return NotImplementedError(
        f"{model_name} uses {feature}, which HookedViT does not implement; refusing to convert it rather than "
        "compute something different from the source model."
    )


def activation_name(module: nn.Module, model_name: str) -> str:
    """Map an activation module to a ViTConfig.act_fn, by its type (never by a model name)."""
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU
    from timm.layers.activations import GELU as TimmGELU
    from timm.layers.activations import GELUTanh as TimmGELUTanh
    from timm.layers.activations import QuickGELU as TimmQuickGELU

    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}[module.approximate]
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, TimmGELU):
        return "gelu"
    if isinstance(module, TimmGELUTanh):
        return "gelu_tanh"
    if isinstance(module, (OpenClipQuickGELU, TimmQuickGELU)):
        return "quick_gelu"
    raise unsupported(model_name, f"the MLP activation {type(module).__name__}")


def layer_norm_eps(norms: list[nn.Module], model_name: str) -> float:
    """The shared epsilon of a tower's LayerNorms; refuse other norm types and mixed epsilons."""
    eps = set()
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
            raise unsupported(model_name, f"the normalisation layer {type(norm).__name__}")
        eps.add(norm.eps)
    if len(eps) != 1:
        raise unsupported(model_name, f"LayerNorms with different epsilons {sorted(eps)}")
    return eps.pop()


def split_qkv(weight: Tensor, bias: Tensor | None, n_heads: int, d_head: int) -> dict[str, Tensor]:
    """``[3 * n_heads * d_head, d_model]`` fused q/k/v weights (nn.Linear layout) to TransformerLens layout."""
    d_model = weight.shape[1]
    w = weight.reshape(3, n_heads, d_head, d_model).transpose(-1, -2)
    b = bias.reshape(3, n_heads, d_head) if bias is not None else weight.new_zeros(3, n_heads, d_head)
    return {"W_Q": w[0], "W_K": w[1], "W_V": w[2], "b_Q": b[0], "b_K": b[1], "b_V": b[2]}


def attention_and_mlp(
    prefix: str,
    *,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    n_heads: int,
    d_head: int,
    ls_attn: Tensor | None,
    ls_mlp: Tensor | None,
    gate_weight: Tensor | None = None,
    gate_bias: Tensor | None = None,
    attn_norm: tuple[Tensor, Tensor] | None = None,
    mlp_norm: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One block's attention and MLP weights in HookedViT names, LayerScale folded into the writers.

    ``fc1`` is the MLP's input layer (the linear branch of a gated MLP, whose gate is
    ``gate_weight``/``gate_bias``); ``attn_norm`` / ``mlp_norm`` are the (weight, bias) of a
    LayerNorm on the concatenated heads / on the hidden units.
    """
    d_model = out_weight.shape[0]
    W_O = out_weight.T.reshape(n_heads, d_head, d_model)
    b_O = out_bias if out_bias is not None else out_weight.new_zeros(d_model)
    W_out = fc2_weight.T
    b_out = fc2_bias if fc2_bias is not None else fc2_weight.new_zeros(d_model)
    if ls_attn is not None:
        W_O, b_O = W_O * ls_attn, b_O * ls_attn
    if ls_mlp is not None:
        W_out, b_out = W_out * ls_mlp, b_out * ls_mlp
    sd = {f"{prefix}.attn.{k}": v for k, v in split_qkv(qkv_weight, qkv_bias, n_heads, d_head).items()}
    sd[f"{prefix}.attn.W_O"] = W_O
    sd[f"{prefix}.attn.b_O"] = b_O
    sd[f"{prefix}.mlp.W_in"] = fc1_weight.T
    sd[f"{prefix}.mlp.b_in"] = fc1_bias if fc1_bias is not None else fc1_weight.new_zeros(fc1_weight.shape[0])
    sd[f"{prefix}.mlp.W_out"] = W_out
    sd[f"{prefix}.mlp.b_out"] = b_out
    if gate_weight is not None:
        sd[f"{prefix}.mlp.W_gate"] = gate_weight.T
        sd[f"{prefix}.mlp.b_gate"] = gate_bias if gate_bias is not None else gate_weight.new_zeros(gate_weight.shape[0])
    if attn_norm is not None:
        sd[f"{prefix}.attn.ln_z.w"], sd[f"{prefix}.attn.ln_z.b"] = attn_norm
    if mlp_norm is not None:
        sd[f"{prefix}.mlp.ln_hidden.w"], sd[f"{prefix}.mlp.ln_hidden.b"] = mlp_norm
    return {k: v.contiguous() for k, v in sd.items()}


def map_head(
    *,
    latent: Tensor,
    q_weight: Tensor,
    q_bias: Tensor | None,
    k_weight: Tensor,
    k_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    ln_weight: Tensor,
    ln_bias: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    n_heads: int,
) -> dict[str, Tensor]:
    """An attention-pooling (MAP) head's weights (nn.Linear layout) in HookedViT's ``attn_pool.*`` names."""
    d_model = out_weight.shape[0]
    d_head = q_weight.shape[0] // n_heads
    qkv = split_qkv(
        torch.cat([q_weight, k_weight, v_weight]),
        None if q_bias is None and k_bias is None and v_bias is None else torch.cat(
            [b if b is not None else q_weight.new_zeros(q_weight.shape[0]) for b in (q_bias, k_bias, v_bias)]
        ),
        n_heads,
        d_head,
    )
    sd = {f"attn_pool.{k}": v for k, v in qkv.items()}
    sd["attn_pool.latent"] = latent
    sd["attn_pool.W_O"] = out_weight.T.reshape(n_heads, d_head, d_model)
    sd["attn_pool.b_O"] = out_bias if out_bias is not None else out_weight.new_zeros(d_model)
    sd["attn_pool.ln.w"], sd["attn_pool.ln.b"] = ln_weight, ln_bias
    sd["attn_pool.mlp.W_in"] = fc1_weight.T
    sd["attn_pool.mlp.b_in"] = fc1_bias if fc1_bias is not None else fc1_weight.new_zeros(fc1_weight.shape[0])
    sd["attn_pool.mlp.W_out"] = fc2_weight.T
    sd["attn_pool.mlp.b_out"] = fc2_bias if fc2_bias is not None else fc2_weight.new_zeros(d_model)
    return {k: v.contiguous() for k, v in sd.items()}
