"""The `lsd` command, run in-process through `lsd_cli.main.main` and once as a real process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lsd_cli.main import main
from lsd_jax.config import load_config, resolve_config
from lsd_jax.errors import ConfigError
from lsd_jax.flops import frame_pass_flops, streamed_frame_flops


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _info(capsys, *argv):
    code, out, err = _run(capsys, "info", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_info_tiny(capsys, repo_root, tiny_cfg):
    info = _info(capsys, "--config", str(repo_root / "lsd_configs" / "tiny.py"))
    assert info["name"] == "tiny"
    assert info["tokens_per_frame"] == 256 and info["grid"] == [16, 16]
    assert info["window"] == 8 and info["cache_frames"] == 7
    assert info["steps"] == 3
    assert info["frame_shape"] == [64, 64, 3] and info["codec"] == "pixel"
    assert info["flops_per_pass"] == frame_pass_flops(tiny_cfg.model)
    assert info["flops_per_frame"] == streamed_frame_flops(tiny_cfg, 3)
    assert sum(info["flops_per_pass_by_part"].values()) == info["flops_per_pass"]
    # The fixed rotary frequencies are counted in the total but are not trained.
    assert info["params_total"] > info["params_trainable"] > 1_000_000


def test_info_overrides_anywhere_after_config(capsys, repo_root):
    tiny = str(repo_root / "lsd_configs" / "tiny.py")
    base = _info(capsys, "--config", tiny)
    info = _info(capsys, "--config", tiny, "model.depth=1", "diffusion.sample_steps=1")
    assert info["params_trainable"] < base["params_trainable"]
    assert info["steps"] == 1
    # An override after a later option is still an override.
    code, out, err = _run(capsys, "info", "--config", tiny, "--json", "model.window=4")
    assert code == 0, err
    assert json.loads(out)["cache_frames"] == 3


def test_info_without_config_describes_the_demo_model(capsys):
    from lsd_jax.checkpoint import load_config_from
    from lsd_jax.demo import demo_model_dir

    info = _info(capsys)
    assert info["config"] == str(demo_model_dir())
    assert info["name"] == load_config_from(demo_model_dir()).name
    code, out, _ = _run(capsys, "info", "diffusion.sample_steps=1")
    assert code == 0 and "built-in demo model" in out
    assert "1 denoising passes" in out


def test_info_text_output(capsys, repo_root):
    code, out, _ = _run(capsys, "info", "--config", str(repo_root / "lsd_configs" / "tiny.py"))
    assert code == 0
    for label in ("parameters", "FLOPs per pass", "FLOPs per frame", "tokens per frame",
                  "window", "steps"):
        assert label in out


def test_config_by_packaged_name_from_anywhere(capsys, tmp_path, monkeypatch, repo_root):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("tiny").samefile(repo_root / "lsd_configs" / "tiny.py")
    # `lsd_configs/tiny.py` outside the repository also finds the packaged file.
    assert resolve_config("lsd_configs/tiny.py").samefile(repo_root / "lsd_configs" / "tiny.py")
    assert _info(capsys, "--config", "tiny")["name"] == "tiny"
    with pytest.raises(ConfigError, match=r"'nope' not found.*packaged: .*tiny"):
        resolve_config("nope")


def test_existing_file_wins_over_packaged_name(tmp_path, monkeypatch, repo_root):
    (tmp_path / "tiny.py").write_text(
        (repo_root / "lsd_configs" / "tiny.py").read_text().replace('name="tiny"', 'name="mine"'))
    monkeypatch.chdir(tmp_path)
    assert load_config(resolve_config("tiny.py")).name == "mine"


@pytest.mark.parametrize("args, names", [
    (["model.dpth=2"], ["model.dpth"]),
    (["model.depth=two"], ["model.depth", "'two'"]),
    (["model.patch_size=7"], ["model.frame_height=64", "model.patch_size=7"]),
    (["model.num_heads=3"], ["model.hidden_size=128", "model.num_heads=3"]),
    (["stray"], ["'stray' is not of the form key.path=value"]),
])
def test_bad_config_is_one_line_exit_2(capsys, repo_root, args, names):
    code, out, err = _run(capsys, "info", "--config", str(repo_root / "lsd_configs" / "tiny.py"),
                          *args)
    assert code == 2 and out == ""
    assert err.startswith("lsd: error: ") and err.count("\n") == 1
    for name in names:
        assert name in err


def test_missing_config_is_one_line_exit_2(capsys, tmp_path):
    code, _, err = _run(capsys, "info", "--config", str(tmp_path / "nope.py"))
    assert code == 2 and "nope.py" in err and err.count("\n") == 1


def test_oasis_vae_bench_says_what_is_missing(capsys):
    code, _, err = _run(capsys, "bench", "step", "--config", "oasis_500m", "--no-progress")
    assert code == 2 and "oasis_vae" in err and "weights" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["info", "--config", "tiny", "--bogus"],              # unknown option
    ["bench"],                                            # benchmark name missing
    ["bench", "step", "--config", "tiny", "--steps", "0"],
    ["bench", "step", "--config", "tiny", "--frames", "many"],
    ["bench", "step", "--config", "tiny", "--peak-sizes", "512,x"],
    ["frobnicate"],
])
def test_bad_arguments_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_oasis_500m_parameter_count_in_a_real_process(repo_root):
    result = subprocess.run(
        [sys.executable, "-m", "lsd_cli", "info", "--config", "lsd_configs/oasis_500m.py"],
        capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "607,943,792" in result.stdout


@pytest.mark.slow
def test_bench_step_reports_consistent_figures(capsys, repo_root, tiny_cfg):
    code, out, err = _run(
        capsys, "bench", "step", "--config", str(repo_root / "lsd_configs" / "tiny.py"),
        "--steps", "2", "--frames", "5", "--warmup", "1", "--batch", "2",
        "--peak-sizes", "64,128", "--no-progress", "--json")
    assert code == 0, err
    result = json.loads(out)
    ms = result["ms_per_frame"]
    assert result["steps"] == 2 and result["batch"] == 2 and result["frames"] == 5
    assert 0 < ms["min"] <= ms["p50"] <= ms["p99"] and result["compile_s"] > 0
    # Per-frame FLOPs are the compiled batch-2 step's divided by the batch, and match the analytic
    # count (test_flops.py holds them equal, up to its MATMUL_RTOL).
    assert result["flops_per_frame_exact"]
    assert result["flops_per_frame"] == pytest.approx(streamed_frame_flops(tiny_cfg, 2), rel=2e-3)
    assert result["flops_per_frame_analytic"] == streamed_frame_flops(tiny_cfg, 2)
    assert result["xla_cost_analysis_flops_per_frame"] < result["flops_per_frame"]
    achieved = 2 * result["flops_per_frame"] / (ms["p50"] / 1e3) / 1e9
    assert result["achieved_gflops"] == pytest.approx(achieved, rel=1e-9)
    assert set(result["matmul_gflops_by_size"]) == {"64", "128"}
    assert result["matmul_peak_gflops"] == max(result["matmul_gflops_by_size"].values())
    assert result["percent_of_peak"] == pytest.approx(
        100 * result["achieved_gflops"] / result["matmul_peak_gflops"], rel=1e-9)
    assert result["fps"] == pytest.approx(2 * 1e3 / ms["mean"], rel=1e-9)


def test_info_rejects_unknown_attention_impl(capsys, repo_root):
    code, out, err = _run(capsys, "info", "--config", str(repo_root / "lsd_configs" / "tiny.py"),
                          "model.attention_impl=magic")
    assert code == 2
    assert "model.attention_impl='magic' is not one of" in err and "'xla'" in err


def test_info_describes_a_model_whose_kernel_runs_elsewhere(monkeypatch):
    """`lsd info` on this CPU machine describes a config that selects a GPU-only kernel (nothing
    runs), while selecting that kernel to run here is a one-line error naming the platform."""
    from lsd_cli.info import describe
    from lsd_jax import kernels
    from lsd_jax.config import load_config
    from lsd_jax.errors import ConfigError

    gpu_row = kernels.Kernel("attention", "gpu_only", "lsd_jax.attention:XLA", ("cuda",),
                             ("float32",), "a GPU-only row for this test")
    monkeypatch.setattr(kernels, "TABLE", (*kernels.TABLE, gpu_row))
    cfg = load_config("lsd_configs/tiny.py", ["model.attention_impl=gpu_only"])
    assert describe(cfg)["params_total"] == describe(load_config("lsd_configs/tiny.py"))[
        "params_total"]
    with pytest.raises(ConfigError, match="'gpu_only' cannot run on cpu: it runs on cuda"):
        kernels.select("attention", "gpu_only")
