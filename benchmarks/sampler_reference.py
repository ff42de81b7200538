#!/usr/bin/env python
"""Reference sampler trajectories from diffusers' own schedulers, for test_mini_sd to commit as numbers.

    python benchmarks/sampler_reference.py           # prints REFERENCE = {...}, ready to paste into a test
    python benchmarks/sampler_reference.py --check   # also runs mini_sd's sampler and prints the max |diff| per case

A fixed model function (linear in x, depending on t) is sampled for 10 steps from seeded float64 noise with DDIM
(eta 0 and 1), DDPM and DPM-Solver++(2M), in two settings: "v-ztsnr" (v-prediction, zero terminal
SNR, trailing spacing: DDPM schedulers cannot take mini_sd's default rectified flow) and "sd" (Stable Diffusion's:
epsilon, leading spacing with steps_offset=1). For each case it prints (mean, mean of squares, four fixed elements)
of the final sample. Noise for eta > 0 comes from one CPU generator seeded SEED + 1, drawn in float64 (one draw of
x's shape per step), as diffusers' DDIM/DDPM do.

Where diffusers differs from mini_sd only in a constant, the script sets diffusers' tensors to mini_sd's values:
  * alphas_cumprod: diffusers builds it in float32 and, for zero terminal SNR, keeps alphas_cumprod[-1] = 0 (DDIM,
    DDPM); mini_sd uses float64 and clamps it to 2**-24. diffusers' own schedule is checked to agree within 1e-6 first.
  * DPM-Solver: its sigmas (float32 after set_timesteps) are replaced by float64 ones, alpha_t/sigma_t/lambda_t too,
    and it gets mini_sd's timesteps explicitly (its own "leading" spacing divides by steps + 1, unlike DDIM's).
    Its step() rounds the sample to float32 before the update (an fp16 safeguard), which alone moves the result by
    ~1e-7 relative; DPMSolver64 below hands the update functions the float64 sample instead. Order logic and update
    formulas are diffusers' own, unchanged.
  * DDPMScheduler adds sqrt(max(variance, 1e-20)) * z = 1e-10 * z at the last step, where mini_sd adds nothing.
"""
import argparse
import os
import sys

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mini_sd  # noqa: E402

SETTINGS = {"v-ztsnr": dict(prediction_type="v_prediction"),
            "sd": dict(prediction_type="epsilon", zero_terminal_snr=False, timestep_spacing="leading")}
SAMPLERS = {"ddim0": ("ddim", 0.0), "ddim1": ("ddim", 1.0), "ddpm": ("ddpm", 1.0), "dpm++": ("dpm++", 0.0)}
STEPS, SEED, SHAPE = 10, 0, (2, 4, 8, 8)
ELEMENTS = [(0, 0, 0, 0), (0, 2, 3, 5), (1, 1, 4, 2), (1, 3, 7, 7)]
W = torch.randn(8, 8, generator=torch.Generator().manual_seed(SEED + 2), dtype=torch.float64) / 8**0.5


def model_fn(x, t):  # the test restates W and this function
    return 0.8 * x @ W + 0.1 * (t / 1000) * x.flip(-1)


def summary(x):  # (mean, mean of squares, four elements): compare with rtol 1e-6 and atol 1e-6 * rms
    return (x.mean().item(), (x**2).mean().item(), *(x[i].item() for i in ELEMENTS))


class DPMSolver64(DPMSolverMultistepScheduler):
    def step(self, model_output, timestep, sample, **kw):
        self.x64 = sample  # step() passes sample.to(torch.float32) to the updates; give them this one
        return super().step(model_output, timestep, sample, **kw)

    def dpm_solver_first_order_update(self, *args, **kw):
        return super().dpm_solver_first_order_update(*args, **{**kw, "sample": self.x64})

    def multistep_dpm_solver_second_order_update(self, *args, **kw):
        return super().multistep_dpm_solver_second_order_update(*args, **{**kw, "sample": self.x64})


def diffusers_sample(setting, sampler):
    cfg = mini_sd.Config(**SETTINGS[setting])
    ns = mini_sd.NoiseSchedule(cfg)  # float64 numbers: alpha_t = sqrt(alphas_cumprod), or (older mini_sd) .ac
    f64 = torch.float64
    ac = torch.tensor(ns.alpha, dtype=f64) ** 2 if hasattr(ns, "alpha") else torch.tensor(ns.ac, dtype=f64)
    ts = ns.timesteps(STEPS)
    kind, eta = SAMPLERS[sampler]
    common = dict(beta_schedule="scaled_linear", beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                  prediction_type=cfg.prediction_type, timestep_spacing=cfg.timestep_spacing, steps_offset=1,
                  rescale_betas_zero_snr=cfg.zero_terminal_snr)
    if kind == "ddim":
        sched = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    elif kind == "ddpm":
        sched = DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small")
    else:
        sched = DPMSolver64(**common, algorithm_type="dpmsolver++", solver_order=2,
                            final_sigmas_type="zero", lower_order_final=True)
    own = sched.alphas_cumprod.double()  # diffusers' float32 schedule, checked, then replaced by mini_sd's float64
    assert (own - ac).abs().max() < 1e-6, "schedules differ beyond float32 rounding"  # last entry: 0 vs 2**-24
    sched.alphas_cumprod = ac
    if kind == "dpm++":
        sched.alpha_t, sched.sigma_t = ac.sqrt(), (1 - ac).sqrt()
        sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
        sched.set_timesteps(timesteps=ts)
        sched.sigmas = torch.cat([((1 - ac[ts]) / ac[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    else:
        sched.set_timesteps(STEPS)
    assert sched.timesteps.tolist() == ts, (sched.timesteps.tolist(), ts)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    gen = torch.Generator().manual_seed(SEED + 1)
    for t in sched.timesteps.tolist():
        kw = dict(eta=eta, generator=gen) if kind == "ddim" else dict(generator=gen) if kind == "ddpm" else {}
        x = sched.step(model_fn(x, t), t, x, **kw).prev_sample
    return x


def mini_sd_sample(setting, sampler):
    s = mini_sd.NoiseSchedule(mini_sd.Config(**SETTINGS[setting]))
    kind, eta = SAMPLERS[sampler]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    return s.sample(model_fn, x, s.timesteps(STEPS), kind, eta, torch.Generator().manual_seed(SEED + 1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="also compare mini_sd's sampler with the references")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# diffusers sampler references: {STEPS} steps, (mean, mean of squares, x[i] for i in {ELEMENTS})")
    print("REFERENCE = {")
    for setting in SETTINGS:
        for sampler in SAMPLERS:
            ref = diffusers_sample(setting, sampler)
            print(f"    ({setting!r}, {sampler!r}): ({', '.join(f'{v:.12g}' for v in summary(ref))}),")
            if args.check:
                got = mini_sd_sample(setting, sampler)
                d = (got.double() - ref).abs().max().item()
                print(f"    # mini_sd max |diff| {d:.2e} (max |x| {ref.abs().max().item():.3g}, dtype {got.dtype})")
    print("}")
