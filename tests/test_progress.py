"""The one progress helper: silent when asked, a rank label per process, no widget outside a kernel."""

import io

from tqdm.std import tqdm as text_tqdm

from vit_lens.utils.progress import progress


def test_iterates_and_counts():
    bar = progress(range(4), desc="x", enabled=False)
    assert list(bar) == [0, 1, 2, 3]
    assert bar.total == 4


def test_disabled_bar_prints_nothing():
    out = io.StringIO()
    bar = progress(total=3, desc="quiet", enabled=False)
    bar.file = out
    with bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_environment_silences_every_bar(monkeypatch, capsys):
    monkeypatch.setenv("VIT_LENS_PROGRESS", "0")
    assert sum(progress(range(3), desc="env")) == 3
    assert capsys.readouterr().err == ""


def test_bar_is_drawn_when_enabled(monkeypatch, capsys):
    monkeypatch.delenv("VIT_LENS_PROGRESS", raising=False)
    for _ in progress(range(2), desc="shown", unit="batch"):
        pass
    err = capsys.readouterr().err
    assert "shown" in err and "2/2" in err


def test_one_labelled_bar_per_rank(monkeypatch, capsys):
    monkeypatch.delenv("VIT_LENS_PROGRESS", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with progress(total=5, desc="cache") as bar:
        assert abs(bar.pos) == 1  # rank 1 draws on its own line
        bar.update(5)
    assert "[rank 1] cache" in capsys.readouterr().err


def test_text_bar_outside_a_kernel():
    assert isinstance(progress(total=1, enabled=False), text_tqdm)
    assert type(progress(total=1, enabled=False)).__module__ == "tqdm.std"
