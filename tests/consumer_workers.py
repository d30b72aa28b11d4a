"""A trainer and a transformers model served from synced weights, for the logits-parity test."""

from __future__ import annotations

import torch

from fsdp_sync import SyncConfig, WeightReceiver, WeightSender
from recipes.jobs import pack
from recipes.tiny_llama import apply_fsdp, build_model, tiny_llama_config

DTYPE = torch.bfloat16
PROMPTS = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(42))  # a fixed batch


def trainer(rank: int, world_size: int, cfg: SyncConfig) -> bytes | None:
    out = _train_and_push(rank, world_size, cfg)
    return pack(out["logits"]) if rank == 0 else None


def trainer_with_weights(rank: int, world_size: int, cfg: SyncConfig) -> bytes | None:
    out = _train_and_push(rank, world_size, cfg)
    return pack(out) if rank == 0 else None


def _train_and_push(rank: int, world_size: int, cfg: SyncConfig) -> dict:
    """One optimizer step of an FSDP2 tiny Llama, one push; its logits and full weights afterwards."""
    from torch.distributed.device_mesh import init_device_mesh

    model = apply_fsdp(build_model(tiny_llama_config(), seed=0, dtype=DTYPE), init_device_mesh("cpu", (world_size,)))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sender = WeightSender(model, cfg)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    sender.push(1).wait()
    # Full tensors first: after a forward, FSDP2 leaves the root's parameters unsharded.
    full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(input_ids=PROMPTS).logits
    sender.close()
    return {"logits": logits, "full": full}


def engine(rank: int, world_size: int, cfg: SyncConfig) -> bytes:
    """An engine whose model is a fresh transformers model (other seed) until the push lands."""
    model = build_model(tiny_llama_config(), seed=123, dtype=DTYPE).eval()
    recv = WeightReceiver(model, config=cfg, commit="staged")
    recv.wait_for(1)
    recv.commit()
    with torch.no_grad():
        logits = model(input_ids=PROMPTS).logits
    recv.close()
    return pack(logits)


def fp8_engine(rank: int, world_size: int, cfg: SyncConfig) -> bytes:
    """transformers' own fine-grained FP8 Llama (FP8Linear: e4m3 weight + weight_scale_inv) as the receiver.

    Its FP8 matmul needs GPU kernels, so on CPU the logits come from a bf16 copy of the
    model with every FP8 weight dequantized: the numbers an FP8 engine computes with.
    """
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    from fsdp_sync.quant import dequantize, get_quant_format

    # Like published FP8 checkpoints (Qwen3-FP8, DeepSeek-V3), the LM head stays in bf16.
    model = replace_with_fp8_linear(build_model(tiny_llama_config(), seed=123, dtype=DTYPE),
                                    modules_to_not_convert=["lm_head"],
                                    quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128]))
    model.to_empty(device="cpu")  # FP8Linear is created on the meta device; every byte comes from the push
    recv = WeightReceiver(model, config=cfg, commit="staged")
    recv.wait_for(1)
    recv.commit()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = build_model(tiny_llama_config(), seed=7, dtype=DTYPE).eval()
    block = get_quant_format("fp8_block").block_shape((128, 128))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            q = params[name]
            p.copy_(dequantize(q, params[name + "_scale_inv"], block) if q.dtype == torch.float8_e4m3fn else q)
        logits = plain(input_ids=PROMPTS).logits
    recv.close()
    return pack({"params": params, "logits": logits})


# -- GPU: a trained model, transformers' FP8Linear with its GPU kernels -----------------------

EVAL_PROBLEMS = 256  # 2-digit additions, teacher-forced: the answer positions are what a sampler generates


def _addition_batch(num: int, seed: int) -> tuple[torch.Tensor, int]:
    """prompt+answer token sequences and the index of the first logit that predicts an answer token."""
    from recipes.grpo_task import Addition

    task = Addition(2)
    a, b = task.problems(num, seed=seed)
    return torch.cat([task.prompts(a, b), task.answers(a, b)], dim=1), task.prompt_len - 1


def gpu_trained_trainer(rank: int, world_size: int, cfg: SyncConfig, max_steps: int, target_loss: float) -> bytes | None:
    """Trains the tiny Llama on addition until its answers are confident, then shards it and pushes once.

    A random model's logits are nearly flat, so FP8 rounding flips their argmax; a trained
    model's are not, as a real checkpoint's are not.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from recipes.grpo_loss import supervised_loss
    from recipes.grpo_task import Addition

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_model(tiny_llama_config(), seed=0, dtype=DTYPE).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task, loss = Addition(2), float("inf")
    for step in range(max_steps):
        a, b = task.problems(256, seed=10_000 + step)
        loss_t = supervised_loss(model, task.prompts(a, b).to(device), task.answers(a, b).to(device))
        loss_t.backward()
        optim.step()
        optim.zero_grad()
        if step % 50 == 0 and (loss := loss_t.item()) < target_loss:
            break
    model = apply_fsdp(model, init_device_mesh("cuda", (world_size,)))
    sender = WeightSender(model, cfg)
    sender.push(1).wait()
    full = {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()}
    seqs, _ = _addition_batch(EVAL_PROBLEMS, seed=1)
    with torch.no_grad():
        logits = model(input_ids=seqs.to(device)).logits.float().cpu()
    sender.close()
    return pack({"full": full, "logits": logits, "train_loss": loss, "steps": step + 1}) if rank == 0 else None


def _fp8_matmul_in_use() -> str:
    """Which FP8 matmul transformers' FP8Linear will run, made to run offline if need be.

    transformers 5.x loads its fine-grained FP8 Triton kernel from the Hugging Face Hub
    (the ``kernels`` package); machines without a network cannot. There FP8Linear's matmul
    is replaced by a dequantization of the FP8 weight with its ``weight_scale_inv`` blocks,
    then a bf16 matmul: the same bytes served, without the Hub kernel's activation
    quantization.
    """
    from transformers.integrations import finegrained_fp8

    try:
        finegrained_fp8.load_finegrained_fp8_kernel()
        return "transformers' Hub FP8 kernel (weights and activations in FP8)"
    except ImportError:
        pass

    from fsdp_sync.quant import dequantize

    def dequantized_linear(input, weight, weight_scale_inv, block_size=None, bias=None, activation_scale=None):
        # float32 scales, as the Hub kernel applies them (transformers' own backward-pass
        # dequantization rounds the scales to the activation dtype first).
        w = dequantize(weight, weight_scale_inv, tuple(block_size)).to(input.dtype)
        return torch.nn.functional.linear(input, w, bias)

    finegrained_fp8.finegrained_fp8_linear = dequantized_linear
    return "weight-only FP8: FP8Linear's weight and scales dequantized (the Hub kernel is unreachable offline)"


def gpu_fp8_engine(rank: int, world_size: int, cfg: SyncConfig, *_: object) -> bytes:
    """transformers' fine-grained FP8 Llama on its GPU, filled by the push, run through FP8Linear."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    matmul = _fp8_matmul_in_use()
    device = torch.device("cuda", torch.cuda.current_device())
    model = replace_with_fp8_linear(build_model(tiny_llama_config(), seed=123, dtype=DTYPE),
                                    modules_to_not_convert=["lm_head"],
                                    quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128]))
    # Buffers (the rotary inv_freq) are derived, not pushed: to_empty would leave them as
    # whatever memory it got, so they are put back after it.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    recv = WeightReceiver(model, config=cfg, commit="staged")
    recv.wait_for(1)
    recv.commit()
    seqs, _ = _addition_batch(EVAL_PROBLEMS, seed=1)
    with torch.no_grad():
        logits = model.eval()(input_ids=seqs.to(device)).logits.float().cpu()
    params = {n: p.detach().cpu() for n, p in model.named_parameters()}
    recv.close()
    return pack({"params": params, "logits": logits, "matmul": matmul})
