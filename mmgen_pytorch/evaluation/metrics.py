"""Image-generation metrics on the features of a :class:`~.features.FeatureExtractor`.

- FID: torchmetrics' ``FrechetInceptionDistance`` (its float64 sums, and ``tr sqrt(S1 S2)`` from the
  eigenvalues of ``S1 S2``); the features are computed once per batch and handed to it through a
  pass-through feature module, so FID, IS and precision / recall share one extractor pass.
- IS: torchmetrics' ``InceptionScore`` on the extractor's logits (10 splits of a seeded permutation).
- Precision / recall (Kynkäänniemi et al. 2019), as ADM's evaluator: a sample is "precise" when it lies
  inside the ball around some reference feature whose radius is that feature's distance to its k-th
  (k=3) nearest other reference feature; recall swaps the roles. torchmetrics has none: written here
  with chunked ``torch.cdist`` (float32, as ADM).
- rFID of a tokenizer: its reconstructions against the originals (:func:`reconstruction_fid`).

Reference statistics (:class:`FeatureStats`: mean, covariance, count and a bounded uniform subsample of
the features for precision / recall) come from any iterable of uint8 batches (for an image folder:
:func:`image_folder_batches`) and are cached to an ``.npz`` with the extractor's identity, the resolution the
images were resized to and their folder; a cache from another extractor, resolution or folder, or one recording no
resolution, is refused (:func:`reference_stats`).

sFID is not provided: it is the FID of Inception's spatial ``mixed_6/conv`` features (ADM keeps the first
7 channels of that 17x17 map), which neither torchmetrics nor torch-fidelity's extractor returns (their
``768`` feature is that stage averaged over space); taking them would mean hooking torch-fidelity's
internal layers, which could not be checked against ADM's numbers here.

Needs torchmetrics and numpy (the ``eval`` extra: ``pip install mmgen-pytorch[eval]``), imported on first use.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .._utils import check, check_positive_int, describe, eval_mode, install_hint, typechecked
from ..data.images import luma_pixels
from ..tokenizers import AutoencoderKL
from .features import FeatureExtractor, check_uint8_images, images_to_uint8, module_device, uint8_to_images

METRICS = ("fid", "is", "precision", "recall")
NEIGHBOURS = 3  # ADM's evaluator and Kynkäänniemi et al.
REFERENCE_FEATURES = 10_000  # ADM's reference batches hold 10k images for precision / recall
SAMPLE_FEATURES = 50_000  # the usual 50k samples: all of them kept
STATS_KEYS = ("mu", "sigma", "count", "features", "extractor")

PathLike = Union[str, os.PathLike]


def check_metrics_installed() -> None:
    """ImportError naming the ``eval`` extra unless torchmetrics imports (nothing is built)."""
    _torchmetrics("fid")


def _torchmetrics(metric: str) -> type:
    """torchmetrics' ``FrechetInceptionDistance`` or ``InceptionScore`` (from their modules: the package
    exports them only with torch-fidelity), imported on first use; ImportError naming the extra otherwise."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
    except ImportError as error:
        raise ImportError(f"mmgen_pytorch.evaluation's metrics need torchmetrics: {install_hint('eval')} "
                          f"(or pip install 'torchmetrics>=1.4')") from error
    return {"fid": FrechetInceptionDistance, "is": InceptionScore}[metric]


class _Precomputed(nn.Module):
    """The feature network handed to torchmetrics when the features are already computed: passes them on."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _fid_metric(num_features: int, device: torch.device):
    return _torchmetrics("fid")(feature=_Precomputed(num_features)).to(device)


# --- statistics -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """What the metrics need of a set of images in one extractor's feature space.

    Attributes:
        mu: the mean feature (D,), float64.
        sigma: the unbiased covariance (D, D), float64.
        count: how many images.
        features: a uniform random subsample (M, D) of the features, float32, for precision / recall
            (M = 0 when none were kept).
        extractor: the extractor's :attr:`~.features.FeatureExtractor.identity`.
        resolution: the side the images were resized / centre-cropped to (None: not recorded).
        source: the resolved path of the images' folder (None: not recorded).
    """

    mu: Float[Tensor, "d"]
    sigma: Float[Tensor, "d d"]
    count: int
    features: Float[Tensor, "m d"]
    extractor: str
    resolution: Optional[int] = None
    source: Optional[str] = None

    def check_extractor(self, extractor: FeatureExtractor, *, source: str = "the reference statistics") -> None:
        """ValueError naming both identities when ``extractor`` is not the one these statistics come from."""
        check(extractor.identity == self.extractor,
              f"{source} were computed with the extractor {self.extractor!r}, not with the given one "
              f"{extractor.identity!r}: recompute them with the given extractor (or use the matching one)")

    def check_origin(self, *, resolution: int, source: Optional[str] = None, required: bool = True,
                     where: str = "the reference statistics") -> None:
        """ValueError naming ``where`` and both values when these statistics come from images resized to
        another ``resolution`` (or from another ``source`` folder); with ``required``, statistics recording
        no resolution (written by an older version) are refused too."""
        check(self.resolution is not None or not required,
              f"{where} do not record the resolution their reference images were resized to (written by an older "
              f"version): delete the file so that they are recomputed at {resolution}x{resolution}")
        check(self.resolution in (None, resolution),
              f"{where} come from reference images resized to {self.resolution}x{self.resolution}, but "
              f"{resolution}x{resolution} are asked: use another cache file (or delete this one to recompute it)")
        check(source is None or self.source in (None, source),
              f"{where} come from the reference folder {self.source!r}, not from {source!r}: use another cache "
              f"file (or delete this one to recompute it)")

    @classmethod
    def from_features(cls, features: Float[Tensor, "n d"], *, extractor: str, max_features: int = REFERENCE_FEATURES,
                      seed: int = 0) -> "FeatureStats":
        """The statistics of features computed elsewhere (N >= 2 rows), labelled with the ``extractor``
        identity they come from; a uniform subsample of at most ``max_features`` rows is kept."""
        check(isinstance(features, Tensor) and features.ndim == 2 and features.is_floating_point()
              and len(features) >= 2, f"`features` must be a float tensor (N >= 2, D), got {describe(features)}",
              error=TypeError)
        check(isinstance(extractor, str), f"`extractor` must be the identity string, got {describe(extractor)}",
              error=TypeError)
        keep = check_positive_int("max_features", max_features, minimum=0)
        collector = _Collector(features.shape[1], features.device, keep=keep, seed=seed, logits=False)
        collector.add(features)
        return collector.stats(extractor)

    def save(self, path: PathLike) -> None:
        """Write an ``.npz`` (keys ``mu``, ``sigma``, ``count``, ``features``, ``extractor``, and ``resolution``
        / ``source`` when recorded), atomically."""
        import numpy as np

        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        recorded = {key: value for key, value in (("resolution", self.resolution), ("source", self.source))
                    if value is not None}
        with open(partial, "wb") as file:
            np.savez(file, mu=self.mu.cpu().numpy(), sigma=self.sigma.cpu().numpy(), count=np.int64(self.count),
                     features=self.features.cpu().numpy(), extractor=np.str_(self.extractor),
                     **{key: np.array(value) for key, value in recorded.items()})
        os.replace(partial, path)

    @classmethod
    def load(cls, path: PathLike, extractor: Optional[FeatureExtractor] = None) -> "FeatureStats":
        """Read :meth:`save`'s file (no pickles); with ``extractor``, refuse statistics of another one."""
        from .adm_npz import read_npz

        path = Path(path)
        data = read_npz(path, required=STATS_KEYS, optional=ORIGIN_KEYS, what="the statistics file",
                        written_by="FeatureStats.save")
        stats = cls(mu=torch.from_numpy(data["mu"]), sigma=torch.from_numpy(data["sigma"]),
                    count=int(data["count"]), features=torch.from_numpy(data["features"]),
                    extractor=str(data["extractor"]), **_recorded_origin(data))
        _check_stats_shapes(stats, str(path))
        if extractor is not None:
            stats.check_extractor(extractor, source=f"the statistics in {str(path)!r}")
        return stats


ORIGIN_KEYS = ("resolution", "source")  # recorded when known: the size the images were resized to, their folder


def _recorded_origin(data: Dict[str, Any]) -> Dict[str, Any]:
    """The ``resolution`` / ``source`` a statistics file records (absent keys: None)."""
    return dict(resolution=int(data["resolution"]) if "resolution" in data else None,
                source=str(data["source"]) if "source" in data else None)


def _check_stats_shapes(stats: FeatureStats, where: str) -> None:
    dim = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
    check(stats.mu.ndim == 1 and tuple(stats.sigma.shape) == (dim, dim) and stats.features.ndim == 2
          and stats.features.shape[1] == dim and stats.count >= 2,
          f"{where}: inconsistent statistics: mu {tuple(stats.mu.shape)}, sigma {tuple(stats.sigma.shape)}, "
          f"features {tuple(stats.features.shape)}, count {stats.count} (expected (D,), (D, D), (M, D), >= 2)")


class _Collector:
    """One pass over a set's features: the FID sums (torchmetrics' fake-side state), a uniform subsample
    of at most ``keep`` features (the ``keep`` smallest of seeded random keys), and the logits if asked."""

    def __init__(self, num_features: int, device: torch.device, *, keep: int, seed: int, logits: bool):
        self.fid = _fid_metric(num_features, device)
        self.keep, self.generator = keep, torch.Generator().manual_seed(seed)
        self.kept, self.keys = torch.zeros(0, num_features), torch.zeros(0)
        self.logits = [] if logits else None

    def add(self, features: Tensor, logits: Optional[Tensor] = None) -> None:
        self.fid.update(features.double(), real=False)
        keys = torch.cat([self.keys, torch.rand(len(features), generator=self.generator)])
        kept = torch.cat([self.kept, features.detach().float().cpu()])
        order = keys.argsort()[:self.keep]
        self.kept, self.keys = kept[order], keys[order]
        if self.logits is not None:
            self.logits.append(logits.detach().float().cpu())

    @property
    def count(self) -> int:
        return int(self.fid.fake_features_num_samples)

    def stats(self, extractor: str) -> FeatureStats:
        count, total, outer = self.count, self.fid.fake_features_sum, self.fid.fake_features_cov_sum
        mu = total / count
        sigma = (outer - count * torch.outer(mu, mu)) / (count - 1)
        return FeatureStats(mu=mu.cpu(), sigma=sigma.cpu(), count=count, features=self.kept, extractor=extractor)


def _collect(batches: Iterable[Tensor], extractor: FeatureExtractor, *, name: str, keep: int, seed: int,
             logits: bool = False) -> Tuple[FeatureStats, Optional[Tensor]]:
    """The statistics (and the logits, if asked) of every image of ``batches`` (uint8 ``(N, 3, H, W)``)."""
    check(not isinstance(batches, Tensor), f"`{name}` must be an iterable of uint8 batches (N, 3, H, W), got a "
                                           f"single tensor: wrap it in a list", error=TypeError)
    collector = _Collector(extractor.num_features, module_device(extractor), keep=keep, seed=seed, logits=logits)
    for position, batch in enumerate(batches):
        check_uint8_images(f"{name}[{position}]", batch, extractor.image_size)
        collector.add(*extractor.extract(batch))
    check(collector.count >= 2, f"`{name}` gave {collector.count} images; the statistics need at least 2")
    return collector.stats(extractor.identity), (torch.cat(collector.logits) if logits else None)


def feature_stats(batches: Iterable[Tensor], extractor: FeatureExtractor, *,
                  max_features: int = REFERENCE_FEATURES, seed: int = 0) -> FeatureStats:
    """The :class:`FeatureStats` of the images of ``batches`` (an iterable of uint8 ``(N, 3, H, W)``),
    keeping a uniform subsample of at most ``max_features`` features (drawn from ``seed``)."""
    keep = check_positive_int("max_features", max_features, minimum=0)
    return _collect(batches, extractor, name="batches", keep=keep, seed=seed)[0]


def check_cache_path(cache: PathLike, *, name: str = "cache") -> None:
    """A statistics cache must be an existing file or a new file in an existing folder (FileNotFoundError
    naming ``name`` otherwise): checked before any image is read."""
    check(Path(cache).is_file() or (not Path(cache).exists() and Path(cache).parent.is_dir()),
          f"`{name}` {str(cache)!r} must be a statistics file or a new file in an existing folder",
          error=FileNotFoundError)


def reference_stats(batches: Iterable[Tensor], extractor: FeatureExtractor, *, cache: Optional[PathLike] = None,
                    max_features: int = REFERENCE_FEATURES, seed: int = 0, resolution: Optional[int] = None,
                    source: Optional[str] = None) -> FeatureStats:
    """:func:`feature_stats` of the reference images, read from ``cache`` when that file exists (then
    ``batches`` is not iterated: pass a lazy iterable such as a DataLoader) and written to it otherwise.
    ``resolution`` (the side the images are resized to) and ``source`` (their folder) are recorded in the
    statistics; a cache is then accepted only when it records the same ones (:meth:`FeatureStats.check_origin`).

    Raises:
        ValueError: the cache was computed with another extractor (both identities named), at another
            resolution or from another folder (both named), or records no resolution when one is given.
        FileNotFoundError: ``cache``'s folder does not exist (checked before any image is read).
    """
    if cache is not None:
        check_cache_path(cache)
    if cache is not None and Path(cache).is_file():
        stats = FeatureStats.load(cache, extractor)
        if resolution is not None:
            stats.check_origin(resolution=resolution, source=source, where=f"the statistics in {str(cache)!r}")
        return stats
    stats = replace(feature_stats(batches, extractor, max_features=max_features, seed=seed), resolution=resolution,
                    source=source)
    if cache is not None:
        stats.save(cache)
    return stats


def image_folder_batches(root: PathLike, *, resolution: int, batch_size: int = 64, num_workers: int = 0):
    """The images of a folder (:class:`~mmgen_pytorch.data.ImageFolderDataset`: ADM centre crop to
    ``resolution``, no flip) as uint8 batches ``(N, 3, resolution, resolution)``, read lazily."""
    from torch.utils.data import DataLoader

    from ..data import ImageFolderDataset

    dataset = ImageFolderDataset(root, resolution=resolution, random_flip=False)
    loader = DataLoader(dataset, batch_size=check_positive_int("batch_size", batch_size), num_workers=num_workers)
    return (images_to_uint8(item["image"]) for item in loader)


# --- the metrics ----------------------------------------------------------------------------------------


def frechet_distance(first: FeatureStats, second: FeatureStats) -> float:
    """The Fréchet distance between the Gaussians of two :class:`FeatureStats` (same feature space),
    computed by torchmetrics' FID from their sums (float64)."""
    check(first.extractor == second.extractor,
          f"the two statistics come from different extractors: {first.extractor!r} and {second.extractor!r}")
    check(first.mu.shape == second.mu.shape,
          f"the two statistics have {first.mu.shape[0]} and {second.mu.shape[0]} features: compare the same space")
    dim = first.mu.shape[0]
    metric = _fid_metric(dim, torch.device("cpu"))
    metric.update(torch.zeros(0, dim, dtype=torch.float64), real=False)  # no sample: marks it updated, in float64
    for side, stats in (("real", first), ("fake", second)):  # the sums that `update` would have accumulated
        mu, count = stats.mu.double(), stats.count
        setattr(metric, f"{side}_features_sum", mu * count)
        setattr(metric, f"{side}_features_cov_sum", stats.sigma.double() * (count - 1) + count * torch.outer(mu, mu))
        setattr(metric, f"{side}_features_num_samples", torch.tensor(count))
    return float(metric.compute())


def inception_score(logits: Float[Tensor, "n c"], *, splits: int = 10, seed: int = 0) -> Tuple[float, float]:
    """``(mean, std)`` over ``splits`` groups of ``exp(E KL(p(y|x) || p(y)))`` (torchmetrics' InceptionScore,
    which groups a random permutation: drawn here from ``seed``, torch's global RNG left untouched). With
    ``splits=1`` the std is NaN."""
    check(isinstance(logits, Tensor) and logits.ndim == 2 and logits.is_floating_point(),
          f"`logits` must be a float tensor (N, classes), got {describe(logits)}", error=TypeError)
    splits = check_positive_int("splits", splits)
    check(len(logits) >= 2 * splits, f"`logits` holds {len(logits)} rows: need at least 2 per split ({splits} splits)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = _torchmetrics("is")(feature=_Precomputed(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # one split: std is NaN, as documented
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


@typechecked
def precision_recall(reference: Float[Tensor, "n d"], generated: Float[Tensor, "m d"], *, k: int = NEIGHBOURS,
                     chunk: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ``k``-nearest-neighbour balls, as ADM's
    evaluator: ``precision`` = the fraction of ``generated`` inside some reference ball, ``recall`` = the
    fraction of ``reference`` inside some generated ball. Distances in float32, ``chunk`` rows at a time."""
    k, chunk = check_positive_int("k", k), check_positive_int("chunk", chunk)
    for name, features in (("reference", reference), ("generated", generated)):
        check(len(features) > k, f"`{name}` holds {len(features)} features: need more than k={k}")
    reference, generated = reference.float(), generated.to(reference.device, torch.float32)
    precision = _inside_balls(generated, reference, _knn_radii(reference, k, chunk), chunk)
    recall = _inside_balls(reference, generated, _knn_radii(generated, k, chunk), chunk)
    return {"precision": float(precision.float().mean()), "recall": float(recall.float().mean())}


def _knn_radii(features: Tensor, k: int, chunk: int) -> Tensor:
    # the (k+1)-th smallest distance counts the point itself (distance 0): its k-th nearest other point
    return torch.cat([torch.cdist(rows, features).kthvalue(k + 1, dim=1).values for rows in features.split(chunk)])


def _inside_balls(queries: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> Tensor:
    return torch.cat([(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in queries.split(chunk)])


# --- entry points ---------------------------------------------------------------------------------------


def _wanted_metrics(metrics: Optional[Sequence[str]], extractor: FeatureExtractor, reference: FeatureStats) -> list:
    """The metrics to compute (None: all that ``extractor`` and ``reference`` allow), checked up front."""
    can_pr = len(reference.features) > NEIGHBOURS
    if metrics is None:
        possible = {"fid": True, "is": extractor.num_classes is not None, "precision": can_pr, "recall": can_pr}
        return [name for name in METRICS if possible[name]]
    check(not isinstance(metrics, str) and all(m in METRICS for m in metrics),
          f"`metrics` must be a sequence of names from {list(METRICS)}, got {metrics!r}")
    check("is" not in metrics or extractor.num_classes is not None,
          f"`metrics` asks for 'is' but the extractor {extractor.name!r} gives no logits (num_classes is None)")
    check(not {"precision", "recall"} & set(metrics) or can_pr,
          f"`metrics` asks for precision / recall but `reference` keeps {len(reference.features)} features "
          f"(recompute it with max_features > {NEIGHBOURS})")
    return list(metrics)


def computable_metrics(extractor: FeatureExtractor, reference: FeatureStats, num_generated: int, *,
                       is_splits: int = 10) -> Tuple[list, list]:
    """``(names, reasons)``: the metrics that ``num_generated`` images can be scored by against ``reference``
    with ``extractor``, and one sentence for each metric left out (why)."""
    names, reasons = ["fid"], []
    if extractor.num_classes is None:
        reasons.append(f"IS not computed: the extractor {extractor.name!r} gives no class logits")
    elif num_generated < 2 * is_splits:
        reasons.append(f"IS not computed: {num_generated} images, it needs at least {2 * is_splits} "
                       f"({is_splits} splits of 2)")
    else:
        names.append("is")
    if len(reference.features) <= NEIGHBOURS:
        reasons.append("precision / recall not computed: the reference keeps no image features (an ADM .npz "
                       "holding only mu / sigma, or statistics saved without features): they need its images")
    elif num_generated <= NEIGHBOURS:
        reasons.append(f"precision / recall not computed: {num_generated} images, they need more than {NEIGHBOURS}")
    else:
        names += ["precision", "recall"]
    return names, reasons


def evaluate(generated_batches: Iterable[Tensor], reference: FeatureStats, extractor: FeatureExtractor, *,
             metrics: Optional[Sequence[str]] = None, max_features: int = SAMPLE_FEATURES, is_splits: int = 10,
             seed: int = 0) -> Dict[str, float]:
    """Score generated images against reference statistics in one pass of ``extractor``.

    Args:
        generated_batches: an iterable of uint8 batches ``(N, 3, H, W)``.
        reference: :func:`reference_stats` of the real images, from the same extractor.
        extractor: the feature extractor (:func:`~.features.inception_v3` for published numbers).
        metrics: names from ``("fid", "is", "precision", "recall")``; None: every one that the extractor
            (IS needs logits) and the reference (precision / recall need its kept features) allow.
        max_features: at most this many generated features (a uniform subsample) enter precision / recall.
        is_splits: the Inception Score's number of splits.
        seed: the subsample's and IS permutation's seed.

    Returns:
        ``{"num_samples", "fid", "is", "is_std", "precision", "recall"}``, those asked for, as floats.
    """
    wanted = _wanted_metrics(metrics, extractor, reference)
    reference.check_extractor(extractor)
    pr = bool({"precision", "recall"} & set(wanted))
    keep = check_positive_int("max_features", max_features, minimum=NEIGHBOURS + 1) if pr else 0
    generated, logits = _collect(generated_batches, extractor, name="generated_batches", keep=keep, seed=seed,
                                 logits="is" in wanted)
    scores: Dict[str, float] = {"num_samples": generated.count}
    if "fid" in wanted:
        scores["fid"] = frechet_distance(reference, generated)
    if "is" in wanted:
        scores["is"], scores["is_std"] = inception_score(logits, splits=is_splits, seed=seed)
    if pr:
        device = module_device(extractor)
        both = precision_recall(reference.features.to(device), generated.features.to(device))
        scores.update({name: value for name, value in both.items() if name in wanted})
    return scores


def reconstruction_fid(batches: Iterable[Tensor], reconstruct: Union[nn.Module, Callable[[Tensor], Tensor]],
                       extractor: FeatureExtractor) -> float:
    """rFID: the FID of a tokenizer's reconstructions against the originals (uint8 ``(N, 3, H, W)`` batches;
    a greyscale tokenizer, ``config.in_channels`` 1, reconstructs their luma, and both are scored as greyscale).

    ``reconstruct`` is one of this library's tokenizers (VQVAE, RQVAE: their reconstruction;
    AutoencoderKL: decoded from the posterior mode), run in eval mode without gradients on its device, or
    any callable from float images in [-1, 1] to float images in [-1, 1]."""
    check(callable(reconstruct), f"`reconstruct` must be a tokenizer or a callable, got {describe(reconstruct)}",
          error=TypeError)
    check(not isinstance(batches, Tensor), "`batches` must be an iterable of uint8 batches, got a single tensor",
          error=TypeError)
    dim, device = extractor.num_features, module_device(extractor)
    originals, reconstructions = (_Collector(dim, device, keep=0, seed=0, logits=False) for _ in range(2))
    greyscale = getattr(getattr(reconstruct, "config", None), "in_channels", 3) == 1
    for position, batch in enumerate(batches):
        check_uint8_images(f"batches[{position}]", batch, extractor.image_size)
        if greyscale:  # a greyscale tokenizer: the originals' luma in, both scored as three equal channels
            batch = luma_pixels(batch)
            originals.add(extractor.extract(batch.expand(-1, 3, -1, -1))[0])
            recon = images_to_uint8(_reconstructed(reconstruct, batch).expand(-1, 3, -1, -1))
        else:
            originals.add(extractor.extract(batch)[0])
            recon = images_to_uint8(_reconstructed(reconstruct, batch))
        reconstructions.add(extractor.extract(recon)[0])
    check(originals.count >= 2, f"`batches` gave {originals.count} images; the statistics need at least 2")
    return frechet_distance(originals.stats(extractor.identity), reconstructions.stats(extractor.identity))


def _reconstructed(reconstruct: Any, batch: Tensor) -> Tensor:
    """``reconstruct`` applied to a uint8 batch as images in [-1, 1]; a module in eval mode, on its device."""
    if not isinstance(reconstruct, nn.Module):
        return reconstruct(uint8_to_images(batch))
    images = uint8_to_images(batch.to(module_device(reconstruct)))
    with eval_mode(reconstruct), torch.no_grad():
        output = reconstruct(images, sample=False) if isinstance(reconstruct, AutoencoderKL) else reconstruct(images)
    return output.recon if isinstance(output, tuple) and hasattr(output, "recon") else output
