"""The `solar` CLI and the Python API are the same core: same inputs and seed, same bytes."""
from __future__ import annotations

import json
import subprocess

import pytest

import solar

SETTINGS = [
    # (CLI flags, Python keyword arguments)
    (["--pool", "100", "--keep-fraction", "0.3", "--bits", "8", "--seed", "7"],
     dict(pool=100, keep_fraction=0.3, bits=8, seed=7)),
    (["--pool-a", "64", "--pool-b", "40", "--keep", "12", "--bits", "4", "--seed", "18446744073709551615", "--noise", "0.5"],
     dict(pool_a=64, pool_b=40, keep=12, bits=4, seed=2**64 - 1, noise=0.5)),
    (["--pool", "512", "--keep-fraction", "1", "--bits", "32", "--seed", "3", "--threads", "1"],
     dict(pool=512, keep_fraction=1.0, bits=32, seed=3, threads=2)),
    ([], dict()),  # defaults agree
    (["--target-error", "0.2", "--quantiser", "uniform"], dict(mode="spectral", target_error=0.2, quantiser="uniform")),
]


def run(cli, *args):
    r = subprocess.run([cli, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"solar {' '.join(map(str, args))} failed:\n{r.stderr}"
    return r


@pytest.mark.parametrize("flags,kwargs", SETTINGS, ids=["paper", "pools-keep-4bit", "lossless", "defaults", "spectral-uniform"])
def test_cli_and_python_write_identical_files(solar_cli, stories_adapter, stories_ckpt, tmp_path, flags, kwargs):
    out = tmp_path / "cli.solar"
    run(solar_cli, "compress", "--base", stories_ckpt, "--adapter", stories_adapter, "--out", out, "-q", *flags)
    py = solar.compress(stories_adapter, stories_ckpt, **kwargs)
    assert out.read_bytes() == py.to_bytes()


def test_cli_reads_python_files_and_back(solar_cli, stories_adapter, stories_ckpt, tmp_path):
    py = solar.compress(stories_adapter, stories_ckpt, pool=100, seed=11)
    py_file = py.save(tmp_path / "py.solar")

    # CLI decompress of the Python file == Python restore_to_dir of the same file.
    run(solar_cli, "decompress", py_file, "--base", stories_ckpt, "--out", tmp_path / "cli_restored", "-q")
    solar.restore_to_dir(py_file, stories_ckpt, tmp_path / "py_restored")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "cli_restored" / name).read_bytes() == (tmp_path / "py_restored" / name).read_bytes()

    # `solar inspect --json` reports what CompressedAdapter.report() does.
    inspected = json.loads(run(solar_cli, "inspect", "--json", py_file).stdout)
    assert inspected.pop("file") == str(py_file)
    assert inspected.pop("producer") == py.producer
    assert inspected.pop("seed") == "11"
    assert inspected == py.report()
