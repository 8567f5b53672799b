"""Triton is optional: without it the package imports, the suite collects, and the kernels' tests skip."""

import os
import subprocess
import sys

from helpers import run_pytest


def test_suite_collects_and_skips_the_kernels_without_triton(tmp_path):
    # A None entry in sys.modules makes `import triton` fail and find_spec("triton") find nothing,
    # as on a machine where Triton is not installed.
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["triton"] = None\n')
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    check = "import lsr; assert not lsr.get('fused-exact').runs_on('cuda'); print('ok')"
    assert (
        subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True).stdout
        == "ok\n"
    )
    result = run_pytest("src/lsr/fused", "tests/test_fused_triton.py", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "skipped" in result.stdout and "error" not in result.stdout.lower()
