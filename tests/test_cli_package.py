"""The toolkit as a user gets it from a wheel: scenarios/ and dashboards/ are package data, found from any
directory; and the layout rules of kvbm_cli (the app assembled in app.py, kvbm never importing the toolkit)."""

from __future__ import annotations

import glob
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_in_a_fresh_venv_finds_scenarios_and_dashboards(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = glob.glob(str(tmp_path / "dist" / "kvbm-*.whl"))[0]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    # the dependencies come from the test's environment; kvbm itself only from the wheel
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel],
                   check=True, capture_output=True, timeout=300)
    python, away = str(venv / "bin" / "python"), tmp_path / "elsewhere"
    away.mkdir()

    def kvbm(*args: str) -> str:
        done = subprocess.run([python, "-m", "kvbm_cli", *args], cwd=away, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([python, "-c", "import kvbm_cli; print(kvbm_cli.__file__)"], cwd=away,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the installed copy, not the checkout
    assert "SCENARIO" in kvbm("bench", "compare", "--help")
    up = kvbm("metrics", "up", "--dry-run")
    assert f"{site}/kvbm_cli/dashboards/prometheus.yml:/etc/prometheus/prometheus.yml" in up
    assert (site / "kvbm_cli" / "dashboards" / "grafana" / "dashboards" / "kvbm.json").is_file()
    scenario = subprocess.run([python, "-c", "from kvbm_cli.bench.compare import default_scenario, load_scenario; "
                               "print(load_scenario(default_scenario()).name)"], cwd=away, capture_output=True,
                              text=True, timeout=120)
    assert scenario.stdout.strip() == "prefix-reuse-cpu", scenario.stderr[-2000:]


def test_help_shows_every_flag_whole_at_80_columns_in_a_pipe():
    import os

    env = {**os.environ, "COLUMNS": "80"}
    for cmd in (["bench", "prefix-reuse"], ["bench", "multi-round"], ["serve"], ["size"], ["doctor", "disk"]):
        done = subprocess.run([sys.executable, "-m", "kvbm_cli", *cmd, "--help"], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0 and "…" not in done.stdout, done.stdout
        assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout
    out = subprocess.run(f"{sys.executable} -m kvbm_cli bench prefix-reuse --help | grep prefix-prompt-length",
                         shell=True, capture_output=True, text=True, env=env, timeout=120).stdout
    assert "--prefix-prompt-length" in out


def test_toolkit_layering_contracts_hold(tmp_path):
    """kvbm never imports kvbm_cli; no module of kvbm_cli imports the app (app.py assembles it)."""
    lint = Path(sys.executable).with_name("lint-imports")
    cfg = tmp_path / "contracts.toml"
    modules = sorted(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
                     for p in (ROOT / "kvbm_cli").rglob("*.py") if p.name not in ("app.py", "__main__.py"))
    modules.remove("kvbm_cli")
    cfg.write_text('[tool.importlinter]\nroot_packages = ["kvbm", "kvbm_cli"]\n\n'
                   '[[tool.importlinter.contracts]]\nname = "the library never imports the toolkit"\n'
                   'type = "forbidden"\nsource_modules = ["kvbm"]\nforbidden_modules = ["kvbm_cli"]\n\n'
                   '[[tool.importlinter.contracts]]\nname = "no command module imports the app"\n'
                   'type = "forbidden"\nsource_modules = [' + ", ".join(f'"{m}"' for m in modules) + ']\n'
                   'forbidden_modules = ["kvbm_cli.app"]\n')
    proc = subprocess.run([str(lint), "--no-cache", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "2 kept, 0 broken" in proc.stdout, proc.stdout[-3000:]
