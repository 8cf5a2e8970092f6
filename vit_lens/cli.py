"""The ``vit-lens`` command. Heavy libraries are imported inside the subcommands, so ``--help`` is instant."""

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch

    from vit_lens import HookedViT
    from vit_lens.loading import load_source_model, source_residual_stream

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-lens", description="Mechanistic interpretability for vision transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="build a random-weight model, cache a run and print a per-layer table checked against the source",
    )
    demo.add_argument("--model", default="open_clip:ViT-B-32", help="open_clip:<arch> or timm:<name> (default: %(default)s)")
    demo.add_argument("--batch", type=int, default=2, help="random images per run (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
