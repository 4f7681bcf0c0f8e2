"""mmgen_pytorch.data: image folders and dict-row datasets, the ADM centre crop against numpy references,
the flip, captions, and every refused input (the message names the argument or the file)."""

import csv
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmgen_pytorch._utils import install_hint
from mmgen_pytorch.data import (NO_LABEL, CaptionTokenizer, HFImageDataset, ImageFolderDataset, StackFields,
                                adm_center_crop, random_horizontal_flip, to_tensor_image)
from mmgen_pytorch.data.images import uint8_to_images


def noise_image(width, height, seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def save_images(folder, names, size=(12, 10)):
    for index, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(*size, seed=index).save(path)


def char_codes(text):
    return [ord(char) for char in text]


def pixels_of(tensor):
    """[3, H, W] in [-1, 1] back to uint8 [H, W, 3]."""
    return (tensor.permute(1, 2, 0).numpy() * 127.5 + 127.5).round().astype(np.uint8)


# --- the centre crop ---------------------------------------------------------------------------------


def halve(pixels):
    """A 2x2 box average as Pillow's separable BOX resize rounds it: pairs of columns, then pairs of rows,
    each mean rounded half up to an integer."""
    pixels = pixels.astype(np.int64)
    columns = (pixels[:, 0::2] + pixels[:, 1::2] + 1) // 2
    return ((columns[0::2] + columns[1::2] + 1) // 2).astype(np.uint8)


@pytest.mark.parametrize("width, height, resolution, top, left", [
    (24, 16, 16, 0, 4),   # landscape, even margin
    (16, 27, 16, 5, 0),   # portrait, odd margin (floor: the extra row is dropped at the bottom)
    (16, 25, 16, 4, 0),
    (9, 9, 9, 0, 0),      # already the resolution: unchanged
])
def test_crop_without_resizing_is_the_centre_slice(width, height, resolution, top, left):
    image = noise_image(width, height)
    expected = np.asarray(image)[top:top + resolution, left:left + resolution]
    assert np.array_equal(np.asarray(adm_center_crop(image, resolution)), expected)


def test_crop_halves_by_box_averaging_while_the_short_side_is_twice_the_resolution():
    image = noise_image(96, 64)  # 64 -> 32 -> 16 (short sides 64 and 32 are >= 2 * 16), then no resize
    expected = halve(halve(np.asarray(image)))[:, 4:20]
    assert np.array_equal(np.asarray(adm_center_crop(image, 16)), expected)


@pytest.mark.parametrize("width, height, resolution, steps, top, left", [
    # steps worked out by hand from the rule: halve (floor) while short >= 2r, then bicubic to short == r
    (67, 35, 8, [((33, 17), Image.BOX), ((16, 8), Image.BOX)], 0, 4),
    (10, 7, 16, [((23, 16), Image.BICUBIC)], 0, 3),            # smaller than the resolution: enlarged
    (50, 30, 16, [((27, 16), Image.BICUBIC)], 0, 5),            # 50 * 16 / 30 = 26.67 -> 27
    (30, 50, 16, [((16, 27), Image.BICUBIC)], 5, 0),            # portrait
    (100, 62, 16, [((50, 31), Image.BOX), ((26, 16), Image.BICUBIC)], 0, 5),  # 31 < 32 stops; 50 * 16 / 31 = 25.8
    (11, 6, 9, [((16, 9), Image.BICUBIC)], 0, 3),               # 11 * 1.5 = 16.5 -> 16 (Python's round: half to even)
])
def test_crop_resizes_then_cuts_the_centre(width, height, resolution, steps, top, left):
    image = noise_image(width, height)
    reference = image
    for size, resample in steps:
        reference = reference.resize(size, resample=resample)
    expected = np.asarray(reference)[top:top + resolution, left:left + resolution]
    got = np.asarray(adm_center_crop(image, resolution))
    assert got.shape == (resolution, resolution, 3)
    assert np.array_equal(got, expected)


def test_to_tensor_image_maps_bytes_linearly_to_minus_one_one():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([pixels, 255 - pixels, pixels.T], axis=-1))
    tensor = to_tensor_image(image)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    expected = torch.from_numpy(np.asarray(image).astype(np.float64) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
    assert tensor.min() == -1 and tensor.max() == 1


def test_non_rgb_images_are_converted():
    grey = to_tensor_image(noise_image(5, 4, mode="L"))
    assert grey.shape == (3, 4, 5) and torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    rgba = noise_image(5, 4, mode="RGBA")
    assert torch.equal(to_tensor_image(rgba), to_tensor_image(rgba.convert("RGB")))


# --- the flip ----------------------------------------------------------------------------------------


def test_random_flip_mirrors_half_the_time_and_repeats_with_the_seed(tmp_path):
    save_images(tmp_path, ["a.png"], size=(8, 8))
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    plain = to_tensor_image(Image.open(tmp_path / "a.png").convert("RGB"))

    def flips(seed):
        torch.manual_seed(seed)
        images = [dataset[0]["image"] for _ in range(400)]
        assert all(torch.equal(image, plain) or torch.equal(image, plain.flip(-1)) for image in images)
        return [not torch.equal(image, plain) for image in images]

    first = flips(0)
    assert first == flips(0) and first != flips(1)
    assert 0.4 < sum(first) / len(first) < 0.6  # 4 standard deviations of a fair coin over 400 draws
    assert all(torch.equal(ImageFolderDataset(tmp_path, resolution=8, random_flip=False)[0]["image"], plain)
               for _ in range(20))


def test_flip_seeding_works_in_dataloader_workers(tmp_path):
    save_images(tmp_path, [f"{index}.png" for index in range(16)], size=(8, 8))
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    plain = torch.stack([ImageFolderDataset(tmp_path, resolution=8, random_flip=False)[i]["image"] for i in range(16)])

    def flipped(seed):
        loader = DataLoader(dataset, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(seed))
        images = torch.cat([batch["image"] for batch in loader])
        return [not torch.equal(image, row) for image, row in zip(images, plain)]

    assert flipped(3) == flipped(3)
    assert flipped(3) != flipped(4)


def test_random_horizontal_flip_takes_a_generator():
    image = torch.arange(6.0).view(1, 2, 3)
    draws = [random_horizontal_flip(image, generator=torch.Generator().manual_seed(5)) for _ in range(3)]
    assert all(torch.equal(draw, draws[0]) for draw in draws)
    assert torch.equal(random_horizontal_flip(image, p=1.0), image.flip(-1))
    assert torch.equal(random_horizontal_flip(image, p=0.0), image)


# --- folders -----------------------------------------------------------------------------------------


def test_class_folders_give_sorted_labels(tmp_path):
    save_images(tmp_path, ["zebra/1.png", "cat/b.jpg", "cat/a.png", "cat/deeper/c.PNG", "dog/x.bmp", ".hidden/y.png",
                           "cat/.z.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert dataset.classes == ["cat", "dog", "zebra"]
    assert dataset.class_to_index == {"cat": 0, "dog": 1, "zebra": 2}
    files = [(dataset.relative_path(path), label) for path, label in dataset.samples]
    assert files == [("cat/a.png", 0), ("cat/b.jpg", 0), ("cat/deeper/c.PNG", 0), ("dog/x.bmp", 1), ("zebra/1.png", 2)]
    assert [int(dataset[i]["label"]) for i in range(len(dataset))] == [0, 0, 0, 1, 2]
    item = dataset[3]
    assert set(item) == {"image", "label"} and item["image"].shape == (3, 8, 8) and item["label"].dtype == torch.long
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    assert batch["image"].shape == (5, 3, 8, 8) and batch["label"].tolist() == [0, 0, 0, 1, 2]


def test_flat_folder_labels_every_item_minus_one(tmp_path):
    save_images(tmp_path, ["b.png", "a.png"])
    (tmp_path / "empty").mkdir()
    dataset = ImageFolderDataset(tmp_path, resolution=4, extensions=["png"])
    assert dataset.classes == [] and dataset.class_to_index == {} and len(dataset) == 2
    assert [int(dataset[i]["label"]) for i in range(2)] == [NO_LABEL, NO_LABEL] == [-1, -1]
    assert dataset[-1]["image"].shape == (3, 4, 4)


# --- captions ----------------------------------------------------------------------------------------


CAPTIONS = {"cat/a.png": "a cat, sitting", "cat/b.png": "", "dog/c.png": "a very long caption about a dog"}


def write_captions(path, rows, kind):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps({"file": file, "caption": text}) for file, text in rows) + "\n\n")
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "extra", "caption"])
            writer.writerows([file, "x", text] for file, text in rows)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "dict"])
def test_captions_round_trip_to_padded_ids(tmp_path, kind):
    root = tmp_path / "images"
    save_images(root, list(CAPTIONS))
    captions = CAPTIONS if kind == "dict" else tmp_path / f"captions.{kind}"
    if kind != "dict":
        write_captions(captions, reversed(list(CAPTIONS.items())), kind)
    dataset = ImageFolderDataset(root, resolution=4, captions=captions, tokenizer=char_codes, max_caption_length=16,
                                 pad_id=7)
    for index, text in enumerate(CAPTIONS.values()):
        item = dataset[index]
        length = min(len(text), 16)
        assert item["caption_ids"].dtype == torch.long and item["caption_mask"].dtype == torch.bool
        assert item["caption_mask"].tolist() == [True] * length + [False] * (16 - length)
        assert "".join(map(chr, item["caption_ids"][:length].tolist())) == text[:16]
        assert item["caption_ids"][length:].tolist() == [7] * (16 - length)
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["caption_ids"].shape == batch["caption_mask"].shape == (3, 16)


def test_caption_tokenizer_prefers_encode_and_takes_tensors():
    class WithEncode:
        def __call__(self, text):
            return {"input_ids": [1]}  # what a Hugging Face tokenizer's call returns: not used

        def encode(self, text):
            return torch.tensor([5, 6, 7])

    ids, mask = CaptionTokenizer(WithEncode(), max_length=2)("any")
    assert ids.tolist() == [5, 6] and mask.tolist() == [True, True]


def test_hf_rows_with_labels_and_captions():
    rows = [{"image": noise_image(20, 12, seed=0), "label": 2, "text": "hi"},
            {"image": {"bytes": png_bytes(noise_image(9, 9, seed=1, mode="L")), "path": None}, "label": np.int64(0),
             "text": "there"},
            {"image": np.asarray(noise_image(8, 8, seed=2)), "label": 1, "text": ""},
            {"image": torch.from_numpy(np.array(noise_image(8, 8, seed=3))), "label": torch.tensor(4), "text": "a"}]
    dataset = HFImageDataset(rows, resolution=8, caption_key="text", tokenizer=char_codes, max_caption_length=3,
                             random_flip=False)
    assert len(dataset) == 4 and dataset.classes is None
    items = [dataset[i] for i in range(4)]
    assert [int(item["label"]) for item in items] == [2, 0, 1, 4]
    assert torch.equal(items[3]["image"], to_tensor_image(adm_center_crop(noise_image(8, 8, seed=3), 8)))
    assert torch.equal(items[0]["image"], to_tensor_image(adm_center_crop(rows[0]["image"], 8)))
    assert items[1]["caption_ids"].tolist() == char_codes("the") and items[2]["caption_mask"].tolist() == [False] * 3
    assert set(HFImageDataset(rows, resolution=8, label_key=None)[0]) == {"image", "label"}
    assert int(HFImageDataset(rows, resolution=8, label_key=None)[0]["label"]) == NO_LABEL


def test_hf_wrapper_reads_columns_and_label_names_without_decoding_rows():
    class Feature:
        names = ["cat", "dog"]

    class FakeDataset:  # the parts of datasets.Dataset the wrapper uses
        column_names = ["img", "y"]
        features = {"img": object(), "y": Feature()}

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"img": noise_image(8, 8), "y": 1}

    dataset = HFImageDataset(FakeDataset(), resolution=4, image_key="img", label_key="y")
    assert dataset.classes == ["cat", "dog"] and dataset.class_to_index == {"cat": 0, "dog": 1}
    assert int(dataset[0]["label"]) == 1


def test_the_package_imports_neither_pillow_nor_datasets():
    code = "import sys, mmgen_pytorch.data; print('PIL' in sys.modules, 'datasets' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- refused inputs ----------------------------------------------------------------------------------


@pytest.fixture
def classes_root(tmp_path):
    root = tmp_path / "images"
    save_images(root, ["cat/a.png", "dog/b.png"])
    return root


@pytest.mark.parametrize("resolution, error", [(0, ValueError), (-4, ValueError), (8.0, TypeError), (True, TypeError)])
def test_resolution_must_be_a_positive_int(classes_root, resolution, error):
    with pytest.raises(error, match="`resolution` must be a positive int"):
        ImageFolderDataset(classes_root, resolution=resolution)
    with pytest.raises(error, match="`resolution`"):
        HFImageDataset([{"image": noise_image(4, 4), "label": 0}], resolution=resolution)
    with pytest.raises(error, match="`resolution`"):
        adm_center_crop(noise_image(4, 4), resolution)


def test_folder_errors(tmp_path, classes_root):
    with pytest.raises(FileNotFoundError, match="`root` folder .*missing.* does not exist"):
        ImageFolderDataset(tmp_path / "missing", resolution=8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="`root` .*file.png.* is not a folder"):
        ImageFolderDataset(tmp_path / "file.png", resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="`root` .*empty.* holds no images with the suffixes"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolderDataset(classes_root, resolution=8, extensions=[".jpg"])
    with pytest.raises(TypeError, match="`extensions`"):
        ImageFolderDataset(classes_root, resolution=8, extensions=".png")
    with pytest.raises(TypeError, match="`root` must be a folder path"):
        ImageFolderDataset(None, resolution=8)
    with pytest.raises(TypeError, match="`random_flip` must be a bool"):
        ImageFolderDataset(classes_root, resolution=8, random_flip=1)


def test_folder_layout_errors(classes_root):
    (classes_root / "bird").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder \['bird'\] holds no images"):
        ImageFolderDataset(classes_root, resolution=8)
    (classes_root / "bird").rmdir()
    save_images(classes_root, ["loose.png"])
    with pytest.raises(ValueError, match="mixes images at its top level \\('loose.png'"):
        ImageFolderDataset(classes_root, resolution=8)


def test_in_memory_items_equal_items_decoded_when_read(classes_root):
    """``in_memory`` decodes and crops once; its items (images, labels, the seeded flips) equal those decoded
    per read, and an unreadable file is named at construction."""
    save_images(classes_root, ["cat/c.png", "dog/d.png"], size=(13, 9))
    lazy, eager = (ImageFolderDataset(classes_root, resolution=6, in_memory=flag, progress=False)
                   for flag in (False, True))
    assert eager.pixels.shape == (4, 3, 6, 6) and eager.pixels.dtype == torch.uint8
    for index in range(len(lazy)):
        torch.manual_seed(index)
        expected = lazy[index]
        torch.manual_seed(index)
        got = eager[index]
        assert torch.equal(got["image"], expected["image"]) and torch.equal(got["label"], expected["label"])
    (classes_root / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="cannot read the image .*cat/broken.png"):
        ImageFolderDataset(classes_root, resolution=6, in_memory=True, progress=False)
    with pytest.raises(TypeError, match="`in_memory`"):
        ImageFolderDataset(classes_root, resolution=6, in_memory="yes")


def test_in_memory_batches_equal_the_items_stacked(classes_root):
    """A DataLoader batch of an ``in_memory`` folder (gathered at once by ``__getitems__``: images, flips,
    labels, pre-tokenized captions) equals the items of a folder read from disk one by one (decoded and
    tokenized at each read) and stacked, at the same seed; so does each of its own items."""
    save_images(classes_root, ["cat/c.png", "dog/d.png"], size=(13, 9))
    captions = {"cat/a.png": "a", "cat/c.png": "cc", "dog/b.png": "bbb", "dog/d.png": "dddddd"}  # the last one cut
    dataset, from_disk = (ImageFolderDataset(classes_root, resolution=6, in_memory=flag, progress=False,
                                             captions=captions, tokenizer=char_codes, max_caption_length=5)
                          for flag in (True, False))
    indices = [3, 0, 2, 1, 1, 2, 0, 3]
    torch.manual_seed(0)
    one_by_one = StackFields()([from_disk[index] for index in indices])
    torch.manual_seed(0)
    assert all(torch.equal(field, one_by_one[name][0]) for name, field in dataset[indices[0]].items())
    batches = iter(DataLoader(dataset, batch_sampler=[indices], collate_fn=StackFields()))
    torch.manual_seed(0)  # after the loader's own draw of its workers' base seed
    batch = next(batches)
    assert sorted(batch) == sorted(one_by_one) == ["caption_ids", "caption_mask", "image", "label"]
    assert all(torch.equal(batch[name], one_by_one[name]) for name in batch)
    flipped = [not torch.equal(batch["image"][i], uint8_to_images(dataset.pixels[index]))
               for i, index in enumerate(indices)]
    assert 0 < sum(flipped) < len(indices)
    default = next(iter(DataLoader(dataset, batch_size=4)))  # DataLoader's own collate_fn takes them too
    assert default["image"].shape == (4, 3, 6, 6) and torch.equal(default["caption_ids"], dataset.fields["caption_ids"])
    assert isinstance(from_disk.__getitems__([0, 1]), list)  # read one by one, decoded when read


def test_unreadable_image_is_named_when_read(classes_root):
    (classes_root / "cat" / "broken.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(classes_root, resolution=8)
    assert [dataset.relative_path(path) for path, _ in dataset.samples] == ["cat/a.png", "cat/broken.png", "dog/b.png"]
    with pytest.raises(OSError, match="cannot read the image .*cat/broken.png"):
        dataset[1]
    with pytest.raises(IndexError, match="dataset index 3 is out of range for 3 items"):
        dataset[3]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_caption_file_naming_a_missing_image_names_the_line(tmp_path, classes_root, kind):
    path = tmp_path / f"captions.{kind}"
    write_captions(path, [("cat/a.png", "x"), ("dog/b.png", "y"), ("dog/nope.png", "z")], kind)
    with pytest.raises(FileNotFoundError, match=f"captions.{kind}, line [34]: the captions name 'dog/nope.png', "
                                                f"no such image under `root`"):
        ImageFolderDataset(classes_root, resolution=8, captions=path, tokenizer=char_codes, max_caption_length=4)


def test_caption_errors(tmp_path, classes_root):
    options = dict(resolution=8, tokenizer=char_codes, max_caption_length=4)
    with pytest.raises(ValueError, match=r"1 of 2 images have no caption, e.g. \['dog/b.png'\]"):
        ImageFolderDataset(classes_root, captions={"cat/a.png": "x"}, **options)
    (classes_root / "dog" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="'dog/notes.txt', a file whose suffix is not in `extensions`"):
        ImageFolderDataset(classes_root, captions={"cat/a.png": "x", "dog/b.png": "y", "dog/notes.txt": "z"}, **options)
    with pytest.raises(ValueError, match="a second caption for 'cat/a.png'"):
        ImageFolderDataset(classes_root, captions={"cat/a.png": "x", "./cat/a.png": "y"}, **options)
    with pytest.raises(ValueError, match="`file` must be a path relative to the dataset root"):
        ImageFolderDataset(classes_root, captions={"/cat/a.png": "x"}, **options)
    with pytest.raises(FileNotFoundError, match="`captions` file .*nothing.jsonl.* does not exist"):
        ImageFolderDataset(classes_root, captions=tmp_path / "nothing.jsonl", **options)
    (tmp_path / "captions.txt").write_text("")
    with pytest.raises(ValueError, match=r"`captions` file .*captions.txt.* must end in .jsonl or .csv"):
        ImageFolderDataset(classes_root, captions=tmp_path / "captions.txt", **options)
    (tmp_path / "bad.jsonl").write_text('{"file": "cat/a.png", "caption": "x"}\n{"file": "dog/b.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: expected an object with keys 'file' and 'caption'"):
        ImageFolderDataset(classes_root, captions=tmp_path / "bad.jsonl", **options)
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="broken.jsonl, line 1: not a JSON object"):
        ImageFolderDataset(classes_root, captions=tmp_path / "broken.jsonl", **options)
    (tmp_path / "columns.csv").write_text("path,text\ncat/a.png,x\n")
    with pytest.raises(ValueError, match="columns.csv: the CSV header must name the columns 'file' and 'caption'"):
        ImageFolderDataset(classes_root, captions=tmp_path / "columns.csv", **options)
    with pytest.raises(ValueError, match="`caption` must be a string"):
        ImageFolderDataset(classes_root, captions={"cat/a.png": 3, "dog/b.png": "y"}, **options)


def test_caption_option_errors(classes_root):
    captions = {"cat/a.png": "x", "dog/b.png": "y"}
    with pytest.raises(ValueError, match="`captions` needs a `tokenizer`"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, max_caption_length=4)
    with pytest.raises(ValueError, match="`captions` needs `max_caption_length`"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, tokenizer=char_codes)
    with pytest.raises(ValueError, match="`tokenizer` and `max_caption_length` are only used with `captions`"):
        ImageFolderDataset(classes_root, resolution=8, tokenizer=char_codes)
    with pytest.raises(ValueError, match="`max_caption_length` must be a positive int, got 0"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, tokenizer=char_codes, max_caption_length=0)
    with pytest.raises(TypeError, match="`tokenizer` must be a tokenizer object or callable, got the name 'gpt2'"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, tokenizer="gpt2", max_caption_length=4)
    with pytest.raises(TypeError, match="`tokenizer` must be an object with an `encode"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, tokenizer=3, max_caption_length=4)
    with pytest.raises(TypeError, match="`tokenizer` must return a list of non-negative int token ids .* got str"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, tokenizer=str.upper, max_caption_length=4)
    with pytest.raises(ValueError, match="`tokenizer` must return a list of non-negative int"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, tokenizer=lambda text: [-1],
                           max_caption_length=4)
    with pytest.raises(ValueError, match="`pad_id` must be a non-negative int"):
        ImageFolderDataset(classes_root, resolution=8, captions=captions, tokenizer=char_codes, max_caption_length=4,
                           pad_id=-1)


def test_hf_wrapper_errors():
    rows = [{"image": noise_image(4, 4), "label": 0}]
    with pytest.raises(KeyError, match="`label_key` 'y' is not a column of `hf_dataset`"):
        HFImageDataset(rows, resolution=4, label_key="y")
    with pytest.raises(KeyError, match="`image_key` 'img' is not a column"):
        HFImageDataset(rows, resolution=4, image_key="img")
    with pytest.raises(ValueError, match="`hf_dataset` is empty"):
        HFImageDataset([], resolution=4)
    with pytest.raises(TypeError, match="a DatasetDict of splits.*dataset\\['train'\\]"):
        HFImageDataset({"train": rows}, resolution=4)
    with pytest.raises(TypeError, match="`hf_dataset` must be a map-style dataset"):
        HFImageDataset(iter(rows), resolution=4)
    with pytest.raises(TypeError, match="`hf_dataset` rows must be dicts"):
        HFImageDataset([noise_image(4, 4)], resolution=4)
    with pytest.raises(ValueError, match="`caption_key` needs a `tokenizer`"):
        HFImageDataset(rows, resolution=4, caption_key="label")
    with pytest.raises(TypeError, match="row 0: `caption_key` 'label' holds int"):
        HFImageDataset(rows, resolution=4, caption_key="label", tokenizer=char_codes, max_caption_length=2)
    bad = HFImageDataset([*rows, {"image": 3, "label": "cat"}, {"image": noise_image(4, 4), "label": "cat"},
                          {"label": 0}], resolution=4)
    with pytest.raises(TypeError, match="`hf_dataset` row 1, `image_key` 'image' must be a PIL image"):
        bad[1]
    with pytest.raises(TypeError, match="row 2: `label_key` 'label' holds str"):
        bad[2]
    with pytest.raises(KeyError, match="row 3 has no column `image_key` 'image'"):
        bad[3]
    with pytest.raises(TypeError, match="row 0, `image_key` 'image' must be a uint8 array .* float32"):
        HFImageDataset([{"image": np.zeros((4, 4, 3), np.float32)}], resolution=4, label_key=None)[0]


def test_missing_pillow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=re.escape(install_hint("data"))):
        to_tensor_image(None)


def test_greyscale_items_are_the_luma_of_the_rgb_crop(classes_root):
    """``channels=1``: items ``[1, R, R]``, each Pillow's luma of the RGB item (decoded per read, in memory, or
    from rows), a greyscale source unchanged; any other channel count is refused naming it."""
    from mmgen_pytorch.data.images import luma_pixels, to_uint8_pixels, uint8_to_images

    save_images(classes_root, ["cat/grey.png"], size=(11, 7))
    rgb = ImageFolderDataset(classes_root, resolution=6, random_flip=False)
    for in_memory in (False, True):
        grey = ImageFolderDataset(classes_root, resolution=6, random_flip=False, channels=1, in_memory=in_memory,
                                  progress=False)
        for index in range(len(rgb)):
            pixels = to_uint8_pixels(adm_center_crop(Image.open(rgb.samples[index][0]).convert("RGB"), 6))
            assert grey[index]["image"].shape == (1, 6, 6)
            assert torch.equal(grey[index]["image"], uint8_to_images(luma_pixels(pixels)))
    image = noise_image(8, 8, seed=5, mode="L")
    row = HFImageDataset([{"image": image, "label": 0}], resolution=8, random_flip=False, channels=1)[0]["image"]
    assert torch.equal(row, uint8_to_images(torch.from_numpy(np.array(image))[None]))  # greyscale stays as it is
    with pytest.raises(ValueError, match="`channels` must be 3 \\(RGB\\) or 1 \\(greyscale\\), got 2"):
        ImageFolderDataset(classes_root, resolution=6, channels=2)
