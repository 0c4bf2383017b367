"""`bdm generate`: the console script end to end on the BinaryDM UNet golden, and bad inputs as one line with a
non-zero exit and no output file (run in-process through cli.main.main, which is what the console script calls)."""

import importlib.util
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from bdm.cli import main as cli_main

CASE = "unet_cifar_like_w32"
pytestmark = pytest.mark.filterwarnings("ignore:.*sign-0 weights")


def test_generate_end_to_end(bdm_ref, tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run(["bdm", "generate", "--ckpt", bdm_ref / f"{CASE}.pt", "--config", bdm_ref / f"{CASE}.json",
                             "--num", "2", "--steps", "2", "--seed", "4", "--device", "cpu", out],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert "2 samples of 3x32x32, 2 DDIM steps (t 501..1)" in result.stderr and "step 2/2" in result.stderr
    assert np.asarray(Image.open(out)).shape == (36, 70, 3)


def run_main(capsys, *args):
    with pytest.raises(SystemExit) as stop:
        cli_main.main(["generate", *map(str, args)])
    err = capsys.readouterr().err
    assert stop.value.code != 0 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def latent_yaml(bdm_ref, tmp_path, **changes):
    """An LDM YAML around the golden UNet, latent (a VQ first stage) unless changed."""
    unet = yaml.safe_load((bdm_ref / f"{CASE}.json").read_text())["constructor"]
    params = {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
              "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface"},
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel_ours.UNetModel",
                              "params": {**unet, "act_bits": 4}}, **changes}
    path = tmp_path / "ldm.yaml"
    path.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                              "params": params}}))
    return path


@pytest.mark.parametrize("args, text", [
    ([], "give exactly one model"),
    (["--ckpt", "{bi}/ckpt_small_x4.pth", "--config", "{bi}/ckpt_small_x4.yml"], "use `bdm upscale`"),
    (["--ckpt", "{ref}/{case}.pt", "--config", "{latent}"], "latent diffusion model"),
    (["--ckpt", "{ref}/{case}.pt", "--config", "{v_param}"], "parameterization 'v' is not supported"),
    (["--ckpt", "{ref}/{case}.pt"], "does not match the binarydm network"),
    (["--ckpt", "{ref}/{case}.pt", "--config", "{ref}/{case}.json", "--mode", "w1a4"], "mode 'w1a4'"),
    (["--ckpt", "{ref}/{case}.pt", "--config", "{ref}/{case}.json", "--steps", "3"], "reach t = 1000"),
    (["--ckpt", "{ref}/{case}.pt", "--config", "{ref}/{case}.json", "--size", "36"], "multiple of 8"),
    (["--onnx", "{tmp}/missing.onnx"], "no such ONNX file"),
])
def test_bad_inputs_are_one_line_and_write_nothing(bdm_ref, bi_ref, tmp_path, capsys, args, text):
    fill = dict(ref=bdm_ref, bi=bi_ref, tmp=tmp_path, case=CASE, latent=latent_yaml(bdm_ref, tmp_path),
                v_param=tmp_path / "v.yaml")
    v_yaml = yaml.safe_load(fill["latent"].read_text())
    v_yaml["model"]["params"]["parameterization"] = "v"
    fill["v_param"].write_text(yaml.safe_dump(v_yaml))
    out = tmp_path / "o.png"
    line = run_main(capsys, *[a.format(**fill) for a in args], "--num", "1", out)
    assert line.startswith("bdm: error:") and text in line, line
    assert not out.exists() and not list(tmp_path.glob(".*.part"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_engine_without_tensorrt_is_one_line(tmp_path, capsys):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"")  # only its existence is checked: the missing TensorRT is reported before it is read
    line = run_main(capsys, "--engine", engine, tmp_path / "o.png")
    assert line == (f"bdm: error: --engine {engine} needs TensorRT, which is not installed here; install the "
                    "'tensorrt' extra on an NVIDIA GPU machine, or use --onnx on this one")
    assert not (tmp_path / "o.png").exists()
