"""The configuration reference is generated from the models and committed: it must match them."""

from __future__ import annotations

from pathlib import Path

from lorafleet.config.reference import render_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_committed_reference_matches_the_models():
    assert DOC.is_file(), "docs/configuration.md is missing: run `make docs`"
    assert DOC.read_text() == render_reference(), "docs/configuration.md is stale: run `make docs` and commit it"


def test_reference_covers_every_config_and_nested_keys():
    text = render_reference()
    for key in ["`lora.r`", "`training.learning_rate`", "`sweep.space`", "`engine.max_loras`", "`tenancy.quotas.requests_per_minute`",
                "`adapters[].source`", "`architecture.hidden_size`", "`distributed.strategy`"]:
        assert key in text, key
    assert "**required**" in text and "| `tenancy.admin_key` | secret string (optional) | `null` |" in text
