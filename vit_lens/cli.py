"""The ``vit-lens`` command. Heavy libraries are imported inside the subcommands, so ``--help`` is instant.

An error is one line on stderr (two with a hint) and a non-zero exit status; ``--debug`` shows
the traceback instead. Arguments, images and the output path are checked before any model is built.
"""

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_SOURCES = ("open_clip", "timm")


class CommandError(Exception):
    """A bad argument, found before any work: reported as one line, exit status 2 (as argparse's own)."""


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for whole numbers of ``minimum`` or more: argparse puts the flag's name in front of the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of {minimum} or more, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return parse


_positive_int = _at_least(1)  # counts
_count = _at_least(0)  # counts where 0 leaves something out


def _check_model_spec(model: str, allow_toy: bool) -> None:
    kind, _, arch = model.partition(":")
    if (allow_toy and model == "toy") or (kind in _SOURCES and arch):
        return
    forms = ("'toy', " if allow_toy else "") + "'open_clip:<arch>' (e.g. open_clip:ViT-B-32) or 'timm:<name>'"
    raise CommandError(f"--model {model}: use {forms}")


def _check_images(paths: list[str]) -> None:
    """Every ``--image`` is a file PIL recognises as an image (read from its header, not decoded)."""
    from PIL import Image, UnidentifiedImageError

    given: dict[str, str] = {}  # real path -> the path as given
    for path in paths:
        real = os.path.realpath(path)
        if real in given:
            raise CommandError(f"--image {path} is the file already given as {given[real]}; pass each image once")
        given[real] = path
        if not os.path.exists(path):
            raise CommandError(f"--image {path}: no such file")
        if os.path.isdir(path):
            raise CommandError(f"--image {path} is a directory; pass image files (repeat --image for several)")
        try:
            with Image.open(path) as image:
                image.verify()
        except UnidentifiedImageError:
            raise CommandError(
                f"--image {path} is not an image file PIL can read; pass a JPEG, PNG, WebP, BMP or TIFF file"
            ) from None
        except (OSError, SyntaxError) as error:
            raise CommandError(f"--image {path} cannot be read as an image ({error})") from None


def _check_output_path(out: str) -> None:
    """``--out`` is a file path in an existing directory this process can write in."""
    path = Path(out)
    if path.is_dir():
        raise CommandError(f"--out {out} is a directory; pass a file path such as {path / 'vit_lens_report.html'}")
    folder = path.parent
    if not folder.exists():
        raise CommandError(
            f"--out {out}: the directory {folder} does not exist; create it first or choose another path"
        )
    if not folder.is_dir():
        raise CommandError(f"--out {out}: {folder} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vit_lens_write_check_"):
            pass
    except OSError as error:
        raise CommandError(
            f"--out {out}: cannot write in {folder} ({error.strerror}); choose a writable directory"
        ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise CommandError(f"--out {out}: the file exists and is not writable")


def _check_demo_arguments(args: argparse.Namespace) -> None:
    _check_model_spec(args.model, allow_toy=True)
    if args.model == "toy":
        if args.image:
            raise CommandError("--image needs a real model: add --model open_clip:<arch> --pretrained <tag> (the toy "
                               "model only sees its own 64x64 world)")
        if args.pretrained is not None:
            raise CommandError("--pretrained needs a real model (--model open_clip:<arch> or timm:<name>); the toy "
                               "CLIP ships its own weights")
    elif not args.image:
        raise CommandError(f"--model {args.model} needs images: pass one or more --image PATH (jpg/png)")
    _check_images(args.image)
    _check_output_path(args.out)


def _demo(args: argparse.Namespace) -> int:
    """The report: on the built-in toy CLIP by default, or on real weights."""
    _check_demo_arguments(args)
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.model == "toy":
        path = _demo_toy(args)
    else:
        path = _demo_real(args)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Open the report in a browser (it works offline):\n  {Path(path).resolve()}")
    return 0


def _distinct_scenes(world, n: int) -> list:
    """``n`` scenes with distinct captions, of distinct colours while colours last: the report's images
    are explained by their colour class, and two images with one caption would read as a repeat."""
    import math

    from vit_lens.toy import FACTORS, caption

    if n > math.prod(len(values) for values in FACTORS.values()):
        raise CommandError(f"--n-images {n}: the toy world has fewer distinct scenes to show; ask for a few images")
    scenes: list = []
    while len(scenes) < n:
        scene = world.sample_scene()
        shown = {s.colour for s in scenes}
        new_colour = scene.colour not in shown or len(shown) == len(FACTORS["colour"])
        if new_colour and caption(scene) not in {caption(s) for s in scenes}:
            scenes.append(scene)
    return scenes


def _demo_toy(args: argparse.Namespace):
    import torch

    from vit_lens.viz.report import demo_report
    from vit_lens.toy import ToyWorld, description_pool, factor_prompts, load_toy_clip
    from vit_lens.toy.world import COLOURS

    print("Loading the built-in toy CLIP (trained by vit_lens on its synthetic world of coloured shapes) ...")
    clip = load_toy_clip()
    world = ToyWorld(seed=args.seed)
    batch = world.render(_distinct_scenes(world, args.n_images))
    colours = factor_prompts("colour")  # the toy model reads every factor; colour is the easiest to see on a map
    pool = description_pool()[0]
    with torch.no_grad():
        directions = clip.encode_text(colours, normalize=True)
        pool_embeddings = clip.encode_text(pool, normalize=True)
    scorecards = []
    if args.scorecard_images:
        from vit_lens.methods.scorecard import scorecard
        from vit_lens.planted.model import load_planted

        print(f"Scoring the methods on the planted CLIP against its truth ({args.scorecard_images} images) ...")
        n = args.scorecard_images
        scorecards.append(scorecard(load_planted("clip"), n_images=n, n_pairs=max(8, n // 4), n_localisation=n))
    return demo_report(
        clip.vision, batch.images, class_names=colours, class_directions=directions, pool=pool,
        pool_embeddings=pool_embeddings, textspan_images=world.sample(args.textspan_images).images,
        out=args.out, titles=batch.captions, true_masks=batch.foreground,
        object_colours=torch.tensor([COLOURS[scene.colour] for scene in batch.scenes]), model_name="vit_lens toy CLIP",
        scorecards=scorecards,
    )


def _demo_real(args: argparse.Namespace):
    import torch
    from PIL import Image

    from vit_lens.loading import check_model_name
    from vit_lens.model.clip import HookedCLIP
    from vit_lens.model.hooked_vit import HookedViT
    from vit_lens.viz.report import demo_report

    kind, _ = check_model_name(args.model)
    print(f"Loading {args.model} (pretrained={args.pretrained}) ...")
    pool = pool_embeddings = None
    if kind == "open_clip":
        from vit_lens.loading.open_clip import open_clip_imagenet_classnames
        from vit_lens.methods.textspan.pools import default_text_pool

        clip = HookedCLIP.from_pretrained(args.model, pretrained=args.pretrained)
        model, preprocess = clip.vision, clip.preprocess
        names = list(open_clip_imagenet_classnames())
        print("Encoding the ImageNet class prompts and the TextSpan pool with the text tower ...")
        with torch.no_grad():
            directions = torch.cat([clip.encode_text([f"a photo of a {n}." for n in names[i : i + 100]], normalize=True)
                                    for i in range(0, len(names), 100)])
            pool = default_text_pool()
            pool_embeddings = torch.cat([clip.encode_text(pool[i : i + 100], normalize=True) for i in range(0, len(pool), 100)])
    else:
        from vit_lens.loading import load_source_model
        from vit_lens.loading.timm import timm_class_names

        _, source = load_source_model(args.model, pretrained=args.pretrained)
        model = HookedViT.from_timm(source)
        if model.cfg.n_classes == 0 or model.cfg.pool_type == "token_dist":
            raise CommandError(f"{args.model}: the demo explains a classifier's logits; this model has "
                               f"{'no head' if model.cfg.n_classes == 0 else 'two heads (distilled)'}")
        import timm.data

        preprocess = timm.data.create_transform(**timm.data.resolve_data_config({}, model=source))
        names = timm_class_names(source)
        directions = model.head.W_head.T.detach()
        print("(TextSpan needs a text model: the timm report has no TextSpan section.)")
    images = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in args.image])
    return demo_report(
        model, images, class_names=names, class_directions=directions, pool=pool, pool_embeddings=pool_embeddings,
        out=args.out, titles=[Path(p).name for p in args.image], model_name=args.model,
    )


def _check(args: argparse.Namespace) -> int:
    _check_model_spec(args.model, allow_toy=False)
    import torch

    from vit_lens.loading import check_model_name, load_source_model, source_residual_stream
    from vit_lens.model.hooked_vit import HookedViT

    check_model_name(args.model)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    print(f"Building {args.model} with random weights (no download) and converting it to a HookedViT...")
    _, source = load_source_model(args.model, pretrained=None)
    model = HookedViT.from_open_clip(source) if args.model.startswith("open_clip:") else HookedViT.from_timm(source)
    cfg = model.cfg
    images = torch.randn(args.batch, cfg.in_channels, *cfg.image_size)

    start = time.perf_counter()
    with torch.no_grad():
        output, cache = model.run_with_cache(images)
    cached_in = time.perf_counter() - start
    reference = source_residual_stream(source, images)
    with torch.no_grad():
        source_output = source.encode_image(images) if hasattr(source, "encode_image") else source(images)

    print(
        f"\n{cfg.model_name}: {cfg.n_layers} layers x {cfg.n_heads} heads, d_model {cfg.d_model}, "
        f"{cfg.n_ctx} tokens ({cfg.n_prefix_tokens} prefix + {cfg.grid_size[0]}x{cfg.grid_size[1]} patches)"
    )
    print(f"run_with_cache: {len(cache)} activations, {sum(t.numel() for t in cache.values()) * 4 / 2**20:.1f} MB, "
          f"{cached_in:.2f} s\n")
    header = f"{'layer':>5}  {'|resid| CLS':>11}  {'CLS attn entropy':>16}  {'top head -> patches':>19}  {'rel. err vs source':>18}"
    print(header)
    print("-" * len(header))
    for layer in range(cfg.n_layers):
        resid = cache["resid_post", layer]
        cls_attention = cache["pattern", layer][:, :, 0]  # [batch, head, key]
        entropy = -(cls_attention * cls_attention.clamp_min(1e-12).log()).sum(-1).mean().item()
        to_patches = cls_attention[..., cfg.n_prefix_tokens :].sum(-1).mean(0)  # [head]
        head = int(to_patches.argmax())
        error = ((resid - reference[layer + 1]).norm() / reference[layer + 1].norm()).item()
        print(f"{layer:>5}  {resid[:, 0].norm(dim=-1).mean().item():>11.2f}  {entropy:>16.3f}  "
              f"{f'H{head} {100 * to_patches[head].item():.0f}%':>19}  {error:>18.1e}")
    output_error = ((output - source_output).norm() / source_output.norm()).item()
    print(f"\noutput {tuple(output.shape)}: relative error vs the source model {output_error:.1e}")
    return 0 if output_error < 1e-5 else 1


_SAE_ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")  # vit_lens.sae.ARCHITECTURES, without torch
_SAE_TOKENS = ("all", "cls", "patches", "registers")


def _sae_k(text: str) -> int | float:
    """``--k``: a whole number for TopK, possibly fractional for BatchTopK (the average per token)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return int(value) if value.is_integer() else value


def _check_sae_model(model: str) -> None:
    if model != "toy":
        raise CommandError(
            f"--model {model}: `vit-lens sae` runs on 'toy' (the built-in toy CLIP and its world); for other models "
            "use the Python API, vit_lens.sae.train_sae(model, cfg, images, ...) and "
            "vit_lens.sae.write_sae_dashboard(model, sae, images, ...), with your own images"
        )


def _check_sae_train_arguments(args: argparse.Namespace) -> None:
    _check_sae_model(args.model)
    if args.architecture in ("topk", "batchtopk") and args.k is None:
        raise CommandError(f"--architecture {args.architecture} needs --k (active features per token), e.g. --k 16")
    if args.architecture not in ("topk", "batchtopk") and args.k is not None:
        raise CommandError(f"--k applies to --architecture topk or batchtopk, not {args.architecture}")
    if args.architecture == "topk" and not isinstance(args.k, int):
        raise CommandError(f"--k {args.k}: a topk SAE keeps a whole number of features per token")
    if args.k is not None and args.k > args.d_sae:
        raise CommandError(f"--k {args.k} is more than --d-sae {args.d_sae} features")
    out = Path(args.out)
    if out.exists() and not (args.overwrite and out.is_dir()):
        what = "a folder" if out.is_dir() else "a file"
        raise CommandError(f"--out {args.out} exists ({what}); add --overwrite to replace a saved SAE, or choose a "
                           "new folder")
    if not out.parent.is_dir():
        raise CommandError(f"--out {args.out}: the directory {out.parent} does not exist; create it first")


def _sae_width(tower, hook: str) -> tuple[int, str]:
    """The width an SAE on ``hook`` reads, and its ``reshape_activations``, from one forward pass."""
    import torch

    from vit_lens.model.hook_checks import hook_name_advice

    if hook not in tower.hook_dict:
        raise CommandError(f"--hook {hook} is no hook point of the toy CLIP. "
                           f"{hook_name_advice(hook, list(tower.hook_dict), tower.cfg.n_layers)}")
    with torch.no_grad():
        _, cache = tower.run_with_cache(torch.zeros(1, tower.cfg.in_channels, *tower.cfg.image_size), names_filter=hook)
    activation = cache[hook]
    if hook.endswith("attn.hook_z"):
        return activation.shape[-2] * activation.shape[-1], "hook_z"
    if activation.ndim != 3:
        raise CommandError(f"--hook {hook} gives {tuple(activation.shape)}; an SAE reads [batch, pos, width] "
                           "activations (the residual stream, attn.hook_z, hook_attn_out, mlp.hook_post, ...)")
    return activation.shape[-1], "none"


def _sae_train(args: argparse.Namespace) -> int:
    """Train an SAE on the toy CLIP's activations over its own world, and save it in SAELens's format."""
    _check_sae_train_arguments(args)
    import torch

    from vit_lens.sae.files import save_sae
    from vit_lens.sae.model import SAEConfig
    from vit_lens.sae.training import train_sae
    from vit_lens.toy import ToyWorld, load_toy_clip

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("Loading the built-in toy CLIP ...")
    clip = load_toy_clip()
    width, reshape = _sae_width(clip.vision, args.hook)
    cfg = SAEConfig(d_in=width, d_sae=args.d_sae, architecture=args.architecture, k=args.k, hook_name=args.hook,
                    reshape_activations=reshape, token_selection=args.tokens, model_name=clip.cfg.model_name)
    images = ToyWorld(seed=args.seed).sample(args.n_images).images
    hyperparameters = {"seed": args.seed} if args.lr is None else {"seed": args.seed, "lr": args.lr}
    print(f"Training a {args.architecture} SAE ({width} -> {args.d_sae}) on {args.hook} over {args.n_images} toy "
          f"images, {args.steps} steps of {args.batch_tokens} tokens ...")
    sae, log = train_sae(clip, cfg, images, steps=args.steps, batch_size_tokens=args.batch_tokens, **hyperparameters)
    path = save_sae(sae, args.out, overwrite=args.overwrite)
    last = log[-1] if log else {}
    summary = ", ".join(f"{key} {last[key]:.3g}" for key in ("loss", "l0", "explained_variance", "dead_fraction")
                        if key in last)
    print(f"\nDone in {time.perf_counter() - started:.0f} s ({summary}). Saved in SAELens's format:\n  {path.resolve()}")
    print(f"Next: vit-lens sae dashboard --model {args.model} --sae {args.out} --out sae_dashboard.html")
    return 0


def _parse_features(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        features = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--features {text}: give feature indices separated by commas, e.g. --features 3,17,42") from None
    if not features:
        raise CommandError(f"--features {text!r} names no feature; e.g. --features 3,17,42")
    return features


def _sae_dashboard(args: argparse.Namespace) -> int:
    """Write the HTML dashboard of a saved SAE's features on the toy CLIP."""
    _check_sae_model(args.model)
    features = _parse_features(args.features)
    if not Path(args.sae).exists():
        raise CommandError(f"--sae {args.sae}: no such folder; train one with `vit-lens sae train ... --out {args.sae}`")
    _check_output_path(args.out)
    import torch

    from vit_lens.sae.files import load_sae
    from vit_lens.sae.dashboard import write_sae_dashboard
    from vit_lens.sae.views import check_features
    from vit_lens.toy import ToyWorld, description_pool, load_toy_clip

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sae = load_sae(args.sae)
    if features is not None:
        try:
            check_features(features, sae.cfg.d_sae, "--features")
        except ValueError as error:
            raise CommandError(str(error)) from None
    print("Loading the built-in toy CLIP ...")
    clip = load_toy_clip()
    if sae.cfg.hook_name not in clip.vision.hook_dict:
        raise CommandError(f"--sae {args.sae} reads {sae.cfg.hook_name!r}, which is no hook point of the toy CLIP")
    images = ToyWorld(seed=args.seed).sample(args.n_images).images
    print(f"Streaming {args.n_images} toy images through the model and the SAE ...")
    path = write_sae_dashboard(clip, sae, images, features=features, path=args.out, texts=description_pool()[0],
                               n_features=args.n_features, k=args.top_k, image_score=args.image_score)
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Open the dashboard in a browser (it works offline):\n"
          f"  {path.resolve()}")
    return 0


_CACHE_TOKENS = "all, cls, patches, prefix, or token indices separated by commas (e.g. 0,5,9)"


def _cache_tokens(text: str):
    """``--tokens``: a name the runner knows, or token indices."""
    if text in ("all", "cls", "patches", "prefix"):
        return text
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use {_CACHE_TOKENS}") from None
    if not indices:
        raise argparse.ArgumentTypeError(f"{text!r} names no token; use {_CACHE_TOKENS}")
    return indices


def _check_cache_arguments(args: argparse.Namespace) -> tuple[str, str]:
    """The dataset spec split into (kind, value), after checking every argument that needs no model."""
    _check_model_spec(args.model, allow_toy=True)
    if args.model == "toy" and args.pretrained is not None:
        raise CommandError("--pretrained needs a real model (--model open_clip:<arch> or timm:<name>); the toy CLIP "
                           "ships its own weights")
    kind, _, value = args.dataset.partition(":")
    if kind == "toy":
        if not value.isdigit() or int(value) < 1:
            raise CommandError(f"--dataset {args.dataset}: use toy:<number of images>, e.g. toy:512")
        if args.model != "toy":
            raise CommandError(f"--dataset {args.dataset}: the toy world's 64x64 images are for --model toy; give "
                               f"{args.model} a folder of images with --dataset folder:PATH")
    elif kind == "folder":
        if not value or not Path(value).is_dir():
            raise CommandError(f"--dataset {args.dataset}: no such folder; pass folder:PATH with a folder of images")
    else:
        raise CommandError(f"--dataset {args.dataset}: use toy:<n> (the toy world) or folder:PATH (image files, read "
                           "recursively in path order)")
    args.hooks = [name.strip() for group in args.hooks for name in group.split(",") if name.strip()]
    if not args.hooks:
        raise CommandError("--hooks names no hook point; e.g. --hooks blocks.1.hook_resid_post")
    if args.no_activations and not (args.mean or args.covariance):
        raise CommandError("--no-activations leaves nothing to record; add --mean and/or --covariance")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"--out {args.out} is a file; pass a folder (created if missing)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CommandError("--device cuda: CUDA is not available here; use --device cpu (or auto)")
    return kind, value


def _cache_model(args: argparse.Namespace):
    """``(model, preprocess)``: the model to run and its image transform for a folder of images."""
    if args.model == "toy":
        from vit_lens.toy import load_toy_clip

        clip = load_toy_clip()
        size = tuple(clip.vision.cfg.image_size)

        def preprocess(image):
            import numpy as np
            import torch

            resized = image.resize((size[1], size[0]))
            return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)

        return clip, preprocess
    from vit_lens.loading import check_model_name

    kind, _ = check_model_name(args.model)
    if kind == "open_clip":
        from vit_lens.model.clip import HookedCLIP

        clip = HookedCLIP.from_pretrained(args.model, pretrained=args.pretrained)
        return clip, clip.preprocess
    import timm.data

    from vit_lens.loading import load_source_model
    from vit_lens.model.hooked_vit import HookedViT

    _, source = load_source_model(args.model, pretrained=args.pretrained)
    return HookedViT.from_timm(source), timm.data.create_transform(**timm.data.resolve_data_config({}, model=source))


def _cache(args: argparse.Namespace) -> int:
    """Cache activations and dataset statistics to a resumable folder of shards; runs under torchrun too."""
    kind, value = _check_cache_arguments(args)
    import torch

    from vit_lens.model.hooked_vit import image_tower
    from vit_lens.runner import Activations, Covariance, ImageFiles, Mean, run_dataset
    from vit_lens.runner.recorders import check_hooks, resolve_tokens

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, preprocess = _cache_model(args)
    tower = image_tower(model)
    try:
        check_hooks(args.hooks, tower, "--hooks")
        resolve_tokens(args.tokens, tower.cfg)
    except ValueError as error:
        raise CommandError(str(error).replace("tokens=", "--tokens ")) from None
    if kind == "toy":
        from vit_lens.toy import ToyWorld

        data = ToyWorld(seed=args.seed).sample(int(value)).images
    else:
        data = ImageFiles(value, preprocess)
    record = [] if args.no_activations else [Activations(args.hooks, args.tokens, store_dtype=args.store_dtype)]
    if args.mean:
        record.append(Mean(args.hooks, args.tokens, over=args.over))
    if args.covariance:
        record.append(Covariance(args.hooks, args.tokens, over=args.over))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    result = run_dataset(model, data, args.out, record, shard_size=args.shard_size, batch_size=args.batch_size,
                         device=device, dtype=args.dtype, num_workers=args.num_workers, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nDone in {time.perf_counter() - started:.0f} s: {result.n_images} images in {len(result.shards)} "
              f"shards of {result.shard_size}.\n  {Path(args.out).resolve()}\nRead it back with "
              f"vit_lens.runner.RunResult({str(args.out)!r}).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-lens", description="Mechanistic interpretability for vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="write an HTML report (decomposition, attention maps, TextSpan, segmentation); offline on the toy CLIP",
    )
    demo.add_argument("--model", default="toy",
                      help="'toy' (built-in, offline), open_clip:<arch> or timm:<name> (default: %(default)s)")
    demo.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file for a real model")
    demo.add_argument("--image", action="append", default=[], help="an image file (repeat for several); real models")
    demo.add_argument("--out", default="vit_lens_report.html", help="report path (default: %(default)s)")
    demo.add_argument("--n-images", type=_positive_int, default=4, help="toy images in the report (default: %(default)s)")
    demo.add_argument("--textspan-images", type=_positive_int, default=2000,
                      help="toy images TextSpan analyses (default: %(default)s)")
    demo.add_argument("--scorecard-images", type=_count, default=64,
                      help="toy model: images for the closing section, the same methods scored on the planted CLIP "
                           "against its known truth (0: leave it out; default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default: %(default)s)")
    demo.set_defaults(run=_demo)
    check = commands.add_parser(
        "check",
        parents=[common],
        help="build a random-weight source model, cache a run and print a per-layer table checked against it",
    )
    check.add_argument("--model", default="open_clip:ViT-B-32", help="open_clip:<arch> or timm:<name> (default: %(default)s)")
    check.add_argument("--batch", type=_positive_int, default=2, help="random images per run (default: %(default)s)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default: %(default)s)")
    check.set_defaults(run=_check)
    sae = commands.add_parser("sae", help="train a sparse autoencoder on the toy CLIP, or write a dashboard of its features")
    sae_commands = sae.add_subparsers(dest="sae_command", required=True)
    train = sae_commands.add_parser("train", parents=[common], help="train an SAE and save it in SAELens's format")
    train.add_argument("--model", default="toy", help="'toy': the built-in toy CLIP on its own world (default)")
    train.add_argument("--hook", default="blocks.2.hook_resid_post", help="the hook point it reads (default: %(default)s)")
    train.add_argument("--architecture", choices=_SAE_ARCHITECTURES, default="topk", help="(default: %(default)s)")
    train.add_argument("--k", type=_sae_k, default=None, help="active features per token, topk / batchtopk")
    train.add_argument("--d-sae", type=_positive_int, default=512, help="number of features (default: %(default)s)")
    train.add_argument("--tokens", choices=_SAE_TOKENS, default="all", help="tokens it reads (default: %(default)s)")
    train.add_argument("--steps", type=_positive_int, default=1000, help="optimiser steps (default: %(default)s)")
    train.add_argument("--batch-tokens", type=_positive_int, default=4096, help="tokens per step (default: %(default)s)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: train_sae's)")
    train.add_argument("--n-images", type=_positive_int, default=2000,
                       help="toy images the activations are streamed from (default: %(default)s)")
    train.add_argument("--out", required=True, help="the folder to save the SAE in")
    train.add_argument("--overwrite", action="store_true", help="replace an SAE already saved in --out")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default: %(default)s)")
    train.set_defaults(run=_sae_train, command="sae train")
    dashboard = sae_commands.add_parser("dashboard", parents=[common],
                                        help="write an offline HTML page of an SAE's features: names, top images")
    dashboard.add_argument("--model", default="toy", help="'toy': the built-in toy CLIP on its own world (default)")
    dashboard.add_argument("--sae", required=True, help="a folder written by `vit-lens sae train` or SAELens")
    dashboard.add_argument("--out", default="sae_dashboard.html", help="the page to write (default: %(default)s)")
    dashboard.add_argument("--features", default=None,
                           help="feature indices, comma-separated (default: the --n-features that vary most)")
    dashboard.add_argument("--n-features", type=_positive_int, default=12, help="(default: %(default)s)")
    dashboard.add_argument("--n-images", type=_positive_int, default=1000, help="toy images (default: %(default)s)")
    dashboard.add_argument("--top-k", type=_positive_int, default=8, help="top images per feature (default: %(default)s)")
    dashboard.add_argument("--image-score", choices=("max", "cls", "mean"), default="max",
                           help="an image's score for a feature, over its tokens (default: %(default)s)")
    dashboard.add_argument("--seed", type=int, default=1)
    dashboard.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default: %(default)s)")
    dashboard.set_defaults(run=_sae_dashboard, command="sae dashboard")
    cache = commands.add_parser(
        "cache", parents=[common],
        help="cache activations / dataset means and covariances over a dataset to resumable shards (torchrun-ready)",
    )
    cache.add_argument("--model", default="toy",
                       help="'toy' (built-in, offline), open_clip:<arch> or timm:<name> (default: %(default)s)")
    cache.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint file for a real model")
    cache.add_argument("--dataset", required=True, help="toy:<n> (n toy-world images) or folder:PATH (image files)")
    cache.add_argument("--hooks", action="append", required=True,
                       help="hook point names, comma-separated or repeated (e.g. blocks.11.hook_resid_post)")
    cache.add_argument("--tokens", type=_cache_tokens, default="all", help=f"{_CACHE_TOKENS} (default: %(default)s)")
    cache.add_argument("--mean", action="store_true", help="also the dataset mean at each hook (float64)")
    cache.add_argument("--covariance", action="store_true", help="also the covariance and second moment (float64)")
    cache.add_argument("--over", choices=("images", "tokens"), default="images",
                       help="statistics over images (per token) or over every token (default: %(default)s)")
    cache.add_argument("--no-activations", action="store_true", help="only the statistics, no cached rows")
    cache.add_argument("--store-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="dtype of the cached rows on disk (default: %(default)s)")
    cache.add_argument("--out", required=True, help="the run's folder; the same command resumes an interrupted run")
    cache.add_argument("--shard-size", type=_positive_int, default=None,
                       help="images per shard (default: about 256 MB of rows per shard)")
    cache.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward (default: %(default)s)")
    cache.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    cache.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="autocast dtype of the forward pass (default: %(default)s)")
    cache.add_argument("--num-workers", type=_count, default=0, help="DataLoader workers for a folder (default: 0)")
    cache.add_argument("--overwrite", action="store_true", help="delete a run already in --out and start again")
    cache.add_argument("--seed", type=int, default=0, help="toy-world seed (default: %(default)s)")
    cache.add_argument("--threads", type=_positive_int, default=2, help="torch threads per process (default: %(default)s)")
    cache.set_defaults(run=_cache)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, CommandError) else f"{type(error).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run ``vit-lens``; returns the exit status (0 done, 1 failed, 2 bad arguments, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"vit-lens {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"vit-lens {args.command}: error: {_one_line(error)}", file=sys.stderr)
        if isinstance(error, CommandError):
            return 2
        print("(add --debug to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
