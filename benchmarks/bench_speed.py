#!/usr/bin/env python
"""Speed benchmark: mini_sd against diffusers, with the same architecture and the same work on each side.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_speed.py                     # small and base presets (under ~10 min on 2 CPU cores)
    python benchmarks/bench_speed.py --quick             # smoke run, few rounds
    python benchmarks/bench_speed.py --presets small --out bench.md
    python benchmarks/bench_speed.py --compile           # adds torch.compile'd training steps (slow to compile)
    python benchmarks/bench_speed.py --profile           # adds a profiler table of one training step per side
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --presets small --sections sample --rounds 3 --warmup 1
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --presets small --sections --profile-sample   # profile alone
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --sections memory   # peak RSS, a fresh process per configuration
    HF_HUB_OFFLINE=1 python benchmarks/bench_speed.py --sections text   # the library section (a minute)

Each side runs in its best precision on this CPU (common.BEST, mini_sd.choose_precision): bf16 where the CPU has bf16
units (AMX, AVX512-BF16), fp32 otherwise, where emulated bf16 is 50-80x slower. What is measured, per preset:
  * UNet training step: forward + MSE loss (fp32) + backward + AdamW step, in fp32 and, with bf16 units, under bf16
    autocast, eager; optionally (--compile) the same step with torch.compile'd UNets.
  * Sampling, end to end and best against best (text to PIL images; batches 4 and 16 for small, 4 for base):
    mini_sd's DiffusionModel.sample(prompts, steps=25, sampler="dpm++", guidance_scale=5, seed=...) (MiniLM text
    encoding, 25 guided steps of its UNet's inference copy, its VAE decoder's copy) against diffusers'
    StableDiffusionPipeline around the same-size UNet and VAE cast to the same dtype as from_pretrained(torch_dtype=)
    loads them, DPMSolverMultistepScheduler with the same timesteps, batched CFG, decode with the peer VAE, fed
    prompt_embeds from the same mini_sd.TextEncoder call inside the timing (details in common.py, above
    wake_outputs). The untrained DiffusionModel gets vae.scaling_factor 1 and small random weights in its
    zero-initialised output layers. Targets (the issue): >= 1.5x at batch 4, >= 1.3x at batch 16 (SAMPLE_TARGETS).
  * VAE encode and decode in fp32, no_grad.
The optional sections, bench_extras.py: --sections memory (peak RSS, each configuration and side in a fresh
process), --sections text (caption encoding per step, mini_sd only), --profile and --profile-sample (profiler tables
of one training step and of one guided sampling step per side, and the sampling run split into phases).

Fairness: both sides get identical input tensors (latents, timesteps, noise, text context and mask, images), do the
same work (same architecture: parameter counts are asserted equal within 5%; same loss; same optimiser, torch AdamW
with the same hyper-parameters; the same sampler with the same timesteps, checked numerically below), run in the same
dtypes (fp32, or fp32 weights under torch.autocast('cpu', bfloat16); sampling: each library's best dtype as its users
get it), with the same thread count, and each side in its own default memory layout (NCHW, contiguous; neither is
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

if "--compile" in sys.argv:  # inductor's compile-worker pool fights the benchmark for the cores; before import torch
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.utils.flop_counter as flop_counter  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, bench_extras.py
from common import (BEST, BEST_TRAIN, BF16_UNITS, CONTEXT_DIM, adamw, build_unets, build_vaes,  # noqa: E402
                    call_diff, call_mini, check_params, coco_captions, cpu_line, diff_loop, diffusers_pipeline,
                    diffusers_scheduler, interleaved, make_inputs, mini_sampler, sample_fns, sample_label, train_step)
import bench_extras  # noqa: E402
import mini_sd  # noqa: E402  (common puts the repository root on sys.path)

# defaults per preset: training batch, warm-up iterations, timed rounds (--quick lowers the rounds)
PRESET_DEFAULTS = {
    "tiny": dict(train_batch=16, warmup=2, rounds=7, sample_rounds=5, sample_batches=(4, 16)),
    "small": dict(train_batch=16, warmup=2, rounds=7, sample_rounds=5, sample_batches=(4, 16)),
    # a base training step takes 5-20 s here, a base sampling run at batch 4 tens of seconds
    "base": dict(train_batch=4, warmup=1, rounds=2, sample_rounds=2, sample_batches=(4,)),
}
# the issues' targets at the small preset: batch -> speed ratio; on a CPU without bf16 units, against the fp32 peer
SAMPLE_TARGETS = {4: 1.5, 16: 1.3} if BF16_UNITS else {4: 1.3, 16: 1.3}
TRAIN_TARGET = None if BF16_UNITS else 1.2  # the fp32 training step, without bf16 units


# -----------------------------------------------------------------------------
# FLOP counting: teach FlopCounterMode the CPU flash-attention kernels that F.scaled_dot_product_attention uses on CPU;
# and this machine's matmul peak, against which the FLOP/s are read


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


def measure_peak(warmup, rounds, bf16, n=2048):
    """Matmul peak of this machine: median FLOP/s of an n^3 matmul, fp32 tensors, and bf16 ones if asked."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    fns = {"fp32": lambda: a32 @ b32, "bf16": lambda: a16 @ b16} if bf16 else {"fp32": lambda: a32 @ b32}
    times = interleaved(fns, warmup, rounds)
    return {k: 2 * n**3 / statistics.median(v) for k, v in times.items()}


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
    print(f"  sampler check: mini_sd vs diffusers DPM-Solver++(2M), {steps} steps, same eps function: "
          f"max |diff| {err:.2e}")
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
        self.rows.append(dict(preset=preset, what=what, dtype=dtype, batch=batch, items=items, med=med, best=best,
                              flops=flops, peak=peak))
        spread = "  ".join(f"{k} {1e3 * min(v):.0f}..{1e3 * max(v):.0f} ms" for k, v in times.items())
        print(f"  {what:<34} {dtype:<22} mini_sd {1e3 * med['mini']:9.1f} ms  "
              f"diffusers {1e3 * med['diffusers']:9.1f} ms  ratio {med['diffusers'] / med['mini']:.2f}  "
              f"[{spread}; n={len(times['mini'])}]", flush=True)

    def table(self):
        lines = [
            "| preset | measurement | dtype | batch | mini_sd ms | diffusers ms | speed ratio (diff/mini) "
            "| ratio of fastest rounds | mini_sd items/s | diffusers items/s | mini_sd GFLOP/s | mini_sd % peak "
            "| diffusers GFLOP/s | diffusers % peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            m, d = r["med"]["mini"], r["med"]["diffusers"]
            fm, fd = r["flops"]["mini"] / m, r["flops"]["diffusers"] / d
            lines.append(
                f"| {r['preset']} | {r['what']} | {r['dtype']} | {r['batch']} | {1e3 * m:.1f} | {1e3 * d:.1f} "
                f"| **{d / m:.2f}** | {r['best']['diffusers'] / r['best']['mini']:.2f} "
                f"| {r['items'] / m:.2f} | {r['items'] / d:.2f} | {fm / 1e9:.0f} | {100 * fm / r['peak']:.1f}% "
                f"| {fd / 1e9:.0f} | {100 * fd / r['peak']:.1f}% |")
        return "\n".join(lines)

    def targets(self):
        """The issue's sampling targets (small preset, SAMPLE_TARGETS), met or not, as a line under the table."""
        small = [r for r in self.rows if r["preset"] == "small"]  # compiled rows: dtype "...+compile", not fp32
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
    inputs = make_inputs(cfg, batch, gen)
    calls = {"mini": call_mini, "diffusers": call_diff}
    opts = {k: adamw(u) for k, u in unets.items()}
    for u in unets.values():
        u.train()
    models = compiled or unets
    # FLOPs of forward + loss + backward (AdamW adds no matmul FLOPs), counted once per side on the eager model
    # (autocast only adds casts, which are not FLOPs, so one count serves every dtype)
    flops = {name: count_flops(train_step(unets[name], calls[name], BEST_TRAIN, inputs)) for name in unets}
    for dtype in dtypes:
        steps = {name: train_step(models[name], calls[name], dtype, inputs, opts[name]) for name in models}
        if compiled:  # the first calls compile forward and backward: time that separately
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                step()
                print(f"  compile {name} training step ({dtype}): {time.perf_counter() - t0:.1f} s (first two calls)",
                      flush=True)
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        times = interleaved(steps, warmup, rounds)
        res.add(preset, "UNet train step (fwd+bwd+AdamW)", dtype + ("+compile" if compiled else ""), batch, times,
                flops, batch)


def bench_sample(res, preset, cfg, batches, steps, guidance, warmup, rounds, seed):
    """End to end, text to PIL images, per batch: DiffusionModel.sample against the StableDiffusionPipeline, each in
    this CPU's best precision (common.py, above wake_outputs, says what each side does)."""
    model, pipe = mini_sampler(cfg, seed), diffusers_pipeline(cfg)
    check_params("UNet", model.unet, pipe.unet)
    check_params("VAE decoder", model.vae.decoder, pipe.vae.decoder)
    pipe.scheduler.set_timesteps(steps)
    assert [int(t) for t in pipe.scheduler.timesteps] == list(model.scheduler.timesteps(steps)), "timesteps differ"
    print(f"  sampling: mini_sd UNet {model.inference_copy('unet', BEST).conv_in.weight.dtype} (inference copy), VAE "
          f"{model.inference_copy('decoder', BEST).conv_in.weight.dtype} (inference copy); diffusers "
          f"StableDiffusionPipeline UNet {pipe.unet.dtype}, VAE {pipe.vae.dtype}; text: {cfg.text_encoder} on both "
          f"sides; warm-up {warmup}, rounds {rounds}", flush=True)
    for batch in batches:
        prompts = coco_captions(batch, seed)
        fns = sample_fns(model, pipe, model.text_encoder, prompts, steps, guidance, seed)
        for name, fn in fns.items():  # one untimed call each: checks the output, and makes mini_sd's inference copy
            images = fn()
            assert len(images) == batch and images[0].size == (cfg.image_size, cfg.image_size), f"{name}: wrong output"
        flops = {name: count_flops(fn) for name, fn in fns.items()}  # text encoder + steps x UNet + VAE decode
        times = interleaved(fns, warmup, rounds)
        res.add(preset, sample_label(steps, guidance), BEST.name, batch, times, flops, batch)
    del model, pipe


def bench_vae(res, preset, cfg, vaes, batch, warmup, rounds, gen):
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    h = cfg.latent_size
    latents = torch.randn(batch, cfg.latent_channels, h, h, generator=gen)
    mini, diff = vaes["mini"].eval(), vaes["diffusers"].eval()
    ops = {
        "VAE encode": {"mini": lambda: mini.encode(images), "diffusers": lambda: diff.encode(images).latent_dist},
        "VAE decode": {"mini": lambda: mini.decode(latents),
                       "diffusers": lambda: diff.decode(latents, return_dict=False)[0]},
    }
    with torch.no_grad():
        for what, fns in ops.items():
            flops = {k: count_flops(fn) for k, fn in fns.items()}
            times = interleaved(fns, warmup, rounds)
            res.add(preset, f"{what} {cfg.image_size}px", "fp32", batch, times, flops, batch)


# -----------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, choices=sorted(mini_sd.PRESETS),
                   help="default: small base (small only with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small preset only unless --presets is given, one warm-up, two rounds (one for "
                        "sampling), base sampling in 10 steps")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sections", nargs="*", default=["train", "sample", "vae"],
                   choices=["train", "sample", "vae", "memory", "text"],
                   help="train, sample, vae: per preset, against diffusers (sample: end to end, DiffusionModel.sample "
                        "against a StableDiffusionPipeline, each in this CPU's best precision); memory: peak RSS per "
                        "configuration and side, each in a fresh process (--memory-presets); text: caption encoding "
                        "per step, one forward per caption vs one batched forward (memory and text ignore --presets); "
                        "none: `--sections --profile-sample` runs the profile alone")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: small 16, base 4)")
    p.add_argument("--train-dtypes", nargs="+", default=sorted({"fp32", BEST_TRAIN}), choices=["fp32", "bf16-autocast"],
                   help="default: fp32, and bf16 autocast where this CPU has bf16 units")
    p.add_argument("--sample-batches", type=int, nargs="+", default=None,
                   help="prompts per sampling run (the UNet sees twice that); default: small 4 16, base 4")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25; 10 for base with --quick)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up iterations per side (default per preset; 1 for text)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per measurement (default per preset; text 5; --quick 1 and 2)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd UNet training steps")
    p.add_argument("--compile-dtypes", nargs="+", default=[BEST_TRAIN], choices=["fp32", "bf16-autocast"])
    p.add_argument("--profile", action="store_true",
                   help="print a profiler table of one training step per side, in the best training dtype")
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
    p.add_argument("--text-batch", type=int, default=64,
                   help="text section: distinct captions per step (and the UNet step's batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    args.presets = args.presets or (["small"] if args.quick else ["small", "base"])
    return args


def bench_preset(args, res, preset):
    """The per-preset sections against diffusers, and the compiled and profiled runs that were asked for."""
    cfg = mini_sd.Config.preset(preset)
    d = PRESET_DEFAULTS.get(preset, PRESET_DEFAULTS["small"])
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else d["warmup"]
    rounds = args.rounds if args.rounds is not None else 2 if args.quick else d["rounds"]
    sample_rounds = args.rounds if args.rounds is not None else 1 if args.quick else d["sample_rounds"]
    steps = args.steps or (10 if args.quick and preset == "base" else 25)
    train_batch = args.train_batch or d["train_batch"]
    print(f"== {preset}: UNet {cfg.block_out_channels} x{cfg.layers_per_block} attn {cfg.attention_levels} heads "
          f"{cfg.num_heads}, latents {cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size}, text "
          f"{cfg.max_text_length}x{CONTEXT_DIM}; VAE {cfg.vae_channels} at {cfg.image_size}px; warm-up {warmup}, "
          f"rounds {rounds}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    unets = dict(zip(("mini", "diffusers"), build_unets(cfg)))
    check_params("UNet", unets["mini"], unets["diffusers"])
    unets = unets if "train" in args.sections or args.compile or args.profile else None  # not kept through sampling
    if "vae" in args.sections:
        vaes = dict(zip(("mini", "diffusers"), build_vaes(cfg)))
        check_params("VAE", vaes["mini"], vaes["diffusers"])
        check_params("VAE encoder", vaes["mini"].encoder, vaes["diffusers"].encoder)
        check_params("VAE decoder", vaes["mini"].decoder, vaes["diffusers"].decoder)
    if "train" in args.sections:
        bench_train(res, preset, cfg, unets, train_batch, warmup, rounds, args.train_dtypes, gen)
    if "sample" in args.sections:
        check_samplers(cfg, steps)
        bench_sample(res, preset, cfg, args.sample_batches or d["sample_batches"], steps, args.guidance, warmup,
                     sample_rounds, args.seed)
    if "vae" in args.sections:
        bench_vae(res, preset, cfg, vaes, args.vae_batch, warmup, rounds, gen)
    if args.compile:
        torch._dynamo.reset()
        compiled = {k: torch.compile(u) for k, u in unets.items()}
        bench_train(res, preset, cfg, unets, train_batch, warmup, rounds, args.compile_dtypes, gen, compiled=compiled)
        del compiled
        torch._dynamo.reset()
    if args.profile:
        bench_extras.profile_train_step(cfg, unets, train_batch, gen)
    if args.profile_sample:
        bench_extras.profile_sample(cfg, args.profile_batch, steps, args.guidance, args.seed, max(sample_rounds, 3))
    print(flush=True)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the text encoder's "Loading weights" bar, once per model
    if args.memory_child:  # a fresh process of bench_memory's: measure one configuration, print it, nothing else
        import json

        bench_extras.memory_child(json.loads(args.memory_child))
        return
    import diffusers

    print(f"mini_sd vs diffusers {diffusers.__version__} | torch {torch.__version__} | "
          f"{platform.processor() or platform.machine()} | {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
          + (f" | TORCHINDUCTOR_COMPILE_THREADS={os.environ['TORCHINDUCTOR_COMPILE_THREADS']}" if args.compile else "")
          + f"\n{cpu_line()}")
    bf16 = BF16_UNITS or "bf16-autocast" in args.train_dtypes + args.compile_dtypes * args.compile
    peak = measure_peak(warmup=1, rounds=3 if args.quick else 5, bf16=bf16)  # bf16 only where asked or fast
    peak_line = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items())
    print(f"matmul peak (2048^3, median): {peak_line}\n", flush=True)
    res, extra, t_start = Results(peak), [], time.perf_counter()  # extra: markdown tables of the library sections
    if "text" in args.sections:
        print("== text encoding per step: one forward per caption vs one batched forward", flush=True)
        extra.append(bench_extras.bench_text(args, args.warmup if args.warmup is not None else 1,
                                             args.rounds if args.rounds is not None else 2 if args.quick else 5))
        print(flush=True)
    if "memory" in args.sections:
        print("== peak memory (RSS), each configuration and side in a fresh process", flush=True)
        extra.append(bench_extras.bench_memory(args, {k: d["train_batch"] for k, d in PRESET_DEFAULTS.items()}))
        print(flush=True)
    per_preset = set(args.sections) & {"train", "sample", "vae"} or args.compile or args.profile or args.profile_sample
    for preset in args.presets if per_preset else []:
        bench_preset(args, res, preset)

    header = (f"mini_sd vs diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads; {cpu_line()}. Matmul peak {peak_line} (2048^3, this run). Medians of interleaved rounds; "
              "speed ratio = diffusers time / mini_sd time (> 1: mini_sd faster); items = training samples or images.")
    table = f"{header}\n\n{res.table()}{res.targets()}" if res.rows else ""
    table = "\n\n".join([table] * bool(table) + extra)
    print(f"{table}\n\n(total {time.perf_counter() - t_start:.0f} s)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"{table}\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
