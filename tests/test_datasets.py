"""The Waterbirds loader on a small folder in the standard layout, written here."""

import numpy as np
import pytest
import torch
from PIL import Image

from vit_lens.loading.datasets import WATERBIRDS_URL, Waterbirds, evenly_spaced, image_batches, subset_tensor

# img_id, img_filename, y, split, place; colour = (10 * img_id, 0, 255 - 10 * img_id)
ROWS = [
    (1, "001.Black_footed_Albatross/a_1.png", 1, 0, 1),
    (2, "001.Black_footed_Albatross/a_2.png", 1, 2, 0),
    (3, "002.Laysan_Albatross/b_3.png", 1, 2, 1),
    (4, "010.Red_winged_Blackbird/c_4.png", 0, 2, 1),
    (5, "010.Red_winged_Blackbird/c_5.png", 0, 1, 0),
    (6, "011.Rusty_Blackbird/d_6.png", 0, 2, 0),
    (7, "011.Rusty_Blackbird/d_7.png", 0, 2, 0),
]


def to_tensor(image):
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture
def root(tmp_path):
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for img_id, name, y, split, place in ROWS:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (10 * img_id, 0, 255 - 10 * img_id)).save(path)
        lines.append(f"{img_id},{name},{y},{split},{place},/b/bamboo_forest/0000{img_id}.jpg")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_test_split_items_labels_and_groups(root):
    data = Waterbirds(root, "test", transform=to_tensor)
    assert len(data) == 5
    assert data.labels.tolist() == [1, 1, 0, 0, 0]
    assert data.places.tolist() == [0, 1, 1, 0, 0]
    assert data.groups.tolist() == [2, 3, 1, 0, 0]  # 2 * y + place
    image, label, group = data[2]  # img_id 4
    assert (label, group) == (0, 1) and image.shape == (3, 4, 6)
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([40 / 255, 0.0, 215 / 255]))
    assert len(Waterbirds(root, 1)) == len(Waterbirds(root, "valid")) == 1
    raw, _, _ = Waterbirds(root, "train")[0]
    assert isinstance(raw, Image.Image) and raw.size == (6, 4)


def test_batches_cover_an_evenly_spaced_subset(root):
    data = Waterbirds(root, "test", transform=to_tensor)
    batches = list(image_batches(data, batch_size=2, limit=3))
    assert len(batches) == 2 and evenly_spaced(5, 3) == [0, 1, 3]
    images, labels, groups = (torch.cat(parts) for parts in zip(*batches))
    assert images.shape == (3, 3, 4, 6)
    assert labels.tolist() == subset_tensor(data.labels, 3).tolist() == [1, 1, 0]
    assert groups.tolist() == subset_tensor(data.groups, 3).tolist() == [2, 3, 0]
    assert len(list(image_batches(data, batch_size=4))) == 2


def test_missing_files_and_bad_arguments_are_explained(root, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="metadata.csv not found") as error:
        Waterbirds(empty)
    assert WATERBIRDS_URL in str(error.value)
    (root / ROWS[3][1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 5 images.*c_4.png"):
        Waterbirds(root, "test")
    assert len(Waterbirds(root, "train")) == 1  # other splits are unaffected
    with pytest.raises(ValueError, match="split must be one of"):
        Waterbirds(root, "validation")
    (root / "metadata.csv").write_text("img_id,img_filename,y,split\n1,a.png,0,2\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['place'\]"):
        Waterbirds(root)
