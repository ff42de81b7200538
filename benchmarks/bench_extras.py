"""bench_speed.py's optional sections, outside its default run; bench_speed.py's options select them.

  * memory (--sections memory): peak RSS (VmHWM) of a small and a base UNet training step (the best training dtype,
    batch as in the train section) and of end-to-end sampling at batch 16 (small), per side, each in a fresh process
    (bench_speed.py re-invoked with a hidden --memory-child flag) that first imports the same libraries on both sides.
  * text (--sections text; mini_sd only, no diffusers side): --text-batch distinct COCO-style captions encoded one per
    forward ([enc.encode([c]) for c in caps], train() before the batched encoder) and in one batched forward
    (enc.encode(caps)), next to a small-preset UNet training step at the same batch.
  * profiles: --profile, a profiler table of one training step per side; --profile-sample, one guided sampling step
    per side and the end-to-end run split into its phases.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from common import (BEST, BEST_TRAIN, BF16_UNITS, CONTEXT_DIM, adamw, call_diff, call_mini, coco_captions,
                    diffusers_pipeline, diffusers_unet, interleaved, make_inputs, mini_sampler, sample_fns,
                    sample_label, train_step)
import mini_sd  # (common puts the repository root on sys.path)

BENCH_SPEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_speed.py")
TRAIN_PHRASE = BEST_TRAIN.replace("-", " ")  # "bf16 autocast" or "fp32", for prose

# -----------------------------------------------------------------------------
# Text encoding per step


def bench_text(args, warmup, rounds):
    """Text encoding of one training step's captions: one forward per caption (train() before today) against one
    batched forward (TextEncoder.encode), next to the small preset's UNet training step at the same batch. -> table."""
    cfg = mini_sd.Config.preset("small")
    n = args.text_batch
    caps = coco_captions(n, args.seed)
    enc = mini_sd.TextEncoder(cfg.text_encoder, cfg.max_text_length)
    unet = mini_sd.UNet(cfg, context_dim=enc.hidden_size).train()
    inputs = make_inputs(cfg, n, torch.Generator().manual_seed(args.seed))
    full = lambda u, x, t, context, mask: u(x, t, context, mask)  # noqa: E731  every token slot, mask as given
    print(f"  {n} distinct captions, e.g. {caps[0]!r}; text encoder {cfg.text_encoder} "
          f"({mini_sd.count_parameters(enc.model) / 1e6:.1f}M), max_text_length {cfg.max_text_length}; "
          f"UNet step: small preset, {TRAIN_PHRASE}, batch {n}; warm-up {warmup}, rounds {rounds}", flush=True)
    fns = {"one forward per caption": lambda: [enc.encode([c]) for c in caps],
           "one batched forward": lambda: enc.encode(caps),
           "UNet train step (fwd+bwd+AdamW)": train_step(unet, full, BEST_TRAIN, inputs, adamw(unet))}
    times = interleaved(fns, warmup, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = med["UNet train step (fwd+bwd+AdamW)"]
    for k, v in med.items():
        print(f"    {k:<34} {1e3 * v:8.1f} ms  [{1e3 * min(times[k]):.0f}..{1e3 * max(times[k]):.0f} ms]"
              + ("" if k.startswith("UNet") else f"  = {100 * v / step:.0f}% of a UNet training step"), flush=True)
    per, batched = med["one forward per caption"], med["one batched forward"]
    lines = [f"Text encoding of {n} distinct COCO-style captions (\"a {{adj}} {{noun}} {{verb}} on a {{place}}\") with "
             f"{cfg.text_encoder}, max_text_length {cfg.max_text_length}, next to the small preset's UNet training "
             f"step at batch {n} ({TRAIN_PHRASE}); medians of {rounds} interleaved rounds.",
             "",
             "| what | ms | % of the UNet step |",
             "|---|---:|---:|",
             f"| one forward per caption (`[enc.encode([c]) for c in caps]`, before) | {1e3 * per:.1f} "
             f"| {100 * per / step:.0f}% |",
             f"| one batched forward (`enc.encode(caps)`, now) | {1e3 * batched:.1f} | {100 * batched / step:.0f}% |",
             f"| UNet training step (fwd+bwd+AdamW) | {1e3 * step:.1f} | 100% |",
             "",
             f"Batched is {per / batched:.1f}x faster. In DiffusionModel.train a Dataset's captions are encoded once "
             f"(text_encoder.remember) and cost nothing per step; other data pays the batched cost every step."]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Profiles


def profile_train_step(cfg, unets, batch, gen, rows=12):
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs(cfg, batch, gen)
    for (name, unet), call in zip(unets.items(), (call_mini, call_diff)):
        unet.train()
        step = train_step(unet, call, BEST_TRAIN, inputs)
        step()  # warm-up
        unet.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        unet.zero_grad(set_to_none=True)
        print(f"\n  profile: {name}, one {BEST_TRAIN} training step (fwd+bwd, no optimiser), batch {batch}, "
              f"top {rows} by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def guided_steps(model, pipe, prompts, steps, guidance, seed):
    """One guided sampling step per side at the second timestep (the one where DPM++(2M) uses its history in
    diffusers): UNet forward on 2B + guidance, then mini_sd's x0 / eps split, the sampler's only tensor work besides
    a few element-wise ops, and diffusers' scheduler.step. -> (mini_step, diff_step, diff_step_fresh, x, latents)."""
    cfg, negative, B = model.config, [""] * len(prompts), len(prompts)
    unet, sched = model.inference_copy("unet", BEST), pipe.scheduler
    context, mask = model.text_encoder(negative + prompts)
    x = torch.randn(B, cfg.latent_channels, cfg.latent_size, cfg.latent_size,
                    generator=torch.Generator().manual_seed(seed))
    t = model.scheduler.timesteps(steps)[1]
    latents, embeds = x.to(pipe.unet.dtype), model.text_encoder.encode(negative + prompts)[0].to(pipe.unet.dtype)

    @torch.no_grad()
    def mini_step():  # DiffusionModel.sample's model_fn, then the sampler's x0 / eps split
        xin = torch.cat([x, x])
        out = unet(xin, torch.full((xin.shape[0],), t), context, mask).float()
        uncond, cond = out.chunk(2)
        return model.scheduler.split(uncond + guidance * (cond - uncond), x, t)

    @torch.no_grad()
    def diff_step():  # the body of StableDiffusionPipeline.__call__'s denoising loop
        xin = sched.scale_model_input(torch.cat([latents] * 2), sched.timesteps[1])
        out = pipe.unet(xin, sched.timesteps[1], encoder_hidden_states=embeds, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        return sched.step(uncond + guidance * (cond - uncond), sched.timesteps[1], latents, return_dict=False)[0]

    def diff_step_fresh():  # the scheduler keeps a step index and history: start every step from the same state
        sched.set_timesteps(steps)
        return diff_step()

    return mini_step, diff_step, diff_step_fresh, x, latents


def least_disturbed_profile(step, reset, tries):
    """A shared machine preempts some steps: profile one step `tries` times (reset() before each, outside the
    profile) and keep the profile of the least total self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    best = None
    for _ in range(tries):
        reset()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in table)
        best = min(best, (total, table), key=lambda b: b[0]) if best else (total, table)
    return best[1]


def profile_sample(cfg, batch, steps, guidance, seed, rounds, rows=10, tries=10):
    """One guided sampling step at `batch` prompts per side (guided_steps), top `rows` ops by self CPU time; then the
    end-to-end run split into its phases, medians of `rounds`."""
    model, pipe = mini_sampler(cfg, seed), diffusers_pipeline(cfg)
    prompts, negative = coco_captions(batch, seed), [""] * batch
    mini_step, diff_step, diff_step_fresh, x, latents = guided_steps(model, pipe, prompts, steps, guidance, seed)
    reset = lambda: pipe.scheduler.set_timesteps(steps)  # noqa: E731
    for name, step, profiled in ((f"mini_sd (DiffusionModel.sample's {BEST.name} UNet copy)", mini_step, mini_step),
                                 (f"diffusers (StableDiffusionPipeline, {BEST.name})", diff_step_fresh, diff_step)):
        for _ in range(3):
            step()  # warm-up
        table = least_disturbed_profile(profiled, reset, tries)
        print(f"\n  profile: {name}, one guided sampling step, batch {batch} (UNet on {2 * batch}), top {rows} by self "
              f"CPU time (the fastest of {tries} profiled steps)")
        print(table.table(sort_by="self_cpu_time_total", row_limit=rows))

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
        med = {what: {k: statistics.median(v) for k, v in interleaved(fns, 1, rounds).items()}
               for what, fns in phases.items()}
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
    # both sides import the same libraries first, so that the baseline is the same: what differs is the work
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    import transformers

    del AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel, transformers

    imports = proc_status_mb("VmRSS") or peak_rss_mb()
    cfg, side, seed = mini_sd.Config.preset(spec["preset"]), spec["side"], spec["seed"]
    if spec["what"] == "train":  # bench_train's step: forward (autocast or fp32), fp32 MSE, backward, fused AdamW
        torch.manual_seed(seed)
        unet = (mini_sd.UNet(cfg, context_dim=CONTEXT_DIM) if side == "mini" else diffusers_unet(cfg)).train()
        inputs = make_inputs(cfg, spec["batch"], torch.Generator().manual_seed(seed))
        work = train_step(unet, call_mini if side == "mini" else call_diff, spec["dtype"], inputs, adamw(unet))
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
        calls = 2  # the first makes mini_sd's inference copy of the UNet (in bf16; in fp32 it is the UNet)
    built = proc_status_mb("VmRSS") or peak_rss_mb()
    t0 = time.perf_counter()
    for _ in range(calls):
        work()
    print(MEMORY_PREFIX + json.dumps(dict(spec, imports=imports, built=built, peak=peak_rss_mb(), calls=calls,
                                          seconds=time.perf_counter() - t0)), flush=True)


def run_memory_child(spec, threads):  # -> the child's result, a dict
    cmd = [sys.executable, BENCH_SPEED, "--threads", str(threads), "--memory-child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEMORY_PREFIX)]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory child {spec} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MEMORY_PREFIX):])


def bench_memory(args, train_batches):
    """Peak RSS per configuration and side, each in a fresh subprocess of bench_speed.py; train_batches: the default
    training batch per preset. -> markdown table."""
    configs = [dict(what="train", preset=preset, dtype=dtype, batch=args.train_batch or train_batches[preset])
               for preset in args.memory_presets for dtype in args.memory_dtypes]
    configs.append(dict(what="sample", preset="small", batch=args.memory_sample_batch, steps=args.steps or 25,
                        guidance=args.guidance))
    rows = []
    for config in configs:
        row = {side: run_memory_child(dict(config, side=side, seed=args.seed), args.threads)
               for side in ("mini", "diffusers")}
        if config["what"] == "train":
            label = f"{config['preset']} UNet train step (fwd+bwd+AdamW), {config['dtype']}"
        else:
            label = f"{config['preset']} {sample_label(config['steps'], config['guidance'])}, {BEST.name}"
        rows.append((label, config["batch"], row))
        m, d = row["mini"], row["diffusers"]
        print(f"  {label:<70} batch {config['batch']:>3}: peak RSS mini_sd {m['peak']:7.0f} MiB  diffusers "
              f"{d['peak']:7.0f} MiB  (imports {m['imports']:.0f} / {d['imports']:.0f}; {m['calls']} calls, "
              f"{m['seconds']:.1f} / {d['seconds']:.1f} s)", flush=True)
    copies = " + their bf16 copies" if BF16_UNITS else ""  # in fp32 sample() runs the models themselves
    lines = [
        "Peak resident memory (VmHWM), each configuration and side in a fresh process that first imports the same "
        "libraries (torch, mini_sd, diffusers, transformers); 'above imports' = peak - RSS after those imports. "
        "Training: 3 steps (the first allocates gradients and AdamW state); sampling: 2 end-to-end calls (models as "
        f"in the sample section: mini_sd's fp32 UNet and VAE{copies} + MiniLM; the {BEST.name} pipeline + MiniLM).",
        "",
        "| configuration | batch | mini_sd peak MiB | diffusers peak MiB | diffusers / mini_sd "
        "| mini_sd above imports MiB | diffusers above imports MiB | RSS after imports MiB (mini_sd / diffusers) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, batch, row in rows:
        m, d = row["mini"], row["diffusers"]
        lines.append(f"| {label} | {batch} | {m['peak']:.0f} | {d['peak']:.0f} | {d['peak'] / m['peak']:.2f} | "
                     f"{m['peak'] - m['imports']:.0f} | {d['peak'] - d['imports']:.0f} | "
                     f"{m['imports']:.0f} / {d['imports']:.0f} |")
    return "\n".join(lines)
