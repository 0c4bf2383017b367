"""Train bdm's demo model: a small BI-DiffSR x4 network, on this CPU, for `bdm upscale` out of the box.

    python tools/train_demo.py --state tools/demo_state            # start, or resume from the saved state
    python tools/train_demo.py --state tools/demo_state --iters N  # go on to N iterations in all
    python tools/train_demo.py --state tools/demo_state --release runtime/models   # write the official ckpt + YAML

What is official and what is the recipe:
- Official: the network (bdm's BIDiffSRUNet = the official module tree, at reduced width), trained in the
  official arithmetic (`set_mode(model, "official")`: its straight-through estimators), epsilon
  prediction, the official noise schedule (diffusers DDIM, linear betas 1e-6..1e-2, 2000 steps), the official
  checkpoint format ({'params': state_dict} + an options YAML in the official layout, `scale: 4`), and at
  inference exactly the official 50-step DDIM sampler (bdm.runtime.sampler), which also monitors training here.
- Recipe (this file's choices, see SETTINGS):
  * timesteps: the sampler only evaluates t in {0, 40, ..., 1960}; 80 % of the draws are those, the rest
    uniform. TaR/TaA take their group (t // 400) from sample 0 for the whole batch, so each batch draws ONE group
    and per-sample t inside it.
  * loss: L1 on eps weighted per sample by the factor the sampler applies to an eps error in its x0 estimate,
    r_t = sqrt((1 - abar_t) / abar_t) (floored), normalised within the batch: so the high-noise end, where
    r reaches 150, counts as much as its effect on the output, while batches of every group stay on one scale.
  * a second phase trains on the sampler's own states (half of the batches from `rollout_from`): the EMA model
    rolls a noised ground truth forward 1-3 DDIM steps, and the network learns
    eps_target = (x - sqrt(abar) x0) / sqrt(1 - abar) at the state actually reached, which pulls the
    deterministic (eta = 0) sampler's output towards the ground truth (exposure bias). From
    `trajectories_from` these states are those of whole 50-step EMA trajectories from noise (`trajectory_batch`),
    so the errors of all earlier steps, the high-noise ones above all, are in the states the network learns from;
    from `trajectory_weighted_from` their eps error is weighted by min(r_t, 1) (one t per such batch).
  * Adam with warm-up and cosine decay, gradient clipping, EMA of the weights (the EMA copy is released),
    h/v flips and 90-degree rotations, 64 px HR patches (LR 16 px), batch 8, one thread (on a busy 2-core
    machine two OpenMP threads spin-wait for each other: 2.8 s/iteration against 0.5 s with one, measured).
- Data: tools/demo_data.py (scikit-image's bundled photographs; held-out and excluded images never trained on).

Reproducible from the seed (with the same thread count); resumable: the state (model, EMA, optimizer, RNGs,
iteration, cumulative wall time) is written atomically every `save_minutes` to STATE/state.pt, with
STATE/settings.json (settings, iteration, wall time, the latest monitoring numbers) beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data  # noqa: E402

from bdm.export.bidiffsr.network import BIDiffSRUNet, set_mode  # noqa: E402
from bdm.export.bidiffsr.config import BIDIFFSR_TYPE  # noqa: E402
from bdm.runtime.sampler import alphas_cumprod, ddim_schedule, ddim_step, sample  # noqa: E402

SCALE = 4
NETWORK_G = {  # the official network_g keys; reduced width, one res block, FP top decoder stages as released
    "type": BIDIFFSR_TYPE, "in_channel": 6, "out_channel": 3, "inner_channel": 16, "norm_groups": 4,
    "channel_mults": [1, 2, 4], "attn_res": [], "res_blocks": 1, "dropout": 0.0, "image_size": 256,
    "fp_res": [256, 128], "total_step": 2000, "dynamic_group": 5,
}
SETTINGS = {
    "seed": 0,
    "threads": 1,                # 2 threads spin-wait for each other on a shared machine: 5x slower measured
    "iters": 10000,
    "batch": 8,
    "patch": 64,                 # HR side; LR side patch / 4
    "lr": 5e-4,
    "adam_betas": [0.9, 0.99],
    "warmup": 500,
    "final_lr_fraction": 0.05,   # cosine decay to lr * this at `iters`
    "grad_clip": 1.0,
    "ema_decay": 0.999,
    "sampler_t_share": 0.8,      # share of t drawn from the 50 sampler timesteps (else uniform in the group)
    "group_probs": [0.15, 0.2, 0.2, 0.2, 0.25],
    "weight_floor": 0.05,        # floor of r_t = sqrt((1 - abar) / abar) as the loss weight
    "rollout_from": 0.6,         # fraction of `iters` after which rollout batches start
    "rollout_share": 0.5,        # share of batches trained on the EMA sampler's own states (phase 2)
    "rollout_max_steps": 3,
    "trajectories_from": None,   # iteration from which rollout batches are states of full 50-step EMA trajectories
    "trajectory_weighted_from": None,  # iteration from which trajectory batches weigh eps by min(r_t, 1)
    "flat_patch_std": 0.02,      # patches flatter than this (HR std) are redrawn 3 times in 4 (black skies)
    "save_minutes": 5,
    "monitor_every": 250,        # x0-PSNR per group on held-out crops, training loss
    "sample_every": 500,         # the real 50-step sampler on held-out crops, PSNR-Y vs bicubic
}


class Photos:
    """Training photos (HR and condition, float32 HWC) and the patch sampler."""

    def __init__(self, names, rng: np.random.Generator):
        self.hr, self.cond = [], []
        for name in names:
            hr, _, cond = demo_data.hr_and_condition(demo_data.skimage_photo(name), SCALE)
            self.hr.append(hr)
            self.cond.append(cond)
        areas = np.array([h.shape[0] * h.shape[1] for h in self.hr], dtype=np.float64)
        self.probs = np.sqrt(areas) / np.sqrt(areas).sum()
        self.rng = rng

    def batch(self, n: int, patch: int, flat_std: float):
        hrs, conds = [], []
        while len(hrs) < n:
            i = self.rng.choice(len(self.hr), p=self.probs)
            hr, cond = self.hr[i], self.cond[i]
            y = int(self.rng.integers(0, hr.shape[0] - patch + 1))
            x = int(self.rng.integers(0, hr.shape[1] - patch + 1))
            h, c = hr[y:y + patch, x:x + patch], cond[y:y + patch, x:x + patch]
            if h.std() < flat_std and self.rng.random() < 0.75:
                continue
            k = int(self.rng.integers(0, 4))
            h, c = np.rot90(h, k), np.rot90(c, k)
            if self.rng.random() < 0.5:
                h, c = h[:, ::-1], c[:, ::-1]
            hrs.append(h.transpose(2, 0, 1))
            conds.append(c.transpose(2, 0, 1))
        return torch.from_numpy(np.ascontiguousarray(hrs)), torch.from_numpy(np.ascontiguousarray(conds))


def held_out_crops(size: int, count: int):
    """Fixed crops (HR, cond, lr) from the held-out photos, centred on their busiest areas: for monitoring."""
    crops = []
    for name in demo_data.HELD_OUT:
        hr, lr, cond = demo_data.hr_and_condition(demo_data.skimage_photo(name), SCALE)
        h, w = hr.shape[:2]
        for j in range(count):
            y = (h - size) * (j + 1) // (count + 1) // SCALE * SCALE
            x = (w - size) * (count - j) // (count + 1) // SCALE * SCALE
            crops.append((hr[y:y + size, x:x + size], cond[y:y + size, x:x + size]))
    hr = torch.from_numpy(np.ascontiguousarray(np.stack([c[0] for c in crops]).transpose(0, 3, 1, 2)))
    cond = torch.from_numpy(np.ascontiguousarray(np.stack([c[1] for c in crops]).transpose(0, 3, 1, 2)))
    return hr, cond


class Trainer:
    def __init__(self, settings: dict):
        self.s = settings
        torch.manual_seed(settings["seed"])
        self.model = BIDiffSRUNet(**{k: v for k, v in NETWORK_G.items() if k != "type"})
        set_mode(self.model, "official")
        self.model.train()
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=settings["lr"], betas=tuple(settings["adam_betas"]))
        self.rng = np.random.default_rng(settings["seed"])
        self.gen = torch.Generator().manual_seed(settings["seed"])
        self.photos = Photos(demo_data.TRAIN, self.rng)
        self.abar = torch.from_numpy(alphas_cumprod())
        self.schedule = ddim_schedule()
        self.iteration, self.wall = 0, 0.0
        self.history = []
        self.bank = []  # states of the current EMA trajectory still to train on (trajectory_batch)
        self.monitor_hr, self.monitor_cond = held_out_crops(64, 4)
        self.monitor_noise = torch.randn(self.monitor_hr.shape, generator=torch.Generator().manual_seed(1))
        self.sample_hr, self.sample_cond = held_out_crops(96, 1)

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "rng": self.rng.bit_generator.state, "gen": self.gen.get_state(), "torch": torch.get_rng_state(),
                "py": random.getstate(), "iteration": self.iteration, "wall": self.wall, "settings": self.s,
                "history": self.history}

    def load(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch"])
        random.setstate(state["py"])
        self.iteration, self.wall, self.history = state["iteration"], state["wall"], state["history"]

    def save(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "state.pt.part"
        torch.save(self.state(), tmp)
        os.replace(tmp, folder / "state.pt")
        info = {"settings": self.s, "network_g": NETWORK_G, "iteration": self.iteration,
                "wall_seconds": round(self.wall, 1), "torch": torch.__version__,
                "train_photos": list(demo_data.TRAIN), "held_out": list(demo_data.HELD_OUT),
                "excluded": list(demo_data.EXCLUDED), "history": self.history}
        tmp = folder / "settings.json.part"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, folder / "settings.json")

    # -- one iteration -------------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        s, it = self.s, self.iteration
        if it < s["warmup"]:
            return s["lr"] * (it + 1) / s["warmup"]
        progress = min(1.0, (it - s["warmup"]) / max(1, s["iters"] - s["warmup"]))
        floor = s["final_lr_fraction"]
        return s["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def draw_timesteps(self, n: int) -> "tuple[int, torch.Tensor]":
        """One group for the batch, per-sample t in it (mostly the sampler's timesteps)."""
        g = int(self.rng.choice(5, p=self.s["group_probs"]))
        on_grid = self.rng.random(n) < self.s["sampler_t_share"]
        grid = 400 * g + 40 * self.rng.integers(0, 10, n)
        uniform = 400 * g + self.rng.integers(0, 400, n)
        return g, torch.from_numpy(np.where(on_grid, grid, uniform).astype(np.int64))

    def rollout_states(self, x0, cond):
        """Noise x0 at sampler step j - k, roll the EMA model k DDIM steps: (x at step j, t_j as [n] int64)."""
        n = x0.shape[0]
        j = int(self.rng.integers(1, 50))
        k = int(self.rng.integers(1, min(self.s["rollout_max_steps"], j) + 1))
        start = j - k
        a = float(self.schedule.alpha_bar[start])
        noise = torch.randn(x0.shape, generator=self.gen)
        x = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
        with torch.no_grad():
            for i in range(start, j):
                t = torch.full((n,), int(self.schedule.timesteps[i]), dtype=torch.int64)
                x, _ = ddim_step(x, self.ema(x, cond, t), self.schedule, i)
        return x, torch.full((n,), int(self.schedule.timesteps[j]), dtype=torch.int64)

    def trajectory_batch(self):
        """(x0, cond, x_j, t_j as [n]) for one step j of a full 50-step EMA sampler trajectory: the sampler's
        exact states, errors of every earlier step included. One trajectory (50 EMA forwards) serves 50 batches,
        its steps in random order; a new one starts when they are used up."""
        if not self.bank:
            x0, cond = self.photos.batch(self.s["batch"], self.s["patch"], self.s["flat_patch_std"])
            a = float(self.schedule.alpha_bar[0])
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=self.gen)
            states = []
            with torch.no_grad():
                for i, t in enumerate(self.schedule.timesteps):
                    states.append(x)
                    x, _ = ddim_step(x, self.ema(x, cond, torch.full((x0.shape[0],), int(t))), self.schedule, i)
            self.bank = [(x0, cond, states[j], j) for j in self.rng.permutation(len(states))]
        x0, cond, x, j = self.bank.pop()
        return x0, cond, x, torch.full((x0.shape[0],), int(self.schedule.timesteps[j]), dtype=torch.int64)

    def step(self) -> float:
        s = self.s
        rollout = (self.iteration >= s["rollout_from"] * s["iters"] and self.rng.random() < s["rollout_share"])
        if rollout and s["trajectories_from"] is not None and self.iteration >= s["trajectories_from"]:
            x0, cond, x_t, t = self.trajectory_batch()
            rollout = "trajectory"
        else:
            x0, cond = self.photos.batch(s["batch"], s["patch"], s["flat_patch_std"])
        if rollout == "trajectory":
            a = self.abar[t].reshape(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        elif rollout:
            x_t, t = self.rollout_states(x0, cond)
            a = self.abar[t].reshape(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        else:
            _, t = self.draw_timesteps(s["batch"])
            a = self.abar[t].reshape(-1, 1, 1, 1)
            eps = torch.randn(x0.shape, generator=self.gen)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        weight = ((1 - a) / a).sqrt().clamp_min(s["weight_floor"])
        if rollout == "trajectory" and self.iteration >= (s["trajectory_weighted_from"] or math.inf):
            # One t per trajectory batch, so a batch mean would cancel r: cap it at 1 instead. Late states of a
            # poor trajectory have huge eps targets (x - x0) / sqrt(1 - abar) whose x0 effect r is tiny.
            weight = weight.clamp_max(1.0)
        else:
            weight = weight / weight.mean()
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate()
        eps_hat = self.model(x_t, cond, t)
        loss = (weight * (eps_hat - eps).abs()).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s["grad_clip"])
        self.opt.step()
        decay = min(s["ema_decay"], (1 + self.iteration) / (10 + self.iteration))
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        self.iteration += 1
        return float(loss.detach())

    # -- monitoring ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def x0_psnr_per_group(self) -> list:
        """RGB PSNR of the EMA model's clipped x0 estimate on held-out crops, at two sampler timesteps per
        group (the estimate the sampler forms at that step from a correctly noised ground truth)."""
        out = []
        hr, cond, noise = self.monitor_hr, self.monitor_cond, self.monitor_noise
        for g in range(5):
            mses = []
            for t in (400 * g + 80, 400 * g + 320):
                a = self.abar[t]
                x_t = a.sqrt() * hr + (1 - a).sqrt() * noise
                eps = self.ema(x_t, cond, torch.full((hr.shape[0],), t, dtype=torch.int64))
                x0 = ((x_t - (1 - a).sqrt() * eps) / a.sqrt()).clamp(0, 1)
                mses.append(float(((x0 - hr) ** 2).mean()))
            out.append(round(10 * math.log10(1 / np.mean(mses)), 2))
        return out

    @torch.no_grad()
    def sampled_psnr(self) -> "tuple[list, list]":
        """PSNR-Y of the real 50-step sampler output (EMA model) and of bicubic, on the held-out crops."""
        cond = self.sample_cond
        noise = torch.from_numpy(np.random.default_rng(10).standard_normal(tuple(cond.shape), dtype=np.float32))
        out = sample(lambda x, c, t: self.ema(x, c, torch.tensor([t])), cond, noise, self.schedule)
        ours, bicubic = [], []
        for i in range(cond.shape[0]):
            gt = demo_data.to_uint8(self.sample_hr[i].numpy().transpose(1, 2, 0))
            ours.append(round(demo_data.psnr_y(demo_data.to_uint8(out[i].numpy().transpose(1, 2, 0)), gt, SCALE), 2))
            bicubic.append(round(demo_data.psnr_y(demo_data.to_uint8(cond[i].numpy().transpose(1, 2, 0)), gt, SCALE), 2))
        return ours, bicubic

    # -- release -------------------------------------------------------------------------------------------
    def release(self, folder: Path, name: str = "bi_diffsr_demo_x4"):
        """The EMA weights in the official format ({'params': state_dict}) and its options YAML."""
        folder.mkdir(parents=True, exist_ok=True)
        params = {k: v.detach().clone().contiguous() for k, v in self.ema.state_dict().items()}
        tmp = folder / f"{name}.pth.part"
        torch.save({"params": params}, tmp)
        os.replace(tmp, folder / f"{name}.pth")
        options = {
            "name": name, "model_type": "BIDiffSRModel", "scale": SCALE, "num_gpu": 0, "manual_seed": 10,
            "network_g": {k: v for k, v in NETWORK_G.items()},
            "beta_schedule": {"scheduler_type": "DDIM", "schedule": "linear", "n_timestep": 2000,
                              "linear_start": 1.0e-6, "linear_end": 0.01, "prediction_type": "epsilon",
                              "num_inference_steps": 50, "guidance_scale": 7.5, "is_guidance": False},
            "path": {"pretrain_network_g": f"{name}.pth", "param_key_g": "params", "strict_load_g": True},
            "bdm_training": {"script": "tools/train_demo.py", "iteration": self.iteration,
                             "wall_seconds": round(self.wall), "settings": self.s},
        }
        (folder / f"{name}.yml").write_text(yaml.safe_dump(options, sort_keys=False))
        return folder / f"{name}.pth", folder / f"{name}.yml"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=Path(__file__).resolve().parent / "demo_state",
                        help="folder of state.pt and settings.json (resumed when present)")
    parser.add_argument("--iters", type=int, help="total iterations (default: the saved or built-in setting)")
    parser.add_argument("--release", type=Path, help="write the EMA model (official ckpt + YAML) there and stop")
    parser.add_argument("--stop-at", type=int, help="save and stop at this iteration (to replay a recorded run)")
    parser.add_argument("--trajectories-from", type=int,
                        help="iteration from which rollout batches come from full EMA sampler trajectories")
    parser.add_argument("--trajectory-weighted-from", type=int,
                        help="iteration from which trajectory batches weigh the eps error by min(r_t, 1)")
    parser.add_argument("--stop-after-minutes", type=float, help="save and stop after this much wall time")
    args = parser.parse_args(argv)

    settings = dict(SETTINGS)
    state_file = args.state / "state.pt"
    saved = torch.load(state_file, map_location="cpu", weights_only=True) if state_file.exists() else None
    if saved is not None:
        settings = dict(saved["settings"])
    if args.iters:
        settings["iters"] = args.iters
    if args.trajectories_from is not None:
        settings["trajectories_from"] = args.trajectories_from
    if args.trajectory_weighted_from is not None:
        settings["trajectory_weighted_from"] = args.trajectory_weighted_from
    settings.setdefault("trajectories_from", None)
    settings.setdefault("trajectory_weighted_from", None)
    torch.set_num_threads(settings["threads"])
    trainer = Trainer(settings)
    if saved is not None:
        trainer.load(saved)
        trainer.s = settings
        print(f"resumed at iteration {trainer.iteration} ({trainer.wall / 60:.1f} min of training so far)", flush=True)
    if args.release:
        for path in trainer.release(args.release):
            print(path)
        return

    started = time.perf_counter()
    last_save = wall_at_start = trainer.wall
    losses = []
    end = min(settings["iters"], args.stop_at or settings["iters"])
    while trainer.iteration < end:
        t0 = time.perf_counter()
        losses.append(trainer.step())
        trainer.wall = wall_at_start + (time.perf_counter() - started)
        it = trainer.iteration
        if it % settings["monitor_every"] == 0 or it == settings["iters"]:
            record = {"iteration": it, "minutes": round(trainer.wall / 60, 1), "loss": round(float(np.mean(losses)), 4),
                      "lr": f"{trainer.learning_rate():.2e}", "s_per_iter": round(time.perf_counter() - t0, 3),
                      "x0_psnr_groups_0to4": trainer.x0_psnr_per_group()}
            if it % settings["sample_every"] == 0 or it == settings["iters"]:
                ours, bicubic = trainer.sampled_psnr()
                record["sampled_psnr_y"], record["bicubic_psnr_y"] = ours, bicubic
            losses = []
            trainer.history.append(record)
            print(json.dumps(record), flush=True)
        stop = args.stop_after_minutes and trainer.wall - wall_at_start >= 60 * args.stop_after_minutes
        # Saved only between trajectories (the bank is not saved), so a resumed run equals an uninterrupted one.
        due = trainer.wall - last_save >= 60 * settings["save_minutes"] and not trainer.bank
        if due or it == end or stop:
            trainer.save(args.state)
            last_save = trainer.wall
            if stop:
                break
    trainer.save(args.state)
    print(f"saved {state_file} at iteration {trainer.iteration}, {trainer.wall / 60:.1f} min of training", flush=True)


if __name__ == "__main__":
    main()
