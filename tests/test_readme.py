"""The README's copy-paste commands and links stay true: every config a command names exists and
validates with the command's own `--set` overrides (so a renamed key breaks this test, not a
reader's first run), every relative link in README and docs/ resolves, and every job config's
first line is the command that uses it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands() -> list[str]:
    """Shell commands of the README's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        out += [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return out


def _job_commands() -> list[tuple[str, str, list[str]]]:
    """(script, config path, --set overrides) of every `jobs/*.py --config` and `lorafleet serve --config` command."""
    found = []
    for cmd in _commands():
        words = shlex.split(cmd.replace("$PWD", str(REPO)))
        for i, w in enumerate(words):
            if w.endswith(("jobs/finetune.py", "jobs/sweep.py")) or (w == "serve" and i and words[i - 1].endswith("lorafleet")):
                if "--config" in words[i:]:
                    rest = words[i:]
                    config = rest[rest.index("--config") + 1]
                    sets = [rest[j + 1] for j, x in enumerate(rest) if x == "--set"]
                    found.append((w.rsplit("/", 1)[-1], config, sets))
    return found


def test_the_readme_has_the_commands_we_check():
    scripts = {s for s, _, _ in _job_commands()}
    assert scripts == {"finetune.py", "sweep.py", "serve"}, _job_commands()
    assert len(_job_commands()) >= 6


@pytest.mark.parametrize("script, config, sets", _job_commands(), ids=lambda v: str(v)[:60])
def test_readme_command_config_validates_with_its_overrides(script, config, sets):
    from lorafleet.config import FinetuneConfig, load_config
    from lorafleet.config.sweep import SweepConfig
    from lorafleet.serve.config import load_serve_config

    path = REPO / config
    assert path.is_file(), f"the README names {config}, which does not exist"
    if script == "finetune.py":
        load_config(FinetuneConfig, path, sets)
    elif script == "sweep.py":
        load_config(SweepConfig, path, sets)
    else:
        load_serve_config(path, sets)


def test_every_serve_and_cluster_file_the_readme_names_exists():
    for name in set(re.findall(r"\b(serve/\w[\w-]*\.yaml|jobs/configs/\w[\w.-]*\.yaml|cluster\.yaml)\b", README)):
        assert (REPO / name).is_file(), name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


@pytest.mark.parametrize("config", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_first_line_is_its_command(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith("# ") and f"--config jobs/configs/{config.name}" in first, first
