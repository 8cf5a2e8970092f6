"""vit_lens.runner: shards equal to run_with_cache, float64 moments equal torch's, resume after SIGKILL, torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vit_lens.runner import (Activations, Covariance, InMemoryResult, Mean, RunResult, run_dataset,
                             weights_fingerprint)
from vit_lens.toy import ToyWorld, load_toy_clip

ROOT = Path(__file__).resolve().parents[1]
RESID = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]


@pytest.fixture(scope="module")
def clip():
    torch.set_num_threads(1)
    return load_toy_clip()


@pytest.fixture(scope="module")
def images():
    return ToyWorld(seed=3).sample(150).images


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VIT_LENS_PROGRESS": "0"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vit_lens.cli", "cache", "--threads", "1", *args]


def test_cached_activations_equal_run_with_cache(clip, images, tmp_path):
    """Every token selection, with batches (20) that do not divide shards (48) or the dataset (150)."""
    tower = clip.vision
    selections = {"cls": 0, "patches": (tower.cfg.n_prefix_tokens, None), "picked": [3, 0, 64], "all": None}
    record = [Activations(RESID[1:3], tokens, name=name) for name, tokens in
              [("cls", "cls"), ("patches", "patches"), ("picked", [3, 0, 64]), ("all", "all")]]
    result = run_dataset(clip, images, tmp_path, record, shard_size=48, batch_size=20, progress=False)
    assert (result.n_images, len(result.shards), result.shard_size) == (150, 4, 48)
    for name, pos_slice in selections.items():
        with torch.no_grad():
            _, cache = tower.run_with_cache(images, names_filter=RESID[1:3], pos_slice=pos_slice)
        for hook in RESID[1:3]:
            rows = result.activations(hook, name)
            assert len(rows) == 150
            torch.testing.assert_close(rows.rows(range(150)), cache[hook], rtol=0, atol=1e-6)
    assert result.activations(RESID[1], "cls")[0].shape == (1, 128)
    assert result.activations(RESID[1], "picked", rows="tokens").rows([0, 1, 2]).shape == (3, 128)


def test_moments_equal_torch(clip, images, tmp_path):
    record = [Mean(RESID[2], "all", over="images"), Covariance(RESID[2], "patches", over="tokens"),
              Covariance(RESID[0], "cls", over="images", name="cls_cov")]
    result = run_dataset(clip, images, tmp_path, record, shard_size=64, batch_size=32, progress=False)
    with torch.no_grad():
        _, cache = clip.vision.run_with_cache(images, names_filter=RESID)
    whole = cache[RESID[2]].double()
    torch.testing.assert_close(result.mean(RESID[2], "mean"), whole.mean(0), rtol=0, atol=1e-10)
    assert result.count(RESID[2], "mean") == 150
    patches = whole[:, clip.vision.cfg.n_prefix_tokens:].flatten(0, 1)
    torch.testing.assert_close(result.covariance(RESID[2]), torch.cov(patches.T), rtol=0, atol=1e-9)
    torch.testing.assert_close(result.second_moment(RESID[2]), patches.T @ patches / len(patches), rtol=0, atol=1e-9)
    assert result.count(RESID[2], "covariance") == 150 * 64
    cls = cache[RESID[0]][:, 0].double()
    torch.testing.assert_close(result.covariance(RESID[0]), torch.cov(cls.T), rtol=0, atol=1e-9)
    assert result.mean(RESID[0]).shape == (1, 128)
    with pytest.raises(KeyError, match="pass recorder="):
        result.mean(RESID[2])  # held by two recorders


def test_any_input_form_gives_the_same_shards(clip, images, tmp_path):
    """A tensor, a Dataset of (image, label), an in-order DataLoader, and a stream of uneven batches."""
    record = [Activations(RESID[3], "cls"), Mean(RESID[3], "cls")]
    reference = run_dataset(clip, images, tmp_path / "tensor", record, shard_size=40, batch_size=10, progress=False)
    labelled = TensorDataset(images, torch.arange(150))
    forms = {"dataset": labelled, "loader": DataLoader(labelled, batch_size=10),
             "stream": [images[i:i + 7] for i in range(0, 150, 7)]}
    for name, data in forms.items():
        result = run_dataset(clip, data, tmp_path / name, record, shard_size=40, batch_size=10, progress=False)
        rows = result.activations(RESID[3]).rows(range(150))
        if name == "stream":  # other forward batches (cut at 7 and at shards): equal up to float rounding
            torch.testing.assert_close(rows, reference.activations(RESID[3]).rows(range(150)), rtol=0, atol=1e-5)
        else:
            assert torch.equal(rows, reference.activations(RESID[3]).rows(range(150))), name
        assert result.n_images == 150 and len(result.shards) == 4
    with pytest.raises(ValueError, match="in order"):
        run_dataset(clip, DataLoader(labelled, shuffle=True), tmp_path / "shuffled", record, progress=False)


def _row_keys(rows: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in rows]


def test_readback_shuffle_is_a_seeded_permutation(clip, images, tmp_path):
    result = run_dataset(clip, images, tmp_path, Activations(RESID[1], "patches"), shard_size=32, progress=False)
    rows = result.activations(RESID[1], rows="tokens")
    assert len(rows) == 150 * 64
    sequential = torch.cat(list(rows.loader(1000, shuffle=False)))
    assert torch.equal(sequential, result.activations(RESID[1]).rows(range(150)).flatten(0, 1))
    position = {key: i for i, key in enumerate(_row_keys(sequential))}
    assert len(position) == len(sequential)  # every row distinct, so the permutation can be read off
    shuffled = torch.cat(list(rows.loader(1000, shuffle=True, seed=5)))
    order = [position[key] for key in _row_keys(shuffled)]
    assert sorted(order) == list(range(len(sequential))) and order != sorted(order)
    assert torch.equal(torch.cat(list(rows.loader(1000, shuffle=True, seed=5))), shuffled)
    assert not torch.equal(torch.cat(list(rows.loader(1000, shuffle=True, seed=6))), shuffled)
    for index in [0, 63, 64, 2047, 2048, 9599, -1]:  # across shard boundaries (2048 rows per shard)
        assert torch.equal(rows[index], sequential[index])
    assert torch.equal(rows.rows([9599, 5, 2048]), sequential[[9599, 5, 2048]])
    with pytest.raises(IndexError):
        rows[9600]


def test_bfloat16_storage_and_autocast(clip, images, tmp_path):
    with torch.no_grad():
        _, cache = clip.vision.run_with_cache(images[:40], names_filter=RESID[2], pos_slice=0)
    result = run_dataset(clip, images[:40], tmp_path / "bf16", Activations(RESID[2], "cls", store_dtype="bfloat16"),
                         shard_size=16, progress=False)
    stored = result.activations(RESID[2]).rows(range(40))
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, cache[RESID[2]].to(torch.bfloat16))
    autocast = run_dataset(clip, images[:40], tmp_path / "autocast", Activations(RESID[2], "cls"), dtype="bfloat16",
                           shard_size=16, progress=False)
    rows = autocast.activations(RESID[2]).rows(range(40))
    error = (rows.float() - cache[RESID[2]]).norm() / cache[RESID[2]].norm()
    assert 0 < error < 0.05  # bfloat16 arithmetic: close to float32, not equal


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("shard_*.safetensors")}


def test_damaged_leftover_and_unlisted_shards_are_never_read(clip, images, tmp_path):
    record = [Activations(RESID[1], "cls"), Mean(RESID[1])]
    first = run_dataset(clip, images, tmp_path, record, shard_size=32, progress=False)
    expected = first.activations(RESID[1]).rows(range(150))
    expected_mean = first.mean(RESID[1])
    before = _mtimes(tmp_path)

    # A temporary file left by a killed writer is removed, never listed.
    (tmp_path / ".shard_000001.safetensors.999.tmp").write_bytes(b"partial")
    # Same size, other bytes: only the checksum sees it.
    other = tmp_path / "shard_000003.safetensors"
    data = bytearray(other.read_bytes())
    data[-1] ^= 0xFF
    other.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard_000003.safetensors does not match its recorded SHA-256"):
        RunResult(tmp_path).verify()
    # A truncated shard: opening the run names it; resuming recomputes it.
    shard = tmp_path / "shard_000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="shard_000001.safetensors has .* bytes"):
        RunResult(tmp_path)
    # An unlisted shard: its file exists but the record that marks it finished does not.
    (tmp_path / "shard_000002.json").unlink()
    time.sleep(0.01)
    with pytest.warns(UserWarning, match="computing shard"):
        again = run_dataset(clip, images, tmp_path, record, progress=False)
    after = _mtimes(tmp_path)
    assert {name for name in before if after[name] != before[name]} == {
        "shard_000001.safetensors", "shard_000002.safetensors", "shard_000003.safetensors"}
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.equal(again.activations(RESID[1]).rows(range(150)), expected)
    assert torch.equal(again.mean(RESID[1]), expected_mean)
    again.verify()


def test_out_dir_of_another_run_is_refused(clip, images, tmp_path):
    record = [Activations(RESID[1], "cls")]
    run_dataset(clip, images[:40], tmp_path, record, shard_size=16, progress=False)
    with pytest.raises(ValueError, match="other settings .*tokens"):
        run_dataset(clip, images[:40], tmp_path, [Activations(RESID[1], "all")], progress=False)
    with pytest.raises(ValueError, match="shard_size=16"):
        run_dataset(clip, images[:40], tmp_path, record, shard_size=8, progress=False)
    with pytest.raises(ValueError, match="over 40 images"):
        run_dataset(clip, images[:50], tmp_path, record, progress=False)
    other = load_toy_clip()
    with torch.no_grad():
        other.vision.blocks[0].attn.W_Q.mul_(1.01)
    with pytest.raises(ValueError, match="fingerprint"):
        run_dataset(other, images[:40], tmp_path, record, progress=False)
    stored = RunResult(tmp_path).weights_sha256
    fresh = run_dataset(other, images[:40], tmp_path, record, overwrite=True, progress=False)
    assert fresh.weights_sha256 == weights_fingerprint(other.vision) != stored
    assert len(fresh.shards) == 1  # the default shard size holds all 40


def test_bad_input_is_named(clip, images, tmp_path):
    with pytest.raises(ValueError, match="no hook point 'blocks.9.hook_resid_post'"):
        run_dataset(clip, images, tmp_path, Activations("blocks.9.hook_resid_post"), progress=False)
    with pytest.raises(ValueError, match="tokens='middle'"):
        run_dataset(clip, images, tmp_path, Activations(RESID[0], "middle"), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        run_dataset(clip, images, tmp_path, Activations(RESID[0], [0, 65]), progress=False)
    with pytest.raises(ValueError, match="repeat"):
        run_dataset(clip, images, tmp_path, [Mean(RESID[0]), Mean(RESID[1])], progress=False)
    with pytest.raises(ValueError, match="dtype='float8'"):
        run_dataset(clip, images, tmp_path, Mean(RESID[0]), dtype="float8", progress=False)
    with pytest.raises(TypeError, match="no recorder"):
        run_dataset(clip, images, tmp_path, ["blocks.0.hook_resid_post"], progress=False)
    with pytest.raises(FileNotFoundError, match="No run"):
        RunResult(tmp_path / "nothing")


def test_cli_errors_are_directed(tmp_path, capsys):
    from vit_lens.cli import main

    bad = [(["--dataset", "imagenet", "--hooks", RESID[0]], "use toy:<n>"),
           (["--dataset", "toy:8", "--hooks", "blocks.7.hook_resid_post"], "no hook point"),
           (["--dataset", "toy:8", "--hooks", RESID[0], "--tokens", "0,99"], "out of range"),
           (["--dataset", "toy:8", "--hooks", RESID[0], "--no-activations"], "add --mean")]
    for args, message in bad:
        assert main(["cache", *args, "--out", str(tmp_path / "run")]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "run").exists()


def test_cli_killed_midway_resumes_to_identical_results(clip, tmp_path):
    args = ["--dataset", "toy:512", "--hooks", ",".join(RESID), "--tokens", "all", "--mean", "--shard-size", "16",
            "--batch-size", "16"]
    out = tmp_path / "killed"
    process = subprocess.Popen(_cli(*args, "--out", str(out)), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    listed = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            listed = json.loads((out / "manifest.json").read_text())["shards"]
        except (OSError, ValueError):
            listed = []
        if listed:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert listed and process.returncode == -signal.SIGKILL and not manifest["complete"]
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.safetensors")
                if (out / p.name.replace(".safetensors", ".json")).exists()}
    assert 1 <= len(finished) < 32
    subprocess.run(_cli(*args, "--out", str(out)), env=_env(), cwd=ROOT, check=True, capture_output=True)
    kept = {name for name, mtime in finished.items() if (out / name).stat().st_mtime_ns == mtime}
    assert kept == set(finished)  # finished shards were not recomputed

    reference = run_dataset(clip, ToyWorld(seed=0).sample(512).images, tmp_path / "whole",
                            [Activations(RESID, "all"), Mean(RESID, "all")], shard_size=16, batch_size=16,
                            progress=False)
    resumed = RunResult(out)
    assert [r["sha256"] for r in resumed.shards] == [r["sha256"] for r in reference.shards]
    for hook in RESID:
        assert torch.equal(resumed.mean(hook), reference.mean(hook))


def test_torchrun_two_processes_equal_one(tmp_path):
    args = ["--dataset", "toy:200", "--hooks", f"{RESID[1]},{RESID[3]}", "--tokens", "cls", "--mean", "--covariance",
            "--over", "tokens", "--shard-size", "32", "--batch-size", "16", "--device", "cpu"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), env=_env(), cwd=ROOT, check=True, capture_output=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, *_cli(*args, "--out", str(tmp_path / "two"))[1:]], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = RunResult(tmp_path / "one"), RunResult(tmp_path / "two")
    assert [r["sha256"] for r in one.shards] == [r["sha256"] for r in two.shards]  # bit-identical shards
    assert two.manifest["world_size"] == 2 and len(two.shards) == 7
    for hook in (RESID[1], RESID[3]):
        assert torch.equal(one.activations(hook).rows(range(200)), two.activations(hook).rows(range(200)))
        torch.testing.assert_close(two.mean(hook, "mean"), one.mean(hook, "mean"), rtol=0, atol=1e-12)
        torch.testing.assert_close(two.covariance(hook), one.covariance(hook), rtol=0, atol=1e-10)
        assert two.count(hook, "mean") == 200


def test_a_grown_stream_recomputes_the_short_last_shard(clip, images, tmp_path):
    """A stream's short last shard was its end last time; a longer stream goes on past it (no gap)."""
    record = [Activations(RESID[2], "cls"), Mean(RESID[2], "cls")]
    stream = [images[i:i + 2] for i in range(0, 14, 2)]
    run_dataset(clip, iter(stream[:3]), tmp_path, record, shard_size=4, batch_size=2, progress=False)
    short = tmp_path / "shard_000001.safetensors"
    ended_at = short.stat().st_mtime_ns
    same = run_dataset(clip, iter(stream[:3]), tmp_path, record, batch_size=2, progress=False)  # nothing to redo
    assert short.stat().st_mtime_ns == ended_at and same.n_images == 6
    grown = run_dataset(clip, iter(stream), tmp_path, record, batch_size=2, progress=False)
    assert grown.n_images == 14 and [r["n_images"] for r in grown.shards] == [4, 4, 4, 2]
    reference = run_dataset(clip, images[:14], tmp_path / "whole", record, shard_size=4, batch_size=2, progress=False)
    assert torch.equal(grown.activations(RESID[2]).rows(range(14)), reference.activations(RESID[2]).rows(range(14)))
    torch.testing.assert_close(grown.mean(RESID[2]), reference.mean(RESID[2]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"stream of 6 images, which is shorter than the run .* shards \[1, 2, 3\]"):
        run_dataset(clip, iter(stream[:3]), tmp_path, record, batch_size=2, progress=False)
    assert RunResult(tmp_path).n_images == 14  # the refused shorter pass left the finished run as it was


def test_in_memory_reductions_equal_the_on_disk_run(clip, images, tmp_path):
    record = [Mean(RESID[1], "all", over="images"), Covariance(RESID[3], "patches", over="tokens")]
    on_disk = run_dataset(clip, images, tmp_path, record, shard_size=48, batch_size=20, progress=False)
    in_memory = run_dataset(clip, images, record=record, shard_size=48, batch_size=20, progress=False)
    assert isinstance(in_memory, InMemoryResult)
    assert sorted(in_memory.reductions) == sorted(on_disk.reductions)
    for key, value in on_disk.reductions.items():
        assert torch.equal(in_memory.reductions[key], value), key  # the same sums in the same order: the same bits
    assert in_memory.count(RESID[3]) == 150 * 64 and in_memory.n_images == 150
    torch.testing.assert_close(in_memory.covariance(RESID[3]), on_disk.covariance(RESID[3]), rtol=0, atol=0)
    streamed = run_dataset(clip, (images[i:i + 7] for i in range(0, 150, 7)), record=record[:1], progress=False)
    torch.testing.assert_close(streamed.mean(RESID[1]), on_disk.mean(RESID[1]), rtol=0, atol=1e-5)
    assert streamed.n_images == 150
    with pytest.raises(ValueError, match=r"out_dir=None\) keeps only reductions .*'activations': \['blocks.1"):
        run_dataset(clip, images, record=[Activations(RESID[1], "cls"), Mean(RESID[1])], progress=False)
    with pytest.raises(ValueError, match="keeps only reductions"):
        in_memory.activations(RESID[1])
    with pytest.raises(ValueError, match="overwrite=True"):
        run_dataset(clip, images, record=record, overwrite=True, progress=False)


def test_accelerate_launch_two_processes_equal_one(tmp_path):
    """`accelerate launch --multi_gpu` starts torch.distributed's launcher, which the runner joins (gloo on CPU)."""
    pytest.importorskip("accelerate")
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous (accelerate's default 29500 may be taken)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--dataset", "toy:96", "--hooks", RESID[2], "--tokens", "cls", "--mean", "--shard-size", "32",
            "--batch-size", "16", "--device", "cpu"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), env=_env(), cwd=ROOT, check=True, capture_output=True)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m"]
    env = {**_env(), "HF_HOME": str(tmp_path / "hf_home")}  # no accelerate config file: the flags alone
    done = subprocess.run([*launcher, *_cli(*args, "--out", str(tmp_path / "two"))[2:]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = RunResult(tmp_path / "one"), RunResult(tmp_path / "two")
    assert two.manifest["world_size"] == 2 and len(two.shards) == 3
    assert [r["sha256"] for r in one.shards] == [r["sha256"] for r in two.shards]
    torch.testing.assert_close(two.mean(RESID[2]), one.mean(RESID[2]), rtol=0, atol=1e-12)


def test_a_failed_shard_write_is_raised_in_the_caller(clip, images, tmp_path, monkeypatch):
    """Shards are written on a background thread; its error must reach run_dataset's caller, not vanish."""
    from vit_lens.runner import storage

    written = storage.write_tensors

    def disk_full_on_shard_1(path, tensors, metadata=None):
        if path.name == "shard_000001.safetensors":
            raise OSError(28, "No space left on device")
        return written(path, tensors, metadata)

    monkeypatch.setattr(storage, "write_tensors", disk_full_on_shard_1)
    with pytest.raises(OSError, match="No space left"):
        run_dataset(clip, images[:64], tmp_path, Activations(RESID[0], "cls"), shard_size=16, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard_*.json")) == ["shard_000000.json"]  # stopped at the failure
    monkeypatch.setattr(storage, "write_tensors", written)
    resumed = run_dataset(clip, images[:64], tmp_path, Activations(RESID[0], "cls"), progress=False)
    assert len(resumed.shards) == 4


STATISTICS_SCRIPT = '''
import os
import sys
import torch
from vit_lens.intervene.statistics import compute_hook_statistics
from vit_lens.toy import ToyWorld, load_toy_clip

torch.set_num_threads(1)
images = ToyWorld(seed=0).sample(100).images
batches = [images[i:i + 16] for i in range(0, 100, 16)]
stats = compute_hook_statistics(load_toy_clip(), batches, ["blocks.1.hook_resid_post", "blocks.3.attn.hook_z"],
                                variance=True, per_position=False, progress=False)
stats.save(f"{sys.argv[1]}/stats_{os.environ.get('RANK', '0')}.safetensors")
'''


def test_hook_statistics_under_torchrun_equal_one_process(clip, tmp_path):
    """compute_hook_statistics is a runner pass: under torchrun each rank takes its shards and the sums are
    all-reduced, so every rank returns the one-process statistics."""
    from vit_lens.intervene.statistics import HookStatistics
    from vit_lens.model.hooked_vit import image_tower

    script = tmp_path / "stats.py"
    script.write_text(STATISTICS_SCRIPT)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=_env(), cwd=ROOT, check=True,
                   capture_output=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, str(script), str(tmp_path / "two")], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one = HookStatistics.load(tmp_path / "one" / "stats_0.safetensors")
    assert one.count("blocks.1.hook_resid_post") == 100 * image_tower(clip).cfg.n_ctx  # pooled over the tokens
    for rank in (0, 1):
        two = HookStatistics.load(tmp_path / "two" / f"stats_{rank}.safetensors")
        assert two.names == one.names
        for name in one.names:
            assert two.count(name) == one.count(name), (rank, name)
            torch.testing.assert_close(two.mean(name), one.mean(name), rtol=0, atol=1e-12)
            torch.testing.assert_close(two.var(name), one.var(name), rtol=1e-10, atol=1e-12)
