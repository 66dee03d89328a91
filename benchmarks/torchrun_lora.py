"""The baseline of the training benchmark: plain `torchrun` + Transformers `Trainer` + PEFT LoRA,
the way one would fine-tune without lorafleet. Not a lorafleet module: nothing here imports it.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/torchrun_lora.py \
        --base DIR --corpus corpus.txt --block 128 --batch 8 --steps 30 --rank 16 --out result.json

Data: the corpus's lines, each followed by eos, concatenated and cut into blocks of ``--block``
tokens (what lorafleet's raw_text task does with ``training.packing: true``), so both sides train
on identical shapes. DDP over gloo on CPU (NCCL on GPU), as the Trainer sets it up under torchrun.
Rank 0 writes tokens/s over the steps after ``--warmup`` and the peak RSS (max over ranks).
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    tok = AutoTokenizer.from_pretrained(args.base)
    ids: list[int] = []
    for line in open(args.corpus, encoding="utf-8").read().splitlines():
        if line.strip():
            ids += tok(line.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [ids[i:i + args.block] for i in range(0, len(ids) - args.block + 1, args.block)]
    data = [{"input_ids": b, "labels": list(b), "attention_mask": [1] * len(b)} for b in blocks]

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear"))

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: dict[int, float] = {}

        def on_step_end(self, a, state, control, **kw):
            self.times[state.global_step] = time.perf_counter()

    clock = Clock()
    targs = TrainingArguments(output_dir=args.out + ".trainer", per_device_train_batch_size=args.batch, max_steps=args.steps,
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=round(0.03 * args.steps), max_grad_norm=1.0,
                              logging_steps=5, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                              ddp_backend="gloo" if not torch.cuda.is_available() else "nccl", dataloader_num_workers=0,
                              remove_unused_columns=False, disable_tqdm=True, seed=42)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=default_data_collator, callbacks=[clock])
    trainer.train()

    world = dist.get_world_size() if dist.is_initialized() else 1
    measured = args.steps - args.warmup
    elapsed = clock.times[args.steps] - clock.times[args.warmup]
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tokens = measured * world * args.batch * args.block
        json.dump({"tokens_per_s": tokens / elapsed, "peak_memory_mb": peak.item(), "world_size": world, "steps_timed": measured,
                   "seconds_timed": elapsed, "blocks": len(blocks)}, open(args.out, "w"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
