"""The dataset runner: one streamed, resumable, distributed pass of a model over a dataset.

Every dataset-level job (cached activations, dataset means and covariances, and later TextSpan head
outputs, decomposition terms and SAE buffers) is a list of *recorders* run by :func:`run_dataset`:

>>> from vit_lens.runner import Activations, Covariance, Mean, RunResult, run_dataset
>>> result = run_dataset(model, dataset, "runs/val", [
...     Activations([f"blocks.{l}.hook_resid_post" for l in range(12)], tokens="cls"),
...     Mean("blocks.11.hook_resid_post", tokens="all", over="images"),
... ], shard_size=1024, batch_size=64, device="cuda", dtype="bfloat16")  # doctest: +SKIP
>>> result.mean("blocks.11.hook_resid_post")                    # float64 [pos, d_model]  # doctest: +SKIP
>>> rows = result.activations("blocks.5.hook_resid_post", rows="tokens")   # memory-mapped  # doctest: +SKIP
>>> for batch in rows.loader(4096, shuffle=True, seed=0): ...    # doctest: +SKIP

The public API:

- :func:`run_dataset(model, data, out_dir, record, *, shard_size, batch_size, device, dtype, num_workers,
  overwrite, verify_checksums, progress) <vit_lens.runner.run.run_dataset>` -> :class:`RunResult`.
  ``data``: a Dataset, an in-order DataLoader, a tensor of images or an iterable of image batches.
  Shard ``k`` holds images ``[k * shard_size, (k + 1) * shard_size)``. Under ``torchrun`` rank ``r``
  computes the shards with ``k % world_size == r``; reductions are all-reduced; rank 0 writes the
  manifest. A second call with the same settings and weights resumes. ``out_dir=None`` keeps the
  reductions (``Mean``, ``Covariance``) in memory and returns an :class:`InMemoryResult`.
- Recorders (:mod:`vit_lens.runner.recorders`): :class:`Activations` (rows at hooks, a token
  selection, a stored dtype), :class:`Mean`, :class:`Covariance` (:class:`Moments`: float64 sums over
  images or tokens), and the :class:`Recorder` protocol for new ones: ``name``, ``hooks``, ``tokens``,
  ``settings()``, ``rows(activations, images)`` -> per-image tensors to write,
  ``partials(activations, images)`` -> float64 sums that add over batches / shards / ranks,
  ``finalize(totals)`` -> results.
- Read-back (:mod:`vit_lens.runner.readback`): :class:`RunResult` (``mean``, ``covariance``,
  ``second_moment``, ``count``, ``reductions``, ``activations(hook, rows='images'|'tokens')``,
  ``shard(k)``, ``verify()``) and :class:`ShardedRows` (a memory-mapped torch Dataset with
  ``rows(indices)`` and a seeded ``loader(batch_size, shuffle=True, seed=0)``).
- :func:`weights_fingerprint` (:mod:`vit_lens.runner.storage`), :class:`ImageFiles` (a folder of images).

Files: ``manifest.json``; ``shard_000000.safetensors`` (rows ``'<recorder>/<hook>'`` and float64
partial sums ``'partial/<recorder>/<hook>/<sum>'``) with its record ``shard_000000.json`` (size,
SHA-256, image range); ``reductions.safetensors``. docs/runner.md explains the format and resume rules.
"""

from vit_lens.runner.data import ImageFiles
from vit_lens.runner.readback import InMemoryResult, RunResult, ShardedRows
from vit_lens.runner.recorders import Activations, Covariance, Mean, Moments, Recorder
from vit_lens.runner.run import run_dataset
from vit_lens.runner.storage import weights_fingerprint

__all__ = ["Activations", "Covariance", "ImageFiles", "InMemoryResult", "Mean", "Moments", "Recorder", "RunResult",
           "ShardedRows", "run_dataset", "weights_fingerprint"]
