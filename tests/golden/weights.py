"""Golden files keep a weight *recipe* instead of the random weights themselves; this module turns one into the
exact state_dict (and makes recipes, for `regenerate.py`).

A recipe is a plain dict, ``{"seed": int, "torch": version, "entries": {key: entry}}``, entries in the official key
order. Each entry has ``shape`` (list of ints), ``dtype`` (a torch dtype name) and ``init``, one of:

- ``"normal"`` with ``mean`` and ``std``: drawn in float64 from a generator seeded by (seed, key), then cast. The
  values of a key depend only on the seed, the key and its shape, never on the other keys or their order.
- ``"constant"`` with ``value``.
- ``"copy"`` with ``of`` (another key, which must not itself be a copy) and optional ``rows`` ([start, stop]):
  that key's tensor, or a slice of its rows (for tied weights and buffers derived from them).

Each entry also records ``abs_sum``, the float64 sum of |values| when the file was made. Rebuilding checks it, so a
torch whose random number generator draws differently fails with a clear message rather than with mismatched
outputs further on.
"""

import hashlib

import torch

ABS_SUM_RTOL = 1e-6


def key_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def normal(std: float, mean: float = 0.0) -> dict:
    return {"init": "normal", "mean": float(mean), "std": float(std)}


def constant(value: float) -> dict:
    return {"init": "constant", "value": float(value)}


def copy_of(key: str, rows=None) -> dict:
    return {"init": "copy", "of": key, **({} if rows is None else {"rows": list(rows)})}


def draw(seed: int, key: str, entry: dict, built: dict) -> torch.Tensor:
    shape, dtype, init = entry["shape"], getattr(torch, entry["dtype"]), entry["init"]
    if init == "normal":
        generator = torch.Generator().manual_seed(key_seed(seed, key))
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * entry["std"] + entry["mean"]
        return values.to(dtype)
    if init == "constant":
        return torch.full(shape, entry["value"], dtype=dtype)
    if init == "copy":
        source = built[entry["of"]]
        if "rows" in entry:
            source = source[entry["rows"][0]:entry["rows"][1]]
        if list(source.shape) != list(shape) or source.dtype != dtype:
            raise ValueError(f"recipe entry {key!r} copies {entry['of']!r}: expected {shape} {dtype}, "
                             f"the source gives {list(source.shape)} {source.dtype}")
        return source.clone()
    raise ValueError(f"recipe entry {key!r}: init must be 'normal', 'constant' or 'copy', got {init!r}")


def check_abs_sum(key: str, entry: dict, tensor: torch.Tensor, made_with: str):
    expected, got = entry["abs_sum"], tensor.double().abs().sum().item()
    if abs(got - expected) > ABS_SUM_RTOL * max(abs(expected), 1.0):
        raise ValueError(f"recipe entry {key!r}: the rebuilt tensor has sum|w| = {got!r} where the file recorded "
                         f"{expected!r}: either the recipe was edited without regenerating the file, or this torch "
                         f"({torch.__version__}) draws other random numbers than the one that made it ({made_with})")


def draw_all(recipe: dict) -> dict:
    """Every tensor of a recipe, in its key order (copies are drawn after the keys they copy)."""
    seed, entries = recipe["seed"], recipe["entries"]
    built = {}
    for key, entry in sorted(entries.items(), key=lambda item: item[1]["init"] == "copy"):
        built[key] = draw(seed, key, entry, built)
    return {key: built[key] for key in entries}


def build_state_dict(recipe: dict) -> dict:
    """The state_dict a recipe describes; raises ValueError where a tensor misses its recorded fingerprint."""
    state_dict = draw_all(recipe)
    for key, tensor in state_dict.items():
        check_abs_sum(key, recipe["entries"][key], tensor, recipe["torch"])
    return state_dict


def make_recipe(seed: int, template: dict, init_of) -> dict:
    """A recipe for a state_dict shaped like `template`: `init_of(key, tensor)` gives each key's init (`normal`,
    `constant` or `copy_of`); shapes and dtypes come from the template, fingerprints from the drawn tensors."""
    entries = {key: {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                     **init_of(key, tensor)}
               for key, tensor in template.items()}
    recipe = {"seed": seed, "torch": str(torch.__version__), "entries": entries}
    for key, tensor in draw_all(recipe).items():
        entries[key]["abs_sum"] = tensor.double().abs().sum().item()
    return recipe
