"""pytest-benchmark: the machine fields of lsr.bench.measure.machine, so a saved run is readable on its own.

machine_info["lsr"] holds what identifies the machine and software (pytest-benchmark's
--benchmark-compare warns when machine_info differs); what changes from run to run (load, date,
command, commit, the measured copy bandwidth) goes to the JSON's top-level "lsr_run", and the loader
(lsr.bench.data) reads both.
"""

import torch

from lsr.bench.measure.machine import environment

PER_RUN = ("load_average_1min", "date", "command", "git_commit", "copy_bandwidth_bytes_per_s")
_ENVIRONMENT = {}


def _environment() -> dict:
    if not _ENVIRONMENT:
        _ENVIRONMENT.update(environment("cuda" if torch.cuda.is_available() else "cpu"))
    return _ENVIRONMENT


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lsr"] = {k: v for k, v in _environment().items() if k not in PER_RUN}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["lsr_run"] = {k: v for k, v in _environment().items() if k in PER_RUN}
