"""Per-replica devices (--devices cpu,cuda,...): resources, room checks and early errors. The GPU
half runs where a GPU is (scripts/gpu_check.sh); here, everything that needs none."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raytorch import ClusterError, TrainConfig, Trainer
from raytorch.group.placement import describe_bundles, shortfall
from raytorch.replica.device import (
    HUGE_PAGES,
    gpu_index,
    replica_env,
    replica_resources,
    resolve_device,
    wants_huge_pages,
    whole_gpus,
)
from raytorch.tasks.builtin import linear, linear_data


def test_each_replica_reserves_what_its_device_needs():
    config = TrainConfig(workers=3, devices="cuda,cpu,cuda", cpus_per_replica=2, gpus_per_replica=0.5)
    assert [replica_resources(config, rank) for rank in range(3)] == [
        {"CPU": 2.0, "GPU": 0.5}, {"CPU": 2.0}, {"CPU": 2.0, "GPU": 0.5}]
    assert describe_bundles([replica_resources(config, rank) for rank in range(3)]) == \
        "2 replicas of 2 CPU, 0.5 GPU and 1 of 2 CPU"


def test_cuda_replicas_on_a_cluster_without_gpus_are_refused_by_rank():
    config = TrainConfig(workers=3, devices="cpu,cuda,cuda")
    with pytest.raises(ClusterError, match=r"devices 'cpu,cuda,cuda' puts replica\(s\) 1, 2 on cuda, but the "
                                           r"cluster has no GPU \(8 CPU, 0 GPU\)"):
        resolve_device(config, {"CPU": 8.0})
    assert resolve_device(config, {"CPU": 8.0, "GPU": 1.0}) is config


def test_room_is_checked_per_kind_and_in_all():
    gpu_node, cpu_node = {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}
    cuda, cpu = {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}
    assert shortfall([gpu_node, cpu_node], [cuda, cpu, cpu]) is None
    assert shortfall([gpu_node, cpu_node], [cuda, cuda, cpu]) == "room for 1 of 1 CPU, 1 GPU"
    assert shortfall([{"CPU": 2.0, "GPU": 1.0}], [cuda, cpu, cpu]) == "3 CPU asked in all"  # each kind fits alone
    assert shortfall([cpu_node], [cpu] * 5) == "room for 4"


def test_a_mixed_run_without_gpus_fails_before_any_replica_starts(ray_local):
    config = TrainConfig(workers=2, devices="cpu,cuda", batch_size=8)
    with pytest.raises(ClusterError, match=r"puts replica\(s\) 1 on cuda, but the cluster has no GPU"):
        Trainer(config, model_fn=linear, dataset_fn=lambda: linear_data(32, 0), loss_fn=F.mse_loss, quiet=True).fit()


def test_whole_gpu_replicas_see_their_node_and_pick_their_own_by_ray_id():
    whole = TrainConfig(workers=2, device="cuda")
    shared = TrainConfig(workers=2, device="cuda", gpus_per_replica=0.5)
    mixed = TrainConfig(workers=2, devices="cuda,cpu")
    assert replica_env(whole, 0)["env_vars"]["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    assert replica_env(whole, 0, huge_pages=False) == {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    assert "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" not in replica_env(shared, 0)["env_vars"]
    assert replica_env(shared, 0, huge_pages=False) is None and replica_env(mixed, 1, huge_pages=False) is None
    assert whole_gpus(whole, [0, 1]) and not whole_gpus(shared, [0, 1]) and not whole_gpus(mixed, [0, 1])
    assert gpu_index("3", None) == 3  # the node shows all its GPUs: the id is the index
    assert gpu_index("6", "4,6, 7") == 1  # the node narrows them: the id's place among them
    with pytest.raises(RuntimeError, match="GPU 2, which is not among CUDA_VISIBLE_DEVICES=4,6"):
        gpu_index("2", "4,6")


def test_replicas_of_a_large_model_start_with_huge_page_allocation_unless_the_driver_says_otherwise(ray_local,
                                                                                                    monkeypatch):
    config = TrainConfig(workers=2)
    # only a model with a tensor of 2 MB or more: a small one keeps the faster start
    assert wants_huge_pages(torch.nn.Linear(1024, 512).state_dict())
    assert not wants_huge_pages(torch.nn.Linear(512, 512).state_dict()) and not wants_huge_pages({})
    monkeypatch.delenv(HUGE_PAGES, raising=False)
    env = replica_env(config, 0)
    assert env["env_vars"][HUGE_PAGES] == "1"

    @ray_local.remote(num_cpus=0)
    def seen():
        return os.environ.get(HUGE_PAGES), os.environ.get("PYTHONPATH")

    # Ray merges the replica's env_vars with the job's (the fixture's PYTHONPATH stays)
    assert ray_local.get(seen.options(runtime_env=env).remote()) == ("1", str(Path(__file__).parent))
    monkeypatch.setenv(HUGE_PAGES, "0")
    assert replica_env(config, 1)["env_vars"][HUGE_PAGES] == "0"
