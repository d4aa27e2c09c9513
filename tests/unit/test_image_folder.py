"""raffm.data.load_image_folder (one subfolder of images per label) and ImageDataset.fitted (a model's input)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from raffm.data import ImageDataset, load_image_file, load_image_folder, save_image_file


def _image(path: Path, size: tuple[int, int], mode: str = "RGB", value: int = 200) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_subfolders_are_labels_and_images_become_squares_of_the_first_ones_shorter_side(tmp_path: Path) -> None:
    _image(tmp_path / "cat" / "a.png", (40, 30), value=10)
    _image(tmp_path / "cat" / "b.jpg", (64, 64), value=20)
    _image(tmp_path / "dog" / "nested" / "c.PNG", (30, 50), "L")  # grey among colour: read as colour
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.label_names == ("cat", "dog") and data.labels == [0, 0, 1]
    assert data.images.shape == (3, 3, 30, 30) and data.images.dtype == torch.uint8  # a quarter of float32's bytes
    pixels = data.pixels()
    assert pixels.dtype == torch.float32 and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert torch.allclose(pixels[0, :, 15, 15], torch.tensor([10, 0, 245]) / 255, atol=0.02)
    assert torch.allclose(pixels[2, :, 0, 0], torch.full((3,), 200 / 255))
    assert torch.equal(data.pixels([2, 0]), pixels[[2, 0]])
    job = load_image_folder(tmp_path, label_names=("dog", "bird", "cat"))
    assert job.labels == [2, 2, 0] and job.label_names == ("dog", "bird", "cat")


def test_an_all_grey_folder_has_one_channel_and_large_images_are_capped(tmp_path: Path) -> None:
    _image(tmp_path / "0" / "a.png", (300, 400), "L")
    _image(tmp_path / "1" / "b.png", (28, 28), "L")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (2, 1, 224, 224) and data.label_names == ("0", "1")


def test_a_folder_without_images_or_with_a_broken_one_says_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no images in label subfolders"):
        load_image_folder(tmp_path / "empty")
    _image(tmp_path / "broken" / "cat" / "a.png", (8, 8))
    (tmp_path / "broken" / "cat" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"b.png is not a readable image"):
        load_image_folder(tmp_path / "broken")
    _image(tmp_path / "splits" / "train" / "cat" / "a.png", (8, 8))
    _image(tmp_path / "splits" / "test" / "cat" / "b.png", (8, 8))
    with pytest.raises(ValueError, match=r"holds the splits test, train of a data set, not labels: pass one of them"):
        load_image_folder(tmp_path / "splits")
    assert load_image_folder(tmp_path / "splits" / "train").label_names == ("cat",)
    _image(tmp_path / "foreign" / "fish" / "a.png", (8, 8))
    with pytest.raises(ValueError, match=r"labels \['fish'\] are not among the job's 2 labels"):
        load_image_folder(tmp_path / "foreign", label_names=("cat", "dog"))


def test_fitted_resizes_and_converts_channels_to_the_models_input_a_batch_at_a_time() -> None:
    grey = ImageDataset(torch.rand(2, 1, 8, 8), [0, 1], ("a", "b"))
    colour = grey.fitted(SimpleNamespace(num_channels=3, image_size=16))
    assert colour.images is grey.images and colour.shape == (3, 16, 16)  # fitted as batches are drawn, not held
    assert colour.pixels().shape == (2, 3, 16, 16) and colour.subset([1]).pixels().shape == (1, 3, 16, 16)
    assert torch.equal(colour.pixels()[:, 0], colour.pixels()[:, 2])
    back = colour.fitted(SimpleNamespace(num_channels=1, image_size=8))
    assert back.pixels().shape == (2, 1, 8, 8)
    same = ImageDataset(grey.fitted(SimpleNamespace(num_channels=3, image_size=8)).pixels(), [0, 1], ("a", "b"))
    back = same.fitted(SimpleNamespace(num_channels=1, image_size=8)).pixels()
    assert torch.allclose(back, grey.images, atol=1e-6)  # grey -> colour -> grey (luminance) is the identity
    ramp = ImageDataset(torch.linspace(0, 1, 8).expand(1, 1, 8, 8).contiguous(), [0], ("a",))
    wide = ramp.fitted(SimpleNamespace(num_channels=1, image_size=16)).pixels()
    assert bool((wide[0, 0, 0].diff() >= 0).all()) and abs(float(wide.mean()) - 0.5) < 0.01  # resized, not scrambled
    assert grey.fitted(SimpleNamespace(num_channels=1, image_size=8)) is grey  # already fits: no copy
    assert grey.fitted(SimpleNamespace(num_channels=1, image_size=[4, 6])).pixels().shape == (2, 1, 4, 6)
    with pytest.raises(ValueError, match="the images have 2 channels; the model takes 3"):
        ImageDataset(torch.rand(1, 2, 4, 4), [0], ("a",)).fitted(SimpleNamespace(num_channels=3, image_size=4))
    with pytest.raises(ValueError, match="the images have 3 channels; the model takes 4"):
        ImageDataset(torch.rand(1, 3, 4, 4), [0], ("a",)).fitted(SimpleNamespace(num_channels=4, image_size=4))


def test_bytes_and_floats_give_the_same_pixels() -> None:
    raw = torch.randint(0, 256, (3, 3, 10, 10), dtype=torch.uint8)
    as_bytes = ImageDataset(raw, [0, 1, 0], ("a", "b")).fitted(SimpleNamespace(num_channels=1, image_size=6))
    as_floats = ImageDataset(raw.float() / 255, [0, 1, 0], ("a", "b")).fitted(SimpleNamespace(num_channels=1,
                                                                                              image_size=6))
    assert torch.allclose(as_bytes.pixels(), as_floats.pixels(), atol=1e-6)
    assert as_bytes.images.dtype == torch.uint8  # the bytes stay bytes


def test_fitted_images_train_a_vit_of_another_size() -> None:
    from raffm.models import model_from_config, small_vit_config
    from raffm.training import LocalConfig, train_local

    data = ImageDataset(torch.from_numpy(np.random.default_rng(0).random((8, 1, 20, 20), dtype=np.float32)),
                        [0, 1] * 4, ("a", "b"))
    model = model_from_config(small_vit_config(num_labels=2, image_size=16, num_channels=3),
                              task="image-classification")
    with pytest.raises(ValueError, match="channel dimension"):  # as read, the grey images do not fit this model
        train_local(model, data, None, LocalConfig(batch_size=4, seq_len=16, lr=1e-3, local_steps=1))
    result = train_local(model, data.fitted(model.config), None,
                         LocalConfig(batch_size=4, seq_len=16, lr=1e-3, local_steps=1))
    assert result.steps == 1
    assert result.label_counts == (4, 4)  # its data's labels, per label id


def test_image_files_keep_bytes_as_bytes_and_refuse_normalised_values(tmp_path: Path) -> None:
    data = ImageDataset(torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8), [0, 2, 1, 2], ("0", "1", "2"))
    back = load_image_file(save_image_file(data, tmp_path / "share.pt"))
    assert back.images.dtype == torch.uint8 and torch.equal(back.images, data.images) and back.labels == data.labels
    np.savez(tmp_path / "ints.npz", images=data.images.numpy().astype(np.int64), labels=np.array(data.labels))
    assert torch.equal(load_image_file(tmp_path / "ints.npz").pixels(), data.pixels())
    np.savez(tmp_path / "floats.npz", images=data.pixels().numpy(), labels=np.array(data.labels))
    assert load_image_file(tmp_path / "floats.npz").images.dtype == torch.float32
    np.savez(tmp_path / "normalised.npz", images=(data.pixels().numpy() - 0.5) / 0.25, labels=np.array(data.labels))
    with pytest.raises(ValueError, match=r"image values run from -[\d.]+ to [\d.]+; store pixels as bytes \(0-255\)"):
        load_image_file(tmp_path / "normalised.npz")
