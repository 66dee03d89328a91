"""Adapter admission checks (lorafleet.serve.validation) on real PEFT adapters over tiny, untrained bases.

Two bases are built from config alone (random weights, no training): ``tiny`` (hidden 64) that
the adapters are checked against, and ``wide`` (hidden 128) whose adapters must not fit it.
Each bad case is a modified copy of one good adapter saved by PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lorafleet.serve.adapters import AdapterError
from serve_helpers import build_untrained_base
from lorafleet.serve.validation import (
    FINGERPRINT_FILE,
    AdapterRefused,
    BaseModelSpec,
    base_fingerprint,
    inspect_adapter,
)

WEIGHTS = "adapter_model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj"
DELETE = object()  # config value meaning "remove this key"


def _save_adapter(base: Path, out: Path, **lora) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16, **lora))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validation")
    tiny = build_untrained_base(root / "bases" / "tiny", hidden_size=64, intermediate_size=128)
    wide = build_untrained_base(root / "bases" / "wide", hidden_size=128, intermediate_size=256)
    targets = ["q_proj", "v_proj"]
    return {
        "tiny": tiny,
        "wide": wide,
        "good": _save_adapter(tiny, root / "adapters" / "good", target_modules=targets),
        "patterned": _save_adapter(tiny, root / "adapters" / "patterned", target_modules=targets, rank_pattern={"v_proj": 4}),
        "wide_adapter": _save_adapter(wide, root / "adapters" / "wide", target_modules=targets),
    }


@pytest.fixture(scope="module")
def spec(assets) -> BaseModelSpec:
    return BaseModelSpec.from_model(str(assets["tiny"]), served_name="tiny-chat", aliases=["banking-base"])


def check(folder: Path, spec: BaseModelSpec, **overrides):
    limits = {"max_lora_rank": 16, "max_bytes": 10**8, **overrides}
    return inspect_adapter(folder, spec, **limits)


def refused(folder: Path, spec: BaseModelSpec, status: int, code: str, *fragments: str, **overrides) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as caught:
        check(folder, spec, **overrides)
    exc = caught.value
    assert (exc.status, exc.code) == (status, code), str(exc)
    for fragment in fragments:
        assert fragment in str(exc)
    return exc


def variant(src: Path, dst: Path, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of adapter ``src`` at ``dst`` with ``config`` merged into its adapter_config.json and ``drop`` files removed."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        cfg = {k: v for k, v in cfg.items() if v is not DELETE}
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    for name in drop:
        (dst / name).unlink()
    return dst


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite the adapter's safetensors with ``edit(tensors) -> tensors``."""
    from safetensors.torch import load_file, save_file

    save_file(edit(load_file(folder / WEIGHTS)), folder / WEIGHTS)


# --------------------------------------------------------------------------- accepted


def test_good_adapter_passes_with_its_facts(assets, spec):
    folder = assets["good"]
    info = check(folder, spec)
    assert info.rank == 8 and info.lora_alpha == 16.0
    assert info.target_modules == ["q_proj", "v_proj"]
    assert info.size_bytes == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert info.base_model == str(assets["tiny"])


@pytest.mark.parametrize("claimed", ["/other/parent/tiny", "org/tiny", "tiny", "tiny-chat", "banking-base"])
def test_base_matches_by_any_name_or_last_component(assets, spec, tmp_path, claimed):
    folder = variant(assets["good"], tmp_path / "a", {"base_model_name_or_path": claimed})
    assert check(folder, spec).base_model == claimed


def test_fingerprint_file_vouches_for_a_renamed_base(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a", {"base_model_name_or_path": "org/Some-Other-Name"})
    (folder / FINGERPRINT_FILE).write_text(json.dumps({"base_fingerprint": spec.fingerprint, "base_model": "org/Some-Other-Name"}))
    assert check(folder, spec).rank == 8
    (folder / FINGERPRINT_FILE).write_text(json.dumps({"base_fingerprint": "0" * 64}))
    refused(folder, spec, 422, "base_model_mismatch", "'org/Some-Other-Name'", spec.fingerprint)


def test_rank_pattern_is_honoured(assets, spec):
    info = check(assets["patterned"], spec)
    assert info.rank == 8 and info.target_modules == ["q_proj", "v_proj"]


def test_refusal_is_an_adapter_error_with_the_message(tmp_path, spec):
    exc = refused(tmp_path / "nowhere", spec, 404, "adapter_not_found", "does not exist")
    assert isinstance(exc, AdapterError) and isinstance(exc, ValueError)
    assert str(exc) == exc.args[0]


# --------------------------------------------------------------------------- folder and files


def test_not_a_folder(assets, spec):
    refused(assets["good"] / WEIGHTS, spec, 422, "invalid_adapter", "is not a folder")


def test_too_large(assets, spec):
    refused(assets["good"], spec, 413, "adapter_too_large", "MB", "(1000 bytes)", max_bytes=1000)


def test_symlink_outside_is_forbidden(assets, spec, tmp_path):
    outside = tmp_path / "secrets.txt"
    outside.write_text("password")
    folder = variant(assets["good"], tmp_path / "a")
    (folder / "notes.txt").symlink_to(outside)
    refused(folder, spec, 403, "path_not_allowed", "notes.txt", str(outside))


def test_directory_symlink_outside_is_forbidden(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a")
    (folder / "etc").symlink_to("/etc", target_is_directory=True)
    refused(folder, spec, 403, "path_not_allowed", "etc", "/etc")


def test_symlinks_inside_folder_or_allowed_roots_are_accepted(assets, spec, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "README.md").write_text("model card")
    folder = variant(assets["good"], tmp_path / "a")
    (folder / "card.md").symlink_to(shared / "README.md")
    (folder / "config-link.json").symlink_to("adapter_config.json")
    assert check(folder, spec, allowed_roots=[str(shared)]).rank == 8
    refused(folder, spec, 403, "path_not_allowed", "card.md")  # the same folder without that root


def test_dangling_symlink(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a")
    (folder / "gone.txt").symlink_to(tmp_path / "missing")
    refused(folder, spec, 422, "invalid_adapter", "gone.txt", "broken symlink")


def test_pickle_weights_alone_are_refused(assets, spec, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = variant(assets["good"], tmp_path / "a", drop=(WEIGHTS,))
    torch.save(load_file(assets["good"] / WEIGHTS), folder / "adapter_model.bin")
    refused(folder, spec, 422, "unsafe_weights_format", "adapter_model.bin", "only safetensors", "safe_serialization=True")


@pytest.mark.parametrize("name", ["adapter_model.bin", "training_args.bin", "optimizer.pt", "extra/state.pkl", "last.ckpt"])
def test_pickle_files_next_to_safetensors_are_refused(assets, spec, tmp_path, name):
    folder = variant(assets["good"], tmp_path / "a")
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"\x80\x04not really a pickle")
    refused(folder, spec, 422, "unsafe_weights_format", name)


def test_missing_safetensors(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a", drop=(WEIGHTS,))
    refused(folder, spec, 422, "invalid_adapter", f"no {WEIGHTS}")


# --------------------------------------------------------------------------- adapter_config.json


def test_missing_config(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a", drop=("adapter_config.json",))
    refused(folder, spec, 422, "invalid_adapter", "no adapter_config.json")


@pytest.mark.parametrize("text, fragment", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object, found list")])
def test_unreadable_config(assets, spec, tmp_path, text, fragment):
    folder = variant(assets["good"], tmp_path / "a")
    (folder / "adapter_config.json").write_text(text)
    refused(folder, spec, 422, "invalid_adapter", fragment)


@pytest.mark.parametrize("change, fragments", [
    ({"peft_type": "IA3"}, ["peft_type 'IA3'", '"peft_type": "LORA"']),
    ({"peft_type": DELETE}, ["peft_type None", '"peft_type": "LORA"']),
    ({"use_dora": True}, ["use_dora", "DoRA"]),
    ({"modules_to_save": ["lm_head"]}, ["modules_to_save ['lm_head']", "LoRA weights only"]),
    ({"r": 0}, ["r=0", "positive integer"]),
    ({"lora_alpha": "sixteen"}, ["lora_alpha='sixteen'"]),
    ({"bias": "all", "init_lora_weights": "pissa"}, ["bias='all'", "init_lora_weights='pissa'", "plain LoRA"]),
])
def test_config_features_that_cannot_be_served(assets, spec, tmp_path, change, fragments):
    folder = variant(assets["good"], tmp_path / "a", change)
    refused(folder, spec, 422, "invalid_adapter", *fragments)


# --------------------------------------------------------------------------- base, rank, targets


def test_wrong_base_name(assets, spec):
    refused(assets["wide_adapter"], spec, 422, "base_model_mismatch", f"trained on {str(assets['wide'])!r}", "'tiny-chat'")


def test_unnamed_base_without_fingerprint(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a", {"base_model_name_or_path": None})
    refused(folder, spec, 422, "base_model_mismatch", "does not say which base", FINGERPRINT_FILE)


def test_right_name_wrong_shapes(assets, spec, tmp_path):
    folder = variant(assets["wide_adapter"], tmp_path / "a", {"base_model_name_or_path": str(assets["tiny"])})
    exc = refused(folder, spec, 422, "shape_mismatch", "different base model")
    assert "[8, 128]" in str(exc) and "needs [8, 64]" in str(exc)


@pytest.mark.parametrize("change, limit, fragment", [
    ({}, 4, "r=8"),
    ({"rank_pattern": {"v_proj": 32}}, 16, "rank_pattern['v_proj']=32"),
])
def test_rank_above_the_engine_limit(assets, spec, tmp_path, change, limit, fragment):
    folder = variant(assets["good"], tmp_path / "a", change)
    refused(folder, spec, 422, "rank_too_large", fragment, f"limit of {limit}", "engine.max_lora_rank", max_lora_rank=limit)


def test_config_rank_that_does_not_match_the_tensors(assets, spec, tmp_path):
    folder = variant(assets["patterned"], tmp_path / "a", {"rank_pattern": {}})
    refused(folder, spec, 422, "shape_mismatch", "v_proj.lora_A.weight", "has rank 4", "rank 8")


def test_unknown_target_module_in_config(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a", {"target_modules": ["q_proj", "c_attn", "query_key_value"]})
    refused(folder, spec, 422, "unknown_target_module", "['c_attn', 'query_key_value']", "q_proj")


def test_regex_target_modules_are_left_to_the_tensor_check(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a", {"target_modules": r".*\.(q_proj|v_proj)"})
    assert check(folder, spec).target_modules == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("extra_key", [
    f"base_model.model.{Q_PROJ}.bias",
    "base_model.model.model.embed_tokens.lora_embedding_A",
    f"base_model.model.{Q_PROJ}.lora_A.default.weight",
])
def test_unsupported_tensor(assets, spec, tmp_path, extra_key):
    import torch

    folder = variant(assets["good"], tmp_path / "a")
    edit_tensors(folder, lambda t: {**t, extra_key: torch.zeros(8, 64)})
    refused(folder, spec, 422, "unsupported_tensor", repr(extra_key))


def test_tensor_for_a_module_the_base_lacks(assets, spec, tmp_path):
    import torch

    folder = variant(assets["good"], tmp_path / "a")
    edit_tensors(folder, lambda t: {**t, "base_model.model.model.layers.0.mlp.c_fc.lora_A.weight": torch.zeros(8, 64)})
    refused(folder, spec, 422, "unknown_target_module", "model.layers.0.mlp.c_fc")


def test_missing_lora_b(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a")
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != f"base_model.model.{Q_PROJ}.lora_B.weight"})
    refused(folder, spec, 422, "shape_mismatch", f"no lora_B for '{Q_PROJ}'")


def test_lora_a_not_two_dimensional(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a")
    edit_tensors(folder, lambda t: {k: v.flatten() if k.endswith("q_proj.lora_A.weight") and "layers.1." in k else v for k, v in t.items()})
    refused(folder, spec, 422, "shape_mismatch", "[512]", "needs ['r', 64]")


def test_no_tensors(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a")
    edit_tensors(folder, lambda t: {})
    refused(folder, spec, 422, "invalid_adapter", "holds no tensors")


def test_truncated_safetensors(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused(folder, spec, 422, "corrupt_weights", "cannot be read as safetensors")


def test_random_bytes_as_safetensors(assets, spec, tmp_path):
    folder = variant(assets["good"], tmp_path / "a")
    (folder / WEIGHTS).write_bytes(os.urandom(4096))
    refused(folder, spec, 422, "corrupt_weights", "cannot be read as safetensors")


# --------------------------------------------------------------------------- the base spec


def test_base_spec_from_model(assets, spec):
    import torch
    from transformers import AutoModelForCausalLM

    assert {str(assets["tiny"]), "tiny", "tiny-chat", "banking-base"} == spec.names
    real = AutoModelForCausalLM.from_pretrained(assets["tiny"])
    linears = {name: tuple(m.weight.shape) for name, m in real.named_modules() if isinstance(m, torch.nn.Linear)}
    assert spec.linear_shapes == linears
    assert spec.linear_shapes[Q_PROJ] == (64, 64)
    assert spec.linear_shapes["model.layers.1.self_attn.k_proj"] == (32, 64)  # one key/value head of dimension 32


def test_base_fingerprint_is_stable_and_tells_bases_apart(assets, spec):
    config = json.loads((assets["tiny"] / "config.json").read_text())
    assert spec.fingerprint == base_fingerprint(config) == BaseModelSpec.from_model(str(assets["tiny"])).fingerprint
    assert base_fingerprint({**config, "torch_dtype": "bfloat16", "unrelated": 1}) == spec.fingerprint
    assert BaseModelSpec.from_model(str(assets["wide"])).fingerprint != spec.fingerprint


def test_a_prompt_format_is_read_with_the_adapter(assets, spec, tmp_path):
    from lorafleet.data.prompt_format import write_prompt_format
    from lorafleet.data.tasks import get_task

    folder = variant(assets["good"], tmp_path / "prompted")
    write_prompt_format(folder, get_task("banking77").prompt_format())
    assert check(folder, spec).prompt_format["template"] == "Query: {text}\nIntent:"
    assert check(assets["good"], spec).prompt_format is None


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not readable JSON"),
    ('["a list"]', "must hold a JSON object"),
    ('{"format_version": 1, "task": "t", "kind": "classification", "template": "Q: {text}", "fields": ["query"]}', "uses the fields"),
    ('{"format_version": 2, "task": "t", "kind": "classification", "template": "Q: {text}", "fields": ["text"]}', "format_version"),
    ('{"format_version": 1, "task": "t", "kind": "classification", "template": "Q: {text", "fields": ["text"]}', "not a valid format string"),
    ('{"format_version": 1, "task": "t", "kind": "c", "template": null, "fields": [], "extra": 1}', "unknown keys"),
])
def test_a_malformed_prompt_format_is_refused(assets, spec, tmp_path, text, fragment):
    folder = variant(assets["good"], tmp_path / "bad-prompt")
    (folder / "lorafleet_prompt.json").write_text(text)
    refused(folder, spec, 422, "invalid_prompt_format", fragment, "lorafleet_prompt.json")
