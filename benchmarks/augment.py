"""Augmentation throughput per core against the torchvision baseline, all measured in the same run.

    python -m benchmarks.augment [--images 256] [--baseline-images 96] [--batch 64] [--size 224]
                                 [--recipes simclr,simclr-noblur,dino] [--repeats 3] [--gpu]
    python -m benchmarks.augment --quick      # every variant once at toy sizes (seconds): does it still run?

Renders photo-like 500x375 JPEGs (smooth multi-scale noise, flat shapes, grain; q90, ~50 KB), then times,
per recipe (simclr: two views at --size px; dino: two at --size + eight local views at 3/7 of it), best of
--repeats, alternating the variants so that they share the machine's load:

  (a) torchvision  PIL decode + the full torchvision.transforms.v2 pipeline per sample and view (RRC, flip,
                   ColorJitter p=0.8, RandomGrayscale, GaussianBlur p=0.5 for simclr), one process
  (b) ours         worker part (decode_views: draft decode + RRC + flip on uint8, to CHW batches) + the
                   batched photometric part (`photometric`) on the CPU
  (c) dali-cpu     header check + draws + the DALI pipeline with device_id=None, one DALI thread
  (d) decode+crop  decode_views alone: the ceiling of any CPU path
  with --gpu (and a GPU): (e) dali-mixed (nvJPEG, augmentation on the GPU) and (f) ours with the photometric
  part on the GPU (CPU time = the worker part; the GPU part is timed with synchronization and added).

Everything runs in this process with torch and DALI limited to one thread, and CPU variants are timed in
CPU seconds of this process (time.process_time, all threads), so images/s is per core and holds up on a
loaded machine; the GPU variants are timed by the wall clock. Prints
images/s and the ratios (b)/(a), (c)/(a), (b)/(d); the target is (b) >= 4x (a) for the SimCLR recipe.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from benchmarks.quick import parse_quick
from stream_ssl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewSpec,
    decode_views,
    dino_views,
    photometric,
    simclr_views,
    to_chw,
)


def photo_jpeg(seed: int, w: int = 500, h: int = 375, quality: int = 90, grain: float = 4.5) -> bytes:
    """A photo-like JPEG: smooth noise at several scales, a few flat shapes, slight blur, film grain."""
    rng = np.random.default_rng([seed, 0xB3])
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((3, 120), (8, 60), (24, 30), (64, 14)):
        small = rng.random((cells * h // w + 2, cells + 2, 3))
        up = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        img += (np.asarray(up, np.float32) / 255 - 0.5) * amp
    img += 128 + rng.normal(0, 40, 3).astype(np.float32)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(-50, w)), int(rng.integers(-50, h))
        box = (x0, y0, x0 + int(rng.integers(20, 250)), y0 + int(rng.integers(20, 200)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    arr = np.asarray(im, np.float32) + rng.normal(0, grain, (h, w, 1)).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def recipe(name: str, size: int) -> list[ViewSpec]:
    if name == "simclr":
        return simclr_views(size, blur=True)
    if name == "simclr-noblur":
        return simclr_views(size, blur=False)
    if name == "dino":  # 2 global views at `size` + 8 local views at 96 px (3/7 of 224)
        return dino_views(size, max(8, round(size * 3 / 7)), 8)
    raise SystemExit(f"unknown recipe {name!r}")


def torchvision_pipeline(spec: ViewSpec):
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
           v2.RandomHorizontalFlip(spec.flip_p),
           v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
           v2.RandomGrayscale(spec.gray_p)]
    if spec.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(spec.kernel_size(), spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(round(255 * spec.solarize_threshold), p=spec.solarize_p))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


# ----------------------------------------------------------------------------------------------------------
# Variants: each processes `datas` and returns seconds (of CPU-side work, plus synchronized GPU work).


def run_torchvision(datas, specs, batch, state, clock=time.process_time):
    pipes = state.setdefault("tv", [torchvision_pipeline(s) for s in specs])
    t = clock()
    for d in datas:
        im = Image.open(io.BytesIO(d)).convert("RGB")
        for p in pipes:
            p(im)
    return clock() - t


def _worker(datas, specs, batch, rng):
    for i in range(0, len(datas), batch):
        crops = [decode_views(d, specs, rng) for d in datas[i:i + batch]]
        yield [to_chw([c[v] for c in crops]) for v in range(len(specs))]


def run_ours(datas, specs, batch, state, device="cpu", clock=time.process_time):
    rng, g = np.random.default_rng(0), torch.Generator(device=device)
    g.manual_seed(0)
    worker = photo = 0.0
    t = clock()
    for views in _worker(datas, specs, batch, rng):
        t1 = clock()
        worker += t1 - t
        out = [photometric(v.to(device), s, g) for v, s in zip(views, specs)]
        if device != "cpu":
            torch.cuda.synchronize()  # CPU time spent waiting here is counted as the GPU part
        assert out[0].dtype == torch.float32
        t = clock()
        photo += t - t1
    state.setdefault("parts", {})[device] = (worker, photo)
    return worker + photo


def run_decode_crop(datas, specs, batch, state, clock=time.process_time):
    rng = np.random.default_rng(0)
    t = clock()
    for d in datas:
        decode_views(d, specs, rng)
    return clock() - t


def run_dali(datas, specs, batch, state, device_id=None, clock=time.process_time):
    from stream_ssl.data.dali import DaliAugment
    from stream_ssl.data.encoded import check_encoded, draw_views

    key = f"dali{device_id}"
    if key not in state:
        state[key] = DaliAugment(specs, batch, device_id=device_id, num_threads=1)
        warm = [np.frombuffer(d, np.uint8) for d in datas[:batch]]
        state[key].run(warm, draw_views([check_encoded(d) for d in datas[:batch]], specs,
                                        np.random.default_rng(1), torch.Generator()))
    aug = state[key]
    rng, g = np.random.default_rng(0), torch.Generator()
    t = clock()
    for i in range(0, len(datas), batch):
        chunk = datas[i:i + batch]
        sizes = [check_encoded(d) for d in chunk]
        out = aug.run([np.frombuffer(d, np.uint8) for d in chunk], draw_views(sizes, specs, rng, g))
        if device_id is not None:
            torch.cuda.synchronize()
        assert out[0].shape[0] == len(chunk)
    return clock() - t


QUICK = {"images": 8, "baseline_images": 4, "batch": 4, "size": 32, "repeats": 1}  # --quick: a few seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256, help="JPEGs per variant (default: 256)")
    ap.add_argument("--baseline-images", type=int, default=96,
                    help="images for the (slow) torchvision baseline (default: 96)")
    ap.add_argument("--batch", type=int, default=64, help="batch of the batched variants (default: 64)")
    ap.add_argument("--size", type=int, default=224, help="side of the global views in px (default: 224)")
    ap.add_argument("--recipes", default="simclr,simclr-noblur,dino",
                    help="comma-separated, of simclr, simclr-noblur, dino (default: all three)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, the best kept (default: 3)")
    ap.add_argument("--dali", action=argparse.BooleanOptionalAction, default=True,
                    help="also the DALI pipelines when DALI is installed (default: on)")
    ap.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=False,
                    help="also DALI mixed and the photometric part on the GPU (default: off)")
    ap.add_argument("--quick", action=argparse.BooleanOptionalAction, default=False,
                    help="toy sizes, every variant once, in seconds: checks that the benchmark runs, its figures "
                         f"mean nothing ({', '.join(f'{k}={v}' for k, v in QUICK.items())}; options given win; "
                         "default: off)")
    args = parse_quick(ap, argv, QUICK)
    torch.set_num_threads(1)
    gpu = args.gpu and torch.cuda.is_available()
    if not gpu:
        why = "no GPU is available" if args.gpu else "--gpu not given"
        print(f"note: rows (e) dali-mixed and (f) ours with the photometric part on the GPU left out: {why}")
    dali = args.dali
    if dali:
        from stream_ssl.data.dali import dali_available

        if not dali_available():
            print("note: rows (c) dali-cpu and (e) dali-mixed left out: DALI is not installed")
            dali = False
    else:
        print("note: rows (c) dali-cpu and (e) dali-mixed left out: --no-dali given")

    t0 = time.perf_counter()
    datas = [photo_jpeg(i) for i in range(args.images)]
    kb = np.mean([len(d) for d in datas]) / 1000
    print(f"{len(datas)} photo-like 500x375 JPEGs (q90, mean {kb:.0f} KB) in {time.perf_counter() - t0:.1f}s; "
          f"one thread per variant; best of {args.repeats}")
    baseline = datas[: args.baseline_images]

    for name in args.recipes.split(","):
        specs = recipe(name, args.size)
        variants = {
            "(a) torchvision": (run_torchvision, baseline, {}),
            "(b) ours": (run_ours, datas, {}),
            "(d) decode+crop": (run_decode_crop, datas, {}),
        }
        if dali:
            variants["(c) dali-cpu"] = (run_dali, datas, {})
        if gpu:
            wall = time.perf_counter  # GPU work is not CPU time: wall clock for these
            variants["(f) ours, photometric on GPU"] = (run_ours, datas, {"device": "cuda", "clock": wall})
            if dali:
                variants["(e) dali-mixed"] = (run_dali, datas, {"device_id": 0, "clock": wall})
        state: dict = {}
        best = {k: float("inf") for k in variants}
        parts: dict = {}
        for fn, data, kw in variants.values():  # warm-up (pipelines, kernels, caches)
            fn(data[: args.batch], specs, args.batch, state, **kw)
        for _ in range(args.repeats):
            for k, (fn, data, kw) in variants.items():
                dt = fn(data, specs, args.batch, state, **kw)
                if dt < best[k]:
                    best[k] = dt
                    if "parts" in state and fn is run_ours:
                        parts[k] = state["parts"][kw.get("device", "cpu")]
        rate = {k: len(variants[k][1]) / best[k] for k in variants}
        v0 = specs[0]
        sides = [v.size for v in specs]
        views = " + ".join(f"{sides.count(s)}x{s}" for s in dict.fromkeys(sides))
        print(f"\nrecipe {name}: views {views} px, jitter ({v0.brightness:g}, {v0.contrast:g}, "
              f"{v0.saturation:g}, {v0.hue:g}) p={v0.jitter_p:g}, gray {v0.gray_p:g}, "
              f"blur {'/'.join(f'{v.blur_p:g}' for v in dict.fromkeys(specs))}")
        for k in sorted(rate):
            extra = ""
            if k in parts:
                n = len(variants[k][1])
                w, p = parts[k]
                extra = f"   (worker {n / w:7.1f} img/s, photometric {n / p:7.1f} img/s)"
            print(f"  {k:32s} {rate[k]:8.1f} img/s per core{extra}")
        a, b, d = rate["(a) torchvision"], rate["(b) ours"], rate["(d) decode+crop"]
        print(f"  (b)/(a) = {b / a:.2f}x" + ("   (target >= 4x)" if name == "simclr" else ""))
        if "(c) dali-cpu" in rate:
            print(f"  (c)/(a) = {rate['(c) dali-cpu'] / a:.2f}x")
        print(f"  (b)/(d) = {b / d:.2f}")
        if "(b) ours" in parts:  # what a loader worker does when the photometric part runs on the GPU
            worker = len(variants["(b) ours"][1]) / parts["(b) ours"][0]
            print(f"  (b, worker part only)/(a) = {worker / a:.2f}x   (photometric on the training device)")
        if gpu:
            f = rate["(f) ours, photometric on GPU"]
            print(f"  (f)/(a) = {f / a:.2f}x")
            if "(e) dali-mixed" in rate:
                print(f"  (e)/(a) = {rate['(e) dali-mixed'] / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
