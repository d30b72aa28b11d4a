"""The GRPO recipe's two jobs: an FSDP2 trainer that pushes every step, and engines that sample.

Both run under ``recipes.jobs.start_job``, each job in its own torch.distributed world;
they meet only on the fsdp_sync control plane. The parent process carries rollouts from
the engines to the trainer ranks (``inboxes``) and step reports back to the user
(``results``).
"""

from __future__ import annotations

import queue
import statistics
import time
import zlib
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from fsdp_sync import LayoutSpec, PushResult, SyncConfig, WeightReceiver, WeightSender, allocate_destinations
from fsdp_sync.quant import dequantize, get_quant_format, scale_name
from .config_store import GRPOJob, ModelConfig, TopologyConfig
from .grpo_loss import clipped_loss, completion_logprobs, group_advantages, sample, supervised_loss
from .grpo_task import VOCAB_SIZE, Addition
from .jobs import pack, unpack
from .master import fp32_master
from .tiny_llama import apply_fsdp, build_model, tiny_llama_config


@dataclass
class Rollouts:
    """Completions of one step's prompts, ``group_size`` consecutive rows per prompt."""

    prompts: torch.Tensor
    completions: torch.Tensor
    logps: torch.Tensor  # per token, under the engine's weights: the behaviour policy
    rewards: torch.Tensor
    versions: torch.Tensor  # per rollout: the weight version the engine sampled it with

    @staticmethod
    def cat(parts: list[Rollouts]) -> Rollouts:
        return Rollouts(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Rollouts)))

    def to(self, device: torch.device) -> Rollouts:
        return Rollouts(*(getattr(self, f.name).to(device) for f in fields(Rollouts)))

    def split(self, num: int) -> list[Rollouts]:
        """``num`` equal parts of whole groups (the caller checked divisibility)."""
        return [Rollouts(*parts) for parts in zip(*(getattr(self, f.name).chunk(num) for f in fields(Rollouts)))]


def problem_seed(seed: int, phase: str, step: int) -> int:
    """One seed per (run, phase, step), so every process draws the same problems."""
    return zlib.crc32(f"{seed}/{phase}/{step}".encode())


def _device(topology: TopologyConfig) -> torch.device:
    """This process's device: ``start_job`` already bound a CUDA process to its GPU."""
    return torch.device("cuda", torch.cuda.current_device()) if topology.device == "cuda" else torch.device("cpu")


def _model(cfg: ModelConfig, task: Addition, device: torch.device) -> nn.Module:
    config = tiny_llama_config(vocab_size=VOCAB_SIZE, hidden_size=cfg.hidden_size,
                               intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                               num_attention_heads=cfg.num_attention_heads,
                               num_key_value_heads=cfg.num_key_value_heads,
                               max_position_embeddings=task.prompt_len + task.answer_len)
    return build_model(config, seed=0, dtype=cfg.torch_dtype, device=device)


# -- the trainer job ---------------------------------------------------------------------
def trainer(rank: int, world_size: int, job: GRPOJob, results: Any, inboxes: list, engines_done: Any) -> None:
    """FSDP2 over the job's world: warm up, push version 0, then one GRPO step per rollout batch."""
    from torch.distributed.device_mesh import init_device_mesh

    rc, device = job.recipe, _device(job.topology)
    task = Addition(rc.digits)
    model = apply_fsdp(_model(job.model, task, device), init_device_mesh(device.type, (world_size,)))
    sender = WeightSender(model, job.sync)

    def progress(step: int, loss: float) -> None:  # rank 0 speaks for the job, as for the GRPO steps
        if rank == 0:
            results.put(("trainer", rank, "warmup_step", {"step": step, "loss": loss}))

    warmup = _warm_up(model, task, job, rank, world_size, device, progress=progress)
    first = sender.push(0).wait()
    first_bytes = torch.tensor(float(first.bytes_sent), device=device)
    dist.all_reduce(first_bytes)  # every rank sends its own part
    if rank == 0:
        results.put(("trainer", rank, "warmup", {**warmup, "push_s": first.seconds, "push_bytes": first_bytes.item()}))
    optim = (fp32_master(model, torch.optim.AdamW, lr=rc.lr) if rc.master_fp32
             else torch.optim.AdamW(model.parameters(), lr=rc.lr))
    ramp = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: min(1.0, (i + 1) / (rc.lr_warmup_steps + 1)))
    sender.attach(optim, overlap=True)
    for step in range(1, rc.steps + 1):
        started = time.perf_counter()
        batch = _next_batch(inboxes[rank], step, rc.timeout_s).to(device)
        waited = time.perf_counter() - started
        logps = completion_logprobs(model, batch.prompts, batch.completions, temperature=rc.temperature)
        loss = clipped_loss(logps, batch.logps, group_advantages(batch.rewards, rc.group_size), clip_eps=rc.clip_eps)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), rc.max_grad_norm)
        previous = sender.last_push  # this step's optimizer.step() waits for it, then pushes `step`
        optim.step()
        optim.zero_grad()
        ramp.step()
        stats = _step_stats(batch, logps.detach(), loss.detach(), previous.wait(), sender.stall_s[-1], device)
        if rank == 0:
            results.put(("trainer", rank, "step", {"step": step, **stats, "wait_s": waited,
                                                   "step_s": time.perf_counter() - started}))
    sender.detach()  # waits for the last push, so the engines can land it and leave
    last = sender.last_push.wait()
    if rank == 0:
        results.put(("trainer", rank, "last_push", {"version": last.version, "push_s": last.seconds}))
    engines_done.wait(rc.timeout_s)  # the control plane lives on trainer rank 0: close it last
    sender.close()


def _next_batch(inbox: Any, step: int, timeout_s: float) -> Rollouts:
    try:
        return unpack(inbox.get(timeout=timeout_s))
    except queue.Empty:
        raise TimeoutError(f"no rollouts for step {step} within {timeout_s:.0f}s") from None


def _warm_up(model: nn.Module, task: Addition, job: GRPOJob, rank: int, world_size: int, device: torch.device,
             *, progress: Callable[[int, float], None] | None = None) -> dict:
    """Supervised steps on the task, so RL starts with a reward it can raise; their first and last losses.

    ``progress(step, loss)`` after each step (1-based; this rank's loss).
    """
    rc = job.recipe
    optim = torch.optim.AdamW(model.parameters(), lr=rc.warmup_lr)
    started, losses = time.perf_counter(), []
    per_rank = rc.warmup_batch // world_size
    for i in range(rc.warmup_steps):
        a, b = task.problems(rc.warmup_batch, seed=problem_seed(rc.seed, "warmup", i))
        a, b = a[rank * per_rank:(rank + 1) * per_rank], b[rank * per_rank:(rank + 1) * per_rank]
        loss = supervised_loss(model, task.prompts(a, b).to(device), task.answers(a, b).to(device))
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
        if progress is not None:
            progress(i + 1, losses[-1])
    info = {"steps": rc.warmup_steps, "seconds": time.perf_counter() - started}
    if losses:
        info.update(loss_first=statistics.fmean(losses[:10]), loss_last=statistics.fmean(losses[-10:]))
    return info


def _step_stats(batch: Rollouts, logps: torch.Tensor, loss: torch.Tensor, push: PushResult, stall_s: float,
                device: torch.device) -> dict:
    """This step's numbers over all trainer ranks: sums, then the slowest rank's push and stall.

    ``push_bytes`` is what the push moved (with SyncConfig.delta, only the change), against
    ``push_full_bytes`` for a full push; ``changed_fraction`` is the ranks' mean."""
    moved = [float(push.bytes_sent), float(push.full_bytes or push.bytes_sent), push.changed_fraction or 0.0]
    sums = torch.cat([torch.stack([batch.rewards.sum(), torch.tensor(float(len(batch.rewards)), device=device),
                                   (logps - batch.logps).abs().sum(), torch.tensor(float(logps.numel()), device=device),
                                   loss]).double(), torch.tensor(moved, dtype=torch.float64, device=device)])
    highs = torch.tensor([push.seconds, stall_s, -batch.versions.min().item(), batch.versions.max().item()],
                         dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    dist.all_reduce(highs, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    return {"reward": (sums[0] / sums[1]).item(), "logp_gap": (sums[2] / sums[3]).item(),
            "loss": (sums[4] / world).item(), "version_min": int(-highs[2]), "version_max": int(highs[3]),
            "push_version": push.version, "push_s": highs[0].item(), "stall_s": highs[1].item(),
            "push_bytes": int(sums[5]), "push_full_bytes": int(sums[6]), "changed_fraction": (sums[7] / world).item(),
            "delta_base": push.delta_base}


# -- the inference job -------------------------------------------------------------------
def engine(rank: int, world_size: int, job: GRPOJob, results: Any) -> None:
    """One replica: commit the newest landed version between batches, sample its share of each step."""
    rc, device = job.recipe, _device(job.topology)
    task = Addition(rc.digits)
    model = _model(job.model, task, device).eval()
    dests, refresh = _engine_weights(model, job.sync)
    receiver = WeightReceiver(dests, config=job.sync, layout="identity", rank=rank, world_size=world_size,
                              commit="staged")
    share = rc.prompts_per_step // world_size
    gen = torch.Generator(device).manual_seed(problem_seed(rc.seed, "sample", rank))
    for step in range(1, rc.steps + 1):
        # Batch `step` turns version step-1 into version `step`: sample it with step-1, or at most
        # max_staleness versions older, whichever has landed when the engine gets here.
        receiver.wait_for(max(0, step - 1 - rc.max_staleness), timeout=rc.timeout_s)
        before = receiver.version
        if receiver.commit() != before:
            refresh()
        a, b = task.problems(rc.prompts_per_step, seed=problem_seed(rc.seed, "rl", step))
        a = a[rank * share:(rank + 1) * share].repeat_interleave(rc.group_size)
        b = b[rank * share:(rank + 1) * share].repeat_interleave(rc.group_size)
        prompts = task.prompts(a, b)
        completions, logps = sample(model, prompts.to(device), num_tokens=task.answer_len,
                                    temperature=rc.temperature, generator=gen)
        completions = completions.cpu()
        rollouts = Rollouts(prompts, completions, logps.cpu(), task.rewards(completions, a, b),
                            torch.full((len(a),), receiver.version))
        results.put(("engine", rank, "rollouts", (step, pack(rollouts))))
    receiver.wait_for(rc.steps, timeout=rc.timeout_s)  # stay until the trainer's last push has landed
    receiver.close()


def _engine_weights(model: nn.Module, sync: SyncConfig) -> tuple[Any, Callable[[], None]]:
    """What the receiver writes, and how a committed version reaches the model.

    Unquantized, the receiver commits straight into the model's parameters. FP8 weights
    land in FP8 buffers with their scales, as an FP8 engine holds them; this engine then
    computes with their dequantized values.
    """
    if sync.quant == "none":
        return model, lambda: None
    dtype = next(model.parameters()).dtype
    shapes = {n: (tuple(p.shape), dtype) for n, p in model.named_parameters()}
    dests = allocate_destinations(shapes, layout=LayoutSpec("identity"), quant=sync.quant,
                                  quant_skip=sync.quant_skip, device=next(model.parameters()).device)
    fmt = get_quant_format(sync.quant)

    @torch.no_grad()
    def refresh() -> None:
        for name, p in model.named_parameters():
            scale = dests.get(scale_name(name))
            p.copy_(dests[name] if scale is None else dequantize(dests[name], scale, fmt.block_shape(p.shape)))

    return dests, refresh
