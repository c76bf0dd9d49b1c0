"""The README's first command, `bash scripts/example.sh`, runs `python -m bench.example`: the main
job on the bundled real example (stories260K + its TinyShakespeare LoRA), every CLI command real,
scored on held-out text. Here on 4 windows instead of 64, so it stays a test."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO

pytest.importorskip("torch")
pytest.importorskip("peft")


def test_readme_main_job_runs_and_keeps_what_it_reports(tmp_path, stories_ckpt, solar_cli):
    if not (FIXTURES / "stories260k_lora_r4" / "adapter_model.safetensors").is_file():
        pytest.skip("stories260K LoRA fixture absent")
    out = tmp_path / "example"
    env = {**os.environ, "SOLAR_CLI": str(solar_cli), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "bench.example", "--out", str(out), "--windows", "4"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # The table: one row per job, each with the file's real size and a retention.
    rows = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s+(\S.*?)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)\s+(-?[\d.]+)%$", line)
        if m:
            rows[m[1]] = (int(m[2]), float(m[5]))
    assert len(rows) == 8, r.stdout[-3000:]
    files = sorted(out.glob("stories_*.solar"))
    assert len(files) == 8 and sorted(size for size, _ in rows.values()) == sorted(f.stat().st_size for f in files)
    for i in range(8):  # every file restored to a PEFT adapter directory
        assert (out / f"restored_{i}" / "adapter_model.safetensors").is_file()
        assert (out / f"restored_{i}" / "adapter_config.json").is_file()

    # What the README promises of them: byte limits met, the recommended default keeps nearly all.
    limited = {name: v for name, v in rows.items() if "1500" in name}
    assert len(limited) == 3 and all(size <= 1500 for size, _ in limited.values())
    assert rows["spectral, target error 0.05"][1] > 97.0
    assert rows["spectral + calibration, target 0.3"][1] > 85.0
    # ... and the paper's own mode, at its authors' defaults, keeps less in a larger file.
    paper, default = rows["paper (N=1000, 30% kept, 8-bit)"], rows["spectral, target error 0.05"]
    assert paper[0] > default[0] and paper[1] < default[1] - 10
    assert re.search(r"^\$ \S*solar inspect ", r.stdout, re.M)  # the breakdown of the default file
