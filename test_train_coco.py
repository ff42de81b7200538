"""End-to-end tests of train_coco.py and the generation CLI, through the real command lines, at the tiny preset."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import mini_sd

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
RUN = ["--preset", "tiny", "--vae-steps", "12", "--unet-steps", "30", "--batch-size", "8", "--warmup", "5",
       "--save-every", "6", "--keep", "20", "--sample-every", "30", "--log-every", "5", "--workers", "1"]


def train(tmp, *args, cwd=None, check=True, timeout=300):
    cmd = [sys.executable, os.path.join(HERE, "train_coco.py"), *args]
    p = subprocess.run(cmd, cwd=cwd or tmp, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}")
    return p


def losses(out):
    with open(os.path.join(out, "loss.csv")) as f:
        return [(r["stage"], int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The default command at the tiny preset, uninterrupted: no COCO here, so it builds shapes and trains."""
    tmp = tmp_path_factory.mktemp("full")
    p = train(tmp, *RUN, "--shapes-n", "48", "--out", "out")
    return tmp, p


def test_default_run_makes_checkpoint_samples_and_log(full_run):
    tmp, p = full_run
    out = tmp / "out"
    assert "no COCO at ./coco: training on synthetic shapes" in p.stdout
    assert (tmp / "data" / "shapes" / "annotations" / "captions_train2017.json").is_file()
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    grid = Image.open(out / "samples" / "step-0000030.png")
    assert grid.size == (4 * 32, 2 * 32)  # 8 prompts, 4 columns
    assert Image.open(out / "loss.png").size[0] > 0
    rows = losses(out)
    assert [s for s, _, _ in rows] == ["vae"] * 12 + ["unet"] * 30
    assert (out / "cache").is_dir() and len(os.listdir(out / "cache")) == 1
    assert "latent scaling_factor" in p.stdout
    model = mini_sd.DiffusionModel.load(out / "model")
    assert model.vae.scaling_factor > 0 and model.ema_unet is not None


def test_generation_cli(full_run, tmp_path):
    tmp, _ = full_run
    gen = [sys.executable, os.path.join(HERE, "mini_sd.py"), "--checkpoint", str(tmp / "out" / "model"), "--steps", "3"]
    p = subprocess.run(gen + ["a red circle in the top left", "a blue square", "--seed", "0", "--negative", "green",
                              "--sampler", "ddim", "--out", str(tmp_path / "a.png")], env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(tmp_path / "a.png").size == (64, 32)  # two prompts side by side
    p = subprocess.run(gen + ["a red circle", "--seed", "0", "--init-image", str(tmp_path / "a.png"), "--strength", "0.5",
                              "--out", str(tmp_path / "b.png")], env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(tmp_path / "b.png").size == (32, 32)


def test_resume_continues_exactly(full_run):
    """Resume from the middle of the VAE stage: the whole loss sequence equals the uninterrupted run's."""
    tmp, _ = full_run
    shutil.copytree(tmp / "out" / "ckpt-vae-0000006", tmp / "resumed" / "ckpt-vae-0000006")
    shutil.copy(tmp / "out" / "loss.csv", tmp / "resumed" / "loss.csv")
    p = train(tmp, *RUN, "--out", "resumed", "--resume")
    assert "resumed resumed/ckpt-vae-0000006 (vae step 6)" in p.stdout
    assert losses(tmp / "resumed") == losses(tmp / "out")


def test_sigint_saves_a_checkpoint_and_resume_matches(full_run):
    tmp, _ = full_run
    cmd = [sys.executable, os.path.join(HERE, "train_coco.py"), *RUN, "--out", "stopped"]
    proc = subprocess.Popen(cmd, cwd=tmp, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp / "stopped" / "loss.csv", time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # interrupt early in the UNet stage
        if log.exists() and "unet,2," in log.read_text():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by signal at unet step" in stdout, stdout
    step = int(stdout.split("stopped by signal at unet step ")[1].split(";")[0])
    assert step < 30 and (tmp / "stopped" / f"ckpt-unet-{step:07d}" / "trainer.safetensors").is_file()
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp / "stopped"))
    train(tmp, *RUN, "--out", "stopped", "--resume")
    assert losses(tmp / "stopped") == losses(tmp / "out")


def test_torchrun_two_processes_on_cpu(full_run):
    tmp, _ = full_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train_coco.py"), "--preset", "tiny", "--vae-steps", "4", "--unet-steps", "6",
           "--batch-size", "4", "--save-every", "3", "--sample-every", "6", "--workers", "0", "--out", "ddp"]
    p = subprocess.run(cmd, cwd=tmp, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "x2" in p.stdout and p.stdout.count("saved ddp/ckpt-unet-0000006") == 1  # rank 0 alone logs and saves
    _, meta = mini_sd.load_safetensors(tmp / "ddp" / "ckpt-unet-0000006" / "trainer.safetensors")
    state = json.loads(meta["state"])
    assert len(state["__dict__"][-1][1]) == 2  # both processes' RNG states, so resume works the same
    assert len(losses(tmp / "ddp")) == 10 and (tmp / "ddp" / "model" / "model.safetensors").is_file()


def test_odd_and_corrupt_images_do_not_stop_training(tmp_path):
    image_dir, captions = mini_sd.make_shapes_dataset(tmp_path / "coco", n=20, image_size=32, split="val2017")
    coco = json.load(open(captions))
    odd = {"gray.png": Image.new("L", (50, 40), 90), "cmyk.jpg": Image.new("CMYK", (64, 48), (0, 200, 200, 0)),
           "tiny.png": Image.new("RGB", (2, 3), "blue"), "huge.jpg": Image.new("RGB", (3000, 2000), "green"),
           "rgba.png": Image.new("RGBA", (40, 40), (255, 0, 0, 100))}
    for name, img in odd.items():
        img.save(os.path.join(image_dir, name))
    with open(os.path.join(image_dir, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is no JPEG")
    with open(os.path.join(image_dir, "000000000001.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(image_dir, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    for i, name in enumerate([*odd, "corrupt.jpg", "truncated.jpg"]):
        coco["images"].append({"id": 1000 + i, "file_name": name})
        coco["annotations"].append({"id": 5000 + i, "image_id": 1000 + i, "caption": f"an odd image {name}"})
    json.dump(coco, open(captions, "w"))
    p = train(tmp_path, "--coco-dir", "coco", "--split", "val2017", "--preset", "tiny", "--vae-steps", "6",
              "--unet-steps", "4", "--batch-size", "9", "--workers", "1", "--out", "out")
    assert "27 images" in p.stdout and "25 images encoded" in p.stdout and "2 unreadable skipped" in p.stdout
    assert "skipping unreadable image" in p.stderr
    assert len(losses(tmp_path / "out")) == 10
    assert '"a red circle in the top left"' in p.stdout  # a shapes set given as --coco-dir is sampled at shape prompts


def test_bad_input_gets_one_clear_line(full_run, tmp_path):
    tmp, _ = full_run
    p = train(tmp_path, "--coco-dir", "nowhere", "--preset", "tiny", check=False)
    assert p.returncode == 2 and "error: no COCO train2017 at nowhere: nowhere/train2017 not found" in p.stderr
    assert "cocodataset.org" in p.stderr
    os.makedirs(tmp_path / "c" / "train2017")
    p = train(tmp_path, "--coco-dir", "c", "--preset", "tiny", check=False)
    assert p.returncode == 2 and "c/annotations/captions_train2017.json not found" in p.stderr
    (tmp_path / "file").write_text("")
    p = train(tmp_path, "--out", "file/out", "--preset", "tiny", check=False)
    assert p.returncode == 2 and "output folder file/out is not writable" in p.stderr
    shutil.copytree(tmp / "out" / "ckpt-unet-0000030", tmp_path / "other" / "ckpt-unet-0000030")
    p = train(tmp, "--preset", "small", "--out", str(tmp_path / "other"), "--resume", check=False)
    assert p.returncode == 2 and "different config" in p.stderr and "image_size: checkpoint 32 != model 64" in p.stderr


def test_nan_loss_stops_with_the_last_good_checkpoint(full_run, tmp_path):
    tmp, _ = full_run
    p = train(tmp, "--preset", "tiny", "--skip-vae", "--resume", str(tmp / "out" / "ckpt-vae-0000012"),
              "--unet-steps", "200", "--lr", "1e12", "--warmup", "1", "--batch-size", "8", "--save-every", "1",
              "--workers", "0", "--out", str(tmp_path / "nan"), check=False)
    assert p.returncode == 2 and "loss is" in p.stderr and "last good checkpoint is" in p.stderr, p.stderr[-2000:]
    last = p.stderr.split("last good checkpoint is ")[1].split(";")[0]
    model = mini_sd.DiffusionModel.load(last)  # loads, and its weights are finite
    assert all(mini_sd.torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
