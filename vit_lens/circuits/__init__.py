"""Circuits: which paths between a ViT's heads and MLPs carry a behaviour.

- :mod:`~vit_lens.circuits.graph`: :class:`CircuitGraph`: senders (input, heads, MLPs), receivers (each
  head's query, key and value inputs, each MLP, the output) and the edges between them, optionally split
  by token group (CLS, registers, patches, regions, or per-image groups such as object patches).
- :mod:`~vit_lens.circuits.edges`: the forward pass with chosen edges patched from a source run
  (counterfactual, mean or zero), which every method below is built on.
- :mod:`~vit_lens.circuits.attribution`: edge scores: :func:`edge_attribution_patching` (EAP),
  :func:`eap_ig` (inputs or activations), :func:`exact_edge_patching`, and the baselines
  :func:`node_attribution_patching` and :func:`random_edge_scores`, as :class:`EdgeScores`.
- :mod:`~vit_lens.circuits.paths`: :func:`path_patching` (sender sweeps along chosen paths) and
  :func:`patch_paths` (one run with named edges patched).
- :mod:`~vit_lens.circuits.evaluation`: MIB's circuit evaluation: :func:`faithfulness_curve` (top-n or
  greedy circuits run with every other edge patched), CPR and CMD, and :func:`evaluate_methods`.
- :mod:`~vit_lens.circuits.discovery`: :func:`acdc` and :func:`acdc_sweep` (Conmy et al.'s greedy edge
  removal, swept over thresholds into EdgeScores) and :func:`learned_edge_mask` (edge pruning).
- :mod:`~vit_lens.circuits.views`: :func:`circuit_figure` (the circuit's graph, edges weighted by score) and
  :func:`edge_map` (where on the image one edge carries its effect, as :class:`EdgeMap`).
- :mod:`~vit_lens.circuits.export`: :func:`to_json` / :func:`from_json` in the EAP-IG / MIB graph layout.

Every method runs on a HookedViT or a HookedCLIP's image tower and turns on the split q/k/v input and MLP
input hooks (``set_use_split_qkv_input``, ``set_use_hook_mlp_in``) only while it runs.
"""

from vit_lens._lazy import lazy_package

__getattr__, __dir__, __all__ = lazy_package(
    __name__,
    {
        "CircuitGraph": ".graph",
        "region_groups": ".graph",
        "EdgeScores": ".attribution",
        "edge_attribution_patching": ".attribution",
        "eap_ig": ".attribution",
        "exact_edge_patching": ".attribution",
        "node_attribution_patching": ".attribution",
        "random_edge_scores": ".attribution",
        "path_patching": ".paths",
        "patch_paths": ".paths",
        "faithfulness_curve": ".evaluation",
        "evaluate_methods": ".evaluation",
        "FaithfulnessCurve": ".evaluation",
        "acdc": ".discovery",
        "acdc_sweep": ".discovery",
        "learned_edge_mask": ".discovery",
        "circuit_figure": ".views",
        "edge_map": ".views",
        "EdgeMap": ".views",
        "to_json": ".export",
        "from_json": ".export",
    },
    ("graph", "edges", "attribution", "paths", "evaluation", "discovery", "views", "export"),
)
