r"""Evaluate a pretrained backbone on labeled shard sets: kNN, linear probe, and distribution distance.

    stream-ssl evaluate --checkpoint runs/simclr --train shards/down_train --test shards/down_test \
        --knn --linear --distance --out runs/simclr/eval_down.json

Features are the frozen backbone's pooled outputs, in float32, on one view per image, read straight from the
shard sets (local, s3://, http(s)://). The view is the standard ImageNet evaluation view (torchvision's and
timm's): a full decode (no reduced-resolution JPEG decoding, which training uses), the shorter side resized to
floor(S / 0.875) (bilinear, antialiased), center crop S x S, S the run's image size (`EVAL_VIEW`).

- kNN (`--knn`, also the default when nothing else is asked): L2-normalized features, cosine similarity, the k
  nearest training samples vote for their class with weight exp(sim / T); reported at k=20, T=0.07 (DINO) and
  k=200, T=0.1 (the CIFAR-style setting).
- Linear probe (`--linear`): multinomial logistic regression (L-BFGS, at most 1000 iterations) on standardized
  features (mean and scale from the training set). The inverse regularization C is chosen from a grid on a
  stratified 20% held-out split of `--train`, then the probe is refitted on all of `--train` and scored on
  `--test`: top-1, and top-5 when there are at least 10 classes. A fit that stops at the iteration cap is
  reported (`converged`, `unconverged_C`), not hidden.
- Distribution distance (`--distance [POOL ...]`): between the features (same encoder) of the pretraining pool
  and of the downstream set, the study's proxy for how far the downstream data is from what the model was
  trained on: Frechet distance |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), KID (with its std over subsets)
  and the VisualDNA-style EMD, all computed by `stream_ssl.distance.distances` (see there). Without arguments
  the pool is the run's own pool of N unique samples, rebuilt from its config.json by the plan (same data, N,
  mix and seed), or with `--distance-of source` the whole data that pool is drawn from (the largest pool its
  data and mix allow; the sweep uses this, so runs with different N are compared on the same samples); with
  shard sets as arguments, the pool is those sets. The downstream set is `--train`. Both sides use the same
  number of samples m = min(--distance-samples, pool size, downstream size), because the estimates depend on
  the sample count (Frechet is biased upwards for small m): compare distances computed with the same m. The m pool
  samples are spread over the pool's shard slices in proportion to their sizes (a prefix of each slice, which
  is a uniform random subset because packing shuffles), the m downstream samples are a seeded random subset.

Output: JSON on stdout (`--markdown` prints the table instead); `--out FILE.json` writes the JSON and a
markdown table next to it (`FILE.md`). Progress bars on stderr follow each phase: feature extraction, the linear
probe's fits and the distances (`--no-progress`: none).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shard_tools.cli import progress_switch, run_main, tool_prog
from shard_tools.inputs import open_shard_sets
from shard_tools.quantities import COUNT_HELP, count_arg
from shard_tools.shardset import ShardSet
from shard_tools.storage import STORAGE_OPTIONS_HELP, storage_options_arg
from stream_ssl.data.plan import Slice
from stream_ssl.distance import distances
from stream_ssl.features import (
    EVAL_VIEW,
    extract_features,
    features_of_slices,
    load_backbone,
    open_set,
    progress_bar,
    resolve_device,
    sample_pieces,
    write_result,
)

KNN_SETTINGS = ((20, 0.07), (200, 0.1))  # (k, temperature)
LINEAR_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strength, chosen on the held-out split
LINEAR_MAX_ITER = 1000
DISTANCE_SAMPLES = 5000
EVAL_PROTOCOL = {"view": EVAL_VIEW, "linear_max_iter": LINEAR_MAX_ITER, "distances": ["frechet", "kid", "vdna"]}


# ----------------------------------------------------------------------------------------------------------
# Features.


# ----------------------------------------------------------------------------------------------------------
# kNN and linear probe.


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity: each of the k nearest votes exp(sim / T) for its class.

    The weights are computed as exp((sim - max sim) / T), the same votes up to a positive factor per test
    sample, so small temperatures neither overflow (inf votes) nor underflow (all-zero votes)."""
    if not temperature > 0:
        raise ValueError(f"the kNN temperature must be > 0, got {temperature}")
    dev = train_x.device  # runs where the features are (the evaluation moves them to the GPU when it has one)
    train_x = F.normalize(train_x.float(), dim=1)
    test_x = F.normalize(test_x.float().to(dev), dim=1)
    train_y, test_y = train_y.to(dev), test_y.to(dev)
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    chunk = max(1, min(chunk, (1 << 28) // max(1, len(train_x))))  # similarity blocks of at most 1 GiB
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), classes, device=dev)
        votes.scatter_add_(1, train_y[idx], ((top - top[:, :1]) / temperature).exp())  # top-k is sorted
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_x)


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(0)
    scale = train.std(0)
    scale[scale < 1e-8] = 1.0
    return [(a - mean) / scale for a in (train, *others)]


def _topk(proba: np.ndarray, classes: np.ndarray, y: np.ndarray, k: int) -> float:
    top = classes[np.argsort(-proba, axis=1)[:, :k]]
    return float((top == y[:, None]).any(1).mean())


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    """A fitted multinomial logistic regression and whether L-BFGS converged before `max_iter` iterations
    (sklearn's ConvergenceWarning is caught and turned into that flag)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter, tol=1e-4)  # lbfgs: multinomial for > 2 classes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf, converged and int(np.max(clf.n_iter_)) < max_iter


def linear_probe(train_x: torch.Tensor | np.ndarray, train_y: torch.Tensor | np.ndarray,
                 test_x: torch.Tensor | np.ndarray, test_y: torch.Tensor | np.ndarray,
                 c_grid: Sequence[float] = LINEAR_C_GRID, val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = LINEAR_MAX_ITER, progress: bool | str = False) -> dict:
    """Multinomial logistic regression on standardized frozen features.

    C (inverse L2 strength) is picked from `c_grid` by top-1 on a stratified `val_fraction` split of the
    training set (standardized with the fitting part's statistics); the probe is then refitted with that C on
    the whole training set. Returns top-1 (and top-5 with >= 10 classes) on the test set, the chosen C, the
    held-out accuracy of every C, whether the final fit converged within `max_iter` L-BFGS iterations
    (`converged`) and every C whose fit (held-out or final) stopped at the cap (`unconverged_C`). `progress`:
    a bar on stderr counting the fits (one per C, then the final one), labeled with `progress` when it is text."""
    from sklearn.model_selection import train_test_split

    xtr, ytr = np.asarray(train_x, dtype=np.float64), np.asarray(train_y)
    xte, yte = np.asarray(test_x, dtype=np.float64), np.asarray(test_y)
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise ValueError("the linear probe needs at least 2 classes in the training set")
    counts = np.bincount(np.searchsorted(classes, ytr))
    stratify = ytr if counts.min() >= 2 else None
    n_val = max(len(classes), int(round(val_fraction * len(ytr))))
    fit_i, val_i = train_test_split(np.arange(len(ytr)), test_size=n_val, random_state=seed, stratify=stratify)
    a, b = _standardize(xtr[fit_i], xtr[val_i])
    scores, unconverged = {}, []
    with progress_bar(len(c_grid) + 1, progress, "linear probe", unit="fit") as bar:
        for c in c_grid:
            bar.set_postfix_str(f"C={c:g}, {len(fit_i)} x {xtr.shape[1]} features", refresh=False)
            clf, ok = _fit_logistic(a, ytr[fit_i], c, max_iter)
            scores[c] = float((clf.predict(b) == ytr[val_i]).mean())
            unconverged += [] if ok else [c]
            bar.update()
        best = max(c_grid, key=lambda c: (scores[c], -c))  # ties: the stronger regularization
        a, b = _standardize(xtr, xte)
        bar.set_postfix_str(f"final fit, C={best:g}, {len(ytr)} x {xtr.shape[1]} features", refresh=False)
        clf, converged = _fit_logistic(a, ytr, best, max_iter)
        bar.update()
    proba = clf.predict_proba(b)
    out = {"top1": _topk(proba, clf.classes_, yte, 1), "C": best, "val_top1": scores[best],
           "val_top1_by_C": {f"{c:g}": s for c, s in scores.items()}, "converged": converged,
           "max_iter": max_iter, "unconverged_C": sorted(set(unconverged + ([] if converged else [best])))}
    if len(classes) >= 10:
        out["top5"] = _topk(proba, clf.classes_, yte, 5)
    return out


# ----------------------------------------------------------------------------------------------------------
# Pools and samples.


def run_pool(cfg: dict, whole_source: bool = False,
             storage_options: dict | None = None) -> tuple[tuple[ShardSet, ...], list[Slice], str]:
    """The pool of unique samples a run trained on (its shard slices), rebuilt from the run's config by the plan.

    `whole_source`: instead, the largest pool the run's data and mix allow (every sample when there is no mix),
    i.e. the distribution the run's N samples were drawn from; pools are nested, so it contains the run's pool."""
    from stream_ssl.data.plan import make_plan

    sets = tuple(open_shard_sets(str(cfg["data"]), storage_options))
    seed, mix = int(cfg.get("seed", 0)), cfg.get("mix")

    def plan_for(n):
        return make_plan(sets, n, 1, mix, world_size=1, num_workers=0, batch_size=1, seed=seed)

    if whole_source:
        lo, hi = 1, sum(s.num_samples for s in sets)  # the largest N the mix can fill: plan_for(N) succeeds
        while lo < hi:
            mid = (lo + hi + 1) // 2
            try:
                plan_for(mid)
                lo = mid
            except ValueError:
                hi = mid - 1
        plan = plan_for(lo)
        desc = f"run source: {plan.unique_samples} samples of {', '.join(s.url for s in sets)}"
    else:
        plan = plan_for(cfg.get("unique_samples", "1.0"))
        desc = f"run pool: {plan.unique_samples} unique samples of {', '.join(s.url for s in sets)}"
    pieces = [Slice(int(s), int(h), 0, int(e)) for s, h, e in zip(plan.unit_source, plan.unit_shard, plan.unit_stop)]
    return sets, pieces, desc


def sets_pool(urls: Sequence[str],
              storage_options: dict | None = None) -> tuple[tuple[ShardSet, ...], list[Slice], str]:
    """Every sample of the given shard sets, as a pool."""
    sets = tuple(open_set(u, storage_options) for u in urls)
    pieces = [Slice(i, j, 0, info.samples) for i, s in enumerate(sets) for j, info in enumerate(s.shards)]
    return sets, pieces, f"shard sets: {', '.join(s.url for s in sets)}"


# ----------------------------------------------------------------------------------------------------------
# The evaluation of one run.


def evaluate_sets(run: Path, downstream: Sequence[tuple[str, str]], knn: bool = True, linear: bool = False,
                  distance: bool | str | Sequence[str] = False, distance_samples: int = DISTANCE_SAMPLES,
                  batch_size: int = 256, device: str | None = None, progress: bool = False,
                  seed: int = 0, storage_options: dict | None = None) -> list[dict]:
    """Evaluate one run on several (train, test) downstream pairs; the model and pool features load once.

    `distance`: False (none), True or "pool" (the run's own pool of N samples), "source" (the whole data the
    run's pool is drawn from, see `run_pool`), or a list of shard-set URLs (those sets). `storage_options`:
    fsspec options for every URL (as train.py's --storage-options; default: the environment's)."""
    so = storage_options
    t0 = time.perf_counter()
    device = resolve_device(device)
    model, cfg = load_backbone(run)
    model.to(device)
    size = int(cfg["image_size"])
    pool = _distance_pool(cfg, distance, so)
    results = []
    for train, test in downstream:
        t1 = time.perf_counter()
        train_set, test_set = open_set(train, so), open_set(test, so)
        name = train_set.name or "train"
        train_x, train_y = extract_features(model, train_set, size, batch_size, device,
                                            progress=progress and f"features {name}", storage_options=so)
        test_x, test_y = extract_features(model, test_set, size, batch_size, device,
                                          progress=f"features {test_set.name or 'test'}" if progress else False,
                                          storage_options=so)
        result = {"checkpoint": str(run), "backbone": cfg["backbone"], "image_size": size,
                  "feature_dim": int(train_x.shape[1]), "train": train, "test": test,
                  "train_samples": len(train_y), "test_samples": len(test_y),
                  "classes": int(np.unique(train_y.numpy()).size)}
        if knn:
            result["knn"] = {}
            bank = (train_x.to(device), train_y.to(device))
            for k, t in KNN_SETTINGS:
                result["knn"][f"k{k}_t{t:g}"] = knn_accuracy(*bank, test_x, test_y, k=k, temperature=t)
            result["knn_top1"] = result["knn"][f"k{KNN_SETTINGS[0][0]}_t{KNN_SETTINGS[0][1]:g}"]
        if linear:
            result["linear"] = linear_probe(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(),
                                            seed=seed, progress=progress and f"linear probe {name}")
        if pool is not None:
            if "feats" not in pool:
                pool["feats"], _ = features_of_slices(
                    model, pool["sets"], sample_pieces(pool["pieces"], min(distance_samples, pool["size"])), size,
                    batch_size, device, progress="features pool" if progress else False, require_labels=False,
                    storage_options=so)
            result["distance"] = {**pool_distance(pool, train_x, distance_samples, seed, device,
                                                  progress=progress and f"distances {name}"),
                                  "downstream": train}
        result["seconds"] = time.perf_counter() - t1
        results.append(result)
    for r in results:
        r["total_seconds"] = time.perf_counter() - t0
    return results


def _distance_pool(cfg: dict, distance: bool | str | Sequence[str], storage_options: dict | None) -> dict | None:
    """The pool the distance is measured from (see `evaluate_sets`), features not yet extracted; None for none."""
    if not distance:
        return None
    if distance is True or distance in ("pool", "source"):
        sets, pieces, desc = run_pool(cfg, whole_source=distance == "source", storage_options=storage_options)
    elif isinstance(distance, str):
        raise ValueError(f"distance: expected pool, source or shard sets, got {distance!r}")
    else:
        sets, pieces, desc = sets_pool(list(distance), storage_options)
    return {"sets": sets, "pieces": pieces, "desc": desc, "size": sum(len(p) for p in pieces)}


def pool_distance(pool: dict, down_x: torch.Tensor, distance_samples: int, seed: int, device: str,
                  progress: bool | str = False) -> dict:
    """`stream_ssl.distance.distances` between m = min(distance_samples, pool size, len(down_x)) pool features
    (the pool's sample, seeded order) and m downstream features (a seeded random subset); `progress`: a bar."""

    m = min(distance_samples, pool["size"], len(down_x))
    if m < 4:
        raise ValueError("the distance needs at least 4 samples on each side")
    feats = pool["feats"]
    feats = feats[torch.from_numpy(np.random.default_rng(seed).permutation(len(feats)))[:m]]
    down = down_x[torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(down_x))[:m])]
    return {**distances(feats, down, seed=seed, device=device, progress=progress), "pool": pool["desc"],
            "pool_samples": pool["size"]}


def evaluate(run: Path, train: str, test: str, knn: bool = True, linear: bool = False,
             distance: bool | str | Sequence[str] = False, distance_samples: int = DISTANCE_SAMPLES,
             batch_size: int = 256, device: str | None = None, progress: bool = False, seed: int = 0,
             storage_options: dict | None = None) -> dict:
    """Evaluate one run on one downstream (train, test) pair; see the module docstring."""
    return evaluate_sets(run, [(train, test)], knn=knn, linear=linear, distance=distance,
                         distance_samples=distance_samples, batch_size=batch_size, device=device, progress=progress,
                         seed=seed, storage_options=storage_options)[0]


def _c_list(values: Sequence[float]) -> str:
    return ", ".join(f"{c:g}" for c in values)


def markdown_table(result: dict) -> str:
    """One evaluation as a two-column markdown table."""
    rows = [("checkpoint", result["checkpoint"]), ("backbone", f"{result['backbone']} @ {result['image_size']} px"),
            ("train / test", f"{result['train']} ({result['train_samples']}) / {result['test']} "
                             f"({result['test_samples']})"),
            ("classes", str(result["classes"]))]
    for name, acc in result.get("knn", {}).items():
        k, t = name[1:].split("_t")
        rows.append((f"kNN top-1 (k={k}, T={t})", f"{acc:.4f}"))
    if "linear" in result:
        lin = result["linear"]
        rows.append((f"linear top-1 (C={lin['C']:g})", f"{lin['top1']:.4f}"))
        if "top5" in lin:
            rows.append(("linear top-5", f"{lin['top5']:.4f}"))
        if lin.get("unconverged_C"):
            rows.append(("linear: stopped at the iteration cap", f"C = {_c_list(lin['unconverged_C'])} "
                                                                  f"({lin['max_iter']} iterations)"))
    if "distance" in result:
        d = result["distance"]
        rows.append((f"Frechet distance ({d['samples']} samples each)", f"{d['frechet']:.4f}"))
        rows.append(("KID (± std over subsets)", f"{d['kid']:.4g} ± {d['kid_std']:.2g}"))
        rows.append(("VisualDNA EMD (mean over feature dimensions)", f"{d['vdna']:.4g}"))
        rows.append(("pool", d["pool"]))
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=tool_prog("python -m stream_ssl.evaluate"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder written by stream-ssl train")
    p.add_argument("--train", required=True, help="labeled shard set to fit the probes on (the downstream set)")
    p.add_argument("--test", required=True, help="labeled shard set to score")
    p.add_argument("--knn", action=argparse.BooleanOptionalAction,
                   help="kNN top-1 at k=20, T=0.07 and k=200, T=0.1 (default: on unless --linear or --distance)")
    p.add_argument("--linear", action=argparse.BooleanOptionalAction, default=False,
                   help="linear probe (logistic regression, C chosen on a split; default: off)")
    p.add_argument("--distance", nargs="*", metavar="POOL",
                   help="Frechet, KID and VisualDNA distances between pool and --train features "
                        "(stream_ssl.distance); no value: the run's own pool")
    p.add_argument("--distance-of", choices=("pool", "source"), default="pool",
                   help="without POOL sets: the run's N-sample pool (default) or the whole source it was drawn from")
    p.add_argument("--distance-samples", type=count_arg, default=DISTANCE_SAMPLES,
                   help=f"samples per side for the distance, {COUNT_HELP} (default {DISTANCE_SAMPLES}, capped by "
                        "both sizes)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the held-out split and the distance subsets (default 0)")
    p.add_argument("--storage-options", type=storage_options_arg, default={},
                   help=f"{STORAGE_OPTIONS_HELP}; a run's config.json holds them redacted, so give them again here")
    p.add_argument("--markdown", action=argparse.BooleanOptionalAction, default=False,
                   help="print the markdown table instead of JSON (default: off)")
    progress_switch(p, default=True)
    p.add_argument("--out", type=Path, help="also write the JSON here, and the markdown table next to it (.md)")
    a = p.parse_args(argv)
    return run_main("evaluate", lambda: _run(a), log_folder=a.checkpoint, usage_errors=(ValueError, FileNotFoundError))


def _run(a: argparse.Namespace) -> int:
    distance: bool | str | list[str] = False if a.distance is None else (a.distance or a.distance_of)
    knn = a.knn if a.knn is not None else not (a.linear or a.distance is not None)
    result = evaluate(a.checkpoint, a.train, a.test, knn=knn, linear=a.linear, distance=distance,
                      distance_samples=a.distance_samples, batch_size=a.batch_size, device=a.device,
                      progress=a.progress, seed=a.seed, storage_options=a.storage_options)
    lin = result.get("linear", {})
    if lin.get("unconverged_C"):
        print(f"note: the linear probe stopped at its cap of {lin['max_iter']} L-BFGS iterations for C = "
              f"{_c_list(lin['unconverged_C'])} (chosen: C = {lin['C']:g})", file=sys.stderr)
    write_result(result, markdown_table(result), a.markdown, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
