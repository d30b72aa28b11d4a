"""GRPO whose rollouts come from an inference job that runs on weights fsdp_sync pushed to it.

    python -m recipes.grpo [quant=fp8_block] [transport=shm] [topology=cpu_2x2] [recipe.steps=50] ...

A trainer job (FSDP2, 2 CPU processes over gloo) warms a tiny Llama up on 2-digit
addition, pushes it as version 0, then runs GRPO: each optimizer step pushes the next
version through ``sender.attach(optimizer, overlap=True)``. An inference job (its own
world) commits the newest landed version between batches, samples ``group_size``
answers per prompt and tags each rollout with the version it used. This process carries
rollouts to the trainer ranks, logs a line per step (Hydra puts them on stdout and in
``grpo.log``), shows progress bars for the warm-up and the steps on stderr, and writes
``steps.jsonl`` and ``grpo.png`` to Hydra's run directory (or ``recipe.out_dir``). A launch
whose config does not validate leaves no run directory behind.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm.contrib.logging import logging_redirect_tqdm

from . import data_path
from .config_store import GRPOJob, register_configs, to_job
from .grpo_report import StepLog, summary
from .grpo_workers import Rollouts, engine, trainer
from .jobs import free_port, next_message, pack, spawn_context, start_job, unpack


log = logging.getLogger("grpo")


def run(job: GRPOJob, out_dir: Path, *, model_name: str | None = None) -> list[dict]:
    """Start both jobs, route rollouts until the trainer is done; returns the per-step records."""
    with logging_redirect_tqdm():  # console log lines clear the bar and redraw it
        return _run(job, out_dir, model_name=model_name)


def plot_title(job: GRPOJob, model_name: str | None = None) -> str:
    """The run's config in one line, as the plot's title."""
    m, rc = job.model, job.recipe
    model = f"{model_name} " if model_name else ""
    return (f"GRPO: model {model}({m.num_hidden_layers} layers x {m.hidden_size}, {m.dtype}) | "
            f"quant {job.sync.quant} | transport {job.sync.transport} | lr {rc.lr:g} | {rc.steps} steps")


def _run(job: GRPOJob, out_dir: Path, *, model_name: str | None) -> list[dict]:
    if job.sync.control_port == 0:
        control = f"{job.sync.control_host}:{free_port()}"
        job = dataclasses.replace(job, sync=dataclasses.replace(job.sync, control=control))
    topo, rc = job.topology, job.recipe
    ctx = spawn_context()
    results, engines_done = ctx.Queue(), ctx.Event()
    inboxes = [ctx.Queue() for _ in range(topo.num_trainers)]
    steps = StepLog(out_dir, rc.steps, warmup_total=rc.warmup_steps, title=plot_title(job, model_name))
    steps.note(f"GRPO: {topo.num_trainers} FSDP2 trainers -> {topo.num_engines} engine(s) on {topo.device}, "
               f"quant={job.sync.quant}, mode={job.sync.mode}, transport={job.sync.transport}, "
               f"max_staleness={rc.max_staleness}; writing to {out_dir}; starting the processes")
    started = time.perf_counter()
    # On GPUs, trainer rank r takes GPU r and engine e GPU num_trainers + e, modulo the GPU count.
    gpu = topo.device == "cuda"
    procs = start_job(ctx, trainer, topo.num_trainers, results, job, results, inboxes, engines_done,
                      gpu_offset=0 if gpu else None)
    procs += start_job(ctx, engine, topo.num_engines, results, job, results,
                       gpu_offset=topo.num_trainers if gpu else None)
    pending: dict[int, dict[int, bytes]] = {}
    finished: Counter = Counter()
    try:
        while finished["trainer"] < topo.num_trainers:
            name, rank, kind, payload = next_message(results, procs, rc.timeout_s)
            if kind == "ok":
                finished[name] += 1
                if name == "engine" and finished[name] == topo.num_engines:
                    engines_done.set()
            elif kind == "rollouts":
                step, data = payload
                pending.setdefault(step, {})[rank] = data
                if len(pending[step]) == topo.num_engines:
                    parts = [unpack(data) for _, data in sorted(pending.pop(step).items())]
                    for inbox, part in zip(inboxes, Rollouts.cat(parts).split(topo.num_trainers)):
                        inbox.put(pack(part))
            elif kind == "warmup_step":
                steps.warmup_step(payload)
            elif kind == "warmup":
                steps.warmup_done(_warmup_line(payload))
            elif kind == "step":
                steps.step(payload)
            elif kind == "last_push":
                steps.note(f"push v{payload['version']}: {payload['push_s'] * 1e3:.1f} ms (after the last step)")
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        steps.close()
    steps.note(summary(steps.records, time.perf_counter() - started))
    steps.note(f"wrote {out_dir / 'steps.jsonl'} and {out_dir / 'grpo.png'}")
    return steps.records


def _warmup_line(info: dict) -> str:
    losses = f", loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}" if info["steps"] else ""
    return (f"warm-up: {info['steps']} supervised steps in {info['seconds']:.1f} s{losses}; "
            f"push v0: {info['push_bytes'] / 2**20:.2f} MiB in {info['push_s'] * 1e3:.1f} ms")


# An absolute path: Hydra resolves a relative one against the module, which differs between a
# checkout (recipes.grpo, conf/ beside it) and an install (fsdp_sync.recipes.grpo, conf/ inside it).
@hydra.main(config_path=str(data_path("conf")), config_name="grpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        job = to_job(cfg)
    except Exception:
        # Nothing ran: take back what Hydra made for this launch, so bad overrides leave no run dirs.
        _remove_launch_files(run_dir, subdir=hc.output_subdir, log_name=f"{hc.job.name}.log")
        raise
    try:
        run(job, Path(job.recipe.out_dir or run_dir), model_name=hc.runtime.choices.get("model"))
    except Exception as e:
        log.error("GRPO failed: %s: %s", type(e).__name__, e)  # into grpo.log too; Hydra prints the traceback
        raise


def _remove_launch_files(run_dir: Path, *, subdir: str | None, log_name: str) -> None:
    """Delete the files Hydra writes at launch (``.hydra/``, an empty log), then every folder left empty.

    Only those files, never a whole tree: the run dir may be one the user named and filled.
    Folders are removed up to the working directory (``outputs/<date>/<time>`` and up).
    """
    folders = [run_dir / subdir] if subdir else []  # hydra.output_subdir, None for no such folder
    for folder in folders:
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (folder / name).unlink(missing_ok=True)
    logfile = run_dir / log_name
    if logfile.is_file() and logfile.stat().st_size == 0:
        logfile.unlink()
    cwd, run_dir = Path.cwd().resolve(), run_dir.resolve()
    folders += [run_dir] + ([p for p in run_dir.parents if cwd in p.parents] if cwd in run_dir.parents else [])
    for folder in folders:
        if not folder.exists():
            continue
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): what is left is not ours to remove
            break


def cli() -> None:
    """``python -m recipes.grpo`` and the ``fsdp-sync-grpo`` console script."""
    register_configs()
    main()


if __name__ == "__main__":
    cli()
