"""Caching a dataset through a tokenizer (mmgen_pytorch.data.cache): round trip against direct encoding,
flipped copies and ten crops, resume, ranks, and the refusals (another tokenizer, missing or partial shards)."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from mmgen_pytorch.data.cache import (CachedDataset, EncodedDataset, StackFields, cache_dataset, sample_latent, shard_name,
                                      ten_crops)
from mmgen_pytorch.files import CheckpointFileError
from mmgen_pytorch.tokenizers import RQVAE, VQVAE, AutoencoderKL, KLConfig, RQConfig, VQConfig

from _helpers import assert_close_f32

KL_TINY = KLConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(),
                   decoder_attn_levels=())
VQ_TINY = VQConfig(codebook_size=16, codebook_dim=4, ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                   z_channels=32, num_res_blocks=1, usage_window=256)
RQ_TINY = RQConfig(embed_dim=8, n_embed=16, depth=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(),
                   z_channels=8)
BUILDERS = {"kl": lambda: AutoencoderKL(KL_TINY), "vq": lambda: VQVAE(VQ_TINY), "rq": lambda: RQVAE(RQ_TINY)}
ENCODERS = {"kl": "encode", "vq": "encode_to_indices", "rq": "encode_to_codes"}


class Images(Dataset):
    """Items as the image datasets yield them: image [3, H, W] in [-1, 1], label, optional captions."""

    def __init__(self, n=5, size=8, *, captions=False, fail_at=None):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
        self.labels = torch.arange(n) % 3
        self.captions, self.fail_at = captions, fail_at

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if self.fail_at is not None and index >= self.fail_at:
            raise KeyboardInterrupt("killed")  # a run stopped part-way
        item = {"image": self.images[index], "label": int(self.labels[index])}
        if self.captions:
            item.update(caption_ids=torch.full((4,), index), caption_mask=torch.arange(4) <= index % 4)
        return item


def tokenizer(kind, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()


def count_encoder_calls(model, kind):
    """Wraps the encoder method the cache calls; returns the list its calls are appended to."""
    calls, method = [], getattr(model, ENCODERS[kind])

    def counted(images):
        calls.append(images.shape[0])
        return method(images)
    setattr(model, ENCODERS[kind], counted)
    return calls


def direct(model, kind, images):
    with torch.no_grad():
        return model.encode(images).parameters if kind == "kl" else getattr(model, ENCODERS[kind])(images)


def stored(folder, name):
    manifest = json.loads((folder / "cache.json").read_text())
    return torch.cat([load_file(folder / shard_name(i))[name] for i in range(manifest["shard_count"])])


def assert_same_encoding(kind, actual, expected):
    if kind == "kl":
        assert_close_f32(actual, expected)
    else:
        assert torch.equal(actual.long(), expected)


@pytest.mark.parametrize("kind", ["kl", "vq", "rq"])
def test_round_trip_equals_direct_encoding_with_the_flipped_copy(kind, tmp_path):
    model, data = tokenizer(kind), Images(captions=True)
    cache_dataset(data, model, tmp_path, batch_size=2, shard_size=2, progress=False)
    field = "moments" if kind == "kl" else "codes"
    views = stored(tmp_path, field)
    assert views.shape[:2] == (5, 2)
    assert_same_encoding(kind, views[:, 0], direct(model, kind, data.images))
    assert_same_encoding(kind, views[:, 1], direct(model, kind, data.images.flip(-1)))

    plain = CachedDataset(tmp_path, tokenizer=model, flip=False)
    assert len(plain) == 5
    for index in range(5):
        item = plain[index]
        assert torch.equal(item[field], views[index, 0].to(item[field].dtype))
        assert item["label"].dtype == torch.long and int(item["label"]) == index % 3
        assert torch.equal(item["caption_ids"], torch.full((4,), index))
        assert torch.equal(item["caption_mask"], torch.arange(4) <= index % 4)
    if kind != "kl":
        assert plain[0]["codes"].dtype == torch.long

    random_views = CachedDataset(tmp_path, flip=True, generator=0)
    drawn = [random_views[1][field] for _ in range(40)]
    assert all(any(torch.equal(d, views[1, v].to(d.dtype)) for v in (0, 1)) for d in drawn)
    assert {int(torch.equal(d, views[1, 1].to(d.dtype))) for d in drawn} == {0, 1}  # both copies occur


def enlarged_by_a_quarter(images):
    return torch.nn.functional.interpolate(images, size=(10, 10), mode="bicubic").clamp(-1, 1)


def test_ten_crops_are_the_corners_and_centre_of_the_enlarged_image_and_its_flip():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    crops = ten_crops(images, crop_range=1.25)
    assert crops.shape == (2, 10, 3, 8, 8)
    for flipped, enlarged in enumerate((enlarged_by_a_quarter(images), enlarged_by_a_quarter(images).flip(-1))):
        for k, (top, left) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]):
            assert torch.equal(crops[:, 5 * flipped + k], enlarged[..., top:top + 8, left:left + 8])
    assert torch.equal(crops[:, 5], crops[:, 1].flip(-1))  # flipped top-left = mirrored top-right


def test_ten_crops_follow_torchvisions_ten_crop_order():
    functional = pytest.importorskip("torchvision.transforms.v2.functional")
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    expected = torch.stack(functional.ten_crop(enlarged_by_a_quarter(images), [8, 8]), dim=1)
    assert torch.equal(ten_crops(images, crop_range=1.25), expected)


def test_ten_crop_cache_holds_the_codes_of_the_ten_crops(tmp_path):
    model, data = tokenizer("vq"), Images(n=3)
    cache_dataset(data, model, tmp_path, ten_crop=True, crop_range=1.25, batch_size=2, shard_size=2, progress=False)
    codes = stored(tmp_path, "codes")
    assert codes.shape == (3, 10, 4, 4)
    expected = direct(model, "vq", ten_crops(data.images, 1.25).flatten(0, 1)).unflatten(0, (3, 10))
    assert torch.equal(codes.long(), expected)
    unflipped = CachedDataset(tmp_path, flip=False, generator=0)
    drawn = [unflipped[2]["codes"] for _ in range(30)]
    chosen = {next((v for v in range(10) if torch.equal(d, codes[2, v].long())), None) for d in drawn}
    assert chosen <= set(range(5)) and len(chosen) > 1  # only unflipped crops, more than one of them


def test_resume_skips_finished_shards_after_a_killed_run(tmp_path):
    model = tokenizer("vq")
    with pytest.raises(KeyboardInterrupt):
        cache_dataset(Images(fail_at=3), model, tmp_path, batch_size=2, shard_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [shard_name(0)]  # shard 1 was cut off
    calls = count_encoder_calls(model, "vq")
    cache_dataset(Images(), model, tmp_path, batch_size=2, shard_size=2, progress=False)
    assert calls == [2 * 2, 1 * 2]  # shards 1 and 2 only (images x 2 views per call)
    calls.clear()
    cache_dataset(Images(), model, tmp_path, batch_size=2, shard_size=2, progress=False)
    assert calls == []
    fresh = tmp_path / "fresh"
    cache_dataset(Images(), tokenizer("vq"), fresh, batch_size=2, shard_size=2, progress=False)
    assert torch.equal(stored(tmp_path, "codes"), stored(fresh, "codes"))


def test_two_ranks_write_the_cache_of_one_process(tmp_path):
    model, data = tokenizer("kl"), Images(n=7, captions=True)
    options = dict(batch_size=2, shard_size=2, progress=False)
    cache_dataset(data, model, tmp_path / "ranks", rank=1, world_size=2, **options)
    assert sorted(p.name for p in (tmp_path / "ranks").glob("shard-*")) == [shard_name(1), shard_name(3)]
    cache_dataset(data, model, tmp_path / "ranks", rank=0, world_size=2, **options)
    cache_dataset(data, model, tmp_path / "single", **options)
    manifests = [json.loads((tmp_path / name / "cache.json").read_text()) for name in ("ranks", "single")]
    assert manifests[0] == manifests[1] and manifests[0]["shard_count"] == 4
    for index in range(4):
        together, alone = (load_file(tmp_path / name / shard_name(index)) for name in ("ranks", "single"))
        assert together.keys() == alone.keys() and all(torch.equal(together[k], alone[k]) for k in alone)


def test_a_mismatched_tokenizer_is_refused_naming_what_differs(tmp_path):
    cache_dataset(Images(n=2), tokenizer("vq"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        CachedDataset(tmp_path, tokenizer=tokenizer("vq", seed=1))
    with pytest.raises(ValueError, match="codebook_size: cache 16, given 32"):
        CachedDataset(tmp_path, tokenizer=VQVAE(VQ_TINY, codebook_size=32))
    with pytest.raises(ValueError, match="class: cache 'mmgen_pytorch.tokenizers.vq:VQVAE'"):
        CachedDataset(tmp_path, tokenizer=tokenizer("rq"))
    same = VQVAE(VQ_TINY)
    same.load_state_dict(tokenizer("vq").state_dict())
    CachedDataset(tmp_path, tokenizer=same)  # same class, config and weights: accepted
    other = tokenizer("vq", seed=1)
    calls = count_encoder_calls(other, "vq")
    with pytest.raises(ValueError, match="another tokenizer.*fingerprint"):
        cache_dataset(Images(n=2), other, tmp_path, progress=False)  # would mix two tokenizers' shards
    assert calls == []


def test_a_missing_shard_is_refused_by_name(tmp_path):
    cache_dataset(Images(), tokenizer("vq"), tmp_path, batch_size=2, shard_size=2, progress=False)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete.*shard-00001.safetensors"):
        CachedDataset(tmp_path)


def test_a_half_written_temporary_shard_is_ignored_and_redone(tmp_path):
    model = tokenizer("vq")
    cache_dataset(Images(), model, tmp_path, batch_size=2, shard_size=2, progress=False)
    complete = stored(tmp_path, "codes")
    shard = tmp_path / shard_name(1)
    half = shard.read_bytes()[: shard.stat().st_size // 2]
    shard.unlink()
    (tmp_path / (shard.name + ".tmp")).write_bytes(half)  # what a run killed while writing leaves
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors"):
        CachedDataset(tmp_path)
    calls = count_encoder_calls(model, "vq")
    cache_dataset(Images(), model, tmp_path, batch_size=2, shard_size=2, progress=False)
    assert calls == [4]
    assert torch.equal(stored(tmp_path, "codes"), complete)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_truncated_shard_under_its_final_name_is_refused_by_name(tmp_path):
    cache_dataset(Images(), tokenizer("vq"), tmp_path, batch_size=2, shard_size=2, progress=False)
    shard = tmp_path / shard_name(2)
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CheckpointFileError, match="shard-00002.safetensors.*truncated"):
        CachedDataset(tmp_path)
    model = tokenizer("vq")
    calls = count_encoder_calls(model, "vq")
    with pytest.warns(UserWarning, match="shard-00002.safetensors.*encoding it again"):
        cache_dataset(Images(), model, tmp_path, batch_size=2, shard_size=2, progress=False)
    assert calls == [2] and len(CachedDataset(tmp_path)) == 5


def test_bad_arguments_are_refused_before_encoding(tmp_path):
    model = tokenizer("vq")
    calls = count_encoder_calls(model, "vq")
    cases = [(dict(rank=2, world_size=2), "`rank` must be an int in \\[0, 2\\)"),
             (dict(batch_size=0), "`batch_size` must be a positive int, got 0"),
             (dict(shard_size=1.5), "`shard_size` must be a positive int"), (dict(crop_range=0.9), "`crop_range`"),
             (dict(num_workers=-1), "`num_workers` must be an int >= 0")]
    for options, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            cache_dataset(Images(), model, tmp_path, progress=False, **options)
    with pytest.raises(TypeError, match="`flip` must be a bool"):
        cache_dataset(Images(), model, tmp_path, flip=1, progress=False)
    with pytest.raises(TypeError, match="`tokenizer` must be one of"):
        cache_dataset(Images(), torch.nn.Linear(2, 2), tmp_path, progress=False)

    class NoLabels(Images):
        def __getitem__(self, index):
            return {"image": self.images[index]}
    with pytest.raises(ValueError, match="'image' and 'label'"):
        cache_dataset(NoLabels(), model, tmp_path, progress=False)
    assert calls == [] and not list(tmp_path.glob("shard-*"))


def test_cached_items_batch_through_a_dataloader_and_pickle(tmp_path):
    cache_dataset(Images(captions=True), tokenizer("rq"), tmp_path, batch_size=2, shard_size=2, progress=False)
    dataset = CachedDataset(tmp_path)
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    assert batch["codes"].shape == (5, 4, 4, 3) and batch["codes"].dtype == torch.long
    assert batch["label"].tolist() == [0, 1, 2, 0, 1] and batch["caption_mask"].dtype == torch.bool
    assert dataset.labels().tolist() == batch["label"].tolist()  # across the 3 shards, no image read
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[4]["label"], dataset[4]["label"])
    with pytest.raises(IndexError, match="`index`"):
        dataset[5]


@pytest.mark.parametrize("kind", ["kl", "vq", "rq"])
def test_encoded_in_memory_reads_as_the_cache_and_flips_as_the_image_datasets(kind, tmp_path):
    """EncodedDataset holds what cache_dataset writes (plain and mirrored views, labels, captions), and each
    read picks the mirror exactly when random_horizontal_flip would have mirrored the image."""
    from mmgen_pytorch.data import random_horizontal_flip

    model, data, field = tokenizer(kind), Images(captions=True), "moments" if kind == "kl" else "codes"
    cache_dataset(data, model, tmp_path, batch_size=2, shard_size=2, progress=False)
    encoded = EncodedDataset(data, model, flip=True, batch_size=3, progress=False)
    assert len(encoded) == 5 and encoded.labels().tolist() == [0, 1, 2, 0, 1]
    cached = stored(tmp_path, field)
    assert_same_encoding(kind, encoded.tensors[field], cached.long() if kind != "kl" else cached)
    for name in ("caption_ids", "caption_mask"):
        assert torch.equal(encoded.tensors[name], stored(tmp_path, name))

    torch.manual_seed(3)
    items = [encoded[index % 5] for index in range(20)]
    torch.manual_seed(3)
    mirrored = [not torch.equal(random_horizontal_flip(data.images[i % 5]), data.images[i % 5]) for i in range(20)]
    assert 0 < sum(mirrored) < 20
    for index, (item, flipped) in enumerate(zip(items, mirrored)):
        assert torch.equal(item[field], encoded.tensors[field][index % 5, int(flipped)].to(item[field].dtype))
        assert item["label"].dtype == torch.long and torch.equal(item["caption_ids"], torch.full((4,), index % 5))
    if kind != "kl":
        assert items[0]["codes"].dtype == torch.long
    batches = iter(DataLoader(encoded, batch_sampler=[[index % 5 for index in range(20)]], collate_fn=StackFields()))
    torch.manual_seed(3)
    batch = next(batches)  # gathered at once by __getitems__, the same draws in the same order
    assert all(torch.equal(batch[name], torch.stack([item[name] for item in items])) for name in items[0])
    assert next(iter(DataLoader(encoded, batch_size=5)))["label"].tolist() == [0, 1, 2, 0, 1]  # the default collate
    plain = EncodedDataset(data, model, flip=False, progress=False)
    assert plain.tensors[field].shape[1] == 1 and torch.equal(plain[-1][field], plain.tensors[field][4, 0].to(
        plain[-1][field].dtype))
    with pytest.raises(IndexError, match="`index`"):
        plain[5]


def test_encoding_in_memory_refuses_a_randomly_flipping_dataset_before_encoding():
    model = tokenizer("vq")
    calls = count_encoder_calls(model, "vq")
    flipping = Images()
    flipping.random_flip = True
    with pytest.raises(ValueError, match="`dataset` flips its images at random; give it `random_flip=False`"):
        EncodedDataset(flipping, model, progress=False)
    with pytest.raises(TypeError, match="`tokenizer` must be one of"):
        EncodedDataset(Images(), torch.nn.Linear(2, 2), progress=False)
    with pytest.raises(TypeError, match="`flip` must be a bool"):
        EncodedDataset(Images(), model, flip="yes", progress=False)
    assert calls == []


def test_sample_latent_is_mean_plus_std_times_noise():
    moments = torch.randn(2, 8, 4, 4)
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    expected = (mean + torch.exp(0.5 * logvar) * noise) * 0.2325
    assert_close_f32(sample_latent(moments, generator=3, scale=0.2325), expected)
    single = sample_latent(moments[0], generator=3, scale=0.2325)
    assert_close_f32(single, expected[0])
    with pytest.raises(ValueError, match="`moments`"):
        sample_latent(torch.zeros(8, 4))
