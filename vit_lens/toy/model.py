"""The toy CLIP: architecture, construction, and the shipped weights."""

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit_lens.model.config import ViTConfig

WEIGHTS_FILE = "toy_clip.safetensors"

VISION_CONFIG = dict(
    d_model=128,
    n_layers=4,
    n_heads=4,
    d_head=32,
    d_mlp=512,
    patch_size=8,
    image_size=64,
    act_fn="gelu",
    eps=1e-5,
    class_token=True,
    ln_pre=True,
    final_norm="pre_pool",
    pool_type="token",
    d_proj=64,
    model_name="vit_lens-toy-clip",
)
TEXT_CONFIG = dict(width=96, layers=2, heads=4, d_proj=64, context_length=16)


def init_for_training(vision: nn.Module) -> nn.Module:
    """Initialise a HookedViT in place for training from scratch (the toy and planted models' recipe).

    Matrices start at ``N(0, 1/fan_in)`` (output projections further scaled by ``1/sqrt(2 n_layers)``),
    LayerNorms at identity, biases at zero and position embeddings small.
    """
    cfg = vision.cfg
    with torch.no_grad():
        for name, param in vision.named_parameters():
            if name.endswith(".w"):
                param.fill_(1.0)
            elif name.endswith(("W_pos", "cls_token")):
                param.normal_(std=0.02)
            elif name.endswith("W_E"):
                param.normal_(std=param[0].numel() ** -0.5)
            elif param.ndim >= 2:
                fan_in = param.shape[-2] * (param.shape[0] if name.endswith("W_O") else 1)
                scale = (2 * cfg.n_layers) ** -0.5 if name.endswith(("W_O", "W_out")) else 1.0
                param.normal_(std=scale * fan_in**-0.5)
            else:
                param.zero_()
    return vision


def build_toy_clip(
    vision_config: dict | None = None, text_config: dict | None = None, seed: int | None = 0
) -> "vit_lens.HookedCLIP":  # noqa: F821
    """A freshly initialised toy CLIP (the architecture of :func:`load_toy_clip`), ready to train.

    The image tower starts as :func:`init_for_training` sets it; the text tower as it initialises itself.
    """
    from vit_lens.model.clip import HookedCLIP
    from vit_lens.model.hooked_vit import HookedViT
    from vit_lens.toy.text import ToyTextTower, ToyTokenizer

    if seed is not None:
        torch.manual_seed(seed)
    cfg = ViTConfig(**(vision_config or VISION_CONFIG))
    vision = HookedViT(cfg)
    init_for_training(vision)
    text_config = dict(TEXT_CONFIG, **(text_config or {}))
    text = ToyTextTower(**text_config)
    logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), as CLIP starts
    return HookedCLIP(vision, text, logit_scale, tokenizer=ToyTokenizer(text_config["context_length"]))


@torch.no_grad()
def factor_accuracy(clip: nn.Module, batch: Any) -> dict[str, float]:
    """Zero-shot accuracy of ``clip`` on a :class:`~vit_lens.toy.ToyBatch`, per factor, with the
    single-factor prompts of :func:`~vit_lens.toy.factor_prompts` ("red object", "striped background").

    Example:
        >>> from vit_lens.toy import ToyWorld
        >>> accuracy = factor_accuracy(load_toy_clip(), ToyWorld(seed=1).sample(200))
        >>> accuracy["colour"] > 0.9
        True
    """
    from vit_lens.toy.world import FACTORS, factor_prompts

    image = clip.encode_image(batch.images, normalize=True)
    result = {}
    for name in FACTORS:
        text = clip.encode_text(factor_prompts(name), normalize=True)
        result[name] = (image @ text.T).argmax(1).eq(batch.factors[name].to(image.device)).float().mean().item()
    return result


def save_toy_clip(model: nn.Module, path: str | Path, card: dict[str, Any] | None = None) -> None:
    """Save a toy CLIP's weights in float16 with its configuration (and a model-card dict) as metadata."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(torch.float16).contiguous() for name, t in model.state_dict().items()}
    metadata = {
        "vision_config": json.dumps(model.vision.cfg.to_dict()),
        "text_config": json.dumps(
            dict(
                width=model.text_model.token_embedding.embedding_dim,
                layers=len(model.text_model.transformer.layers),
                heads=model.text_model.transformer.layers[0].self_attn.num_heads,
                d_proj=model.text_model.text_projection.shape[1],
                context_length=model.text_model.context_length,
            )
        ),
        "card": json.dumps(card or {}),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_toy_clip(path: str | Path | None = None, device: str | torch.device = "cpu") -> "vit_lens.HookedCLIP":  # noqa: F821
    """The toy CLIP shipped with vit_lens (trained on :class:`vit_lens.toy.ToyWorld`), offline.

    Images are ``[batch, 3, 64, 64]`` in [0, 1], as :meth:`ToyWorld.sample` draws them (no further
    preprocessing); texts use the world's words (:data:`vit_lens.toy.VOCABULARY`). The weights are
    stored in float16 and loaded as float32, in eval mode with gradients available (parameters
    require grad, as for every loaded model). The model card is ``vit_lens/toy/MODEL_CARD.md``.

    Args:
        path: Another checkpoint written by :func:`save_toy_clip` (default: the shipped one).
        device: Where to put the model.

    Example:
        >>> import vit_lens
        >>> from vit_lens.toy import ToyWorld, factor_prompts
        >>> clip = vit_lens.load_toy_clip()
        >>> batch = ToyWorld(seed=1).sample(8)
        >>> scores = clip(batch.images, factor_prompts("colour"))   # [8, 6] logits over the six colours
        >>> (scores.argmax(1) == batch.factors["colour"]).float().mean().item()  # doctest: +SKIP
        1.0
    """
    from safetensors import safe_open

    from vit_lens.loading.checkpoints import require_safetensors

    if path is None:
        path = resources.files("vit_lens.toy").joinpath(WEIGHTS_FILE)
    path = Path(str(path))
    if not path.exists():
        raise FileNotFoundError(
            f"no toy CLIP checkpoint at {path}; the shipped one is vit_lens/toy/{WEIGHTS_FILE} "
            "(train a new one with `python -m vit_lens.toy.train`)"
        )
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; load_toy_clip takes a .safetensors file written by save_toy_clip")
    require_safetensors(path, "load_toy_clip reads the safetensors files that save_toy_clip writes")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        missing = [key for key in ("vision_config", "text_config") if key not in metadata]
        if missing:
            raise ValueError(
                f"{path} is a safetensors file but not a toy CLIP checkpoint: its metadata lacks {', '.join(missing)} "
                f"(it has {sorted(metadata) or 'none'}). load_toy_clip reads files written by save_toy_clip; load "
                "other checkpoints with HookedViT.from_pretrained or HookedCLIP.from_pretrained."
            )
        state = {name: f.get_tensor(name).float() for name in f.keys()}
    # JSON has no tuples: patch_size and image_size come back as lists
    vision_config = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(metadata["vision_config"]).items()}
    model = build_toy_clip(vision_config, json.loads(metadata["text_config"]), seed=None)
    model.load_state_dict(state, strict=True)
    model.card = json.loads(metadata.get("card", "{}"))
    # Gradients stay available (eval mode only), as for every loaded model: attribution patching,
    # run_with_cache(incl_bwd=True) and gradient-based maps differentiate through the weights.
    return model.to(device).eval()
