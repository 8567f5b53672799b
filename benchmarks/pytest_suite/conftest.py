"""pytest-benchmark: machine fields that make a saved run readable on its own."""

import torch

from lsr.bench.runner import device_name


def pytest_benchmark_update_machine_info(config, machine_info):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine_info["torch_version"] = torch.__version__
    machine_info["cuda_version"] = torch.version.cuda
    machine_info["lsr_device_name"] = device_name(device)
    machine_info["torch_threads"] = torch.get_num_threads()
