"""The training step normalises the loss by target tokens: every completion token weighs the same,
whichever micro-batch (gradient accumulation) or rank it is in. Checked against the independent
oracle of one forward/backward over the whole batch with Transformers' own mean loss, on a tiny
LoRA model built here; the data-parallel case with 2 real gloo processes (DDP and FSDP2)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from lorafleet.data import collate_batch
from lorafleet.train.loop import _grad_sync, backward_token_normalised, optimizer_step
from lorafleet.train.model import wrap_peft
from tiny_models import feature, finetune_cfg, tiny_llama

PAD = 2
# Completions of very different lengths: 1-2 target tokens vs 12-15 (plus the prompt, no loss).
SHORT = [feature(6, 1, seed=1), feature(9, 2, seed=2)]
LONG = [feature(4, 12, seed=3), feature(5, 15, seed=4)]


def lora_model(strategy: str = "ddp"):
    model = wrap_peft(tiny_llama(seed=0), finetune_cfg(strategy=strategy))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: give it values so that A gets gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name.removeprefix("module.")] = g.detach().clone()
    return out


def oracle() -> tuple[dict[str, torch.Tensor], float]:
    """Gradients and loss of one batch holding every example: Transformers' mean over all target tokens."""
    model = lora_model()
    out = model(**collate_batch(SHORT + LONG, PAD))
    out.loss.backward()
    return grads(model), out.loss.item()


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_accumulated_micro_batches_give_the_full_batch_gradients():
    want, want_loss = oracle()
    assert any(g.abs().sum() > 0 for name, g in want.items() if "lora_A" in name)

    model = lora_model()
    loss_sum, targets, tokens = backward_token_normalised(model, [collate_batch(SHORT, PAD), collate_batch(LONG, PAD)],
                                                          torch.device("cpu"))
    assert_same_grads(grads(model), want)
    assert targets == 1 + 2 + 12 + 15 and tokens == sum(len(f["input_ids"]) for f in SHORT + LONG)
    assert loss_sum / targets == pytest.approx(want_loss, rel=1e-5)  # the logged loss is the per-token mean

    # The old normalisation (mean of micro-batch means) weighs the 3 short-completion tokens as much
    # as the 27 long ones: it does not give these gradients, so the test can tell the two apart.
    old = lora_model()
    for mb in (SHORT, LONG):
        (old(**collate_batch(mb, PAD)).loss / 2).backward()
    with pytest.raises(AssertionError):
        assert_same_grads(grads(old), want)


def test_fp16_gradient_scaler_step_matches_the_unscaled_step_and_skips_overflow():
    """``optimizer_step`` with a GradScaler (CPU here; CUDA on a GPU run) unscales before clipping and stepping."""
    def step(scaler, poison=False):
        model = lora_model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        backward_token_normalised(model, [collate_batch(SHORT + LONG, PAD)], torch.device("cpu"), scaler=scaler)
        if poison:
            next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("inf"))
        optimizer_step(model, opt, sched, max_grad_norm=0.5, scaler=scaler)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = step(None)
    scaled = step(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert_same_grads(scaled, plain)
    before = {n: p.detach() for n, p in lora_model().named_parameters() if p.requires_grad}
    skipped = step(torch.amp.GradScaler("cpu"), poison=True)
    assert_same_grads(skipped, before)  # an inf gradient skips the step instead of writing inf into the weights


def _rank_main(rank: int, strategy: str, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from lorafleet.train.parallel import apply_ddp, apply_fsdp2

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = finetune_cfg(strategy=strategy, num_workers=2)
        model = lora_model(strategy)
        model = apply_fsdp2(model, cfg, torch.device("cpu")) if strategy == "fsdp" else apply_ddp(model, cfg, torch.device("cpu"))
        # Rank 0 holds the short completions (3 target tokens), rank 1 the long ones (27), one example
        # per micro-batch, two micro-batches of accumulation each.
        mine = SHORT if rank == 0 else LONG
        backward_token_normalised(model, [collate_batch([f], PAD) for f in mine], torch.device("cpu"), averaged_over=2,
                                  no_sync=lambda last: _grad_sync(model, strategy, last))
        g = grads(model)
        if rank == 0:
            torch.save(g, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ranks_with_different_token_counts_give_the_single_process_gradients(strategy, tmp_path):
    out = tmp_path / "grads.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(strategy, str(tmp_path / "pg"), str(out)), nprocs=2, join=True)
    want, _ = oracle()
    assert_same_grads(torch.load(out), want)
