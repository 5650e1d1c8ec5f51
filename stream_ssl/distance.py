r"""Distances between shard sets, measured on the features of one backbone, before any training on them.

    stream-ssl distance shards/pool shards/down_a shards/down_b --checkpoint runs/simclr \
        --samples 5000 --out distances.json
    stream-ssl distance s3://b/pool s3://b/down --backbone resnet50 --weights r50.safetensors
    stream-ssl distance shards/pool shards/down_a --backbone resnet10t --weights runs/demo/backbone.safetensors \
        --backbone-options '{channels: [16, 32, 64, 128]}' --image-size 24

The first set (REF, e.g. a pretraining pool) is compared with each OTHER (e.g. downstream sets). Features are
those of the evaluation (`stream_ssl.evaluate`: full decode, shorter side resized to S / 0.875, center crop S,
the backbone's pooled output in float32), from a trained run folder (`--checkpoint`: backbone.safetensors +
config.json) or a timm model name with a local weights file (`--backbone NAME --weights FILE`, safetensors or a
torch state dict; nothing is downloaded), built with `--backbone-options` when the weights are of a model made with
options (the demo's narrow ResNet: `{channels: [16, 32, 64, 128]}`, as train's `--backbone-options`).

Each set contributes a seeded sample of `--samples` images (`evaluate.sample_set`: random shards, a random
window in each), read in batches (on the GPU when there is one) with a progress bar, as is the computation of
the distances of each pair (`--no-progress`: no bars). A set's features are
extracted once per command, and with `--cache-dir` kept on disk per (set contents, backbone weights, image size,
evaluation view, samples, seed), so later comparisons with the same set do not extract it again. Both sides of a
pair use the same number of samples m = min(--samples, sizes), because the estimates depend on it.

Per pair:
- `frechet`: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) between Gaussians fitted to the two feature sets
  (FID when the features are Inception's). Biased upwards at small m: compare values computed with the same m.
- `kid`, `kid_std`: Kernel Inception Distance (Binkowski et al., ICLR 2018): the unbiased estimate of MMD^2 with
  the kernel k(x, y) = (x.y / d + 1)^3, averaged over `--kid-subsets` random subsets of `--kid-subset-size`
  samples per side (at most half the sample, so that draws differ); `kid_std` is the standard deviation over
  the subsets (the standard error of the mean is kid_std / sqrt(subsets)). Unbiased at any m, so it is the one
  to trust at small sample sizes; it can come out slightly negative when the sets are alike.
- `vdna`: a VisualDNA-style distance (Ramtoula et al., "Visual DNA", CVPR 2023): per feature dimension
  ("neuron"), histograms of both sets over a shared range (`--bins`, 1000 as in the paper) compared with the 1-D
  earth mover's distance, averaged over dimensions. With shared bins the 1-D EMD is the L1 distance between the
  two cumulative histograms times the bin width, in feature units. Differences from the paper's default: theirs
  takes every spatial activation of every layer of a frozen Mugs ViT-B/16, each neuron's range fixed beforehand
  from reference data and the EMD counted in bins; ours takes the pooled output of the evaluation backbone (the
  same features as the Frechet distance and kNN), the range of each dimension spanning the two sets compared.

Output: JSON on stdout (`--markdown`: the table instead); `--out FILE.json` also writes the JSON and the
markdown table next to it (FILE.md). Contract: {"pairs": [{"a": REF, "b": OTHER, "frechet", "kid", "kid_std",
"vdna", "samples"}, ...], "backbone": {...}, "sets": {...}, "settings": {...}}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shard_tools.cli import progress_switch, run_main, tool_prog
from shard_tools.shardset import ShardSet
from shard_tools.storage import STORAGE_OPTIONS_HELP, storage_options_arg
from stream_ssl.features import (
    EVAL_VIEW,
    features_of_slices,
    load_backbone,
    open_set,
    progress_bar,
    resolve_device,
    sample_set,
    write_result,
)
from stream_ssl.models.backbone import create_backbone

DEFAULT_SAMPLES = 5000
KID_SUBSETS = 100  # Binkowski et al. / the common FID-KID toolkits
KID_SUBSET_SIZE = 1000
VDNA_BINS = 1000  # Ramtoula et al.: histograms of 1000 bins per neuron


# ----------------------------------------------------------------------------------------------------------
# Distances between two feature sets (rows are samples). Pure functions: numpy in, floats out.


def feature_stats(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the rows of `x`, in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError("need a 2-D array with at least 2 rows")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) for covariance matrices S1, S2 (symmetric PSD).

    Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2, which are those of the symmetric
    PSD matrix S1^1/2 S2 S1^1/2: computed with symmetric eigendecompositions only (no complex sqrtm residue)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, dtype=np.float64)), np.atleast_2d(np.asarray(s2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: means {mu1.shape}, {mu2.shape}; covariances {s1.shape}, {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    return max(d, 0.0)


def frechet_distance(x1: torch.Tensor | np.ndarray, x2: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples)."""
    return frechet_from_stats(*feature_stats(x1), *feature_stats(x2))


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).to(torch.float64)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between the rows of x (m x d) and y (n x d) with k(a, b) = (a.b / d + 1)^3: the mean
    kernel value within x and within y without the diagonal, minus twice the mean across."""
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples per side")
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = 0, device: str = "cpu") -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation over `subsets` draws of
    `mmd2_unbiased` on min(subset_size, len(x), len(y)) samples per side (without replacement within a draw)."""
    x, y = _as_tensor(x).to(device), _as_tensor(y).to(device)
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(max(1, subsets)):
        ix = torch.from_numpy(rng.choice(len(x), m, replace=False)).to(device)
        iy = torch.from_numpy(rng.choice(len(y), m, replace=False)).to(device)
        values.append(mmd2_unbiased(x[ix], y[iy]))
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _histograms(x: np.ndarray, lo: np.ndarray, width: np.ndarray, bins: int) -> np.ndarray:
    """(d, bins) normalized histograms of the columns of x over bins [lo + i w, lo + (i + 1) w); the top edge
    falls in the last bin."""
    n, d = x.shape
    safe = np.where(width > 0, width, 1.0)
    idx = np.clip(np.floor((x - lo) / safe).astype(np.int64), 0, bins - 1)
    flat = idx + np.arange(d, dtype=np.int64) * bins
    return np.bincount(flat.ravel(), minlength=d * bins).reshape(d, bins) / n


def vdna_emd(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, bins: int = VDNA_BINS,
             per_neuron: bool = False) -> float | np.ndarray:
    """Mean over feature dimensions of the 1-D earth mover's distance between the two sets' histograms.

    Each dimension's `bins` bins span [min, max] of that dimension over both sets; the EMD between two
    histograms on the same bins is sum_i |CDF_x(i) - CDF_y(i)| times the bin width (a dimension that is constant
    over both sets contributes 0). `per_neuron`: the array of per-dimension distances instead of the mean."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"need two non-empty 2-D arrays with the same columns, got {x.shape} and {y.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo = np.minimum(x.min(0), y.min(0))
    width = (np.maximum(x.max(0), y.max(0)) - lo) / bins
    cdf_gap = np.cumsum(_histograms(x, lo, width, bins) - _histograms(y, lo, width, bins), axis=1)
    emd = np.abs(cdf_gap[:, :-1]).sum(1) * width  # the last CDF values are both 1
    return emd if per_neuron else float(emd.mean())


def distances(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, seed: int = 0,
              kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE, bins: int = VDNA_BINS,
              device: str = "cpu", progress: bool | str = False) -> dict:
    """Every distance between two feature sets: {"frechet", "kid", "kid_std", "vdna", "samples",
    "kid_subset_size"}, on the first m = min(len(x), len(y)) rows of each (the caller shuffles; both sides then
    weigh the same). KID subsets hold min(kid_subset_size, m // 2) samples per side, so that the draws differ
    and kid_std measures something (at m <= kid_subset_size every draw would be the whole sample). `progress`:
    a bar on stderr counting the three distances, labeled with `progress` when it is text."""
    m = min(len(x), len(y))
    if m < 4:
        raise ValueError(f"the distances need at least 4 samples on each side, got {len(x)} and {len(y)}")
    x, y = x[:m], y[:m]
    size = min(kid_subset_size, m // 2)
    with progress_bar(3, progress, "distances", unit="distance") as bar:
        bar.set_postfix_str(f"Frechet, {m} samples each", refresh=False)
        fd = frechet_distance(x, y)
        bar.update()
        bar.set_postfix_str(f"KID, {max(1, kid_subsets)} draws of {size}", refresh=False)
        k, k_std = kid(x, y, kid_subsets, size, seed, device)
        bar.update()
        bar.set_postfix_str(f"VisualDNA, {bins} bins", refresh=False)
        vdna = vdna_emd(x, y, bins)
        bar.update()
    return {"frechet": fd, "kid": k, "kid_std": k_std, "vdna": vdna, "samples": int(m), "kid_subset_size": int(size)}


# ----------------------------------------------------------------------------------------------------------
# The feature extractor of a run folder or of a timm model with local weights.


@dataclass
class Extractor:
    model: torch.nn.Module
    image_size: int
    description: dict  # backbone name, image size, where the weights come from, their sha256

    @property
    def key(self) -> str:
        return json.dumps(self.description, sort_keys=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state dict (loaded with weights_only=True; a checkpoint that
    nests it under "state_dict" or "model" is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def timm_extractor(name: str, weights: Path, image_size: int = 224, options: dict | None = None) -> Extractor:
    """A timm backbone (no classifier) built with `options` (as train's backbone_options), with weights from a
    local file. Weights the backbone does not have (a classifier head) are ignored and listed; weights it needs
    and the file lacks, or holds with other shapes, are an error."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such weights file (weights are never downloaded)")
    model, _ = create_backbone(name, image_size, **(options or {}))
    try:
        missing, unexpected = model.load_state_dict(_state_dict_of(weights), strict=False)
    except RuntimeError as e:  # a size mismatch: another model, or the same one built with other options
        shapes = sum("size mismatch" in line for line in str(e).splitlines())
        raise ValueError(f"{weights}: {shapes} weights have other shapes than in {name} built with "
                         f"--backbone-options {json.dumps(options or {})} (the run's backbone_options, in its "
                         "config.json, build the same model)") from None
    if missing:
        raise ValueError(f"{weights}: lacks {len(missing)} weights of {name} (e.g. {', '.join(missing[:3])})")
    desc = {"backbone": name, "image_size": image_size, "backbone_options": options or {}, "weights": str(weights),
            "sha256": file_sha256(weights), "ignored_weights": sorted(unexpected)}
    return Extractor(model.eval(), image_size, desc)


def run_extractor(run: Path) -> Extractor:
    """The exported backbone of a trained run folder (backbone.safetensors + config.json)."""
    model, cfg = load_backbone(run)
    size = int(cfg["image_size"])
    desc = {"backbone": cfg["backbone"], "image_size": size, "checkpoint": str(run),
            "sha256": file_sha256(Path(run) / "backbone.safetensors")}
    return Extractor(model, size, desc)


# ----------------------------------------------------------------------------------------------------------
# Features of a seeded sample of a shard set, cached.


class FeatureCache:
    """Features per (set contents, extractor, evaluation view, samples, seed): in memory for the process, and on
    disk as .npy (no pickles) under `folder` when one is given."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else None
        self.memory: dict[str, torch.Tensor] = {}

    @staticmethod
    def key(shard_set: ShardSet, extractor: Extractor, samples: int, seed: int) -> str:
        index = hashlib.sha256(json.dumps(shard_set.meta, sort_keys=True).encode()).hexdigest()
        parts = [shard_set.url, index, extractor.key, json.dumps(EVAL_VIEW, sort_keys=True), str(samples), str(seed)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key}.npy" if self.folder else None
        if path is not None and path.exists():
            self.memory[key] = torch.from_numpy(np.load(path, allow_pickle=False))
            return self.memory[key]
        return None

    def put(self, key: str, feats: torch.Tensor) -> None:
        self.memory[key] = feats
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{key}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, feats.numpy(), allow_pickle=False)
        os.replace(tmp, self.folder / f"{key}.npy")


def set_features(url: str, extractor: Extractor, samples: int, seed: int, cache: FeatureCache, device: str,
                 batch_size: int = 256, progress: bool = False, storage_options: dict | None = None) -> torch.Tensor:
    """Features of a seeded sample of min(samples, size) images of the shard set at `url`, rows in a seeded
    random order (so any prefix is a random subset of the sample)."""
    shard_set = open_set(url, storage_options)
    key = FeatureCache.key(shard_set, extractor, samples, seed)
    feats = cache.get(key)
    if feats is None:
        pieces = sample_set(shard_set, samples, seed)
        feats, _ = features_of_slices(extractor.model, (shard_set,), pieces, extractor.image_size, batch_size,
                                      device, progress=f"features {shard_set.name or url}" if progress else False,
                                      require_labels=False, storage_options=storage_options)
        feats = feats[torch.from_numpy(np.random.default_rng(seed).permutation(len(feats)))]
        cache.put(key, feats)
    return feats


def compare_sets(ref: str, others: Sequence[str], extractor: Extractor, samples: int = DEFAULT_SAMPLES,
                 seed: int = 0, kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                 bins: int = VDNA_BINS, cache_dir: Path | None = None, device: str | None = None,
                 batch_size: int = 256, progress: bool = False, storage_options: dict | None = None) -> dict:
    """Distances from the shard set `ref` to each of `others` (see the module docstring): the JSON contract."""
    if samples < 2:
        raise ValueError(f"--samples must be >= 2, got {samples}")
    t0 = time.perf_counter()
    device = resolve_device(device)
    extractor.model.to(device)
    cache = FeatureCache(cache_dir)

    def feats(url: str) -> torch.Tensor:
        return set_features(url, extractor, samples, seed, cache, device, batch_size, progress, storage_options)

    ref_x = feats(ref)
    pairs, sets = [], {ref: {"sampled": len(ref_x)}}
    for other in others:
        x = feats(other)
        sets[other] = {"sampled": len(x)}
        label = progress and f"distances {Path(str(other).rstrip('/')).name or other}"
        pairs.append({"a": ref, "b": other, **distances(ref_x, x, seed, kid_subsets, kid_subset_size, bins, device,
                                                        progress=label)})
    settings = {"samples": samples, "seed": seed, "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
                "vdna_bins": bins, "device": device, "seconds": time.perf_counter() - t0}
    return {"pairs": pairs, "backbone": extractor.description, "sets": sets, "settings": settings}


def markdown_table(result: dict) -> str:
    """One row per pair."""
    lines = ["| a | b | samples | Frechet | KID (± std over subsets) | VisualDNA EMD |", "|---|---|---|---|---|---|"]
    for p in result["pairs"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['samples']} | {p['frechet']:.4g} | {p['kid']:.4g} ± "
                     f"{p['kid_std']:.2g} | {p['vdna']:.4g} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=tool_prog("python -m stream_ssl.distance"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", metavar="REF", help="shard set every other set is compared with (e.g. the pool)")
    p.add_argument("others", metavar="OTHER", nargs="+", help="shard sets to compare with REF")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="trained run folder (backbone.safetensors + config.json)")
    src.add_argument("--backbone", help="timm model name; needs --weights")
    p.add_argument("--weights", type=Path, help="local weights for --backbone (.safetensors or a torch state dict)")
    p.add_argument("--backbone-options", type=mapping_arg, default={},
                   help="settings --backbone is built with (passed to timm.create_model, as train's "
                        "--backbone-options), JSON or YAML flow style: '{channels: [16, 32, 64, 128]}' (default: {})")
    p.add_argument("--image-size", type=int, default=224, help="input side S for --backbone (default 224)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"images per set, a seeded sample (default {DEFAULT_SAMPLES}; fewer when a set is smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and the KID subsets (default 0)")
    p.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help=f"KID draws (default {KID_SUBSETS})")
    p.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE,
                   help=f"samples per side in each KID draw (default {KID_SUBSET_SIZE}, capped by the samples)")
    p.add_argument("--bins", type=int, default=VDNA_BINS,
                   help=f"histogram bins per feature dimension for the VisualDNA EMD (default {VDNA_BINS})")
    p.add_argument("--cache-dir", type=Path,
                   help="keep features on disk here and reuse them (default: only for this command)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--storage-options", type=storage_options_arg, default={}, help=STORAGE_OPTIONS_HELP)
    p.add_argument("--markdown", action=argparse.BooleanOptionalAction, default=False,
                   help="print the markdown table instead of JSON (default: off)")
    progress_switch(p, default=True)
    p.add_argument("--out", type=Path, help="also write the JSON here, and the markdown table next to it (.md)")
    return p


def mapping_arg(text: str) -> dict:
    """argparse type of a mapping given as JSON or YAML flow style (`{channels: [16, 32]}`)."""
    import yaml

    try:
        value = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not JSON or YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{\"drop_path_rate\": 0.1}}', got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.backbone and not a.weights:
        p.error("--backbone needs --weights (a local file: weights are never downloaded)")
    if a.backbone_options and not a.backbone:
        p.error("--backbone-options go with --backbone (a --checkpoint's config.json has its own)")
    return run_main("distance", lambda: _run(a), usage_errors=(FileNotFoundError, ValueError))


def _run(a: argparse.Namespace) -> int:
    extractor = (run_extractor(a.checkpoint) if a.checkpoint
                 else timm_extractor(a.backbone, a.weights, a.image_size, a.backbone_options))
    result = compare_sets(a.ref, a.others, extractor, a.samples, a.seed, a.kid_subsets, a.kid_subset_size,
                          a.bins, a.cache_dir, a.device, a.batch_size, a.progress, a.storage_options)
    write_result(result, markdown_table(result), a.markdown, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
