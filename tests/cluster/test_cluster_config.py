"""The production cluster files: cluster.yaml against Ray's own cluster-launcher schema, and the
12-GPU example configs against the platform's models and against each other (GPU counts,
sweep concurrency, shared storage). Nothing here starts a cloud node: the checks are what
`ray up` and the jobs would check first."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validate(cfg: dict) -> dict:
    """What `ray up` does before it touches the cloud: fill the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_schema(cluster):
    prepared = _validate(cluster)
    assert prepared["provider"]["type"] == "gcp"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("break_it, where", [
    (lambda c: c.update(max_worker=2), "max_worker"),
    (lambda c: c["available_node_types"]["worker_a100x4"].update(resources={"GPU": "four"}), "four"),
    (lambda c: c["available_node_types"]["worker_a100x4"].pop("node_config"), "node_config"),
])
def test_the_schema_check_catches_mistakes(cluster, break_it, where):
    """The validation above is not vacuous: a misspelt key, a wrong type, a missing field all fail."""
    import jsonschema

    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError, match=where):
        _validate(broken)


def _fixed_nodes(cluster: dict) -> list[tuple[str, dict]]:
    """(node type, its resources) for every node the launcher keeps up: the head and min_workers of each type."""
    types = cluster["available_node_types"]
    nodes = [(cluster["head_node_type"], types[cluster["head_node_type"]]["resources"])]
    for name, spec in types.items():
        assert spec["min_workers"] == spec["max_workers"], f"{name}: the cluster is fixed-size"
        nodes += [(name, spec["resources"])] * spec["min_workers"]
    return nodes


def test_three_nodes_of_four_a100(cluster):
    nodes = _fixed_nodes(cluster)
    assert len(nodes) == 3
    assert [r["GPU"] for _, r in nodes] == [4, 4, 4]
    assert all(r["accelerator_type:A100"] == 4 for _, r in nodes)
    assert cluster["max_workers"] == 2  # head + 2 workers
    for spec in cluster["available_node_types"].values():
        cfg = spec["node_config"]
        assert cfg["machineType"] == "a2-ultragpu-4g"  # 4 x A100 80GB per VM
        assert {"onHostMaintenance": "TERMINATE"} in cfg["scheduling"]  # GPU VMs cannot live-migrate
    # `ray start` declares the same GPUs the launcher schedules with
    starts = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    assert starts.count("--num-gpus=4") == 2


def test_nodes_install_the_gpu_profile_and_share_tracking(cluster):
    setup = "\n".join(cluster["setup_commands"])
    # one pip command from PyPI: vllm==0.32.0 pins the CUDA torch (the exact command and its
    # resolution are checked by test_install_resolution.py); no torch from another index first
    assert '"/home/ubuntu/lorafleet[gpu,postgres,wandb]"' in setup and "/home/ubuntu/lorafleet" in cluster["file_mounts"]
    assert "download.pytorch.org" not in setup
    # PyPI's torch 2.13.0 is built for CUDA 13.0: the nodes need an NVIDIA driver >= 580
    for spec in cluster["available_node_types"].values():
        image = spec["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        driver = int(image.rsplit("-nvidia-", 1)[1])
        assert driver >= 580, image
        assert "ubuntu-2404" in image  # Python 3.12; vLLM 0.32 refuses the 3.10 of Ubuntu 22.04
    # MLflow's PostgreSQL URL names the driver the `postgres` extra installs
    assert "postgresql+psycopg2://" in "\n".join(cluster["head_setup_commands"])
    starts = "\n".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    assert starts.count("MLFLOW_TRACKING_URI=http://") == 2  # every node's Ray processes reach the one MLflow server
    assert "mlflow server" in "\n".join(cluster["head_setup_commands"])


def _cluster_resources(cluster: dict) -> dict[str, float]:
    total: dict[str, float] = {}
    for _, res in _fixed_nodes(cluster):
        for k, v in res.items():
            total[k] = total.get(k, 0) + v
    return total


def test_twelve_gpu_finetune_uses_every_gpu_with_shared_checkpoints(cluster):
    from lorafleet.config import FinetuneConfig, load_config

    cfg = load_config(FinetuneConfig, REPO / "jobs/configs/llama8b-qlora-12gpu.yaml")
    d = cfg.distributed
    assert cfg.method == "qlora" and d.strategy == "fsdp" and d.use_gpu
    assert d.num_workers * d.resources_per_worker["GPU"] == _cluster_resources(cluster)["GPU"] == 12
    per_node_cpu = min(r["CPU"] for _, r in _fixed_nodes(cluster))
    assert 4 * d.resources_per_worker["CPU"] <= per_node_cpu  # 4 workers fit on the head node too
    assert cfg.quantization.bnb_4bit_quant_storage == cfg.quantization.bnb_4bit_compute_dtype  # FSDP can shard NF4
    assert cfg.checkpoint.storage_path.startswith("gs://")  # shared by every node
    assert cfg.training.mixed_precision == "bf16"


def test_twelve_gpu_sweep_runs_three_four_gpu_trials(cluster):
    from lorafleet.config import load_config
    from lorafleet.config.sweep import SweepConfig
    from lorafleet.tune.sweep import derive_max_concurrent_trials

    cfg = load_config(SweepConfig, REPO / "jobs/configs/llama8b-sweep-12gpu.yaml")
    n, why = derive_max_concurrent_trials(cfg.sweep, cfg.finetune, _cluster_resources(cluster))
    assert n == 3, why
    assert cfg.finetune.distributed.placement_strategy == "STRICT_PACK"  # a trial stays on one node's NVLink
    assert cfg.sweep.storage_path.startswith("gs://") and cfg.finetune.checkpoint.storage_path.startswith("gs://")


def test_gpu_serving_config_holds_100_plus_adapters():
    from lorafleet.serve.config import load_serve_config

    cfg = load_serve_config(REPO / "serve/llama-8b-gpu.yaml")
    e, d = cfg.engine, cfg.deployment
    assert e.dtype == "bfloat16" and d.num_gpus == 1
    assert e.max_cpu_loras >= 100 and e.max_loras <= e.max_cpu_loras
    assert cfg.tenancy.registry_url.startswith("postgresql://")  # every replica on every node reads one registry
    assert d.autoscaling.max_replicas <= 12
    # tenants of a shared cluster cannot register each other's models or folders
    assert cfg.tenancy.scoped_models("acme") == ["acme~*"]
    assert cfg.tenancy.scoped_roots("acme") == ["/mnt/shared/adapters/acme"]
