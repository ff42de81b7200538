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
import torch
from PIL import Image

import mini_sd

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
RUN = ["--preset", "tiny", "--vae-steps", "12", "--unet-steps", "30", "--batch-size", "8", "--warmup", "5",
       "--save-every", "6", "--keep", "20", "--sample-every", "30", "--log-every", "5", "--workers", "1", "--shapes-n", "48"]


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
    p = train(tmp, *RUN, "--out", "out")
    return tmp, p


def test_default_run_makes_checkpoint_samples_and_log(full_run):
    tmp, p = full_run
    out = tmp / "out"
    assert "no COCO at ./coco: training on synthetic shapes" in p.stdout
    assert (tmp / "data" / "shapes" / "annotations" / "captions_train2017.json").is_file()
    last = out / "ckpt-unet-0000030"
    assert (last / "model.safetensors").is_file() and (last / "config.json").is_file() and (last / "trainer.pt").is_file()
    grids = sorted(os.listdir(out / "samples"))
    assert grids == ["step-0000003.png", "step-0000030.png"]  # one early (first 10% of the run), one at the end
    grid = Image.open(out / "samples" / "step-0000030.png")
    assert grid.size[0] == 4 * 128 and grid.size[1] > 2 * 128  # 8 prompts, 4 columns, tiles grown for a caption strip
    rows = losses(out)
    assert [s for s, _, _ in rows] == ["vae"] * 12 + ["unet"] * 30
    assert (out / "cache").is_dir() and len(os.listdir(out / "cache")) == 1
    assert "latent scaling_factor" in p.stdout and "eta" in p.stdout and "s/step" in p.stdout
    assert json.load(open(out / "run.json"))["unet_steps"] == 30
    model = mini_sd.DiffusionModel.load(out)  # a run folder loads its latest checkpoint
    assert model.vae.scaling_factor > 0 and model.ema_unet is not None


def test_generation_cli(full_run, tmp_path):
    tmp, _ = full_run
    gen = [sys.executable, os.path.join(HERE, "mini_sd.py"), "--checkpoint", str(tmp / "out"), "--steps", "3"]
    p = subprocess.run(gen + ["a red circle in the top left", "a blue square", "--seed", "0", "--negative", "green",
                              "--sampler", "ddim", "--out", str(tmp_path / "a.png")], env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(tmp_path / "a.png").size == (64, 32)  # two prompts side by side
    gen[3] = str(tmp / "out" / "ckpt-unet-0000024")  # any checkpoint folder works
    p = subprocess.run(gen + ["a red circle", "--seed", "0", "--init-image", str(tmp_path / "a.png"), "--strength", "0.5",
                              "--guidance-rescale", "0.7", "--guidance-interval", "0.2", "0.8", "--out", str(tmp_path / "b.png")],
                       env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Image.open(tmp_path / "b.png").size == (32, 32)


def test_resume_continues_exactly(full_run):
    """Resume from the middle of the VAE stage: the whole loss sequence equals the uninterrupted run's."""
    tmp, _ = full_run
    shutil.copytree(tmp / "out" / "ckpt-vae-0000006", tmp / "resumed" / "ckpt-vae-0000006")
    shutil.copy(tmp / "out" / "loss.csv", tmp / "resumed" / "loss.csv")
    p = train(tmp, *RUN, "--out", "resumed", "--resume")
    assert "resumed resumed/ckpt-vae-0000006 (vae step 6," in p.stdout
    assert losses(tmp / "resumed") == losses(tmp / "out")


def interrupt(tmp, args, when, sig=signal.SIGINT, timeout=240):
    """Start train_coco.py, send `sig` once a progress line contains `when`, -> (returncode, stdout, stderr)."""
    cmd = [sys.executable, os.path.join(HERE, "train_coco.py"), *args]
    proc = subprocess.Popen(cmd, cwd=tmp, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # the plain progress lines of a run whose output is not a terminal
        seen.append(line)
        if when in line:
            proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(seen) + stdout, stderr


def test_sigint_saves_and_the_printed_resume_command_continues_exactly(full_run):
    tmp, _ = full_run
    rc, stdout, stderr = interrupt(tmp, [*RUN, "--log-every", "1", "--out", "stopped"], when="unet step 2/")
    assert rc == 130, stderr[-3000:]  # 128 + SIGINT: an interrupted run is not a finished one
    assert "continue with: python train_coco.py --out stopped --resume" in stderr
    ckpt = stderr.split("saved ")[-1].split(";")[0]
    assert "ckpt-unet-" in ckpt and os.path.isfile(os.path.join(tmp, ckpt, "trainer.pt"))
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp / "stopped"))
    # the printed command, pasted as it is: the run's own arguments come back from run.json
    train(tmp, "--out", "stopped", "--resume")
    assert losses(tmp / "stopped") == losses(tmp / "out")


def test_sigterm_with_loader_workers_exits_143_and_leaves_no_process(tmp_path):
    args = ["--preset", "tiny", "--vae-steps", "400", "--unet-steps", "0", "--vae-batch-size", "8", "--workers", "2",
            "--log-every", "1", "--shapes-n", "64", "--out", "term-run"]
    rc, stdout, stderr = interrupt(tmp_path, args, when="vae step 3/", sig=signal.SIGTERM, timeout=60)
    assert rc == 143, stderr[-3000:]
    assert "ckpt-vae-" in stderr and any(n.startswith("ckpt-vae-") for n in os.listdir(tmp_path / "term-run"))
    time.sleep(1)
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and "term-run" in _cmdline(pid)]
    assert not left, "loader processes outlived the run"
    # an error after the workers started (a NaN loss) also ends promptly, workers and all
    p = train(tmp_path, "--preset", "tiny", "--vae-steps", "50", "--vae-lr", "1e30", "--warmup", "1", "--unet-steps", "0",
              "--vae-batch-size", "8", "--workers", "2", "--out", "term-nan", check=False, timeout=120)
    assert p.returncode == 2 and "loss is" in p.stderr, p.stderr[-2000:]
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and "term-nan" in _cmdline(pid)]


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""


def test_torchrun_two_processes_on_cpu(full_run):
    tmp, _ = full_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train_coco.py"), "--preset", "tiny", "--vae-steps", "4", "--unet-steps", "6",
           "--batch-size", "4", "--save-every", "3", "--sample-every", "6", "--workers", "0", "--shapes-n", "48", "--out", "ddp"]
    p = subprocess.run(cmd, cwd=tmp, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "x2" in p.stdout and p.stdout.count("saved ddp/ckpt-unet-0000006") == 1  # rank 0 alone logs and saves
    state = torch.load(tmp / "ddp" / "ckpt-unet-0000006" / "trainer.pt", weights_only=True)
    assert len(state["rng"]) == 2  # both processes' RNG states, so resume works the same
    assert state["rng"][0]["torch"].shape == state["rng"][1]["torch"].shape and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert len(losses(tmp / "ddp")) == 10 and (tmp / "ddp" / "ckpt-unet-0000006" / "model.safetensors").is_file()


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


def test_bad_input_gets_one_clear_line(full_run, tmp_path):
    tmp, _ = full_run
    os.makedirs(tmp_path / "c1" / "train2017")
    os.makedirs(tmp_path / "c2" / "train2017")
    (tmp_path / "c2" / "annotations").mkdir()
    (tmp_path / "c2" / "annotations" / "captions_train2017.json").write_text("[1, 2]")
    (tmp_path / "file").write_text("")
    shutil.copytree(tmp / "out" / "ckpt-unet-0000030", tmp_path / "other" / "ckpt-unet-0000030")
    cases = {
        "error: no COCO train2017 at nowhere: nowhere/train2017 not found": ["--coco-dir", "nowhere"],
        "c1/annotations/captions_train2017.json not found": ["--coco-dir", "c1"],
        "captions_train2017.json is not a COCO captions file: the top level is a JSON list": ["--coco-dir", "c2"],
        "output folder file/out is not writable": ["--out", "file/out"],
        "image_size: checkpoint 32 != model 64": ["--preset", "small", "--out", "other", "--resume"],
        "unknown prediction_type 'flw'; choose from epsilon, v_prediction, flow": ["--set", "prediction_type=flw"],
        "error: --init-from: ": ["--init-from", "no-such-user/no-such-model"],  # a hub name, offline: named as its flag
    }
    results = cli_errors("train_coco.py", [flags if "--preset" in flags else [*flags, "--preset", "tiny"]
                                           for flags in cases.values()], tmp_path)
    for message, (code, err, _) in zip(cases, results):
        assert code == 2 and message in err, (message, err[-2000:])
    assert "cocodataset.org" in results[0][1] and "different config" in results[4][1]


# Each bad command line below runs in one Python process (the script re-run by runpy per case), not one process each:
# the same argv, exit code and stderr, without a second of interpreter and torch start-up per case.
ERRORS = """
import contextlib, io, json, os, runpy, sys
script, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))  # as `python script` would
results = []
for argv in cases:
    sys.argv, err = [script, *argv], io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    results.append((code, err.getvalue(), "transformers.models" in " ".join(sys.modules)))
print(json.dumps(results))
"""


def cli_errors(script, cases, cwd):
    """(exit code, stderr, whether a transformers model module was imported) per argv in cases."""
    p = subprocess.run([sys.executable, "-c", ERRORS, os.path.join(HERE, script), json.dumps(cases)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.splitlines()[-1])
    assert len(results) == len(cases)
    return results


def test_numbers_are_checked_before_anything_loads(tmp_path):
    cases = {
        "--vae-steps must be >= 0, got -3": ["--vae-steps", "-3"],
        "--vae-batch-size must be >= 1, got 0": ["--vae-batch-size", "0"],
        "--lr must be > 0, got 0.0": ["--lr", "0"],
        "--ema must be in [0, 1), got 1.0": ["--ema", "1"],
        "--shapes-n must be >= 1, got 0": ["--shapes-n", "0"],
        "unknown Config field(s) ['block_out_channel']": ["--set", "block_out_channel=[1]"],
    }
    results = cli_errors("train_coco.py", [[*flags, "--out", "o"] for flags in cases.values()], tmp_path)
    for message, (code, err, loaded) in zip(cases, results):
        assert code == 2 and err.startswith("error: ") and message in err, (message, err[-2000:])
        assert len(err.strip().splitlines()) == 1 and not loaded, (message, err)  # one line, nothing loaded
    assert not os.path.exists(tmp_path / "data")


def test_each_shared_flag_parses_to_its_train_config_type(tmp_path, capsys):
    import train_coco

    args = train_coco.parse_args(["--seed", "3", "--ema", "0.5", "--warmup", "7", "--flip", "--ema-device", "cpu",
                                  "--out", str(tmp_path)])
    assert (args.seed, args.ema, args.warmup, args.flip, args.ema_device, args.compile) == (3, 0.5, 7, True, "cpu", False)
    assert mini_sd.TrainConfig(**train_coco.stage_args(args, "unet")).seed == 3
    (tmp_path / "run.json").write_text(json.dumps({"config": "my.json", "seed": 1}))  # a run from before --config went
    with pytest.raises(SystemExit):
        train_coco.parse_args(["--out", str(tmp_path), "--resume"])
    assert "started with --config my.json, which is gone: give its fields with --set" in capsys.readouterr().err


def test_generation_cli_checks_input_before_loading(full_run, tmp_path):
    tmp, _ = full_run
    cases = {
        "--steps must be >= 1, got 0": ["--steps", "0"],
        "--guidance must be >= 0, got -3.0": ["--guidance", "-3"],
        "--num-images must be >= 1, got 0": ["--num-images", "0"],
        "--strength must be in (0, 1], got 1.5": ["--strength", "1.5", "--init-image", __file__],
        "--out nodir/x.png: the folder": ["--out", "nodir/x.png"],
        "--guidance-interval must be (low, high) with 0 <= low <= high <= 1": ["--guidance-interval", "0.8", "0.2"],
    }
    results = cli_errors("mini_sd.py", [["--checkpoint", str(tmp / "out"), "a circle", *flags] for flags in cases.values()],
                         tmp_path)
    for message, (code, err, loaded) in zip(cases, results):
        assert code == 2 and f"error: {message}" in err and not loaded, (message, err[-2000:])


def test_checkpoints_move_between_the_api_and_the_cli(full_run, tmp_path):
    tmp, _ = full_run
    data = mini_sd.CocoCaptions(tmp / "data" / "shapes" / "train2017",
                                tmp / "data" / "shapes" / "annotations" / "captions_train2017.json", 32)
    # a CLI checkpoint from the middle of the UNet stage, continued by the API: the CLI's own losses come out
    shutil.copytree(tmp / "out" / "ckpt-unet-0000012", tmp_path / "api" / "ckpt-unet-0000012")
    shutil.copy(tmp / "out" / "loss.csv", tmp_path / "api" / "loss.csv")
    model = mini_sd.DiffusionModel("tiny")
    model.train(data, stage="unet", steps=30, batch_size=8, warmup=5, out=tmp_path / "api", resume=True, save_every=6,
                sample_every=30, keep=20)
    assert losses(tmp_path / "api") == losses(tmp / "out")
    # and an API checkpoint continued by the CLI
    shutil.copytree(tmp_path / "api" / "ckpt-unet-0000018", tmp_path / "cli" / "ckpt-unet-0000018")
    shutil.copy(tmp_path / "api" / "loss.csv", tmp_path / "cli" / "loss.csv")
    train(tmp, *RUN, "--out", str(tmp_path / "cli"), "--resume")
    assert losses(tmp_path / "cli") == losses(tmp / "out")


def test_nan_loss_stops_with_the_last_good_checkpoint(full_run, tmp_path):
    tmp, _ = full_run
    p = train(tmp, "--preset", "tiny", "--shapes-n", "48", "--vae-steps", "0", "--resume", str(tmp / "out" / "ckpt-vae-0000012"),
              "--unet-steps", "200", "--lr", "1e12", "--warmup", "1", "--batch-size", "8", "--save-every", "1",
              "--workers", "0", "--out", str(tmp_path / "nan"), check=False)
    assert p.returncode == 2 and "loss is" in p.stderr and "last good checkpoint is" in p.stderr, p.stderr[-2000:]
    last = p.stderr.split("last good checkpoint is ")[1].split(";")[0]
    model = mini_sd.DiffusionModel.load(last)  # loads, and its weights are finite
    assert all(mini_sd.torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


CHILD = """
import datetime, functools, hashlib, json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import mini_sd
from mini_sd import Config, DiffusionModel, CocoCaptions, make_shapes_dataset
dist.init_process_group = functools.partial(dist.init_process_group, timeout=datetime.timedelta(seconds=30))  # no long hang
rank = int(os.environ["RANK"])
torch.manual_seed(rank)  # each process starts from weights of its own: DDP must make them one
exec({head!r})  # the README's API example, as written, but for its last line
digest = lambda m: hashlib.sha256(b"".join(v.numpy().tobytes() for v in m.state_dict().values())).hexdigest()
result = dict(unet=digest(model.unet), ema=digest(model.ema_unet), index=model.latents[1].index.tolist())
exec({last!r})  # save() on rank 0, the other waiting; load() on both
torch.manual_seed(10 + rank)
alone = DiffusionModel("tiny")  # a UNet stage with no checkpoint to start from: DDP's broadcast alone makes one model
alone.vae.scaling_factor.fill_(1.0)
alone.train(data, stage="unet", steps=2, batch_size=8)
result.update(unet_alone=digest(alone.unet), ema_alone=digest(alone.ema_unet))


class NaNOnRank1(torch.utils.data.Dataset):  # rank 1's third batch holds a NaN image: its loss alone is NaN
    def __init__(self, data):
        self.data, self.calls = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.calls += 1
        image, captions = self.data[i]
        return (image * float("nan") if rank == 1 and self.calls > 20 else image), captions


fresh = DiffusionModel("tiny")
try:  # as a notebook would: the error is caught, the process lives on
    fresh.train(NaNOnRank1(data), stage="vae", steps=6, batch_size=8, save_every=1, out="nan-run")
except FloatingPointError as e:
    result["nan"] = str(e)
    result["unchanged"] = digest(fresh.vae) == digest(DiffusionModel.load(str(e).split("checkpoint is ")[1]).vae)
torch.manual_seed(20 + rank)
try:  # a cache shared by processes whose encoders differ: refused on every one, not a hang or a half cache
    mini_sd.latent_cache(DiffusionModel("tiny"), data, "other-run")
except ValueError as e:
    result["differ"] = str(e)
json.dump(result, open(f"result-{{rank}}.json", "w"))
dist.destroy_process_group()
"""


def test_the_readme_api_under_torchrun_trains_one_model_and_stops_together(tmp_path):
    """The README's API under torchrun with 2 processes (gloo): bit-identical weights and EMA, every image once in
    the sharded latent cache; a NaN on rank 1 alone stops both before the step, with one error and checkpoint."""
    from test_mini_sd import readme_example

    head, last = readme_example().strip().rsplit("\n", 1)
    (tmp_path / "child.py").write_text(CHILD.format(here=HERE, head=head, last=last))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "child.py"]
    p = subprocess.run(cmd, cwd=tmp_path, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"result-{r}.json")) for r in (0, 1))
    for k in ("unet", "ema", "unet_alone", "ema_alone"):  # one model, bit for bit
        assert r0[k] == r1[k], k
    assert r0["index"] == r1["index"] == list(range(16))  # the cache holds every image once
    (key,) = os.listdir(tmp_path / "runs" / "api" / "cache")
    assert sorted(os.listdir(tmp_path / "runs" / "api" / "cache" / key)) == [f"shard-{r}-of-2.safetensors" for r in (0, 1)]
    assert r0["nan"] == r1["nan"] and "loss is nan at step 2 on 1 of 2 processes" in r0["nan"], (r0, r1)
    assert r0["nan"].endswith(os.path.join("nan-run", "ckpt-vae-0000002")) and r0["unchanged"] and r1["unchanged"]
    assert p.stdout.count("saved runs/api/ckpt-unet-0000004") == 1  # rank 0 alone logs
    assert r0.get("differ") == r1.get("differ") == "the VAE encoder differs between processes: build the model from " \
        "one seed or checkpoint on each, as train() makes it, and give each the same files"
    assert not (tmp_path / "other-run" / "cache").exists()  # refused before anything is encoded or written
