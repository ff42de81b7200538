#!/usr/bin/env python
"""Speed benchmark: mini_sd against diffusers, with the same architecture and the same work on each side.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_speed.py                     # small and base presets (under ~10 min on 2 CPU cores)
    python benchmarks/bench_speed.py --quick             # smoke run, few rounds
    python benchmarks/bench_speed.py --presets small --out bench.md
    python benchmarks/bench_speed.py --compile           # adds a torch.compile'd training-step section (slow to compile)
    python benchmarks/bench_speed.py --profile           # adds a profiler table of one bf16 training step per side
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --presets small --sections sample --rounds 3 --warmup 1
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --presets small --sections --profile-sample   # profile alone
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --sections memory   # peak RSS, a fresh process per configuration
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --sections text   # the library section (a minute)

What is measured, per preset:
  * UNet training step: forward + MSE loss (fp32) + backward + AdamW step, in fp32 and under bf16 autocast, eager;
    optionally (--compile) the same step with torch.compile'd UNets.
  * Sampling, end to end and best against best (text to PIL images; batches 4 and 16 for small, 4 for base):
    mini_sd's DiffusionModel.sample(prompts, steps=25, sampler="dpm++", guidance_scale=5, seed=...) (MiniLM text
    encoding, 25 guided steps of its bf16 inference UNet copy, bf16 VAE decoder copy) against diffusers'
    StableDiffusionPipeline around the same-size UNet and VAE cast to bf16 as from_pretrained(torch_dtype=bf16)
    loads them, DPMSolverMultistepScheduler with the same timesteps, batched CFG, decode with the peer VAE, fed
    prompt_embeds from the same mini_sd.TextEncoder call inside the timing (details above bench_sample). The
    untrained DiffusionModel gets vae.scaling_factor 1 and small random weights in its zero-initialised output
    layers. Targets (the issue): >= 1.5x at batch 4, >= 1.3x at batch 16. --profile-sample adds profiler tables
    (top 10 ops by self CPU time) of one guided step per side at --profile-batch, and the run split into phases.
  * VAE encode and decode in fp32, no_grad.

Memory section (--sections memory, not in the default): peak RSS (VmHWM) of a small and a base UNet training step
(bf16 autocast, batch as above) and of end-to-end sampling at batch 16 (small), per side, each in a fresh process
(this script re-invoked with a hidden --memory-child flag) that first imports the same libraries on both sides.

Library section (mini_sd only, no diffusers side; --sections text, not in the default):
  * text: --text-batch distinct COCO-style captions ("a {adj} {noun} {verb} on a {place}") encoded one per forward
    ([enc.encode([c]) for c in caps], train() before the batched encoder) and in one batched forward (enc.encode(caps)),
    next to a small-preset UNet training step (bf16 autocast) at the same batch.

Fairness: both sides get identical input tensors (latents, timesteps, noise, text context and mask, images), do the
same work (same architecture: parameter counts are asserted equal within 5%; same loss; same optimiser, torch AdamW
with the same hyper-parameters; the same sampler with the same timesteps, checked numerically below), run in the same
dtypes (fp32, or fp32 weights under torch.autocast('cpu', bfloat16); sampling: each library's bf16 as its users get
it), with the same thread count, and each side in its own default memory layout (NCHW, contiguous; neither is
converted to channels_last). Outside the sampling section no text encoder is loaded: the context is a random
(B, S, 384) tensor, S = cfg.max_text_length, with a boolean mask whose first VALID_TOKENS are True; diffusers gets it
as `encoder_attention_mask`, mini_sd as `mask` cut to those tokens, as its TextEncoder hands them to the UNet (the
padding past a batch's longest caption is dropped; the outputs are the same, the cross-attention is cheaper).
diffusers' pipelines and train_text_to_image.py always pad to max_length.

Timing: the two sides alternate within one process, round by round (mini, diffusers, then diffusers, mini, ...), after
warm-up iterations, and the median of each is reported. The machine may be shared and noisy, so read the ratio
(diffusers time / mini_sd time; > 1 means mini_sd is faster), not a lone absolute time.

FLOP/s: each operation's FLOPs are counted once with torch.utils.flop_counter.FlopCounterMode on the same inputs (the
CPU flash-attention kernels are registered below: the stock counter misses them), divided by the median time, and
shown as a percentage of this machine's matmul peak in the same dtype, measured in the same run (a 2048^3 matmul,
fp32 tensors for fp32, bf16 tensors for bf16 autocast). The optimiser's element-wise work is not counted as FLOPs.
"""

import os
import sys

if "--compile" in sys.argv:  # inductor's compile-worker pool fights the benchmark for the cores; must precede import torch
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.utils.flop_counter as flop_counter  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py
from common import (BEST, CONTEXT_DIM, CPU, build_unets, build_vaes, check_params, cpu_line, diff_loop,  # noqa: E402
                    diffusers_scheduler, diffusers_unet, diffusers_vae)
import mini_sd  # noqa: E402  (common puts the repository root on sys.path)

VALID_TOKENS = 10  # the first tokens of each caption are real, the rest padding

# defaults per preset: training batch, warm-up iterations, timed rounds (--quick lowers the rounds)
PRESET_DEFAULTS = {
    "tiny": dict(train_batch=16, warmup=2, rounds=7, sample_rounds=5, sample_batches=(4, 16)),
    "small": dict(train_batch=16, warmup=2, rounds=7, sample_rounds=5, sample_batches=(4, 16)),
    # a base training step takes 5-20 s here, a base sampling run at batch 4 tens of seconds
    "base": dict(train_batch=4, warmup=1, rounds=2, sample_rounds=2, sample_batches=(4,)),
}


# -----------------------------------------------------------------------------
# FLOP counting: teach FlopCounterMode the CPU flash-attention kernels that F.scaled_dot_product_attention uses on CPU


def _register_cpu_sdpa_flops():
    ops = torch.ops.aten
    fwd, bwd = ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_flops()


def count_flops(fn):
    with flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -----------------------------------------------------------------------------
# Timing


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


BF16_UNITS = BEST.name == "bf16"
BEST_TRAIN = "bf16-autocast" if BF16_UNITS else "fp32"


def autocast(dtype):  # the library's bf16 autocast for "bf16-autocast", a disabled one (plain fp32) otherwise
    return mini_sd.Precision("bf16" if dtype == "bf16-autocast" else "fp32", "").autocast(CPU)


def measure_peak(warmup, rounds, bf16, n=2048):
    """Matmul peak of this machine: median FLOP/s of an n^3 matmul, fp32 tensors, and bf16 ones if asked."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    fns = {"fp32": lambda: a32 @ b32, "bf16": lambda: a16 @ b16} if bf16 else {"fp32": lambda: a32 @ b32}
    times = interleaved(fns, warmup, rounds)
    return {k: 2 * n**3 / statistics.median(v) for k, v in times.items()}


# -----------------------------------------------------------------------------
# Inputs and calls: the peer's models are common.py's, the same size as mini_sd's


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


# -----------------------------------------------------------------------------
# Samplers: DPM-Solver++(2M), trailing timesteps, final step to x0, on both sides


def mini_loop(cfg, eps_fn, noise, steps):
    schedule = mini_sd.NoiseSchedule(cfg)
    return schedule.sample(eps_fn, noise.clone(), schedule.timesteps(steps), "dpm++")


def check_samplers(cfg, steps):
    """Both sampler loops, driven by the same toy eps function in fp64, must land on the same latents."""
    if cfg.beta_schedule != "scaled_linear" or cfg.timestep_spacing != "trailing" or cfg.prediction_type == "flow":
        return  # flow: test_mini_sd.py checks its solvers against the exact ODE solution instead
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    toy = lambda x, t: 0.5 * torch.tanh(x) + 1e-4 * float(t)  # noqa: E731
    a = mini_loop(cfg, toy, noise, steps)
    b = diff_loop(diffusers_scheduler(cfg), toy, noise, steps)
    err = (a.double() - b.double()).abs().max().item()
    print(f"  sampler check: mini_sd vs diffusers DPM-Solver++(2M), {steps} steps, same eps function: max |diff| {err:.2e}")
    assert err < 1e-3 * max(1.0, b.abs().max().item()), "the two samplers do not do the same steps"


# -----------------------------------------------------------------------------
# Sections


class Results:
    def __init__(self, peak):
        self.peak, self.rows = peak, []

    def add(self, preset, what, dtype, batch, times, flops, items):
        """times {"mini": [...], "diffusers": [...]} seconds; flops {"mini": n, "diffusers": n}; items per call."""
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        peak = self.peak["bf16" if dtype.startswith("bf16") else "fp32"]
        row = dict(preset=preset, what=what, dtype=dtype, batch=batch, items=items, med=med, best=best, flops=flops, peak=peak)
        self.rows.append(row)
        spread = "  ".join(f"{k} {1e3 * min(v):.0f}..{1e3 * max(v):.0f} ms" for k, v in times.items())
        print(f"  {what:<34} {dtype:<22} mini_sd {1e3 * med['mini']:9.1f} ms  diffusers {1e3 * med['diffusers']:9.1f} ms"
              f"  ratio {med['diffusers'] / med['mini']:.2f}  [{spread}; n={len(times['mini'])}]", flush=True)

    def table(self):
        lines = [
            "| preset | measurement | dtype | batch | mini_sd ms | diffusers ms | speed ratio (diff/mini) | ratio of fastest rounds "
            "| mini_sd items/s | diffusers items/s | mini_sd GFLOP/s | mini_sd % peak | diffusers GFLOP/s | diffusers % peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            m, d = r["med"]["mini"], r["med"]["diffusers"]
            fm, fd = r["flops"]["mini"] / m, r["flops"]["diffusers"] / d
            lines.append(
                f"| {r['preset']} | {r['what']} | {r['dtype']} | {r['batch']} | {1e3 * m:.1f} | {1e3 * d:.1f} | **{d / m:.2f}** | {r['best']['diffusers'] / r['best']['mini']:.2f} "
                f"| {r['items'] / m:.2f} | {r['items'] / d:.2f} | {fm / 1e9:.0f} | {100 * fm / r['peak']:.1f}% "
                f"| {fd / 1e9:.0f} | {100 * fd / r['peak']:.1f}% |")
        return "\n".join(lines)

    def targets(self):
        """The issue's sampling targets (small preset, SAMPLE_TARGETS), met or not, as a line under the table."""
        small = [r for r in self.rows if r["preset"] == "small" and "compiled" not in r["what"]]
        rows = [(f"sampling batch {r['batch']}", r, SAMPLE_TARGETS[r["batch"]]) for r in small
                if r["what"].startswith("sample") and r["batch"] in SAMPLE_TARGETS]
        rows += [("fp32 training step", r, TRAIN_TARGET) for r in small
                 if TRAIN_TARGET and r["what"].startswith("UNet train") and r["dtype"] == "fp32"]
        if not rows:
            return ""
        ratio = lambda r: r["med"]["diffusers"] / r["med"]["mini"]  # noqa: E731
        return f"\n\nTargets at the small preset, each side in {BEST.name}: " + ", ".join(
            f"{what} {ratio(r):.2f}x (target >= {target}x: {'met' if ratio(r) >= target else 'not met'})"
            for what, r, target in rows) + "."


def bench_train(res, preset, cfg, unets, batch, warmup, rounds, dtypes, gen, compiled=None):
    """UNet training step: zero_grad, forward (autocast or not), MSE in fp32, backward, AdamW step."""
    x, t, noise, context, mask = make_inputs(cfg, batch, gen)
    calls = {"mini": call_mini, "diffusers": call_diff}
    # same optimiser on both sides: fused AdamW, as mini_sd.Trainer uses
    opts = {k: torch.optim.AdamW(u.parameters(), lr=1e-4, weight_decay=1e-2, fused=True) for k, u in unets.items()}
    for u in unets.values():
        u.train()
    models, flops = compiled or unets, None

    def make_step(name, dtype, optimise=True):
        model, call, opt = models[name], calls[name], opts[name]

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast(dtype):
                out = call(model, x, t, context, mask)
            F.mse_loss(out.float(), noise).backward()  # the loss in fp32 on both sides
            if optimise:
                opt.step()

        return step

    for dtype in dtypes:
        label = dtype + ("+compile" if compiled else "")
        if compiled:  # the first calls compile forward and backward: time that separately
            for name in models:
                t0 = time.perf_counter()
                make_step(name, dtype)()
                make_step(name, dtype)()
                print(f"  compile {name} training step ({dtype}): {time.perf_counter() - t0:.1f} s (first two calls)", flush=True)
        # FLOPs of forward + loss + backward (AdamW adds no matmul FLOPs), counted once per side on the eager model
        # (autocast only adds casts, which are not FLOPs, so one count serves every dtype)
        if flops is None:
            flops = {name: count_flops(make_step_eager(unets[name], calls[name], BEST_TRAIN, x, t, noise, context, mask))
                     for name in unets}
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        times = interleaved({name: make_step(name, dtype) for name in models}, warmup, rounds)
        res.add(preset, "UNet train step (fwd+bwd+AdamW)", label, batch, times, flops, batch)


def make_step_eager(model, call, dtype, x, t, noise, context, mask):
    def step():
        with autocast(dtype):
            out = call(model, x, t, context, mask)
        F.mse_loss(out.float(), noise).backward()

    return step


# -----------------------------------------------------------------------------
# End-to-end sampling: DiffusionModel.sample against diffusers' StableDiffusionPipeline in bf16, the same-size peer
#
# mini_sd: model.sample(prompts, steps=25, sampler="dpm++", guidance_scale=5, seed=...) exactly as a user calls it:
#   text encoding (negative + prompts, one forward), 25 guided steps of its bf16 inference copy of the UNet
#   (model.inference_copy("unet"), made once and reused), the VAE decode (its bf16 decoder copy, model.inference_copy("decoder")) and the
#   conversion to PIL images.
# diffusers: a real StableDiffusionPipeline (not a hand-written loop) around the peer UNet2DConditionModel and
#   AutoencoderKL, cast to bf16 as from_pretrained(..., torch_dtype=torch.bfloat16) loads it (UNet and VAE in bf16;
#   the latents follow the embeddings' dtype, bf16), DPMSolverMultistepScheduler (DPM-Solver++(2M), the same
#   timesteps, asserted), batched CFG, decode with the peer VAE, output_type="pil". The pipeline's text slots take
#   CLIP only, so it gets no tokenizer or text encoder: each timed call first encodes the prompts with the same
#   mini_sd.TextEncoder forward that sample() makes, padded to max_length as SD pipelines always pad
#   (text_encoder.encode(negative + prompts)), and hands the halves to the pipeline as prompt_embeds /
#   negative_prompt_embeds. So the text encoding is the same work on both sides and inside both timings; mini_sd's
#   UNet then sees only the tokens up to the longest prompt. Differences that are the libraries' own: the pipeline passes no attention mask to its UNet (SD
#   pipelines never do), mini_sd masks the padding tokens; both decode in bf16.


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
    model = mini_sd.DiffusionModel(cfg).to(CPU)  # it moves itself to a GPU where there is one; the pipeline stays on the CPU
    model.vae.scaling_factor.fill_(1.0)
    wake_outputs(model.unet, torch.Generator().manual_seed(seed))
    return model


def diffusers_pipeline(cfg, dtype=BEST.dtype):
    """StableDiffusionPipeline around the same-size peer UNet and VAE (scaling_factor 1, as mini_sd's here), every
    component cast to dtype as from_pretrained(torch_dtype=dtype) would load it; no tokenizer / text encoder (see
    above), no safety checker, progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=diffusers_vae(cfg, scaling_factor=1.0), text_encoder=None, tokenizer=None,
                                   unet=diffusers_unet(cfg), scheduler=diffusers_scheduler(cfg, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # .to(dtype) warns that from_pretrained(torch_dtype=...) would keep _keep_in_fp32_modules in fp32: that list is
    # empty for UNet2DConditionModel and AutoencoderKL, so the cast is exactly what from_pretrained would load
    from diffusers.utils import logging as diffusers_logging

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
        return model.sample(prompts, steps=steps, sampler="dpm++", guidance_scale=guidance, seed=seed, guidance_interval=(0, 1))

    def diffusers():
        context, _ = text_encoder.encode(negative + prompts)  # [uncond; cond] in one forward, padded to max_length
        return pipe(prompt_embeds=context[B:], negative_prompt_embeds=context[:B], num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="pil").images

    return {k: fn for k, fn in (("mini", mini), ("diffusers", diffusers)) if (model if k == "mini" else pipe) is not None}


def sample_label(steps, guidance):
    return f"sample {steps} steps DPM++(2M), CFG {guidance:g}, end to end"


SAMPLE_DTYPE = BEST.name
# the issues' targets at the small preset: batch -> speed ratio; on a CPU without bf16 units, against the fp32 peer
SAMPLE_TARGETS = {4: 1.5, 16: 1.3} if BF16_UNITS else {4: 1.3, 16: 1.3}
TRAIN_TARGET = None if BF16_UNITS else 1.2  # the fp32 training step, without bf16 units


def bench_sample(res, preset, cfg, batches, steps, guidance, warmup, rounds, seed):
    """End to end, text to PIL images, per batch: DiffusionModel.sample against the bf16 StableDiffusionPipeline."""
    model, pipe = mini_sampler(cfg, seed), diffusers_pipeline(cfg)
    check_params("UNet", model.unet, pipe.unet)
    check_params("VAE decoder", model.vae.decoder, pipe.vae.decoder)
    pipe.scheduler.set_timesteps(steps)
    assert [int(t) for t in pipe.scheduler.timesteps] == list(model.scheduler.timesteps(steps)), "timesteps differ"
    print(f"  sampling: mini_sd UNet {model.inference_copy('unet', BEST).conv_in.weight.dtype} (inference copy), VAE "
          f"{model.inference_copy('decoder', BEST).conv_in.weight.dtype} (inference copy); diffusers StableDiffusionPipeline UNet {pipe.unet.dtype}, VAE "
          f"{pipe.vae.dtype}; text: {cfg.text_encoder} on both sides; warm-up {warmup}, rounds {rounds}", flush=True)
    for batch in batches:
        prompts = coco_captions(batch, seed)
        fns = sample_fns(model, pipe, model.text_encoder, prompts, steps, guidance, seed)
        for name, fn in fns.items():  # one untimed call each: checks the output, and makes mini_sd's bf16 copy
            images = fn()
            assert len(images) == batch and images[0].size == (cfg.image_size, cfg.image_size), f"{name}: wrong output"
        flops = {name: count_flops(fn) for name, fn in fns.items()}  # text encoder + steps x UNet + VAE decode
        times = interleaved(fns, warmup, rounds)
        res.add(preset, sample_label(steps, guidance), SAMPLE_DTYPE, batch, times, flops, batch)
    del model, pipe


def profile_sample(cfg, batch, steps, guidance, seed, rounds, rows=10, tries=10):
    """One guided sampling step at `batch` prompts per side (UNet forward on 2B + guidance, then mini_sd's x0 / eps
    split, the sampler's only tensor work besides a few element-wise ops; diffusers' scheduler.step), top `rows` ops
    by self CPU time; then the end-to-end run split into its phases, medians of `rounds`."""
    from torch.profiler import ProfilerActivity, profile

    model, pipe = mini_sampler(cfg, seed), diffusers_pipeline(cfg)
    prompts, negative = coco_captions(batch, seed), [""] * batch
    unet, sched = model.inference_copy("unet", BEST), pipe.scheduler
    context, mask = model.text_encoder(negative + prompts)
    x = torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=torch.Generator().manual_seed(seed))
    t = model.scheduler.timesteps(steps)[1]  # a second step: the one where DPM++(2M) uses its history in diffusers

    @torch.no_grad()
    def mini_step():  # DiffusionModel.sample's model_fn, then the sampler's x0 / eps split
        xin = torch.cat([x, x])
        out = unet(xin, torch.full((xin.shape[0],), t), context, mask).float()
        uncond, cond = out.chunk(2)
        return model.scheduler.split(uncond + guidance * (cond - uncond), x, t)

    latents, embeds = x.to(pipe.unet.dtype), model.text_encoder.encode(negative + prompts)[0].to(pipe.unet.dtype)

    @torch.no_grad()
    def diff_step():  # the body of StableDiffusionPipeline.__call__'s denoising loop
        xin = sched.scale_model_input(torch.cat([latents] * 2), sched.timesteps[1])
        out = pipe.unet(xin, sched.timesteps[1], encoder_hidden_states=embeds, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        return sched.step(uncond + guidance * (cond - uncond), sched.timesteps[1], latents, return_dict=False)[0]

    def diff_step_fresh():  # the scheduler keeps a step index and history: start every step from the same state
        sched.set_timesteps(steps)
        return diff_step()

    for name, step in (("mini_sd (DiffusionModel.sample's bf16 UNet copy)", mini_step),
                       ("diffusers (StableDiffusionPipeline, bf16)", diff_step_fresh)):
        for _ in range(3):
            step()  # warm-up
        # a shared machine preempts some steps: profile one step `tries` times and keep the least disturbed profile
        best = None
        for _ in range(tries):
            sched.set_timesteps(steps)  # outside the profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                diff_step() if step is diff_step_fresh else step()
            table = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in table)
            best = min(best, (total, table), key=lambda b: b[0]) if best else (total, table)
        print(f"\n  profile: {name}, one guided sampling step, batch {batch} (UNet on {2 * batch}), top {rows} by self "
              f"CPU time (the fastest of {tries} profiled steps)")
        print(best[1].table(sort_by="self_cpu_time_total", row_limit=rows))

    # the phases of one end-to-end call, timed apart, interleaved
    lat32 = x.clone()
    phases = {
        "text encoding": {"mini": lambda: model.text_encoder(negative + prompts),
                                      "diffusers": lambda: model.text_encoder.encode(negative + prompts)},
        "one guided step": {"mini": mini_step, "diffusers": diff_step_fresh},
        "VAE decode + to PIL": {
            "mini": lambda: mini_sd.to_pil(model.decode(lat32)),
            "diffusers": lambda: pipe.image_processor.postprocess(
                pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0], output_type="pil")},
    }
    phases["end to end"] = sample_fns(model, pipe, model.text_encoder, prompts, steps, guidance, seed)
    with torch.no_grad():
        med = {what: {k: statistics.median(v) for k, v in interleaved(fns, 1, rounds).items()} for what, fns in phases.items()}
    est = {k: med["text encoding"][k] + steps * med["one guided step"][k] + med["VAE decode + to PIL"][k]
           for k in ("mini", "diffusers")}
    print(f"\n  end-to-end phases at batch {batch}, {steps} steps, medians of {rounds} interleaved rounds:")
    print(f"    {'phase':<36} {'mini_sd ms':>11} {'diffusers ms':>13} {'diff/mini':>9}")
    for what, m in list(med.items()) + [(f"text + {steps} x step + decode", est)]:
        print(f"    {what:<36} {1e3 * m['mini']:11.1f} {1e3 * m['diffusers']:13.1f} {m['diffusers'] / m['mini']:9.2f}")


# -----------------------------------------------------------------------------
# Peak memory: each configuration in a fresh process (peak RSS is a process-wide high-water mark)

MEMORY_PREFIX = "MEMORY-RESULT "


def proc_status_mb(field):  # VmRSS (now) or VmHWM (peak) from /proc/self/status, in MiB; None off Linux
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb():
    hwm = proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def memory_child(spec):
    """Run one configuration in this (fresh) process and print its memory as one JSON line.
    spec: side (mini | diffusers), what (train | sample), preset, batch, dtype (train), steps and guidance (sample)."""
    import json

    # both sides import the same libraries first, so that the baseline is the same: what differs is the work
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    import transformers

    del AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel, transformers  # loaded

    imports = proc_status_mb("VmRSS") or peak_rss_mb()
    cfg, side, seed = mini_sd.Config.preset(spec["preset"]), spec["side"], spec["seed"]
    if spec["what"] == "train":  # bench_train's step: forward (autocast or fp32), fp32 MSE, backward, fused AdamW
        torch.manual_seed(seed)
        unet = mini_sd.UNet(cfg, context_dim=CONTEXT_DIM) if side == "mini" else diffusers_unet(cfg)
        call = call_mini if side == "mini" else call_diff
        x, t, noise, context, mask = make_inputs(cfg, spec["batch"], torch.Generator().manual_seed(seed))
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2, fused=True)
        unet.train()

        def work():
            opt.zero_grad(set_to_none=True)
            with autocast(spec["dtype"]):
                out = call(unet, x, t, context, mask)
            F.mse_loss(out.float(), noise).backward()
            opt.step()

        calls = 3  # the first allocates gradients and AdamW's state
    else:
        if side == "mini":
            model, pipe = mini_sampler(cfg, seed), None
            text_encoder = model.text_encoder
        else:
            model, pipe = None, diffusers_pipeline(cfg)
            text_encoder = mini_sd.TextEncoder(cfg.text_encoder, cfg.max_text_length)
        (work,) = sample_fns(model, pipe, text_encoder, coco_captions(spec["batch"], seed), spec["steps"],
                             spec["guidance"], seed).values()
        calls = 2  # the first makes mini_sd's bf16 UNet copy
    built = proc_status_mb("VmRSS") or peak_rss_mb()
    t0 = time.perf_counter()
    for _ in range(calls):
        work()
    print(MEMORY_PREFIX + json.dumps(dict(spec, imports=imports, built=built, peak=peak_rss_mb(), calls=calls,
                                          seconds=time.perf_counter() - t0)), flush=True)


def bench_memory(args):
    """Peak RSS per configuration and side, each in a fresh subprocess of this script. -> markdown table."""
    import json
    import subprocess

    configs = [dict(what="train", preset=preset, dtype=dtype, batch=args.train_batch or PRESET_DEFAULTS[preset]["train_batch"])
               for preset in args.memory_presets for dtype in args.memory_dtypes]
    configs.append(dict(what="sample", preset="small", batch=args.memory_sample_batch, steps=args.steps or 25,
                        guidance=args.guidance))
    rows = []
    for config in configs:
        row = {}
        for side in ("mini", "diffusers"):
            spec = dict(config, side=side, seed=args.seed)
            cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--memory-child", json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEMORY_PREFIX)]
            if proc.returncode or not lines:
                raise RuntimeError(f"memory child {spec} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            row[side] = json.loads(lines[-1][len(MEMORY_PREFIX):])
        if config["what"] == "train":
            label = f"{config['preset']} UNet train step (fwd+bwd+AdamW), {config['dtype']}"
        else:
            label = f"{config['preset']} {sample_label(config['steps'], config['guidance'])}, {SAMPLE_DTYPE}"
        rows.append((label, config["batch"], row))
        m, d = row["mini"], row["diffusers"]
        print(f"  {label:<70} batch {config['batch']:>3}: peak RSS mini_sd {m['peak']:7.0f} MiB  diffusers {d['peak']:7.0f} MiB"
              f"  (imports {m['imports']:.0f} / {d['imports']:.0f}; {m['calls']} calls, {m['seconds']:.1f} / {d['seconds']:.1f} s)",
              flush=True)
    lines = [
        "Peak resident memory (VmHWM), each configuration and side in a fresh process that first imports the same "
        "libraries (torch, mini_sd, diffusers, transformers); 'above imports' = peak - RSS after those imports. "
        "Training: 3 steps (the first allocates gradients and AdamW state); sampling: 2 end-to-end calls (models as "
        "in the sample section: mini_sd's fp32 UNet and VAE + their bf16 copies + MiniLM; the bf16 pipeline + MiniLM).",
        "",
        "| configuration | batch | mini_sd peak MiB | diffusers peak MiB | diffusers / mini_sd | mini_sd above imports MiB "
        "| diffusers above imports MiB | RSS after imports MiB (mini_sd / diffusers) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, batch, row in rows:
        m, d = row["mini"], row["diffusers"]
        lines.append(f"| {label} | {batch} | {m['peak']:.0f} | {d['peak']:.0f} | {d['peak'] / m['peak']:.2f} | "
                     f"{m['peak'] - m['imports']:.0f} | {d['peak'] - d['imports']:.0f} | {m['imports']:.0f} / {d['imports']:.0f} |")
    return "\n".join(lines)


def bench_vae(res, preset, cfg, vaes, batch, warmup, rounds, gen):
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    h = cfg.latent_size
    latents = torch.randn(batch, cfg.latent_channels, h, h, generator=gen)
    mini, diff = vaes["mini"].eval(), vaes["diffusers"].eval()
    ops = {
        "VAE encode": {"mini": lambda: mini.encode(images), "diffusers": lambda: diff.encode(images).latent_dist},
        "VAE decode": {"mini": lambda: mini.decode(latents), "diffusers": lambda: diff.decode(latents, return_dict=False)[0]},
    }
    with torch.no_grad():
        for what, fns in ops.items():
            flops = {k: count_flops(fn) for k, fn in fns.items()}
            times = interleaved(fns, warmup, rounds)
            res.add(preset, f"{what} {cfg.image_size}px", "fp32", batch, times, flops, batch)


# -----------------------------------------------------------------------------
# Library section: text encoding per step

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


def bench_text(args, warmup, rounds):
    """Text encoding of one training step's captions: one forward per caption (train() before today) against one
    batched forward (TextEncoder.encode), next to the small preset's UNet training step at the same batch. -> table."""
    cfg = mini_sd.Config.preset("small")
    n = args.text_batch
    caps = coco_captions(n, args.seed)
    enc = mini_sd.TextEncoder(cfg.text_encoder, cfg.max_text_length)
    unet = mini_sd.UNet(cfg, context_dim=enc.hidden_size)
    gen = torch.Generator().manual_seed(args.seed)
    x, t, noise, context, mask = make_inputs(cfg, n, gen)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2, fused=True)
    unet.train()

    def unet_step():  # as bench_train's: forward under bf16 autocast, fp32 MSE, backward, fused AdamW
        opt.zero_grad(set_to_none=True)
        with autocast(BEST_TRAIN):
            out = unet(x, t, context, mask)
        F.mse_loss(out.float(), noise).backward()
        opt.step()

    print(f"  {n} distinct captions, e.g. {caps[0]!r}; text encoder {cfg.text_encoder} "
          f"({mini_sd.count_parameters(enc.model) / 1e6:.1f}M), max_text_length {cfg.max_text_length}; UNet step: small "
          f"preset, bf16 autocast, batch {n}; warm-up {warmup}, rounds {rounds}", flush=True)
    fns = {"one forward per caption": lambda: [enc.encode([c]) for c in caps],
           "one batched forward": lambda: enc.encode(caps),
           "UNet train step (fwd+bwd+AdamW)": unet_step}
    times = interleaved(fns, warmup, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = med["UNet train step (fwd+bwd+AdamW)"]
    for k, v in med.items():
        print(f"    {k:<34} {1e3 * v:8.1f} ms  [{1e3 * min(times[k]):.0f}..{1e3 * max(times[k]):.0f} ms]"
              + ("" if k.startswith("UNet") else f"  = {100 * v / step:.0f}% of a UNet training step"), flush=True)
    per, batched = med["one forward per caption"], med["one batched forward"]
    lines = [f"Text encoding of {n} distinct COCO-style captions (\"a {{adj}} {{noun}} {{verb}} on a {{place}}\") with "
             f"{cfg.text_encoder}, max_text_length {cfg.max_text_length}, next to the small preset's UNet training step "
             f"at batch {n} (bf16 autocast); medians of {rounds} interleaved rounds.",
             "",
             "| what | ms | % of the UNet step |",
             "|---|---:|---:|",
             f"| one forward per caption (`[enc.encode([c]) for c in caps]`, before) | {1e3 * per:.1f} | {100 * per / step:.0f}% |",
             f"| one batched forward (`enc.encode(caps)`, now) | {1e3 * batched:.1f} | {100 * batched / step:.0f}% |",
             f"| UNet training step (fwd+bwd+AdamW) | {1e3 * step:.1f} | 100% |",
             "",
             f"Batched is {per / batched:.1f}x faster. In DiffusionModel.train a Dataset's captions are encoded once "
             f"(text_encoder.remember) and cost nothing per step; other data pays the batched cost every step."]
    return "\n".join(lines)


def profile_train_step(cfg, unets, batch, gen, rows=12):
    from torch.profiler import ProfilerActivity, profile

    x, t, noise, context, mask = make_inputs(cfg, batch, gen)
    for (name, unet), call in zip(unets.items(), (call_mini, call_diff)):
        unet.train()
        step = make_step_eager(unet, call, BEST_TRAIN, x, t, noise, context, mask)
        step()  # warm-up
        unet.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        unet.zero_grad(set_to_none=True)
        print(f"\n  profile: {name}, one {BEST_TRAIN} training step (fwd+bwd, no optimiser), batch {batch}, "
              f"top {rows} by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, choices=sorted(mini_sd.PRESETS),
                   help="default: small base (small only with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small preset only unless --presets is given, one warm-up, two rounds (one for "
                        "sampling), base sampling in 10 steps")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sections", nargs="*", default=["train", "sample", "vae"],
                   choices=["train", "sample", "vae", "memory", "text"],
                   help="train, sample, vae: per preset, against diffusers (sample: end to end, DiffusionModel.sample "
                        "against a bf16 StableDiffusionPipeline); memory: peak RSS per configuration and side, each in a "
                        "fresh process (--memory-presets); text: caption encoding per step, one forward per caption vs one "
                        "batched forward (memory and text ignore --presets); none: `--sections --profile-sample` "
                        "runs the profile alone")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: small 16, base 4)")
    p.add_argument("--train-dtypes", nargs="+", default=sorted({"fp32", BEST_TRAIN}), choices=["fp32", "bf16-autocast"],
                   help="default: fp32, and bf16 autocast where this CPU has bf16 units")
    p.add_argument("--sample-batches", type=int, nargs="+", default=None,
                   help="prompts per sampling run (the UNet sees twice that); default: small 4 16, base 4")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25; 10 for base with --quick)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per side (default per preset; 1 for text)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per measurement (default per preset; text 5; --quick 1 and 2)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd UNet training steps")
    p.add_argument("--compile-dtypes", nargs="+", default=[BEST_TRAIN], choices=["fp32", "bf16-autocast"])
    p.add_argument("--profile", action="store_true", help="print a profiler table of one bf16 training step per side")
    p.add_argument("--profile-sample", action="store_true",
                   help="print a profiler table (top 10 ops by self CPU time) of one guided sampling step per side, "
                        "and the end-to-end sampling run split into text encoding, steps and decode")
    p.add_argument("--profile-batch", type=int, default=4, help="--profile-sample: prompts (the UNet sees twice that)")
    p.add_argument("--memory-presets", nargs="+", default=["small", "base"], choices=sorted(mini_sd.PRESETS),
                   help="memory section: presets whose UNet training step is measured (sampling: small)")
    p.add_argument("--memory-dtypes", nargs="+", default=[BEST_TRAIN], choices=["fp32", "bf16-autocast"],
                   help="memory section: training-step dtypes")
    p.add_argument("--memory-sample-batch", type=int, default=16, help="memory section: prompts per sampling run")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: one memory configuration, JSON
    p.add_argument("--text-batch", type=int, default=64, help="text section: distinct captions per step (and the UNet step's batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    args.presets = args.presets or (["small"] if args.quick else ["small", "base"])

    torch.set_num_threads(args.threads)
    if args.memory_child:  # a fresh process of bench_memory's: measure one configuration, print it, nothing else
        import json

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        memory_child(json.loads(args.memory_child))
        return
    import diffusers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the text encoder's "Loading weights" bar, once per model

    print(f"mini_sd vs diffusers {diffusers.__version__} | torch {torch.__version__} | {platform.processor() or platform.machine()}"
          f" | {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
          + (f" | TORCHINDUCTOR_COMPILE_THREADS={os.environ['TORCHINDUCTOR_COMPILE_THREADS']}" if args.compile else "")
          + f"\n{cpu_line()}")
    bf16 = BF16_UNITS or "bf16-autocast" in args.train_dtypes + args.compile_dtypes * args.compile
    peak = measure_peak(warmup=1, rounds=3 if args.quick else 5, bf16=bf16)  # bf16 only where asked or fast
    print("matmul peak (2048^3, median): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()) + "\n", flush=True)
    res = Results(peak)
    t_start = time.perf_counter()

    extra = []  # markdown tables of the library sections
    if "text" in args.sections:
        print("== text encoding per step: one forward per caption vs one batched forward", flush=True)
        extra.append(bench_text(args, args.warmup if args.warmup is not None else 1,
                                args.rounds if args.rounds is not None else 2 if args.quick else 5))
        print(flush=True)
    if "memory" in args.sections:
        print("== peak memory (RSS), each configuration and side in a fresh process", flush=True)
        extra.append(bench_memory(args))
        print(flush=True)
    per_preset = set(args.sections) & {"train", "sample", "vae"} or args.compile or args.profile or args.profile_sample
    for preset in args.presets if per_preset else []:
        cfg = mini_sd.Config.preset(preset)
        d = PRESET_DEFAULTS.get(preset, PRESET_DEFAULTS["small"])
        warmup = args.warmup if args.warmup is not None else 1 if args.quick else d["warmup"]
        rounds = args.rounds if args.rounds is not None else 2 if args.quick else d["rounds"]
        sample_rounds = args.rounds if args.rounds is not None else 1 if args.quick else d["sample_rounds"]
        steps = args.steps or (10 if args.quick and preset == "base" else 25)
        train_batch = args.train_batch or d["train_batch"]
        sample_batches = args.sample_batches or d["sample_batches"]
        print(f"== {preset}: UNet {cfg.block_out_channels} x{cfg.layers_per_block} attn {cfg.attention_levels} heads "
              f"{cfg.num_heads}, latents {cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size}, text {cfg.max_text_length}x"
              f"{CONTEXT_DIM}; VAE {cfg.vae_channels} at {cfg.image_size}px; warm-up {warmup}, rounds {rounds}", flush=True)
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        unets = dict(zip(("mini", "diffusers"), build_unets(cfg)))
        check_params("UNet", unets["mini"], unets["diffusers"])
        unets = unets if set(args.sections) & {"train"} or args.compile or args.profile else None
        if "vae" in args.sections:
            vaes = dict(zip(("mini", "diffusers"), build_vaes(cfg)))
            check_params("VAE", vaes["mini"], vaes["diffusers"])
            check_params("VAE encoder", vaes["mini"].encoder, vaes["diffusers"].encoder)
            check_params("VAE decoder", vaes["mini"].decoder, vaes["diffusers"].decoder)
        if "train" in args.sections:
            bench_train(res, preset, cfg, unets, train_batch, warmup, rounds, args.train_dtypes, gen)
        if "sample" in args.sections:
            check_samplers(cfg, steps)
            bench_sample(res, preset, cfg, sample_batches, steps, args.guidance, warmup, sample_rounds, args.seed)
        if "vae" in args.sections:
            bench_vae(res, preset, cfg, vaes, args.vae_batch, warmup, rounds, gen)
            del vaes
        if args.compile:
            torch._dynamo.reset()
            compiled = {k: torch.compile(u) for k, u in unets.items()}
            bench_train(res, preset, cfg, unets, train_batch, warmup, rounds, args.compile_dtypes, gen, compiled=compiled)
            del compiled
            torch._dynamo.reset()
        if args.profile:
            profile_train_step(cfg, unets, train_batch, gen)
        if args.profile_sample:
            profile_sample(cfg, args.profile_batch, steps, args.guidance, args.seed, max(sample_rounds, 3))
        del unets
        print(flush=True)

    header = (f"mini_sd vs diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{cpu_line()}. Matmul peak " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()) + " (2048^3, this run). "
              "Medians of interleaved rounds; speed ratio = diffusers time / mini_sd time (> 1: mini_sd faster); "
              "items = training samples or images.")
    table = f"{header}\n\n{res.table()}{res.targets()}" if res.rows else ""
    table = "\n\n".join([table] * bool(table) + extra)
    print(f"{table}\n\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"{table}\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
