"""Gaussian diffusion for Lumos: noise schedules, the training objective, samplers, guidance.

The model is trained as in improved DDPM / DiT: epsilon prediction with a learned-range
variance and the "hybrid" loss (MSE + variational bound), or v- or x0-prediction with plain MSE
(x0: what a pixel-space model with large patches learns fastest, the offline default).
Samplers: ancestral DDPM with timestep respacing, DDIM, and DPM-Solver++ 2M on the
discrete VP schedule. Schedule arithmetic is done in float64 and cast to the sample's
dtype where it meets a tensor.

Sections, in order: schedules, GaussianDiffusion (with the training losses), samplers,
guidance, and `draw_samples`, the one way images are drawn. Shapes: B batch, C channels, H x W spatial; a timestep tensor `t` is (B,).
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

PREDICTION_TYPES = ("epsilon", "v", "x0")
SAMPLING_METHODS = ("ddpm", "ddim", "dpm++")
SKIP_TYPES = ("time_uniform", "logSNR")


# ---------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------

def linear_betas(num_steps: int = 1000) -> torch.Tensor:
    """DDPM's linear betas from 1e-4 to 0.02, both ends scaled by 1000 / num_steps.

    Returns (num_steps,) float64.
    """
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule, betas capped at max_beta.

    Returns (num_steps,) float64.
    """
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def beta_schedule(name: str, num_steps: int = 1000) -> torch.Tensor:
    """The betas of schedule `name` ("linear" or "cosine"): (num_steps,) float64."""
    schedules = {"linear": linear_betas, "cosine": cosine_betas}
    if name not in schedules:
        raise ValueError(f"unknown beta schedule {name!r}; use 'linear' or 'cosine'")
    return schedules[name](num_steps)


def spaced_timesteps(num_steps: int, steps: int) -> list[int]:
    """`steps` timesteps spread evenly over [0, num_steps - 1], both ends kept.

    The one-section case of improved DDPM's `space_timesteps` ("250" in DiT), so a
    respaced chain starts from the noisiest trained step. Returns an increasing list.
    """
    if not 2 <= steps <= num_steps:
        raise ValueError(f"steps={steps} must be between 2 and the {num_steps} trained steps")
    stride = (num_steps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


# ---------------------------------------------------------------------------------------
# GaussianDiffusion: the forward process, the model's reverse step, the training losses
# ---------------------------------------------------------------------------------------

def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, ..., 1) to broadcast against `like`, in its dtype and device."""
    picked = values.to(like.dtype).to(like.device)[t]
    return picked.view(-1, *([1] * (like.dim() - 1)))


def _split_output(output: torch.Tensor, channels: int):
    """(B, C or 2C, H, W) model output -> prediction (B, C, ...), variance values or None."""
    if output.shape[1] == channels:
        return output, None
    if output.shape[1] == 2 * channels:
        return output[:, :channels], output[:, channels:]
    raise ValueError(f"model returned {output.shape[1]} channels; expected {channels} "
                     f"(prediction) or {2 * channels} (prediction + variance)")


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) in nats, elementwise."""
    return 0.5 * (log_var2 - log_var1 - 1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation used by improved DDPM; kept so the bound matches theirs.
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """Log-probability of x in [-1, 1] under N(mean, exp(log_scale)^2) on 256 bins.

    The outermost bins extend to -inf and +inf. Elementwise, same shape as x.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class ReverseStep(NamedTuple):
    """The model's p(x_{t-1} | x_t): mean and log-variance, plus its x0 estimate.

    mean and pred_x0 are (B, C, H, W); log_variance too with learned variance, else (B, 1, 1, 1).
    """
    mean: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion:
    """A discrete Gaussian diffusion over `len(betas)` steps.

    betas: (T,) noise schedule. prediction: what the model's first C output channels
    predict, "epsilon", "v" (v = sqrt(abar) eps - sqrt(1 - abar) x0) or "x0". A model with 2C
    output channels also predicts the variance, interpolating in log space between the
    clipped posterior variance (v = -1) and beta_t (v = +1).
    """

    def __init__(self, betas, prediction: str = "epsilon"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D schedule of at least 2 values in (0, 1]")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction {prediction!r}; use one of {', '.join(PREDICTION_TYPES)}")
        self.prediction = prediction
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.num_timesteps = len(betas)
        # The trained timestep each step stands for; a respaced copy maps back through it.
        self.timestep_map = torch.arange(self.num_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = (betas * self.alphas_cumprod_prev.sqrt()
                                     / (1 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1 - self.alphas_cumprod_prev) * (1 - betas).sqrt()
                                     / (1 - self.alphas_cumprod))

    def respaced(self, steps: int) -> "GaussianDiffusion":
        """A `steps`-step chain through the spaced timesteps, keeping their alphas_cumprod."""
        kept = torch.tensor(spaced_timesteps(self.num_timesteps, steps))
        kept_alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([kept_alphas_cumprod.new_ones(1), kept_alphas_cumprod[:-1]])
        spaced = GaussianDiffusion(1 - kept_alphas_cumprod / previous, self.prediction)
        spaced.timestep_map = self.timestep_map[kept]
        return spaced

    # ---- forward process -------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noised data x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise (B, C, H, W)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0, (B, C, H, W)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x0): mean like x_t; variance and clipped log-variance (B, 1, ..., 1)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x0
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t),
                _extract(self.posterior_log_variance_clipped, t, x_t))

    # ---- the model's reverse step ----------------------------------------------------

    def x0_and_eps(self, prediction, x_t, sqrt_abar, sqrt_one_minus_abar):
        """Turn the model's epsilon, v or x0 prediction into (x0, epsilon), each like x_t.

        The coefficients are floats or tensors broadcasting against x_t.
        """
        if self.prediction == "epsilon":
            return (x_t - sqrt_one_minus_abar * prediction) / sqrt_abar, prediction
        if self.prediction == "x0":
            return prediction, (x_t - sqrt_abar * prediction) / sqrt_one_minus_abar
        x0 = sqrt_abar * x_t - sqrt_one_minus_abar * prediction
        eps = sqrt_one_minus_abar * x_t + sqrt_abar * prediction
        return x0, eps

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False) -> ReverseStep:
        """The model's p(x_{t-1} | x_t) from its output (B, C or 2C, H, W) at steps t (B,).

        With C channels the variance is the fixed (clipped) posterior variance.
        """
        prediction, var_values = _split_output(model_output, x_t.shape[1])
        pred_x0, _ = self.x0_and_eps(prediction, x_t, _extract(self.sqrt_alphas_cumprod, t, x_t),
                                     _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t))
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, min_log = self.q_posterior(pred_x0, x_t, t)
        if var_values is None:
            return ReverseStep(mean, min_log, pred_x0)
        max_log = _extract(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        return ReverseStep(mean, frac * max_log + (1 - frac) * min_log, pred_x0)

    # ---- training --------------------------------------------------------------------

    def training_losses(self, model, x0, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses for clean data x0 (B, C, H, W) at integer timesteps t (B,).

        The model is called as model(x_t, t.float(), **model_kwargs). Returns (B,) tensors
        "mse" and "loss", and "vb" (bits per dimension, scaled by T / 1000) when the model
        outputs 2C channels: the improved-DDPM hybrid objective, loss = mse + vb.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t.float(), **(model_kwargs or {}))
        prediction, var_values = _split_output(output, x0.shape[1])
        if self.prediction == "epsilon":
            target = noise
        else:
            target = x0 if self.prediction == "x0" else self.v_target(x0, t, noise)
        mse = _mean_flat((target - prediction) ** 2)
        if var_values is None:
            return {"loss": mse, "mse": mse}
        # The bound trains only the variance: the mean already gets the MSE gradient.
        frozen_output = torch.cat([prediction.detach(), var_values], dim=1)
        vb = self._variational_bound_bits(frozen_output, x0, x_t, t) * (self.num_timesteps / 1000)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _variational_bound_bits(self, model_output, x0, x_t, t) -> torch.Tensor:
        """One term of the bound, (B,) bits per dimension: KL at t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        step = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, step.mean, step.log_variance)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, step.mean, 0.5 * step.log_variance)
        return torch.where(t == 0, _mean_flat(decoder_nll), _mean_flat(kl)) / math.log(2)

    # ---- sampling --------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, model_fn, noise, method: str, steps: int, *, eta: float = 0.0,
               order: int = 2, skip_type: str = "time_uniform", generator=None,
               clip_denoised: bool = False, progress: bool = False) -> torch.Tensor:
        """Draw x0 (B, C, H, W) from initial noise (B, C, H, W) with `steps` model calls.

        model_fn(x, t): x (B, C, H, W), t (B,) float32 timesteps on this diffusion's
        original scale; returns (B, C, H, W) epsilon or v (as `self.prediction`), or
        (B, 2C, H, W) with the variance values, which only "ddpm" uses.
        method: "ddpm" (ancestral, respaced to `steps`), "ddim" (`eta` 0 is deterministic)
        or "dpm++" (DPM-Solver++ multistep, `order` 1 or 2, `skip_type` "time_uniform" or
        "logSNR"). `generator` drives the noise added by ddpm and by ddim with eta > 0: one
        torch.Generator (on noise's device) for the batch, or a list of CPU generators, one
        per sample, so that a sample's noise does not depend on its batch mates.
        clip_denoised clamps the x0 estimates to [-1, 1] (pixel-space models).
        """
        if method == "ddpm":
            return ddpm_sample(self, model_fn, noise, steps, generator, clip_denoised, progress)
        if method == "ddim":
            return ddim_sample(self, model_fn, noise, steps, eta, generator, clip_denoised,
                               progress)
        if method == "dpm++":
            return dpm_solver_pp_sample(self, model_fn, noise, steps, order, skip_type,
                                        clip_denoised, progress)
        raise ValueError(f"unknown sampling method {method!r}; use one of {SAMPLING_METHODS}")


# ---------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------

def _model_time(timestep: float, x: torch.Tensor) -> torch.Tensor:
    """The timestep as the (B,) float32 tensor a model_fn receives."""
    return torch.full((x.shape[0],), float(timestep), device=x.device, dtype=torch.float32)


def _gaussian_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise like x, from one generator, or row i from generator[i] (CPU)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn(x.shape[1:], generator=g) for g in generator]
        return torch.stack(rows).to(x.device, x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _progress(steps, enabled: bool):
    return tqdm(steps, leave=False) if enabled else steps


def ddpm_sample(diffusion, model_fn, noise, steps, generator=None, clip_denoised=False,
                progress=False) -> torch.Tensor:
    """Ancestral sampling through `steps` respaced timesteps. noise, result: (B, C, H, W)."""
    spaced = diffusion.respaced(steps)
    x = noise
    for i in _progress(reversed(range(steps)), progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        output = model_fn(x, _model_time(spaced.timestep_map[i], x))
        step = spaced.p_mean_variance(output, x, t, clip_denoised)
        x = step.mean
        if i > 0:  # the last step returns the mean, as DDPM does
            x = x + torch.exp(0.5 * step.log_variance) * _gaussian_like(x, generator)
    return x


def ddim_sample(diffusion, model_fn, noise, steps, eta=0.0, generator=None,
                clip_denoised=False, progress=False) -> torch.Tensor:
    """DDIM through `steps` spaced timesteps; eta scales the added noise (0: deterministic).

    noise, result: (B, C, H, W). Variance channels of the model output are ignored.
    """
    timesteps = spaced_timesteps(diffusion.num_timesteps, steps)
    abar = diffusion.alphas_cumprod
    x = noise
    for i in _progress(reversed(range(steps)), progress):
        abar_t = abar[timesteps[i]].item()
        abar_prev = abar[timesteps[i - 1]].item() if i > 0 else 1.0
        output = model_fn(x, _model_time(diffusion.timestep_map[timesteps[i]], x))
        prediction, _ = _split_output(output, x.shape[1])
        x0, eps = diffusion.x0_and_eps(prediction, x, math.sqrt(abar_t), math.sqrt(1 - abar_t))
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * _gaussian_like(x, generator)
    return x


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f through (xp, fp), xp increasing; the end pieces extend outward."""
    right = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    left = right - 1
    slope = (fp[right] - fp[left]) / (xp[right] - xp[left])
    return fp[left] + slope * (x - xp[left])


class DiscreteVPSchedule:
    """DPM-Solver's continuous-time view of a discrete schedule of N steps.

    Step n sits at time t = (n + 1) / N in (0, 1]; log alpha_t = 0.5 log(abar) is
    piecewise linear in t. alpha_t, sigma_t = sqrt(1 - alpha_t^2) and the half-logSNR
    lambda_t = log(alpha_t / sigma_t) are float64 tensors shaped like t.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.num_steps = len(alphas_cumprod)
        self.t_array = torch.linspace(0, 1, self.num_steps + 1, dtype=torch.float64)[1:]
        self.log_alpha_array = 0.5 * torch.log(alphas_cumprod.to(torch.float64))

    def log_alpha(self, t):
        return _interpolate(t, self.t_array, self.log_alpha_array)

    def sigma(self, t):
        return torch.sqrt(1 - torch.exp(2 * self.log_alpha(t)))

    def half_log_snr(self, t):
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1 - torch.exp(2 * log_alpha))

    def inverse_half_log_snr(self, lam):
        """The time t whose half-logSNR is lam."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        return _interpolate(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))

    def time_steps(self, steps: int, skip_type: str) -> torch.Tensor:
        """steps + 1 times from t = 1 down to t = 1/N, uniform in t or in logSNR."""
        t_end = 1.0 / self.num_steps
        if skip_type == "time_uniform":
            return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)
        if skip_type == "logSNR":
            ends = self.half_log_snr(torch.tensor([1.0, t_end], dtype=torch.float64))
            return self.inverse_half_log_snr(
                torch.linspace(ends[0].item(), ends[1].item(), steps + 1, dtype=torch.float64))
        raise ValueError(f"unknown skip_type {skip_type!r}; use one of {SKIP_TYPES}")

    def model_time(self, t: float) -> float:
        """The network's timestep for time t: (t - 1/N) * N, i.e. the discrete step index
        (the reference's (t - 1/N) * 1000 for its 1000-step schedules)."""
        return (t - 1.0 / self.num_steps) * self.num_steps


def dpm_solver_pp_sample(diffusion, model_fn, noise, steps, order=2, skip_type="time_uniform",
                         clip_denoised=False, progress=False) -> torch.Tensor:
    """DPM-Solver++ multistep (data prediction) from t = 1 to t = 1/N in `steps` model calls.

    order 2 is "2M": each step extrapolates the x0 estimate from the last two; the first
    step, and the last one when steps < 10 (as the reference does), are first order.
    Returns the sample at t = 1/N, as the reference does (no extra denoising step).
    noise, result: (B, C, H, W). Variance channels of the model output are ignored.
    """
    if order not in (1, 2):
        raise ValueError(f"order={order} is not supported; use 1 or 2")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    schedule = DiscreteVPSchedule(diffusion.alphas_cumprod)
    times = schedule.time_steps(steps, skip_type)
    lambdas = schedule.half_log_snr(times).tolist()
    alphas = torch.exp(schedule.log_alpha(times)).tolist()
    sigmas = schedule.sigma(times).tolist()
    x, previous_x0 = noise, None
    for i in _progress(range(steps), progress):
        output = model_fn(x, _model_time(schedule.model_time(times[i].item()), x))
        prediction, _ = _split_output(output, x.shape[1])
        x0, _ = diffusion.x0_and_eps(prediction, x, alphas[i], sigmas[i])
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        h = lambdas[i + 1] - lambdas[i]
        second_order = order == 2 and i > 0 and not (steps < 10 and i == steps - 1)
        data_estimate = x0
        if second_order:
            r = (lambdas[i] - lambdas[i - 1]) / h
            data_estimate = x0 + (x0 - previous_x0) / (2 * r)
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * math.expm1(-h) * data_estimate
        previous_x0 = x0
    return x


# ---------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------

def guided_model_fn(model, cfg_scale: float = 1.0, **cond):
    """Turn a conditional backbone into the model_fn(x, t) the samplers call.

    model: a LumosDiT (dit.py) or a module with the same interface, called as
    model(x, t, **cond) or, for cfg_scale != 1,
    model.forward_with_cfg(x, t, cfg_scale=cfg_scale, **cond), which runs the conditional
    and null halves in one batch and guides the epsilon channels only:
    eps_u + cfg_scale * (eps_c - eps_u). cond: the model's condition arguments, e.g.
    y (B, L, cond_dim) and mask (B, L) or None.
    The returned function maps x (B, C, H, W), t (B,) to (B, C_out, H, W).
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, **cond)
    return lambda x, t: model.forward_with_cfg(x, t, cfg_scale=cfg_scale, **cond)


# ---------------------------------------------------------------------------------------
# Drawing samples
# ---------------------------------------------------------------------------------------

def sample_generator(seed, index):
    """A CPU generator seeded by (seed, index) through SeedSequence: one per training sample (its
    global index) and one per generated image (its index in a grid or a sample.py run)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


@torch.no_grad()
def draw_samples(diffusion, model, cond, shape, indices, seed, method, steps, cfg_scale=1.0,
                 device="cpu", **options):
    """The one way images are drawn (training grids, NVS metrics, sample.py): x0 (B, *shape) for
    images `indices`, each from its own generator sample_generator(seed, index), which draws its
    initial noise and then all the noise ddpm (or ddim with eta > 0) adds, so an image depends
    neither on its batch mates nor on the world size. cond: the model's condition for these B
    images; options: GaussianDiffusion.sample's (skip_type, clip_denoised, eta, ...). The model's
    output is read in float32 (it may run under autocast)."""
    generators = [sample_generator(seed, index) for index in indices]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    model_fn = guided_model_fn(model, cfg_scale, **cond)
    return diffusion.sample(lambda x, t: model_fn(x, t).float(), noise, method, steps, generator=generators,
                            **options)
