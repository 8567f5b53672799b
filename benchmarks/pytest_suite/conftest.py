"""pytest-benchmark: the machine fields of lsr.bench.environment, so a saved run is readable on its own."""

import torch

from lsr.bench.environment import environment


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lsr"] = environment("cuda" if torch.cuda.is_available() else "cpu")
