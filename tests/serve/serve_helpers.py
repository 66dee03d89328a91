"""Helpers for the serving tests: building the tiny base and decisive adapters in-process
(no Ray), offline PEFT + Transformers greedy outputs, and the near-tie check."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from testutils import free_port  # noqa: F401 - re-exported for the serving fixtures

PROMPT_SUFFIX = "\nintent:"
# adapter name -> the phrase it learns to answer with (each a different continuation)
TARGETS = {
    "alpha": " card arrival is late",
    "beta": " exchange rate question",
    "gamma": " refund not showing up",
    "delta": " top up failed again",  # served from the MLflow registry only
}
LOCAL_ADAPTERS = ("alpha", "beta", "gamma")
MAX_NEW_TOKENS = 12
# the session's shared app (conftest.served)
APP = "lorafleet-test"
PREFIX = "/lf"
BASE = "tiny-base"
MAX_MODEL_LEN = 256
TOKEN_CAP = 128
ADMIN_KEY = "test-admin-key-0123456789"


@dataclass
class Served:
    url: str
    cfg: object
    startup_s: float
    replicas_seen: dict  # model -> set of engine replica ids that answered it
    uploads: Path  # an allowed local root tests may write adapters into
    outside: Path  # a folder outside every allowed root
    restart: object = None  # callable: delete and redeploy the app with the same config (same registry)
    close: object = None  # callable: stop the app early (the last module that needs it does, to free the machine)


@dataclass
class ServeAssets:
    root: Path
    base: Path
    adapters: dict[str, Path]
    prompts: list[str]
    chat_messages: list[dict]
    # model name ("base" for the base) -> prompt -> greedy completion token ids (offline PEFT)
    expected_ids: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    expected_text: dict[str, dict[str, str]] = field(default_factory=dict)
    chat_prompt: str = ""


def build_untrained_base(out: Path, hidden_size: int = 128, intermediate_size: int = 256) -> Path:
    """A 2-layer Llama with random weights and a small BPE tokenizer (for checks that need shapes, not outputs)."""
    from lorafleet.base.build import ArchitectureConfig, init_model, train_tokenizer

    colours, animals = ["red", "green", "blue", "grey", "black"], ["cat", "dog", "owl", "fox", "eel", "yak"]
    lines = [f"the {c} {a} saw {n} {b}s near the river" for c in colours for a in animals for b in animals for n in range(2)]
    tok = train_tokenizer(lines, 300)
    arch = ArchitectureConfig(vocab_size=300, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    init_model(tok, arch).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train_base(out: Path, lines: list[str], steps: int):
    import torch

    from lorafleet.base.build import ArchitectureConfig, init_model, train_tokenizer

    tok = train_tokenizer(lines, 1024)
    arch = ArchitectureConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    model = init_model(tok, arch)
    ids: list[int] = []
    for line in lines:
        ids += tok(line).input_ids + [tok.eos_token_id]
    block = 64
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def train_adapter(base: Path, out: Path, target: str, queries: list[str], seed: int, steps: int = 40):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target_ids = tok(target).input_ids + [tok.eos_token_id]
    rng = random.Random(seed)
    for _ in range(steps):
        seqs, labels = [], []
        for q in rng.sample(queries, 16):
            p = tok(q + PROMPT_SUFFIX).input_ids
            seqs.append(p + target_ids)
            labels.append([-100] * len(p) + target_ids)
        length = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (length - len(s)) for s in seqs])
        lab = torch.tensor([lb + [-100] * (length - len(lb)) for lb in labels])
        att = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
        model(input_ids=ids, attention_mask=att, labels=lab).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)


def train_task_adapter(base: Path, out: Path, data, steps: int, seed: int = 0, lr: float = 1e-2) -> Path:
    """A LoRA adapter trained on ``data`` (a lorafleet ``TaskData``) as lorafleet trains: the task's prompt +
    completion with completion-only labels (``tokenize_examples``) in right-padded batches (``collate_batch``),
    saved with ``lorafleet_prompt.json`` from the task's ``prompt_format()``, as a trained adapter's folder holds it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafleet.data import collate_batch, tokenize_examples
    from lorafleet.data.prompt_format import write_prompt_format

    tok = AutoTokenizer.from_pretrained(base)
    features, _ = tokenize_examples(data.train, tok, MAX_MODEL_LEN, data.task)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        model(**collate_batch(rng.sample(features, 16), tok.pad_token_id)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    write_prompt_format(out, data.task.prompt_format())
    return out


def offline_greedy(base: Path, adapter: Path | None, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
                   add_special_tokens: bool = True) -> dict[str, list[int]]:
    """Greedy completion token ids by PEFT + Transformers (stops at EOS, which is kept, like vLLM)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = {}
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, add_special_tokens=add_special_tokens, return_tensors="pt").input_ids
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out[prompt] = gen[0, ids.shape[1]:].tolist()
    return out


def near_tie(base: Path, adapter: Path | None, prompt: str, ours: list[int], theirs: list[int], tol: float = 1e-3,
             add_special_tokens: bool = True) -> tuple[bool, str]:
    """Whether two greedy continuations part only where the offline model's top two logits are
    within ``tol`` (float noise between vLLM's and Transformers' kernels can flip such a tie)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok(prompt, add_special_tokens=add_special_tokens).input_ids + theirs[:p]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top2 = torch.topk(logits, 2)
    gap = float(top2.values[0] - top2.values[1])
    candidates = {int(i) for i in top2.indices}
    mine = ours[p] if p < len(ours) else None
    other = theirs[p] if p < len(theirs) else None
    return gap < tol and {mine, other} <= candidates, f"first difference at token {p}: top-2 logit gap {gap:.2e}, tokens {mine} vs {other}"


# Numbers at and past every limit an engine type has (int32, int64, uint64, float64), for fuzzing.
EXTREMES = [-1, 0, 1.5, 2**31, 2**63, 2**64 + 1, 10**40, 1e308, -1e308]


def numeric_fields(model) -> list[str]:
    """The request model's plain int/float fields, read from vLLM's own model (new ones are fuzzed as vLLM adds them)."""
    out = []
    for name, field in model.model_fields.items():
        annotation = str(field.annotation)
        if ("int" in annotation or "float" in annotation) and not any(t in annotation for t in ("list", "dict", "Format", "Options", "Choice")):
            out.append(name)
    return out
