"""Streaming SSL pretraining at a fixed budget with a controlled number of unique samples.

    python stream_ssl/train.py --data shards/pool --unique-samples 10% --budget-samples 50K \
        --method simclr --backbone resnet18 --batch-size 256 --image-size 64 --out runs/simclr
    python stream_ssl/train.py --config configs/methods/dino.yaml --data shards/pool --out runs/dino
    accelerate launch stream_ssl/train.py ...   # same command, many processes / nodes

The loop, over a `Run` (stream_ssl/run.py):

    run = build_run(accelerator, cfg); checkpointer.load(run); run.prepare(); checkpointer.restore(run)
    fit(run)          # for each optimizer step: train_step(run, step, ...), a metrics row, kNN, checkpointer.save
    finish(run, ...)  # last checkpoint, summary.json, backbone.safetensors

Batches and steps. `--batch-size` is the micro-batch of one process (one forward pass); an optimizer step
accumulates `--grad-accum` micro-batches, so the global batch is G = processes x batch x accum. The plan is
built with the per-process batch of one optimizer step (batch x accum), so plan steps are optimizer steps
(budget // G, the plan's global batch is G, and what it reports as dropped is all that is dropped); the loader
splits each step's per-process batch into `accum` micro-batches. The learning rate is lr x G / 256; every
schedule (lr, weight decay, EMA momentum, teacher temperature) is a function of the optimizer step. The resume
position is the optimizer step; since step k covers stream samples [k * G, (k + 1) * G) whatever the split, a
run resumes on another number of processes when G is unchanged.

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` starts two processes that form a
gloo group (see `run.make_accelerator`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors.torch import save

from shard_tools.cli import DIVERGED, run_main, tool_prog
from shard_tools.quantities import format_bytes
from shard_tools.shardset import load_shard_set
from stream_ssl import checkpoint, checkpointer
from stream_ssl.config import TrainConfig, parse_config
from stream_ssl.data.augment import device_views
from stream_ssl.data.rng import batch_generator
from stream_ssl.errors import RunError
from stream_ssl.metrics import KeysLog, Meter, MetricsLog, progress_bar, storage_figures
from stream_ssl.run import Run, RunFinished, build_run, make_accelerator, storage_report
from stream_ssl.runfolder import open_remote, run_folder
from stream_ssl.stopping import STOPPED, Agreement, StopRequest, parse_signals, signal_name


class Diverged(RunError):
    """The loss or the gradient norm stopped being finite."""


class Stopped(RunError):
    """A stop signal ended the run early, after its checkpoint (exit status STOPPED, not an error)."""


@dataclasses.dataclass
class Reporting:
    """What `fit` writes besides checkpoints: metrics rows, the progress bar, the keys log. The run-long figures
    (losses, time, kNN results) live in the run's meter, which checkpoints carry."""

    meter: Meter
    metrics: MetricsLog | None = None
    keys: KeysLog | None = None
    progress: object = None
    knn_sets: tuple | None = None
    last_saved: int = 0
    stopped: tuple[int, int] | None = None  # (signal, step) when a stop signal ended the segment

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.keys is not None:
            self.keys.close()


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
        with StopRequest(parse_signals(cfg.stop_signals)) as stop:
            remote = open_remote(cfg, acc)
            run = build_run(acc, cfg)
            run.remote = remote
            checkpointer.load(run)
            run.prepare()
            checkpointer.restore(run)
            rep = fit(run, stop)
        if rep.stopped is not None:
            raise Stopped(stopped_line(run, *rep.stopped))
        return finish(run, rep)
    except RunFinished as done:
        acc.print(str(done))
        return done.summary
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        release_accelerator()


def release_accelerator() -> None:
    """Forget Accelerate's per-run state (precision, gradient state) but keep the process group, so several
    runs can follow each other in one process (tests, sweeps)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# ----------------------------------------------------------------------------------------------------------
# One optimizer step.


def next_batch(run: Run, step: int, micro: int, meter: Meter):
    t = time.perf_counter()
    batch = next(run.batches)
    meter.add_batch(batch, time.perf_counter() - t)
    if (batch.step, batch.micro) != (step, micro):
        raise RuntimeError(f"loader produced step {batch.step} micro-batch {batch.micro}, expected {step} {micro}")
    return batch


def forward_backward(run: Run, batch, step: int, micro: int) -> dict:
    """The photometric augmentation on the device (drawn from this batch's own generator, so a resumed run
    draws what a straight one did), the forward pass and the backward pass of one micro-batch."""
    acc, accum = run.acc, run.cfg.grad_accum
    g = batch_generator(run.cfg.seed, step, run.rank, micro, device=acc.device)
    x = device_views(batch.views, run.views, g, acc.device)  # DALI views arrive augmented: only moved
    if acc.device.type == "cuda" and run.cfg.channels_last:
        x = [v.contiguous(memory_format=torch.channels_last) for v in x]
    sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(run.model)
    with sync:
        with acc.autocast():
            result = run.model(x)
        acc.backward(result["loss"] / accum if accum > 1 else result["loss"])
    return result


def train_step(run: Run, step: int, meter: Meter, keys: KeysLog | None = None) -> dict:
    """Optimizer step `step` (0-based): the micro-batches, clipping, the update and the method's hooks.
    Returns the step's values to log (lr, weight decay, the method's schedule values)."""
    method, total = run.method, run.total_steps
    lr, wd = run.schedule.apply(run.optimizer, step)
    info = {"lr": lr, "weight_decay": wd, **method.set_step(step, total)}
    for micro in range(run.cfg.grad_accum):
        batch = next_batch(run, step, micro, meter)
        meter.add_result(forward_backward(run, batch, step, micro))
        if keys is not None:
            keys.write(batch)
    method.before_optimizer_step(step, total)
    if run.cfg.clip_grad > 0:
        norm = run.acc.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
        if norm is not None:
            meter.add_result({"grad_norm": norm})
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if getattr(run.optimizer, "step_was_skipped", False):  # fp16: inf/NaN gradients, the scaler skipped it
        meter.skipped_steps += 1  # ... so momentum encoders and prototype normalizations skip it too
    else:
        info.update(method.on_optimizer_step(step + 1, total))
    return info


# ----------------------------------------------------------------------------------------------------------
# The loop.


def start_reporting(run: Run) -> Reporting:
    cfg, main = run.cfg, run.acc.is_main_process
    rep = Reporting(run.meter, last_saved=run.start_step)
    if main:
        rep.metrics = MetricsLog(run.out, run.start_step, run.acc, cfg.to_dict())
        if cfg.progress:
            rep.progress = progress_bar(run.total_steps, run.start_step, cfg.method)
    if cfg.log_keys:
        rep.keys = KeysLog(run.out, run.rank, run.start_step)
    if cfg.knn_train:
        rep.knn_sets = tuple(load_shard_set(u, run.storage) for u in (cfg.knn_train, cfg.knn_test))
    return rep


def fit(run: Run, stop: StopRequest | None = None) -> Reporting:
    """Train from the resume step to the end of the plan, or to the step where a stop signal, agreed on by every
    process, ends it (after a checkpoint; `Reporting.stopped`)."""
    cfg, rep = run.cfg, start_reporting(run)
    stop = stop or StopRequest(())
    agree = Agreement(run.world_size, cfg.save_every_minutes, run.acc.is_main_process)
    run.model.train()
    try:
        signum, _ = agree.decide(stop)
        if signum:  # a signal during set-up: stop before training anything
            rep.stopped = (signum, run.start_step)
            return rep
        for step in range(run.start_step, run.total_steps):
            info = train_step(run, step, rep.meter, rep.keys)
            done = step + 1
            if rep.progress is not None:
                rep.progress.update(1)
            last = done == run.total_steps
            if done % cfg.log_every == 0 or last:
                log_row(run, rep, done, info)
            if last:
                break
            if cfg.eval_every > 0 and done % cfg.eval_every == 0 and rep.knn_sets is not None:
                rep.meter.knn.append(knn_monitor(run, rep, done))
            signum, due = agree.decide(stop)
            if signum or due or (cfg.save_every > 0 and done % cfg.save_every == 0):
                checkpointer.save(run, done, ended=f"stopped by {signal_name(signum)}" if signum else None)
                rep.last_saved = done
                agree.saved()
            if signum:
                rep.stopped = (signum, done)
                break
    finally:
        rep.close()
        if hasattr(run.batches, "close"):  # the loader's workers end here, whatever ended the loop
            run.batches.close()
    return rep


def stopped_line(run: Run, signum: int, step: int) -> str:
    ckpt = checkpoint.latest_checkpoint(run.out)
    if ckpt is not None and run.remote is not None:
        ckpt = f"{run.remote}/checkpoints/{ckpt.name}"
    saved = f"checkpoint {ckpt}" if ckpt is not None else "nothing trained yet, nothing to save"
    return (f"stopped at step {step} of {run.total_steps} by {signal_name(signum)}; {saved}; run the same command "
            "to continue")


def log_row(run: Run, rep: Reporting, step: int, info: dict) -> None:
    """A metrics row (mean over the steps since the last one and over processes), after checking that the
    loss and gradient norm are finite."""
    values = rep.meter.row(run.acc, step, info)
    check_finite(run, rep.meter, values, step)
    check_collapse(run, rep, values, step)
    rep.meter.last_row = values
    if rep.metrics is not None:
        rep.metrics.write(step, values)
    if rep.progress is not None:
        rep.progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.3g}",
                                 sps=f"{values['samples_per_s']:.0f}", wait=f"{values['data_wait']:.0%}",
                                 read=read_rate(rep.meter), refresh=False)


def read_rate(meter: Meter) -> str:
    """The progress bar's storage figure: bytes read from storage per second over the run so far (a row's own
    rate is 0 whenever its samples came from memory or the cache, as in every pass after the first of a small
    pool), and the cache hits when there are any."""
    io, seconds = meter.io_total, max(meter.seconds, 1e-9)
    rate = f"{format_bytes(io['bytes_read'] / seconds)}/s"
    return rate + (f" ({io['cache_hits']} cache hits)" if io["cache_hits"] else "")


def check_finite(run: Run, meter: Meter, values: dict, step: int) -> None:
    """Stop with one line when the loss (or, outside fp16, whose scaler skips such steps, the gradient norm)
    is not finite; the last checkpoint stays the last good one."""
    bad = [k for k in ("loss", "grad_norm") if k in values and not math.isfinite(values[k])
           and not (k == "grad_norm" and run.cfg.precision == "fp16")]
    if not bad:
        meter.last_finite = {"step": step, "loss": values["loss"], "lr": values["lr"]}
        return
    last = meter.last_finite
    before = (f"last finite loss {last['loss']:.4g} at step {last['step']} (lr {last['lr']:.3g})" if last
              else "no finite loss logged before")
    ckpt = checkpoint.latest_checkpoint(run.out)
    raise Diverged(f"{bad[0].replace('_', ' ')} is {values[bad[0]]} at optimizer step {step}; {before}. "
                   f"Try {divergence_hints(run.cfg)}" + (f"; the last good checkpoint is {ckpt}" if ckpt else ""))


def divergence_hints(cfg: TrainConfig) -> str:
    """What to change in a run that diverged, leaving out what its settings already are."""
    hints = [f"a lower --lr (now {cfg.lr:g})"]
    if cfg.precision != "no":
        hints.append("--precision no")
    if cfg.clip_grad <= 0:
        hints.append("--clip-grad 1.0")
    elif cfg.clip_grad > 1.0:
        hints.append(f"a lower --clip-grad (now {cfg.clip_grad:g})")
    return ", ".join(hints[:-1]) + (" or " if len(hints) > 1 else "") + hints[-1]


def check_collapse(run: Run, rep: Reporting, values: dict, step: int) -> None:
    """Warn once, naming the step, when the std of the L2-normalized embeddings falls under
    `collapse_threshold` / sqrt(d): all samples are mapping to (nearly) one point."""
    std, d, threshold = values.get("embed_std"), run.method.embed_dim, run.cfg.collapse_threshold
    if std is None or not d or threshold <= 0 or rep.meter.collapse is not None:
        return
    limit = threshold / math.sqrt(d)
    if std >= limit:
        return
    rep.meter.collapse = {"step": step, "embed_std": std, "limit": limit}
    if run.acc.is_main_process:
        print(f"warning: embeddings collapsing at optimizer step {step}: the std of the L2-normalized embeddings "
              f"is {std:.3g}, under {threshold} / sqrt({d}) = {limit:.3g} (healthy: {1 / math.sqrt(d):.3g}); "
              f"effective rank {values.get('embed_rank', float('nan')):.1f} of {d}. Check the learning rate, the "
              "method's settings and metrics.csv", file=sys.stderr, flush=True)


def knn_monitor(run: Run, rep: Reporting, step: int) -> dict:
    """kNN accuracy of the current backbone on the monitor's sets, in float32 (main process; the others wait)."""
    result = {}
    if run.acc.is_main_process:
        from stream_ssl.evaluate import knn_accuracy
        from stream_ssl.features import extract_features

        cfg, backbone, device = run.cfg, run.method.backbone, str(run.acc.device)
        was_training = backbone.training
        backbone.eval()
        t0 = time.perf_counter()
        feats = [extract_features(backbone, s, cfg.image_size, device=device, storage_options=run.storage)
                 for s in rep.knn_sets]
        backbone.train(was_training)
        top1 = knn_accuracy(*feats[0], *feats[1], k=cfg.knn_k, temperature=cfg.knn_temperature)
        result = {"step": step, "knn_top1": top1, "seconds": time.perf_counter() - t0}
        run.acc.print(f"step {step}: kNN top-1 {top1:.4f}")
        if rep.metrics is not None:
            rep.metrics.scalar("eval/knn_top1", top1, step)
        with open(run.out / "knn.csv", "a") as f:
            f.write(f"{step},{top1:.6f}\n")
    run.acc.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------------------------------------
# The end.


def finish(run: Run, rep: Reporting) -> dict:
    """The last checkpoint and kNN evaluation, summary.json and backbone.safetensors."""
    total = run.total_steps
    if rep.last_saved != total:  # (a run resumed from its final checkpoint only writes what follows it)
        checkpointer.save(run, total)
    if rep.knn_sets is not None:
        run.meter.knn.append(knn_monitor(run, rep, total))
    summary = run_summary(run, rep)
    if run.acc.is_main_process:
        export_backbone(run)
        tmp = run.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, run.out / "summary.json")
        if rep.metrics is not None:
            rep.metrics.close()
        if run.remote is not None:  # summary.json last: the mark of a finished run
            run.remote.publish(last=("backbone.safetensors", "summary.json"))
        where = f"{run.remote}/backbone.safetensors" if run.remote is not None else run.out / "backbone.safetensors"
        run.acc.print(f"done: {total} optimizer steps, final loss {summary['final_loss']}, backbone -> {where}")
    run.acc.wait_for_everyone()
    return summary


def run_summary(run: Run, rep: Reporting) -> dict:
    """The whole run, over every segment it was trained in (the meter's figures travel in the checkpoints)."""
    cfg, meter, total = run.cfg, rep.meter, run.total_steps
    seconds = meter.seconds
    last_row = meter.last_row
    summary = {
        "plan": run.plan.summary(), "method": cfg.method, "recipe": cfg.recipe, "backbone": cfg.backbone,
        "feature_dim": run.feature_dim, "image_size": cfg.image_size, "world_size": run.world_size,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "global_batch": run.global_batch, "steps": total,
        "micro_steps": total * cfg.grad_accum, "samples_seen": total * run.global_batch,
        "peak_lr": run.schedule.peak_lr, "precision": cfg.precision,
        "first_loss": meter.logged[0][1] if meter.logged else None,
        "final_loss": meter.logged[-1][1] if meter.logged else None,
        "losses": meter.logged[-1000:],
        "skipped_samples": meter.skipped,
        "skipped_optimizer_steps": meter.skipped_steps,
        "wall_seconds": seconds,  # training time of the steps kept, over every segment
        "samples_per_s": total * run.global_batch / seconds if seconds > 0 else None,
        "data_wait": meter.wait_total / seconds if seconds > 0 else None,
        "segments": meter.run_segments(total, "finished"),
        "storage": storage_figures(meter.io_total, seconds),  # this process's reads (the main process's loader)
        "knn": meter.knn,
        "decoder": cfg.decoder,
        "object_store": storage_report(run, meter.io_total["bytes_read"]),
        "collapse_monitor": {"embed_std": last_row.get("embed_std"), "embed_rank": last_row.get("embed_rank"),
                             "embed_dim": run.method.embed_dim, "threshold": cfg.collapse_threshold,
                             "warning": meter.collapse},
    }
    if hasattr(run.loader, "stats"):  # this process's decoder counters (batches, fallbacks, replaced)
        summary[cfg.decoder] = dataclasses.asdict(run.loader.stats)
    return summary


def export_backbone(run: Run) -> None:
    """backbone.safetensors, loadable by timm.create_model(NAME, num_classes=0, **backbone_options)."""
    cfg = run.cfg
    state = {k: v.detach().cpu().contiguous().clone() for k, v in run.method.backbone.state_dict().items()}
    data = save(state, metadata={"timm_name": cfg.backbone, "image_size": str(cfg.image_size), "method": cfg.method,
                                 "step": str(run.total_steps)})
    tmp = run.out / "backbone.safetensors.tmp"
    tmp.write_bytes(data)  # through open(): the umask's mode, as every other output (save_file makes it 0600)
    os.replace(tmp, run.out / "backbone.safetensors")


# ----------------------------------------------------------------------------------------------------------
# The command.


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 done (or finished before), 2 bad settings or data, 3 diverged, 75 (STOPPED) stopped by a
    signal after a checkpoint, 130 interrupted at once (a second signal), 1 anything else: one line on stderr,
    the traceback in OUT/.logs/train[-rank-R].log."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv, prog=tool_prog("train.py"))
    if cfg.num_processes > 1 and "RANK" not in os.environ:
        from stream_ssl.launcher import launch

        return launch(argv, cfg.num_processes)
    rank = int(os.environ.get("RANK", "0"))
    tool = "train" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else f"train-rank-{rank}"

    def body() -> int:
        try:
            train(cfg)
        except Stopped as e:
            if rank == 0:
                print(e, file=sys.stderr, flush=True)
            return STOPPED
        return 0

    try:
        return run_main(tool, body, log_folder=run_folder(cfg.out, cfg.local_out),
                        usage_errors=(ValueError, FileNotFoundError),
                        exit_codes={Diverged: DIVERGED}, create_log_folder=True)
    finally:
        if dist.is_available() and dist.is_initialized():
            PartialState().destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
