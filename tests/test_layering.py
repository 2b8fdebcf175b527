"""Layering contracts (pyproject.toml, [tool.importlinter]) checked with import-linter on the real import graph."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_policy_protocol_mechanism_leader_and_integration_stay_apart():
    proc = lint()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 kept, 0 broken" in proc.stdout


def test_the_contracts_can_fail(tmp_path):
    """Negative control: a contract the code breaks (the worker does import the mechanism) is reported."""
    cfg = tmp_path / "contracts.toml"
    cfg.write_text('[tool.importlinter]\nroot_packages = ["kvbm"]\n\n[[tool.importlinter.contracts]]\n'
                   'name = "worker without mechanism"\ntype = "forbidden"\nsource_modules = ["kvbm.worker"]\n'
                   'forbidden_modules = ["kvbm.mechanism"]\n')
    proc = lint(str(cfg))
    assert proc.returncode == 1 and "kvbm.worker -> kvbm.mechanism" in proc.stdout
