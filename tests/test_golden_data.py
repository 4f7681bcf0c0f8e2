"""The committed golden data: every file loads safely and rebuilds its weights; recipes are order-independent
and refuse tensors that miss their recorded fingerprint."""

import pytest
import torch

from conftest import GOLDEN_DIR
from golden.weights import build_state_dict, constant, copy_of, make_recipe, normal

FILES = ["dnd.pt", "dnd_rqvae.pt", "hf_llama.pt", "llamagen_c2i.pt", "llamagen_t2i.pt", "llamagen_vq.pt", "mar.pt",
         "mar_vae.pt"]


def test_the_folder_holds_exactly_the_documented_files():
    assert sorted(path.name for path in GOLDEN_DIR.glob("*.pt")) == FILES


@pytest.mark.parametrize("name", FILES)
def test_file_loads_with_weights_only_and_rebuilds_its_state_dict(golden, name):
    data = golden(name)
    assert set(data) == {"config", "state_dict", "inputs", "outputs", "notes"}
    entries = torch.load(GOLDEN_DIR / name, weights_only=True)["weights"]["entries"]
    assert list(data["state_dict"]) == list(entries)
    for key, tensor in data["state_dict"].items():
        assert list(tensor.shape) == entries[key]["shape"], key


def template():
    return {"a": torch.zeros(3, 4), "b": torch.zeros(5), "c": torch.zeros(2, 4), "d": torch.zeros(5)}


def init_of(key, tensor):
    return {"a": normal(0.5), "b": normal(0.1, mean=1.0), "c": copy_of("a", rows=(1, 3)), "d": constant(2.0)}[key]


def test_values_depend_on_the_key_not_on_the_other_keys_or_their_order():
    full = build_state_dict(make_recipe(7, template(), init_of))
    alone = build_state_dict(make_recipe(7, {"b": torch.zeros(5)}, init_of))
    reordered = build_state_dict(make_recipe(7, dict(reversed(list(template().items()))), init_of))
    assert torch.equal(full["b"], alone["b"]) and all(torch.equal(full[k], reordered[k]) for k in full)
    assert torch.equal(full["c"], full["a"][1:3]) and torch.equal(full["d"], torch.full((5,), 2.0))
    assert not torch.equal(full["a"], build_state_dict(make_recipe(8, template(), init_of))["a"])


def test_a_tensor_missing_its_fingerprint_is_refused_by_key():
    recipe = make_recipe(7, template(), init_of)
    recipe["entries"]["b"]["std"] = 0.2
    with pytest.raises(ValueError, match="'b'.*recorded"):
        build_state_dict(recipe)


def test_an_unknown_init_is_refused_by_key():
    recipe = make_recipe(7, template(), init_of)
    recipe["entries"]["d"]["init"] = "uniform"
    with pytest.raises(ValueError, match="'d'.*'normal', 'constant' or 'copy'.*'uniform'"):
        build_state_dict(recipe)
