"""Streaming SSL pretraining at a fixed budget with a controlled number of unique samples.

    python stream_ssl/train.py --data shards/pool --unique-samples 10% --budget-samples 50K \
        --method simclr --backbone resnet18 --batch-size 256 --image-size 64 --out runs/simclr
    python stream_ssl/train.py --config configs/methods/dino.yaml --data shards/pool --out runs/dino
    accelerate launch stream_ssl/train.py ...   # same command, many processes / nodes

Batches and steps. `--batch-size` is the micro-batch of one process (one forward pass); an optimizer step
accumulates `--grad-accum` micro-batches, so the global batch is G = processes x batch x accum. The plan is
built with the per-process batch of one optimizer step (batch x accum), so plan steps are optimizer steps
(budget // G, the plan's global batch is G, and what it reports as dropped is all that is dropped); the loader
splits each step's per-process batch into `accum` micro-batches (`make_loader(micro_batches=...)`). The
learning rate is lr x G / 256; every schedule (lr, weight decay, EMA momentum, teacher temperature) is a
function of the optimizer step. The resume position is the optimizer step; since step k covers stream samples
[k * G, (k + 1) * G) whatever the split, a run resumes on another number of processes when G is unchanged.

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` starts two processes, and this
trainer asks Accelerate for CPU mode so they form a gloo group (without that, Accelerate 1.15 treats each
process as a single-process run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from safetensors.torch import save_file

from shard_tools.numbers import parse_bytes, parse_count
from shard_tools.shardset import load_shard_set
from shard_tools.storage import parse_storage_options
from stream_ssl.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from stream_ssl.config import TrainConfig, config_json, parse_config
from stream_ssl.data.augment import device_views
from stream_ssl.data.loader import make_loader
from stream_ssl.data.plan import make_plan
from stream_ssl.distributed import all_gather_objects
from stream_ssl.methods import build_method
from stream_ssl.metrics import MetricsLog
from stream_ssl.models.backbone import create_backbone
from stream_ssl.optim import OPTIMIZERS, build_optimizer, cosine_value, warmup_cosine

CHECKPOINT_FORMAT = 2
# Test hook: the process SIGKILLs itself right after writing the checkpoint of this optimizer step.
KILL_ENV = "STREAM_SSL_KILL_AFTER_CHECKPOINT"


class RunError(ValueError):
    """A problem with the run's settings or its output folder, reported as `error: ...`."""


# ----------------------------------------------------------------------------------------------------------
# Set-up helpers.


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None
    cpu = launched and not torch.cuda.is_available()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=True)
    return Accelerator(mixed_precision=cfg.precision, cpu=cpu, kwargs_handlers=[ddp])


def release_accelerator() -> None:
    """Forget Accelerate's per-run state (precision, gradient state) but keep the process group, so several
    runs can follow each other in one process (tests, sweeps)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def check_settings(cfg: TrainConfig) -> None:
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise RunError("--batch-size and --grad-accum must be >= 1")
    if cfg.optimizer not in OPTIMIZERS:
        raise RunError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.precision not in ("no", "bf16", "fp16"):
        raise RunError(f"unknown precision {cfg.precision!r}; choose no, bf16 or fp16")
    if bool(cfg.knn_train) != bool(cfg.knn_test):
        raise RunError("the kNN monitor needs both --knn-train and --knn-test")
    if cfg.decoder not in ("pil", "dali"):
        raise RunError(f"unknown decoder {cfg.decoder!r}; choose pil or dali")
    if cfg.decoder == "dali":
        from stream_ssl.data.dali import require_dali

        try:
            require_dali()
        except ImportError as e:
            raise RunError(str(e)) from None


def check_output_folder(cfg: TrainConfig, out: Path, global_batch: int) -> None:
    """Refuse to mix two different runs in one folder (read-only: every process runs it)."""
    ckpt = latest_checkpoint(out)
    if ckpt is not None and cfg.resume == "never":
        raise RunError(f"{out} already holds a run (checkpoint {ckpt.name}); use --resume auto to continue it, "
                       "or choose another --out")
    saved = out / "config.json"
    if not saved.exists() or ckpt is None:
        return
    old = json.loads(saved.read_text())
    diffs = [f"{k}: {old.get(k)!r} there vs {getattr(cfg, k)!r} now"
             for k in TrainConfig.IDENTITY if old.get(k) != getattr(cfg, k)]
    run_info = out / "run.json"
    if run_info.exists():
        old_g = json.loads(run_info.read_text()).get("global_batch")
        if old_g is not None and old_g != global_batch:
            diffs.append(f"global batch: {old_g} there vs {global_batch} now")
    if diffs:
        raise RunError(f"{out} holds a different run ({'; '.join(diffs)}); choose another --out or delete it")


def photometric_generator(seed: int, step: int, rank: int, device: torch.device, micro: int = 0) -> torch.Generator:
    """The generator of the on-device photometric draws of (step, micro-batch, rank): a resumed run draws the
    same augmentations as an uninterrupted one."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 131 + micro)
    return g


# ----------------------------------------------------------------------------------------------------------
# Training.


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one pretraining run; returns the run summary (also written to OUT/summary.json)."""
    acc = make_accelerator(cfg)
    mkldnn = torch.backends.mkldnn.enabled
    try:
        if cfg.precision != "no" and acc.device.type == "cpu" and mkldnn:
            # oneDNN's reduced-precision convolution backward on CPU (torch 2.14.1) returns NaN weight gradients
            # for tiny feature maps (seen with 14 px local crops); the native kernels are slower but correct.
            torch.backends.mkldnn.enabled = False
            acc.print("note: mixed precision on CPU: oneDNN disabled (its bf16 convolution backward can give NaN)")
        return _train(acc, cfg)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        release_accelerator()


def _train(acc: Accelerator, cfg: TrainConfig) -> dict:
    check_settings(cfg)
    out = Path(cfg.out)
    rank, world_size = acc.process_index, acc.num_processes
    accum = cfg.grad_accum
    global_batch = world_size * cfg.batch_size * accum

    budget = parse_count(cfg.budget_samples, None, "--budget-samples")
    if budget < global_batch:
        raise RunError(f"--budget-samples {budget} is smaller than one global batch "
                       f"({world_size} processes x {cfg.batch_size} x {accum} accumulation = {global_batch})")
    storage = parse_storage_options(cfg.storage_options)
    sets = [load_shard_set(u, storage) for u in cfg.data.split(",") if u]
    plan = make_plan(sets, cfg.unique_samples, cfg.budget_samples, cfg.mix, world_size, cfg.num_workers,
                     cfg.batch_size * accum, cfg.seed, shuffle_window=cfg.shuffle_window,
                     shuffle_block=None if cfg.shuffle_block < 0 else cfg.shuffle_block)
    total = plan.steps  # optimizer steps
    check_output_folder(cfg, out, global_batch)

    set_seed(cfg.seed)
    backbone, dim = create_backbone(cfg.backbone, cfg.image_size, **cfg.backbone_options)
    method = build_method(cfg.method, backbone, dim, **cfg.method_options)
    if method.needs_batch_stats and cfg.batch_size < 2:
        raise RunError(f"{cfg.method} uses batch statistics; --batch-size (per process, per micro-batch) "
                       "must be >= 2")
    views = method.views(cfg.image_size)
    peak_lr = cfg.lr * global_batch / 256
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(), peak_lr, cfg.weight_decay, cfg.momentum)
    for g in optimizer.param_groups:
        g["base_weight_decay"] = g["weight_decay"]
    warmup = max(1, int(cfg.warmup_fraction * total)) if cfg.warmup_fraction > 0 else 0

    start_step, state = 0, None
    if cfg.resume not in ("auto", "never"):
        ckpt = Path(cfg.resume)
        if not ckpt.is_file():
            raise RunError(f"--resume {cfg.resume}: no such checkpoint file (use auto, never or a step-*.pt file)")
    else:
        ckpt = latest_checkpoint(out) if cfg.resume == "auto" else None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RunError(f"{ckpt}: checkpoint format {state.get('format')!r}, this trainer reads {CHECKPOINT_FORMAT}")
        if state["global_batch"] != global_batch:
            raise RunError(f"{ckpt} was written with a global batch of {state['global_batch']}, this run has "
                           f"{global_batch}: resume needs the same global batch")
        method.load_state_dict(state["model"])
        start_step = int(state["step"])

    acc.wait_for_everyone()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config_json(cfg))
        (out / "run.json").write_text(json.dumps({"global_batch": global_batch, "world_size": world_size,
                                                  "batch_size": cfg.batch_size, "grad_accum": accum,
                                                  "optimizer_steps": total, "peak_lr": peak_lr}, indent=1) + "\n")
        acc.print(plan.describe())
        acc.print(f"optimizer steps: {total} of global batch {global_batch} ({world_size} processes x "
                  f"{cfg.batch_size} x {accum} accumulation); peak lr {peak_lr:.4g}")
    acc.wait_for_everyone()

    if cfg.sync_bn and world_size > 1:
        if acc.device.type == "cuda":
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            acc.print(f"note: --sync-bn ignored: SyncBatchNorm needs GPUs (device {acc.device})")
    model, optimizer = acc.prepare(method, optimizer)
    set_seed(cfg.seed + 1 + rank)  # per-process stream for dropout / drop path (the model init above is shared)
    loader_options = dict(storage_options=storage, seed=cfg.seed, micro_batches=accum,
                          cache_dir=cfg.cache_dir or None, cache_size=parse_bytes(cfg.cache_size, "--cache-size"),
                          skip_fraction=cfg.skip_fraction)
    if cfg.decoder == "dali":
        from stream_ssl.data.dali import make_dali_loader

        device_id = (acc.device.index or 0) if acc.device.type == "cuda" else None  # None: CPU-only pipeline
        loader = make_dali_loader(plan, rank, views, start_step, cfg.num_workers, device_id=device_id,
                                  num_threads=cfg.dali_threads, **loader_options)
    else:
        loader = make_loader(plan, rank, views, start_step, cfg.num_workers, **loader_options)
    batches = iter(loader)  # draws the loader's base seed from the global RNG: before the RNG is restored
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
        ranks = state.get("ranks") or []
        if len(ranks) == world_size:
            set_rng_state(ranks[rank]["rng"])
            if hasattr(method, "load_rank_state") and ranks[rank].get("method") is not None:
                method.load_rank_state(ranks[rank]["method"])
        else:
            acc.print(f"note: the checkpoint has per-process state for {len(ranks)} processes, this run has "
                      f"{world_size}; random streams restart from the seed")
        acc.print(f"resumed from {ckpt} at optimizer step {start_step} of {total}")
        del state

    metrics = MetricsLog(out, start_step, cfg.tensorboard) if acc.is_main_process else None
    keys_log = None
    if cfg.log_keys:
        (out / "keys").mkdir(parents=True, exist_ok=True)
        keys_path = out / "keys" / f"rank-{rank}.txt"
        kept = []
        if start_step and keys_path.exists():  # drop what a killed run logged after its last checkpoint
            with open(keys_path) as f:
                kept = [line for line in f if int(line.split(" ", 1)[0]) < start_step]
        keys_log = open(keys_path, "w", buffering=1)
        keys_log.writelines(kept)
    progress = None
    if acc.is_main_process and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, initial=start_step, desc=f"{cfg.method}", unit="step", dynamic_ncols=True,
                        mininterval=2.0)

    knn_sets, knn_history = None, []
    if cfg.knn_train:
        knn_sets = tuple(load_shard_set(u, storage) for u in (cfg.knn_train, cfg.knn_test))

    io_counters = {"bytes_read": 0, "cache_hits": 0, "retries": 0}
    t_start = time.perf_counter()
    t_last, wait, wait_total, seen, skipped = t_start, 0.0, 0.0, 0, 0
    logged: list[tuple[int, float]] = []
    pending_loss: list[torch.Tensor] = []
    pending_extra: dict[str, list[torch.Tensor]] = {}
    last_saved = start_step
    step = start_step
    model.train()
    for step in range(start_step, total):
        lr = warmup_cosine(step, total, peak_lr, warmup)
        wd = cosine_value(step, total, cfg.weight_decay, cfg.weight_decay_end) \
            if cfg.weight_decay_end is not None else cfg.weight_decay
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            if g["base_weight_decay"] > 0:
                g["weight_decay"] = wd
        info = dict(method.set_step(step, total))
        for micro in range(accum):
            t_wait = time.perf_counter()
            batch = next(batches)
            dt = time.perf_counter() - t_wait
            wait, wait_total = wait + dt, wait_total + dt
            if (batch.step, batch.micro) != (step, micro):
                raise RuntimeError(f"loader produced step {batch.step} micro-batch {batch.micro}, "
                                   f"expected {step} {micro}")
            gen = photometric_generator(cfg.seed, step, rank, acc.device, micro)
            x = device_views(batch.views, views, gen, acc.device)  # DALI views arrive augmented: only moved
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(model)
            with sync:
                with acc.autocast():
                    result = model(x)
                loss = result["loss"]
                acc.backward(loss / accum if accum > 1 else loss)
            pending_loss.append(loss.detach().float())
            for k, v in result.items():
                if k != "loss":
                    pending_extra.setdefault(k, []).append(v.detach().float())
            seen += len(batch.keys)
            skipped += batch.skipped
            for name in io_counters:  # this process's reads; the main process's are logged
                io_counters[name] += getattr(batch, name)
            if keys_log is not None:
                keys_log.writelines(f"{batch.step} {key}\n" for key in batch.keys)
        method.before_optimizer_step(step, total)
        if cfg.clip_grad > 0:
            norm = acc.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            if norm is not None:
                pending_extra.setdefault("grad_norm", []).append(norm.detach().float().reshape(()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        info.update(method.on_optimizer_step(step + 1, total))
        done = step + 1
        if progress is not None:
            progress.update(1)

        is_last = done == total
        save_now = cfg.save_every > 0 and done % cfg.save_every == 0
        if done % cfg.log_every == 0 or is_last or save_now:
            values = _reduce(acc, pending_loss, pending_extra)
            pending_loss, pending_extra = [], {}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"loss is {values['loss']} at optimizer step {done}")
            if cfg.precision != "fp16" and not math.isfinite(values.get("grad_norm", 0.0)):
                # (fp16: the gradient scaler skips steps with inf/NaN gradients by design)
                raise FloatingPointError(f"gradient norm is {values['grad_norm']} at optimizer step {done}")
            now = time.perf_counter()
            rate = seen * world_size / max(now - t_last, 1e-9)
            values.update(info)
            values.update(samples=done * global_batch, lr=lr, weight_decay=wd, samples_per_s=rate,
                          data_wait=wait / max(now - t_last, 1e-9), skipped=skipped, **io_counters)
            logged.append((done, values["loss"]))
            if metrics is not None:
                metrics.write(done, values)
            if progress is not None:
                progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}", sps=f"{rate:.0f}",
                                     wait=f"{values['data_wait']:.0%}", refresh=False)
            t_last, wait, seen = now, 0.0, 0
        if cfg.eval_every > 0 and done % cfg.eval_every == 0 and knn_sets is not None and not is_last:
            knn_history.append(run_knn(acc, method, knn_sets, storage, cfg, done, metrics))
        if save_now and not is_last:
            save_state(acc, method, optimizer, cfg, out, done, global_batch, world_size, peak_lr, warmup, total)
            last_saved = done
    if progress is not None:
        progress.close()
    if keys_log is not None:
        keys_log.close()
    done = total
    if last_saved != total or start_step == total:
        save_state(acc, method, optimizer, cfg, out, done, global_batch, world_size, peak_lr, warmup, total)
    if knn_sets is not None:
        knn_history.append(run_knn(acc, method, knn_sets, storage, cfg, done, metrics))

    wall = time.perf_counter() - t_start
    trained = total - start_step
    summary = {
        "plan": plan.summary(),
        "method": cfg.method,
        "backbone": cfg.backbone,
        "feature_dim": dim,
        "image_size": cfg.image_size,
        "world_size": world_size,
        "batch_size": cfg.batch_size,
        "grad_accum": accum,
        "global_batch": global_batch,
        "steps": total,
        "micro_steps": total * accum,
        "start_step": start_step,
        "peak_lr": peak_lr,
        "precision": cfg.precision,
        "first_loss": logged[0][1] if logged else None,
        "final_loss": logged[-1][1] if logged else None,
        "losses": logged[-1000:],
        "skipped_samples": skipped,
        "wall_seconds": wall,
        "samples_per_s": trained * global_batch / wall if wall > 0 else None,
        "data_wait": wait_total / wall if wall > 0 else None,
        "knn": knn_history,
        "decoder": cfg.decoder,
    }
    if cfg.decoder == "dali":  # this process's DALI counters (batches, decode-error retries, PIL fallbacks)
        summary["dali"] = dataclasses.asdict(loader.stats)
    if acc.is_main_process:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in method.backbone.state_dict().items()}
        save_file(state, str(out / "backbone.safetensors"),
                  metadata={"timm_name": cfg.backbone, "image_size": str(cfg.image_size), "method": cfg.method,
                            "step": str(total)})
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, out / "summary.json")
        if metrics is not None:
            metrics.close()
        acc.print(f"done: {total} optimizer steps, final loss {summary['final_loss']}, backbone -> "
                  f"{out / 'backbone.safetensors'}")
    acc.wait_for_everyone()
    return summary


def _reduce(acc: Accelerator, losses: list[torch.Tensor], extra: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean over the steps since the last log and over processes (one all_reduce)."""
    keys = sorted(extra)
    vec = torch.stack([torch.stack(losses).mean()] + [torch.stack(extra[k]).mean() for k in keys])
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="mean")
    vals = vec.tolist()
    return {"loss": vals[0], **dict(zip(keys, vals[1:]))}


def run_knn(acc: Accelerator, method, sets, storage: dict, cfg: TrainConfig, step: int,
            metrics: MetricsLog | None) -> dict:
    """kNN accuracy of the current backbone (main process; the others wait); `storage`: the run's parsed
    storage options, for reading the sets."""
    result = {}
    if acc.is_main_process:
        from stream_ssl.evaluate import extract_features, knn_accuracy

        backbone = method.backbone
        was_training = backbone.training
        backbone.eval()
        t0 = time.perf_counter()
        with acc.autocast():
            train_x, train_y = extract_features(backbone, sets[0], cfg.image_size, device=str(acc.device),
                                                storage_options=storage)
            test_x, test_y = extract_features(backbone, sets[1], cfg.image_size, device=str(acc.device),
                                              storage_options=storage)
        backbone.train(was_training)
        top1 = knn_accuracy(train_x, train_y, test_x, test_y, k=cfg.knn_k, temperature=cfg.knn_temperature)
        result = {"step": step, "knn_top1": top1, "seconds": time.perf_counter() - t0}
        acc.print(f"step {step}: kNN top-1 {top1:.4f}")
        if metrics is not None:
            metrics.scalar("eval/knn_top1", top1, step)
        with open(Path(cfg.out) / "knn.csv", "a") as f:
            f.write(f"{step},{top1:.6f}\n")
    acc.wait_for_everyone()
    return result


def save_state(acc: Accelerator, method, optimizer, cfg: TrainConfig, out: Path, step: int, global_batch: int,
               world_size: int, peak_lr: float, warmup: int, total: int) -> None:
    """Checkpoint of everything a resumed run needs; per-process parts (RNG, method queues) are gathered."""
    mine = {"rng": rng_state(), "method": method.rank_state() if hasattr(method, "rank_state") else None}
    ranks = all_gather_objects(mine)
    if acc.is_main_process:
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "micro_step": step * cfg.grad_accum,
            "samples": step * global_batch,
            "global_batch": global_batch,
            "world_size": world_size,
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            # the learning-rate schedule is a pure function of the step; recorded to make the checkpoint readable
            "schedule": {"peak_lr": peak_lr, "warmup_steps": warmup, "total_steps": total},
            "ranks": ranks,
            "config": cfg.to_dict(),
        }
        save_checkpoint(out, step, state, keep=cfg.keep_checkpoints)
    acc.wait_for_everyone()
    if os.environ.get(KILL_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError) as e:  # RunError, plan and method errors, missing shard sets
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            PartialState().destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
