"""The test suite: fast tests by default, `slow` ones (marked) also run in CI.

Offline: every checkpoint is a tiny random one written in the Hub layout into a temporary folder."""
import argparse
import functools
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time
import types
import zlib
from functools import partial
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench
import data
import dit
import encoders
import evaluate
import huggingface_hub
import numpy as np
import pytest
import sample
import sentencepiece
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import train_i2i
import train_nvs
import train_t2i
import transformers
from PIL import Image
from diffusion import GaussianDiffusion, beta_schedule, cosine_betas, guided_model_fn, linear_betas, spaced_timesteps
from dit import DiT_models, LumosDiT, build_model, forward_flops, get_2d_sincos_pos_embed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms


####################################################################################################
# dit
####################################################################################################

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
            cond_dim=12, cond_tokens=5)
POSE = dict(in_channels=8, out_channels=4, pose_dim=4)  # NVS: the target, then the source view


def tiny_model(seed=0, **overrides):
    """A tiny float64 LumosDiT with every weight random (the zero inits would hide most of the maths)."""
    torch.manual_seed(seed)
    model = LumosDiT(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model.double()


def tiny_inputs(model, batch=3, seed=1):
    """x, t, y, mask in the model's dtype, and views: source and pose for a pose model, else {}."""
    g, S, dtype = torch.Generator().manual_seed(seed), model.input_size, model.pos_embed.dtype
    channels = model.out_channels if model.pose_dim else model.in_channels
    x = torch.randn(batch, channels, S, S, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randn(batch, model.cond_tokens, model.cond_dim, generator=g, dtype=dtype)
    mask = torch.ones(batch, model.cond_tokens, dtype=torch.bool)
    mask[1, 3:] = False
    views = dict(source=torch.randn(batch, model.out_channels, S, S, generator=g, dtype=dtype),
                 pose=torch.randn(batch, model.pose_dim, generator=g, dtype=dtype)) if model.pose_dim else {}
    return x, t, y, mask, views


def reference_forward(model, x, t, y, mask):
    """SPEC section 2 restated with plain ops on the state dict, one sample at a time, so that
    cross-attention sees exactly that sample's real tokens."""
    sd = model.state_dict()
    D, H, p = model.hidden_size, model.blocks[0].attn.num_heads, model.patch_size
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)
    gelu = lambda v: F.gelu(v, approximate="tanh")

    def mha(q, k, v):  # over no keys at all (an empty condition) the result is 0
        q, k, v = (a.view(a.shape[0], H, D // H).transpose(0, 1) for a in (q, k, v))
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D // H), dim=-1)
        return (w @ v).transpose(0, 1).reshape(-1, D)

    # The sinusoid of t is float32 by design (as the release computes it), whatever the model's
    # dtype: computed here for the whole batch with the same ops, so that it is bitwise the model's.
    k = torch.arange(128, dtype=torch.float32)
    args = t.float()[:, None] * torch.exp(-math.log(10000) * k / 128)[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    outs = []
    for i in range(x.shape[0]):
        tokens = F.conv2d(x[i:i + 1], sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
        tokens = tokens.flatten(2)[0].T + sd["pos_embed"][0]
        c = lin(F.silu(lin(t_freq[i], "t_embedder.mlp.0")), "t_embedder.mlp.2")
        cond = y[i][mask[i]]
        cond = lin(gelu(lin(cond, "y_embedder.y_proj.fc1")), "y_embedder.y_proj.fc2")
        for b in range(len(model.blocks)):
            pre = f"blocks.{b}."
            s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), pre + "adaLN_modulation.1").chunk(6)
            q, kk, v = lin(ln(tokens) * (1 + sc1) + s1, pre + "attn.qkv").chunk(3, dim=-1)
            tokens = tokens + g1 * lin(mha(q, kk, v), pre + "attn.proj")
            ck, cv = lin(cond, pre + "cross_attn.kv_linear").chunk(2, dim=-1)
            tokens = tokens + lin(mha(lin(tokens, pre + "cross_attn.q_linear"), ck, cv), pre + "cross_attn.proj")
            hidden = gelu(lin(ln(tokens) * (1 + sc2) + s2, pre + "mlp.fc1"))
            tokens = tokens + g2 * lin(hidden, pre + "mlp.fc2")
        shift, scale = (sd["final_layer.scale_shift_table"] + c).chunk(2)
        out = lin(ln(tokens) * (1 + scale) + shift, "final_layer.linear")
        g, C = model.input_size // p, model.pred_channels
        # token (h, w) holds its patch as (p, q, c): undo to (c, h*p, w*p)
        outs.append(out.view(g, g, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, g * p, g * p))
    return torch.stack(outs)


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# Exactness checks run in float64: two correct computations of the same function then differ
# only by summation order, about 1e-16 per operation, far below EXACT on any CPU's kernels, and
# a real mistake (a wrong scale, a missing mask) is far above it, as are the DIFFERENT functions.
EXACT, DIFFERENT = 1e-10, 1e-3


def test_sizes_match_spec():
    with torch.device("meta"):
        i2i = DiT_models["DiT-XL/2"]()
        t2i = DiT_models["DiT-XL/2"](cond_dim=4096, cond_tokens=120)
        small = DiT_models["DiT-B/4"]()
    assert sum(p.numel() for p in i2i.parameters()) == 822_006_176
    assert sum(p.numel() for p in t2i.parameters()) == 825_840_032
    assert i2i.pos_embed.shape == (1, 256, 1152) and i2i.y_embedder.y_embedding.shape == (1, 768)
    assert abs(forward_flops(i2i) / 1e9 - 275) < 2
    assert (len(small.blocks), small.hidden_size, small.blocks[0].attn.num_heads, small.patch_size) == (12, 768, 12, 4)
    with pytest.raises(ValueError, match="unknown model 'DiT-XXL/2'"):
        build_model("DiT-XXL/2")


def test_state_dict_keys_are_the_official_ones():
    sd = LumosDiT(**TINY).state_dict()
    patterns = [r"pos_embed", r"x_embedder\.proj\.(weight|bias)", r"t_embedder\.mlp\.[02]\.(weight|bias)",
                r"y_embedder\.y_embedding", r"y_embedder\.y_proj\.fc[12]\.(weight|bias)",
                r"blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)",
                r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)\.(weight|bias)",
                r"blocks\.\d+\.mlp\.fc[12]\.(weight|bias)", r"blocks\.\d+\.adaLN_modulation\.1\.(weight|bias)",
                r"final_layer\.scale_shift_table", r"final_layer\.linear\.(weight|bias)"]
    assert all(any(re.fullmatch(p, k) for p in patterns) for k in sd), list(sd)
    assert len(sd) == 1 + 2 + 4 + 1 + 4 + TINY["depth"] * 16 + 3
    pose_sd = LumosDiT(**{**TINY, **POSE}).state_dict()  # the keys of the NVS exports made so far
    assert set(pose_sd) - set(sd) == {"pose_mixer.weight", "pose_mixer.bias"}
    assert pose_sd["pose_mixer.weight"].shape == (12, 12 + 4)


@pytest.mark.parametrize("overrides", [{}, {"learn_sigma": False, "patch_size": 4}], ids=["sigma", "no_sigma"])
def test_forward_matches_reference_with_padding_empty_and_null_conditions(overrides):
    model = tiny_model(**overrides)
    x, t, y, mask, _ = tiny_inputs(model)
    y, mask = y[:, :4], mask[:, :4]  # fewer tokens than cond_tokens: the null ones are cut to 4 too
    mask[2] = False  # sample 2: nothing but padding, so cross-attention adds only proj's bias
    drop = torch.tensor([False, True, False])  # sample 1 has padding: its null tokens are cut to match
    null = torch.where(drop[:, None, None], model.y_embedder.y_embedding[:4].expand_as(y), y)
    with torch.no_grad():
        out, dropped = model(x, t, y, mask), model(x, t, y, mask, drop_cond=drop)
        assert max_rel_err(out, reference_forward(model, x, t, y, mask)) < EXACT
        assert max_rel_err(dropped, reference_forward(model, x, t, null, mask)) < EXACT
    assert out.shape == (3, 8 if model.learn_sigma else 4, 8, 8)


@pytest.mark.parametrize("pose", [{}, POSE], ids=["i2i", "nvs"])
def test_condition_dropout_draw_comes_from_generator(pose):
    model = tiny_model(cond_dropout_prob=0.5, **pose)
    x, t, y, mask, views = tiny_inputs(model, batch=16)
    # The draw that seeded training runs rest on: the same seed must drop the same samples.
    drawn = torch.rand(16, generator=torch.Generator().manual_seed(7)) < 0.5
    with torch.no_grad():
        expected = model(x, t, y, mask, drop_cond=drawn, **views)
        model.train()
        first = model(x, t, y, mask, generator=torch.Generator().manual_seed(7), **views)
        other = model(x, t, y, mask, generator=torch.Generator().manual_seed(8), **views)
    assert max_rel_err(first, expected) < EXACT and max_rel_err(other, expected) > DIFFERENT


@pytest.mark.parametrize("pose", [{}, POSE], ids=["i2i", "nvs"])
def test_cfg_guides_epsilon_channels_only(pose):
    model = tiny_model(**pose)
    x, t, y, mask, views = tiny_inputs(model)
    with torch.no_grad():
        cond = model(x, t, y, mask, **views)
        uncond = model(x, t, y, mask, drop_cond=torch.ones(3, dtype=torch.bool), **views)
        guided = model.forward_with_cfg(x, t, y, 4.5, mask, **views)
    assert max_rel_err(guided[:, :4], uncond[:, :4] + 4.5 * (cond[:, :4] - uncond[:, :4])) < EXACT
    assert max_rel_err(guided[:, 4:], cond[:, 4:]) < EXACT


def test_pos_embed_formula_and_other_resolutions():
    D, g = 16, 4
    emb = get_2d_sincos_pos_embed(D, g, lewei_scale=2.0, base_size=2)
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    row, col = np.divmod(np.arange(g * g), g)  # token i is at (row, col) = divmod(i, g)
    x_arg, y_arg = (col / (g / 2) / 2.0)[:, None] * omega, (row / (g / 2) / 2.0)[:, None] * omega
    expected = np.concatenate([np.sin(x_arg), np.cos(x_arg), np.sin(y_arg), np.cos(y_arg)], axis=1)
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    small = tiny_model()
    big = LumosDiT(**{**TINY, "input_size": 16, "lewei_scale": 2.0}).double()
    big_pos = big.pos_embed.clone()
    big.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(big.pos_embed, big_pos) and big.pos_embed.shape == (1, 64, 32)
    assert torch.equal(big.blocks[0].mlp.fc1.weight, small.blocks[0].mlp.fc1.weight)


def test_zero_init_makes_output_zero_and_blocks_identity():
    torch.manual_seed(0)
    model = LumosDiT(**TINY)
    assert torch.count_nonzero(model(*tiny_inputs(model)[:4])) == 0
    tokens = torch.randn(3, 16, 32)
    assert torch.equal(model.blocks[0](tokens, torch.randn(3, 32), torch.randn(3, 5, 32)), tokens)


def test_grad_checkpointing_gives_same_gradients():
    model = tiny_model(cond_dropout_prob=0.0).train()
    x, t, y, mask, _ = tiny_inputs(model)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, y, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert max_rel_err(grads[1], grads[0]) < EXACT


@pytest.mark.parametrize("overrides", [{}, {"input_size": 16, "patch_size": 4, "cond_tokens": 7, "depth": 3}, POSE],
                         ids=["tiny", "patch4", "nvs"])
def test_forward_flops_match_flop_counter(overrides):
    model = tiny_model(**overrides)
    x, t, y, mask, views = tiny_inputs(model, batch=2)
    # FlopCounterMode counts nothing in the CPU flash-attention kernel; the MATH backend runs
    # attention as the matmuls it counts.
    math_attention = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with math_attention, FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y, mask, **views)
    counted = counter.get_total_flops()
    assert abs(forward_flops(model, batch_size=2) - counted) / counted < 0.02


def test_bad_inputs_name_the_argument():
    model, nvs = tiny_model(), tiny_model(**POSE)
    x, t, y, mask, views = tiny_inputs(nvs)
    source, pose = views["source"], views["pose"]
    for call, message in [(lambda: model(x[:, :3], t, y, mask), "input x has shape"),
                          (lambda: model(x, t, y[..., :5], mask), "condition y has shape"),
                          (lambda: model(x, t, y, mask[:, :2]), "mask has shape"),
                          (lambda: LumosDiT(input_size=9), "not divisible by patch_size"),
                          (lambda: nvs(x, t, y, mask, source=source[..., :4, :4], pose=pose),
                           r"source \(3, 4, 4, 4\) must match x \(3, 4, 8, 8\)"),
                          (lambda: nvs(x, t, y, mask, source=source, pose=pose[:, :3]),
                           r"pose \(3, 3\) must be \(3, 4\)"),
                          (lambda: nvs(x, t, y, mask, source=source), "needs both source and pose"),
                          (lambda: model(x, t, y, mask, **views), "has pose_dim=0"),
                          (lambda: LumosDiT(**TINY, pose_dim=4), "in_channels must be 2 x out_channels, got 4 and 4")]:
        with pytest.raises(ValueError, match=message):
            call()


def test_pose_model_at_step_zero_computes_the_i2i_function():
    i2i = tiny_model()
    # As NVS fine-tuning starts: the I2I weights, zero patch-embedding weights on the source
    # channels, and pose_mixer as initialised (the identity on the feature, zero on the pose).
    nvs = LumosDiT(**{**i2i.config, **POSE}).double().eval()
    weight = i2i.x_embedder.proj.weight
    state = {**i2i.state_dict(), "x_embedder.proj.weight": torch.cat([weight, torch.zeros_like(weight)], dim=1)}
    nvs.load_state_dict({**nvs.state_dict(), **state})
    x, t, y, mask, views = tiny_inputs(nvs, batch=8)
    drop = torch.arange(8) % 3 == 0
    close = lambda a, b: max_rel_err(a, b) < EXACT
    with torch.no_grad():
        assert close(nvs(x, t, y, mask, **views), i2i(x, t, y, mask))
        assert close(nvs(x, t, y, mask, drop, **views), i2i(x, t, y, mask, drop))
        assert close(nvs.forward_with_cfg(x, t, y, 4.5, mask, **views), i2i.forward_with_cfg(x, t, y, 4.5, mask))


def test_dropped_condition_zeroes_the_source_view_and_keeps_the_pose():
    model = tiny_model(**POSE)  # random weights, as after training: the source and the pose matter
    x, t, y, mask, views = tiny_inputs(model)
    other = tiny_inputs(model, seed=5)[4]
    null = model.y_embedder.y_embedding.expand_as(y)
    with torch.no_grad():
        dropped = model(x, t, y, mask, drop_cond=torch.ones(3, dtype=torch.bool), **views)
        no_view = model(x, t, null, mask, source=torch.zeros_like(views["source"]), pose=views["pose"])
        assert max_rel_err(dropped, no_view) < EXACT
        out = model(x, t, y, mask, **views)
        for name in ("source", "pose"):
            assert max_rel_err(model(x, t, y, mask, **{**views, name: other[name]}), out) > DIFFERENT


def test_upgrade_config_reads_earlier_configs():
    for current in (LumosDiT(**TINY).config, LumosDiT(**{**TINY, **POSE}).config):
        saved = {key: value for key, value in current.items() if key not in ("pose_dim", "cond_dropout_prob")}
        saved["class_dropout_prob"] = current["cond_dropout_prob"]  # as earlier versions saved it
        assert dit.upgrade_config(saved) == current
        upgraded = dit.upgrade_config(current)
        assert upgraded == current and upgraded is not current


####################################################################################################
# diffusion
####################################################################################################

T = 1000
REF_BETAS = np.linspace(1e-4, 0.02, T)
REF_ABAR = np.cumprod(1 - REF_BETAS)
MU, S = 0.3, 0.5  # Gaussian data N(MU, S^2) per element: unlike the N(0, 1) noise in mean and spread


def improved_ddpm_spacing(num_steps, steps):
    """improved DDPM's space_timesteps for one section, restated: a fractional stride walk."""
    return [round(p) for p in itertools.accumulate([0.0] + [(num_steps - 1) / (steps - 1)] * (steps - 1))]


def abar_at(t):
    """alphas_cumprod at model timesteps t (B,), fractional too: log sqrt(abar) linear between steps."""
    return torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(T), np.log(REF_ABAR))))


def gaussian_eps(x, t):
    """The exact epsilon predictor E[eps | x_t] for data N(MU, S^2)."""
    abar = abar_at(t).to(x.dtype).view(-1, 1, 1, 1)
    return (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * S ** 2 + 1 - abar)


def gaussian_v(x, t):
    """The exact v predictor, sqrt(abar) E[eps | x_t] - sqrt(1 - abar) E[x0 | x_t]."""
    abar, eps = abar_at(t).to(x.dtype).view(-1, 1, 1, 1), gaussian_eps(x, t)
    return abar.sqrt() * eps - (1 - abar).sqrt() * (x - (1 - abar).sqrt() * eps) / abar.sqrt()


def exact_ode_solution(noise, abar_end):
    """Where the probability-flow ODE takes x_T = noise: (x - sqrt(abar) MU) / sqrt(abar S^2 + 1 - abar) is constant."""
    start, end = (math.sqrt(a * S ** 2 + 1 - a) for a in (REF_ABAR[-1], abar_end))
    return math.sqrt(abar_end) * MU + (noise - math.sqrt(REF_ABAR[-1]) * MU) / start * end


def seeded_noise(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def assert_raises(error, match, call):
    with pytest.raises(error, match=match):
        call()


def diffusion(prediction="epsilon"):
    return GaussianDiffusion(linear_betas(T), prediction)


def test_beta_schedules_follow_their_specs():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and torch.equal(beta_schedule("linear", 1000), betas)
    np.testing.assert_allclose(betas.numpy(), REF_BETAS, rtol=1e-12)
    np.testing.assert_allclose(linear_betas(500).numpy(), np.linspace(2e-4, 0.04, 500), rtol=1e-12)
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    cosine = cosine_betas(1000)
    assert cosine.dtype == torch.float64 and cosine.max().item() == 0.999  # the last step is capped
    np.testing.assert_allclose(cosine.numpy(), np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-12)
    assert_raises(ValueError, "'linear' or 'cosine'", lambda: beta_schedule("quadratic"))


def test_respacing_keeps_improved_ddpm_steps_and_their_alphas_cumprod():
    for steps in (2, 50, 250, 1000):
        kept = spaced_timesteps(1000, steps)
        assert kept == improved_ddpm_spacing(1000, steps) and kept[-1] == 999 and len(set(kept)) == steps
    spaced = diffusion().respaced(250)
    assert spaced.num_timesteps == 250 and spaced.timestep_map.tolist() == improved_ddpm_spacing(1000, 250)
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), REF_ABAR[spaced.timestep_map.numpy()], rtol=1e-12)
    assert_raises(ValueError, "steps=1001", lambda: spaced_timesteps(1000, 1001))


def test_q_sample_and_posterior_match_bayes_rule():
    base = diffusion().respaced(250)  # a respaced chain: the posterior must use its own betas
    abar = base.alphas_cumprod.numpy()
    g = torch.Generator().manual_seed(0)
    x0, noise, x_t = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 120, 249])
    a = torch.from_numpy(abar)[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(base.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    mean, variance, log_variance = base.q_posterior(x0, x_t, t)
    # At t = 0, x_{-1} is x0 itself: no variance, the log clipped to the next step's.
    torch.testing.assert_close(mean[0], x0[0])
    assert variance[0].item() == 0 and log_variance[0].item() == log_variance[1].item()
    # q(x_{t-1} | x_t, x0) ∝ N(x_{t-1}; sqrt(abar_prev) x0, 1 - abar_prev) N(x_t; sqrt(alpha) x_{t-1}, 1 - alpha)
    abar_prev = torch.from_numpy(abar[t[1:] - 1]).view(-1, 1, 1, 1)
    alpha = a[1:] / abar_prev
    precision = 1 / (1 - abar_prev) + alpha / (1 - alpha)
    expected_mean = (abar_prev.sqrt() * x0[1:] / (1 - abar_prev) + alpha.sqrt() * x_t[1:] / (1 - alpha)) / precision
    torch.testing.assert_close(mean[1:], expected_mean)
    torch.testing.assert_close(variance[1:].flatten(), 1 / precision.flatten(), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_variance[1:].flatten(), -precision.log().flatten(), rtol=1e-12, atol=0)


def fixed_output(output, calls=None):
    """A model that returns `output`, appending its calls to `calls`."""
    return lambda x, t, **kwargs: (calls if calls is not None else []).append((x, t, kwargs)) or output


def reference_vb_bits(betas, x0, x_t, t, eps, v):
    """improved DDPM's VB term in bits per dimension per sample, restated in numpy (float64 arrays, t (B,))."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_var = betas * (1 - abar_prev) / (1 - abar)
    at = lambda values: values[t].reshape(-1, 1, 1, 1)  # noqa: E731
    min_log, max_log = at(np.log(np.append(posterior_var[1], posterior_var[1:]))), at(np.log(betas))  # clipped at 0

    def posterior_mean(x_start):
        coef_x0, coef_xt = np.sqrt(abar_prev) * betas, np.sqrt(1 - betas) * (1 - abar_prev)
        return (at(coef_x0) * x_start + at(coef_xt) * x_t) / at(1 - abar)

    model_mean = posterior_mean((x_t - at(np.sqrt(1 - abar)) * eps) / at(np.sqrt(abar)))
    model_log_var = (v + 1) / 2 * max_log + (1 - v) / 2 * min_log
    kl = 0.5 * (-1 + model_log_var - min_log + np.exp(min_log - model_log_var)
                + (posterior_mean(x0) - model_mean) ** 2 * np.exp(-model_log_var))
    # At t = 0 the decoder NLL: the probability of x0's bin of width 2/255, open-ended at -1 and 1.
    cdf = lambda y: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))  # noqa: E731
    inv_std = np.exp(-0.5 * model_log_var)
    upper = np.where(x0 > 0.999, 1.0, cdf(inv_std * (x0 - model_mean + 1 / 255)))
    lower = np.where(x0 < -0.999, 0.0, cdf(inv_std * (x0 - model_mean - 1 / 255)))
    with np.errstate(divide="ignore"):  # the NLL of late steps underflows; only t = 0 uses it
        terms = np.where((t == 0).reshape(-1, 1, 1, 1), -np.log(upper - lower), kl)
    return terms.mean(axis=(1, 2, 3)) / math.log(2)


@pytest.mark.parametrize("num_steps", [1000, 500])
def test_hybrid_loss_matches_improved_ddpm_formula(num_steps):
    betas = np.linspace(1e-4, 0.02, num_steps) * 1000 / num_steps
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2.2 - 1.1
    x0[0, 0, 0, :] = torch.tensor([-1.0, 1.0, 0.9995])  # the open-ended edge bins at t = 0
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, num_steps // 2, num_steps - 1])
    eps = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    calls = []
    model = fixed_output(torch.cat([eps, v], dim=1), calls)
    terms = GaussianDiffusion(linear_betas(num_steps)).training_losses(model, x0, t, {"y": "cond"}, noise)
    (x_t, model_t, kwargs), = calls
    abar = torch.from_numpy(np.cumprod(1 - betas))[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert model_t.dtype == torch.float32 and model_t.tolist() == t.tolist() and kwargs == {"y": "cond"}
    expected_mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    expected_vb = torch.from_numpy(reference_vb_bits(betas, *(a.numpy() for a in (x0, x_t, t, eps, v))))
    expected_vb *= num_steps / 1000
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["mse"], expected_mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["vb"], expected_vb, rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["loss"], expected_mse + expected_vb, rtol=1e-9, atol=0)


def test_vb_term_trains_only_the_variance_and_mse_only_the_mean():
    output = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    x0 = torch.rand(3, 2, 2, 2, dtype=torch.float64) * 2 - 1
    for term, trained in (("vb", slice(2, None)), ("mse", slice(None, 2))):
        output.grad = None
        diffusion().training_losses(fixed_output(output), x0, torch.tensor([0, 5, 700]))[term].sum().backward()
        untrained = output.grad.clone()
        untrained[:, trained] = 0
        assert output.grad[:, trained].abs().min() > 0 and untrained.abs().max() == 0


def test_mse_and_v_prediction_losses():
    g = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 400, 999])
    eps_terms = diffusion().training_losses(fixed_output(output), x0, t, noise=noise)
    assert set(eps_terms) == {"loss", "mse"}  # C output channels: no learned variance, no bound
    torch.testing.assert_close(eps_terms["loss"], ((noise - output) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    assert torch.equal(eps_terms["loss"], eps_terms["mse"])
    v_terms = diffusion("v").training_losses(fixed_output(output), x0, t, noise=noise)
    abar = torch.from_numpy(REF_ABAR)[t].view(-1, 1, 1, 1)
    v_target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(v_terms["loss"], ((v_target - output) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(v_terms["loss"], v_terms["mse"])


def test_bad_arguments_raise_clear_errors():
    noise = torch.zeros(2, 4, 2, 2)
    assert_raises(ValueError, "prediction", lambda: GaussianDiffusion(linear_betas(), prediction="x0"))
    assert_raises(ValueError, "betas", lambda: GaussianDiffusion(torch.tensor([0.1, 1.5])))
    assert_raises(ValueError, "returned 3 channels; expected 4", lambda: diffusion().training_losses(
        fixed_output(noise[:, :3]), noise, torch.tensor([1, 2])))
    assert_raises(ValueError, "method 'euler'", lambda: diffusion().sample(gaussian_eps, noise, "euler", 10))
    assert_raises(ValueError, "skip_type", lambda: diffusion().sample(gaussian_eps, noise, "dpm++", 10, skip_type="x"))
    assert_raises(ValueError, "order=3", lambda: diffusion().sample(gaussian_eps, noise, "dpm++", 10, order=3))


def exact_variance_model(steps):
    """ddpm's model_fn: exact epsilon, and the v giving the true reverse variance (posterior variance plus
    coef1^2 Var[x0 | x_t], inside the learned range for S < 1); with it ancestral sampling is exact."""
    kept = improved_ddpm_spacing(T, steps)
    abar = REF_ABAR[kept]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev
    posterior_var = beta * (1 - abar_prev) / (1 - abar)
    x0_var = S ** 2 * (1 - abar) / (abar * S ** 2 + 1 - abar)
    true_var = posterior_var + (beta * np.sqrt(abar_prev) / (1 - abar)) ** 2 * x0_var
    min_log = np.log(np.append(posterior_var[1], posterior_var[1:]))
    v_at = dict(zip(kept, 2 * (np.log(true_var) - min_log) / (np.log(beta) - min_log) - 1))

    def model_fn(x, t):
        v_t = torch.tensor([v_at[int(step)] for step in t], dtype=x.dtype).view(-1, 1, 1, 1)
        return torch.cat([gaussian_eps(x, t), v_t.expand_as(x)], dim=1)

    return model_fn


@pytest.mark.slow
@pytest.mark.parametrize("exact_variance, expected_std", [(True, S), (False, S - 0.014)])
def test_ddpm_samples_have_the_data_moments(exact_variance, expected_std):
    # The fixed posterior variance (C channels) leaves out coef1^2 Var[x0 | x_t] at each step; propagating
    # N(mean, var) through the 250 affine steps puts the std 0.014 low. With the true variance the chain is exact.
    n, model_fn = 16384, exact_variance_model(250) if exact_variance else gaussian_eps
    samples = diffusion().sample(model_fn, seeded_noise(n // 64, 1, 8, 8), "ddpm", 250,
                                 generator=torch.Generator().manual_seed(1))
    assert abs(samples.mean().item() - MU) < 4 * S / math.sqrt(n)  # 4 standard errors of the mean
    assert abs(samples.std().item() - expected_std) < 4 * S / math.sqrt(2 * n)  # and of the std


# Per-sample max error at 80 steps, float64 (no CPU dependence): measured 0.056, 0.055, 0.047, 0.034, 0.0014; 1.5x.
@pytest.mark.parametrize("method, options, order, max_error", [
    ("ddim", {}, 1, 0.084),
    ("dpm++", {"order": 1, "skip_type": "time_uniform"}, 1, 0.082),
    ("dpm++", {"order": 1, "skip_type": "logSNR"}, 1, 0.07),
    ("dpm++", {"order": 2, "skip_type": "time_uniform"}, 2, 0.051),  # Lumos' setting
    ("dpm++", {"order": 2, "skip_type": "logSNR"}, 2, 0.0021),
])
def test_solvers_converge_to_the_exact_ode_solution_at_their_order(method, options, order, max_error):
    noise = seeded_noise(16, 1, 4, 4, dtype=torch.float64)
    target = exact_ode_solution(noise, REF_ABAR[0] if method == "dpm++" else 1.0)  # dpm++ stops at t = 1/N
    errors = [(diffusion().sample(gaussian_eps, noise, method, steps, **options) - target).abs().max().item()
              for steps in (40, 80)]
    # Doubling the steps divides the error by 2^order: measured 1.97-1.98 (first order), 3.7-3.9 (second).
    assert 0.85 * 2 ** order < errors[0] / errors[1] < 1.1 * 2 ** order and errors[1] < max_error


def test_v_model_samples_like_the_epsilon_model():
    noise = seeded_noise(8, 2, 4, 4, dtype=torch.float64)
    for method, options in [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm++", {}), ("ddpm", {})]:
        eps_samples, v_samples = (diffusion(prediction).sample(model_fn, noise, method, 20, **options,
                                                               generator=torch.Generator().manual_seed(1))
                                  for prediction, model_fn in (("epsilon", gaussian_eps), ("v", gaussian_v)))
        # float64 round-off, amplified by the division by sqrt(abar) = 0.006 at the first step
        torch.testing.assert_close(v_samples, eps_samples, rtol=1e-7, atol=1e-7)


def recording(model_fn=gaussian_eps):
    """model_fn, recording its inputs and timesteps in .inputs and .times."""
    def record(x, t):
        record.inputs.append(x.clone())
        record.times.append(t.clone())
        return model_fn(x, t)
    record.inputs, record.times = [], []
    return record


def test_samplers_hand_model_fn_original_scale_float_times():
    noise = torch.randn(3, 1, 2, 2)
    for method, steps, options, expected in [
        ("ddpm", 250, {}, improved_ddpm_spacing(T, 250)[::-1]),
        ("ddim", 50, {}, improved_ddpm_spacing(T, 50)[::-1]),
        # DPM-Solver's time from 1 to 1/N, the network seeing (t - 1/N) * 1000; the last point needs no call.
        ("dpm++", 20, {}, (np.linspace(1, 1 / T, 21)[:20] - 1 / T) * 1000),
        ("dpm++", 20, {"skip_type": "logSNR"}, None),  # even steps in lambda = log(sqrt(abar / (1 - abar)))
    ]:
        model = recording()
        diffusion().sample(model, noise, method, steps, **options)
        assert all(t.dtype == torch.float32 and t.shape == (3,) and bool((t == t[0]).all()) for t in model.times)
        times = [t[0].item() for t in model.times]
        if expected is not None:
            np.testing.assert_allclose(times, expected, atol=1e-4)
            continue
        assert times[0] == 999.0 and all(a > b for a, b in zip(times, times[1:]))
        abar = abar_at(torch.tensor(times + [0.0])).numpy()
        lam = 0.5 * np.log(abar / (1 - abar))
        np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 20, rtol=1e-3)


@pytest.mark.parametrize("steps, last_order", [(9, 1), (10, 2)])
def test_dpm_solver_last_step_is_first_order_below_10_steps(steps, last_order):
    model = recording()
    result = diffusion().sample(model, seeded_noise(2, 1, 4, 4, dtype=torch.float64), "dpm++", steps)
    # The last step to t = 1/N, restated from DPM-Solver++: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D,
    # D the x0 estimate at s (first order) or extrapolated from the one before (2M); h, r in half-logSNR.
    abar = abar_at(torch.from_numpy((np.linspace(1, 1 / T, steps + 1)[-3:] - 1 / T) * 1000))
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha / sigma)
    x0_before, x0_last = ((x - sigma[i] * gaussian_eps(x, t)) / alpha[i]
                          for i, (x, t) in enumerate(zip(model.inputs[-2:], model.times[-2:])))
    h = (lam[2] - lam[1]).item()
    r = (lam[1] - lam[0]).item() / h
    estimate = x0_last + (x0_last - x0_before) / (2 * r) if last_order == 2 else x0_last
    expected = sigma[2] / sigma[1] * model.inputs[-1] - alpha[2] * math.expm1(-h) * estimate
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)


def test_variance_channels_are_used_by_ddpm_only():
    noise = seeded_noise(4, 1, 4, 4)
    with_variance = lambda v: lambda x, t: torch.cat([gaussian_eps(x, t), torch.full_like(x, v)], dim=1)  # noqa: E731
    for method in ("ddim", "dpm++"):
        assert torch.equal(diffusion().sample(with_variance(0.5), noise, method, 10),
                           diffusion().sample(gaussian_eps, noise, method, 10))
    draws = [diffusion().sample(model_fn, noise, "ddpm", 10, generator=torch.Generator().manual_seed(1))
             for model_fn in (with_variance(-1.0), gaussian_eps, with_variance(1.0))]
    assert torch.equal(draws[0], draws[1]) and not torch.allclose(draws[1], draws[2])  # v = -1: posterior variance


def test_ddim_with_eta_one_is_ddpm_with_the_posterior_variance():
    # DDIM's noise is then the posterior variance and its mean the posterior mean at the model's x0: the same
    # chain as ddpm with C channels, drawing the same noise from the same generator in turn.
    ddim, ddpm = (diffusion().sample(gaussian_eps, seeded_noise(4, 1, 4, 4, dtype=torch.float64), method, 25,
                                     generator=torch.Generator().manual_seed(1), **options)
                  for method, options in (("ddim", {"eta": 1.0}), ("ddpm", {})))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-12, atol=1e-12)


def test_samples_keep_the_noise_dtype():
    for dtype, method in itertools.product((torch.float32, torch.float64, torch.bfloat16), ("ddpm", "ddim", "dpm++")):
        assert diffusion().sample(gaussian_eps, torch.randn(2, 1, 4, 4).to(dtype), method, 10).dtype == dtype


def test_clip_denoised_holds_the_x0_estimates_in_range():
    # The x0 estimate of this model is far above 1 at every step (for noise > -5). Clipped, every sampler sees
    # x0 = 1 throughout: ddpm and ddim end on it, and the ODE samplers, with epsilon re-derived from the
    # clipped x0, keep x = sqrt(abar) + sqrt(1 - abar) z exactly.
    wild = lambda x, t: -5 * torch.ones_like(x)  # noqa: E731
    noise = seeded_noise(2, 1, 4, 4, dtype=torch.float64)
    on_track = lambda abar: math.sqrt(abar) + math.sqrt(1 - abar) * (  # noqa: E731
        noise - math.sqrt(REF_ABAR[-1])) / math.sqrt(1 - REF_ABAR[-1])
    for method in ("ddpm", "ddim"):
        assert diffusion().sample(wild, noise, method, 10).abs().max() > 5
        torch.testing.assert_close(diffusion().sample(wild, noise, method, 10, clip_denoised=True),
                                   torch.ones_like(noise))
    model = recording(wild)
    diffusion().sample(model, noise, "ddim", 10, clip_denoised=True)
    for x, t in zip(model.inputs, model.times):
        torch.testing.assert_close(x, on_track(REF_ABAR[int(t[0])]))
    torch.testing.assert_close(diffusion().sample(wild, noise, "dpm++", 10, clip_denoised=True), on_track(REF_ABAR[0]))


def test_guided_model_fn_calls_forward_with_cfg_unless_the_scale_is_one():
    # forward_with_cfg itself is checked in the dit section; this checks the routing of the condition.
    model = perturb_(LumosDiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                              cond_dim=5, cond_tokens=3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 3, 5, generator=g)
    t, mask = torch.tensor([10.0, 500.0]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        guided = guided_model_fn(model, 4.5, y=y, mask=mask)(x, t)
        assert torch.equal(guided, model.forward_with_cfg(x, t, y, 4.5, mask))
        assert torch.equal(guided_model_fn(model, y=y, mask=mask)(x, t), model(x, t, y, mask))
        assert not torch.allclose(guided, model(x, t, y, mask)) and not torch.allclose(guided, model(x, t, y))


####################################################################################################
# encoders
####################################################################################################

def assert_close_to_scale(actual, expected, tolerance=1e-4):
    """max |actual - expected| <= tolerance * max |expected|. The default: fp32 modules against a reference library
    sum in other orders, ~1e-6 relative per layer on any CPU; a wrong weight, scale or mask is off by > 1e-2."""
    actual, expected = (torch.as_tensor(a).detach().double() for a in (actual, expected))
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= tolerance * scale, f"max abs error {error:.3g} vs output scale {scale:.3g}"


def perturb_(model, seed=0):
    """Move every parameter off its initial value (ones, zeros), so a swapped or ignored tensor shows up."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_vit(folder, width=32, layer_norm_eps=1e-12):
    """A random transformers ViTModel (DINO v1 architecture, with its pooler) saved in the Hub layout."""
    torch.manual_seed(0)
    reference = perturb_(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=3 * width, image_size=32,
        patch_size=8, layer_norm_eps=layer_norm_eps)))
    reference.save_pretrained(folder)
    return reference


def to_original_dino_layout(hub):
    """Hub ViTModel keys -> the original DINO names, as in dino_vitbase16_pretrain.pth."""
    original = {"cls_token": hub["embeddings.cls_token"], "pos_embed": hub["embeddings.position_embeddings"]}
    renames = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    for param in ("weight", "bias"):
        original[f"patch_embed.proj.{param}"] = hub[f"embeddings.patch_embeddings.projection.{param}"]
        original[f"norm.{param}"] = hub[f"layernorm.{param}"]
        for i in range(2):
            for hub_name, our_name in renames.items():
                original[f"blocks.{i}.{our_name}.{param}"] = hub[f"encoder.layer.{i}.{hub_name}.{param}"]
            original[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(
                [hub[f"encoder.layer.{i}.attention.attention.{name}.{param}"] for name in ("query", "key", "value")])
    return original


@pytest.mark.parametrize("layout", ["hub", "hub-shards", "original", "original-folder"])
def test_dino_matches_transformers_vit(tmp_path, layout):
    # The original checkpoint has no config: 64-wide heads and eps 1e-6; the Hub one's config.json says 1e-12.
    eps = 1e-6 if layout.startswith("original") else 1e-12
    reference = tiny_vit(tmp_path, width=128, layer_norm_eps=eps)
    state = load_file(tmp_path / "model.safetensors")
    source = tmp_path
    if layout != "hub":
        (tmp_path / "model.safetensors").unlink()
    if layout == "hub-shards":  # only the pooler, which is not kept, is in shard 2: it must never be opened
        names = {key: f"model-0000{2 if key.startswith('pooler.') else 1}-of-00002.safetensors" for key in state}
        first = "model-00001-of-00002.safetensors"
        save_file({key: state[key] for key in state if names[key] == first}, tmp_path / first)
        (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    elif layout.startswith("original"):
        (tmp_path / "config.json").unlink()
        source = tmp_path / "dino_vitbase16_pretrain.pth"
        torch.save({f"module.{key}": tensor for key, tensor in to_original_dino_layout(state).items()}, source)
    model = encoders.DINOEncoder.from_pretrained(tmp_path if layout == "original-folder" else source)
    assert model.norm.eps == eps and not any(param.requires_grad for param in model.parameters())
    torch.manual_seed(1)
    for height, width in ((32, 32), (48, 40)):  # native grid, then interpolated positions
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected = reference(pixels, interpolate_pos_encoding=True).last_hidden_state
        assert model(pixels).shape == (2, 1 + (height // 8) * (width // 8), 128)
        assert_close_to_scale(model(pixels), expected)


def test_dinov2_matches_transformers(tmp_path):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                                       patch_size=4)
    reference = perturb_(transformers.Dinov2Model(config))
    reference.save_pretrained(tmp_path)
    # The .bin path: the same Hub-layout tensors (mask token included) as a pickled state dict.
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    model = encoders.DINOEncoder.from_pretrained(tmp_path)
    assert isinstance(model.blocks[0].ls1, encoders.LayerScale)
    torch.manual_seed(1)
    for height, width in ((16, 16), (24, 20)):  # native grid, then interpolated positions
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            assert_close_to_scale(model(pixels), reference(pixels).last_hidden_state)


def test_dino_encode_preprocessing(tmp_path):
    tiny_vit(tmp_path)
    model = encoders.DINOEncoder.from_pretrained(tmp_path)
    normalize = transforms.Normalize(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    torch.manual_seed(0)
    # Shorter side already native (32): no resize, a center crop of columns 8..40.
    images = torch.rand(3, 3, 32, 48) * 2 - 1
    features = model.encode(images)
    assert features.shape == (3, 32) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(3))
    assert_close_to_scale(features, F.normalize(model(normalize((images[..., 8:40] + 1) / 2))[:, 0], dim=-1), 1e-5)
    # Larger image: agrees with DINO's demo pipeline on a PIL image (PIL's resize differs slightly).
    pixels = (F.interpolate(torch.rand(1, 3, 12, 18), size=(96, 144), mode="bilinear")[0] * 255).round().byte()
    demo = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(), normalize])
    expected = F.normalize(model(demo(Image.fromarray(pixels.permute(1, 2, 0).numpy()))[None])[:, 0], dim=-1)
    features = model.encode(pixels[None].float() / 127.5 - 1)
    assert (features - expected).abs().max() < 0.02
    # bf16 rounds to 8 significant bits (0.4%) at each op; through 2 blocks, well within 0.05 of unit features.
    assert (model.to(torch.bfloat16).encode(pixels[None].float() / 127.5 - 1) - features).abs().max() < 0.05


@pytest.mark.parametrize("attention_names", ["current", "old"])
def test_vae_matches_diffusers(tmp_path, attention_names):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = perturb_(AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    reference.save_pretrained(tmp_path)
    if attention_names == "old":  # query / key / value / proj_attn, as older diffusers saved them
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        state = {}
        for key, tensor in load_file(path).items():
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            state[key] = tensor
        assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
        save_file(state, path)
    model = encoders.VAE.from_pretrained(tmp_path)
    assert model.scaling_factor == 0.18215
    assert len(model.decoder.up_blocks[0].resnets) == 3  # layers_per_block + 1 in the decoder
    torch.manual_seed(1)
    images, latents = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        posterior, expected_images = reference.encode(images).latent_dist, reference.decode(latents).sample
    mean, std = model.encode(images)
    assert_close_to_scale(mean, posterior.mean)
    assert_close_to_scale(std, posterior.std)
    assert_close_to_scale(model.decode(latents, chunk_size=2), expected_images)
    in_bf16 = model.to(torch.bfloat16).decode(latents)
    assert in_bf16.dtype == torch.bfloat16
    assert_close_to_scale(in_bf16, expected_images, 0.05)  # bf16: 8 significant bits (0.4%) per op


def test_vae_posterior_std_clamps_log_variance():
    model = encoders.VAE(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)
    with torch.no_grad():  # quant_conv output = 100 for mean and log-variance alike
        model.quant_conv.weight.zero_()
        model.quant_conv.bias.fill_(100.0)
    mean, std = model.encode(torch.zeros(1, 3, 8, 8))
    assert torch.all(mean == 100.0) and torch.allclose(std, torch.full_like(std, np.exp(10.0)))  # clamped to 20


def test_loading_finds_files_and_errors_name_the_problem(tmp_path, monkeypatch):
    assert encoders.locate(tmp_path, "config.json") is None and encoders.read_config(tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="none of model.safetensors, pytorch_model.bin found"):
        encoders.load_state_dict(tmp_path, ["model.safetensors", "pytorch_model.bin"])
    with pytest.raises(FileNotFoundError, match="not a local folder, nor a valid Hub repo id"):
        encoders.locate(str(tmp_path / "no" / "such" / "folder"), "config.json")
    torch.save({"encoder.w": torch.ones(2), "decoder.w": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    state = encoders.load_state_dict(tmp_path, ["model.safetensors", "pytorch_model.bin"],
                                     keep=lambda key: key.startswith("encoder."))
    assert list(state) == ["encoder.w"] and torch.equal(state["encoder.w"], torch.ones(2))
    # Offline, a repo not in the cache: one line naming the repo, the file and the ways out.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as error:
        encoders.VAE.from_pretrained("no-such-user/no-such-vae")
    assert "\n" not in str(error.value)
    for needed in ("no-such-user/no-such-vae", "config.json", "HF_HUB_OFFLINE", "hf download", "local folder"):
        assert needed in str(error.value)
    with pytest.raises(FileNotFoundError, match="no-such-user/no-such-dino: no model.safetensors / pytorch_model.bin"):
        encoders.DINOEncoder.from_pretrained("no-such-user/no-such-dino")
    model = encoders.DINOEncoder(image_size=16, patch_size=8, width=16, depth=1, heads=1)
    state = dict(model.state_dict(), **{"head.weight": torch.zeros(1), "cls_token": torch.zeros(1, 1, 8)})
    del state["norm.bias"]
    with pytest.raises(ValueError) as error:
        encoders.load_into(model, state, "ckpt.pth")
    assert str(error.value).startswith("ckpt.pth: checkpoint does not fit DINOEncoder")
    for needed in ("1 missing (norm.bias)", "1 unexpected (head.weight)", "cls_token (1, 1, 8) vs model (1, 1, 16)"):
        assert needed in str(error.value)
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "extra": SimpleNamespace()}, path)
    with pytest.raises(ValueError, match="dino_vitbase16_pretrain.pth: refused, not a plain tensor checkpoint"):
        encoders.DINOEncoder.from_pretrained(path)


####################################################################################################
# t5
####################################################################################################

def _tiny_t5(model_class=transformers.T5EncoderModel):
    """A random T5 v1.1 small enough for CPU tests, with T5's own bucket sizes (32, max 128)."""
    torch.manual_seed(0)
    return model_class(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)).eval()


def _padded_batch(length=140):
    """Random ids (3, length), a mask with one full row and two padded ones. 140 tokens pass max_distance=128:
    every kind of relative-position bucket is used."""
    input_ids = torch.randint(0, 64, (3, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, 100:] = 0
    mask[2, 7:] = 0
    return input_ids, mask


@pytest.mark.parametrize("layout", ["bin-shards", "safetensors-shards", "full-checkpoint", "embed_tokens"])
def test_t5_encoder_matches_transformers(tmp_path, monkeypatch, layout):
    reference = _tiny_t5()
    state = dict(reference.state_dict())
    reference.config.to_json_file(tmp_path / "config.json")
    if layout == "bin-shards":  # DeepFloyd/t5-v1_1-xxl: .bin shards and pytorch_model.bin.index.json
        keys = list(state)
        weight_map = {key: f"pytorch_model-0000{1 + 2 * i // len(keys)}-of-00002.bin" for i, key in enumerate(keys)}
        for name in set(weight_map.values()):
            torch.save({key: state[key] for key in keys if weight_map[key] == name}, tmp_path / name)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "safetensors-shards":
        reference.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    elif layout == "full-checkpoint":  # google/t5-v1_1-xxl: one .bin with encoder, decoder and lm_head
        full = _tiny_t5(transformers.T5ForConditionalGeneration).state_dict()
        torch.save(full | state, tmp_path / "pytorch_model.bin")
    else:
        state["encoder.embed_tokens.weight"] = state.pop("shared.weight").clone()
        torch.save(state, tmp_path / "pytorch_model.bin")
    loaded_keys, real_load_into = [], encoders.load_into
    monkeypatch.setattr(encoders, "load_into", lambda module, state_dict, *args, **kwargs: (
        loaded_keys.extend(state_dict), real_load_into(module, state_dict, *args, **kwargs))[1])
    model = encoders.T5Encoder.from_pretrained(tmp_path)
    assert set(loaded_keys) == set(model.state_dict())  # no decoder or lm_head tensors read in
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    input_ids, mask = _padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert model(input_ids, mask).shape == (3, 140, 32)
    assert_close_to_scale(model(input_ids, mask), expected)


def test_t5_encoder_bf16_tracks_fp32_and_fp16_is_refused(tmp_path):
    _tiny_t5().save_pretrained(tmp_path)
    fp32 = encoders.T5Encoder.from_pretrained(tmp_path)
    bf16 = encoders.T5Encoder.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    input_ids, mask = _padded_batch(length=20)
    got = bf16(input_ids, mask)
    assert got.dtype == torch.bfloat16
    assert_close_to_scale(got, fp32(input_ids, mask), 5e-2)  # bf16: 8 significant bits (0.4%) per op
    assert_raises(ValueError, "bfloat16", lambda: encoders.T5Encoder.from_pretrained(tmp_path, dtype=torch.float16))


def test_t5_encoder_load_errors_name_the_problem(tmp_path):
    reference = _tiny_t5()
    for folder in ("missing_key", "original_t5"):
        (tmp_path / folder).mkdir()
    reference.config.to_json_file(tmp_path / "missing_key" / "config.json")
    state = dict(reference.state_dict())
    del state["encoder.final_layer_norm.weight"]
    torch.save(state, tmp_path / "missing_key" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="encoder.final_layer_norm.weight"):
        encoders.T5Encoder.from_pretrained(tmp_path / "missing_key")
    (tmp_path / "original_t5" / "config.json").write_text(json.dumps({"feed_forward_proj": "relu"}))
    assert_raises(ValueError, "gated-gelu", lambda: encoders.T5Encoder.from_pretrained(tmp_path / "original_t5"))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        encoders.T5Encoder.from_pretrained(tmp_path)  # holds no weights at all
    model = encoders.T5Encoder(encoders.T5Config(vocab_size=10, d_model=8, d_kv=4, num_heads=2, d_ff=8, num_layers=1))
    assert_raises(ValueError, "vocabulary", lambda: model(torch.tensor([[3, 10]])))
    assert_raises(ValueError, "attention_mask", lambda: model(torch.tensor([[3, 4]]), torch.ones(1, 3)))


# ---- tokenizer against the sentencepiece library ---------------------------------------------

SYLLABLES = ["ka", "to", "ri", "mu", "sé", "lo", "ñe", "ba", "zü", "qi", "fa", "ço", "de", "an", "th", "er"]
ODD_WORDS = ["ＡＢＣ", "１２３", "Ｈｅｌｌｏ", "😀", "👍🏽", "ﬁne", "①", "e\u0301"]
PUNCTUATION = [",", ".", "!", "?", ";", ":", "(", ")", '"', "'", "-", "…"]


def _sentences(seed, count):
    """Made-up sentences: syllable words, numbers, punctuation, full-width forms, emoji, ligatures."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = []
        for _ in range(rng.randint(1, 14)):
            roll = rng.random()
            word = (str(rng.randint(0, 99999)) if roll < 0.1 else rng.choice(ODD_WORDS) if roll < 0.15
                    else "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
            word = word.capitalize() if rng.random() < 0.2 else word
            words.append(word + rng.choice(PUNCTUATION) if rng.random() < 0.15 else word)
        sentences.append(" ".join(words))
    return sentences


EDGE_CASES = [
    "", " ", "   ", "  leading spaces", "trailing spaces   ", "runs    of     spaces", "\t tab\nnew\r\nline",
    "ＦＵＬＬ　ｗｉｄｔｈ　１２３", "\u3000ideographic\u3000space\u3000", "漢字かな unseen", "\u200bzero\u200dwidth",
    "\x00\x01control\x7f", "ﬁ ﬂ ﬃ", "①②③ ⁵ ½", "Å Å e\u0301 é", "   😀😀   👍🏽 ", "ǅ ǈ", "ñeñe, 87999",
    "x" * 500, " ".join(_sentences(7, 40)), "<sep>ka<sep> [IMG]to", "ka  <sep>  to",
]


def _train_sentencepiece(folder, **options):
    """Train a small unigram model on made-up sentences; returns the spiece.model path."""
    settings = dict(model_type="unigram", vocab_size=300, normalization_rule_name="nmt_nfkc",
                    pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_sentences(0, 400)),
                                             model_prefix=str(folder / "spiece"), **{**settings, **options})
    return folder / "spiece.model"


@pytest.mark.parametrize("options", [
    {},  # T5's setting: nmt_nfkc through the precompiled charsmap
    {"byte_fallback": True, "user_defined_symbols": ["<sep>", "[IMG]"], "vocab_size": 400},
    {"normalization_rule_name": "nfkc_cf", "remove_extra_whitespaces": False},
    {"normalization_rule_name": "identity", "add_dummy_prefix": False, "split_digits": True},
    {"normalization_rule_name": "nfkc", "treat_whitespace_as_suffix": True},
], ids=["nmt_nfkc", "byte_fallback+user_defined", "nfkc_cf+keep_spaces", "identity+no_prefix", "suffix_space"])
def test_tokenizer_matches_sentencepiece(tmp_path, options):
    path = _train_sentencepiece(tmp_path, **options)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokenizer = encoders.T5Tokenizer.from_pretrained(path)
    texts = _sentences(1, 300) + EDGE_CASES
    expected = [reference.encode(text) + [reference.eos_id()] for text in texts]
    assert [tokenizer.encode(text) for text in texts] == expected
    # The texts do reach unknown characters (and runs of them), which must not go untested.
    assert any(reference.unk_id() in ids for ids in expected) or options.get("byte_fallback")


def test_tokenizer_pads_truncates_masks_and_reads_extra_ids(tmp_path):
    path = _train_sentencepiece(tmp_path)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokenizer = encoders.T5Tokenizer.from_pretrained(tmp_path)  # the folder, as a Hub repo lays it out
    texts = ["kato rimu sé", "ka", "", "ba " * 50]
    max_length = len(reference.encode(texts[0])) + 1  # the first text fills its row exactly
    input_ids, mask = tokenizer(texts, max_length=max_length)
    assert input_ids.shape == mask.shape == (4, max_length) and input_ids.dtype == mask.dtype == torch.long
    for row, text in enumerate(texts):
        ids = (reference.encode(text) + [1])[:max_length - 1] + [1] if row == 3 else reference.encode(text) + [1]
        assert input_ids[row].tolist() == ids + [0] * (max_length - len(ids))  # truncation keeps </s> last
        assert mask[row].tolist() == [1] * len(ids) + [0] * (max_length - len(ids))
    assert tokenizer("ka")[0].shape == (1, 120)  # one text, Lumos' default length
    assert_raises(ValueError, "max_length", lambda: tokenizer(texts, max_length=0))
    # <extra_id_0> is the last id (32099 for T5's 32000 pieces), <extra_id_99> the first after the pieces.
    pieces = reference.get_piece_size()
    assert tokenizer.vocab_size == pieces + 100
    assert [tokenizer.encode(f"<extra_id_{i}>") for i in (0, 99, 10)] == [
        [pieces + 99, 1], [pieces, 1], [pieces + 89, 1]]
    assert tokenizer.encode("ka <extra_id_0> to</s>") == (
        reference.encode("ka") + [pieces + 99] + reference.encode("to") + [1, 1])
    assert tokenizer.encode("<extra_id_100>") == reference.encode("<extra_id_100>") + [1]  # not a sentinel
    assert encoders.T5Tokenizer.from_pretrained(path, num_extra_ids=0).vocab_size == pieces


def _serialized_model(pieces):
    """A ModelProto: <pad>, </s>, <unk>, then `pieces` [(piece, score)] as normal pieces, identity normalizer."""
    def varint(value):
        out = bytearray()
        while True:
            out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)

    def submessage(number, payload):
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    def piece(text, score, kind):
        return (submessage(1, text.encode()) + varint(2 << 3 | 5) + struct.pack("<f", score)
                + varint(3 << 3) + varint(kind))

    specials = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)]
    return (b"".join(submessage(1, piece(*p)) for p in specials + [(text, score, 1) for text, score in pieces])
            + submessage(3, submessage(1, b"identity")))


@pytest.mark.parametrize("pieces, texts", [
    # Viterbi, not greedy: "▁a" + "bc" (-2.5) beats the longest first match "▁ab" + "c" (-4); a run of
    # unknown characters is one <unk>.
    ([("▁", -3.0), ("a", -3.0), ("b", -3.0), ("c", -3.0), ("▁a", -1.5), ("▁ab", -1.0), ("bc", -1.0)],
     ["abc", "ab", "a b c", "ab zz c", "zz", "  cab  bca ", "c" * 30, ""]),
    # "9"+"99" and "99"+"9" tie in exact arithmetic; sentencepiece sums in float32, whose rounding picks
    # "▁", "99", "9" where double would pick "9", "99".
    ([("▁", -6.540001392364502), ("9", -1.4331657886505127), ("99", -2.110133647918701),
      ("▁9", -11.870586395263672)], ["999", "99999", "9999999"]),
], ids=["viterbi", "float32-ties"])
def test_tokenizer_from_in_memory_pieces_matches_sentencepiece(pieces, texts):
    reference = sentencepiece.SentencePieceProcessor(model_proto=_serialized_model(pieces))
    tokenizer = encoders.T5Tokenizer.from_pieces(pieces)
    for text in texts:
        assert tokenizer.encode(text) == reference.encode(text) + [1], text
    if pieces[1][0] == "a":  # NFKC folds full-width letters (the reference here normalizes nothing)
        assert tokenizer.encode("ａｂ") == [8, 1]  # "▁ab"


def test_tokenizer_file_errors(tmp_path):
    assert_raises(FileNotFoundError, "spiece.model", lambda: encoders.T5Tokenizer.from_pretrained(tmp_path))
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model\n")
    assert_raises(ValueError, "junk.model", lambda: encoders.T5Tokenizer.from_pretrained(tmp_path / "junk.model"))
    assert_raises(ValueError, "</s>", lambda: encoders.T5Tokenizer.from_pieces([("</s>", 0.0)]))
    (tmp_path / "bpe").mkdir()
    with pytest.raises(ValueError, match="unigram"):
        encoders.T5Tokenizer.from_pretrained(_train_sentencepiece(tmp_path / "bpe", model_type="bpe", vocab_size=200))


# ---- prompt preprocessing as the release's T5Embedder does it ---------------------------------
# Expected outputs worked out by hand from the release's rules, in their order (lowercasing first).

PROMPT_CASES = [
    ("A Red Car", "a red car"),
    ("A%20Red+Car", "a red car"),  # URL-unquoted first
    ("Visit https://www.Example.com/path for more", "visit for more"),  # URL rule 1, twice in one pass
    ("logo from wikipedia.org/wiki today", "logo from today"),  # a bare domain with a listed ending
    ("Fish &amp; <i>Chips</i>", "fish chips"),  # tags go; "&" is bad punctuation
    ("Tom &amp;quot;Jerry&amp;quot;", "tom jerry"),  # double escaped: `&quot;?` takes what HTML leaves
    ("A <person> Riding", "a person riding"),  # replaced before the HTML step could drop it
    ("Photo by @JohnDoe on stage", "photo by on stage"),
    ("一只猫 a cat", "a cat"),  # CJK ideographs (U+4E00-9FFF) go
    ("ネコ cat", "ネコ cat"),  # Katakana is in none of the release's ranges
    ("a “quoted” ‘word’ — dash", "a \"quoted\" 'word' - dash"),  # dashes and quotes; one "-": no split
    ("this-is-my-cute-cat", "this is my cute cat"),  # more than 3 of "-" / "_": spaces
    ("a-b-c-d", "a-b-c-d"),  # exactly 3 stay
    ("***SALE*** now!!", "sale now!!"),  # bad punctuation runs; "!" is not one
    ("Wait... what", "wait what"),
    ("a cat . a dog", "a cat a dog"),
    ("red,green.blue", "red, green. blue"),
    ('"Hello World"', "hello world"),  # one pair of enclosing quotes
    ("photo #12 of cat.jpg", "photo of"),  # "#12" (1-3 digits), then the file name
    ("server 192.168.0.1 rack", "server rack"),
    ("poster 1920x1080", "poster"),  # \b\d+[a-zA-Z]+\d+\b
    ("Red Dress Free Shipping", "red dress"),  # shop phrase
]


@pytest.mark.parametrize("prompt, expected", PROMPT_CASES)
def test_preprocess_prompt_rules(prompt, expected):
    # ...and cleaning the output again changes nothing: it holds nothing any rule removes or changes.
    assert encoders.preprocess_prompt(prompt) == expected == encoders.preprocess_prompt(expected)
    assert encoders.clean_caption(expected) == expected


def test_preprocess_prompt_cleans_twice_or_not_at_all():
    # Pass 1 drops <b>, </b> and unescapes "&lt;i&gt;" to "<i>", a tag that pass 2 drops.
    assert encoders.clean_caption("<b>Bold</b> &lt;i&gt; text") == "bold <i> text"
    assert encoders.preprocess_prompt("<b>Bold</b> &lt;i&gt; text") == "bold text"
    # use_text_preprocessing=False in the release: text.lower().strip() and nothing else.
    prompt = "  A Red Car, https://X.com *** &amp;  "
    assert encoders.preprocess_prompt(prompt, clean=False) == "a red car, https://x.com *** &amp;"


def test_text_encoder_tokenizes_cleaned_prompts():
    encoder = train_t2i.random_text_encoder(train_t2i.random_t5_description(), torch.device("cpu"))
    assert encoder.clean
    features, mask = encoder(["A Red Circle", "a red circle", "A ***Red*** Circle https://example.com"])
    assert mask.all()  # the same three tokens (a, red, circle) and </s> in every row: no <unk>
    assert torch.equal(features[0], features[1]) and torch.equal(features[0], features[2])
    assert torch.equal(encoder.token_features(["A RED CIRCLE"])[0], features[1][mask[1]])  # cache-text: same path
    # Without cleaning, capitals are still lowered, but "***" reaches the tokenizer (<unk>: one more token).
    raw = train_t2i.TextEncoder(encoder.tokenizer, encoder.t5, clean=False)
    _, raw_mask = raw(["A Red Circle", "a red circle ***"])
    assert raw_mask.sum(1).tolist() == [4, 5]


####################################################################################################
# data
####################################################################################################

def encode(image, format, **options):
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def noise_image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_files(folder, files):
    """files: {relative name: bytes}; returns folder."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


def write_tar(path, members):
    """members: {member name: bytes}, stored in this order."""
    with tarfile.open(path, "w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def png_header_only(width, height):
    """A PNG that announces width x height pixels (an IHDR, no image data): opening it costs
    nothing, so it probes the decompression-bomb limit cheaply."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def expected_tensor(rgb, size):
    return (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(3, 1, 1).expand(3, size, size)


# Five good images of several formats and shapes, with captions for some of them.
def good_images():
    return {
        "000": ("png", encode(noise_image(40, 30, 0), "PNG"), "a noisy landscape"),
        "001": ("jpg", encode(noise_image(20, 50, 1), "JPEG", quality=90), None),
        "002": ("webp", encode(noise_image(64, 64, 2), "WEBP", lossless=True), "ünïcode caption"),
        "003": ("png", encode(noise_image(100, 37, 3), "PNG"), None),
        "004": ("jpeg", encode(noise_image(16, 16, 4), "JPEG"), "last one"),
    }


# ---------------------------------------------------------------------------------------------
# folder and tar sources


def test_folder_and_tar_read_the_same_images_and_captions(tmp_path):
    folder_files, tar_members = {}, {}
    for key, (extension, content, caption) in good_images().items():
        folder_files[f"{key}.{extension}"] = content
        tar_members[f"{key}.{extension}"] = content
        if caption is not None:
            folder_files[f"{key}.txt"] = caption.encode()
            # captions in the tar alternate between the .txt and the .json layout
            if int(key) % 2:
                tar_members[f"{key}.json"] = json.dumps({"text": caption}).encode()
            else:
                tar_members[f"{key}.txt"] = caption.encode()
    folder = data.open_dataset(str(write_files(tmp_path / "images", folder_files)), 24)
    shards = data.open_dataset(str(write_tar(tmp_path / "shard.tar", tar_members)), 24)
    assert isinstance(folder, data.ImageFolder) and isinstance(shards, data.TarShards)
    assert len(folder) == len(shards) == 5
    for i, (key, (extension, _, caption)) in enumerate(good_images().items()):
        from_folder, from_tar = folder[i], shards[i]
        assert from_folder["image"].shape == (3, 24, 24)
        assert torch.equal(from_folder["image"], from_tar["image"])
        assert from_folder["caption"] == from_tar["caption"] == (caption or "")
        assert from_folder["name"].endswith(f"{key}.{extension}")
        assert from_tar["name"].endswith(f"shard.tar:{key}.{extension}")
        assert from_folder["skipped"] == from_tar["skipped"] == [] and from_tar["index"] == i


def test_folder_listing_is_recursive_sorted_case_insensitive_and_skips_hidden(tmp_path):
    png = encode(noise_image(8, 8, 0), "PNG")
    write_files(tmp_path, {"b/x.PNG": png, "a/z.Jpg": encode(noise_image(8, 8, 1), "JPEG"),
                           "a/y.png": png, "c.webp": encode(noise_image(8, 8, 2), "WEBP"),
                           "notes.md": b"not an image", ".hidden.png": png,
                           ".cache/w.png": png, "a/y.txt": b"  caption of y \n"})
    dataset = data.open_dataset(str(tmp_path), 8)
    names = [os.path.relpath(dataset.name(j), tmp_path) for j in range(len(dataset))]
    assert names == [os.path.join("a", "y.png"), os.path.join("a", "z.Jpg"),
                     os.path.join("b", "x.PNG"), "c.webp"]
    assert [dataset[j]["caption"] for j in range(4)] == ["caption of y", "", "", ""]


def test_tar_groups_members_by_key_and_ignores_samples_without_image(tmp_path):
    image = encode(noise_image(8, 8, 0), "PNG")
    shard = write_tar(tmp_path / "s.tar", {
        "dir/a.txt": b"caption a", "dir/a.png": image,       # caption before image: same key
        "dir/b.cls": b"3",                                   # no image: not a sample
        "dir/c.seg.png": image,                              # extension "seg.png": not an image
        "dir/d.JPG": encode(noise_image(8, 8, 1), "JPEG"),
        "dir/d.json": json.dumps({"caption": "from json", "text": "ignored"}).encode(),
        "e.png": image, "e.json": json.dumps(["not", "a", "dict"]).encode(),
        "f.json": json.dumps({"caption": "json loses"}).encode(), "f.txt": b"txt wins", "f.png": image,
    })
    dataset = data.open_dataset(str(shard), 8)
    assert [dataset.name(j).split(":")[-1] for j in range(len(dataset))] == \
        ["dir/a.png", "dir/d.JPG", "e.png", "f.png"]
    assert [dataset[j]["caption"] for j in range(4)] == ["caption a", "from json", "", "txt wins"]


def test_brace_expansion():
    assert data.expand_braces("s/{08..11}.tar") == ["s/08.tar", "s/09.tar", "s/10.tar", "s/11.tar"]
    assert data.expand_braces("{1..3}") == ["1", "2", "3"]
    assert data.expand_braces("{3..1}") == ["3", "2", "1"]
    assert data.expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert data.expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    assert data.split_top_level("a/{0..2}.tar,b/{x,y}.tar, c.tar") == \
        ["a/{0..2}.tar", "b/{x,y}.tar", " c.tar"]


def test_shards_from_brace_ranges_globs_and_lists(tmp_path):
    for shard in range(4):
        write_tar(tmp_path / f"{shard:05d}.tar",
                  {f"k{shard}_{j}.png": encode(noise_image(8, 8, 10 * shard + j), "PNG")
                   for j in range(shard + 1)})  # shard s holds s + 1 samples

    def member_keys(spec):
        dataset = data.open_dataset(spec, 8)
        return [dataset.name(j).split(":")[-1][:-4] for j in range(len(dataset))]

    assert member_keys(f"{tmp_path}/{{00001..00002}}.tar") == ["k1_0", "k1_1", "k2_0", "k2_1", "k2_2"]
    assert member_keys(f"{tmp_path}/*.tar") == \
        [f"k{shard}_{j}" for shard in range(4) for j in range(shard + 1)]  # globs sorted
    assert member_keys(f"{tmp_path}/00003.tar,{tmp_path}/0000[0].tar") == \
        ["k3_0", "k3_1", "k3_2", "k3_3", "k0_0"]
    with pytest.raises(FileNotFoundError, match="not found: .*00004.tar and 5 more"):
        data.open_dataset(f"{tmp_path}/{{00002..00009}}.tar", 8)
    with pytest.raises(FileNotFoundError, match="no files match"):
        data.open_dataset(f"{tmp_path}/*.tgz", 8)


# ---------------------------------------------------------------------------------------------
# bad files


def bad_and_good_files():
    """(name, bytes, is_good) in dataset order; the last file is bad, so skipping wraps."""
    jpeg = encode(noise_image(64, 64, 5), "JPEG", quality=95)
    png = encode(noise_image(64, 64, 6), "PNG")
    return [
        ("00.png", encode(noise_image(20, 20, 0), "PNG"), True),
        ("01.jpg", b"", False),                                   # zero bytes
        ("02.jpg", jpeg[: len(jpeg) // 2], False),                # truncated jpeg
        ("03.png", encode(noise_image(30, 20, 1), "PNG"), True),
        ("04.jpg", np.random.default_rng(0).bytes(3000), False),  # random bytes
        ("05.png", png[: len(png) // 2], False),                  # truncated png
        ("06.png", png_header_only(100_000, 100_000), False),     # decompression bomb
        ("07.jpg", jpeg, True),
        ("08.webp", b"RIFF\x00\x00\x00\x00WEBP", False),          # a header and nothing else
    ]


@pytest.mark.parametrize("source", ["folder", "tar"])
def test_bad_files_are_skipped_deterministically_and_named(tmp_path, source):
    files = bad_and_good_files()
    if source == "folder":
        spec = str(write_files(tmp_path / "images", {name: content for name, content, _ in files}))
    else:
        spec = str(write_tar(tmp_path / "shard.tar", {name: content for name, content, _ in files}))
    dataset = data.open_dataset(spec, 16)
    assert len(dataset) == len(files)
    good = [j for j, (_, _, is_good) in enumerate(files) if is_good]
    all_skipped = set()
    for i in range(len(files)):
        item = dataset[i]
        replacement = next(j % len(files) for j in range(i, i + len(files)) if j % len(files) in good)
        bad_run = [files[j % len(files)][0] for j in range(i, i + len(files))][
            : (replacement - i) % len(files)]
        assert item["index"] == i
        assert item["name"].endswith(files[replacement][0])
        assert [name.rsplit("/", 1)[-1].rsplit(":", 1)[-1] for name in item["skipped"]] == bad_run
        assert torch.equal(item["image"], dataset[replacement]["image"])
        all_skipped.update(item["skipped"])
    assert len(all_skipped) == len(files) - len(good)
    reopened = data.open_dataset(spec, 16)
    assert all(torch.equal(reopened[i]["image"], dataset[i]["image"]) for i in range(len(files)))


@pytest.mark.parametrize("cut_inside", ["2.png", "2.txt"])
def test_sample_cut_off_by_a_truncated_shard_is_skipped(tmp_path, cut_inside):
    members = {f"{j}.png": encode(noise_image(32, 32, j), "PNG") for j in range(3)}
    members["2.txt"] = b"a caption long enough to be cut in the middle " * 4
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: whole.index(members[cut_inside]) + 100])
    with pytest.warns(UserWarning, match="cut.tar"):
        dataset = data.open_dataset(str(tmp_path / "cut.tar"), 8)
    assert len(dataset) == 3
    assert dataset[2]["skipped"] == [f"{tmp_path / 'cut.tar'}:2.png"]
    assert dataset[2]["name"].endswith(":0.png")


def test_bad_json_caption_skips_the_sample(tmp_path):
    image = encode(noise_image(8, 8, 0), "PNG")
    shard = write_tar(tmp_path / "s.tar", {"a.png": image, "a.json": b"{not json",
                                           "b.png": image, "b.json": b'{"caption": "ok"}'})
    item = data.open_dataset(str(shard), 8)[0]
    assert item["caption"] == "ok" and item["skipped"] == [f"{shard}:a.png"]


def test_images_over_the_pixel_limit_are_bad_even_where_pil_only_warns(monkeypatch):
    # PIL raises above 2 x MAX_IMAGE_PIXELS and only warns between 1x and 2x.
    content = encode(noise_image(40, 30, 0), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(data.BadSampleError, match="DecompressionBomb"):
        data.decode_image(content, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    assert data.decode_image(content, 8).shape == (3, 8, 8)


def test_dataset_without_a_readable_file_is_a_clear_error(tmp_path):
    write_files(tmp_path, {"a.jpg": b"", "b.png": b"junk"})
    dataset = data.open_dataset(str(tmp_path), 8)
    with pytest.raises(RuntimeError, match="no readable image.*all 2 files failed"):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# Too many bad files: a systematic failure stops with one line


def png(seed, size=8):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def write_bad_folder(folder, count, is_good):
    """count files NNNN.png, a small PNG where is_good(k), garbage bytes elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        (folder / f"{k:04d}.png").write_bytes(png(k) if is_good(k) else b"not an image %d" % k)
    return folder




def assert_one_line_naming_the_first_errors(message, folder, names):
    assert "\n" not in message and "first errors:" in message and "python data.py stats" in message
    for name in names:
        assert f"{folder / name}: UnidentifiedImageError" in message
    assert "BytesIO" not in message


def test_a_folder_of_bad_files_stops_after_one_window(tmp_path):
    dataset = data.open_dataset(str(write_bad_folder(tmp_path, 1200, lambda k: False)), 8)
    with pytest.raises(data.TooManyBadFiles) as error:
        dataset[0]
    message = str(error.value)
    assert message.startswith(f"{data.BAD_FILE_WINDOW} of the last {data.BAD_FILE_WINDOW} files read failed")
    assert_one_line_naming_the_first_errors(message, tmp_path, ["0000.png", "0001.png", "0002.png"])
    assert "0003.png" not in message  # BAD_FILE_EXAMPLES errors, not all of them
    assert isinstance(error.value, RuntimeError)


def test_a_small_folder_of_bad_files_stops_at_the_first_item(tmp_path):
    dataset = data.open_dataset(str(write_bad_folder(tmp_path, 5, lambda k: False)), 8)
    with pytest.raises(data.TooManyBadFiles, match=r"no readable image .* all 5 files failed; first errors"):
        dataset[2]


def test_sparse_bad_files_are_still_skipped(tmp_path):
    dataset = data.open_dataset(str(write_bad_folder(tmp_path, 1200, lambda k: k % 10 != 3)), 8)
    skipped = [name for i in range(len(dataset)) for name in dataset[i]["skipped"]]
    assert len(skipped) == 120  # each bad file once, by its own item


def test_the_window_slides_and_only_more_than_half_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BAD_FILE_WINDOW", 10)
    # Files 0-4 bad, 5-9 good, 10-15 bad. Items 0 (reads 0..5) and 6..9 fill the window with
    # exactly half bad: fine. Item 10 reads 10, 11, ...: the bad files 0-4 leave the window
    # first, and 15 pushes out good 5: 6 of 10 bad, the first of them now 10.
    dataset = data.open_dataset(str(write_bad_folder(tmp_path, 20, lambda k: 5 <= k < 10 or k >= 16)), 8)
    for i in (0, 6, 7, 8, 9):
        dataset[i]
    with pytest.raises(data.TooManyBadFiles, match=r"^6 of the last 10 files read failed .* first errors: "
                                                   r"\S+/0010.png: .* \| \S+/0011.png: .* \| \S+/0012.png: [^|]*$"):
        dataset[10]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_and_stats_report_it_in_one_line_from_a_worker_too(tmp_path, workers):
    folder = write_bad_folder(tmp_path, 1200, lambda k: False)
    loader = data.make_loader(data.open_dataset(str(folder), 8), 4, 4, shuffle=False, num_workers=workers)
    with pytest.raises(data.TooManyBadFiles) as error:
        next(iter(loader))
    # A worker's exception comes back as TooManyBadFiles("Caught ... Original Traceback ..."): still one line.
    assert str(error.value).startswith(f"{data.BAD_FILE_WINDOW} of the last")
    assert_one_line_naming_the_first_errors(str(error.value), folder, ["0000.png", "0001.png", "0002.png"])
    with pytest.raises(SystemExit) as exit_info:
        data.main(["stats", str(folder), "--image-size", "8", "--batch-size", "4", "--workers", str(workers)])
    assert re.fullmatch(r"error: 1000 of the last 1000 files read failed [^\n]*", exit_info.value.code)


# "all bad": met in main(), reading the held-out items, before any DataLoader. "mostly bad": the
# held-out items (0, 300, 600, 900 of 1200) are good, so the training loop meets it, in the main
# process with 0 workers, re-raised from a DataLoader worker with 1.
@pytest.mark.slow
@pytest.mark.parametrize("good, workers", [("all bad", "0"), ("mostly bad", "0"), ("mostly bad", "1")])
def test_training_on_bad_files_exits_2_with_one_line(tmp_path, good, workers):
    is_good = (lambda k: False) if good == "all bad" else (lambda k: k % 300 == 0)
    folder = write_bad_folder(tmp_path / "images", 20 if good == "all bad" else 1200, is_good)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "train_i2i.py", *SCALE_RUN, "--global-batch-size", "8", "--data", str(folder), "--steps", "2",
                             "--num-workers", workers, "--out", str(tmp_path / "run")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # stderr may also hold the loop's tqdm bar ("\r  0%|  | 0/2 [...]"), which is not an error line.
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not re.match(r"\s*\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("train_i2i.py: error: "), result.stderr[-3000:]
    assert f"first errors: {folder}{os.sep}" in lines[0]


# ---------------------------------------------------------------------------------------------
# image modes and the centre crop


def palette_image(transparent):
    image = Image.new("P", (12, 9), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (3 * 254))
    return encode(image, "PNG", **({"transparency": 1} if transparent else {}))


ODD_MODES = {
    # label: (encoded file, expected RGB everywhere, tolerance in [-1, 1] units)
    "L": (encode(Image.new("L", (40, 30), 200), "PNG"), (200, 200, 200), 1e-6),
    "1": (encode(Image.new("1", (40, 30), 1), "PNG"), (255, 255, 255), 1e-6),
    "LA transparent": (encode(Image.new("LA", (20, 20), (100, 0)), "PNG"), (255, 255, 255), 1e-6),
    "LA opaque": (encode(Image.new("LA", (20, 20), (100, 255)), "PNG"), (100, 100, 100), 1e-6),
    "P": (palette_image(transparent=False), (10, 200, 30), 1e-6),
    "P transparent": (palette_image(transparent=True), (255, 255, 255), 1e-6),
    "RGBA transparent": (encode(Image.new("RGBA", (20, 20), (0, 0, 255, 0)), "PNG"), (255, 255, 255), 1e-6),
    "RGBA half": (encode(Image.new("RGBA", (20, 20), (0, 0, 255, 128)), "PNG"), (127, 127, 255), 1e-6),
    "RGB with transparency key": (encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG",
                                         transparency=(1, 2, 3)), (255, 255, 255), 1e-6),
    "CMYK jpeg": (encode(Image.new("CMYK", (24, 24), (0, 255, 0, 0)), "JPEG", quality=95),
                  (255, 0, 255), 0.04),
    "I;16 png": (encode(Image.fromarray(np.full((20, 30), 128 * 257, np.uint16)), "PNG"),
                 (128, 128, 128), 1e-6),
    "tiny 1x1": (encode(Image.new("RGB", (1, 1), (30, 60, 90)), "PNG"), (30, 60, 90), 1e-6),
    "very tall 10x1000": (encode(Image.new("RGB", (10, 1000), (5, 250, 120)), "PNG"), (5, 250, 120), 1e-6),
    "very wide webp": (encode(Image.new("RGB", (3000, 7), (90, 20, 200)), "WEBP", lossless=True),
                       (90, 20, 200), 1e-6),
}


@pytest.mark.parametrize("label", list(ODD_MODES))
def test_every_good_file_in_an_odd_mode_is_read(tmp_path, label):
    content, rgb, tolerance = ODD_MODES[label]
    extension = {b"\x89P": "png", b"\xff\xd8": "jpg", b"RI": "webp"}[content[:2]]
    write_files(tmp_path, {f"image.{extension}": content})
    item = data.open_dataset(str(tmp_path), 16)[0]
    assert item["skipped"] == []
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    torch.testing.assert_close(item["image"], expected_tensor(rgb, 16), atol=tolerance, rtol=0)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:20] = (255, 0, 0)  # red top half, blue bottom half, as stored
    pixels[20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: stored upside down, show rotated by 180 degrees
    write_files(tmp_path, {"photo.jpg": encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)})
    image = (data.open_dataset(str(tmp_path), 16)[0]["image"] + 1) * 127.5
    assert image[2, 2, 8] > 200 and image[0, 2, 8] < 50  # blue on top once turned
    assert image[0, 13, 8] > 200 and image[2, 13, 8] < 50


@pytest.mark.parametrize("width, height", [(300, 100), (100, 300), (3000, 1000), (40, 4000)])
def test_center_crop_keeps_the_centre_square(width, height):
    # A red image whose central square (side = short side) is green: the crop must be green.
    short = min(width, height)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = (255, 0, 0)
    top, left = (height - short) // 2, (width - short) // 2
    pixels[top : top + short, left : left + short] = (0, 255, 0)
    crop = data.center_crop_arr(Image.fromarray(pixels), 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    inner = crop[2:-2, 2:-2].astype(int)  # bicubic may blend the outermost pixels
    assert np.abs(inner - np.array([0, 255, 0])).max() <= 2


def test_extreme_strips_are_trimmed_around_the_centre_before_resizing(monkeypatch):
    # Upscaled whole, a 1 x 100000 strip would need 32 x 3.2M pixels; trimmed, 32 x 128.
    strip = np.zeros((100_000, 1, 3), np.uint8)
    strip[49_998:50_002] = 255  # the central 4 pixels: what the trim to 1:4 keeps
    resized_to = []
    original_resize = Image.Image.resize

    def recording_resize(image, size, *args, **kwargs):
        resized_to.append(size)
        return original_resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    crop = data.center_crop_arr(Image.fromarray(strip), 32)
    assert crop.shape == (32, 32, 3) and crop.min() == 255
    assert resized_to == [(32, 128)]


def test_center_crop_matches_box_halving_then_bicubic():
    image = noise_image(130, 70, 0)  # short side 70 >= 2 * 32: one BOX halving to 65 x 35
    halved = image.resize((65, 35), Image.BOX)
    resized = np.array(halved.resize((round(65 * 32 / 35), 32), Image.BICUBIC))
    left = (resized.shape[1] - 32) // 2
    np.testing.assert_array_equal(data.center_crop_arr(image, 32), resized[:, left : left + 32])


# ---------------------------------------------------------------------------------------------
# shapes

CAPTION = re.compile(r"a (\w+) (\w+) (\w+) at the ([\w ]+) on an? (\w+) background")


def test_shapes_is_deterministic_by_seed_and_index():
    first, again = data.ShapesDataset(50, 32, seed=3), data.ShapesDataset(50, 32, seed=3)
    for i in (0, 7, 49):
        assert torch.equal(first[i]["image"], again[i]["image"])
        assert first[i]["caption"] == again[i]["caption"] and first[i]["attrs"] == again[i]["attrs"]
    other = data.ShapesDataset(50, 32, seed=4)
    assert sum(first[i]["caption"] != other[i]["caption"] for i in range(50)) > 40
    assert not torch.equal(torch.stack([first[i]["image"] for i in range(50)]),
                           torch.stack([other[i]["image"] for i in range(50)]))


def test_shapes_captions_state_the_attributes_and_cover_the_vocabulary():
    dataset = data.ShapesDataset(600, 16, seed=0)
    seen = {key: set() for key in ("shape", "color", "size", "position", "background")}
    for i in range(len(dataset)):
        item = dataset[i]
        attrs = item["attrs"]
        size, color, shape, position, background = CAPTION.fullmatch(item["caption"]).groups()
        assert (size, color, shape, position, background) == (
            attrs["size"], attrs["color"], attrs["shape"], attrs["position"], attrs["background"])
        assert attrs["background"] != attrs["color"]
        for key in seen:
            seen[key].add(attrs[key])
    assert seen["shape"] == set(data.SHAPES) and seen["size"] == set(data.SIZES)
    assert seen["color"] == seen["background"] == set(data.COLORS)
    assert seen["position"] == set(data.POSITIONS)


def test_shapes_caption_wording():
    attrs = {"shape": "star", "color": "red", "size": "small", "position": "top left",
             "background": "orange"}
    assert data.shapes_caption(attrs) == "a small red star at the top left on an orange background"
    attrs.update(shape="square", color="white", size="large", position="center", background="blue")
    assert data.shapes_caption(attrs) == "a large white square at the center on a blue background"


def test_shapes_pixels_show_the_attributes():
    size = 64
    dataset = data.ShapesDataset(200, size, seed=1)
    for i in range(len(dataset)):
        item = dataset[i]
        attrs, image = item["attrs"], (item["image"] + 1) * 127.5
        cx, cy = attrs["cx"] * size, attrs["cy"] * size
        object_pixel = image[:, int(cy), int(cx)]
        # the image corner farthest from the object is background
        corner_x, corner_y = (0 if cx > size / 2 else size - 1), (0 if cy > size / 2 else size - 1)
        torch.testing.assert_close(object_pixel, torch.tensor(data.COLORS[attrs["color"]],
                                   dtype=torch.float32), atol=1e-3, rtol=0)
        torch.testing.assert_close(image[:, corner_y, corner_x], torch.tensor(
            data.COLORS[attrs["background"]], dtype=torch.float32), atol=1e-3, rtol=0)
        # the object stays inside the frame
        half = attrs["extent"] / 2
        assert half <= attrs["cx"] <= 1 - half and half <= attrs["cy"] <= 1 - half


def test_shapes_is_fast_enough():
    dataset = data.ShapesDataset(500, 32, seed=0)
    import time
    started = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    assert time.perf_counter() - started < 2.5  # ~0.3 s on one CPU core


def test_shapes_specs():
    assert len(data.open_dataset("shapes", 16)) == data.DEFAULT_SHAPES_IMAGES
    dataset = data.open_dataset("shapes:7", 16, seed=5)
    assert len(dataset) == 7 and dataset.seed == 5 and dataset[6]["image"].shape == (3, 16, 16)
    for spec in ("shapes:0", "shapes:ten", "shapes:-3"):
        with pytest.raises(ValueError, match="shapes:N"):
            data.open_dataset(spec, 16)
    with pytest.raises(IndexError):
        dataset[7]


# ---------------------------------------------------------------------------------------------
# GlobalSampler and the loader


def take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def test_sampler_epochs_are_permutations_that_reshuffle():
    pairs = take(data.GlobalSampler(10, 4, seed=0), 30)
    assert [g for g, _ in pairs] == list(range(30))
    epochs = [[i for _, i in pairs[e * 10 : (e + 1) * 10]] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = [i for _, i in take(data.GlobalSampler(10, 4, seed=1), 10)]
    assert other_seed != epochs[0]
    in_order = [i for _, i in take(data.GlobalSampler(10, 4, shuffle=False), 12)]
    assert in_order == list(range(10)) + [0, 1]


def test_sampler_ranks_split_each_global_batch_into_contiguous_disjoint_slices():
    global_batch, steps = 12, 5
    single = take(data.GlobalSampler(17, global_batch, seed=2), global_batch * steps)
    for world in (2, 3, 4):
        per_rank = global_batch // world
        shares = [take(data.GlobalSampler(17, global_batch, rank, world, seed=2), per_rank * steps)
                  for rank in range(world)]
        for step in range(steps):
            batch = [pair for share in shares for pair in share[step * per_rank : (step + 1) * per_rank]]
            assert batch == single[step * global_batch : (step + 1) * global_batch]
        global_indices = [g for share in shares for g, _ in share]
        assert len(set(global_indices)) == len(global_indices)


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_resumes_the_same_stream(world):
    global_batch = 8
    for rank in range(world):
        straight = take(data.GlobalSampler(13, global_batch, rank, world, seed=7), 40 // world)
        position = 3 * global_batch  # three optimizer steps consumed, as the checkpoint stores
        resumed = take(data.GlobalSampler(13, global_batch, rank, world, seed=7, start=position),
                       16 // world)
        assert resumed == straight[3 * global_batch // world :]


def test_sampler_rejects_bad_layouts():
    with pytest.raises(ValueError, match="multiple of the world size"):
        data.GlobalSampler(10, 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="outside world size"):
        data.GlobalSampler(10, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        data.GlobalSampler(0, 8)
    with pytest.raises(ValueError, match="does not divide"):
        data.make_loader(data.ShapesDataset(10, 8), 8, 3, world_size=2)


def test_collate_keeps_global_index_and_flattens_skipped(tmp_path):
    write_files(tmp_path, {"a.png": encode(noise_image(8, 8, 0), "PNG"), "b.png": b"",
                           "c.png": encode(noise_image(8, 8, 1), "PNG")})
    wrapped = data.WithGlobalIndex(data.open_dataset(str(tmp_path), 8))
    batch = data.collate_samples([wrapped[(40, 1)], wrapped[(41, 2)], wrapped[(42, 1)]])
    assert batch["image"].shape == (3, 3, 8, 8)
    assert batch["global_index"].tolist() == [40, 41, 42] and batch["index"].tolist() == [1, 2, 1]
    assert [os.path.basename(n) for n in batch["skipped"]] == ["b.png", "b.png"]
    assert batch["caption"] == ["", "", ""]
    shapes = data.collate_samples([data.ShapesDataset(3, 8)[i] for i in range(3)])
    assert [a["shape"] for a in shapes["attrs"]] == [data.ShapesDataset(3, 8)[i]["attrs"]["shape"]
                                                   for i in range(3)]


def test_tar_dataset_pickles_with_open_files(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {f"{j}.png": encode(noise_image(8, 8, j), "PNG") for j in range(3)})
    dataset = data.open_dataset(str(shard), 8)
    first = dataset[0]["image"]  # opens a file handle
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._files == {} and torch.equal(copy[0]["image"], first)


def test_loader_with_two_workers_reads_this_ranks_share_of_a_tar_source(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {f"{j:02d}.png": encode(noise_image(10, 12, j), "PNG")
                                           for j in range(12)})
    dataset = data.open_dataset(str(shard), 8)
    global_batch, micro, rank, world, start = 8, 2, 1, 2, 8
    sampler = data.GlobalSampler(len(dataset), global_batch, rank, world, seed=3, start=start)
    loader = data.make_loader(dataset, global_batch, micro, rank, world, seed=3, start=start,
                              num_workers=2)
    batches = list(itertools.islice(loader, 4))  # two steps, two accumulation micro-batches each
    expected_global = [12, 13, 14, 15, 20, 21, 22, 23]  # rank 1's halves of global batches 1 and 2
    assert torch.cat([b["global_index"] for b in batches]).tolist() == expected_global
    for batch in batches:
        assert batch["image"].shape == (micro, 3, 8, 8) and batch["skipped"] == []
        for g, index, image in zip(batch["global_index"], batch["index"], batch["image"]):
            assert index == sampler.dataset_index(int(g))
            assert torch.equal(image, dataset[int(index)]["image"])


# ---------------------------------------------------------------------------------------------
# bad specs and the command line


def test_empty_or_missing_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images .* found under .*empty"):
        data.open_dataset(str(tmp_path / "empty"), 8)
    with pytest.raises(FileNotFoundError, match="data path not found: .*nowhere"):
        data.open_dataset(str(tmp_path / "nowhere"), 8)
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "0.tar", {"a.png": encode(noise_image(8, 8, 0), "PNG")})
    with pytest.raises(FileNotFoundError, match=r"pass them as DIR/\*\.tar"):
        data.open_dataset(str(tmp_path / "tars"), 8)
    (tmp_path / "x.zip").write_bytes(b"zip")
    with pytest.raises(ValueError, match="neither a folder nor a .tar"):
        data.open_dataset(str(tmp_path / "x.zip"), 8)


def test_compressed_shard_is_reported(tmp_path):
    import gzip
    raw = write_tar(tmp_path / "s.tar", {"a.png": encode(noise_image(8, 8, 0), "PNG")}).read_bytes()
    (tmp_path / "s.tar").write_bytes(gzip.compress(raw))
    with pytest.warns(UserWarning, match="plain .tar"):
        with pytest.raises(FileNotFoundError, match="no images in the 1 tar shard"):
            data.open_dataset(str(tmp_path / "s.tar"), 8)


def test_cli_show_and_stats(tmp_path, capsys):
    out = tmp_path / "grid.png"
    data.main(["show", "shapes:10", "--image-size", "32", "--n", "4", "--out", str(out)])
    with Image.open(out) as grid:
        assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    printed = capsys.readouterr().out
    assert all(data.ShapesDataset(10, 32)[i]["caption"] in printed for i in range(4))

    files = {name: content for name, content, _ in bad_and_good_files()}
    write_files(tmp_path / "images", files)
    data.main(["stats", str(tmp_path / "images"), "--image-size", "16", "--limit", "0",
               "--batch-size", "3"])
    printed = capsys.readouterr().out
    assert "read 9 items" in printed and "bad files: 6" in printed and "04.jpg" in printed
    with pytest.raises(SystemExit, match="data path not found"):
        data.main(["stats", str(tmp_path / "nowhere")])


####################################################################################################
# train
####################################################################################################

TINY_RUN = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
            "--image-size", "16", "--data", "shapes:256", "--global-batch-size", "8",
            "--log-every", "1", "--sample-every", "1000", "--sample-steps", "2", "--num-samples", "4",
            "--warmup-steps", "2", "--lr", "1e-3"]


def run(out, *extra):
    train_i2i.main(TINY_RUN + ["--out", str(out), *extra])


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [line["loss"] for line in map(json.loads, f) if "loss" in line]


def checkpoint_model_weights(path):
    model = train_i2i.load_export(os.path.join(os.path.dirname(os.path.dirname(path)), "ema.safetensors"))[0]
    state = {"model": model.state_dict()}
    torch.distributed.checkpoint.load(state, checkpoint_id=path)
    return state["model"]


@pytest.mark.slow
def test_loss_decreases_on_shapes(tmp_path):
    run(tmp_path, "--steps", "40", "--global-batch-size", "16")
    values = losses(tmp_path)
    assert len(values) == 40
    assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5
    assert os.path.exists(tmp_path / "samples" / "step_0000040.png")


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    run(tmp_path / "straight", "--steps", "6")
    run(tmp_path / "split", "--steps", "3")
    run(tmp_path / "split", "--steps", "6", "--resume")
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    straight = load_file(tmp_path / "straight" / "ema.safetensors")
    split = load_file(tmp_path / "split" / "ema.safetensors")
    for key in straight:
        torch.testing.assert_close(split[key], straight[key], rtol=1e-6, atol=1e-7)
    weights = [checkpoint_model_weights(train_i2i.latest_checkpoint(tmp_path / name)) for name in ("straight", "split")]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_previous(tmp_path, monkeypatch):
    run(tmp_path / "straight", "--steps", "4")
    real_replace = os.replace

    def die_on_second_commit(src, dst):
        if str(src).endswith("step_0000004.tmp"):
            raise KeyboardInterrupt("killed while saving")  # the shards are written, the commit is not
        return real_replace(src, dst)

    monkeypatch.setattr(train_i2i.os, "replace", die_on_second_commit)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", "--steps", "4", "--ckpt-every", "2")
    monkeypatch.setattr(train_i2i.os, "replace", real_replace)
    assert train_i2i.latest_checkpoint(tmp_path / "killed").endswith("step_0000002")
    assert (tmp_path / "killed" / "checkpoints" / "step_0000004.tmp").is_dir()
    run(tmp_path / "killed", "--steps", "4", "--ckpt-every", "2", "--resume")
    assert losses(tmp_path / "killed")[-2:] == pytest.approx(losses(tmp_path / "straight")[-2:], rel=1e-6)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train_i2i.py", *TINY_RUN, "--out", str(out), "--steps", "100000", "--ckpt-every", "100000"]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(train_i2i.__file__)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "metrics.jsonl").exists() or len(losses(out)) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    latest = train_i2i.latest_checkpoint(out)
    assert latest is not None and "signal" in output
    saved_step = int(os.path.basename(latest).split("_")[1])
    assert saved_step >= 3
    run(out, "--steps", str(saved_step + 2), "--resume")
    assert train_i2i.latest_checkpoint(out).endswith(f"step_{saved_step + 2:07d}")


@pytest.mark.slow
def test_export_rebuilds_model_from_metadata_alone(tmp_path):
    run(tmp_path, "--steps", "2")
    model, metadata = train_i2i.load_export(tmp_path / "ema.safetensors")
    info = metadata["lumos"]
    assert info["space"] == "pixel" and info["image_size"] == 16 and info["encoder"] == "random-vit"
    assert info["config"]["depth"] == 2 and info["config"]["in_channels"] == 3
    assert metadata["step"] == 2
    x = torch.randn(2, 3, 16, 16)
    y = torch.randn(2, 1, info["config"]["cond_dim"])
    assert model(x, torch.tensor([10.0, 500.0]), y).shape == (2, 6, 16, 16)


@pytest.mark.parametrize("extra, message", [
    (["--global-batch-size", "6", "--grad-accum", "4"], "--global-batch-size 6 must be divisible"),
    (["--image-size", "18"], "--image-size 18 must be divisible by 4"),
    (["--model", "DiT-Huge/2"], "unknown --model 'DiT-Huge/2'"),
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_i2i.py: error:") and message in err and "\n" not in err


def test_per_sample_randomness_does_not_depend_on_batching():
    whole = train_i2i.sample_randomness(torch.arange(8), 3, (3, 4, 4), 1000, 0.5, latent=True)
    halves = [train_i2i.sample_randomness(torch.arange(4) + 4 * k, 3, (3, 4, 4), 1000, 0.5, latent=True) for k in range(2)]
    for i, draw in enumerate(whole):
        assert torch.equal(draw, torch.cat([h[i] for h in halves]))
    other_seed = train_i2i.sample_randomness(torch.arange(8), 4, (3, 4, 4), 1000, 0.5, latent=False)
    assert not torch.equal(other_seed[3], whole[3]) and other_seed[4] is None


####################################################################################################
# scale
####################################################################################################

REPO = os.path.dirname(os.path.abspath(__file__))
SCALE_RUN = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
            "--image-size", "16", "--data", "shapes:256", "--log-every", "1", "--sample-steps", "2",
            "--num-samples", "4", "--warmup-steps", "2", "--lr", "1e-3",
            # Clipping active at every step (norms are ~0.2) and an EMA that moves visibly.
            "--max-grad-norm", "0.1", "--ema-decay", "0.5"]
# Small VAE with the SD-VAE's structure (4 levels: f = 8) and a small DINO ViT, random weights.
TINY_VAE = {**bench.SD_VAE_CONFIG, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4}
TINY_DINO = {"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 1}
# Float32 sums taken in another order (per-rank sums plus an all-reduce; fused compiled kernels;
# convolutions over other batch compositions) differ by ~1e-7 relative; a wrong sample, flip,
# scale or update differs by more than 1e-2.
TOLERANCE = 1e-5


def torchrun(script, *args):
    """`torchrun --standalone --nproc_per_node 2 script args` on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def logged(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [line[key] for line in map(json.loads, f) if key in line]


def checkpoint(out, step):
    return os.path.join(out, "checkpoints", f"step_{step:07d}")


def checkpoint_weights(path, part):
    """The "model" or "ema" weights of a DCP checkpoint as full tensors, whatever world wrote it."""
    with open(os.path.join(path, "run_config.json")) as f:
        state = {part: LumosDiT(**json.load(f)["model_config"]).state_dict()}
    dcp.load(state, checkpoint_id=path)
    return state[part]


def assert_same_weights(actual, expected):
    """Relative TOLERANCE, and 1e-7 absolute for entries near 0: a step moves a weight by up to
    the learning rate, 1e-3, so a wrong gradient or update shows far above 1e-7."""
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=TOLERANCE, atol=1e-7, msg=lambda m: f"{key}: {m}")


def tiny_encoders(folder):
    """(vae folder, dino folder): small random encoders in the layouts --vae / --encoder read."""
    return bench.write_random_encoders(folder, TINY_VAE, TINY_DINO)


def write_cache(folder, vae_dir, dino_dir, spec="shapes:10", shard_size=4):
    """A feature cache of `spec` at 32 px, written in this process; returns the FeatureCache."""
    settings = {"data": spec, "seed": 0, "image_size": 32, "vae": vae_dir, "encoder": dino_dir}
    data.write_feature_cache(data.open_dataset(spec, 32), folder, encoders.VAE.from_pretrained(vae_dir),
                             encoders.DINOEncoder.from_pretrained(dino_dir), settings, shard_size, batch_size=3,
                             log=lambda line: None)
    return data.FeatureCache(folder)


# ---------------------------------------------------------------------------------------------
# FSDP2 under torchrun


# The launch matrix: the training scripts under torchrun (2 ranks, gloo, CPU), in the
# configurations users start them with, pairwise over task x precision x compile x data:
#   test                                           task precision compile data        also
#   ..._i2i_fp32_eager_on_the_fly_equals_one_rank  i2i  fp32      eager   on the fly  --grad-accum 2, guided grid
#                                                                                     between checkpoints; = 1 rank
#   ..._i2i_bf16_compiled_cache_resumes_on_one_rank i2i bf16      compile cache       grid between checkpoints;
#                                                                                     2-rank checkpoint, 1-rank resume
#   ..._t2i_bf16_compiled_on_the_fly               t2i  bf16      compile on the fly  guided grid between checkpoints
#   ..._t2i_fp32_eager_caches_equal_one_rank       t2i  fp32      eager   image+text  --grad-accum 2, guided grid; = 1 rank
#                                                                         caches
#   ..._nvs_bf16_eager_exact_timesteps             nvs  bf16      eager   on the fly  guided grid; exact t, fp32 residual
#                                                                                     stream; 1 rank within the bf16 bound
#   ..._nvs_fp32_compiled_grad_accum               nvs  fp32      compile on the fly  --grad-accum 2, grid
# (NVS has no feature cache.) Every grid falls between checkpoints, so an EMA update follows it.

LAUNCH_SIZE = ["--depth", "2", "--hidden-size", "32", "--num-heads", "2"]
LAUNCH_LOOP = ["--global-batch-size", "8", "--log-every", "1", "--sample-steps", "2", "--num-samples", "4"]
LAUNCH_NVS = ["--init", "scratch", "--model", "DiT-S/4", *LAUNCH_SIZE, *LAUNCH_LOOP, "--image-size", "16",
              "--data", "multiview:4", "--held-out-objects", "1", "--steps", "3", "--ckpt-every", "3",
              "--sample-every", "2"]


@pytest.fixture(scope="module")
def launch_assets(tmp_path_factory):
    """Tiny random encoders, a feature cache of shapes:16 at 32 px and its text cache."""
    root = tmp_path_factory.mktemp("launch")
    vae_dir, dino_dir = tiny_encoders(root)
    write_cache(root / "cache", vae_dir, dino_dir, "shapes:16")
    train_t2i.main(["cache-text", "--data", f"cache:{root / 'cache'}", "--out", str(root / "text"),
                    "--image-size", "32", "--num-samples", "4"])
    return {"vae": vae_dir, "dino": dino_dir, "cache": f"cache:{root / 'cache'}", "text": str(root / "text")}


def assert_launched(result, out, steps, grids):
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in line] \
        == list(range(1, steps + 1))
    assert sorted(os.listdir(os.path.join(out, "samples"))) == [f"step_{step:07d}.png" for step in grids]


@pytest.mark.slow
def test_launch_i2i_fp32_eager_on_the_fly_equals_one_rank(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Grids at 2 and 4 with a checkpoint at 4 only: EMA updates follow the step-2 grid (it once
    # left the EMA's root unsharded) and the grid is guided (it once bypassed FSDP's hooks).
    common = SCALE_RUN + ["--global-batch-size", "8", "--ckpt-every", "4", "--sample-every", "2", "--cfg-scale", "2"]
    train_i2i.main(common + ["--out", str(one), "--steps", "5"])
    # 2 ranks x 2 micro-batches of 2 (gradient sync only on the last) = 1 rank x 8.
    result = torchrun("train_i2i.py", *common, "--out", two, "--steps", "4", "--grad-accum", "2")
    assert_launched(result, two, 4, [2, 4])
    assert result.stdout.count("from scratch") == 1  # rank 0 alone prints and writes
    assert sorted(os.listdir(two)) == ["checkpoints", "ema.safetensors", "metrics.jsonl", "samples"]
    export_at_4 = load_file(two / "ema.safetensors")  # gathered from both ranks' shards by rank 0
    train_i2i.main(common + ["--out", str(two), "--steps", "5", "--resume"])  # 1 rank continues
    assert logged(two, "step") == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm"):  # the loss all-reduced, the norm clipped over all shards
        assert logged(two, key) == pytest.approx(logged(one, key), rel=TOLERANCE)
    assert_same_weights(export_at_4, checkpoint_weights(checkpoint(one, 4), "ema"))
    for step in (4, 5):
        for part in ("model", "ema"):
            assert_same_weights(checkpoint_weights(checkpoint(two, step), part),
                                checkpoint_weights(checkpoint(one, step), part))


@pytest.mark.slow
def test_launch_i2i_bf16_compiled_cache_resumes_on_one_rank(tmp_path, launch_assets):
    common = ["--model", "DiT-S/2", *LAUNCH_SIZE, *LAUNCH_LOOP, "--image-size", "32", "--vae", launch_assets["vae"],
              "--encoder", launch_assets["dino"], "--data", launch_assets["cache"], "--precision", "bf16",
              "--compile", "--ckpt-every", "3", "--sample-every", "2", "--out", str(tmp_path)]
    result = torchrun("train_i2i.py", *common, "--steps", "3")
    assert_launched(result, tmp_path, 3, [2, 3])
    train_i2i.main(common + ["--steps", "4", "--resume"])  # the 2-rank bf16 checkpoint on 1 rank
    assert logged(tmp_path, "step") == [1, 2, 3, 4] and np.isfinite(logged(tmp_path, "loss")).all()
    assert sorted(os.listdir(tmp_path / "samples")) == ["step_0000002.png", "step_0000003.png", "step_0000004.png"]


@pytest.mark.slow
def test_launch_t2i_bf16_compiled_on_the_fly(tmp_path, i2i_run):
    result = torchrun("train_t2i.py", "--init", i2i_run / "ema.safetensors", "--model", "DiT-S/4",
                      "--image-size", "16", "--data", "shapes:64", *LAUNCH_LOOP, "--precision", "bf16", "--compile",
                      "--steps", "3", "--ckpt-every", "3", "--sample-every", "2", "--cfg-scale", "4.5", "--out", tmp_path)
    assert_launched(result, tmp_path, 3, [2, 3])
    assert np.isfinite(logged(tmp_path, "loss")).all()


@pytest.mark.slow
def test_launch_t2i_fp32_eager_caches_equal_one_rank(tmp_path, launch_assets):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--init", "scratch", "--model", "DiT-S/2", *LAUNCH_SIZE, *LAUNCH_LOOP, "--image-size", "32",
              "--vae", launch_assets["vae"], "--data", launch_assets["cache"], "--text-cache", launch_assets["text"],
              "--steps", "3", "--ckpt-every", "3", "--sample-every", "2", "--cfg-scale", "4.5"]
    result = torchrun("train_t2i.py", *common, "--grad-accum", "2", "--out", two)
    assert_launched(result, two, 3, [2, 3])
    train_t2i.main(common + ["--out", str(one)])
    assert logged(two, "loss") == pytest.approx(logged(one, "loss"), rel=TOLERANCE)
    assert_same_weights(load_file(two / "ema.safetensors"), load_file(one / "ema.safetensors"))


# Runs a training script as torchrun starts it, recording what reaches the model in training:
# the timesteps at the timestep embedder beside those the loop drew, and the dtypes of the
# condition and of the residual stream entering each block. Written to out/seen_<rank>.json.
RECORDING_LAUNCHER = """
import json, os, runpy, sys
import torch
sys.path.insert(0, {repo!r})
import dit, train_i2i
seen = {{"drawn": [], "t": [], "y": [], "residual": []}}
draw, embed, forward, block = (train_i2i.sample_randomness, dit.TimestepEmbedder.forward, dit.LumosDiT.forward,
                               dit.LumosBlock.forward)

def sample_randomness(*args):
    drawn = draw(*args)
    seen["drawn"] += drawn[1].tolist()
    return drawn

def timestep_embedder(self, t):
    if torch.is_grad_enabled():
        seen["t"] += t.tolist()
    return embed(self, t)

def model_forward(self, x, t, y, *args, **kwargs):
    if torch.is_grad_enabled():
        seen["y"].append(str(y.dtype))
    return forward(self, x, t, y, *args, **kwargs)

def block_forward(self, x, *args):
    if torch.is_grad_enabled():
        seen["residual"].append(str(x.dtype))
    return block(self, x, *args)

train_i2i.sample_randomness, dit.TimestepEmbedder.forward = sample_randomness, timestep_embedder
dit.LumosDiT.forward, dit.LumosBlock.forward = model_forward, block_forward
script, out = sys.argv[1], sys.argv[sys.argv.index("--out") + 1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
with open(os.path.join(out, "seen_%s.json" % os.environ.get("RANK", 0)), "w") as f:
    json.dump(seen, f)
"""


@pytest.mark.slow
def test_launch_nvs_bf16_eager_exact_timesteps(tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(RECORDING_LAUNCHER.format(repo=REPO))
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["train_nvs.py", *LAUNCH_NVS, "--precision", "bf16", "--cfg-scale", "3"]
    result = torchrun(launcher, *common, "--out", two)
    assert_launched(result, two, 3, [2, 3])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, launcher, *common, "--out", one], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert_launched(single, one, 3, [2, 3])
    reference = json.loads((one / "seen_0.json").read_text())
    for seen in (json.loads((two / f"seen_{rank}.json").read_text()) for rank in (0, 1)):
        # The timesteps the loop drew reach the embedder exactly (FSDP's input cast once made 999
        # 1000 and 517 516 in bf16); the residual stream stays fp32 as autocast keeps it, and the
        # condition tokens have the dtype they have on one rank (NVS's pose mixer runs under autocast).
        assert seen["t"] == seen["drawn"] and len(seen["t"]) == 12
        assert set(seen["residual"]) == {"torch.float32"} and set(seen["y"]) == set(reference["y"])
    assert reference["t"] == reference["drawn"] and len(reference["t"]) == 24
    # bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 = 0.2 %. Two ranks
    # run each matmul on half the batch, so the fp32 accumulation order differs and a product may
    # round to the neighbouring bf16 value; gradients are reduced in fp32 either way. The loss is
    # a mean of 8 x 3 x 16 x 16 squared errors, mostly the fp32 noise's own energy early on, so
    # such roundings move it far less than one bf16 step: we allow half of one (1e-3); here, on
    # AMD EPYC, the two differ by 2e-6. Exact timesteps and dtypes are checked above, not by this.
    assert logged(two, "loss") == pytest.approx(logged(one, "loss"), rel=1e-3)


@pytest.mark.slow
def test_launch_nvs_fp32_compiled_grad_accum(tmp_path):
    result = torchrun("train_nvs.py", *LAUNCH_NVS, "--compile", "--grad-accum", "2", "--out", tmp_path)
    assert_launched(result, tmp_path, 3, [2, 3])
    assert np.isfinite(logged(tmp_path, "loss")).all()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batch", "resume"])
def test_bad_arguments_under_torchrun_give_one_line_and_every_rank_exits(tmp_path, case):
    if case == "batch":
        extra, message = ["--global-batch-size", "6", "--grad-accum", "2"], \
            "--global-batch-size 6 must be divisible by world size 2 x --grad-accum 2"
    else:
        train_i2i.main(SCALE_RUN + ["--out", str(tmp_path), "--steps", "1", "--global-batch-size", "8"])
        extra, message = ["--resume", "--global-batch-size", "16"], "global_batch_size: 8 -> 16"
    result = torchrun("train_i2i.py", *SCALE_RUN, "--out", tmp_path, "--steps", "2", *extra)
    errors = [line for line in result.stderr.splitlines() if "train_i2i.py: error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    # torchrun's failure report names each rank with its exit code: 2, or SIGTERM (-15) from
    # torchrun itself when the other rank's exit came first; the one line was printed before.
    exit_codes = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\n\s+exitcode\s+: (-?\d+)", result.stderr))
    assert result.returncode != 0 and set(exit_codes) == {"0", "1"}, result.stderr[-3000:]
    assert "2" in exit_codes.values() and set(exit_codes.values()) <= {"2", "-15"}
    assert "Traceback" not in result.stderr.split("train_i2i.py: error:")[0]


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_compiled_training_step_matches_eager_and_keeps_plain_keys(tmp_path):
    common = SCALE_RUN + ["--steps", "1", "--global-batch-size", "4", "--sample-every", "0"]
    train_i2i.main(common + ["--out", str(tmp_path / "eager")])
    torch._dynamo.utils.counters.clear()
    train_i2i.main(common + ["--out", str(tmp_path / "compiled"), "--compile", "--grad-checkpointing"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    assert logged(tmp_path / "compiled", "loss") == pytest.approx(logged(tmp_path / "eager", "loss"), rel=TOLERANCE)
    eager, compiled = (checkpoint(tmp_path / name, 1) for name in ("eager", "compiled"))
    assert_same_weights(checkpoint_weights(compiled, "model"), checkpoint_weights(eager, "model"))
    saved_keys = [set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata) for path in (eager, compiled)]
    assert saved_keys[1] == saved_keys[0] and "model.blocks.0.attn.qkv.weight" in saved_keys[1]


# ---------------------------------------------------------------------------------------------
# The feature cache


def test_cached_batches_equal_encoding_on_the_fly(tmp_path, monkeypatch):
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    cache = write_cache(tmp_path / "cache", vae_dir, dino_dir, "shapes:12", shard_size=5)
    round_encoders_like_the_cache(monkeypatch)  # on the fly through the 16-bit format: see the compact caches
    images = data.open_dataset("shapes:12", 32)
    space = train_i2i.ImageSpace(encoders.VAE.from_pretrained(vae_dir))
    dino = encoders.DINOEncoder.from_pretrained(dino_dir)
    condition = train_i2i.image_condition(dino)
    batches = [next(iter(data.make_loader(source, 12, 12, seed=3))) for source in (images, cache)]
    assert torch.equal(batches[0]["index"], batches[1]["index"]) and batches[0]["caption"] == batches[1]["caption"]
    flips, _, _, _, posterior = train_i2i.sample_randomness(batches[0]["global_index"], 0, (4, 4, 4), 1000, 0.1, True)
    assert flips.any() and not flips.all()
    on_the_fly, cached = (train_i2i.mirrored(batch, flips) for batch in batches)
    target = train_i2i.diffusion_targets(on_the_fly, posterior, space)
    assert_close_to_scale(train_i2i.diffusion_targets(cached, posterior, space), target, COMPACT_STEP)
    # The condition is of the target's own image, mirrored where the target is, in both paths.
    mirror_images = torch.where(flips[:, None, None, None], batches[0]["image"].flip(-1), batches[0]["image"])
    expected = dino.encode(mirror_images)[:, None]
    assert_close_to_scale(condition(on_the_fly, space)["y"], expected, TOLERANCE)
    assert_close_to_scale(train_i2i.cached_condition(cached, space)["y"], expected, COMPACT_STEP)
    assert (expected[flips] - dino.encode(batches[0]["image"])[flips][:, None]).abs().max() > 1e-3  # DINO sees the flip
    # The grids' references: decoded cached means, what the VAE makes of the (mirrored) images.
    references = space.decode(space.encode(mirror_images))
    assert_close_to_scale(train_i2i.reference_images(cached, space), references, COMPACT_STEP)


def test_training_conditions_on_the_very_image_it_denoises(tmp_path, monkeypatch):
    """I2I in the loop: a mirrored target's condition is the mirrored image's, never the original's."""
    seen = {"original": [], "target": [], "condition": []}
    mirrored, encode, dino_encode = train_i2i.mirrored, train_i2i.ImageSpace.encode, encoders.DINOEncoder.encode
    monkeypatch.setattr(train_i2i, "mirrored", lambda batch, flips: seen["original"].append(
        (batch["image"].clone(), flips.clone())) or mirrored(batch, flips))
    monkeypatch.setattr(train_i2i.ImageSpace, "encode",
                        lambda self, images, *a: seen["target"].append(images.clone()) or encode(self, images, *a))
    monkeypatch.setattr(encoders.DINOEncoder, "encode",
                        lambda self, images: seen["condition"].append(images.clone()) or dino_encode(self, images))
    train_i2i.main(SCALE_RUN + ["--out", str(tmp_path), "--steps", "2", "--global-batch-size", "8",
                                "--sample-every", "0", "--ckpt-every", "0"])
    (_, no_flips), *steps = seen["original"]  # the grids' held-out batch first, never mirrored
    assert not no_flips.any() and len(steps) == 2
    for (images, flips), target, condition in zip(steps, seen["target"], seen["condition"]):
        assert flips.any() and not flips.all()
        assert torch.equal(target, torch.where(flips[:, None, None, None], images.flip(-1), images))
        assert torch.equal(condition, target)


def test_restart_skips_finished_shards_and_refuses_other_settings(tmp_path):
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    root = tmp_path / "cache"
    first = write_cache(root, vae_dir, dino_dir)  # 10 items in shards of 4, 4, 2
    before = {shard: load_file(data.cache_shard_path(root, shard)) for shard in range(3)}
    os.remove(data.cache_shard_path(root, 1))
    with open(data.cache_shard_path(root, 1) + ".tmp", "wb") as f:
        f.write(b"cut off by a kill")
    with pytest.raises(FileNotFoundError, match="incomplete: 1 of 3 shards missing"):
        data.FeatureCache(root)
    finished = {shard: os.stat(data.cache_shard_path(root, shard)).st_mtime_ns for shard in (0, 2)}
    settings = {"data": "shapes:10", "seed": 0, "image_size": 32, "vae": vae_dir, "encoder": dino_dir}
    vae, dino = encoders.VAE.from_pretrained(vae_dir), encoders.DINOEncoder.from_pretrained(dino_dir)
    written = data.write_feature_cache(data.open_dataset("shapes:10", 32), root, vae, dino, settings, 4,
                                       log=lambda line: None)
    assert written == [1]
    assert {shard: os.stat(data.cache_shard_path(root, shard)).st_mtime_ns for shard in (0, 2)} == finished
    for key, tensor in load_file(data.cache_shard_path(root, 1)).items():  # fp16: up to one step apart
        assert_close_to_scale(tensor, before[1][key], COMPACT_STEP)
    assert len(data.FeatureCache(root)) == len(first) == 10
    with pytest.raises(ValueError, match="image_size: 32 -> 64"):
        data.write_feature_cache(data.open_dataset("shapes:10", 64), root, vae, dino,
                                 {**settings, "image_size": 64}, 4)


def test_training_refuses_a_cache_of_other_encoders_or_size(tmp_path, capsys):
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    write_cache(tmp_path / "cache", vae_dir, dino_dir)
    run = SCALE_RUN + ["--data", f"cache:{tmp_path / 'cache'}", "--out", str(tmp_path / "run")]
    for extra, message in [(["--image-size", "32", "--vae", vae_dir], f"was made with --vae {vae_dir} --encoder {dino_dir}"),
                           (["--image-size", "64", "--vae", vae_dir, "--encoder", dino_dir], "pass --image-size 32")]:
        with pytest.raises(SystemExit) as exit_info:
            train_i2i.main(run + extra)
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in error and "\n" not in error


@pytest.mark.slow
def test_two_rank_extraction_covers_every_image_once(tmp_path):
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    root = tmp_path / "cache"
    result = torchrun("data.py", "cache", "--data", "shapes:10", "--out", root, "--vae", vae_dir, "--encoder", dino_dir,
                      "--image-size", "32", "--shard-size", "3", "--batch-size", "2", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    writes = [line.split(" ")[:4] for line in result.stdout.splitlines() if ": wrote " in line]
    assert sorted(path for *_, path in writes) == [data.cache_shard_path(str(root), k) for k in range(4)]
    assert {rank for _, rank, *_ in writes} == {"0:", "1:"}  # both ranks wrote, no shard twice
    assert sorted(os.listdir(root)) == ["cache.json"] + [f"shard_{k:05d}.safetensors" for k in range(4)]
    indices = torch.cat([load_file(data.cache_shard_path(root, k))["index"] for k in range(4)])
    assert indices.tolist() == list(range(10))
    single = write_cache(tmp_path / "single", vae_dir, dino_dir, shard_size=3)
    cache = data.FeatureCache(root)
    for i in range(10):
        for key in ("latent_mean", "latent_std", "cond"):  # fp16 (std: |logvar| < 1 here): one step apart at most
            assert_close_to_scale(cache[i][key], single[i][key], COMPACT_STEP)
        assert cache[i]["caption"] == single[i]["caption"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_from_the_cache_matches_on_the_fly_without_running_the_encoders(tmp_path, monkeypatch, precision):
    # In bf16 too: the frozen encoders run in fp32 in both paths and the on-the-fly run rounds
    # their outputs as the 16-bit cache stores them, so both train on the same targets and
    # conditions, and the bf16 forward sees the same inputs.
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    write_cache(tmp_path / "cache", vae_dir, dino_dir, "shapes:16")
    round_encoders_like_the_cache(monkeypatch)
    run = SCALE_RUN + ["--image-size", "32", "--vae", vae_dir, "--encoder", dino_dir, "--global-batch-size", "4",
                      "--steps", "3", "--sample-every", "3", "--precision", precision]
    train_i2i.main(run + ["--data", "shapes:16", "--out", str(tmp_path / "on_the_fly")])

    def must_not_run(*args, **kwargs):
        raise AssertionError("an encoder ran during training from the cache")

    monkeypatch.setattr(train_i2i, "load_image_encoder", must_not_run)
    monkeypatch.setattr(encoders.VAE, "encode", must_not_run)
    train_i2i.main(run + ["--data", f"cache:{tmp_path / 'cache'}", "--out", str(tmp_path / "cached")])
    assert logged(tmp_path / "cached", "loss") == pytest.approx(logged(tmp_path / "on_the_fly", "loss"), rel=TOLERANCE)
    assert_same_weights(load_file(tmp_path / "cached" / "ema.safetensors"),
                        load_file(tmp_path / "on_the_fly" / "ema.safetensors"))
    assert os.path.exists(tmp_path / "cached" / "samples" / "step_0000003.png")
    with safe_open(tmp_path / "cached" / "ema.safetensors", "pt") as f:
        assert json.loads(f.metadata()["lumos"])["vae"] == vae_dir


####################################################################################################
# sample
####################################################################################################

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A 1-step tiny I2I run's ema.safetensors and two reference images."""
    out = tmp_path_factory.mktemp("run")
    train_i2i.main(["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
                    "--image-size", "16", "--data", "shapes:64", "--global-batch-size", "4", "--steps", "1",
                    "--sample-steps", "2", "--num-samples", "2", "--out", str(out)])
    images = []
    for i in range(2):
        path = out / f"ref{i}.png"
        Image.fromarray(data.center_crop_arr(Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)), 16)).save(path)
        images.append(str(path))
    return str(out / "ema.safetensors"), images


def test_i2i_and_interpolate_write_images_and_grid(tmp_path, tiny_export):
    export, images = tiny_export
    sample.main(["i2i", "--ckpt", export, "--images", *images, "--per-image", "2", "--steps", "2",
                 "--out", str(tmp_path / "i2i")])
    assert sorted(os.listdir(tmp_path / "i2i")) == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png"]
    sample.main(["interpolate", "--ckpt", export, "--images", *images, "--frames", "3", "--steps", "2",
                 "--method", "ddim", "--out", str(tmp_path / "interp")])
    frames = [np.asarray(Image.open(tmp_path / "interp" / f"{i:06d}.png")) for i in range(3)]
    assert frames[0].shape == (16, 16, 3)


def test_interpolation_shares_noise_and_mixes_features(tiny_export):
    export, images = tiny_export
    args = sample.main.__globals__["argparse"].Namespace(images=images, frames=3)
    model, info = sample.load_generator(export, torch.device("cpu"))
    _, cond_fn = sample.interpolation_conditions(args, info, None, torch.device("cpu"))
    y = cond_fn([0, 1, 2])["y"][:, 0]
    torch.testing.assert_close(y[1], (y[0] + y[2]) / 2)  # the noise: see the interpolation tests below


@pytest.mark.slow
def test_many_samples_under_torchrun_no_overlap_no_gaps_restart_safe(tmp_path, tiny_export):
    export, images = tiny_export
    out = tmp_path / "many"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "sample.py", "i2i", "--ckpt", export, "--images", *images, "--num-samples", "7",
               "--steps", "2", "--batch-size", "2", "--out", str(out)]
    subprocess.run(command, cwd=HERE, check=True, capture_output=True)
    first = np.load(str(out) + ".npz")["arr_0"]
    assert first.shape == (7, 16, 16, 3) and first.dtype == np.uint8
    assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(7)]
    kept = os.path.getmtime(out / "000000.png")
    os.remove(out / "000003.png")
    os.remove(out / "000006.png")
    subprocess.run(command, cwd=HERE, check=True, capture_output=True)
    assert os.path.getmtime(out / "000000.png") == kept  # existing samples are not redone
    np.testing.assert_array_equal(np.load(str(out) + ".npz")["arr_0"], first)
    # Seeds are per global index: one rank with another batch size makes the same samples.
    sample.main(["i2i", "--ckpt", export, "--images", *images, "--num-samples", "7", "--steps", "2",
                 "--batch-size", "3", "--out", str(tmp_path / "one")])
    single = np.load(str(tmp_path / "one") + ".npz")["arr_0"]
    assert np.abs(single.astype(int) - first.astype(int)).max() <= 1


def tiny_hub_encoders(folder):
    """A DINO-layout ViT of width 768 (the official condition width) and a 3-level SD-VAE layout
    (8x downsampling), both random, in the Hub file layouts."""
    from diffusers import AutoencoderKL
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(folder / "dino")
    AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=32,
                  latent_channels=4).save_pretrained(folder / "vae")
    return str(folder / "dino"), str(folder / "vae")


@pytest.mark.slow
def test_official_layout_checkpoint_loads_and_samples(tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in DiT_models["DiT-XL/2"]().state_dict().items()}
    official = {key: 0.02 * torch.randn(shape) for key, shape in shapes.items()}  # official keys and shapes
    torch.save({"state_dict": official}, tmp_path / "Lumos_I2I.pth")
    del official
    dino, vae = tiny_hub_encoders(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    sample.main(["i2i", "--ckpt", str(tmp_path / "Lumos_I2I.pth"), "--images", str(tmp_path / "ref.png"),
                 "--per-image", "1", "--steps", "2", "--method", "ddim", "--cfg-scale", "1", "--vae", vae, "--encoder", dino,
                 "--out", str(tmp_path / "out")])
    assert np.asarray(Image.open(tmp_path / "out" / "000000.png")).shape == (256, 256, 3)


def test_official_multiscale_checkpoint_gets_a_clear_message(tmp_path, capsys):
    torch.save({"csize_embedder.mlp.0.weight": torch.zeros(2, 2)}, tmp_path / "t2i_1024.pth")
    with pytest.raises(SystemExit):
        sample.main(["i2i", "--ckpt", str(tmp_path / "t2i_1024.pth"), "--images", "x.png"])
    assert "multi-scale" in capsys.readouterr().err


def pngs(folder, count):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))).astype(int) for i in range(count)])


# ---------------------------------------------------------------------------------------------
# All of sample i's randomness from (seed, i)

@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_per_sample_generators_make_sampler_noise_independent_of_batch_mates(method, eta):
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    model_fn = lambda x, t: 0.1 * x  # noqa: E731  (an epsilon "model": the added noise is what matters)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    seeded = lambda i: torch.Generator().manual_seed(100 + i)  # noqa: E731
    together = diffusion.sample(model_fn, noise, method, 4, eta=eta, generator=[seeded(i) for i in range(3)])
    for i in range(3):
        alone = diffusion.sample(model_fn, noise[i:i + 1], method, 4, eta=eta, generator=[seeded(i)])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        diffusion.sample(model_fn, noise, method, 4, eta=eta, generator=[seeded(0), seeded(1)])


def test_ddpm_samples_do_not_depend_on_batch_size(tmp_path, tiny_export):
    export, images = tiny_export
    common = ["i2i", "--ckpt", export, "--images", images[0], "--per-image", "3", "--method", "ddpm", "--steps", "3"]
    for batch_size in (1, 3):
        sample.main(common + ["--batch-size", str(batch_size), "--out", str(tmp_path / str(batch_size))])
    one, three = pngs(tmp_path / "1", 3), pngs(tmp_path / "3", 3)
    assert np.abs(one - three).max() <= 1  # float sums in another batch order: at most a rounding step
    assert np.abs(one[0] - one[1]).max() > 10 and np.abs(one[1] - one[2]).max() > 10  # one condition, other noise


# ---------------------------------------------------------------------------------------------
# Interpolate --num-samples N cycles through all --frames

def test_interpolation_frames_share_all_noise_and_each_run_of_frames_gets_new_noise():
    noise = sample.initial_noise(sample.sample_generators([0, 1, 2, 3], seed=0, frames=3), (3, 4, 4))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[3])
    assert not torch.equal(*sample.initial_noise(sample.sample_generators([0, 1], seed=0), (3, 4, 4)))


def test_interpolate_num_samples_cycles_through_every_frame(tmp_path, tiny_export, monkeypatch):
    export, images = tiny_export
    rows_seen = []
    generate = sample.generate

    def spy(model, info, space, cond_fn, indices, rows, args, device):
        rows_seen.extend(rows)
        return generate(model, info, space, cond_fn, indices, rows, args, device)

    monkeypatch.setattr(sample, "generate", spy)
    common = ["interpolate", "--ckpt", export, "--images", *images, "--frames", "3", "--steps", "2",
              "--method", "ddpm"]
    sample.main(common + ["--num-samples", "6", "--batch-size", "4", "--out", str(tmp_path / "many")])
    assert rows_seen == [0, 1, 2, 0, 1, 2]
    sample.main(common + ["--out", str(tmp_path / "few")])
    many, few = pngs(tmp_path / "many", 6), pngs(tmp_path / "few", 3)
    assert np.abs(many[:3] - few).max() <= 1  # the first interpolation is the one without --num-samples
    assert np.abs(many[3:] - many[:3]).max() > 10  # the second one has noise of its own


# ---------------------------------------------------------------------------------------------
# A bad checkpoint or image file is one line and exit status 2

class CodePayload:
    """Unpickling this runs a shell command: torch.load(weights_only=True) must refuse it unrun."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bad_files(tiny_export, tmp_path_factory):
    """{kind: path} of broken files, plus a marker path that the payload would create if it ran."""
    export, _ = tiny_export
    folder = tmp_path_factory.mktemp("bad")
    with open(export, "rb") as f:
        blob = f.read()
    files = {"truncated.safetensors": blob[: len(blob) // 2], "not_a_zip.pth": b"not a torch.save zip file\n" * 20,
             "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, "not_an_image.jpg": b"plain text\n"}
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    marker = folder / "payload_ran"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "hook": CodePayload(marker)}, folder / "payload.pth")
    return {name: str(folder / name) for name in [*files, "payload.pth"]}, marker


def run_script(cwd, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(result, path, prog, what):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: ") and path in lines[0] and what in lines[0], lines[0]


BAD_CHECKPOINTS = {"truncated.safetensors": "not a readable safetensors file",
                   "not_a_zip.pth": "not a torch.save checkpoint",
                   "payload.pth": "GLOBAL posix.system"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*BAD_CHECKPOINTS, "corrupt.png", "not_an_image.jpg"])
def test_sample_reports_a_bad_file_in_one_line(kind, bad_files, tiny_export, tmp_path):
    files, marker = bad_files
    export, images = tiny_export
    ckpt, image = (files[kind], images[0]) if kind in BAD_CHECKPOINTS else (export, files[kind])
    result = run_script(tmp_path, os.path.join(REPO, "sample.py"), "i2i", "--ckpt", ckpt, "--images", image,
                        "--out", tmp_path / "out")
    assert_one_line_error(result, files[kind], "sample.py", BAD_CHECKPOINTS.get(kind, "not an image PIL can read"))
    assert not marker.exists()  # the payload was refused, never run


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_finetune_init_reports_a_bad_checkpoint_in_one_line(kind, bad_files, tmp_path):
    files, marker = bad_files
    result = run_script(tmp_path, os.path.join(REPO, "train_t2i.py"), "--init", files[kind], "--out", tmp_path / "t2i")
    assert_one_line_error(result, files[kind], "train_t2i.py", BAD_CHECKPOINTS[kind])
    assert not marker.exists()


####################################################################################################
# t2i
####################################################################################################

TINY_MODEL = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "32", "--num-heads", "2", "--image-size", "16"]
TINY_LOOP = ["--global-batch-size", "8", "--steps", "3", "--sample-every", "1000", "--sample-steps", "2",
             "--num-samples", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def i2i_run(tmp_path_factory):
    """A 1-step tiny I2I run folder: its checkpoint and its ema.safetensors export."""
    out = tmp_path_factory.mktemp("i2i")
    train_i2i.main(TINY_MODEL + ["--data", "shapes:64", "--global-batch-size", "4", "--steps", "1",
                                 "--sample-every", "0", "--out", str(out)])
    return out


def t2i_args(*argv):
    return train_t2i.add_t2i_args(argparse.ArgumentParser()).parse_args(list(argv))


def write_captioned_folder(root, captions):
    """16x16 images 000.png, ...; caption None: no .txt, otherwise a sidecar .txt with that text."""
    root.mkdir()
    for i, caption in enumerate(captions):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(root / f"{i:03d}.png")
        if caption is not None:
            (root / f"{i:03d}.txt").write_text(caption)
    return root


def metric_lines(out):
    with open(out / "metrics.jsonl") as f:
        return [line for line in map(json.loads, f) if "loss" in line]


def test_transfer_carries_every_i2i_weight_and_initialises_the_condition_anew(i2i_run, capsys):
    export = str(i2i_run / "ema.safetensors")
    args = t2i_args("--init", export)
    state, info = train_t2i.resolve_init(args)
    assert (args.model, args.image_size, args.vae, args.encoder) == ("DiT-S/4", 16, None, train_t2i.RANDOM_T5)
    torch.manual_seed(0)
    model = train_t2i.t2i_model(args, state, info, text_width=64)
    torch.manual_seed(0)
    fresh = LumosDiT(**{**info["config"], "cond_dim": 64, "cond_tokens": 120})
    weights, fresh_weights = model.state_dict(), fresh.state_dict()
    carried = [k for k in weights if k not in train_t2i.NEW_KEYS]
    assert len(carried) == len(state) - len(train_t2i.NEW_KEYS)
    for key in carried:
        assert torch.equal(weights[key], state[key]), key
    for key in train_t2i.NEW_KEYS:
        assert torch.equal(weights[key], fresh_weights[key]), key
    assert weights["y_embedder.y_embedding"].shape == (120, 64)
    assert state["y_embedder.y_embedding"].shape[1] != 64  # the I2I condition is the random ViT's width
    assert weights["y_embedder.y_proj.fc1.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert not weights["y_embedder.y_proj.fc1.bias"].any() and not weights["y_embedder.y_proj.fc2.bias"].any()
    assert weights["y_embedder.y_embedding"].std().item() == pytest.approx(64 ** -0.5, rel=0.1)
    printed = capsys.readouterr().out
    assert "loaded 41 tensors" in printed and "new (T5 condition of width 64" in printed


def test_transfer_rejects_unexpected_and_missing_keys(i2i_run):
    args = t2i_args("--init", str(i2i_run / "ema.safetensors"))
    state, info = train_t2i.resolve_init(args)
    with pytest.raises(ValueError, match="1 unexpected .*blocks.7.attn.qkv.weight"):
        train_t2i.t2i_model(args, {**state, "blocks.7.attn.qkv.weight": torch.zeros(96, 32)}, info, 64)
    without = {k: v for k, v in state.items() if k != "blocks.0.mlp.fc1.weight"}
    with pytest.raises(ValueError, match="1 missing .*blocks.0.mlp.fc1.weight"):
        train_t2i.t2i_model(args, without, info, 64)


def test_init_from_run_folder_and_official_pth_equal_the_export(i2i_run, tmp_path, monkeypatch):
    export_state, _ = train_i2i.load_i2i_init(str(i2i_run / "ema.safetensors"))
    run_state, _ = train_t2i.resolve_init(t2i_args("--init", str(i2i_run)))
    # The official release nests a plain state dict; its sizes are read off the tensors, so the tiny
    # model must be a known size: register it for this test.
    monkeypatch.setitem(train_nvs.DiT_models, "DiT-T/4",
                        functools.partial(LumosDiT, depth=2, hidden_size=32, num_heads=2, patch_size=4))
    torch.save({"state_dict": export_state}, tmp_path / "Lumos_I2I.pth")
    args = t2i_args("--init", str(tmp_path / "Lumos_I2I.pth"))
    official_state, info = train_t2i.resolve_init(args)
    assert (args.model, args.image_size, args.vae) == ("DiT-T/4", 16, None)
    for key, value in export_state.items():
        assert torch.equal(run_state[key], value) and torch.equal(official_state[key], value), key
    train_t2i.t2i_model(args, official_state, info, text_width=64)


def test_uncaptioned_images_are_skipped_and_named(tmp_path):
    folder = write_captioned_folder(tmp_path / "pairs", ["a red circle", None, "  \n", "a blue star", None])
    dataset = train_t2i.SkipUncaptioned(data.open_dataset(str(folder), 16))
    first, second, last = dataset[0], dataset[1], dataset[4]
    assert (first["caption"], first["skipped"]) == ("a red circle", [])
    assert second["caption"] == "a blue star" and second["index"] == 1
    assert second["skipped"] == [f"{folder}/001.png (no caption)", f"{folder}/002.png (no caption)"]
    assert last["caption"] == "a red circle" and last["skipped"] == [f"{folder}/004.png (no caption)"]
    first_two = train_t2i.FirstCaptioned(data.open_dataset(str(folder), 16), 2)
    assert [item["caption"] for item in first_two] == ["a red circle", "a blue star"]
    assert first_two.skipped == [f"{folder}/001.png", f"{folder}/002.png"]
    with pytest.raises(ValueError, match="--n-captions 3: .* has only 2 captioned images"):
        train_t2i.FirstCaptioned(data.open_dataset(str(folder), 16), 3)
    bare = write_captioned_folder(tmp_path / "bare", [None, ""])
    with pytest.raises(RuntimeError, match="has a caption"):
        train_t2i.SkipUncaptioned(data.open_dataset(str(bare), 16))[0]


def test_tar_captions_empty_json_is_skipped(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    members = {"a.png": png.getvalue(), "a.json": json.dumps({"caption": ""}).encode(),
               "b.png": png.getvalue(), "b.json": json.dumps({"text": "a green cross"}).encode(),
               "c.png": png.getvalue()}
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shards = data.open_dataset(str(tmp_path / "shard.tar"), 16)
    assert [train_t2i.read_caption(shards, j) for j in range(3)] == ["", "a green cross", ""]
    item = train_t2i.SkipUncaptioned(shards)[0]
    assert item["caption"] == "a green cross" and item["skipped"] == [f"{tmp_path}/shard.tar:a.png (no caption)"]


def test_every_shapes_word_is_in_the_random_t5_vocabulary():
    tokenizer = train_t2i.random_text_encoder(train_t2i.random_t5_description(), torch.device("cpu")).tokenizer
    captions = [data.shapes_caption(data.sample_shape_attrs(0, i)) for i in range(300)]
    assert any(" an " in c for c in captions)
    for caption in captions:
        ids = tokenizer.encode(caption)
        assert tokenizer.unk_id not in ids and len(ids) == len(caption.split()) + 1, caption
    assert tokenizer.encode("a zebra")[1] == tokenizer.unk_id


def test_cache_text_encodes_each_caption_once_and_matches_online(tmp_path, monkeypatch):
    captions = ["a red circle", "a blue star", "a red circle", None, "a large green square at the top left",
                "a blue star", "a red circle on a white background"]
    folder = write_captioned_folder(tmp_path / "pairs", captions)
    encoded = []
    token_features = train_t2i.TextEncoder.token_features
    monkeypatch.setattr(train_t2i.TextEncoder, "token_features",
                        lambda self, texts: encoded.extend(texts) or token_features(self, texts))
    cache_dir = tmp_path / "cache"
    cli = ["cache-text", "--data", str(folder), "--out", str(cache_dir), "--image-size", "16",
           "--num-samples", "4", "--shard-size", "2", "--batch-size", "3"]
    train_t2i.main(cli)
    distinct = sorted({c for c in captions if c})
    assert sorted(encoded) == distinct  # each distinct caption encoded exactly once
    cache = train_t2i.TextFeatureCache(str(cache_dir))
    assert cache.info["num_captions"] == 4 and len(os.listdir(cache_dir)) == 1 + 2
    online = train_t2i.load_text_encoder(train_t2i.RANDOM_T5, torch.device("cpu"))
    y_online, mask_online = online(distinct)
    y_cached, mask_cached = cache(distinct)
    assert torch.equal(mask_cached, mask_online) and mask_online.sum(1).tolist() == [4, 9, 4, 8]
    assert (y_cached - y_online).abs().max() <= 1e-5 * y_online.abs().max()
    assert not y_cached[~mask_cached].any()

    encoded.clear()
    train_t2i.main(cli)  # restart: every shard is there
    assert encoded == []
    os.remove(train_t2i.text_shard_path(str(cache_dir), 1))
    with pytest.raises(FileNotFoundError, match="incomplete: 1 of 2 shards missing"):
        train_t2i.TextFeatureCache(str(cache_dir))
    train_t2i.main(cli)
    appearance = list(dict.fromkeys(c for c in captions if c))
    assert sorted(encoded) == sorted(appearance[2:])  # shard 1: the 3rd and 4th distinct captions
    with pytest.raises(SystemExit) as exit_info:  # other settings on a started cache
        train_t2i.main(cli + ["--shard-size", "3"])
    assert exit_info.value.code == 2


def test_text_cache_gives_the_online_conditions_of_a_task(tmp_path):
    cache_dir = str(tmp_path / "cache")
    train_t2i.main(["cache-text", "--data", "shapes:40", "--out", cache_dir, "--image-size", "16", "--num-samples", "4"])
    common = ["--init", "scratch", *TINY_MODEL, "--data", "shapes:40", "--num-samples", "4"]
    online = train_t2i.t2i_task(t2i_args(*common), None, None, torch.device("cpu"))
    cached = train_t2i.t2i_task(t2i_args(*common, "--text-cache", cache_dir), None, None, torch.device("cpu"))
    batch = data.collate_samples([online.dataset[i] for i in (0, 5, 17)] + online.eval_items)
    expected, got = online.condition(batch, None), cached.condition(batch, None)
    assert torch.equal(got["mask"], expected["mask"]) and got["y"].shape == (7, expected["mask"].shape[1], 64)
    assert (got["y"] - expected["y"]).abs().max() <= 1e-5 * expected["y"].abs().max()
    with pytest.raises(ValueError, match="was made with --t5 random-t5 --data shapes:40 --seed 0"):
        train_t2i.t2i_task(t2i_args(*common[:-4], "--data", "shapes:41", "--text-cache", cache_dir),
                           None, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="lacks 2 caption"):
        train_t2i.t2i_task(t2i_args(*common[:-1], "6", "--text-cache", cache_dir), None, None, torch.device("cpu"))
    assert online.metadata["clean_captions"]  # the export tells sample.py to clean prompts as in training
    info_path = os.path.join(cache_dir, "text_cache.json")
    with open(info_path) as f:
        info = json.load(f)
    with open(info_path, "w") as f:  # a cache written before prompts were cleaned
        json.dump({k: v for k, v in info.items() if k != "clean_captions"}, f)
    with pytest.raises(ValueError, match="holds features of uncleaned captions"):
        train_t2i.t2i_task(t2i_args(*common, "--text-cache", cache_dir), None, None, torch.device("cpu"))


def test_default_needs_the_i2i_export_and_rejects_an_image_encoder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in ([], ["--init", "scratch", "--encoder", "facebook/dino-vitb16"]):
        with pytest.raises(SystemExit) as exit_info:
            train_t2i.main(argv)
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "no I2I prior at runs/i2i/ema.safetensors: make it with `python train_i2i.py`" in errors
    assert "pass the text encoder as --t5" in errors


@pytest.mark.slow
def test_finetune_from_the_i2i_export_then_sample_t2i(i2i_run, tmp_path):
    out = tmp_path / "t2i"
    train_t2i.main(["--init", str(i2i_run / "ema.safetensors"), "--model", "DiT-S/4", "--image-size", "16",
                    "--data", "shapes:64", *TINY_LOOP, "--out", str(out)])
    assert len(metric_lines(out)) == 3 and all(np.isfinite(line["loss"]) for line in metric_lines(out))
    model, metadata = train_i2i.load_export(str(out / "ema.safetensors"))
    info = metadata["lumos"]
    assert (info["task"], info["encoder"], info["init"], model.cond_dim, model.cond_tokens) == \
        ("t2i", "random-t5", str(i2i_run / "ema.safetensors"), 64, 120)
    prompts = ["a red circle", "a small blue star at the top left on a green background"]
    condition = train_t2i.text_condition_from_metadata(info, torch.device("cpu"))(prompts)
    y, mask = train_t2i.load_text_encoder("random-t5", torch.device("cpu"))(prompts)
    assert torch.equal(condition["mask"], mask) and torch.equal(condition["y"], y)
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0]), **condition).shape == (2, 6, 16, 16)

    sample.main(["t2i", "--ckpt", str(out / "ema.safetensors"), "--prompts", *prompts, "--per-image", "2",
                 "--steps", "2", "--cfg-scale", "3", "--out", str(tmp_path / "samples")])
    assert sorted(os.listdir(tmp_path / "samples")) == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png"]
    with pytest.raises(SystemExit):  # an I2I export has no text encoder
        sample.main(["t2i", "--ckpt", str(i2i_run / "ema.safetensors"), "--prompts", "x", "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_coco_fid30k_protocol_end_to_end_on_a_tiny_fake_coco(i2i_run, tmp_path):
    t2i = tmp_path / "t2i"
    train_t2i.main(["--init", str(i2i_run / "ema.safetensors"), "--model", "DiT-S/4", "--image-size", "16",
                    "--data", "shapes:64", *TINY_LOOP, "--out", str(t2i)])
    images, coco = tmp_path / "val2014", {"images": [], "annotations": []}
    images.mkdir()
    for i in range(8):
        name = f"COCO_val2014_{i:012d}.jpg"
        pixels = np.random.default_rng(i).integers(0, 255, (24 + i, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name)
        coco["images"].append({"id": 100 + i, "file_name": name})
        coco["annotations"] += [{"image_id": 100 + i, "caption": f" a  {colour} thing\n"} for colour in ("red", "blue")]
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    annotations = str(tmp_path / "captions_val2014.json")
    pairs = evaluate.coco_captions(annotations, 5, seed=1)
    assert pairs == evaluate.coco_captions(annotations, 5, seed=1) != evaluate.coco_captions(annotations, 5, seed=2)
    assert len({name for name, _ in pairs}) == 5 and {caption for _, caption in pairs} <= {"a red thing", "a blue thing"}
    with pytest.raises(ValueError, match="fewer than the 9"):
        evaluate.coco_captions(annotations, 9)
    torch.save(random_fid_inception()[1], tmp_path / "inception.pth")
    result = evaluate.main(["coco-fid", "--annotations", annotations, "--images", str(images),
                            "--ckpt", str(t2i / "ema.safetensors"), "--num", "5", "--seed", "1", "--size", "16",
                            "--out", str(tmp_path / "fid"), "--sample-args=--steps 2 --method ddim",
                            "--inception", str(tmp_path / "inception.pth")])
    assert result["images"] == 5 and np.isfinite(result["fid"]) and result["fid"] > 0
    assert np.load(tmp_path / "fid" / "samples.npz")["arr_0"].shape == (5, 16, 16, 3)
    assert (tmp_path / "fid" / "captions.txt").read_text().splitlines() == [caption for _, caption in pairs]


def test_t2i_never_mirrors_an_image_against_its_caption(tmp_path, monkeypatch):
    """Captions name left and right ("... at the top left"): a mirrored image would contradict its own."""
    flips_seen = []
    mirrored = train_i2i.mirrored
    monkeypatch.setattr(train_i2i, "mirrored", lambda batch, flips: flips_seen.append(flips) or mirrored(batch, flips))
    train_t2i.main(["--init", "scratch", *TINY_MODEL, "--data", "shapes:64", *TINY_LOOP, "--steps", "2",
                    "--ckpt-every", "0", "--out", str(tmp_path)])
    assert len(flips_seen) == 3 and not torch.cat(flips_seen).any()  # the grid's batch, then 2 steps of 8
    drawn = train_i2i.sample_randomness(torch.arange(16), 0, (3, 16, 16), 1000, 0.1, False)[0]
    assert drawn.any()  # the loop did draw flips for these samples: T2I masked them


@pytest.mark.slow
def test_scratch_run_from_the_text_cache_counts_uncaptioned_images(tmp_path):
    folder = write_captioned_folder(tmp_path / "pairs", ["a red circle", None, "a blue star", "", "a green cross"] * 2)
    cache_dir = str(tmp_path / "cache")
    train_t2i.main(["cache-text", "--data", str(folder), "--out", cache_dir, "--image-size", "16", "--num-samples", "4"])
    out = tmp_path / "t2i"
    train_t2i.main(["--init", "scratch", *TINY_MODEL, "--data", str(folder), "--text-cache", cache_dir,
                    *TINY_LOOP, "--out", str(out)])
    lines = metric_lines(out)
    assert len(lines) == 3 and lines[-1]["skipped_files"] > 0
    _, metadata = train_i2i.load_export(str(out / "ema.safetensors"))
    assert metadata["lumos"]["init"] == "scratch" and metadata["lumos"]["config"]["cond_dim"] == 64


####################################################################################################
# nvs
####################################################################################################

TINY_I2I = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, cond_dim=16)
NVS_NEW = ("pose_mixer.weight", "pose_mixer.bias")
NVS_WIDENED = ("x_embedder.proj.weight",)
TINY_SIZE = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "32", "--num-heads", "2"]
NVS_RUN = ["--image-size", "16", "--global-batch-size", "8", "--steps", "3", "--sample-every", "1000",
            "--sample-steps", "2", "--num-samples", "4", "--log-every", "1", "--held-out-objects", "1"]


def random_i2i(seed=0, **overrides):
    """A tiny I2I model with every weight random, so that no zero-initialised layer hides a difference."""
    torch.manual_seed(seed)
    model = LumosDiT(**{**TINY_I2I, **overrides})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.2)
    return model.eval()


def nvs_from(i2i):
    nvs = train_nvs.NVSDiT(**train_nvs.nvs_config(i2i.config, i2i.input_size))
    report = train_i2i.transfer_weights(nvs, i2i.state_dict(), new_keys=NVS_NEW, widened_keys=NVS_WIDENED)
    return nvs.eval(), report


def view_inputs(batch=4, channels=3, size=8, cond_dim=16):
    gen = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(batch, channels, size, size, generator=gen), t=torch.tensor([0.0, 10.0, 500.0, 999.0])[:batch],
                y=torch.randn(batch, 1, cond_dim, generator=gen),
                source=torch.randn(batch, channels, size, size, generator=gen), pose=torch.randn(batch, 4, generator=gen))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


#################################################################################
#                               Relative pose                                   #
#################################################################################

def zero123_get_T(target_RT, cond_RT):
    """Zero-1-to-3's relative pose, written out independently from its published formula."""
    def spherical(xyz):
        xy = xyz[0] ** 2 + xyz[1] ** 2
        return np.arctan2(np.sqrt(xy), xyz[2]), np.arctan2(xyz[1], xyz[0]), np.sqrt(xy + xyz[2] ** 2)
    theta_c, azimuth_c, z_c = spherical(-cond_RT[:3, :3].T @ cond_RT[:, -1])
    theta_t, azimuth_t, z_t = spherical(-target_RT[:3, :3].T @ target_RT[:, -1])
    d_azimuth = (azimuth_t - azimuth_c) % (2 * math.pi)
    return np.array([theta_t - theta_c, math.sin(d_azimuth), math.cos(d_azimuth), z_t - z_c])


def random_camera(rng):
    rotation = train_nvs.random_rotation(rng)
    return np.concatenate([rotation, rng.normal(size=(3, 1)) * 2], axis=1)


def test_relative_pose_matches_zero123_formula():
    rng = np.random.default_rng(0)
    for _ in range(20):
        source, target = random_camera(rng), random_camera(rng)
        np.testing.assert_allclose(train_nvs.relative_pose(source, target).numpy(), zero123_get_T(target, source),
                                   rtol=1e-6, atol=1e-6)


def test_relative_pose_of_a_view_to_itself_is_identity():
    rng = np.random.default_rng(1)
    for camera in [random_camera(rng) for _ in range(5)] + [train_nvs.orbit_camera(0.3, 2.0, 1.8)]:
        assert train_nvs.relative_pose(camera, camera).tolist() == [0.0, 0.0, 1.0, 0.0]


def test_relative_pose_azimuth_wraps_around():
    rad = math.radians
    source = train_nvs.orbit_camera(rad(10), rad(350), 1.5)  # polar 80 degrees
    target = train_nvs.orbit_camera(rad(40), rad(10), 2.0)  # polar 50 degrees, 20 degrees further round
    forward = train_nvs.relative_pose(source, target)
    expected = [rad(-30), math.sin(rad(20)), math.cos(rad(20)), 0.5]
    np.testing.assert_allclose(forward.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(train_nvs.relative_pose(target, source).numpy(),
                               [rad(30), -math.sin(rad(20)), math.cos(rad(20)), -0.5], atol=1e-6)
    # The same 20 degrees across atan2's branch cut at 180 degrees.
    across = train_nvs.relative_pose(train_nvs.orbit_camera(rad(10), rad(170), 1.5),
                                     train_nvs.orbit_camera(rad(40), rad(190), 2.0))
    np.testing.assert_allclose(across.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(train_nvs.pose_vector(rad(-30), rad(-340), 0.5).numpy(), expected, atol=1e-6)


def test_relative_pose_does_not_depend_on_the_camera_axis_convention():
    opencv = [train_nvs.orbit_camera(0.2, 1.0, 1.7), train_nvs.orbit_camera(-0.4, 4.0, 2.1)]
    opengl = [np.diag([1.0, -1.0, -1.0]) @ camera for camera in opencv]  # y up, z backward
    torch.testing.assert_close(train_nvs.relative_pose(*opengl), train_nvs.relative_pose(*opencv))


def test_look_at_puts_the_camera_there_looking_at_the_origin():
    position = np.array([0.5, -1.2, 0.9])
    camera = train_nvs.look_at(position)
    rotation = camera[:, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(train_nvs.camera_position(camera), position, atol=1e-12)
    np.testing.assert_allclose(camera[:, 3], [0, 0, np.linalg.norm(position)], atol=1e-12)  # origin: straight ahead
    assert (rotation @ [0, 0, 1.0])[1] < 0  # world up is image up (camera y points down)
    with pytest.raises(ValueError, match="up axis"):
        train_nvs.look_at([0, 0, 2.0])


#################################################################################
#                               Weight transfer                                 #
#################################################################################

def test_transfer_carries_widens_and_adds_weights():
    i2i = random_i2i()
    nvs, report = nvs_from(i2i)
    saved, loaded = i2i.state_dict(), nvs.state_dict()
    assert report["widened"] == list(NVS_WIDENED) and report["new"] == list(NVS_NEW) and report["recomputed"] == ["pos_embed"]
    assert sorted(report["carried"]) == sorted(k for k in saved if k not in ("x_embedder.proj.weight", "pos_embed"))
    for key in report["carried"]:
        assert torch.equal(loaded[key], saved[key]), key
    patch = loaded["x_embedder.proj.weight"]
    assert patch.shape == (32, 6, 2, 2)
    assert torch.equal(patch[:, :3], saved["x_embedder.proj.weight"]) and not patch[:, 3:].any()
    assert torch.equal(loaded["pose_mixer.weight"], torch.cat([torch.eye(16), torch.zeros(16, 4)], dim=1))
    assert not loaded["pose_mixer.bias"].any()


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"extra.weight": torch.zeros(1)}), "1 unexpected (extra.weight)"),
    (lambda s: s.pop("blocks.1.mlp.fc1.weight"), "1 missing (blocks.1.mlp.fc1.weight)"),
    (lambda s: s.update({"blocks.0.attn.qkv.weight": torch.zeros(96, 8)}), "wrong-shape (blocks.0.attn.qkv.weight (96, 8)"),
    (lambda s: s.update({"x_embedder.proj.weight": torch.zeros(32, 7, 2, 2)}), "wrong-shape (x_embedder.proj.weight"),
])
def test_transfer_rejects_what_does_not_fit(change, message):
    state = random_i2i().state_dict()
    change(state)
    nvs = train_nvs.NVSDiT(**train_nvs.nvs_config(random_i2i().config, 8))
    with pytest.raises(ValueError, match=r"my.pth: does not fit NVSDiT: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        train_i2i.transfer_weights(nvs, state, NVS_NEW, NVS_WIDENED, source="my.pth")


def test_transfer_swaps_a_condition_as_train_t2i_does():
    i2i = random_i2i()
    t2i = LumosDiT(**{**TINY_I2I, "cond_dim": 24, "cond_tokens": 5})  # T5-like tokens instead of one DINO feature
    new = ("y_embedder.y_embedding", "y_embedder.y_proj.fc1.weight")
    fresh = {k: v.clone() for k, v in t2i.state_dict().items()}
    report = train_i2i.transfer_weights(t2i, i2i.state_dict(), new_keys=new)
    assert report["new"] == list(new) and not report["widened"] and "y_embedder.y_proj.fc2.weight" in report["carried"]
    for key, value in t2i.state_dict().items():
        assert torch.equal(value, fresh[key] if key in new else i2i.state_dict()[key]), key
    with pytest.raises(ValueError, match="wrong-shape"):
        train_i2i.transfer_weights(LumosDiT(**{**TINY_I2I, "cond_dim": 24}), i2i.state_dict())


def test_transfer_recomputes_pos_embed_for_another_size():
    i2i = random_i2i()
    nvs = train_nvs.NVSDiT(**train_nvs.nvs_config(i2i.config, 16))
    train_i2i.transfer_weights(nvs, i2i.state_dict(), NVS_NEW, NVS_WIDENED)
    expected = dit.get_2d_sincos_pos_embed(32, 8, base_size=8)
    np.testing.assert_allclose(nvs.pos_embed[0].numpy(), expected, atol=1e-6)


#################################################################################
#                      Reading I2I checkpoints to start from                    #
#################################################################################

def test_load_i2i_init_from_an_export_a_checkpoint_and_an_official_pth(tmp_path, monkeypatch):
    model, ema = random_i2i(seed=0), random_i2i(seed=1)
    args = types.SimpleNamespace(out=str(tmp_path), keep_last=2)
    lumos = {"task": "i2i", "model": "DiT-T/2", "config": ema.config, "vae": None, "encoder": "random-vit",
             "image_size": 8, "prediction": "epsilon"}
    train_i2i.export_ema(args, ema, 0, {"lumos": lumos})
    run_config = {"model": "DiT-T/2", "image_size": 8, "vae": None, "encoder": "random-vit", "prediction": "v",
                  "model_config": model.config}
    optimizer = torch.optim.AdamW(model.parameters())
    train_i2i.save_checkpoint(args, model, ema, optimizer, torch.tensor([5, 0, 0, 0]), 0, run_config)
    torch.save({"state_dict": ema.state_dict()}, tmp_path / "Lumos_I2I.pth")
    # The official release is DiT-XL/2; register a tiny size so that its sizes can be read off a small file.
    monkeypatch.setitem(dit.DiT_models, "DiT-T/2", partial(LumosDiT, depth=2, hidden_size=32, num_heads=2, patch_size=2))

    cases = [(str(tmp_path / "ema.safetensors"), "ema", ema, "epsilon"),
             (str(tmp_path), "ema", ema, "v"),  # a run folder: its latest checkpoint
             (train_i2i.latest_checkpoint(tmp_path), "model", model, "v"),
             (str(tmp_path / "Lumos_I2I.pth"), "ema", ema, None)]
    for spec, entry, source, prediction in cases:
        state, info = train_i2i.load_i2i_init(spec, entry)
        assert state.keys() == source.state_dict().keys(), spec
        for key, value in source.state_dict().items():
            assert torch.equal(state[key], value), (spec, key)
        assert info["config"] == source.config and info["model"] == "DiT-T/2", spec
        assert info["image_size"] == 8 and info["prediction"] == prediction, spec
    assert train_i2i.load_i2i_init(cases[0][0])[1]["encoder"] == "random-vit"


def test_load_i2i_init_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such file"):
        train_i2i.load_i2i_init(str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        train_i2i.load_i2i_init(str(tmp_path))
    with pytest.raises(ValueError, match="expected scratch, an ema.safetensors export"):
        train_i2i.load_i2i_init(str(tmp_path / "weights.txt"))
    torch.save({"model": {"something": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a LumosDiT state dict"):
        train_i2i.load_i2i_init(str(tmp_path / "other.pth"))
    torch.save(random_i2i().state_dict(), tmp_path / "odd_size.pth")
    with pytest.raises(ValueError, match="depth 2, width 32, patch 2 is none of dit.DiT_models"):
        train_i2i.load_i2i_init(str(tmp_path / "odd_size.pth"))
    nvs, _ = nvs_from(random_i2i())
    train_i2i.export_ema(types.SimpleNamespace(out=str(tmp_path)), nvs, 0, {"lumos": {"task": "nvs", "config": nvs.config}})
    with pytest.raises(ValueError, match="a 'nvs' export; start from an I2I model"):
        train_i2i.load_i2i_init(str(tmp_path / "ema.safetensors"))


#################################################################################
#                                   Data                                        #
#################################################################################

def test_renderer_is_deterministic_and_views_differ():
    obj = train_nvs.sample_object(0, 3)
    first = train_nvs.render_view(obj, obj["cameras"][0], 32)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert np.array_equal(first, train_nvs.render_view(train_nvs.sample_object(0, 3), obj["cameras"][0], 32))
    assert (first[0, 0] == 255).all() and (first != 255).any(axis=-1).mean() > 0.1  # white background, an object
    views = [train_nvs.render_view(obj, camera, 32) for camera in obj["cameras"]]
    for a in range(len(views)):
        for b in range(a):
            assert np.abs(views[a].astype(int) - views[b]).mean() > 1, (a, b)
    shapes = {train_nvs.sample_object(0, k)["shape"] for k in range(40)}
    assert shapes == set(train_nvs.PRIMITIVES)
    assert not np.array_equal(train_nvs.sample_object(1, 3)["cameras"], obj["cameras"])


def test_multiview_items_and_held_out_objects():
    train_set, held_out = train_nvs.open_multiview("multiview:5", 16, seed=2, held_out_objects=2)
    assert len(train_set) == 60 and len(held_out) == 24
    item = train_set[13]
    assert item["image"].shape == item["source"].shape == (3, 16, 16) and item["pose"].shape == (4,)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["index"] == 13 and item["caption"] == "" and item["skipped"] == []
    obj = train_nvs.sample_object(2, 1)
    source = int(item["name"].split("<-")[1])
    assert item["name"].startswith("multiview/000001/001<-") and source != 1
    torch.testing.assert_close(item["pose"], train_nvs.relative_pose(obj["cameras"][source], obj["cameras"][1]))
    expected = torch.from_numpy(train_nvs.render_view(obj, obj["cameras"][1], 16)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["image"], expected)
    assert held_out[0]["name"].startswith("multiview/000005/")  # the objects after the trained ones
    assert torch.equal(train_nvs.MultiViewShapes(7, 16, seed=2)[60]["image"], held_out[0]["image"])
    with pytest.raises(ValueError, match="multiview:N with N a positive integer"):
        train_nvs.open_multiview("multiview:0", 16)


def write_objects(root, count, image_size=16):
    train_nvs.save_zero123_layout(train_nvs.MultiViewShapes(count, image_size, seed=0), str(root), count)


def test_zero123_folder_reads_the_layout(tmp_path):
    write_objects(tmp_path, 2)
    (tmp_path / "000001" / "notes.txt").write_text("not a view")
    procedural = train_nvs.MultiViewShapes(2, 16, seed=0)
    folder = train_nvs.Zero123Folder(str(tmp_path), 16, seed=0)
    assert len(folder) == 24 and "2 objects, 24 views" in repr(folder)
    for i in (0, 5, 17):
        from_files, rendered = folder[i], procedural[i]
        target, source = from_files["name"].split("<-")
        assert target == f"{i // 12:06d}/{i % 12:03d}.png" and source.startswith(f"{i // 12:06d}/")
        assert torch.equal(from_files["image"], rendered["image"])
        camera = lambda name: np.load(tmp_path / name.replace(".png", ".npy")).astype(np.float64)
        torch.testing.assert_close(from_files["pose"], train_nvs.relative_pose(camera(source), camera(target)))
        assert from_files["skipped"] == []


def test_zero123_folder_skips_and_counts_bad_pose_files(tmp_path):
    write_objects(tmp_path, 2)
    bad = {"000000/003.npy": "missing pose file", "000000/004.npy": "unreadable pose file",
           "000000/005.npy": "expected a finite 3x4 world-to-camera matrix, got float64 (4, 4)",
           "000001/000.npy": "expected a finite 3x4 world-to-camera matrix, got float32 (3, 4)"}
    os.remove(tmp_path / "000000/003.npy")
    (tmp_path / "000000/004.npy").write_bytes(b"garbage, not numpy")
    np.save(tmp_path / "000000/005.npy", np.eye(4))
    np.save(tmp_path / "000001/000.npy", np.full((3, 4), np.nan, dtype=np.float32))
    folder = train_nvs.Zero123Folder(str(tmp_path), 16, seed=0)
    items = [folder[i] for i in range(len(folder))]
    reported = [message for item in items for message in item["skipped"]]
    for name, reason in bad.items():
        assert any(m.startswith(str(tmp_path / name)) and reason in m for m in reported), name
    for item in items:
        assert not any(view.replace(".png", ".npy") in bad for view in item["name"].split("<-"))
    item = folder[3]  # target 000000/003.png has no pose file: replaced by the next good pair
    assert item["index"] == 3 and item["skipped"][0] == f"{tmp_path / '000000/003.npy'}: missing pose file"


def test_zero123_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train_nvs.open_multiview(str(tmp_path / "missing"), 16)
    with pytest.raises(FileNotFoundError, match="no object folder with two or more NNN.png views"):
        train_nvs.open_multiview(str(tmp_path), 16)
    write_objects(tmp_path, 2)
    with pytest.raises(ValueError, match="2 objects leave none to train on after --held-out-objects 2"):
        train_nvs.open_multiview(str(tmp_path), 16, held_out_objects=2)
    train_set, held_out = train_nvs.open_multiview(str(tmp_path), 16, held_out_objects=1)
    assert len(train_set) == len(held_out) == 12 and held_out[0]["name"].startswith("000001/")
    for path in tmp_path.glob("*/*.npy"):
        path.unlink()
    with pytest.raises(RuntimeError, match="no readable view pair .* missing pose file"):
        train_set[0]


#################################################################################
#                                 End to end                                    #
#################################################################################

def test_default_init_without_an_i2i_run_trains_from_scratch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = train_nvs.add_nvs_args(train_nvs.argparse.ArgumentParser()).parse_args([])
    state, info = train_nvs.resolve_init(args)
    assert state is None and info is None and args.init == "scratch"
    assert "make it with `python train_i2i.py`" in capsys.readouterr().out
    assert train_i2i.model_size(args) == train_i2i.OFFLINE_MODEL  # the loop's offline model
    assert (args.encoder, args.image_size, args.vae, args.data) == ("random-vit", 32, None, "multiview:2000")


@pytest.mark.slow
def test_fine_tune_from_an_i2i_export_and_rebuild_the_export(tmp_path):
    train_i2i.main(TINY_SIZE + ["--image-size", "16", "--data", "shapes:64", "--global-batch-size", "8", "--steps", "2",
                                "--sample-every", "1000", "--sample-steps", "2", "--num-samples", "4",
                                "--out", str(tmp_path / "i2i")])
    i2i_export = str(tmp_path / "i2i" / "ema.safetensors")
    train_nvs.main(NVS_RUN + ["--init", i2i_export, "--data", "multiview:4", "--out", str(tmp_path / "nvs")])
    lines = metrics(tmp_path / "nvs")
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]
    evaluation = [line for line in lines if "psnr" in line]
    assert len(evaluation) == 1 and evaluation[0]["step"] == 3
    assert 0 < evaluation[0]["psnr"] < 60 and -1 <= evaluation[0]["ssim"] <= 1
    assert (tmp_path / "nvs" / "samples" / "step_0000003.png").exists()

    model, metadata = train_nvs.load_nvs_export(str(tmp_path / "nvs" / "ema.safetensors"))
    info = metadata["lumos"]
    assert info["task"] == "nvs" and info["init"] == i2i_export and info["encoder"] == "random-vit"
    assert info["config"]["in_channels"] == 6 and info["config"]["out_channels"] == 3 and metadata["step"] == 3
    assert isinstance(model, train_nvs.NVSDiT)
    saved = load_file(tmp_path / "nvs" / "ema.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    inputs = view_inputs(2, 3, 16, info["config"]["cond_dim"])
    assert model(**inputs).shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="not an export of train_nvs.py"):
        train_nvs.load_nvs_export(i2i_export)

    source = train_nvs.MultiViewShapes(1, 16, seed=5)[0]["source"]
    Image.fromarray(((source.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(tmp_path / "source.png")
    sample.main(["nvs", "--ckpt", str(tmp_path / "nvs" / "ema.safetensors"), "--images", str(tmp_path / "source.png"),
                 "--poses", "0,30,0", "20,90,0.1", "--steps", "2", "--out", str(tmp_path / "views")])
    assert sorted(os.listdir(tmp_path / "views")) == ["000000.png", "000001.png", "grid.png"]


@pytest.mark.slow
def test_from_scratch_on_a_zero123_folder_counts_bad_pose_files(tmp_path):
    write_objects(tmp_path / "views", 3)
    os.remove(tmp_path / "views" / "000000" / "007.npy")
    train_nvs.main(TINY_SIZE + NVS_RUN + ["--init", "scratch", "--data", str(tmp_path / "views"), "--out", str(tmp_path / "nvs")])
    losses = [line for line in metrics(tmp_path / "nvs") if "loss" in line]
    assert len(losses) == 3 and all(math.isfinite(line["loss"]) for line in losses)
    assert losses[-1]["skipped_files"] >= 1  # 24 items read, covering every view of the 2 training objects


@pytest.mark.parametrize("extra, message", [
    (["--init", "scratch", "--data", "multiview:0"], "multiview:N with N a positive integer"),
    (["--init", "{export}", "--depth", "2"], "--depth: the model's size comes from --init"),
    (["--init", "{export}", "--vae", "some/vae"], "is a 3-channel model, but this run is in latent space"),
    (["--init", "{export}", "--encoder", "facebook/dino-vitb16"], "--encoder facebook/dino-vitb16: --init"),
    (["--init", "{missing}"], "no such file"),
])
def test_nvs_bad_arguments_fail_with_one_line(tmp_path, capsys, extra, message):
    model = random_i2i()
    lumos = {"task": "i2i", "model": "DiT-S/2", "config": model.config, "vae": None, "encoder": "random-vit",
             "image_size": 8, "prediction": "epsilon"}
    train_i2i.export_ema(types.SimpleNamespace(out=str(tmp_path)), model, 0, {"lumos": lumos})
    paths = {"export": str(tmp_path / "ema.safetensors"), "missing": str(tmp_path / "none.safetensors")}
    with pytest.raises(SystemExit) as exit_info:
        train_nvs.main([arg.format(**paths) for arg in extra] + ["--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_nvs.py: error:") and message in err and "\n" not in err


####################################################################################################
# evaluate
####################################################################################################

@torch.no_grad()
def random_fid_inception(seed=0):
    """Our FID Inception with random weights that keep activations' size through its layers, and its state dict
    plus BatchNorm's batch counters, as torchvision-style checkpoints have them."""
    model = evaluate.FIDInception()
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in model.state_dict().items():  # the model's own tensors, filled in place
        if key.endswith("conv.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2 / tensor[0].numel()) ** 0.5)
        elif key.endswith(("bn.weight", "running_var")):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        else:  # BatchNorm bias and mean, fc
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    state = dict(model.state_dict())
    return model, state | {key.replace("running_mean", "num_batches_tracked"): torch.tensor(7)
                           for key in state if key.endswith("running_mean")}


def random_images(count, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def write_folder(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # pytorch-fid calling scipy
def test_frechet_distance_matches_pytorch_fid_scipy_and_closed_forms():
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy import linalg

    rng = np.random.default_rng(0)
    features1 = rng.normal(size=(400, 48))
    mu1, sigma1 = evaluate.feature_statistics(features1)
    mu2, sigma2 = evaluate.feature_statistics(rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48)) * 0.4 + 0.3)
    assert np.allclose(sigma1, np.cov(features1, rowvar=False)) and np.allclose(mu1, features1.mean(0))
    ours = evaluate.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(calculate_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-3)
    trace_sqrt = np.trace(linalg.sqrtm(sigma1 @ sigma2)).real
    assert ours == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2) - 2 * trace_sqrt, rel=1e-9)
    # Diagonal covariances: |mu1 - mu2|^2 + |sqrt(var1) - sqrt(var2)|^2.
    var1, var2, mu1, mu2 = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16), rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    # Fewer samples than dimensions: a singular covariance, still 0 from a set to itself up to the round-off of
    # square roots of zero eigenvalues (pytorch-fid: -3.8e-6 here).
    mu, sigma = evaluate.feature_statistics(rng.normal(size=(10, 64)))
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    with pytest.raises(ValueError, match="statistics do not match"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    assert_raises(ValueError, "at least 2 feature vectors", lambda: evaluate.feature_statistics(np.zeros((1, 5))))


@pytest.mark.slow
def test_fid_inception_matches_pytorch_fid_with_random_weights(monkeypatch):
    import pytorch_fid.inception

    ours, state = random_fid_inception()
    # pytorch-fid's InceptionV3 (pool3) loads our state strictly in place of its download: our keys are its own.
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = pytorch_fid.inception.InceptionV3([3]).eval()
    # The whole pipeline at 299: uint8 image -> pytorch-fid's ToTensor, then the network resizes and rescales.
    images = random_images(1, 40, 52)
    pool3, _ = evaluate.inception_features(images, ours)
    with torch.no_grad():
        expected = reference(torch.stack([transforms.functional.to_tensor(image) for image in images]))[0].flatten(1)
    assert pool3.dtype == np.float64 and pool3.shape == (1, 2048)
    assert_close_to_scale(pool3, expected)
    # The network alone at 139 x 139 (fast; the smallest size leaving the last block a 3 x 3 map, where its max
    # pool differs from an average), with the logits: the classifier without its bias.
    reference.resize_input, ours.INPUT_SIZE = False, 139
    images = torch.rand(2, 3, 139, 139, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images)[0].flatten(1)
    pool3, logits = ours(images)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert_close_to_scale(pool3, expected)
    assert_close_to_scale(logits, expected @ state["fc.weight"].T)


@pytest.mark.slow
def test_load_fid_inception_from_file_and_clear_errors(tmp_path, monkeypatch):
    _, state = random_fid_inception()
    torch.save(state, tmp_path / "inception.pth")
    model = evaluate.load_fid_inception(tmp_path / "inception.pth", device="cpu")
    assert torch.equal(model.Mixed_7c.branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"])
    assert torch.equal(model.fc.weight, state["fc.weight"])
    with pytest.raises(FileNotFoundError, match="no such Inception weights file.*pt_inception-2015-12-05"):
        evaluate.load_fid_inception(tmp_path / "missing.pth")
    torch.save({"fc.weight": state["fc.weight"], "extra": torch.zeros(1)}, tmp_path / "incomplete.pth")
    problems = r"incomplete.pth: .*missing .*Conv2d_1a_3x3.conv.weight.*; 1 unexpected \(extra\)"
    with pytest.raises(ValueError, match=problems):
        evaluate.load_fid_inception(tmp_path / "incomplete.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected_place = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=f"no FID Inception weights at {expected_place}"):
        evaluate.load_fid_inception(download_missing=False)


def test_weight_files_download_with_hash_check_and_refusals(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"inception weights")
    good = tmp_path / "cache" / f"weights-{hashlib.sha256(b'inception weights').hexdigest()[:8]}.pth"
    assert evaluate.download(source.as_uri(), good).read_bytes() == b"inception weights"
    with pytest.raises(ValueError, match="expected 00000000"):
        evaluate.download(source.as_uri(), tmp_path / "cache" / "weights-00000000.pth")
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [good.name]  # nothing left of the bad one
    with pytest.raises(FileNotFoundError, match="could not download .* put it at"):
        evaluate.download((tmp_path / "absent.bin").as_uri(), tmp_path / "cache" / "other.pth")
    torch.save({"a": torch.arange(3.0)}, tmp_path / "zip.pth")
    torch.save({"a": torch.arange(3.0)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        assert torch.equal(evaluate.read_weights(tmp_path / name)["a"], torch.arange(3.0))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert_raises(ValueError, "text.pth: not a checkpoint", lambda: evaluate.read_weights(tmp_path / "text.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert_raises(ValueError, "expected a dict of tensors", lambda: evaluate.read_weights(tmp_path / "list.pth"))
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not an LPIPS weights file"):
        evaluate.LPIPS.from_files(tmp_path / "partial.pth", tmp_path / "partial.pth")


def mean_colours(batch):  # a cheap stand-in for a network: (N, 3) features
    return np.stack([np.asarray(image, np.float64).mean(axis=(0, 1)) for image in batch])


def test_statistics_of_folders_npz_and_saved_files_agree(tmp_path):
    images = random_images(4, 6, 6)
    np.savez(tmp_path / "images.npz", arr_0=images)
    expected = evaluate.feature_statistics(mean_colours(images))
    for source in (images, tmp_path / "images.npz", str(write_folder(tmp_path / "folder", images))):
        mu, sigma = evaluate.statistics(source, evaluate.INCEPTION_FEATURES, mean_colours)
        assert np.allclose(mu, expected[0], rtol=1e-12) and np.allclose(sigma, expected[1], rtol=1e-12)
    evaluate.save_statistics(tmp_path / "stats.npz", *expected, evaluate.DINOV2_FEATURES)
    not_called = lambda batch: pytest.fail("saved statistics must not be recomputed")  # noqa: E731
    mu, sigma = evaluate.statistics(tmp_path / "stats.npz", evaluate.DINOV2_FEATURES, not_called)
    assert np.array_equal(mu, expected[0]) and np.array_equal(sigma, expected[1])
    with pytest.raises(ValueError, match="stats.npz: holds statistics of dinov2-cls features, not inception-pool3"):
        evaluate.statistics(tmp_path / "stats.npz", evaluate.INCEPTION_FEATURES, not_called)
    # pytorch-fid's and ADM's files name no features: they hold Inception statistics. Ours name them.
    np.savez(tmp_path / "untagged.npz", mu=expected[0], sigma=expected[1])
    other = evaluate.feature_statistics(mean_colours(images // 2))
    evaluate.save_statistics(tmp_path / "tagged.npz", *other, evaluate.INCEPTION_FEATURES)
    unused_network = torch.nn.Identity()
    assert evaluate.fid(tmp_path / "untagged.npz", tmp_path / "tagged.npz", unused_network) == \
        evaluate.frechet_distance(*expected, *other)
    with pytest.raises(ValueError, match="holds statistics of inception-pool3 features, not dinov2-cls"):
        evaluate.fd_dinov2(tmp_path / "tagged.npz", tmp_path / "untagged.npz", unused_network)


class MeanColourNetwork(torch.nn.Module):
    """A cheap stand-in for FIDInception: (B, 3, H, W) in [0, 1] -> mean colours as features and logits."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(3))

    def forward(self, images):
        return images.mean(dim=(2, 3)) * self.gain, images.mean(dim=(2, 3)) * self.gain


def test_image_sources_their_errors_and_mixed_sizes(tmp_path):
    images = random_images(3, 8, 10)
    np.savez(tmp_path / "images.npz", arr_0=images)
    folder = write_folder(tmp_path / "folder", images)
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    from_folder = evaluate.load_images(folder)
    assert len(from_folder) == 3 and all(np.array_equal(from_folder[i], images[i]) for i in range(3))
    assert np.array_equal(evaluate.load_images(tmp_path / "images.npz"), images)
    # Inception features of a folder of mixed sizes, in batches, keep the files' order.
    mixed = [random_images(1, 20, 30, seed=3)[0], random_images(1, 33, 21, seed=4)[0] // 2, images[0]]
    pool3, logits = evaluate.inception_features(evaluate.load_images(write_folder(tmp_path / "mixed", mixed)),
                                                MeanColourNetwork(), batch_size=2)
    expected = np.stack([image.mean(axis=(0, 1)) / 255 for image in mixed])
    # fp32 means of <= 700 values in [0, 1], summed pairwise: relative error ~log2(700) * 6e-8 < 1e-6.
    assert np.allclose(pool3, expected, rtol=1e-6) and np.allclose(logits, expected, rtol=1e-6)
    assert_raises(FileNotFoundError, "no such folder or .npz", lambda: evaluate.load_images(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="no .* images in this folder"):
        evaluate.load_images(write_folder(tmp_path / "empty", []))
    np.savez(tmp_path / "other.npz", images=images)
    assert_raises(ValueError, "no `arr_0`.*it has: images", lambda: evaluate.load_images(tmp_path / "other.npz"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not a png")
    assert_raises(ValueError, "0.png: not a readable image", lambda: evaluate.load_images(tmp_path / "broken")[0])
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, H, W, 3\)"):
        evaluate.load_images(tmp_path / "nchw.npz")


def test_inception_score_known_values():
    assert evaluate.inception_score(np.zeros((20, 1008)))[0] == pytest.approx(1.0)
    # Each split holds 5 confident predictions of 5 different classes: p(y) uniform over 5, IS = 5.
    confident = 50.0 * np.eye(1008)[np.tile(np.arange(5), 4)]
    assert evaluate.inception_score(confident, splits=4) == pytest.approx((5.0, 0.0), abs=1e-6)
    logits = np.random.default_rng(0).normal(size=(12, 7)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp((part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean())
              for part in np.split(probabilities, [4, 8])]  # the original's split bounds
    assert evaluate.inception_score(logits, splits=3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)
    assert_raises(ValueError, "needs at least 10 images", lambda: evaluate.inception_score(np.zeros((5, 1008))))


def test_dinov2_features_follow_dgm_eval(tmp_path):
    torch.manual_seed(0)
    encoder = encoders.DINOEncoder(image_size=28, patch_size=14, width=32, depth=1, heads=2, layer_scale=True)
    images = random_images(3, 40, 50)
    dgm_eval_transform = transforms.Compose([  # dgm-eval's DINOv2 preprocessing, applied to PIL images
        transforms.Resize((224, 224), transforms.InterpolationMode.BICUBIC), transforms.ToTensor(),
        transforms.Normalize(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)])
    with torch.no_grad():
        expected = encoder(torch.stack([dgm_eval_transform(Image.fromarray(image)) for image in images]))[:, 0]
    features = evaluate.dinov2_features(images, encoder, batch_size=2)
    assert features.shape == (3, 32)
    assert_close_to_scale(features, expected, 1e-5)
    other = random_images(3, 40, 50, seed=5) // 3
    other_features = evaluate.dinov2_features(other, encoder)
    expected_distance = evaluate.frechet_distance(*evaluate.feature_statistics(features),
                                                  *evaluate.feature_statistics(other_features))
    np.savez(tmp_path / "real.npz", arr_0=images)
    assert evaluate.fd_dinov2(tmp_path / "real.npz", other, encoder) == pytest.approx(expected_distance, rel=1e-9)


def test_precision_recall_matches_the_definition():
    def inside(queries, manifold, k=3):  # in the ball of some manifold point reaching its k-th neighbour
        radii = np.sort(np.linalg.norm(manifold[:, None] - manifold[None], axis=-1), axis=1)[:, k]  # 0: itself
        return np.mean((np.linalg.norm(queries[:, None] - manifold[None], axis=-1) <= radii).any(axis=1))

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(60, 6)), rng.normal(size=(45, 6)) * 0.6 + 1.0  # narrower and shifted
    expected = inside(fake, real), inside(real, fake)
    assert 0 < expected[1] < expected[0] < 1, expected  # precision 0.82, recall 0.12: neither trivial
    for chunk_size in (7, 4096):
        scores = evaluate.precision_recall(real, fake, k=3, chunk_size=chunk_size)
        assert (scores["precision"], scores["recall"]) == pytest.approx(expected, abs=1e-12)
    assert evaluate.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    assert evaluate.precision_recall(real, real + 100) == {"precision": 0.0, "recall": 0.0}
    assert_raises(ValueError, "more than 3 samples", lambda: evaluate.precision_recall(real, fake[:3]))


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(3, 3, 21, 26, generator=generator)
    images = (targets + 0.15 * torch.randn(targets.shape, generator=generator)).clamp(0, 1)
    images[2] = torch.rand(3, 21, 26, generator=generator)  # an unrelated image: SSIM near 0
    ours_ssim, ours_psnr = evaluate.ssim(images, targets), evaluate.psnr(images, targets)
    for i in range(3):
        image, target = (x[i].permute(1, 2, 0).double().numpy() for x in (images, targets))
        expected_ssim = structural_similarity(image, target, channel_axis=2, data_range=1)
        assert ours_ssim[i].item() == pytest.approx(expected_ssim, abs=1e-7)
        assert ours_psnr[i].item() == pytest.approx(peak_signal_noise_ratio(target, image, data_range=1), rel=1e-10)
    assert torch.equal(evaluate.psnr(targets, targets), torch.full((3,), float("inf"), dtype=torch.float64))
    assert torch.allclose(evaluate.ssim(targets, targets), torch.ones(3, dtype=torch.float64))
    assert_raises(ValueError, r"must lie in \[0, 1\]", lambda: evaluate.ssim(images * 2 - 1, images))
    assert_raises(ValueError, "of one shape", lambda: evaluate.psnr(images, images[:1]))
    assert_raises(ValueError, "at least 7 x 7", lambda: evaluate.ssim(images[..., :6], images[..., :6]))


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alex", "vgg"])
@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13")  # lpips calling torchvision
def test_lpips_matches_the_lpips_package(tmp_path, net, monkeypatch):
    import lpips  # requirements-dev.txt
    from torchvision.models.vgg import cfgs, make_layers

    # lpips builds a whole torchvision VGG16; its 120M-parameter classifier, never used, takes seconds to build.
    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16",
                        lambda **kwargs: SimpleNamespace(features=make_layers(cfgs["D"])))
    # The package's own linear weights; a random backbone, saved as torchvision lays it out.
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    torch.manual_seed(0)
    backbone = (evaluate.alexnet_features() if net == "alex" else evaluate.vgg16_features()).state_dict()
    torch.save({f"features.{key}": value for key, value in backbone.items()}
               | {"classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "backbone.pth")
    for slice_ in reference.net.children():
        slice_.load_state_dict({key: backbone[key] for key in slice_.state_dict()})
    ours = evaluate.LPIPS.from_files(pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth",
                                     tmp_path / "backbone.pth")
    assert ours.net == net
    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(2, 3, 64, 64, generator=generator)
    images = (targets + 0.2 * torch.randn(targets.shape, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        assert_close_to_scale(ours(images, targets), reference(2 * images - 1, 2 * targets - 1).flatten(), 1e-5)
    assert ours(targets, targets).abs().max() == 0


# ---- shapes alignment ------------------------------------------------------------------------

def true_attrs(attrs):
    return [{name: a[name] for name in evaluate.SHAPE_ATTRIBUTES} for a in attrs]


# Measured: 100% of 500 images at 32 and 64 px (92% at 16 px); with noise of std 8, 99.5% of 200.
@pytest.mark.parametrize("image_size, noise, min_score", [(32, 0, 1.0), (64, 0, 1.0), (32, 8, 0.95)])
def test_shapes_detector_reads_the_datasets_own_images(image_size, noise, min_score):
    rng = np.random.default_rng(0)
    truth = [data.sample_shape_attrs(3, i) for i in range(150)]
    images = [np.clip(data.render_shape(attrs, image_size) + rng.normal(0, noise, (image_size, image_size, 3)), 0, 255)
              .astype(np.uint8) for attrs in truth]
    detected = [evaluate.detect_shape_attrs(image) for image in images]
    assert evaluate.alignment_scores(detected, true_attrs(truth))["all"] >= min_score
    if noise == 0:
        assert max(abs(found["extent"] - attrs["extent"]) for found, attrs in zip(detected, truth)) < 2 / image_size


def test_shapes_alignment_scores_wrong_captions_as_wrong():
    truth = [data.sample_shape_attrs(0, i) for i in range(40)]
    detected = [evaluate.detect_shape_attrs(data.render_shape(attrs, 32)) for attrs in truth]
    shifted_captions = [data.shapes_caption(attrs) for attrs in truth[1:] + truth[:1]]
    scores = evaluate.alignment_scores(detected, [evaluate.parse_shapes_caption(c) for c in shifted_captions])
    assert scores["all"] < 0.1 and scores["object"] < 0.3 and scores["images"] == 40
    partial = evaluate.alignment_scores(detected[:2], [{"color": truth[0]["color"]}, {"shape": "nonexistent"}])
    assert partial == {"shape": 0.0, "color": 1.0, "object": 0.5, "all": 0.5, "images": 2}
    assert_raises(ValueError, "2 images but 1 captions", lambda: evaluate.alignment_scores(detected[:2], [{}]))
    blank = evaluate.detect_shape_attrs(np.broadcast_to(np.array(data.COLORS["blue"], dtype=np.uint8), (32, 32, 3)))
    assert blank["background"] == "blue" and blank["shape"] is None and blank["color"] is None
    assert evaluate.alignment_scores([blank], [{"color": "red", "shape": "circle"}])["all"] == 0.0


def test_parse_shapes_caption_and_attribute_distance():
    attrs = data.sample_shape_attrs(0, 5)
    assert evaluate.parse_shapes_caption(data.shapes_caption(attrs)) == true_attrs([attrs])[0]
    assert evaluate.parse_shapes_caption("A  red triangle") == {"color": "red", "shape": "triangle"}
    assert evaluate.parse_shapes_caption("a small white star at the top center on an orange background") == {
        "size": "small", "color": "white", "shape": "star", "position": "top center", "background": "orange"}
    assert_raises(ValueError, "not a shapes caption: 'a dog'", lambda: evaluate.parse_shapes_caption("a dog"))
    a = [{"shape": "circle", "color": "red", "size": "small", "position": "center", "background": "blue"}] * 4
    b = a[:2] + [dict(a[0], shape="star", color=None)] * 2
    assert evaluate.attribute_distance(a, b) == pytest.approx(
        {"shape": 0.5, "color": 0.5, "size": 0, "position": 0, "background": 0, "mean": 0.2})
    assert evaluate.attribute_distance(a, a)["mean"] == 0


# ---- command line --------------------------------------------------------------------------

def test_cli_shapes_and_nvs(tmp_path, capsys):
    truth = [data.sample_shape_attrs(0, i) for i in range(30)]
    np.savez(tmp_path / "generated.npz", arr_0=np.stack([data.render_shape(attrs, 32) for attrs in truth]))
    (tmp_path / "captions.txt").write_text("\n".join(data.shapes_caption(attrs) for attrs in truth) + "\n")
    evaluate.main(["shapes", "--images", str(tmp_path / "generated.npz"), "--captions", str(tmp_path / "captions.txt"),
                   "--real", "shapes:30"])
    result = json.loads(capsys.readouterr().out)
    assert result["alignment"]["all"] == 1.0 and result["alignment"]["images"] == 30
    assert result["attribute_distance"]["mean"] == 0.0  # the same 30 images as shapes:30 (seed 0)

    targets = random_images(2, 16, 16)
    generated = np.clip(targets.astype(int) + 20, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "targets.npz", arr_0=targets)
    evaluate.main(["nvs", "--pred", str(write_folder(tmp_path / "generated", generated)),
                   "--target", str(tmp_path / "targets.npz")])
    result = json.loads(capsys.readouterr().out)
    as_unit = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    assert result["psnr"] == pytest.approx(evaluate.psnr(as_unit(generated), as_unit(targets)).mean().item())
    assert result["ssim"] == pytest.approx(evaluate.ssim(as_unit(generated), as_unit(targets)).mean().item())


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    npz = str(tmp_path / "images.npz")
    np.savez(npz, arr_0=random_images(2, 8, 8))
    for argv, message in [
        (["fid", "--real", npz, "--fake", npz, "--no-download"],
         "no FID Inception weights at .*pt_inception-2015-12-05-6726825d.pth; download https://github.com/mseitzer"),
        (["fid", "--real", npz, "--fake", npz, "--inception", str(tmp_path / "none.pth")], "no such Inception weights"),
        (["fid", "--real", npz, "--fake", "absent"], "absent: no such folder or .npz file"),
        (["shapes", "--images", str(tmp_path / "absent.npz"), "--real", "shapes:2"], "no such folder or .npz"),
        (["shapes", "--images", npz, "--captions", str(tmp_path / "none.txt")], "no such captions file"),
        (["fd-dinov2", "--real", str(tmp_path), "--fake", str(tmp_path), "--dinov2", str(tmp_path)],
         "none of model.safetensors"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.count("\n") == 1, error
        assert error.startswith(f"evaluate.py {argv[0]}: error:") and re.search(message, error), error


####################################################################################################
# nvs source views
####################################################################################################

# ---------------------------------------------------------------------------------------------
# A fresh source view per training sample (Zero-1-to-3 sees every pair of views)


def source_of(item):
    return int(re.search(r"<-(?:\d+/)?(\d+)", item["name"]).group(1))


@pytest.mark.parametrize("kind", ["multiview", "zero123"])
def test_training_samples_pair_a_target_with_every_other_view(tmp_path, kind):
    if kind == "multiview":
        dataset = train_nvs.MultiViewShapes(2, 8, seed=1)
    else:
        write_objects(tmp_path, 2, image_size=8)
        dataset = train_nvs.Zero123Folder(str(tmp_path), 8, seed=1)
    target = 12 + 5  # view 5 of the second object
    sources = [source_of(dataset.item(target, g)) for g in range(100)]
    assert 5 not in sources and set(sources) == set(range(12)) - {5}  # all 11 other views
    again = dataset.item(target, 37)
    assert again["name"] == dataset.item(target, 37)["name"] and again["index"] == target
    fixed = dataset[target]  # held-out grids and tools: one fixed pair per item, as before
    assert fixed["name"] == dataset[target]["name"] and source_of(fixed) != 5


def test_zero123_source_replaced_past_a_bad_view_stays_per_sample(tmp_path):
    write_objects(tmp_path, 1, image_size=8)
    os.remove(tmp_path / "000000" / "003.npy")
    dataset = train_nvs.Zero123Folder(str(tmp_path), 8, seed=0)
    items = [dataset.item(4, g) for g in range(100)]
    assert all("003.png" not in item["name"] for item in items)
    kept = [item for item in items if item["name"].startswith("000000/004.png<-")]
    assert {source_of(item) for item in kept} == set(range(12)) - {3, 4}
    passed_over = [item for item in items if item["skipped"]]  # drew 3: the next target, 5, with a new draw
    assert passed_over and all(item["name"].startswith("000000/005.png<-") for item in passed_over)


def step_items(dataset, world_size, steps, workers=0):
    """{global_index: (name, pose)} of the first `steps` global batches of 8, read by every rank."""
    items = {}
    for rank in range(world_size):
        loader = data.make_loader(dataset, 8, 8 // world_size // 2, rank, world_size, seed=3, num_workers=workers)
        for batch in itertools.islice(loader, 2 * steps):  # 2 accumulation micro-batches per step
            for g, name, pose in zip(batch["global_index"].tolist(), batch["name"], batch["pose"]):
                items[g] = (name, pose.tolist())
    return items


def test_loader_draws_the_source_from_the_global_index_on_any_world_size():
    dataset = train_nvs.MultiViewShapes(2, 8, seed=0)
    one, two = step_items(dataset, 1, 3), step_items(dataset, 2, 3, workers=1)
    assert sorted(one) == list(range(24)) and one == two
    sampler = data.GlobalSampler(len(dataset), 8, seed=3)
    for g, (name, _) in one.items():
        assert name == dataset.item(sampler.dataset_index(g), g)["name"]
    # One epoch covers every target once; its sources are the per-sample draws, not ds[i]'s.
    assert {name for name, _ in one.values()} != {dataset[i]["name"] for i in range(24)}


####################################################################################################
# data at scale: compact caches
####################################################################################################

# The feature cache stores fp16 (data.py): round to nearest moves a value x by at most 2^-11 |x|,
# or 2^-25 below fp16's normal range (2^-14). The log-variance L (|L| <= 30) moves by at most
# 2^-7, so std = exp(L / 2) by at most exp(2^-8) - 1 < 0.004 relative. The encoders' fp32 outputs
# may differ by TOLERANCE of their scale between the writer's batches and these; a value near a
# rounding boundary may then round one fp16 step (2^-10 relative) away.
COMPACT_STEP = torch.finfo(torch.float16).eps  # 2^-10


def compact_bound(value, scale):
    """The most fp16 rounding moves `value` (a float32 tensor), plus TOLERANCE of `scale`."""
    return 2.0 ** -11 * value.abs() + 2.0 ** -25 + TOLERANCE * scale


def round_encoders_like_the_cache(monkeypatch):
    """The VAE and DINO then return what a feature cache reads back: their outputs through its format."""
    vae_encode, dino_encode = encoders.VAE.encode, encoders.DINOEncoder.encode

    def through_cache(mean, std, cond):
        return data.expand_features(data.compact_features(mean, std, cond))

    monkeypatch.setattr(encoders.VAE, "encode", lambda self, images, *args: tuple(
        through_cache(*vae_encode(self, images, *args), torch.zeros(0)).values())[:2])
    monkeypatch.setattr(encoders.DINOEncoder, "encode", lambda self, images, *args: through_cache(
        torch.zeros(0), torch.ones(0), dino_encode(self, images, *args))["cond"])


def test_compact_cache_keeps_training_targets_within_the_fp16_bound(tmp_path):
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    cache = write_cache(tmp_path / "cache", vae_dir, dino_dir, "shapes:6")
    vae, dino = encoders.VAE.from_pretrained(vae_dir), encoders.DINOEncoder.from_pretrained(dino_dir)
    space = train_i2i.ImageSpace(vae)
    images = torch.stack([data.open_dataset("shapes:6", 32)[i]["image"] for i in range(6)])
    flips = torch.tensor([False, True] * 3)
    mirror_images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    batch = data.collate_samples([cache[i] for i in range(6)])
    cached = train_i2i.mirrored(batch, flips)
    mean, std = vae.encode(mirror_images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    target = train_i2i.diffusion_targets(cached, noise, space)
    exact = space.from_posterior(mean, std, noise)
    # x0 = (mean + std * noise) * scale moves by the mean's rounding and < 0.004 of std * noise.
    size = space.vae.scaling_factor * (mean.abs() + std * noise.abs())
    bound = space.vae.scaling_factor * (compact_bound(mean, 0) + 0.004 * std * noise.abs()) + TOLERANCE * size.max()
    assert ((target - exact).abs() <= bound).all()
    cond = dino.encode(mirror_images)
    assert ((cached["cond"] - cond).abs() <= compact_bound(cond, cond.abs().max())).all()
    assert cached["latent_std"].dtype == cached["cond"].dtype == torch.float32  # training reads float32


def test_an_older_feature_cache_is_refused_with_one_line(tmp_path, capsys):
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    root = tmp_path / "cache"
    write_cache(root, vae_dir, dino_dir)
    info = data.read_cache_info(root)
    (root / data.CACHE_INFO).write_text(json.dumps({k: v for k, v in info.items() if k != "format"}))  # format 1
    with pytest.raises(ValueError, match=r"format 1 .* write it anew with `python data.py cache`") as error:
        data.FeatureCache(root)
    assert "\n" not in str(error.value)
    with pytest.raises(SystemExit):
        train_i2i.main(SCALE_RUN + ["--data", f"cache:{root}", "--image-size", "32", "--vae", vae_dir,
                                    "--encoder", dino_dir, "--out", str(tmp_path / "run")])
    message = capsys.readouterr().err.strip()
    assert "format 1" in message and "\n" not in message
    with pytest.raises(ValueError, match="format 1"):  # nor finished by this data.py
        write_cache(root, vae_dir, dino_dir)


def test_feature_cache_bytes_per_item_follow_the_layout(tmp_path):
    # At 256 px: 2 images x (mean + log-variance of 4 x 32 x 32, and a 768-d CLS) x 2 bytes, + an int64 index.
    assert data.cache_item_bytes((4, 32, 32), 768) == 2 * (2 * 4096 + 768) * 2 + 8 == 35848  # 35.0 KiB
    assert data.cache_item_bytes((4, 32, 32), 768, cache_format=1) == 71688  # float32: 70.0 KiB
    vae_dir, dino_dir = tiny_encoders(tmp_path)
    write_cache(tmp_path / "cache", vae_dir, dino_dir, shard_size=4)  # 10 items: shards of 4, 4, 2
    for shard, items in enumerate([4, 4, 2]):
        path = data.cache_shard_path(tmp_path / "cache", shard)
        with open(path, "rb") as f:
            header = 8 + struct.unpack("<Q", f.read(8))[0]
        assert os.path.getsize(path) - header == items * data.cache_item_bytes((4, 4, 4), TINY_DINO["width"])


def test_text_cache_in_bf16_is_within_bf16_rounding_of_fp32(tmp_path):
    run = ["cache-text", "--data", "shapes:8", "--image-size", "16", "--num-samples", "4"]
    train_t2i.main(run + ["--out", str(tmp_path / "fp32")])
    train_t2i.main(run + ["--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    exact, compact = train_t2i.TextFeatureCache(str(tmp_path / "fp32")), train_t2i.TextFeatureCache(str(tmp_path / "bf16"))
    assert (exact.info["dtype"], compact.info["dtype"]) == ("float32", "bfloat16")  # the CPU's T5 runs in fp32
    captions = [data.open_dataset("shapes:8", 16)[i]["caption"] for i in range(8)]
    for stored, reference in zip(compact.token_features(captions), exact.token_features(captions)):
        assert stored.dtype == torch.bfloat16
        # bf16 keeps 8 significant bits: round to nearest moves x by 2^-8 |x| (2^-134 among subnormals).
        torch.testing.assert_close(stored.float(), reference, rtol=2.0 ** -8, atol=2.0 ** -134)
# data at scale: the tar index
####################################################################################################

def write_index_test_shards(folder):
    """Three shards: .txt and .json captions, a member without image, a shard cut inside h.png."""
    image = lambda k: encode(noise_image(8, 8, k), "PNG")
    write_tar(folder / "00.tar", {"a.png": image(0), "a.txt": b" cap a ", "b.cls": b"1", "c.png": image(1)})
    write_tar(folder / "01.tar", {"d.png": image(2), "d.json": json.dumps({"caption": "cap d"}).encode()})
    whole = write_tar(folder / "whole", {"f.png": image(3), "g.png": image(4), "h.png": image(5)}).read_bytes()
    (folder / "02.tar").write_bytes(whole[: whole.index(image(5)) + 10])
    return [str(folder / f"{k:02d}.tar") for k in range(3)]


def test_tar_index_maps_exactly_what_a_scan_finds(tmp_path):
    paths = write_index_test_shards(tmp_path)
    with pytest.warns(UserWarning, match="02.tar is unreadable"):
        dataset = data.TarShards(paths, 8)
    scans = [data._index_shard(path)[0] for path in paths]  # what TarShards held in memory before
    expected = np.array([(s,) + row for s, rows in enumerate(scans) for row, _ in rows], data._TAR_RECORD)
    assert isinstance(dataset.records, np.memmap) and np.array_equal(dataset.records, expected)
    assert [dataset.member_names[j] for j in range(len(dataset))] == [n for rows in scans for _, n in rows]
    assert [os.path.basename(dataset.name(j)) for j in range(len(dataset))] == \
        ["00.tar:a.png", "00.tar:c.png", "01.tar:d.png", "02.tar:f.png", "02.tar:g.png", "02.tar:h.png"]
    assert [dataset[j]["caption"] for j in range(3)] == ["cap a", "", "cap d"]
    assert dataset[5]["skipped"] == [f"{paths[2]}:h.png"] and dataset[5]["name"] == f"{paths[0]}:a.png"
    assert os.path.dirname(dataset.index) == str(tmp_path) and ".lumos_index_" in dataset.index


def test_tar_index_is_read_not_rebuilt_and_survives_pickling(tmp_path, monkeypatch):
    paths = write_index_test_shards(tmp_path)
    with pytest.warns(UserWarning):
        first = data.TarShards(paths, 8)
    monkeypatch.setattr(data, "_index_shard", lambda path: pytest.fail("scanned a shard again"))
    with pytest.warns(UserWarning, match="02.tar is unreadable"):  # the scan's warning, kept in the index
        dataset = data.TarShards(paths, 8)
    assert torch.equal(dataset[3]["image"], first[3]["image"])  # maps the index, opens a shard
    pickled = pickle.dumps(dataset)
    assert len(pickled) < 4000 and pickle.loads(pickled)._maps is None  # the maps are not copied
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=[3, 1], num_workers=1,
                                         multiprocessing_context="spawn")  # pickled into the worker
    assert [item["name"] for item in loader] == [first.name(3), first.name(1)]


def test_changed_shard_is_refused_until_the_index_is_rebuilt(tmp_path, monkeypatch):
    paths, index_dir = write_index_test_shards(tmp_path), tmp_path / "index"
    monkeypatch.setenv(data.TAR_INDEX_ENV, str(index_dir))
    spec = f"{tmp_path}/{{00..02}}.tar"
    with pytest.warns(UserWarning):
        assert data.open_dataset(spec, 8).index.startswith(str(index_dir))
        os.utime(paths[1], ns=(0, 10**18))
        with pytest.raises(data.StaleTarIndex) as refused:
            data.open_dataset(spec, 8)[2]
        data.main(["index", spec, "--index", str(index_dir), "--workers", "2"])
        assert data.open_dataset(spec, 8)[2]["caption"] == "cap d"
    assert str(refused.value) == (f"tar shard {paths[1]} changed since its index {data.tar_index_folder(paths)} "
                                  f"was built (size or mtime): rebuild it with `python data.py index '{spec}' "
                                  f"--index {index_dir}`")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot write the tar index into .*file/sub .*python data.py index"):
        data.TarShards(paths, 8, index_dir=str(tmp_path / "file" / "sub"))


def test_concurrent_first_use_leaves_one_whole_index(tmp_path):
    paths = write_index_test_shards(tmp_path)
    code = ("import os, sys, time, warnings; warnings.simplefilter('ignore'); import data; "
            "open(sys.argv[1] + '.ready', 'w').close()\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
            "dataset = data.TarShards(sys.argv[3:], 8); print(len(dataset), dataset.info['build'], dataset[4]['name'])")
    go = tmp_path / "go"
    # Two nodes' LOCAL_RANK 0 race to build it; a LOCAL_RANK 1 waits for it.
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"rank{k}"), str(go), *paths],
                              stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(data.__file__),
                              env={**os.environ, "LOCAL_RANK": str(local_rank)})
             for k, local_rank in enumerate([0, 0, 1])]
    while not all((tmp_path / f"rank{k}.ready").exists() for k in range(3)):
        time.sleep(0.01)
    go.touch()
    outputs = [rank.communicate(timeout=120)[0].split() for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0, 0]
    build = data.read_tar_index_info(data.tar_index_folder(paths))["build"]
    assert outputs == [["6", build, f"{paths[2]}:g.png"]] * 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lumos")] == [os.path.basename(data.tar_index_folder(paths))]
