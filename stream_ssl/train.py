"""Streaming SSL pretraining at a fixed budget with a controlled number of unique samples.

    python stream_ssl/train.py --data shards/pool --unique-samples 10% --budget-samples 50K \
        --method simclr --backbone resnet18 --batch-size 256 --image-size 64 --out runs/simclr
    accelerate launch stream_ssl/train.py ...   # same command, many processes / nodes
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import the project, not this folder
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import csv
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from shard_tools.shardset import load_shard_set
from stream_ssl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from stream_ssl.config import TrainConfig, parse_config
from stream_ssl.data.augment import photometric
from stream_ssl.data.loader import make_loader
from stream_ssl.data.plan import make_plan
from stream_ssl.methods import build_method
from stream_ssl.models.backbone import create_backbone
from stream_ssl.optim import build_optimizer, warmup_cosine


def check_output_folder(cfg: TrainConfig, out: Path) -> None:
    """Refuse to mix two different runs in one folder."""
    saved = out / "config.json"
    if not saved.exists():
        return
    old = json.loads(saved.read_text())
    diffs = [k for k in TrainConfig.IDENTITY if old.get(k) != getattr(cfg, k)]
    if diffs and latest_checkpoint(out) is not None:
        detail = ", ".join(f"{k}: {old.get(k)!r} there vs {getattr(cfg, k)!r} now" for k in diffs)
        raise SystemExit(f"error: {out} holds a different run ({detail}); choose another --out or delete it")


def photometric_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    return g


def train(cfg: TrainConfig) -> dict:
    acc = Accelerator(mixed_precision=cfg.precision)
    set_seed(cfg.seed)
    out = Path(cfg.out)
    if acc.is_main_process:
        check_output_folder(cfg, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    acc.wait_for_everyone()

    sets = [load_shard_set(u) for u in cfg.data.split(",") if u]
    plan = make_plan(sets, cfg.unique_samples, cfg.budget_samples, cfg.mix, acc.num_processes,
                     cfg.num_workers, cfg.batch_size, cfg.seed)
    backbone, dim = create_backbone(cfg.backbone, cfg.image_size)
    method = build_method(cfg.method, backbone, dim, **cfg.method_options)
    if method.needs_batch_stats and cfg.batch_size < 2:
        raise SystemExit(f"error: {cfg.method} uses batch statistics; --batch-size must be >= 2")
    views = method.views(cfg.image_size)
    peak_lr = cfg.lr * plan.global_batch / 256
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(), peak_lr, cfg.weight_decay, cfg.momentum)

    start_step = 0
    ckpt = latest_checkpoint(out) if cfg.resume == "auto" else None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        acc.print(f"resumed from {ckpt} at step {start_step}")
    model, optimizer = acc.prepare(method, optimizer)
    if acc.is_main_process:
        acc.print(plan.describe())
    loader = make_loader(plan, acc.process_index, views, start_step, cfg.num_workers, seed=cfg.seed)

    warmup = max(1, int(cfg.warmup_fraction * plan.steps))
    metrics_path = out / "metrics.csv"
    log = None
    if acc.is_main_process:
        new = start_step == 0 or not metrics_path.exists()
        log = csv.writer(open(metrics_path, "w" if new else "a", newline="", buffering=1))
        if new:
            log.writerow(["step", "loss", "lr", "samples_per_s", "data_wait", "skipped"])
    keys_log = None
    if cfg.log_keys:
        (out / "keys").mkdir(parents=True, exist_ok=True)
        keys_log = open(out / "keys" / f"rank-{acc.process_index}.txt", "a" if start_step else "w", buffering=1)
    t_start = time.perf_counter()
    t_last, wait, seen, skipped, losses = t_start, 0.0, 0, 0, []
    step = start_step
    t_ready = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - t_ready
        assert batch.step == step, f"loader produced step {batch.step}, expected {step}"
        lr = warmup_cosine(step, plan.steps, peak_lr, warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        gen = photometric_generator(cfg.seed, step, acc.process_index, acc.device)
        x = [photometric(v.to(acc.device, non_blocking=True), spec, gen) for v, spec in zip(batch.views, views)]
        with acc.autocast():
            result = model(x)
        loss = result["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        if cfg.clip_grad > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        acc.unwrap_model(model).on_optimizer_step(step + 1, plan.steps)
        losses.append(loss.item())
        seen += len(batch.keys)
        if keys_log is not None:
            keys_log.writelines(f"{step} {key}\n" for key in batch.keys)
        skipped += batch.skipped
        step += 1
        if log is not None and (step % cfg.log_every == 0 or step == plan.steps):
            now = time.perf_counter()
            rate = seen * acc.num_processes / (now - t_last)
            log.writerow([step, f"{losses[-1]:.6f}", f"{lr:.6g}", f"{rate:.1f}", f"{wait / (now - t_last):.3f}",
                          skipped])
            acc.print(f"step {step}/{plan.steps} loss {losses[-1]:.4f} lr {lr:.4g} {rate:.0f} samples/s "
                      f"data wait {wait / (now - t_last):.0%}")
            t_last, wait, seen = now, 0.0, 0
        if cfg.save_every and step % cfg.save_every == 0 and step < plan.steps:
            save_state(acc, model, optimizer, out, step)
        t_ready = time.perf_counter()
    if step != plan.steps:
        raise RuntimeError(f"loader stopped at step {step} of {plan.steps}")
    save_state(acc, model, optimizer, out, step)
    summary = {
        "plan": plan.summary(),
        "start_step": start_step,
        "steps": plan.steps,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
        "first_loss": losses[0] if losses else None,
        "skipped_samples": skipped,
        "wall_seconds": time.perf_counter() - t_start,
        "backbone": cfg.backbone,
        "feature_dim": dim,
    }
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        state = {k: v.detach().cpu().contiguous() for k, v in unwrapped.backbone.state_dict().items()}
        save_file(state, str(out / "backbone.safetensors"), metadata={"timm_name": cfg.backbone})
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def save_state(acc: Accelerator, model, optimizer, out: Path, step: int) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_checkpoint(out, step, {
            "step": step,
            "model": acc.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
        })
    acc.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        train(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
