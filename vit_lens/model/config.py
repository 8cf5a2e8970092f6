"""ViTConfig: the architecture of a hooked vision transformer, and nothing else.

Every field is read from the source model by a loader in ``vit_lens.loading``; none is
guessed from a model name. Training, logging and device settings do not belong here.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

_ACT_FNS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
_POOL_TYPES = ("token", "token_dist", "avg", "max", "avgmax", "map")
_FINAL_NORMS = ("pre_pool", "post_pool", "none")
_MLP_TYPES = ("standard", "gated")
_ROTARY = ("none", "interleaved", "half")


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"ViTConfig.{name} must be an int or a pair of ints, got {value!r}")


@dataclass
class ViTConfig:
    """Architecture of a pre-LayerNorm vision transformer.

    Token order in the residual stream is always: CLS (if ``class_token``), then the DeiT
    distillation token (if ``distillation_token``), then ``n_registers`` register tokens, then
    the patches in raster order. ``n_prefix_tokens`` counts everything before the patches.

    Attributes:
        d_model: Width of the residual stream.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads per block.
        d_head: Width of one head (``n_heads * d_head`` need not equal ``d_model``).
        d_mlp: Hidden width of the MLP.
        patch_size: (height, width) of one patch in pixels.
        image_size: (height, width) the position embeddings were trained for.
        in_channels: Input channels (3 for RGB).
        act_fn: MLP nonlinearity: exact ``"gelu"``, ``"gelu_tanh"``, CLIP's ``"quick_gelu"`` or
            ``"silu"`` (the gate of a SwiGLU MLP).
        mlp_type: ``"standard"`` (``act(x W_in) W_out``) or ``"gated"`` (SwiGLU / GLU:
            ``(act(x W_gate) * (x W_in)) W_out``, EVA02 and DINOv2-giant).
        mlp_norm: Whether a LayerNorm acts on the MLP's hidden activations before ``W_out``
            (``mlp.ln_hidden``; EVA02's ``scale_mlp``, NormFormer style).
        attn_norm: Whether a LayerNorm acts on the concatenated head outputs ``z`` before
            ``W_O`` (``attn.ln_z``; EVA-CLIP's ``scale_attn_inner``).
        rotary: Rotary position embedding of q and k on the patch tokens (prefix tokens are not
            rotated, as in timm's EVA): ``"none"``, ``"interleaved"`` (pairs ``(x0, x1)``) or
            ``"half"`` (pairs ``(x_i, x_{i + d/2})``). The sine/cosine table is taken from the
            source model (``rotary.sin_cos``), never recomputed.
        eps: LayerNorm epsilon (shared by every LayerNorm of the tower).
        class_token: Whether a CLS token is prepended.
        distillation_token: Whether a DeiT distillation token follows CLS.
        n_registers: Number of register tokens.
        pos_embed_on_prefix: Whether the position embedding has rows for the prefix tokens
            (timm's ``no_embed_class=False``, open_clip); if False only patches get one.
        patch_bias: Whether the patch embedding convolution has a bias.
        ln_pre: Whether a LayerNorm is applied before the first block (CLIP's ``ln_pre``);
            the residual stream then starts after it.
        final_norm: Where the final LayerNorm (``ln_final``) sits: on every token before
            pooling (``"pre_pool"``: CLIP's ``ln_post``, timm's ``norm``), on the pooled vector
            (``"post_pool"``: timm's ``fc_norm``, open_clip's ``final_ln_after_pool``), or absent.
        pool_type: ``"token"`` (CLS), ``"token_dist"`` (CLS and distillation token, DeiT),
            ``"avg"``, ``"max"`` or ``"avgmax"`` over tokens, or ``"map"``: multi-head attention
            pooling with a learned latent query, then a residual LayerNorm + MLP (SigLIP's
            ``attn_pool`` / ``head``).
        pool_include_prefix: Whether avg/max/map pooling includes the prefix tokens.
        map_n_heads: Heads of the attention pool (``pool_type="map"`` only).
        map_d_mlp: Hidden width of the attention pool's MLP (``pool_type="map"`` only).
        d_proj: Output width of a CLIP image projection, or None.
        proj_bias: Whether the projection has a bias (``b_proj``; EVA-CLIP's timm head).
        n_classes: Classes of a classification head (0: no head).
        dynamic_img_size: Whether other image sizes are accepted by resampling the position
            embeddings (bicubic, antialiased, as timm's ``dynamic_img_size`` does).
        use_attn_result: Whether ``run_with_cache`` with no ``names_filter`` also caches the
            per-head outputs ``attn.hook_result`` (large: ``[batch, pos, head, d_model]``).
            A hook attached to ``hook_result`` always makes it computed, whatever this says.
            ``model.set_use_attn_result(True)`` sets it.
        use_split_qkv_input: Whether each block has ``hook_q_input``, ``hook_k_input`` and
            ``hook_v_input`` [batch, pos, head, d_model]: per-head copies of the residual stream
            that each head's queries, keys and values read (through ``ln1``), so that one head's
            query, key or value input can be patched alone (edge patching). TransformerLens's
            flag; off, the hook points do not exist and q, k, v come from one fused product.
            Excludes ``use_attn_in``. ``model.set_use_split_qkv_input(True)`` sets it.
        use_attn_in: Whether each block has ``hook_attn_in`` [batch, pos, head, d_model]: one
            per-head copy of the residual stream read by that head's queries, keys and values.
            TransformerLens's flag; excludes ``use_split_qkv_input``.
        use_hook_mlp_in: Whether each block has ``hook_mlp_in`` [batch, pos, d_model]: a copy of
            ``hook_resid_mid`` that only the MLP reads (through ``ln2``), so that editing it
            changes the MLP's input and not the residual stream. TransformerLens's flag.
        model_name: Where the weights came from, for messages and ``repr`` only.
        device: Where the weights of the model built from this config are (TransformerLens's
            ``cfg.device``, with which TransformerLens and ARENA code allocates results). Not an
            argument: the HookedViT sets it when it is built and whenever it is moved
            (``model.to(...)``); None for a config no model owns yet.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    patch_size: int | tuple[int, int]
    image_size: int | tuple[int, int]
    in_channels: int = 3
    act_fn: str = "gelu"  # one of _ACT_FNS; checked in __post_init__ with a directed message
    mlp_type: str = "standard"  # one of _MLP_TYPES
    mlp_norm: bool = False
    attn_norm: bool = False
    rotary: str = "none"  # one of _ROTARY
    eps: float = 1e-5
    class_token: bool = True
    distillation_token: bool = False
    n_registers: int = 0
    pos_embed_on_prefix: bool = True
    patch_bias: bool = True
    ln_pre: bool = False
    final_norm: str = "pre_pool"  # one of _FINAL_NORMS
    pool_type: str = "token"  # one of _POOL_TYPES
    pool_include_prefix: bool = False
    map_n_heads: int = 0
    map_d_mlp: int = 0
    d_proj: int | None = None
    proj_bias: bool = False
    n_classes: int = 0
    dynamic_img_size: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    model_name: str = "custom"
    # Read by TransformerLens's ActivationCache; fixed for the architectures vit_lens supports.
    normalization_type: str = field(default="LN", init=False, repr=False)
    attn_only: bool = field(default=False, init=False, repr=False)
    final_rms: bool = field(default=False, init=False, repr=False)
    device: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.patch_size = _pair(self.patch_size, "patch_size")
        self.image_size = _pair(self.image_size, "image_size")
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.act_fn not in _ACT_FNS:
            raise ValueError(f"ViTConfig.act_fn must be one of {_ACT_FNS}, got {self.act_fn!r}")
        if self.mlp_type not in _MLP_TYPES:
            raise ValueError(f"ViTConfig.mlp_type must be one of {_MLP_TYPES}, got {self.mlp_type!r}")
        if self.rotary not in _ROTARY:
            raise ValueError(f"ViTConfig.rotary must be one of {_ROTARY}, got {self.rotary!r}")
        if self.rotary != "none" and self.d_head % 2:
            raise ValueError(f"ViTConfig.rotary needs an even d_head, got {self.d_head}")
        if self.rotary != "none" and self.dynamic_img_size:
            raise ValueError(
                "ViTConfig.rotary takes the rotary table of one patch grid from the source model, so "
                "dynamic_img_size=True is not supported with it; resize images to image_size"
            )
        if self.pool_type == "map" and (self.map_n_heads <= 0 or self.map_d_mlp <= 0 or self.d_model % self.map_n_heads):
            raise ValueError(
                "ViTConfig.pool_type='map' needs map_n_heads > 0 dividing d_model and map_d_mlp > 0, got "
                f"map_n_heads={self.map_n_heads}, map_d_mlp={self.map_d_mlp}, d_model={self.d_model}"
            )
        if self.proj_bias and self.d_proj is None:
            raise ValueError("ViTConfig.proj_bias=True needs a projection (d_proj)")
        if self.pool_type not in _POOL_TYPES:
            raise ValueError(f"ViTConfig.pool_type must be one of {_POOL_TYPES}, got {self.pool_type!r}")
        if self.final_norm not in _FINAL_NORMS:
            raise ValueError(f"ViTConfig.final_norm must be one of {_FINAL_NORMS}, got {self.final_norm!r}")
        if self.pool_type == "token" and not self.class_token:
            raise ValueError("ViTConfig.pool_type='token' needs class_token=True; use 'avg' for models without CLS")
        if self.pool_type == "token_dist" and not (self.class_token and self.distillation_token):
            raise ValueError("ViTConfig.pool_type='token_dist' needs both class_token and distillation_token")
        if self.n_registers < 0:
            raise ValueError(f"ViTConfig.n_registers must be >= 0, got {self.n_registers}")
        if self.eps <= 0:
            raise ValueError(f"ViTConfig.eps must be positive, got {self.eps}")
        if self.d_proj is not None and self.n_classes:
            raise ValueError("ViTConfig takes either d_proj (CLIP projection) or n_classes (classifier head), not both")
        for flag in ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"ViTConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.use_split_qkv_input and self.use_attn_in:
            raise ValueError(
                "ViTConfig.use_split_qkv_input and use_attn_in cannot both be True: both give each head its own copy "
                "of the attention input (split: one each for queries, keys and values; attn_in: one for all three). "
                "Choose one."
            )
        for axis in (0, 1):
            if self.image_size[axis] % self.patch_size[axis]:
                raise ValueError(
                    f"ViTConfig.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS, distillation token and registers."""
        return int(self.class_token) + int(self.distillation_token) + self.n_registers

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at ``image_size``."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_ctx(self) -> int:
        """Positions in the residual stream at ``image_size``: prefix tokens plus patches (TransformerLens's ``n_ctx``)."""
        return self.n_prefix_tokens + self.n_patches

    def token_labels(self, grid_size: tuple[int, int] | None = None) -> list[str]:
        """A label for every position of the residual stream, in order, for plot axes.

        ``"CLS"``, ``"DIST"`` (DeiT's distillation token), ``"REG0"``, ``"REG1"``, ... (registers),
        then ``"P(row,col)"`` for the patches in raster order: the labels patching results use.

        Args:
            grid_size: The patch grid (rows, columns) of the images; default: the grid at ``image_size``.

        Example:
            >>> ViTConfig(d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16, patch_size=8, image_size=16,
            ...           n_registers=1).token_labels()
            ['CLS', 'REG0', 'P(0,0)', 'P(0,1)', 'P(1,0)', 'P(1,1)']
        """
        rows, cols = self.grid_size if grid_size is None else grid_size
        prefix = ["CLS"] * self.class_token + ["DIST"] * self.distillation_token
        prefix += [f"REG{i}" for i in range(self.n_registers)]
        return prefix + [f"P({r},{c})" for r in range(rows) for c in range(cols)]

    @property
    def d_output(self) -> int:
        """Width of the model's output: projection, logits, or the pooled representation."""
        if self.d_proj is not None:
            return self.d_proj
        return self.n_classes or self.d_model

    def to_dict(self) -> dict:
        """The init fields as a plain dict (what ``ViTConfig(**d)`` takes back)."""
        derived = ("normalization_type", "attn_only", "final_rms", "device")
        return {k: v for k, v in asdict(self).items() if k not in derived}
