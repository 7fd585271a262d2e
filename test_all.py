"""The test suite: fast tests by default, `slow` ones (marked) also run in CI.

Offline: every checkpoint is a tiny random one written in the Hub layout into a temporary folder."""
import argparse
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
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import types
import weakref
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # subprocesses

# The tiny training run every training test starts from (later flags override): a 2-block DiT of
# width 32 on 16 px images, batches of 8, each step logged, no sample grid unless asked, a 2-step
# warm-up, clipping active at every step (norms are ~0.2) and an EMA that moves visibly.
TINY_SIZE = ["--model", "DiT-S/4", "--depth", "2", "--hidden-size", "32", "--num-heads", "2"]
TINY_LOOP = ["--image-size", "16", "--global-batch-size", "8", "--log-every", "1", "--sample-every", "0",
             "--sample-steps", "2", "--num-samples", "4", "--lr", "1e-3", "--warmup-steps", "2",
             "--max-grad-norm", "0.1", "--ema-decay", "0.5"]
TINY_RUN = [*TINY_SIZE, *TINY_LOOP, "--data", "shapes:64"]  # train_i2i.py; T2I and NVS add --init and data


def read_metrics(out, kind="loss"):
    """A run's metrics.jsonl as {key: [value per line]} over the lines with `kind`: "loss" for the
    training lines, "psnr" for NVS's evaluation lines."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [line for line in map(json.loads, f) if kind in line]
    return {key: [line.get(key) for line in lines] for key in (lines[0] if lines else {})}


def torchrun(*args, nproc=2):
    """`torchrun --standalone --nproc_per_node 2 args` on the CPU (gloo)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_i2i(tmp_path_factory):
    """The folder of a 3-step TINY_RUN (checkpoint, ema.safetensors, metrics.jsonl), with two
    reference images ref0.png, ref1.png: the I2I export every sampling and fine-tuning test uses."""
    out = tmp_path_factory.mktemp("i2i")
    train_i2i.main(TINY_RUN + ["--steps", "3", "--out", str(out)])
    for i in range(2):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(out / f"ref{i}.png")
    return out


# ======================================== dit ====================================================

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, cond_dim=12, cond_tokens=5)
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
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    x = randn(batch, model.out_channels if model.pose_dim else model.in_channels, S, S)
    t = torch.rand(batch, generator=g) * 999
    y, mask = randn(batch, model.cond_tokens, model.cond_dim), torch.ones(batch, model.cond_tokens, dtype=torch.bool)
    mask[1, 3:] = False
    views = dict(source=randn(batch, model.out_channels, S, S),
                 pose=randn(batch, model.pose_dim)) if model.pose_dim else {}
    return x, t, y, mask, views


def reference_forward(model, x, t, y, mask, img_hw=None, aspect_ratio=None):
    """SPEC sections 2 and 2b restated with plain ops on the state dict, one sample at a time (attending
    to its real tokens); a multi-scale model takes img_hw and aspect_ratio, and x of any patch multiples."""
    sd = model.state_dict()
    D, H, p = model.hidden_size, model.blocks[0].attn.num_heads, model.patch_size
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)
    gelu = lambda v: F.gelu(v, approximate="tanh")

    def mha(q, k, v):  # over no keys at all (an empty condition) the result is 0
        q, k, v = (a.view(a.shape[0], H, D // H).transpose(0, 1) for a in (q, k, v))
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D // H), dim=-1)
        return (w @ v).transpose(0, 1).reshape(-1, D)

    def sinusoid(s):  # float32 by design (as in the release): the model's ops on the whole batch, so bitwise its
        args = s.float()[:, None] * torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)

    def embed(s, name):  # the timestep-style MLP of each scalar
        return lin(F.silu(lin(sinusoid(s), name + ".mlp.0")), name + ".mlp.2")

    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    pos_embed = sd["pos_embed"][0]
    if model.multi_scale:  # SPEC 2b: the grid's own (h, w), with the model's base size and lewei_scale
        base, omega = model.input_size // p, 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
        axis = lambda n: (torch.arange(n, dtype=torch.float32) / (n / base) / model.lewei_scale).double()  # float32: the release's
        row, col = torch.meshgrid(axis(gh), axis(gw), indexing="ij")
        halves = [a.reshape(-1, 1) * omega for a in (col, row)]  # the column first, then the row
        pos_embed = torch.cat([f(a) for a in halves for f in (torch.sin, torch.cos)], dim=1).to(x.dtype)
    c_all = embed(t, "t_embedder")
    if model.multi_scale:
        sizes = [embed(img_hw[:, k], "csize_embedder") for k in (0, 1)]
        c_all = c_all + torch.cat([*sizes, embed(aspect_ratio[:, 0], "ar_embedder")], dim=1)
    outs = []
    for i in range(x.shape[0]):
        tokens = F.conv2d(x[i:i + 1], sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
        tokens = tokens.flatten(2)[0].T + pos_embed
        c = c_all[i]
        cond = lin(gelu(lin(y[i][mask[i]], "y_embedder.y_proj.fc1")), "y_embedder.y_proj.fc2")
        for b in range(len(model.blocks)):
            pre = f"blocks.{b}."
            s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), pre + "adaLN_modulation.1").chunk(6)
            q, kk, v = lin(ln(tokens) * (1 + sc1) + s1, pre + "attn.qkv").chunk(3, dim=-1)
            tokens = tokens + g1 * lin(mha(q, kk, v), pre + "attn.proj")
            ck, cv = lin(cond, pre + "cross_attn.kv_linear").chunk(2, dim=-1)
            tokens = tokens + lin(mha(lin(tokens, pre + "cross_attn.q_linear"), ck, cv), pre + "cross_attn.proj")
            tokens = tokens + g2 * lin(gelu(lin(ln(tokens) * (1 + sc2) + s2, pre + "mlp.fc1")), pre + "mlp.fc2")
        shift, scale = (sd["final_layer.scale_shift_table"] + c).chunk(2)
        out = lin(ln(tokens) * (1 + scale) + shift, "final_layer.linear")
        C = model.pred_channels  # token (h, w) holds its patch as (p, q, c): to (c, h*p, w*p)
        outs.append(out.view(gh, gw, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, gh * p, gw * p))
    return torch.stack(outs)


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# float64: one function's correct computations differ by ~1e-16 per op (order); a bug, like DIFFERENT, is far above.
EXACT, DIFFERENT = 1e-10, 1e-3


def test_sizes_state_dict_keys_configs_and_pos_embed_are_the_official_ones():
    with torch.device("meta"):
        i2i, t2i = DiT_models["DiT-XL/2"](), DiT_models["DiT-XL/2"](cond_dim=4096, cond_tokens=120)
        small = DiT_models["DiT-B/4"]()
    assert [sum(p.numel() for p in m.parameters()) for m in (i2i, t2i)] == [822_006_176, 825_840_032]
    assert i2i.pos_embed.shape == (1, 256, 1152) and i2i.y_embedder.y_embedding.shape == (1, 768)
    assert abs(forward_flops(i2i) / 1e9 - 275) < 2
    assert (len(small.blocks), small.hidden_size, small.blocks[0].attn.num_heads, small.patch_size) == (12, 768, 12, 4)
    assert_raises(ValueError, "unknown model 'DiT-XXL/2'", lambda: build_model("DiT-XXL/2"))
    plain, pose = LumosDiT(**TINY), LumosDiT(**{**TINY, **POSE})
    sd, pose_sd = plain.state_dict(), pose.state_dict()
    official = re.compile(r"pos_embed|y_embedder\.y_embedding|final_layer\.scale_shift_table|(x_embedder\.proj|"
                          r"t_embedder\.mlp\.[02]|y_embedder\.y_proj\.fc[12]|final_layer\.linear|blocks\.\d+\."
                          r"(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.fc[12]|adaLN_modulation\.1))"
                          r"\.(weight|bias)")
    assert all(map(official.fullmatch, sd)) and len(sd) == 1 + 2 + 4 + 1 + 4 + TINY["depth"] * 16 + 3, list(sd)
    assert set(pose_sd) - set(sd) == {"pose_mixer.weight", "pose_mixer.bias"}  # the keys of the NVS exports made so far
    assert pose_sd["pose_mixer.weight"].shape == (12, 12 + 4)
    for current in (plain.config, pose.config):  # as earlier versions saved them: no pose_dim, class_dropout_prob
        saved = {key: value for key, value in current.items() if key not in ("pose_dim", "cond_dropout_prob")}
        assert dit.upgrade_config({**saved, "class_dropout_prob": current["cond_dropout_prob"]}) == current
        assert dit.upgrade_config(current) == current and dit.upgrade_config(current) is not current
    D, g = 16, 4
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    row, col = np.divmod(np.arange(g * g), g)  # token i is at (row, col) = divmod(i, g)
    x_arg, y_arg = (col / (g / 2) / 2.0)[:, None] * omega, (row / (g / 2) / 2.0)[:, None] * omega
    expected = np.concatenate([np.sin(x_arg), np.cos(x_arg), np.sin(y_arg), np.cos(y_arg)], axis=1)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(D, g, lewei_scale=2.0, base_size=2), expected, atol=1e-6)
    small, big = tiny_model(), LumosDiT(**{**TINY, "input_size": 16, "lewei_scale": 2.0}).double()
    big_pos = big.pos_embed.clone()
    big.load_state_dict(small.state_dict(), strict=True)
    assert torch.equal(big.pos_embed, big_pos) and big.pos_embed.shape == (1, 64, 32)
    assert torch.equal(big.blocks[0].mlp.fc1.weight, small.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("overrides", [{}, {"learn_sigma": False, "patch_size": 4}], ids=["sigma", "no_sigma"])
def test_forward_and_gradient_match_reference_with_padding_empty_and_null_conditions(overrides):
    model = tiny_model(**overrides)
    x, t, y, mask, _ = tiny_inputs(model)
    y, mask = y[:, :4], mask[:, :4]  # fewer tokens than cond_tokens: the null ones are cut to 4 too
    mask[2] = False  # sample 2: nothing but padding, so cross-attention adds only proj's bias
    drop = torch.tensor([False, True, False])  # sample 1 has padding: its null tokens are cut to match
    null = torch.where(drop[:, None, None], model.y_embedder.y_embedding[:4].expand_as(y), y)
    with torch.no_grad():
        out = model(x, t, y, mask)
        assert out.shape == (3, 8 if model.learn_sigma else 4, 8, 8)
        assert max_rel_err(out, reference_forward(model, x, t, y, mask)) < EXACT
        assert max_rel_err(model(x, t, y, mask, drop_cond=drop), reference_forward(model, x, t, null, mask)) < EXACT
    grads = []
    for flag in (False, True):  # gradient checkpointing changes no gradient
        model.grad_checkpointing = flag
        model.zero_grad()
        model(x, t, y, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert max_rel_err(grads[1], grads[0]) < EXACT


MULTI_SCALE = dict(hidden_size=48, multi_scale=True, lewei_scale=2.0)  # width: 3 size embeddings of 16


def size_conditions(batch, dtype=torch.float64):
    """img_hw (B, 2) in pixels and aspect_ratio (B, 1) = height / width, as the release's data_info."""
    img_hw = torch.tensor([[48.0, 96.0], [1152.0, 896.0], [64.0, 64.0]] * batch, dtype=dtype)[:batch]
    return img_hw, (img_hw[:, :1] / img_hw[:, 1:]).round(decimals=2)


def test_multi_scale_model_matches_spec_2b_on_non_square_latents_with_masked_captions():
    model = tiny_model(**MULTI_SCALE)
    extra = {"csize_embedder.mlp.0.weight", "csize_embedder.mlp.0.bias", "csize_embedder.mlp.2.weight",
             "csize_embedder.mlp.2.bias", *(f"ar_embedder.mlp.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias"))}
    assert set(model.state_dict()) - set(tiny_model(hidden_size=48).state_dict()) == extra
    assert model.csize_embedder.mlp[2].weight.shape == (16, 16)
    x, t, y, mask, _ = tiny_inputs(model)
    img_hw, aspect_ratio = size_conditions(3)
    drop = torch.tensor([False, True, False])
    null = torch.where(drop[:, None, None], model.y_embedder.y_embedding.expand_as(y), y)
    with torch.no_grad():
        for latent in (x, torch.randn(3, 4, 6, 12, dtype=torch.float64), torch.randn(3, 4, 10, 4, dtype=torch.float64)):
            out = model(latent, t, y, mask, img_hw=img_hw, aspect_ratio=aspect_ratio)  # 8 x 8 is the base grid
            assert out.shape == (3, 8, *latent.shape[2:])
            assert max_rel_err(out, reference_forward(model, latent, t, y, mask, img_hw, aspect_ratio)) < EXACT
        out = model(x[:, :, :6], t, y, mask, drop_cond=drop, img_hw=img_hw, aspect_ratio=aspect_ratio)
        assert max_rel_err(out, reference_forward(model, x[:, :, :6], t, null, mask, img_hw, aspect_ratio)) < EXACT
        other_size = model(x, t, y, mask, img_hw=img_hw.flip(0), aspect_ratio=aspect_ratio)
        assert max_rel_err(other_size, model(x, t, y, mask, img_hw=img_hw, aspect_ratio=aspect_ratio)) > DIFFERENT
        cond, uncond = (model(x, t, y, mask, drop_cond=torch.full((3,), d), img_hw=img_hw, aspect_ratio=aspect_ratio)
                        for d in (False, True))
        guided = model.forward_with_cfg(x, t, y, 4.5, mask, img_hw=img_hw, aspect_ratio=aspect_ratio)
        assert max_rel_err(guided[:, :4], uncond[:, :4] + 4.5 * (cond[:, :4] - uncond[:, :4])) < EXACT
    assert_raises(ValueError, r"needs img_hw \(3, 2\) and aspect_ratio \(3, 1\), got None", lambda: model(x, t, y, mask))
    assert_raises(ValueError, "multiples of the patch size 2",
                  lambda: model(x[:, :, :5], t, y, mask, img_hw=img_hw, aspect_ratio=aspect_ratio))
    assert_raises(ValueError, "inputs of a multi-scale model",
                  lambda: tiny_model()(x, t, y, mask, img_hw=img_hw, aspect_ratio=aspect_ratio))
    odd = LumosDiT(**{**TINY, "multi_scale": True})  # width 32: 10 for each size, the rest, 12, for the ratio
    assert (odd.csize_embedder.mlp[2].out_features, odd.ar_embedder.mlp[2].out_features) == (10, 12)
    assert odd(x.float()[:, :, :6], t, y.float(), mask, img_hw=img_hw.float(), aspect_ratio=aspect_ratio.float()).shape == (3, 8, 6, 8)
    assert_raises(ValueError, "no pose input", lambda: LumosDiT(**{**TINY, **POSE, "multi_scale": True}))
    with torch.device("meta"):  # the release's T2I model: XL/2 at 1024 px (128 x 128 latents), 120 T5 tokens
        release = DiT_models["DiT-XL/2"](input_size=128, cond_dim=4096, cond_tokens=120, multi_scale=True, lewei_scale=2.0)
    assert sum(p.numel() for p in release.parameters()) == 826_333_088 and release.pos_embed.shape == (1, 4096, 1152)


def test_the_official_t2i_file_loads_strictly_as_the_1024_px_multi_scale_model(tmp_path, monkeypatch):
    monkeypatch.setitem(dit.DiT_models, "DiT-T/2", partial(LumosDiT, depth=2, hidden_size=48, num_heads=4, patch_size=2))
    torch.manual_seed(0)  # as the release saves it: a plain state dict; 1024 px is a 64 x 64 token grid
    released = LumosDiT(input_size=128, depth=2, num_heads=4, cond_dim=12, cond_tokens=120, **MULTI_SCALE)
    state = {key: 0.3 * torch.randn_like(value) if key != "pos_embed" else value
             for key, value in released.state_dict().items()}
    torch.save(state, tmp_path / "Lumos_T2I.pth")
    weights, info = dit.read_weights(str(tmp_path / "Lumos_T2I.pth"))
    assert (info["task"], info["image_size"], info["model"]) == ("t2i", 1024, "DiT-T/2")
    assert info["config"] == {**released.config, "num_heads": 4}
    model = LumosDiT(**info["config"])
    encoders.load_into(model, weights, "Lumos_T2I.pth")
    model.double().eval()
    x, t, y, mask, _ = tiny_inputs(tiny_model(cond_tokens=120))
    img_hw, aspect_ratio = size_conditions(3)
    with torch.no_grad():
        latent = torch.randn(3, 4, 6, 10, dtype=torch.float64)
        out = model(latent, t, y, mask, img_hw=img_hw, aspect_ratio=aspect_ratio)
        assert max_rel_err(out, reference_forward(model, latent, t, y, mask, img_hw, aspect_ratio)) < EXACT
    torch.save({**state, "ema_decay": torch.tensor(0.9999)}, tmp_path / "extra.pth")  # strict: named, not dropped
    assert_raises(ValueError, r"1 unexpected \(ema_decay\)",
                  lambda: encoders.load_into(LumosDiT(**info["config"]), dit.read_weights(str(tmp_path / "extra.pth"))[0], "x"))
    args = t2i_args("--init", tmp_path / "Lumos_T2I.pth", "--vae", "stabilityai/sd-vae-ft-mse")  # fine-tuned as it is
    state, info = train_t2i.read_init(args)
    tuned = train_t2i.t2i_model(args, state, info, 12)
    assert (args.image_size, tuned.multi_scale, tuned.lewei_scale) == (1024, True, 2.0)
    assert all(torch.equal(tuned.state_dict()[key], weights[key]) for key in weights if key != "pos_embed")


@pytest.mark.parametrize("pose", [{}, POSE], ids=["i2i", "nvs"])
def test_cfg_guided_model_fn_and_condition_dropout(pose):
    model = tiny_model(cond_dropout_prob=0.5, **pose)
    x, t, y, mask, views = tiny_inputs(model, batch=16)
    with torch.no_grad():
        cond = model(x, t, y, mask, **views)
        uncond = model(x, t, y, mask, drop_cond=torch.ones(16, dtype=torch.bool), **views)
        guided = model.forward_with_cfg(x, t, y, 4.5, mask, **views)
        assert max_rel_err(guided[:, :4], uncond[:, :4] + 4.5 * (cond[:, :4] - uncond[:, :4])) < EXACT
        assert max_rel_err(guided[:, 4:], cond[:, 4:]) < EXACT  # the variance channels are not guided
        # guided_model_fn routes the condition to forward_with_cfg, or to forward at scale 1
        assert torch.equal(guided_model_fn(model, 4.5, y=y, mask=mask, **views)(x, t), guided)
        assert torch.equal(guided_model_fn(model, y=y, mask=mask, **views)(x, t), cond)
        if pose:  # a dropped condition zeroes the source view and keeps the pose; otherwise both matter
            null, other_views = model.y_embedder.y_embedding.expand_as(y), tiny_inputs(model, batch=16, seed=5)[4]
            no_view = model(x, t, null, mask, source=torch.zeros_like(views["source"]), pose=views["pose"])
            assert max_rel_err(no_view, uncond) < EXACT
            for name in ("source", "pose"):
                assert max_rel_err(model(x, t, y, mask, **{**views, name: other_views[name]}), cond) > DIFFERENT
        # The draw that seeded training runs rest on: the same seed must drop the same samples.
        drawn = torch.rand(16, generator=torch.Generator().manual_seed(7)) < 0.5
        expected = model(x, t, y, mask, drop_cond=drawn, **views)
        model.train()
        first, other = (model(x, t, y, mask, generator=torch.Generator().manual_seed(s), **views) for s in (7, 8))
    assert max_rel_err(first, expected) < EXACT and max_rel_err(other, expected) > DIFFERENT


def test_zero_init_pose_model_at_step_zero_and_bad_inputs():
    i2i = tiny_model()
    nvs = LumosDiT(**{**i2i.config, **POSE}).double().eval()
    x, t, y, mask, views = tiny_inputs(nvs, batch=8)
    tokens, c, cond = (torch.randn(*shape, dtype=torch.float64) for shape in ((3, 16, 32), (3, 32), (3, 5, 32)))
    with torch.no_grad():  # as initialised, the output is 0 and every block the identity
        assert torch.count_nonzero(nvs(x, t, y, mask, **views)) == 0
        assert torch.equal(nvs.blocks[0](tokens, c, cond), tokens)
    # NVS fine-tuning starts from the I2I weights, zero patch weights on the source channels, pose_mixer as initialised.
    weight = i2i.x_embedder.proj.weight
    nvs.load_state_dict({**nvs.state_dict(), **i2i.state_dict(),
                         "x_embedder.proj.weight": torch.cat([weight, torch.zeros_like(weight)], dim=1)})
    drop = torch.arange(8) % 3 == 0
    with torch.no_grad():
        assert max_rel_err(nvs(x, t, y, mask, **views), i2i(x, t, y, mask)) < EXACT
        assert max_rel_err(nvs(x, t, y, mask, drop_cond=drop, **views), i2i(x, t, y, mask, drop_cond=drop)) < EXACT
        guided = nvs.forward_with_cfg(x, t, y, 4.5, mask, **views)
        assert max_rel_err(guided, i2i.forward_with_cfg(x, t, y, 4.5, mask)) < EXACT
    source, pose = views["source"], views["pose"]  # bad inputs name the argument
    for call, message in [(lambda: i2i(x[:, :3], t, y, mask), "input x has shape"),
                          (lambda: i2i(x, t, y[..., :5], mask), "condition y has shape"),
                          (lambda: i2i(x, t, y, mask[:, :2]), "mask has shape"),
                          (lambda: LumosDiT(input_size=9), "not divisible by patch_size"),
                          (lambda: nvs(x, t, y, mask, source=source[..., :4, :4], pose=pose),
                           r"source \(8, 4, 4, 4\) must match x \(8, 4, 8, 8\)"),
                          (lambda: nvs(x, t, y, mask, source=source, pose=pose[:, :3]),
                           r"pose \(8, 3\) must be \(8, 4\)"),
                          (lambda: nvs(x, t, y, mask, source=source), "needs both source and pose"),
                          (lambda: i2i(x, t, y, mask, **views), "has pose_dim=0"),
                          (lambda: LumosDiT(**TINY, pose_dim=4), "in_channels must be 2 x out_channels, got 4 and 4")]:
        assert_raises(ValueError, message, call)


@pytest.mark.parametrize("overrides", [{}, {"input_size": 16, "patch_size": 4, "cond_tokens": 7, "depth": 3}, POSE],
                         ids=["tiny", "patch4", "nvs"])
def test_forward_flops_match_flop_counter(overrides):
    model = tiny_model(**overrides)
    x, t, y, mask, views = tiny_inputs(model, batch=2)
    # FlopCounterMode counts nothing in the CPU flash-attention kernel; the MATH backend runs attention as matmuls.
    math_attention = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with math_attention, FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y, mask, **views)
    assert abs(forward_flops(model, batch_size=2) - counter.get_total_flops()) / counter.get_total_flops() < 0.02


# ======================================== diffusion ==============================================

T = 1000
REF_ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
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


def seeded_noise(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def assert_raises(error, match, call):
    with pytest.raises(error, match=match):
        call()


def diffusion(prediction="epsilon"):
    return GaussianDiffusion(linear_betas(T), prediction)


def fixed_output(output, calls=None):
    """A model that returns `output`, appending its calls to `calls`."""
    return lambda x, t, **kwargs: (calls if calls is not None else []).append((x, t, kwargs)) or output


def recording(model_fn=gaussian_eps):
    """model_fn, recording its inputs and timesteps in .inputs and .times."""
    def record(x, t):
        record.inputs.append(x.clone())
        record.times.append(t.clone())
        return model_fn(x, t)
    record.inputs, record.times = [], []
    return record


def test_schedules_respacing_q_sample_and_posterior_follow_their_specs_and_bad_arguments_raise():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and torch.equal(beta_schedule("linear", 1000), betas)
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    cosine = cosine_betas(1000)
    assert cosine.dtype == torch.float64 and cosine.max().item() == 0.999  # the last step is capped
    np.testing.assert_allclose(cosine.numpy(), np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-12)
    for steps in (2, 50, 250, 1000):  # respacing keeps improved DDPM's steps and their alphas_cumprod
        kept = spaced_timesteps(1000, steps)
        assert kept == improved_ddpm_spacing(1000, steps) and kept[-1] == 999 and len(set(kept)) == steps
    base = diffusion().respaced(250)  # a respaced chain: the posterior must use its own betas
    assert base.num_timesteps == 250 and base.timestep_map.tolist() == improved_ddpm_spacing(1000, 250)
    np.testing.assert_allclose(base.alphas_cumprod.numpy(), REF_ABAR[base.timestep_map.numpy()], rtol=1e-12)
    g = torch.Generator().manual_seed(0)
    x0, noise, x_t = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 1, 120, 249])
    a, abar_prev = (torch.from_numpy(base.alphas_cumprod.numpy())[i].view(-1, 1, 1, 1) for i in (t, t[1:] - 1))
    torch.testing.assert_close(base.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    mean, variance, log_variance = base.q_posterior(x0, x_t, t)
    torch.testing.assert_close(mean[0], x0[0])  # at t = 0 x_{-1} is x0: no variance, the log clipped to the next's
    assert variance[0].item() == 0 and log_variance[0].item() == log_variance[1].item()
    # q(x_{t-1} | x_t, x0) ∝ N(x_{t-1}; sqrt(abar_prev) x0, 1 - abar_prev) N(x_t; sqrt(alpha) x_{t-1}, 1 - alpha)
    alpha = a[1:] / abar_prev
    precision = 1 / (1 - abar_prev) + alpha / (1 - alpha)
    expected_mean = (abar_prev.sqrt() * x0[1:] / (1 - abar_prev) + alpha.sqrt() * x_t[1:] / (1 - alpha)) / precision
    torch.testing.assert_close(mean[1:], expected_mean)
    torch.testing.assert_close(variance[1:].flatten(), 1 / precision.flatten(), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_variance[1:].flatten(), -precision.log().flatten(), rtol=1e-12, atol=0)
    noise = torch.zeros(2, 4, 2, 2)  # bad arguments raise clear errors
    assert_raises(ValueError, "'linear' or 'cosine'", lambda: beta_schedule("quadratic"))
    assert_raises(ValueError, "steps=1001", lambda: spaced_timesteps(1000, 1001))
    assert_raises(ValueError, "prediction 'x'", lambda: GaussianDiffusion(linear_betas(), prediction="x"))
    assert_raises(ValueError, "betas", lambda: GaussianDiffusion(torch.tensor([0.1, 1.5])))
    assert_raises(ValueError, "returned 3 channels; expected 4", lambda: diffusion().training_losses(
        fixed_output(noise[:, :3]), noise, torch.tensor([1, 2])))
    assert_raises(ValueError, "method 'euler'", lambda: diffusion().sample(gaussian_eps, noise, "euler", 10))
    assert_raises(ValueError, "skip_type", lambda: diffusion().sample(gaussian_eps, noise, "dpm++", 10, skip_type="x"))
    assert_raises(ValueError, "order=3", lambda: diffusion().sample(gaussian_eps, noise, "dpm++", 10, order=3))


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
    terms = GaussianDiffusion(linear_betas(num_steps)).training_losses(
        fixed_output(torch.cat([eps, v], dim=1), calls), x0, t, {"y": "cond"}, noise)
    (x_t, model_t, kwargs), = calls
    abar = torch.from_numpy(np.cumprod(1 - betas))[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert model_t.dtype == torch.float32 and model_t.tolist() == t.tolist() and kwargs == {"y": "cond"}
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    vb = torch.from_numpy(reference_vb_bits(betas, *(a.numpy() for a in (x0, x_t, t, eps, v)))) * num_steps / 1000
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["mse"], mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms["vb"], vb, rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["loss"], mse + vb, rtol=1e-9, atol=0)


def test_mse_and_v_prediction_losses_and_the_vb_term_trains_only_the_variance():
    g = torch.Generator().manual_seed(0)
    x0, noise, output = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 400, 999])
    eps_terms = diffusion().training_losses(fixed_output(output), x0, t, noise=noise)
    assert set(eps_terms) == {"loss", "mse"} and torch.equal(eps_terms["loss"], eps_terms["mse"])  # C channels: no vb
    torch.testing.assert_close(eps_terms["loss"], ((noise - output) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    v_terms = diffusion("v").training_losses(fixed_output(output), x0, t, noise=noise)
    abar = torch.from_numpy(REF_ABAR)[t].view(-1, 1, 1, 1)
    v_target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(v_terms["loss"], ((v_target - output) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(v_terms["loss"], v_terms["mse"])
    x0_terms = diffusion("x0").training_losses(fixed_output(output), x0, t, noise=noise)
    torch.testing.assert_close(x0_terms["loss"], ((x0 - output) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    output = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)  # 2C channels: mse trains the mean
    x0 = torch.rand(3, 2, 2, 2, dtype=torch.float64) * 2 - 1
    for term, trained in (("vb", slice(2, None)), ("mse", slice(None, 2))):
        output.grad = None
        diffusion().training_losses(fixed_output(output), x0, torch.tensor([0, 5, 700]))[term].sum().backward()
        untrained = output.grad.clone()
        untrained[:, trained] = 0
        assert output.grad[:, trained].abs().min() > 0 and untrained.abs().max() == 0


@pytest.mark.slow
@pytest.mark.parametrize("exact_variance, expected_std", [(True, S), (False, S - 0.014)])
def test_ddpm_samples_have_the_data_moments(exact_variance, expected_std):
    # Fixed variance (C channels) omits coef1^2 Var[x0 | x_t]: std 0.014 low after 250 steps; v restores it: exact.
    kept = improved_ddpm_spacing(T, 250)
    abar = REF_ABAR[kept]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev
    posterior_var = beta * (1 - abar_prev) / (1 - abar)
    x0_var = S ** 2 * (1 - abar) / (abar * S ** 2 + 1 - abar)
    true_var = posterior_var + (beta * np.sqrt(abar_prev) / (1 - abar)) ** 2 * x0_var
    min_log = np.log(np.append(posterior_var[1], posterior_var[1:]))
    v_at = dict(zip(kept, 2 * (np.log(true_var) - min_log) / (np.log(beta) - min_log) - 1))

    def exact(x, t):
        v_t = torch.tensor([v_at[int(step)] for step in t], dtype=x.dtype).view(-1, 1, 1, 1)
        return torch.cat([gaussian_eps(x, t), v_t.expand_as(x)], dim=1)

    n, model_fn = 16384, exact if exact_variance else gaussian_eps
    samples = diffusion().sample(model_fn, seeded_noise(n // 64, 1, 8, 8), "ddpm", 250,
                                 generator=torch.Generator().manual_seed(1))
    assert abs(samples.mean().item() - MU) < 4 * S / math.sqrt(n)  # 4 standard errors of the mean
    assert abs(samples.std().item() - expected_std) < 4 * S / math.sqrt(2 * n)  # and of the std


# Per-sample max error at 80 steps, float64 (no CPU dependence): measured 0.056, 0.055, 0.047, 0.034, 0.0014; 1.5x.
@pytest.mark.parametrize("method, options, order, max_error", [
    ("ddim", {}, 1, 0.084), ("dpm++", {"order": 1, "skip_type": "time_uniform"}, 1, 0.082),
    ("dpm++", {"order": 1, "skip_type": "logSNR"}, 1, 0.07),
    ("dpm++", {"order": 2, "skip_type": "time_uniform"}, 2, 0.051),  # Lumos' setting
    ("dpm++", {"order": 2, "skip_type": "logSNR"}, 2, 0.0021)])
def test_solvers_converge_to_the_exact_ode_solution_at_their_order(method, options, order, max_error):
    noise = seeded_noise(16, 1, 4, 4, dtype=torch.float64)
    abar_end = REF_ABAR[0] if method == "dpm++" else 1.0  # dpm++ stops at t = 1/N
    # The probability-flow ODE keeps (x - sqrt(abar) MU) / sqrt(abar S^2 + 1 - abar) constant.
    start, end = (math.sqrt(a * S ** 2 + 1 - a) for a in (REF_ABAR[-1], abar_end))
    target = math.sqrt(abar_end) * MU + (noise - math.sqrt(REF_ABAR[-1]) * MU) / start * end
    errors = [(diffusion().sample(gaussian_eps, noise, method, steps, **options) - target).abs().max().item()
              for steps in (40, 80)]
    # Doubling the steps divides the error by 2^order: measured 1.97-1.98 (first order), 3.7-3.9 (second).
    assert 0.85 * 2 ** order < errors[0] / errors[1] < 1.1 * 2 ** order and errors[1] < max_error


def test_v_and_x0_models_sample_like_the_epsilon_model_and_only_ddpm_uses_the_variance_channels():
    def gaussian_x0(x, t):  # E[x0 | x_t] = (x_t - sqrt(1 - abar) E[eps | x_t]) / sqrt(abar)
        abar = abar_at(t).to(x.dtype).view(-1, 1, 1, 1)
        return (x - (1 - abar).sqrt() * gaussian_eps(x, t)) / abar.sqrt()

    def gaussian_v(x, t):  # sqrt(abar) E[eps | x_t] - sqrt(1 - abar) E[x0 | x_t]
        abar = abar_at(t).to(x.dtype).view(-1, 1, 1, 1)
        return abar.sqrt() * gaussian_eps(x, t) - (1 - abar).sqrt() * gaussian_x0(x, t)

    noise, samples = seeded_noise(8, 2, 4, 4, dtype=torch.float64), {}
    for method, options in [("ddim", {}), ("ddim", {"eta": 1.0}), ("dpm++", {}), ("ddpm", {})]:
        eps_samples, v_samples, x0_samples = (
            diffusion(prediction).sample(model_fn, noise, method, 20, **options,
                                         generator=torch.Generator().manual_seed(1))
            for prediction, model_fn in (("epsilon", gaussian_eps), ("v", gaussian_v), ("x0", gaussian_x0)))
        # float64 round-off, amplified by the division by sqrt(abar) = 0.006 at the first step
        torch.testing.assert_close(v_samples, eps_samples, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(x0_samples, eps_samples, rtol=1e-7, atol=1e-7)
        samples[method, options.get("eta")] = eps_samples
    # DDIM with eta = 1 draws the posterior variance around the posterior mean at x0: ddpm's chain (C channels).
    torch.testing.assert_close(samples["ddim", 1.0], samples["ddpm", None], rtol=1e-12, atol=1e-12)
    noise = seeded_noise(4, 1, 4, 4)
    with_variance = lambda v: lambda x, t: torch.cat([gaussian_eps(x, t), torch.full_like(x, v)], dim=1)  # noqa: E731
    for method in ("ddim", "dpm++"):
        assert torch.equal(diffusion().sample(with_variance(0.5), noise, method, 10),
                           diffusion().sample(gaussian_eps, noise, method, 10))
    draws = [diffusion().sample(model_fn, noise, "ddpm", 10, generator=torch.Generator().manual_seed(1))
             for model_fn in (with_variance(-1.0), gaussian_eps, with_variance(1.0))]
    assert torch.equal(draws[0], draws[1]) and not torch.allclose(draws[1], draws[2])  # v = -1: posterior variance
    for dtype, method in itertools.product((torch.float32, torch.float64, torch.bfloat16), ("ddpm", "ddim", "dpm++")):
        assert diffusion().sample(gaussian_eps, torch.randn(2, 1, 4, 4).to(dtype), method, 10).dtype == dtype


def test_samplers_hand_model_fn_original_scale_float_times_and_clip_denoised():
    noise = torch.randn(3, 1, 2, 2)
    for method, steps, options, expected in [
        ("ddpm", 250, {}, improved_ddpm_spacing(T, 250)[::-1]), ("ddim", 50, {}, improved_ddpm_spacing(T, 50)[::-1]),
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
    # clip_denoised: x0 estimate > 1 throughout, clipped to 1: ddpm/ddim end on 1, ODE samplers keep x on its path.
    wild = lambda x, t: -5 * torch.ones_like(x)  # noqa: E731
    noise = seeded_noise(2, 1, 4, 4, dtype=torch.float64)
    z = (noise - math.sqrt(REF_ABAR[-1])) / math.sqrt(1 - REF_ABAR[-1])
    for method in ("ddpm", "ddim"):
        assert diffusion().sample(wild, noise, method, 10).abs().max() > 5
        clipped = diffusion().sample(wild, noise, method, 10, clip_denoised=True)
        torch.testing.assert_close(clipped, torch.ones_like(noise))
    model = recording(wild)
    diffusion().sample(model, noise, "ddim", 10, clip_denoised=True)
    for x, t in zip(model.inputs, model.times):
        torch.testing.assert_close(x, math.sqrt(REF_ABAR[int(t[0])]) + math.sqrt(1 - REF_ABAR[int(t[0])]) * z)
    torch.testing.assert_close(diffusion().sample(wild, noise, "dpm++", 10, clip_denoised=True),
                               math.sqrt(REF_ABAR[0]) + math.sqrt(1 - REF_ABAR[0]) * z)


@pytest.mark.parametrize("steps, last_order", [(9, 1), (10, 2)])
def test_dpm_solver_last_step_is_first_order_below_10_steps(steps, last_order):
    model = recording()
    result = diffusion().sample(model, seeded_noise(2, 1, 4, 4, dtype=torch.float64), "dpm++", steps)
    # DPM-Solver++'s last step: x_t = (sigma_t/sigma_s) x_s - alpha_t (e^-h - 1) D, D first order or 2M; half-logSNR.
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


# ======================================== encoders ===============================================

def assert_close_to_scale(actual, expected, tolerance=1e-4):
    """max |actual - expected| <= tolerance * max |expected|; fp32 reorderings: ~1e-6 per layer, a bug: > 1e-2."""
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
    renames = {"embeddings.patch_embeddings.projection": "patch_embed.proj", "layernorm": "norm"} | {
        f"encoder.layer.{i}.{hub_name}": f"blocks.{i}.{ours}" for i in range(2) for hub_name, ours in [
            ("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.output.dense", "attn.proj"),
            ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]}
    original = {"cls_token": hub["embeddings.cls_token"], "pos_embed": hub["embeddings.position_embeddings"]}
    for param in ("weight", "bias"):
        original |= {f"{ours}.{param}": hub[f"{hub_name}.{param}"] for hub_name, ours in renames.items()}
        for i in range(2):
            qkv = [hub[f"encoder.layer.{i}.attention.attention.{name}.{param}"] for name in ("query", "key", "value")]
            original[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(qkv)
    return original


@pytest.mark.parametrize("layout", ["hub", "hub-shards", "original", "original-folder"])
def test_dino_matches_transformers_vit(tmp_path, layout):
    # The original checkpoint has no config: 64-wide heads and eps 1e-6; the Hub one's config.json says 1e-12.
    eps = 1e-6 if layout.startswith("original") else 1e-12
    reference = tiny_vit(tmp_path, width=128, layer_norm_eps=eps)
    state = load_file(tmp_path / "model.safetensors")
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
        torch.save({f"module.{key}": tensor for key, tensor in to_original_dino_layout(state).items()},
                   tmp_path / "dino_vitbase16_pretrain.pth")
    source = tmp_path / "dino_vitbase16_pretrain.pth" if layout == "original" else tmp_path
    model = encoders.ViTEncoder.from_pretrained(source)
    assert model.norm.eps == eps and not any(param.requires_grad for param in model.parameters())
    torch.manual_seed(1)
    for height, width in ((32, 32), (48, 40)):  # native grid, then interpolated positions
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            out, expected = model(pixels), reference(pixels, interpolate_pos_encoding=True).last_hidden_state
        assert_close_to_scale(out, expected)


def test_dinov2_matches_transformers(tmp_path):
    torch.manual_seed(0)
    reference = perturb_(transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4)))
    reference.save_pretrained(tmp_path)
    # The .bin path: the same Hub-layout tensors (mask token included) as a pickled state dict.
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    model = encoders.ViTEncoder.from_pretrained(tmp_path)
    torch.manual_seed(1)
    for height, width in ((16, 16), (24, 20)):  # native grid, then interpolated positions
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            assert_close_to_scale(model(pixels), reference(pixels).last_hidden_state)


CLIP_TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=16)


@pytest.mark.parametrize("layout", ["clip-model", "vision-model"])
def test_clip_image_tower_matches_transformers(tmp_path, layout):
    # openai/clip-vit-base-patch16 is a whole CLIPModel (text tower, projections, logit scale beside
    # vision_model.*; config.json nests vision_config); a CLIPVisionModel holds the tower alone.
    torch.manual_seed(0)
    if layout == "clip-model":
        reference = transformers.CLIPModel(transformers.CLIPConfig(vision_config=CLIP_TOWER, text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)))
    else:
        reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_TOWER))
    perturb_(reference).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")  # older files also hold the position ids, a buffer
    save_file({**state, "vision_model.embeddings.position_ids": torch.arange(17)[None]}, tmp_path / "model.safetensors")
    tower = getattr(reference, "vision_model", reference)  # transformers 5's CLIPVisionModel is the tower itself
    model = encoders.ViTEncoder.from_pretrained(tmp_path)
    assert (model.mean, model.std) == (encoders.CLIP_MEAN, encoders.CLIP_STD)
    assert model.norm.eps == 1e-5 and model.patch_embed.bias is None
    assert model.blocks[0].mlp.act is encoders.quick_gelu and isinstance(model.norm_pre, torch.nn.LayerNorm)
    torch.manual_seed(1)
    for height, width in ((32, 32), (48, 40)):  # native grid, then interpolated positions
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            out = tower(pixel_values=pixels, interpolate_pos_encoding=True)
            # Ours: every token after the final LayerNorm (transformers applies it to the pooled CLS only).
            assert_close_to_scale(model(pixels), tower.post_layernorm(out.last_hidden_state))
            assert_close_to_scale(model(pixels)[:, 0], out.pooler_output)


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_moco_v3_matches_timm_vit(tmp_path, layout):
    import timm

    torch.manual_seed(0)
    # MoCo v3's ViT is timm's; its release saves a training checkpoint: {"state_dict": module.base_encoder.*
    # (whose head is the projection MLP), module.momentum_encoder.*, module.predictor.*, "optimizer", ...}.
    reference = perturb_(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=1.5, num_classes=16))
    backbone = reference.state_dict()
    state = {**{f"module.base_encoder.{key}": tensor for key, tensor in backbone.items()},
             **{f"module.momentum_encoder.{key}": tensor.clone() for key, tensor in backbone.items()},
             "module.predictor.0.weight": torch.randn(8, 16)}
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0]}]}},
               tmp_path / "vit-b-300ep.pth.tar")
    model = encoders.ViTEncoder.from_pretrained(tmp_path / "vit-b-300ep.pth.tar" if layout == "file" else tmp_path)
    assert model.norm.eps == 1e-6 and model.blocks[0].attn.heads == 2 and model.mean == encoders.IMAGENET_MEAN
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the backbone's tokens, its CLS before the projection head among them
        assert_close_to_scale(model(pixels), reference.forward_features(pixels))


def test_dino_encode_preprocessing(tmp_path):
    tiny_vit(tmp_path)
    model = encoders.ViTEncoder.from_pretrained(tmp_path)
    normalize = transforms.Normalize(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 48) * 2 - 1  # shorter side already native (32): no resize, columns 8..40
    features = model.encode(images)
    assert features.shape == (3, 32) and features.dtype == torch.float32
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
def test_vae_matches_diffusers_and_clamps_the_log_variance(tmp_path, attention_names):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    reference = perturb_(AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2))
    reference.save_pretrained(tmp_path)
    if attention_names == "old":  # query / key / value / proj_attn, as older diffusers saved them
        path, state = tmp_path / "diffusion_pytorch_model.safetensors", {}
        for key, tensor in load_file(path).items():
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            state[key] = tensor
        assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
        save_file(state, path)
    model = encoders.VAE.from_pretrained(tmp_path)
    assert model.scaling_factor == 0.18215
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
    with torch.no_grad():  # quant_conv output = 100 for mean and log-variance alike
        model.float().quant_conv.weight.zero_()
        model.quant_conv.bias.fill_(100.0)
    mean, std = model.encode(images)
    assert torch.all(mean == 100.0) and torch.allclose(std, torch.full_like(std, np.exp(10.0)))  # clamped to 20


def test_loading_finds_files_and_errors_name_the_problem(tmp_path, monkeypatch):
    assert encoders.locate(tmp_path, "config.json") is None and encoders.read_config(tmp_path) == {}
    names = ["model.safetensors", "pytorch_model.bin"]
    assert_raises(FileNotFoundError, "none of model.safetensors, pytorch_model.bin found",
                  lambda: encoders.load_state_dict(tmp_path, names))
    assert_raises(FileNotFoundError, "not a local folder, nor a valid Hub repo id",
                  lambda: encoders.locate(str(tmp_path / "no" / "such" / "folder"), "config.json"))
    torch.save({"encoder.w": torch.ones(2), "decoder.w": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    state = encoders.load_state_dict(tmp_path, names, keep=lambda key: key.startswith("encoder."))
    assert list(state) == ["encoder.w"] and torch.equal(state["encoder.w"], torch.ones(2))
    # Offline, a repo not in the cache: one line naming the repo, the file and the ways out.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as error:
        encoders.VAE.from_pretrained("no-such-user/no-such-vae")
    needed = ("no-such-user/no-such-vae", "config.json", "HF_HUB_OFFLINE", "hf download", "local folder")
    assert "\n" not in str(error.value) and all(part in str(error.value) for part in needed), error.value
    assert_raises(FileNotFoundError, "no-such-user/no-such-dino: no model.safetensors / pytorch_model.bin",
                  lambda: encoders.ViTEncoder.from_pretrained("no-such-user/no-such-dino"))
    model = encoders.ViTEncoder(image_size=16, patch_size=8, width=16, depth=1, heads=1)
    state = dict(model.state_dict(), **{"head.weight": torch.zeros(1), "cls_token": torch.zeros(1, 1, 8)})
    del state["norm.bias"]
    assert_raises(ValueError, r"^ckpt.pth: checkpoint does not fit ViTEncoder: 1 missing \(norm.bias\); 1 unexpected "
                  r"\(head.weight\); 1 wrong-shape \(cls_token \(1, 1, 8\) vs model \(1, 1, 16\)\)$",
                  lambda: encoders.load_into(model, state, "ckpt.pth"))
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "extra": SimpleNamespace()}, path)
    assert_raises(ValueError, "dino_vitbase16_pretrain.pth: refused, not a plain tensor checkpoint",
                  lambda: encoders.ViTEncoder.from_pretrained(path))


# ======================================== t5 =====================================================

def _tiny_t5(model_class=transformers.T5EncoderModel):
    """A random T5 v1.1 small enough for CPU tests, with T5's own bucket sizes (32, max 128)."""
    torch.manual_seed(0)
    return model_class(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)).eval()


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-shards", "bin-shards", "full-ckpt", "embed_tokens"])
def test_t5_encoder_matches_transformers_and_bf16_tracks_fp32(tmp_path, monkeypatch, layout):
    reference = _tiny_t5()
    state = dict(reference.state_dict())
    reference.config.to_json_file(tmp_path / "config.json")
    if layout.startswith("safetensors"):  # one file, or shards and model.safetensors.index.json
        reference.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if "shards" in layout else {}))
        assert (tmp_path / "model.safetensors.index.json").exists() == ("shards" in layout)
    elif layout == "bin-shards":  # DeepFloyd/t5-v1_1-xxl: .bin shards and pytorch_model.bin.index.json
        weight_map = {key: f"pytorch_model-0000{1 + 2 * i // len(state)}-of-00002.bin" for i, key in enumerate(state)}
        for name in set(weight_map.values()):
            torch.save({key: state[key] for key in state if weight_map[key] == name}, tmp_path / name)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "full-ckpt":  # google/t5-v1_1-xxl: one .bin with encoder, decoder and lm_head
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
    # One full row and two padded; 140 tokens pass max_distance=128: every kind of relative-position bucket is used.
    input_ids = torch.randint(0, 64, (3, 140), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(140) < torch.tensor([[140], [100], [7]])).long()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert_close_to_scale(model(input_ids, mask), expected)
    bf16 = encoders.T5Encoder.from_pretrained(tmp_path, dtype=torch.bfloat16)
    got = bf16(input_ids[:, :20], mask[:, :20])
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and got.dtype == torch.bfloat16
    assert_close_to_scale(got, model(input_ids[:, :20], mask[:, :20]), 5e-2)  # bf16: 8 significant bits (0.4%) per op


def test_t5_encoder_load_errors_name_the_problem(tmp_path):
    reference = _tiny_t5()
    for folder in ("missing_key", "original_t5"):
        (tmp_path / folder).mkdir()
    reference.config.to_json_file(tmp_path / "missing_key" / "config.json")
    state = dict(reference.state_dict())
    del state["encoder.final_layer_norm.weight"]
    torch.save(state, tmp_path / "missing_key" / "pytorch_model.bin")
    load = lambda folder, **options: lambda: encoders.T5Encoder.from_pretrained(tmp_path / folder, **options)
    assert_raises(ValueError, "encoder.final_layer_norm.weight", load("missing_key"))
    (tmp_path / "original_t5" / "config.json").write_text(json.dumps({"feed_forward_proj": "relu"}))
    assert_raises(ValueError, "gated-gelu", load("original_t5"))
    assert_raises(FileNotFoundError, "pytorch_model.bin", load(""))  # holds no weights at all
    assert_raises(ValueError, "bfloat16", load("missing_key", dtype=torch.float16))
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

    def word():
        roll = rng.random()
        word = (str(rng.randint(0, 99999)) if roll < 0.1 else rng.choice(ODD_WORDS) if roll < 0.15
                else "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
        word = word.capitalize() if rng.random() < 0.2 else word
        return word + rng.choice(PUNCTUATION) if rng.random() < 0.15 else word

    return [" ".join(word() for _ in range(rng.randint(1, 14))) for _ in range(count)]


EDGE_CASES = ["", " ", "   ", "  leading spaces", "trailing spaces   ", "runs    of     spaces", "\t tab\nnew\r\nline",
    "ＦＵＬＬ　ｗｉｄｔｈ　１２３", "\u3000ideographic\u3000space\u3000", "漢字かな unseen", "\u200bzero\u200dwidth",
    "\x00\x01control\x7f", "ﬁ ﬂ ﬃ", "①②③ ⁵ ½", "Å Å e\u0301 é", "   😀😀   👍🏽 ", "ǅ ǈ", "ñeñe, 87999",
    "x" * 500, " ".join(_sentences(7, 40)), "<sep>ka<sep> [IMG]to", "ka  <sep>  to"]


def _train_sentencepiece(folder, **options):
    """Train a small unigram model on made-up sentences; returns the spiece.model path."""
    settings = dict(model_type="unigram", vocab_size=300, normalization_rule_name="nmt_nfkc",
                    pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_sentences(0, 400)),
                                             model_prefix=str(folder / "spiece"), **{**settings, **options})
    return folder / "spiece.model"


@pytest.mark.parametrize("options", [{},  # T5's setting: nmt_nfkc through the precompiled charsmap
    {"byte_fallback": True, "user_defined_symbols": ["<sep>", "[IMG]"], "vocab_size": 400},
    {"normalization_rule_name": "nfkc_cf", "remove_extra_whitespaces": False},
    {"normalization_rule_name": "identity", "add_dummy_prefix": False, "split_digits": True},
    {"normalization_rule_name": "nfkc", "treat_whitespace_as_suffix": True},
], ids=["nmt_nfkc", "byte_fallback+user_defined", "nfkc_cf+keep_spaces", "identity+no_prefix", "suffix_space"])
def test_tokenizer_matches_sentencepiece_pads_truncates_and_reads_extra_ids(tmp_path, options):
    path = _train_sentencepiece(tmp_path, **options)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tokenizer = encoders.T5Tokenizer.from_pretrained(path)
    texts = _sentences(1, 300) + EDGE_CASES
    expected = [reference.encode(text) + [reference.eos_id()] for text in texts]
    assert [tokenizer.encode(text) for text in texts] == expected
    # The texts do reach unknown characters (and runs of them), which must not go untested.
    assert any(reference.unk_id() in ids for ids in expected) or options.get("byte_fallback")
    if options:
        return
    tokenizer = encoders.T5Tokenizer.from_pretrained(tmp_path)  # the folder, as a Hub repo lays it out
    texts = ["kato rimu sé", "ka", "", "ba " * 50]
    max_length = len(reference.encode(texts[0])) + 1  # the first text fills its row exactly
    input_ids, mask = tokenizer(texts, max_length=max_length)
    assert input_ids.shape == mask.shape == (4, max_length) and input_ids.dtype == mask.dtype == torch.long
    for row, text in enumerate(texts):  # truncation keeps </s> last
        ids = (reference.encode(text)[:max_length - 1] if row == 3 else reference.encode(text)) + [1]
        assert input_ids[row].tolist() == ids + [0] * (max_length - len(ids))
        assert mask[row].tolist() == [1] * len(ids) + [0] * (max_length - len(ids))
    assert tokenizer("ka")[0].shape == (1, 120)  # one text, Lumos' default length
    assert_raises(ValueError, "max_length", lambda: tokenizer(texts, max_length=0))
    # <extra_id_0> is the last id (32099 for T5's 32000 pieces), <extra_id_99> the first after the pieces.
    pieces = reference.get_piece_size()
    assert tokenizer.vocab_size == pieces + 100
    assert [tokenizer.encode(f"<extra_id_{i}>") for i in (0, 99, 10)] == [
        [pieces + 99, 1], [pieces, 1], [pieces + 89, 1]]
    ids = reference.encode("ka") + [pieces + 99] + reference.encode("to") + [1, 1]
    assert tokenizer.encode("ka <extra_id_0> to</s>") == ids
    assert tokenizer.encode("<extra_id_100>") == reference.encode("<extra_id_100>") + [1]  # not a sentinel
    assert encoders.T5Tokenizer.from_pretrained(path, num_extra_ids=0).vocab_size == pieces
    (tmp_path / "bad").mkdir()
    assert_raises(FileNotFoundError, "spiece.model", lambda: encoders.T5Tokenizer.from_pretrained(tmp_path / "bad"))
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model\n")
    assert_raises(ValueError, "junk.model", lambda: encoders.T5Tokenizer.from_pretrained(tmp_path / "junk.model"))
    assert_raises(ValueError, "</s>", lambda: encoders.T5Tokenizer.from_pieces([("</s>", 0.0)]))
    bpe = _train_sentencepiece(tmp_path / "bad", model_type="bpe", vocab_size=200)
    assert_raises(ValueError, "unigram", lambda: encoders.T5Tokenizer.from_pretrained(bpe))


def _serialized_model(pieces):
    """A ModelProto: <pad>, </s>, <unk>, then `pieces` [(piece, score)] as normal pieces, identity normalizer."""
    varint = lambda value: bytes([value & 0x7F | 0x80 * (value > 0x7F)]) + (varint(value >> 7) if value > 0x7F else b"")
    field = lambda number, payload: varint(number << 3 | 2) + varint(len(payload)) + payload  # length-delimited
    piece = lambda text, score, kind: (field(1, text.encode()) + varint(2 << 3 | 5) + struct.pack("<f", score)
                                       + varint(3 << 3) + varint(kind))
    pieces = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2)] + [(text, score, 1) for text, score in pieces]
    return b"".join(field(1, piece(*p)) for p in pieces) + field(3, field(1, b"identity"))


@pytest.mark.parametrize("pieces, texts", [
    # Viterbi, not greedy: "▁a" + "bc" (-2.5) beats "▁ab" + "c" (-4); a run of unknown characters is one <unk>.
    ([("▁", -3.0), ("a", -3.0), ("b", -3.0), ("c", -3.0), ("▁a", -1.5), ("▁ab", -1.0), ("bc", -1.0)],
     ["abc", "ab", "a b c", "ab zz c", "zz", "  cab  bca ", "c" * 30, ""]),
    # "9"+"99" and "99"+"9" tie exactly; sentencepiece's float32 sums pick "▁", "99", "9" (double: "9", "99").
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


# ---- prompt preprocessing as the release's T5Embedder does it (expected: by hand, rules in order) --------

PROMPT_CASES = [
    ("A Red Car", "a red car"), ("Photo by @JohnDoe on stage", "photo by on stage"), ("Wait... what", "wait what"),
    ("a cat . a dog", "a cat a dog"), ("red,green.blue", "red, green. blue"), ('"Hello World"', "hello world"),
    ("server 192.168.0.1 rack", "server rack"), ("A%20Red+Car", "a red car"),  # URL-unquoted first
    ("Visit https://www.Example.com/path for more", "visit for more"),  # URL rule 1, twice in one pass
    ("logo from wikipedia.org/wiki today", "logo from today"),  # a bare domain with a listed ending
    ("Fish &amp; <i>Chips</i>", "fish chips"),  # tags go; "&" is bad punctuation
    ("Tom &amp;quot;Jerry&amp;quot;", "tom jerry"),  # double escaped: `&quot;?` takes what HTML leaves
    ("A <person> Riding", "a person riding"),  # replaced before the HTML step could drop it
    ("一只猫 a cat", "a cat"), ("ネコ cat", "ネコ cat"),  # CJK ideographs (U+4E00-9FFF) go; Katakana is in no range
    ("a “quoted” ‘word’ — dash", "a \"quoted\" 'word' - dash"),  # dashes and quotes; one "-": no split
    ("this-is-my-cute-cat", "this is my cute cat"), ("a-b-c-d", "a-b-c-d"),  # > 3 of "-" / "_" are spaces; 3 stay
    ("***SALE*** now!!", "sale now!!"),  # bad punctuation runs; "!" is not one
    ("photo #12 of cat.jpg", "photo of"),  # "#12" (1-3 digits), then the file name
    ("poster 1920x1080", "poster"), ("Red Dress Free Shipping", "red dress"),  # \b\d+[a-zA-Z]+\d+\b; a shop phrase
]


@pytest.mark.parametrize("prompt, expected", PROMPT_CASES)
def test_preprocess_prompt_rules(prompt, expected):
    # ...and cleaning the output again changes nothing: it holds nothing any rule removes or changes.
    assert encoders.preprocess_prompt(prompt) == expected == encoders.preprocess_prompt(expected)
    assert encoders.clean_caption(expected) == expected


def test_text_encoder_cleans_prompts_twice_or_not_at_all():
    # Pass 1 drops <b>, </b> and unescapes "&lt;i&gt;" to "<i>", a tag that pass 2 drops.
    assert encoders.clean_caption("<b>Bold</b> &lt;i&gt; text") == "bold <i> text"
    assert encoders.preprocess_prompt("<b>Bold</b> &lt;i&gt; text") == "bold text"
    # use_text_preprocessing=False in the release: text.lower().strip() and nothing else.
    raw = "  A Red Car, https://X.com *** &amp;  "
    assert encoders.preprocess_prompt(raw, clean=False) == "a red car, https://x.com *** &amp;"
    encoder = encoders.random_text_encoder(encoders.random_t5_description(data.shapes_vocabulary()), torch.device("cpu"))
    features, mask = encoder(["A Red Circle", "a red circle", "A ***Red*** Circle https://example.com"])
    assert encoder.clean and mask.all()  # the same three tokens (a, red, circle) and </s> in every row: no <unk>
    assert torch.equal(features[0], features[1]) and torch.equal(features[0], features[2])
    assert torch.equal(encoder.token_features(["A RED CIRCLE"])[0], features[1][mask[1]])  # cache-text: same path
    # Without cleaning, capitals are still lowered, but "***" reaches the tokenizer (<unk>: one more token).
    _, raw_mask = encoders.TextEncoder(encoder.tokenizer, encoder.t5, clean=False)(["A Red Circle", "a red circle ***"])
    assert raw_mask.sum(1).tolist() == [4, 5]


# ======================================== data ===================================================

def encode(image, format, **options):
    image.save(buffer := io.BytesIO(), format, **options)
    return buffer.getvalue()


def noise_image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def noise_png(seed, size=8):
    return encode(noise_image(size, size, seed), "PNG")


def write_files(folder, files):
    """files: {relative name: bytes}; returns folder."""
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
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
    """A PNG announcing width x height pixels and holding none: probes the decompression-bomb limit cheaply."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def bad_and_good_files():
    """(name, bytes, caption; None if bad) in dataset order; the last file is bad, so skipping wraps."""
    jpeg, png = encode(noise_image(64, 64, 5), "JPEG", quality=95), encode(noise_image(64, 64, 6), "PNG")
    return [("00.png", encode(noise_image(40, 30, 0), "PNG"), "a noisy landscape"), ("01.jpg", b"", None),  # empty
            ("02.jpg", jpeg[: len(jpeg) // 2], None),  # truncated
            ("03.webp", encode(noise_image(100, 37, 1), "WEBP", lossless=True), "ünïcode caption"),
            ("04.jpg", np.random.default_rng(0).bytes(3000), None), ("05.png", png[: len(png) // 2], None),
            ("06.png", png_header_only(100_000, 100_000), None),  # a decompression bomb
            ("07.jpeg", jpeg, ""), ("08.webp", b"RIFF\x00\x00\x00\x00WEBP", None)]  # a header and nothing else


def test_folder_and_tar_read_the_same_items_and_skip_bad_files_deterministically(tmp_path, monkeypatch):
    files = bad_and_good_files()
    n, good = len(files), [j for j, (_, _, caption) in enumerate(files) if caption is not None]
    folder, tar = {}, {}
    for name, content, caption in files:
        folder[name] = tar[name] = content
        if caption:
            folder[name[:2] + ".txt"] = tar[name[:2] + ".txt"] = caption.encode()
    tar["03.json"] = json.dumps({"text": tar.pop("03.txt").decode()}).encode()  # a .json caption, after its image
    folder = data.open_dataset(str(write_files(tmp_path / "images", folder)), 24)
    shards = data.open_dataset(str(write_tar(tmp_path / "shard.tar", tar)), 24)
    assert isinstance(folder, data.ImageFolder) and isinstance(shards, data.TarShards) and len(folder) == len(shards) == n
    for i in range(n):
        a, b, r = folder[i], shards[i], next(j % n for j in range(i, i + n) if j % n in good)  # r replaces i
        assert a["image"].shape == (3, 24, 24) and torch.equal(a["image"], b["image"]) and a["index"] == b["index"] == i
        assert torch.equal(a["image"], folder[r]["image"]) and a["caption"] == b["caption"] == files[r][2]
        assert a["name"].endswith(files[r][0]) and b["name"].endswith(f"shard.tar:{files[r][0]}")
        assert [x.rsplit("/", 1)[-1] for x in a["skipped"]] == [x.rsplit(":", 1)[-1] for x in b["skipped"]] == [
            files[j % n][0] for j in range(i, i + (r - i) % n)]
    content = files[0][1]  # 40 x 30: PIL raises above 2 x MAX_IMAGE_PIXELS, only warns from 1x; both are bad
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert_raises(data.BadSampleError, "DecompressionBomb", lambda: data.decode_image(content, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    assert data.decode_image(content, 8).shape == (3, 8, 8)


def test_folder_listing_tar_grouping_and_shard_specs(tmp_path):
    png = noise_png(0)  # a folder: recursive, sorted, case-insensitive extensions, hidden files skipped
    write_files(tmp_path, {"b/x.PNG": png, "a/z.Jpg": encode(noise_image(8, 8, 1), "JPEG"), "a/y.png": png,
                           "c.webp": encode(noise_image(8, 8, 2), "WEBP"), "notes.md": b"not an image",
                           ".hidden.png": png, ".cache/w.png": png, "a/y.txt": b"  caption of y \n"})
    dataset = data.open_dataset(str(tmp_path), 8)
    assert [os.path.relpath(dataset.name(j), tmp_path) for j in range(len(dataset))] == [
        os.path.join("a", "y.png"), os.path.join("a", "z.Jpg"), os.path.join("b", "x.PNG"), "c.webp"]
    assert [dataset[j]["caption"] for j in range(4)] == ["caption of y", "", "", ""]
    shard = write_tar(tmp_path / "s.tar", {
        "dir/a.txt": b"caption a", "dir/a.png": png,         # caption before image: same key
        "dir/b.cls": b"3",                                   # no image: not a sample
        "dir/c.seg.png": png,                                # extension "seg.png": not an image
        "dir/d.JPG": encode(noise_image(8, 8, 1), "JPEG"),
        "dir/d.json": json.dumps({"caption": "from json", "text": "ignored"}).encode(),
        "e.png": png, "e.json": json.dumps(["not", "a", "dict"]).encode(),
        "f.json": json.dumps({"caption": "json loses"}).encode(), "f.txt": b"txt wins", "f.png": png,
        "g.png": png, "g.json": b"{not json",                # a bad caption: the sample is skipped
    })
    dataset = data.open_dataset(str(shard), 8)
    assert [dataset.name(j).split(":")[-1] for j in range(len(dataset))] == ["dir/a.png", "dir/d.JPG", "e.png", "f.png", "g.png"]
    assert [dataset[j]["caption"] for j in range(5)] == ["caption a", "from json", "", "txt wins", "caption a"]
    assert dataset[4]["skipped"] == [f"{shard}:g.png"] and dataset[3]["skipped"] == []
    members = {**{f"{j}.png": noise_png(j, 32) for j in range(3)}, "2.txt": b"a caption long enough to be cut " * 6}
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    for cut_inside in ("2.png", "2.txt"):  # a sample cut off by a truncated shard is skipped
        (cut := tmp_path / f"cut_{cut_inside}.tar").write_bytes(whole[: whole.index(members[cut_inside]) + 100])
        with pytest.warns(UserWarning, match=cut.name):
            dataset = data.open_dataset(str(cut), 8)
        assert len(dataset) == 3 and dataset[2]["skipped"] == [f"{cut}:2.png"]
        assert dataset[2]["name"].endswith(":0.png")
    assert data.expand_braces("s/{08..11}.tar") == ["s/08.tar", "s/09.tar", "s/10.tar", "s/11.tar"]
    assert data.expand_braces("{3..1}") == ["3", "2", "1"] and data.expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    assert data.expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert data.split_top_level("a/{0..2}.tar,b/{x,y}.tar, c.tar") == ["a/{0..2}.tar", "b/{x,y}.tar", " c.tar"]
    (tmp_path / "shards").mkdir()
    for s in range(4):  # shard s holds s + 1 samples
        write_tar(tmp_path / "shards" / f"{s:05d}.tar", {f"k{s}_{j}.png": noise_png(10 * s + j) for j in range(s + 1)})
    for spec, keys in [("{00001..00002}.tar", ["k1_0", "k1_1", "k2_0", "k2_1", "k2_2"]),
                       ("*.tar", [f"k{s}_{j}" for s in range(4) for j in range(s + 1)]),
                       (f"00003.tar,{tmp_path}/shards/0000[0].tar", ["k3_0", "k3_1", "k3_2", "k3_3", "k0_0"])]:
        dataset = data.open_dataset(f"{tmp_path}/shards/{spec}", 8)
        assert [dataset.name(j).split(":")[-1][:-4] for j in range(len(dataset))] == keys
    assert_raises(FileNotFoundError, "not found: .*00004.tar and 5 more",
                  lambda: data.open_dataset(f"{tmp_path}/shards/{{00002..00009}}.tar", 8))
    assert_raises(FileNotFoundError, "no files match", lambda: data.open_dataset(f"{tmp_path}/shards/*.tgz", 8))


def write_bad_folder(folder, count, is_good):
    """count files NNNN.png, a small PNG where is_good(k), garbage bytes elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        (folder / f"{k:04d}.png").write_bytes(noise_png(k) if is_good(k) else b"not an image %d" % k)
    return folder


def test_too_many_bad_files_stop_the_dataset_a_loader_worker_and_stats_in_one_line(tmp_path, monkeypatch):
    folder = write_bad_folder(tmp_path / "all", 1200, lambda k: False)
    for workers in (0, 1):
        loader = data.make_loader(data.open_dataset(str(folder), 8), 4, 4, shuffle=False, num_workers=workers)
        batches, message = iter(loader), None
        try:  # not pytest.raises, and the loader kept: else its worker waits for a gc, and the gc 5 s for it
            next(batches)
        except data.TooManyBadFiles as error:  # a RuntimeError, one line even from a worker
            message = str(error)
        del batches
        assert issubclass(data.TooManyBadFiles, RuntimeError) and "\n" not in message and "python data.py stats" in message
        assert message.startswith(f"{data.BAD_FILE_WINDOW} of the last {data.BAD_FILE_WINDOW} files read failed")
        assert all(f"{folder / f'{k:04d}.png'}: UnidentifiedImageError" in message for k in range(3))
        assert "0003.png" not in message and "BytesIO" not in message  # BAD_FILE_EXAMPLES errors, not all
    with pytest.raises(SystemExit) as exit_info:  # 0 workers, for the same reason
        data.main(["stats", str(folder), "--image-size", "8", "--batch-size", "4", "--workers", "0"])
    assert re.fullmatch(r"error: 1000 of the last 1000 files read failed [^\n]*", exit_info.value.code)
    dataset = data.open_dataset(str(write_bad_folder(tmp_path / "small", 5, lambda k: False)), 8)
    assert_raises(data.TooManyBadFiles, r"no readable image .* all 5 files failed; first errors", lambda: dataset[2])
    dataset = data.open_dataset(str(write_bad_folder(tmp_path / "sparse", 1200, lambda k: k % 10 != 3)), 8)
    assert sum(len(dataset[i]["skipped"]) for i in range(len(dataset))) == 120  # each bad file once
    monkeypatch.setattr(data, "BAD_FILE_WINDOW", 10)
    # Bad: 0-4, 10-15. Items 0, 6..9: half bad, fine; item 10: 0-4 leave, 15 pushes out good 5: 6 of 10, from 10.
    dataset = data.open_dataset(str(write_bad_folder(tmp_path / "window", 20, lambda k: 5 <= k < 10 or k >= 16)), 8)
    for i in (0, 6, 7, 8, 9):
        dataset[i]
    with pytest.raises(data.TooManyBadFiles, match=r"^6 of the last 10 files read failed .* first errors: "
                                                   r"\S+/0010.png: .* \| \S+/0011.png: .* \| \S+/0012.png: [^|]*$"):
        dataset[10]


# "all bad": met in main() on the held-out items; "mostly bad" (held-out 0, 300, 600, 900 good): in the loop, 0/1 worker.
@pytest.mark.slow
@pytest.mark.parametrize("good, workers", [("all bad", "0"), ("mostly bad", "0"), ("mostly bad", "1")])
def test_training_on_bad_files_exits_2_with_one_line(tmp_path, good, workers):
    is_good = (lambda k: False) if good == "all bad" else (lambda k: k % 300 == 0)
    folder = write_bad_folder(tmp_path / "images", 20 if good == "all bad" else 1200, is_good)
    result = subprocess.run([sys.executable, "train_i2i.py", *TINY_RUN, "--data", str(folder), "--steps", "2",
                             "--num-workers", workers, "--out", str(tmp_path / "run")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # stderr may also hold the loop's tqdm bar ("\r  0%|  | 0/2 [...]"), which is not an error line.
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and not re.match(r"\s*\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("train_i2i.py: error: "), result.stderr[-3000:]
    assert f"first errors: {folder}{os.sep}" in lines[0]


def plain(mode, size, colour, format="PNG", palette=None, **options):
    image = Image.new(mode, size, colour)
    if palette:
        image.putpalette(palette)
    return encode(image, format, **options)


PALETTE = [0, 0, 0, 10, 200, 30] + [0] * (3 * 254)
ODD_MODES = {  # label: (encoded file, expected RGB everywhere)
    "L": (plain("L", (40, 30), 200), (200,) * 3), "1": (plain("1", (40, 30), 1), (255,) * 3),
    "LA transparent": (plain("LA", (20, 20), (100, 0)), (255,) * 3),
    "LA opaque": (plain("LA", (20, 20), (100, 255)), (100,) * 3),
    "P": (plain("P", (12, 9), 1, palette=PALETTE), (10, 200, 30)),
    "P transparent": (plain("P", (12, 9), 1, palette=PALETTE, transparency=1), (255,) * 3),
    "RGBA transparent": (plain("RGBA", (20, 20), (0, 0, 255, 0)), (255,) * 3),
    "RGBA half": (plain("RGBA", (20, 20), (0, 0, 255, 128)), (127, 127, 255)),
    "RGB with transparency key": (plain("RGB", (20, 20), (1, 2, 3), transparency=(1, 2, 3)), (255,) * 3),
    "CMYK jpeg": (plain("CMYK", (24, 24), (0, 255, 0, 0), "JPEG", quality=95), (255, 0, 255)),
    "I;16 png": (encode(Image.fromarray(np.full((20, 30), 128 * 257, np.uint16)), "PNG"), (128,) * 3),
    "tiny 1x1": (plain("RGB", (1, 1), (30, 60, 90)), (30, 60, 90)),
    "very tall 10x1000": (plain("RGB", (10, 1000), (5, 250, 120)), (5, 250, 120)),
    "very wide webp": (plain("RGB", (3000, 7), (90, 20, 200), "WEBP", lossless=True), (90, 20, 200))}


@pytest.mark.parametrize("label", list(ODD_MODES))
def test_every_good_file_in_an_odd_mode_is_read(tmp_path, label):
    content, rgb = ODD_MODES[label]
    extension = {b"\x89P": "png", b"\xff\xd8": "jpg", b"RI": "webp"}[content[:2]]
    item = data.open_dataset(str(write_files(tmp_path, {f"image.{extension}": content})), 16)[0]
    assert item["skipped"] == [] and item["image"].dtype == torch.float32
    expected = (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(3, 1, 1).expand(3, 16, 16)
    # Exact colours stay exact; JPEG's lossy CMYK round trip lands within 5 of 255 levels.
    torch.testing.assert_close(item["image"], expected, atol=0.04 if label == "CMYK jpeg" else 1e-6, rtol=0)


def test_exif_orientation_and_center_crop_by_box_halving_bicubic_and_strip_trimming(tmp_path, monkeypatch):
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[:20], pixels[20:] = (255, 0, 0), (0, 0, 255)  # red top half, blue bottom half, as stored
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: stored upside down, show rotated by 180 degrees
    write_files(tmp_path, {"photo.jpg": encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)})
    image = (data.open_dataset(str(tmp_path), 16)[0]["image"] + 1) * 127.5
    assert image[2, 2, 8] > 200 and image[0, 2, 8] < 50 and image[0, 13, 8] > 200 and image[2, 13, 8] < 50  # blue on top
    for width, height in [(300, 100), (100, 300), (3000, 1000), (40, 4000)]:
        short = min(width, height)  # a red image whose central square (side = short side) is green
        pixels = np.full((height, width, 3), (255, 0, 0), np.uint8)
        top, left = (height - short) // 2, (width - short) // 2
        pixels[top : top + short, left : left + short] = (0, 255, 0)
        crop = data.center_crop_arr(Image.fromarray(pixels), 32)
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
        assert np.abs(crop[2:-2, 2:-2].astype(int) - np.array([0, 255, 0])).max() <= 2  # bicubic blends the border
    image = noise_image(130, 70, 0)  # short side 70 >= 2 * 32: one BOX halving to 65 x 35
    resized = np.array(image.resize((65, 35), Image.BOX).resize((round(65 * 32 / 35), 32), Image.BICUBIC))
    left = (resized.shape[1] - 32) // 2
    np.testing.assert_array_equal(data.center_crop_arr(image, 32), resized[:, left : left + 32])
    scale = max(40 / 65, 24 / 35)  # an aspect-ratio bucket, 24 x 40: the same halving, then just cover it
    resized = np.array(image.resize((65, 35), Image.BOX).resize((round(65 * scale), 24), Image.BICUBIC))
    left = (resized.shape[1] - 40) // 2
    np.testing.assert_array_equal(data.center_crop_arr(image, (24, 40)), resized[:, left : left + 40])
    strip = np.zeros((100_000, 1, 3), np.uint8)  # upscaled whole: 32 x 3.2M pixels; trimmed to 1:4, 32 x 128
    strip[49_998:50_002] = 255  # the central 4 pixels: what the trim keeps
    resized_to, original_resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda image, size, *a, **k: resized_to.append(size) or
                        original_resize(image, size, *a, **k))
    crop = data.center_crop_arr(Image.fromarray(strip), 32)
    assert crop.shape == (32, 32, 3) and crop.min() == 255 and resized_to == [(32, 128)]


def test_aspect_ratio_buckets_are_the_release_tables_and_sizes_snap_as_its_demo():
    full, test = data.aspect_ratio_buckets(1024), data.aspect_ratio_buckets(1024, test=True)
    assert len(full) == 40 and len(test) == 33 and set(full) - set(test) == set(data.TEST_LEFT_OUT)
    assert full["1.29"] == (1152, 896) and full["0.25"] == (512, 2048) and full["4.0"] == (2048, 512)
    assert all(all(side % 64 == 0 for side in hw) for hw in full.values())
    half, quarter = data.aspect_ratio_buckets(512), data.aspect_ratio_buckets(256)  # the release's 512 and 256 tables
    assert half["0.26"] == (256, 992) and quarter["0.26"] == (128, 496) and quarter["3.11"] == (448, 144)
    assert all(half[key] == (h // 2, w // 2) and quarter[key] == (h // 4, w // 4) for key, (h, w) in full.items())
    assert data.closest_bucket(1024, 768, test) == ("1.29", (1152, 896))  # 4:3 portrait, as the T2I demo snaps it
    assert data.closest_bucket(665, 2000, test) == ("0.33", (576, 1728))
    assert data.closest_bucket(1000, 1000, data.aspect_ratio_buckets(256, test=True)) == ("1.0", (256, 256))
    assert data.closest_bucket(3610, 1000, full) == ("3.62", (1856, 512)) and data.closest_bucket(3610, 1000, test)[0] == "4.0"
    assert_raises(ValueError, "multiple of 16", lambda: data.aspect_ratio_buckets(1000))


def test_bucketed_batches_hold_one_bucket_and_resume_and_split_over_ranks_like_the_plain_stream():
    buckets, G = np.random.default_rng(0).integers(0, 3, size=50), 4  # 19, 17, 14 items: 11 batches an epoch
    take = lambda sampler, n: list(itertools.islice(iter(sampler), n))
    one = data.GlobalSampler(50, G, seed=3, buckets=buckets)
    stream = take(one, 3 * one.batches_per_epoch * G)
    assert one.batches_per_epoch == 4 + 4 + 3 and [g for g, _ in stream] == list(range(len(stream)))
    batches = np.array([item for _, item in stream]).reshape(-1, G)
    assert all(len(set(buckets[batch])) == 1 for batch in batches)  # each global batch: one bucket
    for epoch in range(3):  # an epoch: each item at most once, all but each bucket's last partial batch
        seen = batches[epoch * 11:(epoch + 1) * 11].reshape(-1)
        assert len(set(seen)) == len(seen) == 44 and np.bincount(buckets[seen]).tolist() == [16, 16, 12]
    assert not np.array_equal(batches[:11], batches[11:22])  # reshuffled every epoch
    assert take(data.GlobalSampler(50, G, seed=3, start=7 * G, buckets=buckets), 5 * G) == stream[7 * G:12 * G]
    ranks = [take(data.GlobalSampler(50, G, rank, 2, seed=3, buckets=buckets), 6 * G // 2) for rank in (0, 1)]
    assert [x for k in range(6) for rank in ranks for x in rank[k * 2:(k + 1) * 2]] == stream[:6 * G]
    ordered = np.array([item for _, item in take(data.GlobalSampler(50, G, shuffle=False, buckets=buckets), 11 * G)])
    assert all((np.diff(ordered[buckets[ordered] == bucket]) > 0).all() for bucket in range(3))  # in index order
    assert_raises(ValueError, "no aspect-ratio bucket holds a global batch of 64",
                  lambda: data.GlobalSampler(50, 64, buckets=buckets))


def test_shapes_is_deterministic_its_captions_show_the_attributes_and_specs_set_count_and_seed():
    first, again, other = (data.ShapesDataset(50, 32, seed=seed) for seed in (3, 3, 4))
    assert all(torch.equal(first[i]["image"], again[i]["image"]) and first[i]["caption"] == again[i]["caption"]
               and first[i]["attrs"] == again[i]["attrs"] for i in (0, 7, 49))
    assert sum(first[i]["caption"] != other[i]["caption"] for i in range(50)) > 40
    assert len(data.open_dataset("shapes", 16)) == data.DEFAULT_SHAPES_IMAGES
    dataset = data.open_dataset("shapes:7", 16, seed=5)
    assert len(dataset) == 7 and dataset.seed == 5 and dataset[6]["image"].shape == (3, 16, 16)
    for spec in ("shapes:0", "shapes:ten", "shapes:-3"):
        assert_raises(ValueError, "shapes:N", lambda: data.open_dataset(spec, 16))
    assert_raises(IndexError, "", lambda: dataset[7])
    caption = re.compile(r"a (\w+) (\w+) (\w+) at the ([\w ]+) on an? (\w+) background")
    items, keys = [*data.ShapesDataset(600, 16, seed=0)], ("size", "color", "shape", "position", "background")
    for item in items:
        assert caption.fullmatch(item["caption"]).groups() == tuple(item["attrs"][key] for key in keys)
        assert item["attrs"]["background"] != item["attrs"]["color"]
        assert abs(item["attrs"]["cx"] - 0.5) <= 0.5 - item["attrs"]["extent"] / 2 >= abs(item["attrs"]["cy"] - 0.5)
    seen = {key: {item["attrs"][key] for item in items} for key in keys}
    assert seen["shape"] == set(data.SHAPES) and seen["size"] == set(data.SIZES) and seen["position"] == set(data.POSITIONS)
    assert seen["color"] == seen["background"] == set(data.COLORS)
    assert data.shapes_caption({"shape": "star", "color": "red", "size": "small", "position": "top left",
                                "background": "orange"}) == "a small red star at the top left on an orange background"


def test_global_sampler_and_loader_on_a_tar_source_that_pickles_and_collates(tmp_path):
    take = lambda sampler, count: list(itertools.islice(iter(sampler), count))  # noqa: E731
    pairs = take(data.GlobalSampler(10, 4, seed=0), 30)
    assert [g for g, _ in pairs] == list(range(30))
    epochs = [[i for _, i in pairs[e * 10 : (e + 1) * 10]] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs) and epochs[0] != epochs[1] != epochs[2]
    assert [i for _, i in take(data.GlobalSampler(10, 4, seed=1), 10)] != epochs[0]
    assert [i for _, i in take(data.GlobalSampler(10, 4, shuffle=False), 12)] == list(range(10)) + [0, 1]
    for make, message in [(lambda: data.GlobalSampler(10, 6, rank=0, world_size=4), "multiple of the world size"),
                          (lambda: data.GlobalSampler(10, 8, rank=2, world_size=2), "outside world size"),
                          (lambda: data.GlobalSampler(0, 8), "non-empty"),
                          (lambda: data.make_loader(data.ShapesDataset(10, 8), 8, 3, world_size=2), "does not divide")]:
        with pytest.raises(ValueError, match=message):
            make()
    global_batch, steps = 12, 5
    single = take(data.GlobalSampler(17, global_batch, seed=2), global_batch * steps)
    for world in (2, 3, 4):  # each rank takes a contiguous slice of each global batch
        per_rank = global_batch // world
        shares = [take(data.GlobalSampler(17, global_batch, rank, world, seed=2), per_rank * steps) for rank in range(world)]
        for step in range(steps):
            batch = [pair for share in shares for pair in share[step * per_rank : (step + 1) * per_rank]]
            assert batch == single[step * global_batch : (step + 1) * global_batch]
    for world, rank in [(1, 0), (2, 0), (2, 1)]:  # resumed after 3 steps of 8
        straight = take(data.GlobalSampler(13, 8, rank, world, seed=7), 40 // world)
        assert take(data.GlobalSampler(13, 8, rank, world, seed=7, start=3 * 8), 16 // world) == straight[3 * 8 // world :]
    shard = write_tar(tmp_path / "s.tar", {f"{j:02d}.png": encode(noise_image(10, 12, j), "PNG") for j in range(12)})
    dataset = data.open_dataset(str(shard), 8)
    first = dataset[0]["image"]  # opens a file handle
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._files == {} and torch.equal(copy[0]["image"], first)
    sampler = data.GlobalSampler(len(dataset), 8, 1, 2, seed=3, start=8)
    loader = data.make_loader(dataset, 8, 2, 1, 2, seed=3, start=8, num_workers=2)  # rank 1 of 2, micro-batches of 2
    batches = list(itertools.islice(loader, 4))  # 2 steps x 2 micro-batches: rank 1's halves of global batches 1, 2
    assert torch.cat([b["global_index"] for b in batches]).tolist() == [12, 13, 14, 15, 20, 21, 22, 23]
    for batch in batches:
        assert batch["image"].shape == (2, 3, 8, 8) and batch["skipped"] == []
        for g, index, image in zip(batch["global_index"], batch["index"], batch["image"]):
            assert index == sampler.dataset_index(int(g)) and torch.equal(image, dataset[int(index)]["image"])
    write_files(tmp_path / "f", {"a.png": noise_png(0), "b.png": b"", "c.png": noise_png(1)})  # skipped: flattened
    wrapped = data.WithGlobalIndex(data.open_dataset(str(tmp_path / "f"), 8))
    batch = data.collate_samples([wrapped[(40, 1)], wrapped[(41, 2)], wrapped[(42, 1)]])
    assert batch["image"].shape == (3, 3, 8, 8) and batch["caption"] == ["", "", ""]
    assert batch["global_index"].tolist() == [40, 41, 42] and batch["index"].tolist() == [1, 2, 1]
    assert [os.path.basename(n) for n in batch["skipped"]] == ["b.png", "b.png"]
    shapes = [*data.ShapesDataset(3, 8)]
    assert [a["shape"] for a in data.collate_samples(shapes)["attrs"]] == [item["attrs"]["shape"] for item in shapes]


def test_bad_data_is_a_clear_error_and_the_cli_shows_and_counts(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tars").mkdir()
    write_tar(write_files(tmp_path, {"x.zip": b"zip"}) / "tars" / "0.tar", {"a.png": noise_png(0)})
    for path, error, message in [("empty", FileNotFoundError, r"no images .* found under .*empty"),
                                 ("nowhere", FileNotFoundError, "data path not found: .*nowhere"),
                                 ("tars", FileNotFoundError, r"pass them as DIR/\*\.tar"),
                                 ("x.zip", ValueError, "neither a folder nor a .tar")]:
        assert_raises(error, message, lambda: data.open_dataset(str(tmp_path / path), 8))
    import gzip
    (tmp_path / "g.tar").write_bytes(gzip.compress((tmp_path / "tars" / "0.tar").read_bytes()))  # a compressed shard
    with pytest.warns(UserWarning, match="plain .tar"), pytest.raises(FileNotFoundError, match="no images in the 1 tar shard"):
        data.open_dataset(str(tmp_path / "g.tar"), 8)
    data.main(["show", "shapes:10", "--image-size", "32", "--n", "4", "--out", str(tmp_path / "grid.png")])
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    printed = capsys.readouterr().out
    assert all(data.ShapesDataset(10, 32)[i]["caption"] in printed for i in range(4))
    write_files(tmp_path / "images", {name: content for name, content, _ in bad_and_good_files()})
    data.main(["stats", str(tmp_path / "images"), "--image-size", "16", "--limit", "0", "--batch-size", "3"])
    printed = capsys.readouterr().out
    assert "read 9 items" in printed and "bad files: 6" in printed and "04.jpg" in printed  # of bad_and_good_files


# ======================================== train ==================================================

# fp32 sums in another order (ranks + all-reduce, fused kernels, batchings) differ by ~1e-7 relative; a bug by > 1e-2.
TOLERANCE = 1e-5


def checkpoint(out, step):
    return os.path.join(out, "checkpoints", f"step_{step:07d}")


def checkpoint_weights(path, part):
    """The "model" (with REPA's projector, if any) or "ema" weights of a DCP checkpoint as full tensors,
    whatever world wrote it."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {part: {key.removeprefix(f"{part}."): torch.empty(meta.size, dtype=meta.properties.dtype)
                    for key, meta in saved.items() if key.startswith(f"{part}.")}}
    dcp.load(state, checkpoint_id=path)
    return state[part]


def assert_same_weights(actual, expected, rtol=TOLERANCE, atol=1e-7):
    """rtol, and 1e-7 absolute near 0: a step moves a weight by up to the lr, 1e-3, far above 1e-7."""
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def test_shapes_encoder_command_trains_a_dino_vit_that_loads_as_dino_and_checks_its_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "shapes_vit.safetensors"
    data.main(["shapes-encoder", "--out", str(out), "--steps", "2", "--batch-size", "4"])
    assert "step 2/2: reconstruction mse" in capsys.readouterr().out
    trained = encoders.ViTEncoder.from_pretrained(out)  # DINO's own key layout, read by DINO's loader
    torch.manual_seed(0)
    initial = encoders.ViTEncoder(**data.SHAPES_ENCODER)
    assert trained.state_dict().keys() == initial.state_dict().keys()
    assert not torch.equal(trained.blocks[0].attn.qkv.weight, initial.blocks[0].attn.qkv.weight)  # it trained
    features = trained.encode(torch.rand(3, 3, 32, 32) * 2 - 1)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    monkeypatch.setattr(encoders, "SHAPES_VIT_FILE", out)  # what an export records, and checks on loading
    config = encoders.encoder_config(encoders.SHAPES_VIT, 32)
    assert config == {"sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    loaded = encoders.load_image_encoder(encoders.SHAPES_VIT, 32, torch.device("cpu"), config)
    assert torch.equal(loaded.encode(torch.zeros(1, 3, 32, 32)), trained.encode(torch.zeros(1, 3, 32, 32)))
    assert_raises(ValueError, "is not the shapes-vit this model was trained with", lambda: encoders.load_image_encoder(
        encoders.SHAPES_VIT, 32, torch.device("cpu"), {"sha256": "0" * 64}))
    monkeypatch.setattr(encoders, "SHAPES_VIT_FILE", tmp_path / "absent.safetensors")
    assert_raises(FileNotFoundError, "python data.py shapes-encoder",
                  lambda: encoders.load_image_encoder(encoders.SHAPES_VIT, 32, torch.device("cpu")))


def test_loss_decreases_on_shapes_the_lr_warms_up_and_the_export_rebuilds_from_its_metadata_alone(tmp_path):
    train_i2i.main(TINY_RUN + ["--steps", "30", "--global-batch-size", "16", "--data", "shapes:256", "--lr", "3e-3",
                               "--max-grad-norm", "1", "--sample-every", "30", "--out", str(tmp_path),
                               "--prediction", "x0", "--no-learn-sigma"])  # the offline default's recipe
    loss, lr = read_metrics(tmp_path)["loss"], read_metrics(tmp_path)["lr"]  # last 5 losses: 0.40 of the first 5
    assert len(loss) == 30 and sum(loss[-5:]) < 0.7 * sum(loss[:5])
    assert lr == pytest.approx([1.5e-3] + [3e-3] * 29, rel=1e-12)  # lr * min(1, (step + 1) / 2), then constant
    assert os.path.exists(tmp_path / "samples" / "step_0000030.png")
    export = str(tmp_path / "ema.safetensors")  # sample.py rebuilds the model from the export alone
    (model, info), saved = sample.load_generator(export, torch.device("cpu")), load_file(export)
    config, step = info["config"], dit.export_metadata(export)["step"]
    assert (info["space"], info["image_size"], info["encoder"], info["prediction"], step) == \
        ("pixel", 16, "shapes-vit", "x0", 30)
    agreement = read_metrics(tmp_path, "agreement_all")  # the grid's I2I agreement with its references
    assert agreement["step"] == [30] and 0 <= agreement["agreement_background"][0] <= 1
    assert config["depth"] == 2 and config["in_channels"] == 3
    assert all(torch.equal(saved[key], value) for key, value in model.state_dict().items())
    y = torch.randn(2, 1, config["cond_dim"])
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0]), y).shape == (2, 3, 16, 16)


def test_resume_after_a_kill_during_a_checkpoint_save_is_exact_and_reads_pre_rename_configs(tmp_path, monkeypatch):
    run = TINY_RUN + ["--steps", "4", "--ckpt-every", "2"]
    train_i2i.main(run + ["--out", str(tmp_path / "straight")])
    real_replace = os.replace

    def die_at_the_second_commit(src, dst):
        if str(src).endswith("step_0000004.tmp"):
            raise KeyboardInterrupt("killed while saving")  # the shards are written, the commit is not
        return real_replace(src, dst)
    monkeypatch.setattr(train_i2i.os, "replace", die_at_the_second_commit)
    assert_raises(KeyboardInterrupt, "", lambda: train_i2i.main(run + ["--out", str(tmp_path / "killed")]))
    monkeypatch.setattr(train_i2i.os, "replace", real_replace)
    assert dit.latest_checkpoint(tmp_path / "killed").endswith("step_0000002")
    assert (tmp_path / "killed" / "checkpoints" / "step_0000004.tmp").is_dir()
    path = pathlib.Path(checkpoint(tmp_path / "killed", 2), "run_config.json")
    run_config = json.loads(path.read_text())  # rewritten as saved before the config renames
    run_config["model_config"]["class_dropout_prob"] = run_config["model_config"].pop("cond_dropout_prob")
    del run_config["model_config"]["pose_dim"]
    path.write_text(json.dumps(run_config))
    train_i2i.main(run + ["--out", str(tmp_path / "killed"), "--resume"])
    straight, killed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert killed["step"][-2:] == [3, 4] and killed["loss"][-2:] == pytest.approx(straight["loss"][-2:], rel=1e-6)
    for part in ("model", "ema"):  # the same computation again: equal up to 1e-6
        assert_same_weights(checkpoint_weights(checkpoint(tmp_path / "killed", 4), part),
                            checkpoint_weights(checkpoint(tmp_path / "straight", 4), part), rtol=1e-6)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    poisoned, calls, before, emas = {2, 4, 5}, [], [], []  # 1-based steps with a NaN loss
    losses, clip, update = GaussianDiffusion.training_losses, torch.nn.utils.clip_grad_norm_, train_i2i.update_ema

    def nan_loss(self, *args, **kwargs):
        calls.append(None)
        terms = losses(self, *args, **kwargs)
        return {**terms, "loss": terms["loss"] * (math.nan if len(calls) in poisoned else 1)}

    def recording_clip(parameters, *args, **kwargs):  # the weights as each step's update begins
        parameters = list(parameters)
        before.append([p.detach().clone() for p in [*parameters, *(emas[0].parameters() if emas else [])]])
        return clip(parameters, *args, **kwargs)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", nan_loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(train_i2i, "update_ema", lambda ema, *args: emas.append(ema) or update(ema, *args))
    with pytest.raises(RuntimeError, match=r"^2 consecutive steps with a non-finite loss or gradient by step 5: lower --lr"):
        train_i2i.main(TINY_RUN + ["--steps", "6", "--max-nonfinite", "2", "--out", str(tmp_path)])
    assert read_metrics(tmp_path)["nonfinite_steps"] == [0, 1, 1, 2]  # step 3 reset the consecutive count
    assert not all(torch.equal(a, b) for a, b in zip(before[0], before[1]))  # step 1 updated the model
    assert all(torch.equal(a, b) for a, b in zip(before[1], before[2]))  # step 2 left model and EMA alone
    assert len(before[1]) == 2 * len(before[0])  # the EMA's weights are among those compared


@pytest.mark.parametrize("script, hflip", [(train_i2i, True), (train_t2i, False), (train_nvs, False)])
def test_tasks_mirror_as_documented_and_i2i_conditions_on_the_image_it_denoises(tmp_path, monkeypatch, script, hflip):
    # T2I captions name left and right, and an NVS target mirrored would belong to a mirrored camera.
    seen = {}  # the arguments of each call, by owner
    for owner, name in [(train_i2i, "mirrored"), (encoders.ImageSpace, "encode"), (encoders.ViTEncoder, "tokens")]:
        monkeypatch.setattr(owner, name, lambda *args, real=getattr(owner, name), key=owner.__name__:
                            seen.setdefault(key, []).append(args) or real(*args))
    extra = {train_i2i: ["--data", "shapes:64"], train_t2i: ["--init", "scratch", "--data", "shapes:64"],
             train_nvs: ["--init", "scratch", "--data", "multiview:2", "--held-out-objects", "1"]}[script]
    script.main([*TINY_SIZE, *TINY_LOOP, *extra, "--steps", "1", "--ckpt-every", "0", "--out", str(tmp_path)])
    drawn = train_i2i.sample_randomness(torch.arange(8), 0, (3, 16, 16), 1000, 0.1, False)["flip"]
    (_, grid_flips), (batch, flips) = seen["train_i2i"][:2]  # the grids' held-out batch, never mirrored, then step 1's
    assert drawn.any() and not drawn.all() and not grid_flips.any() and torch.equal(flips, drawn & hflip)
    if script is train_i2i:  # the target and DINO's condition are of one image, mirrored where drawn
        target = seen["ImageSpace"][0][1]
        assert torch.equal(target, torch.where(flips[:, None, None, None], batch["image"].flip(-1), batch["image"]))
        assert torch.equal(seen["ViTEncoder"][-1][1], target)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_i2i.py", *TINY_RUN, "--out", str(out), "--steps", "100000",
                             "--ckpt-every", "100000"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "metrics.jsonl").exists() or len(read_metrics(out).get("step", [])) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, latest = proc.communicate(timeout=120)[0], dit.latest_checkpoint(out)
    assert proc.returncode == 0 and latest is not None and "signal" in output, output
    assert (saved_step := int(os.path.basename(latest).split("_")[1])) >= 3
    train_i2i.main(TINY_RUN + ["--out", str(out), "--steps", str(saved_step + 2), "--resume"])
    assert dit.latest_checkpoint(out).endswith(f"step_{saved_step + 2:07d}")


@pytest.mark.parametrize("script, extra, message", [
    (train_i2i, ["--global-batch-size", "6", "--grad-accum", "4"], "--global-batch-size 6 must be divisible"),
    (train_i2i, ["--image-size", "18"], "--image-size 18 must be divisible by 4"),
    (train_i2i, ["--model", "DiT-Huge/2"], "unknown --model 'DiT-Huge/2'"),
    (train_i2i, ["--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (train_i2i, ["--data", "{cache}", "--image-size", "32", "--vae", "{vae}"], "was made with --vae {vae} --encoder {dino}"),
    (train_i2i, ["--data", "{cache}", "--image-size", "64", "--vae", "{vae}", "--encoder", "{dino}"], "pass --image-size 32"),
    (train_i2i, ["--data", "{cache}", "--image-size", "32", "--vae", "{vae}", "--encoder", "{dino}", "--condition", "all"],
     "holds no patch tokens, which --condition all need: write the cache with `data.py cache --patch-tokens`"),
    (train_i2i, ["--repa-weight", "0.5", "--repa-block", "3"], "--repa-block 3 within 1..2 (the model's depth)"),
    (train_nvs, ["--init", "scratch", "--data", "multiview:0"], "multiview:N with N a positive integer"),
    (train_nvs, ["--init", "{export}", "--depth", "2"], "--depth: the model's size comes from --init"),
    (train_nvs, ["--init", "{export}", "--vae", "some/vae"], "is a 3-channel model, but this run is in latent space"),
    (train_nvs, ["--init", "{export}", "--encoder", "facebook/dino-vitb16"], "--encoder facebook/dino-vitb16: --init"),
    (train_nvs, ["--init", "{missing}"], "no such file"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, capsys, tiny_i2i, latent_assets, script, extra, message):
    paths = {"export": tiny_i2i / "ema.safetensors", "missing": tmp_path / "none.safetensors",
             "cache": latent_assets.cache, "vae": latent_assets.vae, "dino": latent_assets.dino}
    with pytest.raises(SystemExit) as exit_info:
        script.main((TINY_RUN if script is train_i2i else []) + [arg.format(**paths) for arg in extra] + ["--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith(f"{script.__name__}.py: error:") and "\n" not in err
    assert message.format(**paths) in err


def test_per_sample_randomness_does_not_depend_on_batching():
    whole = train_i2i.sample_randomness(torch.arange(8), 3, (3, 4, 4), 1000, 0.5, latent=True)
    halves = [train_i2i.sample_randomness(torch.arange(4) + 4 * k, 3, (3, 4, 4), 1000, 0.5, latent=True) for k in range(2)]
    assert all(torch.equal(draw, torch.cat([half[key] for half in halves])) for key, draw in whole.items())
    other_seed = train_i2i.sample_randomness(torch.arange(8), 4, (3, 4, 4), 1000, 0.5, latent=False)
    assert not torch.equal(other_seed["noise"], whole["noise"]) and "posterior_noise" not in other_seed


# ======================================== scale ==================================================

@pytest.fixture(scope="module")
def latent_assets(tmp_path_factory):
    """Tiny random encoders, a feature cache of shapes:16 at 32 px in shards of 4, its text cache; `run`: their flags."""
    root = tmp_path_factory.mktemp("latent")
    vae, dino = bench.write_random_encoders(  # random weights: a VAE of the SD-VAE's structure (f = 8), a small DINO
        root, {**bench.SD_VAE_CONFIG, "block_out_channels": [8] * 4, "layers_per_block": 1, "norm_num_groups": 4},
        {"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 1})
    settings = {"data": "shapes:16", "seed": 0, "image_size": 32, "vae": vae, "encoder": dino}
    data.write_feature_cache(data.open_dataset("shapes:16", 32), root / "cache", encoders.VAE.from_pretrained(vae),
                             encoders.ViTEncoder.from_pretrained(dino), settings, 4, batch_size=3, log=lambda line: None)
    train_t2i.main(["cache-text", "--data", f"cache:{root / 'cache'}", "--out", str(root / "text"),
                    "--image-size", "32", "--num-samples", "4"])
    return SimpleNamespace(vae=vae, dino=dino, root=root / "cache", cache=f"cache:{root / 'cache'}", text=str(root / "text"),
                           settings=settings, run=["--image-size", "32", "--vae", vae, "--encoder", dino])


# The launch matrix (torchrun, 2 ranks, gloo, CPU): pairwise task x precision x compile x data; EMA updates follow grids.
LAUNCH_NVS = ["train_nvs.py", "--init", "scratch", *TINY_SIZE, *TINY_LOOP, "--data", "multiview:4", "--held-out-objects",
              "1", "--steps", "3", "--ckpt-every", "3", "--sample-every", "2"]


def assert_launched(result, out, steps, grids):
    assert result.returncode == 0, result.stderr[-3000:]
    assert (logged := read_metrics(out))["step"] == list(range(1, steps + 1)) and logged["nonfinite_steps"][-1] == 0
    assert sorted(os.listdir(os.path.join(out, "samples"))) == [  # each grid, and its views as arrays
        f"step_{step:07d}{kind}" for step in grids for kind in (".png", ".references.npz", ".samples.npz")]


@pytest.mark.slow
def test_launch_i2i_fp32_eager_on_the_fly_equals_one_rank(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Grids at 2 and 4, a checkpoint at 4: an EMA update follows a grid (it once left the EMA's root unsharded); guided.
    common = TINY_RUN + ["--ckpt-every", "4", "--sample-every", "2", "--cfg-scale", "2"]
    train_i2i.main(common + ["--out", str(one), "--steps", "5"])
    # 2 ranks x 2 micro-batches of 2 (gradient sync only on the last) = 1 rank x 8.
    result = torchrun("train_i2i.py", *common, "--out", two, "--steps", "4", "--grad-accum", "2")
    assert_launched(result, two, 4, [2, 4])
    assert result.stdout.count("from scratch") == 1  # rank 0 alone prints and writes
    assert sorted(os.listdir(two)) == ["checkpoints", "ema.safetensors", "metrics.jsonl", "samples"]
    export_at_4 = load_file(two / "ema.safetensors")  # gathered from both ranks' shards by rank 0
    train_i2i.main(common + ["--out", str(two), "--steps", "5", "--resume"])  # 1 rank continues
    for key in ("loss", "grad_norm"):  # the loss all-reduced, the norm clipped over all shards
        assert read_metrics(two)[key] == pytest.approx(read_metrics(one)[key], rel=TOLERANCE)
    assert_same_weights(export_at_4, checkpoint_weights(checkpoint(one, 4), "ema"))
    for step, part in itertools.product((4, 5), ("model", "ema")):
        assert_same_weights(checkpoint_weights(checkpoint(two, step), part), checkpoint_weights(checkpoint(one, step), part))


@pytest.mark.slow
def test_launch_repa_fp32_on_all_tokens_equals_one_rank(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # A narrow projector: REPA's 2048-wide one (the default with --model) sums each weight's gradient over
    # 2048 x 2048 products, which two ranks' halves of the batch reorder: its norm then agrees to 5e-5 only.
    common = TINY_RUN + ["--condition", "all", "--repa-weight", "0.5", "--repa-block", "1", "--repa-width", "64",
                         "--ckpt-every", "3", "--sample-every", "3"]
    train_i2i.main(common + ["--out", str(one), "--steps", "3"])
    result = torchrun("train_i2i.py", *common, "--out", two, "--steps", "3", "--grad-accum", "2")
    assert_launched(result, two, 3, [3])
    for key in ("loss", "repa_loss", "grad_norm"):
        assert read_metrics(two)[key] == pytest.approx(read_metrics(one)[key], rel=TOLERANCE)
    for part in ("model", "ema"):  # the model's with the projector, sharded as a unit of its own
        weights = [checkpoint_weights(checkpoint(run, 3), part) for run in (two, one)]
        assert any(key.startswith("repa_projector.") for key in weights[1]) == (part == "model")
        # Adam divides each gradient by its own size: where one is near Adam's eps (1e-8), the ranks'
        # reordered fp32 sums (1e-11 apart) move its step by ~1e-3 of the lr (1e-6 here: 1.4e-6 seen in
        # t_embedder's first layer); a wrong gradient moves weights by the lr itself, 1e-3.
        assert_same_weights(*weights, atol=1e-5)


@pytest.mark.slow
def test_launch_i2i_bf16_compiled_on_a_two_rank_extracted_cache_resumes_on_one_rank(tmp_path, latent_assets):
    root, out = tmp_path / "cache", tmp_path / "run"  # the cache by 2 ranks: each image once, as 1 rank extracts it
    result = torchrun("data.py", "cache", "--data", "shapes:16", "--out", root, "--vae", latent_assets.vae, "--encoder",
                      latent_assets.dino, "--image-size", "32", "--shard-size", "4", "--batch-size", "2", "--workers", "0",
                      "--patch-tokens")
    assert result.returncode == 0, result.stderr[-3000:]
    writes = [line.split(" ")[:4] for line in result.stdout.splitlines() if ": wrote " in line]
    assert sorted(path for *_, path in writes) == [data.cache_shard_path(str(root), k) for k in range(4)]
    assert {rank for _, rank, *_ in writes} == {"0:", "1:"}  # both ranks wrote, no shard twice
    assert sorted(os.listdir(root)) == ["cache.json"] + [f"shard_{k:05d}.safetensors" for k in range(4)]
    cache, single = data.FeatureCache(root), data.FeatureCache(latent_assets.root)
    for i in range(16):
        assert cache[i]["index"] == i and cache[i]["caption"] == single[i]["caption"]
        for key in ("latent_mean", "latent_std", "cond"):  # fp16: one step apart at most
            assert_close_to_scale(cache[i][key], single[i][key], COMPACT_STEP)
    common = [*TINY_RUN, *latent_assets.run, "--model", "DiT-S/2", "--data", f"cache:{root}", "--precision", "bf16",
              "--compile", "--ckpt-every", "3", "--sample-every", "2", "--out", str(out),
              "--condition", "patch", "--repa-weight", "0.5", "--repa-block", "1", "--repa-width", "64"]  # sharded too
    assert_launched(torchrun("train_i2i.py", *common, "--steps", "3"), out, 3, [2, 3])
    train_i2i.main(common + ["--steps", "4", "--resume"])  # the 2-rank bf16 checkpoint on 1 rank
    assert_launched(SimpleNamespace(returncode=0), out, 4, [2, 3, 4])


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["train_t2i.py", "--init", "{export}", *TINY_LOOP, "--data", "shapes:64", "--precision", "bf16", "--steps", "3",
     "--ckpt-every", "3", "--sample-every", "2", "--cfg-scale", "4.5"], [*LAUNCH_NVS, "--grad-accum", "2"]],
    ids=["t2i_bf16_on_the_fly", "nvs_fp32_grad_accum"])
def test_launch_compiled(tmp_path, tiny_i2i, argv):
    argv = [arg.format(export=tiny_i2i / "ema.safetensors") for arg in argv]
    assert_launched(torchrun(*argv, "--compile", "--out", tmp_path), tmp_path, 3, [2, 3])


@pytest.mark.slow
def test_launch_t2i_fp32_eager_caches_equal_one_rank(tmp_path, latent_assets):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--init", "scratch", *TINY_SIZE, *TINY_LOOP, *latent_assets.run[:4], "--model", "DiT-S/2", "--data",
              latent_assets.cache, "--text-cache", latent_assets.text, "--steps", "3", "--ckpt-every", "3",
              "--sample-every", "2", "--cfg-scale", "4.5"]
    assert_launched(torchrun("train_t2i.py", *common, "--grad-accum", "2", "--out", two), two, 3, [2, 3])
    train_t2i.main(common + ["--out", str(one)])
    assert read_metrics(two)["loss"] == pytest.approx(read_metrics(one)["loss"], rel=TOLERANCE)
    assert_same_weights(load_file(two / "ema.safetensors"), load_file(one / "ema.safetensors"))


def write_mixed_aspect_pairs(folder, count=24):
    """Captioned images of three aspect ratios in turn (1:1, 1:2 and 2:1, height to width: the buckets
    1.0, 0.5 and 2.0); the first is a JPEG whose EXIF turns it by 90 degrees (stored 2:1, shown 1:2)."""
    sizes, exif = [(64, 64), (96, 48), (48, 96)], Image.Exif()
    exif[0x0112] = 6
    files = {f"{i:03d}.png": encode(noise_image(*sizes[i % 3], i), "PNG") for i in range(1, count)}
    files["000.jpg"] = encode(noise_image(48, 96, 0), "JPEG", exif=exif)  # 1:1 by its turn, stored 2:1, shown 1:2
    return write_files(folder, files | {f"{i:03d}.txt": f"caption {i % 5}".encode() for i in range(count)})


@pytest.fixture(scope="module")
def wide_i2i(tmp_path_factory):
    """The export of a 2-step TINY_RUN of width 48 (three size embeddings of 16 once multi-scale)."""
    out = tmp_path_factory.mktemp("wide_i2i")
    train_i2i.main([*TINY_RUN, "--hidden-size", "48", "--steps", "2", "--out", str(out)])
    return out / "ema.safetensors"


def test_multi_scale_t2i_from_a_single_scale_prior_starts_as_the_single_scale_model(wide_i2i, capsys):
    prior, info = dit.read_weights(str(wide_i2i))
    models = []
    for flags in ([], ["--multi-scale"]):
        args = t2i_args("--init", wide_i2i, *flags)
        train_t2i.read_init(args)
        torch.manual_seed(0)
        models.append(train_t2i.t2i_model(args, prior, info, 64).eval())
    single, multi = models
    assert "the size embedders, their last layers zero" in capsys.readouterr().out and multi.lewei_scale == 1.0
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 900.0])
    y, mask = torch.randn(2, 5, 64), torch.ones(2, 5, dtype=torch.bool)
    img_hw, aspect_ratio = torch.tensor([[16.0, 16.0], [512.0, 2048.0]]), torch.tensor([[1.0], [0.25]])
    with torch.no_grad():
        torch.testing.assert_close(multi(x, t, y, mask, img_hw=img_hw, aspect_ratio=aspect_ratio), single(x, t, y, mask),
                                   rtol=0, atol=0)
    bigger = t2i_args("--init", wide_i2i, "--multi-scale", "--image-size", "64")
    train_t2i.read_init(bigger)  # 4x the grid: 4x lewei_scale keeps the prior's range of positions
    assert train_t2i.t2i_model(bigger, prior, info, 64).lewei_scale == 4.0


@pytest.mark.slow
def test_launch_t2i_multi_scale_buckets_equal_one_rank_and_resume_exactly(tmp_path, wide_i2i, capsys):
    folder = write_mixed_aspect_pairs(tmp_path / "pairs")
    buckets = data.AspectRatioBuckets(data.open_dataset(str(folder), 64), 64)
    assert [buckets.keys[b] for b in buckets.buckets[:4]] == ["0.5", "0.5", "2.0", "1.0"]  # 000.jpg: turned by EXIF
    assert buckets.sizes[:4].tolist() == [[48, 96], [48, 96], [96, 48], [64, 64]]  # (height, width) as shown
    item = buckets[1]
    assert item["image"].shape == (3, 44, 88) and item["img_hw"].tolist() == [48, 96] and item["aspect_ratio"].item() == 0.5
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    common = ["--init", wide_i2i, "--multi-scale", *TINY_LOOP, "--image-size", "64",
              "--data", folder, "--ckpt-every", "2", "--sample-every", "4", "--cfg-scale", "2"]
    assert_launched(torchrun("train_t2i.py", *common, "--steps", "4", "--out", two), two, 4, [4])
    train_t2i.main([str(arg) for arg in common + ["--steps", "4", "--out", one]])
    assert read_metrics(two)["loss"] == pytest.approx(read_metrics(one)["loss"], rel=TOLERANCE)
    assert_same_weights(load_file(two / "ema.safetensors"), load_file(one / "ema.safetensors"))
    for steps in ("2", "4"):  # stopped after a bucketed epoch's first two batches, then resumed
        train_t2i.main([str(arg) for arg in common + ["--steps", steps, "--out", resumed, "--resume"]])
    assert read_metrics(resumed)["loss"] == read_metrics(one)["loss"]
    assert_same_weights(load_file(resumed / "ema.safetensors"), load_file(one / "ema.safetensors"), rtol=0)
    capsys.readouterr()  # a multi-scale T2I export fine-tunes on as it is (as Lumos_T2I.pth would): nothing new
    train_t2i.main([str(arg) for arg in ["--init", one / "ema.safetensors", *TINY_LOOP, "--image-size", "64",
                                         "--data", folder, "--steps", "2", "--precision", "bf16", "--sample-every", "2",
                                         "--out", tmp_path / "again"]])
    assert "\n  new (none): none" in capsys.readouterr().out
    assert dit.export_metadata(str(tmp_path / "again" / "ema.safetensors"))["lumos"]["config"]["multi_scale"]
    with pytest.raises(SystemExit):
        train_nvs.main(["--init", str(one / "ema.safetensors"), "--out", str(tmp_path / "nvs")])
    assert "a multi-scale T2I model; NVS starts from a single-scale" in capsys.readouterr().err


@pytest.mark.slow
def test_multi_scale_feature_cache_holds_each_image_at_its_bucket_and_trains_t2i(tmp_path, latent_assets, capsys):
    sizes = [(256, 256), (512, 256), (256, 512)]  # width x height: the buckets 1.0, 0.5 and 2.0 at 256 px
    folder = write_files(tmp_path / "pairs", {f"{i:03d}.png": encode(noise_image(*sizes[i % 3], i), "PNG") for i in range(6)}
                         | {f"{i:03d}.txt": f"caption {i}".encode() for i in range(6)})
    cache = tmp_path / "cache"
    data.main(["cache", "--data", str(folder), "--out", str(cache), "--vae", latent_assets.vae, "--encoder",
               latent_assets.dino, "--image-size", "256", "--multi-scale", "--shard-size", "4", "--batch-size", "2",
               "--workers", "0"])
    cached, images = data.FeatureCache(str(cache)), data.AspectRatioBuckets(data.open_dataset(str(folder), 256), 256)
    assert cached.buckets.tolist() == images.buckets.tolist() and [cached.keys[b] for b in cached.buckets[:3]] == ["1.0", "0.5", "2.0"]
    item = cached[4]  # the second shard's first: bucket 0.5 at 256 px, 176 x 352 px, so 22 x 44 latents
    assert item["latent_mean"].shape == (2, 4, 22, 44) and item["img_hw"].tolist() == [256, 512]
    assert item["aspect_ratio"].item() == 0.5 and item["caption"] == "caption 4"
    with torch.no_grad():
        mean, _ = encoders.VAE.from_pretrained(latent_assets.vae).encode(images[4]["image"][None])
    torch.testing.assert_close(item["latent_mean"][0], mean[0], rtol=2 ** -10, atol=1e-4)  # stored in fp16
    run = ["--init", "scratch", *TINY_LOOP, "--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads",
           "2", "--image-size", "256", "--vae", latent_assets.vae, "--data", f"cache:{cache}", "--global-batch-size", "2"]
    train_t2i.main(run + ["--multi-scale", "--steps", "3", "--sample-every", "3", "--sample-steps", "2",
                          "--out", str(tmp_path / "t2i")])
    assert read_metrics(tmp_path / "t2i")["step"] == [1, 2, 3]  # an epoch: one global batch of each bucket
    with pytest.raises(SystemExit):
        train_t2i.main(run + ["--out", str(tmp_path / "single")])
    assert "was made with --multi-scale: the single-scale model needs a cache made without it" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # I2I's model is single-scale: one image size
        train_i2i.main([*TINY_SIZE, *TINY_LOOP, "--image-size", "256", "--vae", latent_assets.vae, "--encoder",
                        latent_assets.dino, "--data", f"cache:{cache}", "--out", str(tmp_path / "i2i")])
    assert "holds aspect-ratio buckets (made with --multi-scale)" in capsys.readouterr().err


# Runs a training script, writing to out/seen_<rank>.json the drawn t, t at the embedder, y's and residuals' dtypes.
RECORDING_LAUNCHER = """
import json, os, pathlib, runpy, sys, torch
sys.path.insert(0, {repo!r})
import dit, train_i2i
seen = {{"drawn": [], "t": [], "y": [], "residual": []}}
def spy(owner, name, record):  # record(args, kwargs, result) of each call in training (grad enabled)
    real = getattr(owner, name)
    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        if torch.is_grad_enabled():
            record(args, kwargs, result)
        return result
    setattr(owner, name, call)
spy(train_i2i, "sample_randomness", lambda args, kwargs, drawn: seen["drawn"].extend(drawn["t"].tolist()))
spy(dit.TimestepEmbedder, "forward", lambda args, kwargs, _: seen["t"].extend(args[1].tolist()))
spy(dit.LumosDiT, "forward", lambda args, kwargs, _: seen["y"].append(str((kwargs["y"] if "y" in kwargs else args[3]).dtype)))
spy(dit.LumosBlock, "forward", lambda args, kwargs, _: seen["residual"].append(str(args[1].dtype)))
out, sys.argv = sys.argv[sys.argv.index("--out") + 1], sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
pathlib.Path(out, "seen_%s.json" % os.environ.get("RANK", 0)).write_text(json.dumps(seen))
"""


@pytest.mark.slow
def test_launch_nvs_bf16_eager_exact_timesteps(tmp_path):
    (launcher := tmp_path / "launch.py").write_text(RECORDING_LAUNCHER.format(repo=REPO))
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*LAUNCH_NVS, "--precision", "bf16", "--cfg-scale", "3"]
    assert_launched(torchrun(launcher, *common, "--out", two), two, 3, [2, 3])
    single = subprocess.run([sys.executable, launcher, *common, "--out", one], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert_launched(single, one, 3, [2, 3])
    reference = json.loads((one / "seen_0.json").read_text())
    for seen in (json.loads((two / f"seen_{rank}.json").read_text()) for rank in (0, 1)):
        # t reaches the embedder exactly (FSDP's bf16 cast once made 999 1000); fp32 residuals, y's 1-rank dtype.
        assert seen["t"] == seen["drawn"] and len(seen["t"]) == 12
        assert set(seen["residual"]) == {"torch.float32"} and set(seen["y"]) == set(reference["y"])
    assert reference["t"] == reference["drawn"] and len(reference["t"]) == 24
    # 2 ranks may round a bf16 product the other way (2^-9); a mean of 6144 squared errors moves far less than 1e-3.
    assert read_metrics(two)["loss"] == pytest.approx(read_metrics(one)["loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--global-batch-size", "6", "--grad-accum", "2"], "--global-batch-size 6 must be divisible by world size 2 x --grad-accum 2"),
    (["--resume", "--global-batch-size", "16"], "global_batch_size: 8 -> 16")], ids=["batch", "resume"])
def test_bad_arguments_under_torchrun_give_one_line_and_every_rank_exits(tmp_path, extra, message):
    if "--resume" in extra:
        train_i2i.main(TINY_RUN + ["--out", str(tmp_path), "--steps", "1"])
    result = torchrun("train_i2i.py", *TINY_RUN, "--out", tmp_path, "--steps", "2", *extra)
    errors = [line for line in result.stderr.splitlines() if "train_i2i.py: error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    # torchrun reports each rank's exit code: 2, or -15 (SIGTERM from torchrun once the other rank exited).
    exit_codes = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\n\s+exitcode\s+: (-?\d+)", result.stderr))
    assert result.returncode != 0 and set(exit_codes) == {"0", "1"}, result.stderr[-3000:]
    assert "2" in exit_codes.values() and set(exit_codes.values()) <= {"2", "-15"}
    assert "Traceback" not in result.stderr.split("train_i2i.py: error:")[0]


@pytest.mark.slow
def test_compiled_training_step_matches_eager_and_keeps_plain_keys(tmp_path):
    common = TINY_RUN + ["--steps", "1", "--global-batch-size", "4"]
    train_i2i.main(common + ["--out", str(tmp_path / "eager")])
    torch._dynamo.utils.counters.clear()
    train_i2i.main(common + ["--out", str(tmp_path / "compiled"), "--compile", "--grad-checkpointing"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    assert read_metrics(tmp_path / "compiled")["loss"] == pytest.approx(read_metrics(tmp_path / "eager")["loss"], rel=TOLERANCE)
    eager, compiled = (checkpoint(tmp_path / name, 1) for name in ("eager", "compiled"))
    assert_same_weights(checkpoint_weights(compiled, "model"), checkpoint_weights(eager, "model"))
    saved_keys = [set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata) for path in (eager, compiled)]
    assert saved_keys[1] == saved_keys[0] and "model.blocks.0.attn.qkv.weight" in saved_keys[1]


def test_cached_batches_equal_encoding_on_the_fly_and_a_restart_skips_finished_shards(tmp_path, monkeypatch, latent_assets):
    round_encoders_like_the_cache(monkeypatch)  # on the fly through the cache's 16-bit format
    cache, images = data.FeatureCache(latent_assets.root), data.open_dataset("shapes:16", 32)
    vae, dino = encoders.VAE.from_pretrained(latent_assets.vae), encoders.ViTEncoder.from_pretrained(latent_assets.dino)
    space = encoders.ImageSpace(vae)
    batches = [next(iter(data.make_loader(source, 16, 16, seed=3))) for source in (images, cache)]
    assert torch.equal(batches[0]["index"], batches[1]["index"]) and batches[0]["caption"] == batches[1]["caption"]
    drawn = train_i2i.sample_randomness(batches[0]["global_index"], 0, (4, 4, 4), 1000, 0.1, True)
    flips, posterior = drawn["flip"], drawn["posterior_noise"]
    assert flips.any() and not flips.all()
    on_the_fly, cached = (train_i2i.mirrored(batch, flips) for batch in batches)
    target = train_i2i.diffusion_targets(on_the_fly, posterior, space)
    assert_close_to_scale(train_i2i.diffusion_targets(cached, posterior, space), target, COMPACT_STEP)
    # The condition is of the target's own image, mirrored where the target is, in both paths.
    mirror_images = torch.where(flips[:, None, None, None], batches[0]["image"].flip(-1), batches[0]["image"])
    expected = dino.encode(mirror_images)[:, None]
    on_the_fly = {**on_the_fly, **encoders.image_features(dino, on_the_fly["image"])}  # what the I2I task adds
    assert_close_to_scale(encoders.image_condition("cls")(on_the_fly, space)["y"], expected, TOLERANCE)
    assert_close_to_scale(encoders.image_condition("cls")(cached, space)["y"], expected, COMPACT_STEP)
    assert (expected[flips] - dino.encode(batches[0]["image"])[flips][:, None]).abs().max() > 1e-3  # DINO sees the flip
    # The grids' references: decoded cached means, what the VAE makes of the (mirrored) images.
    assert_close_to_scale(train_i2i.reference_images(cached, space), space.decode(space.encode(mirror_images)), COMPACT_STEP)
    root, settings = tmp_path / "cache", latent_assets.settings  # a copy of the cache, 16 items in shards of 4
    shutil.copytree(latent_assets.root, root)
    before = load_file(data.cache_shard_path(root, 1))
    os.remove(data.cache_shard_path(root, 1))
    pathlib.Path(data.cache_shard_path(root, 1) + ".tmp").write_bytes(b"cut off by a kill")
    with pytest.raises(FileNotFoundError, match="incomplete: 1 of 4 shards missing"):
        data.FeatureCache(root)
    finished = {shard: os.stat(data.cache_shard_path(root, shard)).st_mtime_ns for shard in (0, 2, 3)}
    assert data.write_feature_cache(data.open_dataset("shapes:16", 32), root, vae, dino, settings, 4, log=lambda line: None) == [1]
    assert {shard: os.stat(data.cache_shard_path(root, shard)).st_mtime_ns for shard in (0, 2, 3)} == finished
    for key, tensor in load_file(data.cache_shard_path(root, 1)).items():  # fp16: one step apart at most
        assert_close_to_scale(tensor, before[key], COMPACT_STEP)
    assert len(data.FeatureCache(root)) == 16
    with pytest.raises(ValueError, match="image_size: 32 -> 64"):
        data.write_feature_cache(data.open_dataset("shapes:16", 64), root, vae, dino, {**settings, "image_size": 64}, 4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_from_the_cache_matches_on_the_fly_without_running_the_encoders(tmp_path, monkeypatch, precision, latent_assets):
    # bf16 too: the frozen encoders run in fp32 in both paths, their outputs rounded as the cache stores them.
    round_encoders_like_the_cache(monkeypatch)
    run = TINY_RUN + latent_assets.run + ["--global-batch-size", "4", "--steps", "3", "--sample-every", "3",
                                          "--precision", precision]
    train_i2i.main(run + ["--data", "shapes:16", "--out", str(tmp_path / "on_the_fly")])
    for owner, name in [(train_i2i, "load_image_encoder"), (encoders.VAE, "encode")]:  # must not run
        monkeypatch.setattr(owner, name, lambda *args, **kwargs: pytest.fail("an encoder ran in training from the cache"))
    train_i2i.main(run + ["--data", latent_assets.cache, "--out", str(tmp_path / "cached")])
    assert read_metrics(tmp_path / "cached")["loss"] == pytest.approx(read_metrics(tmp_path / "on_the_fly")["loss"], rel=TOLERANCE)
    assert_same_weights(load_file(tmp_path / "cached" / "ema.safetensors"), load_file(tmp_path / "on_the_fly" / "ema.safetensors"))
    assert os.path.exists(tmp_path / "cached" / "samples" / "step_0000003.png")
    with safe_open(tmp_path / "cached" / "ema.safetensors", "pt") as f:
        assert json.loads(f.metadata()["lumos"])["vae"] == latent_assets.vae


# ======================================== ablations: --condition, REPA ===========================

def test_condition_tokens_are_the_cls_the_patches_or_all_each_of_unit_length():
    encoder = encoders.ViTEncoder(image_size=32, patch_size=8, width=16, depth=1, heads=2)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = encoders.image_features(encoder, images, patch_tokens=True)
    assert "patch_tokens" not in encoders.image_features(encoder, images)  # computed only when asked for
    tokens = {condition: encoders.condition_tokens(features, condition) for condition in encoders.CONDITIONS}
    assert [tuple(tokens[c].shape) for c in ("cls", "patch", "all")] == [(3, 1, 16), (3, 16, 16), (3, 17, 16)]
    assert [encoders.condition_token_count(c, 16) for c in ("cls", "patch", "all")] == [1, 16, 17]
    assert torch.equal(tokens["all"], torch.cat([tokens["cls"], tokens["patch"]], dim=1))
    assert torch.equal(tokens["cls"][:, 0], encoder.encode(images))
    # Each is a final-norm token of the encoder (native size: no resize), L2-normalised on its own.
    normalize = transforms.Normalize(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)
    assert_close_to_scale(tokens["all"], F.normalize(encoder(normalize((images + 1) / 2)), dim=-1), 1e-5)
    torch.testing.assert_close(tokens["all"].norm(dim=-1), torch.ones(3, 17))


def bilinear_resize_float64(grid, size):
    """(C, h, w) -> (C, size, size) by align_corners=False bilinear upsampling, written out in float64."""
    side = grid.shape[-1]
    source = np.clip((np.arange(size) + 0.5) * side / size - 0.5, 0, side - 1)
    low = np.floor(source).astype(int)
    high, frac = np.minimum(low + 1, side - 1), source - low
    rows = grid[:, low] * (1 - frac)[None, :, None] + grid[:, high] * frac[None, :, None]
    return rows[:, :, low] * (1 - frac) + rows[:, :, high] * frac


def test_repa_loss_is_the_negative_cosine_to_resized_patch_tokens_and_stops_at_the_encoder():
    encoder = encoders.ViTEncoder(image_size=32, patch_size=8, width=16, depth=1, heads=2).requires_grad_(True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    patch_tokens = encoders.image_features(encoder, images, patch_tokens=True)["patch_tokens"]  # a 4 x 4 grid
    torch.manual_seed(0)
    projector = train_i2i.repa_projector(8, 12, 16)
    block_tokens = torch.randn(2, 64, 8, requires_grad=True)  # an 8 x 8 DiT grid
    loss = train_i2i.repa_loss(projector(block_tokens), patch_tokens, (8, 8))
    loss.sum().backward()
    # Even an encoder left trainable gets no gradient: its tokens are computed without one, as cached.
    assert all(param.grad is None for param in encoder.parameters())
    assert all(param.grad.abs().sum() > 0 for param in projector.parameters()) and block_tokens.grad.abs().sum() > 0
    projected = projector(block_tokens).detach().double().numpy()
    for b in range(2):
        grid = patch_tokens[b].double().numpy().T.reshape(16, 4, 4)
        target = bilinear_resize_float64(grid, 8).reshape(16, 64).T
        norms = np.linalg.norm(projected[b], axis=-1) * np.linalg.norm(target, axis=-1)
        cosine = (projected[b] * target).sum(-1) / norms
        assert loss[b].item() == pytest.approx(-cosine.mean(), rel=1e-5)  # fp32 sums of 16 terms
    # The same grid: no resize, and tokens parallel to the target score -1.
    assert train_i2i.repa_loss(3 * patch_tokens, patch_tokens, (4, 4)).tolist() == pytest.approx([-1, -1], rel=1e-6)


def test_patch_token_cache_round_trip_trains_as_on_the_fly_and_exports_the_condition(tmp_path, monkeypatch, capsys,
                                                                                      latent_assets):
    root, vae_path, dino_path = tmp_path / "cache", latent_assets.vae, latent_assets.dino
    dino = encoders.ViTEncoder.from_pretrained(dino_path)
    data.main(["cache", "--data", "shapes:16", "--out", str(root), "--vae", vae_path, "--encoder", dino_path,
               "--image-size", "32", "--shard-size", "8", "--workers", "0", "--patch-tokens"])
    cache, images = data.FeatureCache(root), data.open_dataset("shapes:16", 32)
    assert cache.patches == 16 and cache.info["patch_tokens"] is True
    for i in (0, 9):  # each image and its mirror image: every patch token within fp16 rounding
        both = torch.stack([images[i]["image"], images[i]["image"].flip(-1)])
        exact = encoders.image_features(dino, both, patch_tokens=True)["patch_tokens"]
        assert cache[i]["patch_tokens"].shape == (2, 16, 64) and cache[i]["patch_tokens"].dtype == torch.float32
        assert ((cache[i]["patch_tokens"] - exact).abs() <= compact_bound(exact, 1.0)).all()
    for shard in range(2):  # 8 items a shard: the posteriors, the CLS and the 16 patch tokens, in 16 bits
        path = data.cache_shard_path(root, shard)
        with open(path, "rb") as f:
            header = 8 + struct.unpack("<Q", f.read(8))[0]
        assert os.path.getsize(path) - header == 8 * data.cache_item_bytes((4, 4, 4), 64, patches=16)
    # ViT-B/16 at 224 px: 196 patch tokens x 768 x 2 bytes = 294 KiB per mirror image, beside the 35 KiB of 256 px.
    assert 196 * 768 * 2 == 294 * 1024
    assert data.cache_item_bytes((4, 32, 32), 768, patches=196) == 35848 + 2 * 196 * 768 * 2
    # Training on it (patch tokens condition and REPA) equals encoding on the fly, rounded as the cache stores.
    round_encoders_like_the_cache(monkeypatch)
    run = TINY_RUN + latent_assets.run + ["--global-batch-size", "4", "--steps", "3", "--sample-every", "3", "--ckpt-every",
                                          "3", "--condition", "patch", "--repa-weight", "0.5", "--repa-block", "1"]
    train_i2i.main(run + ["--data", "shapes:16", "--out", str(tmp_path / "on_the_fly")])
    train_i2i.main(run + ["--data", f"cache:{root}", "--out", str(tmp_path / "cached")])
    cached, on_the_fly = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "on_the_fly")
    for key in ("loss", "repa_loss"):
        assert cached[key] == pytest.approx(on_the_fly[key], rel=TOLERANCE)
    export = tmp_path / "cached" / "ema.safetensors"
    assert_same_weights(load_file(export), load_file(tmp_path / "on_the_fly" / "ema.safetensors"))
    # The export: the patch condition recorded, no projector; the checkpoint holds the projector.
    state, info = dit.read_weights(str(export))
    assert info["condition"] == "patch" and info["config"]["cond_tokens"] == 16
    assert not any(key.startswith("repa_projector.") for key in state)
    saved = dcp.FileSystemReader(checkpoint(tmp_path / "cached", 3)).read_metadata().state_dict_metadata
    assert "model.repa_projector.0.weight" in saved and "ema.repa_projector.0.weight" not in saved
    # sample.py conditions as training did: the patch tokens of each reference.
    references = torch.stack([images[i]["image"] for i in range(2)])
    expected = encoders.condition_tokens(encoders.image_features(dino, references, patch_tokens=True), "patch")
    assert torch.equal(sample.image_condition_tokens(info, references, torch.device("cpu")), expected)
    for i in range(2):
        pixels = ((images[i]["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    sample.main(["i2i", "--ckpt", str(export), "--images", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
                 "--per-image", "1", "--steps", "2", "--out", str(tmp_path / "drawn")])
    assert len(os.listdir(tmp_path / "drawn")) == 3  # two images and the grid
    # NVS conditions on one CLS: a patch-conditioned prior is refused; REPA needs an image-encoder task.
    for script, argv, message in [
            (train_nvs, ["--init", str(export), *latent_assets.run], "NVS conditions on the source view's CLS"),
            (train_t2i, ["--init", "scratch", *TINY_SIZE, "--repa-weight", "0.5", "--repa-block", "1"],
             "REPA is for train_i2i.py")]:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            script.main([*TINY_LOOP, "--steps", "1", *argv, "--out", str(tmp_path / script.__name__)])
        assert message in (err := capsys.readouterr().err.strip()) and "\n" not in err


# ======================================== sample =================================================

def pngs(folder, count):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))).astype(int) for i in range(count)])


def test_interpolate_the_official_checkpoint_and_per_sample_noise(tmp_path, tiny_i2i, monkeypatch):
    export, images = str(tiny_i2i / "ema.safetensors"), [str(tiny_i2i / "ref0.png"), str(tiny_i2i / "ref1.png")]
    cpu = torch.device("cpu")
    _, cond_fn = sample.interpolation_conditions(SimpleNamespace(images=images, frames=3),
                                                 sample.load_generator(export, cpu)[1], None, cpu)
    y = cond_fn([0, 1, 2])["y"][:, 0]
    torch.testing.assert_close(y[1], (y[0] + y[2]) / 2)  # the middle frame mixes the two features
    rows_seen, noise_seen, generate, draw = [], [], sample.generate, sample.draw_samples
    monkeypatch.setattr(sample, "generate", lambda *args: rows_seen.extend(args[5]) or generate(*args))
    monkeypatch.setattr(sample, "draw_samples", lambda *args, **kw: noise_seen.extend(args[4]) or draw(*args, **kw))
    common = ["interpolate", "--ckpt", export, "--images", *images, "--frames", "3", "--steps", "2", "--method", "ddpm"]
    sample.main(common + ["--num-samples", "6", "--batch-size", "4", "--out", str(tmp_path / "many")])
    assert rows_seen == [0, 1, 2, 0, 1, 2] and noise_seen == [0, 0, 0, 1, 1, 1]  # an interpolation shares its noise
    sample.main(common + ["--out", str(tmp_path / "few")])
    many, few = pngs(tmp_path / "many", 6), pngs(tmp_path / "few", 3)
    assert few.shape == (3, 16, 16, 3) and np.abs(many[:3] - few).max() <= 1  # the first one: as without --num-samples
    assert np.abs(many[3:] - many[:3]).max() > 10  # the second one has noise of its own
    # The official I2I file: a plain "state_dict" of DINO's width on SD-VAE latents, of a size in dit.DiT_models.
    monkeypatch.setitem(dit.DiT_models, "DiT-T/2", partial(LumosDiT, depth=2, hidden_size=32, num_heads=2, patch_size=2))
    torch.manual_seed(0)
    model = LumosDiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, cond_dim=768)
    torch.save({"state_dict": {key: 0.02 * torch.randn_like(value) for key, value in model.state_dict().items()}},
               tmp_path / "Lumos_I2I.pth")
    vae, dino = bench.write_random_encoders(tmp_path, {**bench.SD_VAE_CONFIG, "block_out_channels": [8] * 4,
                                                       "layers_per_block": 1, "norm_num_groups": 4},
                                            {**bench.DINO_VITB16, "image_size": 32, "depth": 1})
    noise_image(64, 64, 0).save(tmp_path / "ref.png")
    sample.main(["i2i", "--ckpt", str(tmp_path / "Lumos_I2I.pth"), "--images", str(tmp_path / "ref.png"), "--per-image",
                 "1", "--steps", "2", "--method", "ddim", "--cfg-scale", "1", "--vae", vae, "--encoder", dino,
                 "--out", str(tmp_path / "out")])
    assert pngs(tmp_path / "out", 1).shape == (1, 32, 32, 3)  # 4 x 4 latents, 8x upsampled
    assert sorted(os.listdir(tmp_path / "out")) == ["000000.png", "grid.png"]
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))  # per-sample generators: noise without batch mates
    model_fn = lambda x, t: 0.1 * x  # noqa: E731  (an epsilon "model": the added noise is what matters)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    seeded = lambda i: torch.Generator().manual_seed(100 + i)  # noqa: E731
    for method, eta in [("ddpm", 0.0), ("ddim", 1.0)]:
        together = diffusion.sample(model_fn, noise, method, 4, eta=eta, generator=[seeded(i) for i in range(3)])
        for i in range(3):
            alone = diffusion.sample(model_fn, noise[i:i + 1], method, 4, eta=eta, generator=[seeded(i)])
            torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=0)
        assert_raises(ValueError, "2 generators for a batch of 3",
                      lambda: diffusion.sample(model_fn, noise, method, 4, eta=eta, generator=[seeded(0), seeded(1)]))


# Seeds are per global index, so the images do not depend on --batch-size (or the world size);
# float sums over another batch composition may still move a pixel across a rounding boundary
# (on any CPU), hence at most 1 of 255 levels; wrong noise moves pixels by far more than 10.
@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm++"])
def test_sample_images_do_not_depend_on_batch_size(tmp_path, tiny_i2i, method):
    common = ["i2i", "--ckpt", str(tiny_i2i / "ema.safetensors"), "--images", str(tiny_i2i / "ref0.png"),
              "--per-image", "3", "--method", method, "--steps", "3"]
    for batch_size in (1, 3):
        sample.main(common + ["--batch-size", str(batch_size), "--out", str(tmp_path / str(batch_size))])
    one, three = pngs(tmp_path / "1", 3), pngs(tmp_path / "3", 3)
    assert np.abs(one - three).max() <= 1
    assert np.abs(one[0] - one[1]).max() > 10 and np.abs(one[1] - one[2]).max() > 10  # one condition, other noise


def test_sample_py_redraws_the_training_grid_from_the_export(tmp_path, monkeypatch):
    """One sampling path (diffusion.draw_samples, image i from (seed, i)): sample.py, given the export
    and the grid's references, draws a 1-rank fp32 run's last grid exactly."""
    grids, sample_grid = [], train_i2i.sample_grid
    monkeypatch.setattr(train_i2i, "sample_grid", lambda *args: grids.append(sample_grid(*args)) or grids[-1])
    train_i2i.main(TINY_RUN + ["--steps", "2", "--sample-every", "2", "--out", str(tmp_path / "run")])
    references = train_i2i.held_out_items(data.ShapesDataset(64, 16, 0), 16, 0, 4)
    for k, item in enumerate(references):
        Image.fromarray(sample.to_uint8(item["image"][None])[0]).save(tmp_path / f"ref{k}.png")
    sample.main(["i2i", "--ckpt", str(tmp_path / "run" / "ema.safetensors"), "--per-image", "1", "--method", "ddim",
                 "--steps", "2", "--cfg-scale", "1", "--out", str(tmp_path / "redrawn"),
                 "--images", *[str(tmp_path / f"ref{k}.png") for k in range(4)]])
    assert np.array_equal(pngs(tmp_path / "redrawn", 4), sample.to_uint8(grids[-1]))


@pytest.mark.slow
def test_many_samples_under_torchrun_no_overlap_no_gaps_restart_safe(tmp_path, tiny_i2i):
    out = tmp_path / "many"
    command = ["sample.py", "i2i", "--ckpt", tiny_i2i / "ema.safetensors", "--images", tiny_i2i / "ref0.png",
               tiny_i2i / "ref1.png", "--num-samples", "7", "--steps", "2", "--batch-size", "2", "--out", out]
    assert torchrun(*command).returncode == 0
    first = np.load(str(out) + ".npz")["arr_0"]
    assert first.shape == (7, 16, 16, 3) and first.dtype == np.uint8
    assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(7)]
    kept = os.path.getmtime(out / "000000.png")
    for gap in ("000003.png", "000006.png"):
        os.remove(out / gap)
    assert torchrun(*command).returncode == 0
    assert os.path.getmtime(out / "000000.png") == kept  # existing samples are not redone
    np.testing.assert_array_equal(np.load(str(out) + ".npz")["arr_0"], first)
    sample.main([str(arg) for arg in command[1:-4]] + ["--batch-size", "3", "--out", str(tmp_path / "one")])
    single = np.load(str(tmp_path / "one") + ".npz")["arr_0"]  # one rank, another batch size
    assert np.abs(single.astype(int) - first.astype(int)).max() <= 1


@pytest.mark.slow
def test_sample_the_official_t2i_file_from_the_hub_cache_snapped_to_a_bucket(tmp_path, monkeypatch, capsys):
    """sample.py t2i --ckpt OWNER/REPO/Lumos_T2I.pth as documented (bf16, guidance, a requested size),
    on a tiny multi-scale model at 256 px in the Hub cache's layout, a tiny T5 folder and a tiny VAE."""
    monkeypatch.setitem(dit.DiT_models, "DiT-T/2", partial(LumosDiT, depth=1, hidden_size=48, num_heads=4, patch_size=2))
    torch.manual_seed(0)
    released = LumosDiT(input_size=32, depth=1, num_heads=4, cond_dim=32, cond_tokens=120, **MULTI_SCALE)
    snapshot = tmp_path / "hub" / "models--Xiaomabufei--lumos" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("ab" * 20)
    torch.save({key: 0.05 * torch.randn_like(value) for key, value in released.state_dict().items()},
               snapshot / "Lumos_T2I.pth")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t5 = tmp_path / "t5"
    transformers.T5EncoderModel(transformers.T5Config(  # the tokenizer's 300 pieces and 100 extra ids
        vocab_size=400, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0)).save_pretrained(t5)
    _train_sentencepiece(t5)
    vae, _ = bench.write_random_encoders(tmp_path, {**bench.SD_VAE_CONFIG, "block_out_channels": [8] * 4,
                                                    "layers_per_block": 1, "norm_num_groups": 4},
                                         {**bench.DINO_VITB16, "image_size": 32, "depth": 1})
    encoders_made, conditions, draw = [], [], sample.draw_samples
    make_encoder = sample.text_encoder_from_metadata
    monkeypatch.setattr(sample, "text_encoder_from_metadata",
                        lambda *args: encoders_made.append(weakref.ref(encoder := make_encoder(*args))) or encoder)
    monkeypatch.setattr(sample, "draw_samples", lambda *args, **kw: conditions.append((args[2], args[3])) or
                        encoders_made[0]() is None and draw(*args, **kw))  # the text encoder is gone by now
    argv = ["t2i", "--ckpt", "Xiaomabufei/lumos/Lumos_T2I.pth", "--prompts", "a red chair", "ka to",
            "--per-image", "1", "--height", "256", "--width", "192", "--steps", "2", "--precision", "bf16",
            "--vae", vae, "--encoder", str(t5), "--batch-size", "2", "--out", str(tmp_path / "out")]
    sample.main(argv)
    assert "256 x 192 px: the bucket 1.29, 288 x 224 px" in capsys.readouterr().out
    (cond, shape), = conditions
    assert shape == (4, 36, 28) and cond["img_hw"].tolist() == [[288.0, 224.0]] * 2
    assert cond["aspect_ratio"].tolist() == [[1.2899999618530273]] * 2 and cond["y"].shape[::2] == (2, 32)
    assert pngs(tmp_path / "out", 2).shape == (2, 288, 224, 3)
    model, info = sample.load_generator("Xiaomabufei/lumos/Lumos_T2I.pth", torch.device("cpu"))
    assert (info["task"], info["encoder"], info["vae"], info["image_size"], model.lewei_scale) == \
        ("t2i", "DeepFloyd/t5-v1_1-xxl", "stabilityai/sd-vae-ft-mse", 256, 0.5)
    with pytest.raises(SystemExit):  # not in the cache, offline: one line naming the repo and the file
        sample.main([*argv[:2], "Xiaomabufei/lumos/Lumos_I2I.pth", *argv[3:]])
    assert "Xiaomabufei/lumos/Lumos_I2I.pth: no such local file, nor a file of the Hub repo" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_t2i_measures_the_forward_and_the_sample_in_fresh_processes(tmp_path):
    command = [sys.executable, os.path.join(REPO, "bench.py"), "t2i", "--model", "DiT-S/8", "--forward-size", "128",
               "--sample-size", "64", "--steps", "2", "--vae-widths", "8", "8", "8", "8", "--precisions", "bf16", "fp32"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()[-6:]
    assert [line.split()[:4] for line in table] == [["DiT", "forward", "128", "px"]] * 2 + [["sample,", "2", "steps", "+"]] * 2 \
        + [["VAE", "decode", "128", "px"]] * 2
    assert all(0 < float(line.split()[-1]) < 8 for line in table)  # peak RSS, GiB


# A bad checkpoint or image file is one line and exit status 2; train_t2i.py --init reads checkpoints alike.
BAD_FILES = {"truncated.safetensors": "not a readable safetensors file", "not_a_zip.pth": "not a torch.save checkpoint",
             "payload.pth": "GLOBAL posix.system", "not_a_dit.pth": "not a LumosDiT state dict (no x_embedder.proj.weight)",
             "corrupt.png": "not an image PIL can read", "not_an_image.jpg": "not an image PIL can read"}


@pytest.mark.parametrize("script, kind", [*((sample, kind) for kind in BAD_FILES),
                                          *((train_t2i, kind) for kind in list(BAD_FILES)[:3])])
def test_a_bad_checkpoint_or_image_is_one_line_and_exit_status_2(tmp_path, tiny_i2i, capsys, script, kind):
    blob, path, marker = (tiny_i2i / "ema.safetensors").read_bytes(), tmp_path / kind, tmp_path / "payload_ran"
    payload = type("Payload", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})()  # runs if unpickled
    contents = {"truncated.safetensors": blob[: len(blob) // 2], "not_a_zip.pth": b"not a torch.save zip file\n" * 20,
                "payload.pth": {"x_embedder.proj.weight": torch.zeros(1), "hook": payload},
                "not_a_dit.pth": {"csize_embedder.mlp.0.weight": torch.zeros(2, 2)},
                "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, "not_an_image.jpg": b"plain text\n"}
    path.write_bytes(contents[kind]) if isinstance(contents[kind], bytes) else torch.save(contents[kind], path)
    ckpt, image = (path, tiny_i2i / "ref0.png") if kind.endswith(("pth", "safetensors")) else (tiny_i2i / "ema.safetensors", path)
    argv = (["i2i", "--ckpt", ckpt, "--images", image] if script is sample else ["--init", ckpt]) + ["--out", tmp_path / "out"]
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{script.__name__}.py: error: "), err
    assert str(path) in err and BAD_FILES[kind] in err and not marker.exists()  # the payload was refused, never run


# ======================================== t2i ====================================================

def t2i_args(*argv):
    return train_t2i.add_t2i_args(argparse.ArgumentParser()).parse_args([str(arg) for arg in argv])


def write_captioned_folder(root, captions):
    """16x16 images 000.png, ...; caption None: no .txt, otherwise a sidecar .txt with that text."""
    images = {f"{i:03d}.png": encode(Image.new("RGB", (16, 16), (20 * i,) * 3), "PNG") for i in range(len(captions))}
    return write_files(root, images | {f"{i:03d}.txt": c.encode() for i, c in enumerate(captions) if c is not None})


def test_captions_the_text_cache_and_a_scratch_run_from_it(tmp_path, monkeypatch):
    captions = ["a red circle", "a blue star", "a red circle", None, "a large green square at the top left",
                "a blue star", "a red circle on a white background"]
    folder = write_captioned_folder(tmp_path / "pairs", captions)
    encoded, token_features = [], encoders.TextEncoder.token_features
    monkeypatch.setattr(encoders.TextEncoder, "token_features", lambda self, texts: encoded.extend(texts) or token_features(self, texts))
    cache_dir = tmp_path / "cache"
    cli = ["cache-text", "--data", str(folder), "--out", str(cache_dir), "--image-size", "16",
           "--num-samples", "4", "--shard-size", "2", "--batch-size", "3"]
    train_t2i.main(cli)
    distinct = sorted({c for c in captions if c})
    assert sorted(encoded) == distinct  # each distinct caption encoded exactly once
    cache = train_t2i.TextFeatureCache(str(cache_dir))
    assert cache.info["num_captions"] == 4 and len(os.listdir(cache_dir)) == 1 + 2
    y_online, mask_online = encoders.load_text_encoder(encoders.RANDOM_T5, torch.device("cpu"), vocabulary=data.shapes_vocabulary())(distinct)
    y_cached, mask_cached = cache(distinct)
    assert torch.equal(mask_cached, mask_online) and mask_online.sum(1).tolist() == [4, 9, 4, 8]  # words + </s>
    # The same encoder on other batch compositions: fp32 sums in another order, ~1e-7 relative.
    assert (y_cached - y_online).abs().max() <= 1e-5 * y_online.abs().max() and not y_cached[~mask_cached].any()
    encoded.clear()
    train_t2i.main(cli)  # restart: every shard is there
    assert encoded == []
    os.remove(train_t2i.text_shard_path(str(cache_dir), 1))
    assert_raises(FileNotFoundError, "incomplete: 1 of 2 shards missing", lambda: train_t2i.TextFeatureCache(str(cache_dir)))
    train_t2i.main(cli)
    assert sorted(encoded) == sorted(list(dict.fromkeys(c for c in captions if c))[2:])  # shard 1: 3rd and 4th captions
    assert_raises(SystemExit, "^2$", lambda: train_t2i.main(cli + ["--shard-size", "3"]))  # other settings, started cache
    run = [  # a scratch run from the cache counts the uncaptioned images its batches passed over
        "--init", "scratch", *TINY_SIZE, *TINY_LOOP, "--data", folder, "--text-cache", cache_dir, "--steps", "2"]
    train_t2i.main([str(arg) for arg in run] + ["--out", str(tmp_path / "t2i")])
    logged = read_metrics(tmp_path / "t2i")
    loader = data.make_loader(train_t2i.t2i_task(t2i_args(*run), None, None, torch.device("cpu")).dataset, 8, 8, seed=0)
    skipped = sum(len(batch["skipped"]) for batch in itertools.islice(loader, 2))  # what the loop's 2 batches met
    assert logged["step"] == [1, 2] and logged["skipped_files"][-1] == skipped > 0
    info = dit.export_metadata(str(tmp_path / "t2i" / "ema.safetensors"))["lumos"]
    assert info["init"] == "scratch" and info["config"]["cond_dim"] == 64
    folder = write_captioned_folder(tmp_path / "uncaptioned", ["a red circle", None, "  \n", "a blue star", None])
    dataset = train_t2i.SkipUncaptioned(data.open_dataset(str(folder), 16))
    first, second, last = dataset[0], dataset[1], dataset[4]
    assert (first["caption"], first["skipped"]) == ("a red circle", [])
    assert second["caption"] == "a blue star" and second["index"] == 1
    assert second["skipped"] == [f"{folder}/001.png (no caption)", f"{folder}/002.png (no caption)"]
    assert last["caption"] == "a red circle" and last["skipped"] == [f"{folder}/004.png (no caption)"]
    first_two = train_t2i.FirstCaptioned(data.open_dataset(str(folder), 16), 2)
    assert [item["caption"] for item in first_two] == ["a red circle", "a blue star"]
    assert first_two.skipped == [f"{folder}/001.png", f"{folder}/002.png"]
    assert_raises(ValueError, "--n-captions 3: .* has only 2 captioned images",
                  lambda: train_t2i.FirstCaptioned(data.open_dataset(str(folder), 16), 3))
    bare = write_captioned_folder(tmp_path / "bare", [None, ""])
    assert_raises(RuntimeError, "has a caption", lambda: train_t2i.SkipUncaptioned(data.open_dataset(str(bare), 16))[0])
    png = encode(Image.new("RGB", (16, 16)), "PNG")  # tar shards: an empty json caption is no caption
    shards = data.open_dataset(str(write_tar(tmp_path / "shard.tar", {
        "a.png": png, "a.json": json.dumps({"caption": ""}).encode(), "b.png": png,
        "b.json": json.dumps({"text": "a green cross"}).encode(), "c.png": png})), 16)
    assert [train_t2i.read_caption(shards, j) for j in range(3)] == ["", "a green cross", ""]
    item = train_t2i.SkipUncaptioned(shards)[0]
    assert item["caption"] == "a green cross" and item["skipped"] == [f"{tmp_path}/shard.tar:a.png (no caption)"]
    cache_dir = str(tmp_path / "shapes_cache")  # a task on this cache gets the online conditions
    train_t2i.main(["cache-text", "--data", "shapes:40", "--out", cache_dir, "--image-size", "16", "--num-samples", "4"])
    common = ["--init", "scratch", *TINY_SIZE, "--image-size", "16", "--num-samples", "4"]
    task = lambda *extra: train_t2i.t2i_task(t2i_args(*common, "--data", "shapes:40", *extra), None, None, torch.device("cpu"))  # noqa: E731
    online, cached = task(), task("--text-cache", cache_dir)
    batch = data.collate_samples([online.dataset[i] for i in (0, 5, 17)] + online.eval_items)
    expected, got = online.condition(batch, None), cached.condition(batch, None)
    assert torch.equal(got["mask"], expected["mask"]) and got["y"].shape == (7, expected["mask"].shape[1], 64)
    assert (got["y"] - expected["y"]).abs().max() <= 1e-5 * expected["y"].abs().max()  # as above
    assert_raises(ValueError, "was made with --t5 random-t5 --data shapes:40 --seed 0",
                  lambda: task("--data", "shapes:41", "--text-cache", cache_dir))
    assert_raises(ValueError, "lacks 2 caption", lambda: task("--num-samples", "6", "--text-cache", cache_dir))
    assert online.metadata["clean_captions"]  # the export tells sample.py to clean prompts as in training
    info = pathlib.Path(cache_dir, "text_cache.json")  # as a cache written before prompts were cleaned:
    info.write_text(json.dumps({k: v for k, v in json.loads(info.read_text()).items() if k != "clean_captions"}))
    assert_raises(ValueError, "holds features of uncleaned captions", lambda: task("--text-cache", cache_dir))
    description = encoders.random_t5_description(data.shapes_vocabulary())
    tokenizer = encoders.random_text_encoder(description, torch.device("cpu")).tokenizer
    captions = [data.shapes_caption(data.sample_shape_attrs(0, i)) for i in range(300)]
    assert any(" an " in c for c in captions)  # every word of every caption is in the random T5's vocabulary
    for caption in captions:
        ids = tokenizer.encode(caption)
        assert tokenizer.unk_id not in ids and len(ids) == len(caption.split()) + 1, caption
    assert tokenizer.encode("a zebra")[1] == tokenizer.unk_id


@pytest.mark.slow
def test_t2i_init_finetune_from_the_i2i_export_then_sample_and_coco_fid30k(tiny_i2i, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t2i"
    train_t2i.main(["--init", str(tiny_i2i / "ema.safetensors"), *TINY_LOOP, "--data", "shapes:64", "--steps", "2",
                    "--sample-every", "2", "--out", str(out)])
    assert read_metrics(out)["step"] == [1, 2] and read_metrics(out)["nonfinite_steps"][-1] == 0
    accuracy = read_metrics(out, "caption_all")  # the grid's held-out captions, read back by the detector
    assert accuracy["step"] == [2] and 0 <= accuracy["caption_color"][0] <= 1 and "attribute_distance" in accuracy
    model, info = sample.load_generator(str(out / "ema.safetensors"), torch.device("cpu"))
    assert (info["task"], info["encoder"], info["init"], model.cond_dim, model.cond_tokens) == \
        ("t2i", "random-t5", str(tiny_i2i / "ema.safetensors"), 64, 120)
    prompts = ["a red circle", "a small blue star at the top left on a green background"]
    condition = encoders.text_encoder_from_metadata(info, torch.device("cpu"))(prompts)
    y, mask = encoders.load_text_encoder("random-t5", torch.device("cpu"), vocabulary=data.shapes_vocabulary())(prompts)
    assert torch.equal(condition[1], mask) and torch.equal(condition[0], y)
    sample.main(["t2i", "--ckpt", str(out / "ema.safetensors"), "--prompts", *prompts, "--per-image", "2",
                 "--steps", "2", "--cfg-scale", "3", "--out", str(tmp_path / "samples")])
    assert sorted(os.listdir(tmp_path / "samples")) == [f"{i:06d}.png" for i in range(4)] + ["grid.png"]
    with pytest.raises(SystemExit):  # an I2I export has no text encoder
        sample.main(["t2i", "--ckpt", str(tiny_i2i / "ema.safetensors"), "--prompts", "x", "--out", str(tmp_path / "x")])
    images, coco = tmp_path / "val2014", {"images": [], "annotations": []}  # COCO FID-30K on a tiny fake COCO
    images.mkdir()
    for i in range(8):
        name = f"COCO_val2014_{i:012d}.jpg"
        noise_image(20, 24 + i, i).save(images / name)
        coco["images"].append({"id": 100 + i, "file_name": name})
        coco["annotations"] += [{"image_id": 100 + i, "caption": f" a  {colour} thing\n"} for colour in ("red", "blue")]
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    annotations = str(tmp_path / "captions_val2014.json")
    pairs = evaluate.coco_captions(annotations, 5, seed=1)
    assert pairs == evaluate.coco_captions(annotations, 5, seed=1) != evaluate.coco_captions(annotations, 5, seed=2)
    assert len({name for name, _ in pairs}) == 5 and {caption for _, caption in pairs} <= {"a red thing", "a blue thing"}
    assert_raises(ValueError, "fewer than the 9", lambda: evaluate.coco_captions(annotations, 9))
    torch.save(random_fid_inception()[1], tmp_path / "inception.pth")
    result = evaluate.main(["coco-fid", "--annotations", annotations, "--images", str(images),
                            "--ckpt", str(out / "ema.safetensors"), "--num", "5", "--seed", "1", "--size", "16",
                            "--out", str(tmp_path / "fid"), "--sample-args=--steps 2 --method ddim",
                            "--inception", str(tmp_path / "inception.pth")])
    assert result["images"] == 5 and np.load(tmp_path / "fid" / "samples.npz")["arr_0"].shape == (5, 16, 16, 3)
    assert (tmp_path / "fid" / "captions.txt").read_text().splitlines() == [caption for _, caption in pairs]
    args = t2i_args("--init", tiny_i2i / "ema.safetensors")  # what the T2I model takes from the I2I export
    state, info = train_t2i.read_init(args)
    assert (args.model, args.image_size, args.vae, args.encoder) == ("DiT-S/4", 16, None, encoders.RANDOM_T5)
    torch.manual_seed(0)
    weights = train_t2i.t2i_model(args, state, info, text_width=64).state_dict()
    torch.manual_seed(0)
    fresh = LumosDiT(**{**info["config"], "cond_dim": 64, "cond_tokens": 120}).state_dict()
    new = train_i2i.CONDITION_KEYS
    assert sorted(k for k in weights if k not in new) == sorted(k for k in state if k not in new)
    for key in weights:
        assert torch.equal(weights[key], fresh[key] if key in new else state[key]), key
    assert weights["y_embedder.y_embedding"].shape == (120, 64) and state["y_embedder.y_embedding"].shape[1] != 64
    # The new condition layers start as a fresh model's: N(0, 0.02) weights, zero biases, N(0, 1/64) tokens.
    assert weights["y_embedder.y_proj.fc1.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert not weights["y_embedder.y_proj.fc1.bias"].any() and not weights["y_embedder.y_proj.fc2.bias"].any()
    assert weights["y_embedder.y_embedding"].std().item() == pytest.approx(64 ** -0.5, rel=0.1)
    assert "new (T5 condition of width 64" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    for argv in ([], ["--init", "scratch", "--encoder", "facebook/dino-vitb16"]):
        assert_raises(SystemExit, "^2$", lambda: train_t2i.main(argv))
    errors = capsys.readouterr().err
    assert "no I2I prior at runs/i2i/ema.safetensors: make it with `python train_i2i.py`" in errors
    assert "pass the text encoder as --t5" in errors


# ======================================== nvs ====================================================

TINY_I2I = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, cond_dim=16)
NVS_NEW, NVS_WIDENED = ("pose_mixer.weight", "pose_mixer.bias"), ("x_embedder.proj.weight",)


def random_i2i(seed=0):
    """A tiny I2I model with every weight random, so that no zero-initialised layer hides a difference."""
    torch.manual_seed(seed)
    model = LumosDiT(**TINY_I2I)
    torch.nn.utils.vector_to_parameters(0.2 * torch.randn(sum(p.numel() for p in model.parameters())), model.parameters())
    return model.eval()


def nvs_from(i2i, size=8):
    nvs = LumosDiT(**train_nvs.nvs_config(i2i.config, size))
    return nvs.eval(), train_i2i.transfer_weights(nvs, i2i.state_dict(), new_keys=NVS_NEW, widened_keys=NVS_WIDENED)


def zero123_get_T(target_RT, cond_RT):
    """Zero-1-to-3's relative pose, written out independently from its published formula."""
    def spherical(RT):
        x, y, z = -RT[:3, :3].T @ RT[:, -1]
        return np.arctan2(np.sqrt(x * x + y * y), z), np.arctan2(y, x), np.sqrt(x * x + y * y + z * z)
    (theta_c, azimuth_c, z_c), (theta_t, azimuth_t, z_t) = spherical(cond_RT), spherical(target_RT)
    d_azimuth = (azimuth_t - azimuth_c) % (2 * math.pi)
    return np.array([theta_t - theta_c, math.sin(d_azimuth), math.cos(d_azimuth), z_t - z_c])


def test_i2i_weights_read_from_any_source_carried_widened_and_added_or_rejected(tmp_path, monkeypatch):
    i2i = random_i2i()
    (nvs, report), saved = nvs_from(i2i), i2i.state_dict()
    loaded = nvs.state_dict()
    assert report["widened"] == list(NVS_WIDENED) and report["new"] == list(NVS_NEW)
    assert sorted(report["carried"]) == sorted(k for k in saved if k != "x_embedder.proj.weight")
    for key in report["carried"]:
        assert torch.equal(loaded[key], saved[key]), key
    patch = loaded["x_embedder.proj.weight"]
    assert patch.shape == (32, 6, 2, 2) and torch.equal(patch[:, :3], saved["x_embedder.proj.weight"]) and not patch[:, 3:].any()
    assert torch.equal(loaded["pose_mixer.weight"], torch.cat([torch.eye(16), torch.zeros(16, 4)], dim=1))
    assert not loaded["pose_mixer.bias"].any()
    np.testing.assert_allclose(nvs_from(i2i, 16)[0].pos_embed[0].numpy(), dit.get_2d_sincos_pos_embed(32, 8, base_size=8),
                               atol=1e-6)  # another size: recomputed, not carried
    for change, message in [({"extra.weight": torch.zeros(1)}, "1 unexpected (extra.weight)"),
                            ({"blocks.1.mlp.fc1.weight": None}, "1 missing (blocks.1.mlp.fc1.weight)"),
                            ({"blocks.0.attn.qkv.weight": torch.zeros(96, 8)}, "wrong-shape (blocks.0.attn.qkv.weight (96, 8)"),
                            ({"x_embedder.proj.weight": torch.zeros(32, 7, 2, 2)}, "wrong-shape (x_embedder.proj.weight")]:
        state = {k: v for k, v in {**saved, **change}.items() if v is not None}
        assert_raises(ValueError, r"my.pth: does not fit LumosDiT: .*" + re.escape(message),
                      lambda: train_i2i.transfer_weights(nvs, state, NVS_NEW, NVS_WIDENED, source="my.pth"))
    model, ema = random_i2i(seed=0), random_i2i(seed=1)  # read from an export, a checkpoint, a run folder, a .pth
    args = types.SimpleNamespace(out=str(tmp_path), keep_last=2)
    common = {"model": "DiT-T/2", "image_size": 8, "vae": None, "encoder": "random-vit"}
    checkpoints = train_i2i.Checkpointer(args, 0)  # a checkpoint at step 5 and its export
    checkpoints.save(model, ema, torch.optim.AdamW(model.parameters()), torch.tensor([5, 0, 0, 0]),
                     {**common, "prediction": "v", "model_config": model.config},
                     {"lumos": {**common, "task": "i2i", "config": ema.config, "prediction": "epsilon"}})
    checkpoints.close()
    torch.save({"state_dict": ema.state_dict()}, tmp_path / "Lumos_I2I.pth")
    # The official release is DiT-XL/2; register a tiny size so that its sizes can be read off a small file.
    monkeypatch.setitem(dit.DiT_models, "DiT-T/2", partial(LumosDiT, depth=2, hidden_size=32, num_heads=2, patch_size=2))
    cases = [(str(tmp_path / "ema.safetensors"), "ema", ema, "epsilon"),
             (str(tmp_path), "ema", ema, "v"),  # a run folder: its latest checkpoint
             (dit.latest_checkpoint(tmp_path), "model", model, "v"),
             (str(tmp_path / "Lumos_I2I.pth"), "ema", ema, None)]
    for spec, entry, source, prediction in cases:
        state, info = dit.read_weights(spec, entry)
        assert state.keys() == source.state_dict().keys(), spec
        assert all(torch.equal(state[key], value) for key, value in source.state_dict().items()), spec
        assert (info["config"], info["model"], info["image_size"], info["prediction"]) == \
            (source.config, "DiT-T/2", 8, prediction), spec
    assert dit.read_weights(cases[0][0])[1]["encoder"] == "random-vit"
    (bad := tmp_path / "bad").mkdir()
    read = lambda name: dit.read_weights(str(bad / name))  # noqa: E731
    assert_raises(FileNotFoundError, "missing.safetensors: no such file", lambda: read("missing.safetensors"))
    assert_raises(FileNotFoundError, "neither a checkpoint", lambda: read(""))
    assert_raises(ValueError, "expected an ema.safetensors export, a checkpoint or run folder", lambda: read("weights.txt"))
    torch.save({"model": {"something": torch.zeros(1)}}, bad / "other.pth")
    assert_raises(ValueError, "not a LumosDiT state dict", lambda: read("other.pth"))
    monkeypatch.delitem(dit.DiT_models, "DiT-T/2")
    torch.save(random_i2i().state_dict(), bad / "odd_size.pth")
    assert_raises(ValueError, "depth 2, width 32, patch 2 is none of dit.DiT_models", lambda: read("odd_size.pth"))
    nvs, _ = nvs_from(random_i2i())
    train_i2i.write_export(str(bad), nvs.state_dict(), {"lumos": {"task": "nvs", "config": nvs.config}})
    args = train_nvs.add_nvs_args(argparse.ArgumentParser()).parse_args(["--init", str(bad / "ema.safetensors")])
    assert_raises(ValueError, "a 'nvs' model; start from an I2I or T2I model", lambda: train_nvs.read_init(args))


def write_objects(root, count, image_size=16):
    train_nvs.save_zero123_layout(train_nvs.MultiViewShapes(count, image_size, seed=0), str(root), count)


def test_relative_pose_renderer_multiview_items_and_the_zero123_folder_with_bad_pose_files(tmp_path):
    open_folder = partial(train_nvs.open_multiview, str(tmp_path), 16)
    assert_raises(FileNotFoundError, "no such folder", lambda: train_nvs.open_multiview(str(tmp_path / "missing"), 16))
    assert_raises(FileNotFoundError, "no object folder with two or more NNN.png views", open_folder)
    write_objects(tmp_path, 2)
    (tmp_path / "000001" / "notes.txt").write_text("not a view")
    procedural, folder = train_nvs.MultiViewShapes(2, 16, seed=0), train_nvs.Zero123Folder(str(tmp_path), 16, seed=0)
    assert len(folder) == 24 and "2 objects, 24 views" in repr(folder)
    camera = lambda name: np.load(tmp_path / name.replace(".png", ".npy")).astype(np.float64)  # noqa: E731
    for i in (0, 5, 17):
        from_files = folder[i]
        target, source = from_files["name"].split("<-")
        assert target == f"{i // 12:06d}/{i % 12:03d}.png" and source.startswith(f"{i // 12:06d}/")
        assert torch.equal(from_files["image"], procedural[i]["image"]) and from_files["skipped"] == []
        torch.testing.assert_close(from_files["pose"], data.relative_pose(camera(source), camera(target)))
    assert_raises(ValueError, "2 objects leave none to train on after --held-out-objects 2",
                  lambda: open_folder(held_out_objects=2))
    train_set, held_out = open_folder(held_out_objects=1)
    assert len(train_set) == len(held_out) == 12 and held_out[0]["name"].startswith("000001/")
    # Bad pose files: each skipped pair names its file and reason, and is replaced by the next good pair.
    bad = {"000000/003.npy": "missing pose file", "000000/004.npy": "unreadable pose file",
           "000000/005.npy": "expected a finite 3x4 world-to-camera matrix, got float64 (4, 4)",
           "000001/000.npy": "expected a finite 3x4 world-to-camera matrix, got float32 (3, 4)"}
    os.remove(tmp_path / "000000/003.npy")
    (tmp_path / "000000/004.npy").write_bytes(b"garbage, not numpy")
    np.save(tmp_path / "000000/005.npy", np.eye(4))
    np.save(tmp_path / "000001/000.npy", np.full((3, 4), np.nan, dtype=np.float32))
    items = [folder[i] for i in range(len(folder))]
    reported = [message for item in items for message in item["skipped"]]
    for name, reason in bad.items():
        assert any(m.startswith(str(tmp_path / name)) and reason in m for m in reported), name
    for item in items:
        assert not any(view.replace(".png", ".npy") in bad for view in item["name"].split("<-"))
    assert items[3]["index"] == 3 and items[3]["skipped"][0] == f"{tmp_path / '000000/003.npy'}: missing pose file"
    for path in tmp_path.glob("*/*.npy"):
        path.unlink()
    assert_raises(RuntimeError, "no readable view pair .* missing pose file", lambda: train_set[0])
    obj = train_nvs.sample_object(0, 3)
    views = [train_nvs.render_view(obj, camera, 32) for camera in obj["cameras"]]
    assert views[0].dtype == np.uint8 and views[0].shape == (32, 32, 3)
    assert (views[0][0, 0] == 255).all() and (views[0] != 255).any(axis=-1).mean() > 0.1  # white background, an object
    for a, b in itertools.combinations(range(len(views)), 2):
        assert np.abs(views[a].astype(int) - views[b]).mean() > 1, (a, b)
    assert {train_nvs.sample_object(0, k)["shape"] for k in range(40)} == set(train_nvs.PRIMITIVES)
    assert not np.array_equal(train_nvs.sample_object(1, 3)["cameras"], obj["cameras"])
    train_set, held_out = train_nvs.open_multiview("multiview:5", 16, seed=2, held_out_objects=2)
    assert len(train_set) == 60 and len(held_out) == 24
    item = train_set[13]
    assert item["image"].shape == item["source"].shape == (3, 16, 16) and item["pose"].shape == (4,)
    assert (item["index"], item["caption"], item["skipped"]) == (13, "", [])
    obj, source = train_nvs.sample_object(2, 1), int(item["name"].split("<-")[1])
    assert item["name"].startswith("multiview/000001/001<-") and source != 1
    torch.testing.assert_close(item["pose"], data.relative_pose(obj["cameras"][source], obj["cameras"][1]))
    expected = torch.from_numpy(train_nvs.render_view(obj, obj["cameras"][1], 16)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["image"], expected)
    assert held_out[0]["name"].startswith("multiview/000005/")  # the objects after the trained ones
    assert torch.equal(train_nvs.MultiViewShapes(7, 16, seed=2)[60]["image"], held_out[0]["image"])
    rng, rad = np.random.default_rng(0), math.radians  # relative pose: Zero-1-to-3's formula
    cameras = [np.concatenate([train_nvs.random_rotation(rng), rng.normal(size=(3, 1)) * 2], axis=1) for _ in range(40)]
    for source, target in zip(cameras[::2], cameras[1::2]):
        np.testing.assert_allclose(data.relative_pose(source, target).numpy(), zero123_get_T(target, source),
                                   rtol=1e-6, atol=1e-6)
    for camera in cameras[:5] + [train_nvs.orbit_camera(0.3, 2.0, 1.8)]:
        assert data.relative_pose(camera, camera).tolist() == [0.0, 0.0, 1.0, 0.0]
    # Polar 80 -> 50 degrees and 20 degrees further round: across azimuth 0, then across atan2's branch cut.
    expected = [rad(-30), math.sin(rad(20)), math.cos(rad(20)), 0.5]
    back = [-expected[0], -expected[1], expected[2], -expected[3]]
    for azimuths in ((350, 10), (170, 190)):
        source, target = (train_nvs.orbit_camera(rad(e), rad(a), r) for e, a, r in zip((10, 40), azimuths, (1.5, 2.0)))
        np.testing.assert_allclose(data.relative_pose(source, target).numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(data.relative_pose(target, source).numpy(), back, atol=1e-6)
    np.testing.assert_allclose(data.pose_vector(rad(-30), rad(-340), 0.5).numpy(), expected, atol=1e-6)
    opencv = [train_nvs.orbit_camera(0.2, 1.0, 1.7), train_nvs.orbit_camera(-0.4, 4.0, 2.1)]
    opengl = [np.diag([1.0, -1.0, -1.0]) @ camera for camera in opencv]  # y up, z backward
    torch.testing.assert_close(data.relative_pose(*opengl), data.relative_pose(*opencv))
    position = np.array([0.5, -1.2, 0.9])  # look_at: there, looking at the origin
    rotation = (camera := train_nvs.look_at(position))[:, :3]
    assert np.allclose(rotation @ rotation.T, np.eye(3), rtol=0, atol=1e-12) and np.linalg.det(rotation) == pytest.approx(1)
    np.testing.assert_allclose(data.camera_position(camera), position, atol=1e-12)
    np.testing.assert_allclose(camera[:, 3], [0, 0, np.linalg.norm(position)], atol=1e-12)  # origin: straight ahead
    assert (rotation @ [0, 0, 1.0])[1] < 0  # world up is image up (camera y points down)
    assert_raises(ValueError, "up axis", lambda: train_nvs.look_at([0, 0, 2.0]))


def test_nvs_from_a_t2i_prior_carries_the_blocks_and_makes_the_condition_embedder_new(tiny_i2i, tmp_path, capsys):
    train_t2i.main(["--init", str(tiny_i2i / "ema.safetensors"), *TINY_LOOP, "--data", "shapes:64", "--steps", "1",
                    "--out", str(tmp_path / "t2i")])
    t2i_export, nvs_args = str(tmp_path / "t2i" / "ema.safetensors"), [*TINY_LOOP, "--data", "multiview:4",
                                                                       "--held-out-objects", "1"]
    args = train_nvs.add_nvs_args(argparse.ArgumentParser()).parse_args(["--init", t2i_export, *nvs_args])
    state, info = train_nvs.read_init(args)  # the T2I's encoder is its T5: the image encoder is the default
    assert (info["task"], args.encoder, args.image_size, args.model) == ("t2i", "shapes-vit", 16, "DiT-S/4")
    capsys.readouterr()
    nvs = train_nvs.nvs_task(args, state, info, torch.device("cpu")).build_model()
    new = capsys.readouterr().out.split("\n  new (")[1]
    assert all(key in new for key in ("pose_mixer.weight", *train_i2i.CONDITION_KEYS))
    assert (nvs.cond_dim, nvs.cond_tokens, state["y_embedder.y_embedding"].shape) == (128, 1, (120, 64))
    carried = [key for key in state if key.startswith(("blocks.", "t_embedder.", "final_layer."))]
    assert len(carried) > 20 and all(torch.equal(nvs.state_dict()[key], state[key]) for key in carried)
    train_nvs.main(["--init", t2i_export, *nvs_args, "--steps", "1", "--out", str(tmp_path / "nvs")])
    assert read_metrics(tmp_path / "nvs")["step"] == [1]
    assert dit.export_metadata(str(tmp_path / "nvs" / "ema.safetensors"))["lumos"]["encoder"] == "shapes-vit"


@pytest.mark.slow
def test_experiments_tables_train_each_run_once_and_report_the_seeds(tmp_path, capsys):
    """README's two tables at tiny size, as documented: nvs-priors first (it trains the I2I prior and
    the T2I baseline it starts from), then t2i-data with two seeds, which reads those back."""
    import experiments
    out, tiny = str(tmp_path / "xp"), [*TINY_SIZE, *TINY_LOOP, "--steps", "2", "--sample-every", "2"]
    experiments.main(["nvs-priors", "--seeds", "0", "--captions", "640", "--out", out, "--", *tiny])
    results = experiments.read_results(out)
    assert set(results) == {"i2i", "t2i_scratch_all_seed0", "nvs_none_seed0", "nvs_t2i_seed0", "nvs_i2i_seed0"}
    init = lambda run: results[run]["command"][results[run]["command"].index("--init") + 1]
    assert init("nvs_t2i_seed0") == os.path.join(out, "t2i_scratch_all_seed0", "ema.safetensors")
    assert init("nvs_i2i_seed0") == os.path.join(out, "i2i", "ema.safetensors") and init("nvs_none_seed0") == "scratch"
    assert all(results[run]["step"] == 2 and 0 < results[run]["ssim"] < 1 for run in results if run.startswith("nvs"))
    grid = tmp_path / "xp" / "nvs_i2i_seed0" / "samples" / "step_0000002"  # its views, for LPIPS elsewhere
    scores = evaluate.main(["nvs", "--pred", f"{grid}.samples.npz", "--target", f"{grid}.references.npz"])
    assert abs(scores["psnr"] - results["nvs_i2i_seed0"]["psnr"]) < 0.1  # the same views, rounded to uint8
    capsys.readouterr()
    experiments.main(["t2i-data", "--seeds", "0", "1", "--captions", "640", "--out", out, "--", *tiny])
    trained = re.findall(r"^== (\S+):", capsys.readouterr().out, re.M)
    assert trained == ["t2i_prior_tenth_seed0", "t2i_prior_tenth_seed1", "t2i_scratch_all_seed1"]  # the rest read back
    results = experiments.read_results(out)
    prior = results["t2i_prior_tenth_seed1"]["command"]
    assert prior[prior.index("--n-captions") + 1] == "64" and "--n-captions" not in results["t2i_scratch_all_seed1"]["command"]
    table = (tmp_path / "xp" / "t2i-data.md").read_text().splitlines()
    assert table[0] == "| arm | seeds | " + " | ".join(experiments.CAPTION_METRICS) + " |" and len(table) == 4
    for row, arm in zip(table[2:], ("t2i_prior_tenth", "t2i_scratch_all")):
        values = [results[f"{arm}_seed{seed}"]["attribute_distance"] for seed in (0, 1)]
        assert row.split(" | ")[1] == "2"
        assert row.split(" | ")[-1] == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} |"
    experiments.main(["t2i-data", "--seeds", "0", "1", "--captions", "640", "--out", out, "--", *tiny])
    assert "==" not in capsys.readouterr().out  # all done: nothing retrained
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["t2i-data", "--out", out, "--", "--seed", "3"])
    assert exit_info.value.code == 2 and "--seed after -- is set by the table" in capsys.readouterr().err


@pytest.mark.slow
def test_experiments_conditions_then_repa_which_reads_the_cls_runs_back(tmp_path, capsys):
    """README's ablation tables at tiny size, as documented: conditions, then repa (one seed each: the
    mean and std over seeds are t2i-data's, tested above)."""
    import experiments
    out = str(tmp_path / "xp")
    tiny = [*TINY_SIZE, *TINY_LOOP, "--steps", "2", "--sample-every", "1", "--repa-block", "1"]  # a grid each step
    experiments.main(["conditions", "--seeds", "0", "--captions", "640", "--out", out, "--", *tiny])
    results = experiments.read_results(out)
    assert set(results) == {f"{kind}_{arm}_seed0" for arm in ("cls", "patch", "all") for kind in ("i2i", "t2i_from")}
    command = results["t2i_from_patch_seed0"]["command"]
    assert command[command.index("--init") + 1] == os.path.join(out, "i2i_patch_seed0", "ema.safetensors")
    assert [line["step"] for line in results["i2i_all_seed0"]["evaluations"]] == [1, 2]
    metrics, curves = (part.splitlines() for part in (tmp_path / "xp" / "conditions.md").read_text().split("\n\n"))
    assert [row.split(" | ")[0] for row in metrics[2:]] == ["| CLS (Lumos)", "| patch tokens", "| all tokens"]
    assert curves[0] == "| I2I object agreement at step | seeds | 1 | 2 |" and len(curves) == 5
    first_grid = results["i2i_patch_seed0"]["evaluations"][0]
    assert curves[3].split(" | ")[2] == f"{np.mean([first_grid[name] for name in experiments.OBJECT_AGREEMENT]):.3f}"
    capsys.readouterr()
    experiments.main(["repa", "--seeds", "0", "--captions", "640", "--out", out, "--", *tiny])
    assert re.findall(r"^== (\S+):", capsys.readouterr().out, re.M) == ["i2i_repa_seed0"]  # the CLS run: read back
    results = experiments.read_results(out)
    assert "--repa-weight" in results["i2i_repa_seed0"]["command"]
    row = (tmp_path / "xp" / "repa.md").read_text().split("\n\n")[1].splitlines()[2]
    target = experiments.object_agreement(results["i2i_cls_seed0"])
    evaluations = results["i2i_repa_seed0"]["evaluations"]
    reached = [e["step"] for e in evaluations if experiments.object_agreement(e) >= target]
    assert row.split(" | ")[:2] == ["| 0", f"{target:.3f}"] and row.split(" | ")[3] == (str(reached[0]) if reached else ">2")


def test_nvs_fine_tune_on_a_zero123_folder_then_sample_and_the_default_init(tmp_path, tiny_i2i, monkeypatch, capsys):
    """The I2I export on a folder with a missing pose file (the launch matrix: `multiview`, from scratch)."""
    i2i_export, out, views = str(tiny_i2i / "ema.safetensors"), tmp_path / "nvs", tmp_path / "views"
    write_objects(views, 3)
    os.remove(views / "000000" / "007.npy")
    train_nvs.main(["--init", i2i_export, *TINY_LOOP, "--data", str(views), "--held-out-objects", "1", "--steps", "3",
                    "--sample-every", "3", "--out", str(out)])
    train_set, _ = train_nvs.open_multiview(str(views), 16, seed=0, held_out_objects=1)
    loader = data.make_loader(train_set, 8, 8, seed=0)  # 24 items: every view of the 2 training objects
    skipped, logged = sum(len(batch["skipped"]) for batch in itertools.islice(loader, 3)), read_metrics(out)
    assert logged["step"] == [1, 2, 3] and logged["nonfinite_steps"][-1] == 0 and logged["skipped_files"][-1] == skipped > 0
    assert read_metrics(out, "psnr")["step"] == [3] and "ssim" in read_metrics(out, "psnr")  # held-out PSNR, SSIM
    assert (out / "samples" / "step_0000003.png").exists()
    info = dit.export_metadata(str(out / "ema.safetensors"))
    assert (info["lumos"]["task"], info["lumos"]["init"], info["lumos"]["encoder"], info["step"]) == \
        ("nvs", i2i_export, "shapes-vit", 3)
    sample.main(["nvs", "--ckpt", str(out / "ema.safetensors"), "--images", str(tiny_i2i / "ref0.png"),
                 "--poses", "0,30,0", "20,90,0.1", "--steps", "2", "--out", str(tmp_path / "views_out")])
    assert sorted(os.listdir(tmp_path / "views_out")) == ["000000.png", "000001.png", "grid.png"]
    monkeypatch.chdir(tmp_path)
    args = train_nvs.add_nvs_args(train_nvs.argparse.ArgumentParser()).parse_args([])
    assert train_nvs.read_init(args) == (None, None) and args.init == "scratch"
    assert "make it with `python train_i2i.py`" in capsys.readouterr().out
    assert train_i2i.model_size(args) == train_i2i.OFFLINE_MODEL  # the loop's offline model
    assert (args.encoder, args.image_size, args.vae, args.data) == ("shapes-vit", 32, None, "multiview:2000")


# ======================================== evaluate ===============================================

@torch.no_grad()
def random_fid_inception(seed=0):
    """FIDInception with random weights keeping activations' size, and its state plus BatchNorm's batch counters."""
    model, generator = evaluate.FIDInception(), torch.Generator().manual_seed(seed)
    for key, tensor in model.state_dict().items():  # the model's own tensors, filled in place
        noise = torch.randn(tensor.shape, generator=generator)
        scale = (2 / tensor[0].numel()) ** 0.5 if key.endswith("conv.weight") else 0.1  # convolutions: He; the rest small
        positive = key.endswith(("bn.weight", "running_var"))  # BatchNorm scales and variances in [0.5, 1.5)
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator) if positive else scale * noise)
    state = dict(model.state_dict())
    return model, state | {key.replace("running_mean", "num_batches_tracked"): torch.tensor(7)
                           for key in state if key.endswith("running_mean")}


def random_images(count, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def write_folder(folder, images):
    return write_files(folder, {f"{i:03d}.png": encode(Image.fromarray(image), "PNG") for i, image in enumerate(images)})


@pytest.mark.slow
def test_fid_inception_loads_from_a_file_and_matches_pytorch_fid_with_random_weights(tmp_path, monkeypatch):
    import pytorch_fid.inception
    _, state = random_fid_inception()
    torch.save(state, tmp_path / "inception.pth")
    ours = evaluate.load_fid_inception(tmp_path / "inception.pth", device="cpu")
    # pytorch-fid's InceptionV3 (pool3) loads our state strictly in place of its download: our keys are its own.
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    reference = pytorch_fid.inception.InceptionV3([3]).eval()
    images = random_images(1, 40, 52)  # the whole pipeline at 299: uint8 image -> ToTensor, then resized and rescaled
    pool3, _ = evaluate.inception_features(images, ours)
    with torch.no_grad():
        expected = reference(torch.stack([transforms.functional.to_tensor(image) for image in images]))[0].flatten(1)
    assert pool3.dtype == np.float64 and pool3.shape == (1, 2048)
    assert_close_to_scale(pool3, expected)
    # The network alone at 139 px (the least leaving the last max pool a 3 x 3 map) and the logits (fc, no bias).
    reference.resize_input, ours.INPUT_SIZE = False, 139
    images = torch.rand(2, 3, 139, 139, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images)[0].flatten(1)
        pool3, logits = ours(images)
    assert_close_to_scale(pool3, expected)
    assert_close_to_scale(logits, expected @ state["fc.weight"].T)
    torch.save({"fc.weight": state["fc.weight"], "extra": torch.zeros(1)}, tmp_path / "incomplete.pth")
    assert_raises(ValueError, r"incomplete.pth: .*missing .*Conv2d_1a_3x3.conv.weight.*; 1 unexpected \(extra\)",
                  lambda: evaluate.load_fid_inception(tmp_path / "incomplete.pth"))


def test_image_sources_statistics_weight_files_and_their_errors(tmp_path):
    mean_colours = lambda batch: np.stack([np.asarray(im, np.float64).mean(axis=(0, 1)) for im in batch])  # noqa: E731
    class MeanColourNetwork(torch.nn.Linear):  # a cheap stand-in for FIDInception: mean colours as features, logits
        def forward(self, images):
            return images.mean(dim=(2, 3)), images.mean(dim=(2, 3))
    images = random_images(4, 8, 10)
    np.savez(tmp_path / "images.npz", arr_0=images)
    folder = write_folder(tmp_path / "folder", images)
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    from_folder = evaluate.load_images(folder)
    assert len(from_folder) == 4 and all(np.array_equal(from_folder[i], images[i]) for i in range(4))
    assert np.array_equal(evaluate.load_images(tmp_path / "images.npz"), images)
    expected = evaluate.feature_statistics(mean_colours(images))
    for source in (images, tmp_path / "images.npz", str(folder)):
        mu, sigma = evaluate.statistics(source, evaluate.INCEPTION_FEATURES, mean_colours)
        assert np.allclose(mu, expected[0], rtol=1e-12) and np.allclose(sigma, expected[1], rtol=1e-12)
    evaluate.save_statistics(tmp_path / "stats.npz", *expected, evaluate.DINOV2_FEATURES)
    not_called = lambda batch: pytest.fail("saved statistics must not be recomputed")  # noqa: E731
    mu, sigma = evaluate.statistics(tmp_path / "stats.npz", evaluate.DINOV2_FEATURES, not_called)
    assert np.array_equal(mu, expected[0]) and np.array_equal(sigma, expected[1])
    assert_raises(ValueError, "stats.npz: holds statistics of dinov2-cls features, not inception-pool3",
                  lambda: evaluate.statistics(tmp_path / "stats.npz", evaluate.INCEPTION_FEATURES, not_called))
    # pytorch-fid's and ADM's files name no features: they hold Inception statistics. Ours name them.
    np.savez(tmp_path / "untagged.npz", mu=expected[0], sigma=expected[1])
    other = evaluate.feature_statistics(mean_colours(images // 2))
    evaluate.save_statistics(tmp_path / "tagged.npz", *other, evaluate.INCEPTION_FEATURES)
    assert evaluate.fid(tmp_path / "untagged.npz", tmp_path / "tagged.npz", torch.nn.Identity()) == \
        evaluate.frechet_distance(*expected, *other)  # the network unused
    assert_raises(ValueError, "holds statistics of inception-pool3 features, not dinov2-cls",
                  lambda: evaluate.fd_dinov2(tmp_path / "tagged.npz", tmp_path / "untagged.npz", torch.nn.Identity()))
    mixed = [  # Inception features of a folder of mixed sizes, in batches, keep the files' order
        random_images(1, 20, 30, seed=3)[0], random_images(1, 33, 21, seed=4)[0] // 2, images[0]]
    pool3, logits = evaluate.inception_features(evaluate.load_images(write_folder(tmp_path / "mixed", mixed)),
                                                MeanColourNetwork(1, 1), batch_size=2)
    expected = np.stack([image.mean(axis=(0, 1)) / 255 for image in mixed])
    # fp32 means of <= 700 values in [0, 1], summed pairwise: relative error ~log2(700) * 6e-8 < 1e-6.
    assert np.allclose(pool3, expected, rtol=1e-6) and np.allclose(logits, expected, rtol=1e-6)
    (tmp_path / "empty").mkdir()
    assert_raises(FileNotFoundError, "no .* images in this folder", lambda: evaluate.load_images(tmp_path / "empty"))
    np.savez(tmp_path / "other.npz", images=images)
    assert_raises(ValueError, "no `arr_0`.*it has: images", lambda: evaluate.load_images(tmp_path / "other.npz"))
    write_files(tmp_path / "broken", {"0.png": b"not a png"})
    assert_raises(ValueError, "0.png: not a readable image", lambda: evaluate.load_images(tmp_path / "broken")[0])
    np.savez(tmp_path / "nchw.npz", arr_0=images.transpose(0, 3, 1, 2))
    assert_raises(ValueError, r"expected uint8 images \(N, H, W, 3\)", lambda: evaluate.load_images(tmp_path / "nchw.npz"))
    source, cache = tmp_path / "source.bin", tmp_path / "cache"  # weight files: downloaded, zip or legacy
    source.write_bytes(b"inception weights")
    good = cache / f"weights-{hashlib.sha256(b'inception weights').hexdigest()[:8]}.pth"
    assert evaluate.download(source.as_uri(), good).read_bytes() == b"inception weights"
    assert_raises(ValueError, "expected 00000000", lambda: evaluate.download(source.as_uri(), cache / "weights-00000000.pth"))
    assert [path.name for path in cache.iterdir()] == [good.name]  # nothing left of the bad one
    assert_raises(FileNotFoundError, "could not download .* put it at",
                  lambda: evaluate.download((tmp_path / "absent.bin").as_uri(), cache / "other.pth"))
    torch.save({"a": torch.arange(3.0)}, tmp_path / "zip.pth")
    torch.save({"a": torch.arange(3.0)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("zip.pth", "legacy.pth"):
        assert torch.equal(evaluate.read_weights(tmp_path / name)["a"], torch.arange(3.0))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    assert_raises(ValueError, "text.pth: not a checkpoint", lambda: evaluate.read_weights(tmp_path / "text.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert_raises(ValueError, "expected a dict of tensors", lambda: evaluate.read_weights(tmp_path / "list.pth"))
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    assert_raises(ValueError, "not an LPIPS weights file",
                  lambda: evaluate.LPIPS.from_files(tmp_path / "partial.pth", tmp_path / "partial.pth"))


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")  # pytorch-fid calling scipy
def test_frechet_distance_inception_score_precision_recall_psnr_ssim_and_dinov2_match_references(tmp_path):
    from pytorch_fid.fid_score import calculate_frechet_distance
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    rng = np.random.default_rng(0)
    features1 = rng.normal(size=(400, 48))
    mu1, sigma1 = evaluate.feature_statistics(features1)
    mu2, sigma2 = evaluate.feature_statistics(rng.normal(size=(300, 48)) @ rng.normal(size=(48, 48)) * 0.4 + 0.3)
    assert np.allclose(sigma1, np.cov(features1, rowvar=False)) and np.allclose(mu1, features1.mean(0))
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(  # float64, one formula: 4e-16 apart
        calculate_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-9)
    # Fewer samples than dimensions: singular, 0 from a set to itself up to sqrt(round-off) (pytorch-fid: -3.8e-6).
    mu, sigma = evaluate.feature_statistics(rng.normal(size=(10, 64)))
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    assert_raises(ValueError, "statistics do not match",
                  lambda: evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)))
    assert_raises(ValueError, "at least 2 feature vectors", lambda: evaluate.feature_statistics(np.zeros((1, 5))))
    logits = rng.normal(size=(12, 7)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp((part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean())
              for part in np.split(probabilities, [4, 8])]  # the original's split bounds
    assert evaluate.inception_score(logits, splits=3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)
    assert_raises(ValueError, "needs at least 10 images", lambda: evaluate.inception_score(np.zeros((5, 1008))))
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
    assert_raises(ValueError, r"must lie in \[0, 1\]", lambda: evaluate.ssim(images * 2 - 1, images))
    assert_raises(ValueError, "of one shape", lambda: evaluate.psnr(images, images[:1]))
    assert_raises(ValueError, "at least 7 x 7", lambda: evaluate.ssim(images[..., :6], images[..., :6]))
    torch.manual_seed(0)  # DINOv2 features as dgm-eval computes them
    encoder = encoders.ViTEncoder(image_size=28, patch_size=14, width=32, depth=1, heads=2, layer_scale=True)
    images = random_images(3, 40, 50)
    dgm_eval_transform = transforms.Compose([  # dgm-eval's DINOv2 preprocessing, applied to PIL images
        transforms.Resize((224, 224), transforms.InterpolationMode.BICUBIC), transforms.ToTensor(),
        transforms.Normalize(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)])
    with torch.no_grad():
        expected = encoder(torch.stack([dgm_eval_transform(Image.fromarray(image)) for image in images]))[:, 0]
    features = evaluate.dinov2_features(images, encoder, batch_size=2)
    assert_close_to_scale(features, expected, 1e-5)
    other = random_images(3, 40, 50, seed=5) // 3
    expected_distance = evaluate.frechet_distance(*evaluate.feature_statistics(features),
                                                  *evaluate.feature_statistics(evaluate.dinov2_features(other, encoder)))
    np.savez(tmp_path / "real.npz", arr_0=images)
    assert evaluate.fd_dinov2(tmp_path / "real.npz", other, encoder) == pytest.approx(expected_distance, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alex", "vgg"])
@pytest.mark.filterwarnings("ignore:.*deprecated since 0.13")  # lpips calling torchvision
def test_lpips_matches_the_lpips_package(tmp_path, net, monkeypatch):
    import lpips  # requirements-dev.txt
    from torchvision.models.vgg import cfgs, make_layers
    monkeypatch.setattr(lpips.pretrained_networks.tv, "vgg16",  # no 120M-parameter classifier (unused, seconds)
                        lambda **kwargs: SimpleNamespace(features=make_layers(cfgs["D"])))
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # its linear weights; a random backbone:
    torch.manual_seed(0)
    backbone = (evaluate.alexnet_features() if net == "alex" else evaluate.vgg16_features()).state_dict()
    torch.save({f"features.{key}": value for key, value in backbone.items()}
               | {"classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "backbone.pth")
    for slice_ in reference.net.children():
        slice_.load_state_dict({key: backbone[key] for key in slice_.state_dict()})
    ours = evaluate.LPIPS.from_files(pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth",
                                     tmp_path / "backbone.pth")
    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(2, 3, 64, 64, generator=generator)
    images = (targets + 0.2 * torch.randn(targets.shape, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        assert_close_to_scale(ours(images, targets), reference(2 * images - 1, 2 * targets - 1).flatten(), 1e-5)
    assert ours(targets, targets).abs().max() == 0


def test_i2i_agreement_and_caption_accuracy_are_one_on_the_references_and_chance_on_shuffled_ones():
    references = evaluate.shapes_reference_images(400, 32, seed=5)
    batch = {"image": torch.from_numpy(references[:20]).permute(0, 3, 1, 2).float() / 127.5 - 1,
             "caption": [data.shapes_caption(data.sample_shape_attrs(5, i)) for i in range(20)]}
    assert train_t2i.caption_accuracy(batch["image"], batch) == {  # T2I's grid metric, on the references
        **{f"caption_{name}": 1.0 for name in (*evaluate.SHAPE_ATTRIBUTES, "object", "all")}, "attribute_distance": 0.0}
    assert evaluate.i2i_agreement(references, references) == {
        **dict.fromkeys((*evaluate.SHAPE_ATTRIBUTES, "object", "all"), 1.0), "images": 400}
    shuffled = evaluate.i2i_agreement(np.roll(references, 1, axis=0), references)  # independent pairs
    # Two independent draws agree with probability sum_v p_v^2: 1/8 for both colours (each is uniform
    # over 8), 1/5 shape, 1/3 size, 1/9 position. Deterministic here; 4 binomial sigmas of 400 draws.
    for name, chance in {"background": 1 / 8, "color": 1 / 8, "shape": 1 / 5, "size": 1 / 3, "position": 1 / 9}.items():
        assert abs(shuffled[name] - chance) < 4 * math.sqrt(chance * (1 - chance) / 400), (name, shuffled[name])


def test_shapes_probe_reads_every_attribute_from_a_feature_that_holds_it_and_none_from_noise(capsys):
    def detected_one_hot(images):  # a feature that holds the five attributes, one-hot each
        rows = [evaluate.detect_shape_attrs(image) for image in sample.to_uint8(images)]
        return torch.tensor([[float(row[name] == value) for name, values in evaluate.ATTRIBUTE_VALUES.items()
                              for value in values] for row in rows])
    assert evaluate.shapes_probe(detected_one_hot, num_train=200, num_test=100) == dict.fromkeys(
        evaluate.SHAPE_ATTRIBUTES, 1.0)
    generator = torch.Generator().manual_seed(0)
    noise = evaluate.shapes_probe(lambda images: torch.randn(len(images), 8, generator=generator), 400, 400)
    assert noise["position"] < 1 / 9 + 4 * math.sqrt(1 / 9 * 8 / 9 / 400) and noise["shape"] < 0.2 + 0.08
    evaluate.main(["shapes-probe", "--encoder", "random-vit", "--num-train", "100", "--num-test", "50"])
    assert json.loads(capsys.readouterr().out).keys() == set(evaluate.SHAPE_ATTRIBUTES)


def test_shapes_alignment_and_the_command_line(tmp_path, capsys, monkeypatch):
    # Measured: 100% of 500 images at 32 and 64 px (92% at 16 px); with noise of std 8, 99.5% of 200.
    for image_size, noise, min_score in [(32, 0, 1.0), (64, 0, 1.0), (32, 8, 0.95)]:
        rng, truth = np.random.default_rng(0), [data.sample_shape_attrs(3, i) for i in range(150)]
        images = [np.clip(data.render_shape(attrs, image_size) + rng.normal(0, noise, (image_size, image_size, 3)), 0,
                          255).astype(np.uint8) for attrs in truth]
        detected = [evaluate.detect_shape_attrs(image) for image in images]
        truth_attrs = [{k: a[k] for k in evaluate.SHAPE_ATTRIBUTES} for a in truth]
        assert evaluate.alignment_scores(detected, truth_attrs)["all"] >= min_score, image_size
        assert noise or max(abs(found["extent"] - a["extent"]) for found, a in zip(detected, truth)) < 2 / image_size
    assert evaluate.parse_shapes_caption("A  red triangle") == {"color": "red", "shape": "triangle"}
    assert evaluate.parse_shapes_caption("a small white star at the top center on an orange background") == {
        "size": "small", "color": "white", "shape": "star", "position": "top center", "background": "orange"}
    assert_raises(ValueError, "not a shapes caption: 'a dog'", lambda: evaluate.parse_shapes_caption("a dog"))
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
    a = [{"shape": "circle", "color": "red", "size": "small", "position": "center", "background": "blue"}] * 4
    b = a[:2] + [dict(a[0], shape="star", color=None)] * 2
    assert evaluate.attribute_distance(a, b) == pytest.approx(
        {"shape": 0.5, "color": 0.5, "size": 0, "position": 0, "background": 0, "mean": 0.2})
    truth = [data.sample_shape_attrs(0, i) for i in range(30)]  # the command line
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
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    npz = str(tmp_path / "images.npz")
    np.savez(npz, arr_0=random_images(2, 8, 8))
    for argv, message in [
        (["fid", "--real", npz, "--fake", npz, "--no-download"],
         f"no FID Inception weights at {re.escape(str(tmp_path))}/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth; "
         "download https://github.com/mseitzer"),
        (["fid", "--real", npz, "--fake", npz, "--inception", str(tmp_path / "none.pth")],
         "none.pth: no such Inception weights file .*pt_inception-2015-12-05"),
        (["fid", "--real", npz, "--fake", "absent"], "absent: no such folder or .npz file"),
        (["shapes", "--images", npz, "--captions", str(tmp_path / "none.txt")], "no such captions file"),
        (["fd-dinov2", "--real", str(tmp_path), "--fake", str(tmp_path), "--dinov2", str(tmp_path)],
         "none of model.safetensors"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.count("\n") == 1, error
        assert error.startswith(f"evaluate.py {argv[0]}: error:") and re.search(message, error), error


# ======================================== nvs source views =======================================

def source_of(item):  # a fresh source view per training sample: Zero-1-to-3 sees every pair of views
    return int(re.search(r"<-(?:\d+/)?(\d+)", item["name"]).group(1))


def test_training_samples_pair_a_target_with_every_other_view_from_the_global_index(tmp_path):
    write_objects(tmp_path / "two", 2, image_size=8)
    for dataset in (train_nvs.MultiViewShapes(2, 8, seed=1), train_nvs.Zero123Folder(str(tmp_path / "two"), 8, seed=1)):
        target = 12 + 5  # view 5 of the second object
        assert {source_of(dataset.item(target, g)) for g in range(100)} == set(range(12)) - {5}  # all 11 other views
        again = dataset.item(target, 37)
        assert again["name"] == dataset.item(target, 37)["name"] and again["index"] == target
        fixed = dataset[target]  # held-out grids and tools: one fixed pair per item
        assert fixed["name"] == dataset[target]["name"] and source_of(fixed) != 5
    dataset = train_nvs.MultiViewShapes(2, 8, seed=0)  # the loader draws the source from the global index

    def step_items(world_size, workers):  # {global_index: (name, pose)} of 3 global batches of 8, from every rank
        loaders = [data.make_loader(dataset, 8, 8 // world_size // 2, rank, world_size, seed=3, num_workers=workers)
                   for rank in range(world_size)]
        return {g: (name, pose.tolist()) for loader in loaders  # 2 accumulation micro-batches per step
                for batch in itertools.islice(loader, 2 * 3)
                for g, name, pose in zip(batch["global_index"].tolist(), batch["name"], batch["pose"])}
    one, two = step_items(1, 0), step_items(2, 1)
    assert sorted(one) == list(range(24)) and one == two
    sampler = data.GlobalSampler(len(dataset), 8, seed=3)
    for g, (name, _) in one.items():
        assert name == dataset.item(sampler.dataset_index(g), g)["name"]
    # One epoch covers every target once; its sources are the per-sample draws, not ds[i]'s.
    assert {name for name, _ in one.values()} != {dataset[i]["name"] for i in range(24)}
    write_objects(tmp_path, 1, image_size=8)  # a zero123 source replaced past a bad view stays per sample
    os.remove(tmp_path / "000000" / "003.npy")
    items = [train_nvs.Zero123Folder(str(tmp_path), 8, seed=0).item(4, g) for g in range(100)]
    assert all("003.png" not in item["name"] for item in items)
    assert {source_of(item) for item in items if item["name"].startswith("000000/004.png<-")} == set(range(12)) - {3, 4}
    passed_over = [item for item in items if item["skipped"]]  # drew 3: the next target, 5, with a new draw
    assert passed_over and all(item["name"].startswith("000000/005.png<-") for item in passed_over)


# ======================================== data at scale: compact caches =========================

# The feature cache stores fp16 (data.py): round to nearest moves x by at most 2^-11 |x|, or 2^-25 below fp16's normal
# range; the log-variance L (|L| <= 30) by 2^-7, so std = exp(L / 2) by at most exp(2^-8) - 1 < 0.004 relative. fp32
# outputs differing by TOLERANCE between batchings may round one fp16 step (2^-10 relative) apart.
COMPACT_STEP = torch.finfo(torch.float16).eps


def compact_bound(value, scale):
    """The most fp16 rounding moves `value` (a float32 tensor), plus TOLERANCE of `scale`."""
    return 2.0 ** -11 * value.abs() + 2.0 ** -25 + TOLERANCE * scale


def round_encoders_like_the_cache(monkeypatch):
    """The VAE and the ViT then return what a feature cache reads back: their outputs through its format."""
    vae_encode, vit_tokens = encoders.VAE.encode, encoders.ViTEncoder.tokens
    through_cache = lambda mean, std, cond: data.expand_features(data.compact_features(mean, std, cond))  # noqa: E731
    monkeypatch.setattr(encoders.VAE, "encode", lambda self, images, *args: tuple(
        through_cache(*vae_encode(self, images, *args), torch.zeros(0)).values())[:2])
    monkeypatch.setattr(encoders.ViTEncoder, "tokens", lambda self, images, *args: through_cache(
        torch.zeros(0), torch.ones(0), vit_tokens(self, images, *args))["cond"])


def test_compact_cache_keeps_training_targets_within_the_fp16_bound(latent_assets):
    cache, images = data.FeatureCache(latent_assets.root), data.open_dataset("shapes:16", 32)
    vae, dino = encoders.VAE.from_pretrained(latent_assets.vae), encoders.ViTEncoder.from_pretrained(latent_assets.dino)
    space, flips = encoders.ImageSpace(vae), torch.tensor([False, True] * 3)
    mirror_images = torch.stack([images[i]["image"].flip(-1) if flip else images[i]["image"] for i, flip in enumerate(flips)])
    cached = train_i2i.mirrored(data.collate_samples([cache[i] for i in range(6)]), flips)
    mean, std = vae.encode(mirror_images)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    target, exact = train_i2i.diffusion_targets(cached, noise, space), space.from_posterior(mean, std, noise)
    # x0 = (mean + std * noise) * scale moves by the mean's rounding and < 0.004 of std * noise.
    size = vae.scaling_factor * (mean.abs() + std * noise.abs())
    bound = vae.scaling_factor * (compact_bound(mean, 0) + 0.004 * std * noise.abs()) + TOLERANCE * size.max()
    assert ((target - exact).abs() <= bound).all()
    cond = dino.encode(mirror_images)
    assert ((cached["cond"] - cond).abs() <= compact_bound(cond, cond.abs().max())).all()
    assert cached["latent_std"].dtype == cached["cond"].dtype == torch.float32  # training reads float32


def test_feature_cache_bytes_and_an_older_format_refused_in_one_line(tmp_path, capsys, latent_assets):
    # At 256 px: 2 images x (mean + log-variance of 4 x 32 x 32, and a 768-d CLS) x 2 bytes, + an int64 index.
    assert data.cache_item_bytes((4, 32, 32), 768) == 2 * (2 * 4096 + 768) * 2 + 8 == 35848  # 35.0 KiB
    assert data.cache_item_bytes((4, 32, 32), 768, cache_format=1) == 71688  # float32: 70.0 KiB
    for shard in range(4):  # 16 items in shards of 4, 32 px: latents 4 x 4 x 4, the DINO 64 wide
        path = data.cache_shard_path(latent_assets.root, shard)
        with open(path, "rb") as f:
            header = 8 + struct.unpack("<Q", f.read(8))[0]
        assert os.path.getsize(path) - header == 4 * data.cache_item_bytes((4, 4, 4), 64)
    shutil.copytree(latent_assets.root, root := tmp_path / "cache")
    info = data.read_cache_info(root)
    (root / data.CACHE_INFO).write_text(json.dumps({k: v for k, v in info.items() if k != "format"}))  # format 1
    assert_raises(ValueError, r"format 1 .* write it anew with `python data.py cache`", lambda: data.FeatureCache(root))
    with pytest.raises(SystemExit):
        train_i2i.main(TINY_RUN + latent_assets.run + ["--data", f"cache:{root}", "--out", str(tmp_path / "run")])
    assert "format 1" in (message := capsys.readouterr().err.strip()) and "\n" not in message
    vae, dino = encoders.VAE.from_pretrained(latent_assets.vae), encoders.ViTEncoder.from_pretrained(latent_assets.dino)
    assert_raises(ValueError, "format 1", lambda: data.write_feature_cache(  # nor finished by this data.py
        data.open_dataset("shapes:16", 32), root, vae, dino, latent_assets.settings, 4))


def test_text_cache_in_bf16_is_within_bf16_rounding_of_fp32(tmp_path):
    run = ["cache-text", "--data", "shapes:8", "--image-size", "16", "--num-samples", "4"]
    train_t2i.main(run + ["--out", str(tmp_path / "fp32")])
    train_t2i.main(run + ["--out", str(tmp_path / "bf16"), "--dtype", "bf16"])
    exact, compact = train_t2i.TextFeatureCache(str(tmp_path / "fp32")), train_t2i.TextFeatureCache(str(tmp_path / "bf16"))
    assert (exact.info["dtype"], compact.info["dtype"]) == ("float32", "bfloat16")  # the CPU's T5 runs in fp32
    captions = [data.open_dataset("shapes:8", 16)[i]["caption"] for i in range(8)]
    for stored, reference in zip(compact.token_features(captions), exact.token_features(captions)):
        assert stored.dtype == torch.bfloat16  # 8 significant bits: x moves by 2^-8 |x| (2^-134 among subnormals)
        torch.testing.assert_close(stored.float(), reference, rtol=2.0 ** -8, atol=2.0 ** -134)


# ======================================== data at scale: the tar index ==========================


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


# ======================================== scale: the step, HSDP, checkpoints ====================

class HostReads(TorchDispatchMode):
    """Every read of a tensor's value by the host, what waits for a GPU: item(), float(), bool()
    and int() dispatch _local_scalar_dense; tolist() of a CPU tensor dispatches nothing, so
    `recording_tolist` wraps it."""

    def __init__(self):
        super().__init__()
        self.armed, self.reads = False, []

    def record(self):
        if self.armed:
            self.reads.append("".join(traceback.format_stack(limit=8)[:-2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.record()
        return func(*args, **(kwargs or {}))


def arm_in_steady_state(monkeypatch, arm):
    """arm(True) from the end of each step that is followed by a steady-state one (steps 1-2 and
    4-5 of 7 with --log-every 3 and the grid and checkpoint at 7) to the end of the next, through
    the loop's once-a-step count_nonfinite; arm(False) otherwise."""
    count, steps = train_i2i.count_nonfinite, []

    def counted(window, skip, grad_norm):
        count(window, skip, grad_norm)
        steps.append(None)
        arm(len(steps) % 3 != 0 and len(steps) < 7)
    monkeypatch.setattr(train_i2i, "count_nonfinite", counted)
    return TINY_RUN + ["--steps", "7", "--log-every", "3", "--sample-every", "7", "--ckpt-every", "7",
                       "--num-workers", "1"]  # the per-sample randomness is drawn in the worker


@pytest.mark.parametrize("data_path", ["pixels", "latent cache"])
def test_steady_state_steps_read_nothing_on_the_host(tmp_path, monkeypatch, latent_assets, data_path):
    """On the CPU, the honest stand-in for a GPU's sync check: between log steps the loop reads no
    tensor value on the host (no loss, norm, flag or index), so a GPU step would never wait."""
    mode, tolist = HostReads(), torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (mode.record(), tolist(self))[1])
    run = arm_in_steady_state(monkeypatch, lambda on: setattr(mode, "armed", on))
    extra = ["--precision", "bf16"] + (latent_assets.run + ["--data", latent_assets.cache] if data_path != "pixels" else [])
    with mode:
        train_i2i.main(run + extra + ["--out", str(tmp_path)])
    assert read_metrics(tmp_path)["step"] == [3, 6, 7] and mode.reads == [], mode.reads[:1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steady_state_cuda_steps_do_not_synchronize(tmp_path, monkeypatch):
    run = arm_in_steady_state(monkeypatch, lambda on: torch.cuda.set_sync_debug_mode("error" if on else "default"))
    try:
        train_i2i.main(run + ["--precision", "bf16", "--out", str(tmp_path)])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_checkpoint_is_written_while_the_next_steps_run(tmp_path, monkeypatch):
    """The write of the step-2 checkpoint waits until step 3 is done: were the save synchronous,
    step 3 could never run and the wait would time out."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    step_3_done, write, count = threading.Event(), FileSystemWriter.write_data, train_i2i.count_nonfinite

    def slow_write(self, *args, **kwargs):
        if "step_0000002" in str(self.path):
            assert step_3_done.wait(timeout=60), "the step waited for the checkpoint"
        return write(self, *args, **kwargs)

    def counted(window, skip, grad_norm):
        count(window, skip, grad_norm)
        if (tmp_path / "checkpoints" / "step_0000002.tmp").exists() and not step_3_done.is_set():
            assert not (tmp_path / "checkpoints" / "step_0000002").exists()  # committed only once written
            step_3_done.set()
    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write)
    monkeypatch.setattr(train_i2i, "count_nonfinite", counted)
    train_i2i.main(TINY_RUN + ["--steps", "4", "--ckpt-every", "2", "--out", str(tmp_path)])
    assert step_3_done.is_set() and dit.latest_checkpoint(tmp_path).endswith("step_0000004")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_0000002", "step_0000004"]


@pytest.mark.slow
def test_hsdp_two_by_two_equals_one_rank(tmp_path):
    common = TINY_RUN + ["--steps", "3", "--ckpt-every", "3"]
    train_i2i.main(common + ["--out", str(tmp_path / "one")])
    result = torchrun("train_i2i.py", *common, "--shard-group", "2", "--out", tmp_path / "hsdp", nproc=4)
    assert result.returncode == 0 and "HSDP 2 x 2" in result.stdout, result.stderr[-3000:]
    assert read_metrics(tmp_path / "hsdp")["loss"] == pytest.approx(read_metrics(tmp_path / "one")["loss"], rel=TOLERANCE)
    for part in ("model", "ema"):
        assert_same_weights(checkpoint_weights(checkpoint(tmp_path / "hsdp", 3), part),
                            checkpoint_weights(checkpoint(tmp_path / "one", 3), part))


@pytest.mark.slow
def test_out_must_be_one_folder_that_every_rank_sees(tmp_path):
    script = tmp_path / "check_out.py"  # rank r checks out/<shared or r>: as if each node mounted its own disk
    script.write_text(f"import os, sys\nsys.path.insert(0, {REPO!r})\nimport data, train_i2i\n"
                      f"rank = data.setup_distributed()[0]\n"
                      f"train_i2i.check_shared_out(os.path.join({str(tmp_path)!r}, sys.argv[1] or str(rank)), rank)\n"
                      f"train_i2i.dist.destroy_process_group()\n")  # as train() does: no teardown race at exit
    result = torchrun(script, "shared")
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(script, "")
    assert result.returncode != 0 and "do not see the files rank 0 writes there" in result.stderr


def test_a_real_run_gets_real_run_defaults():
    parse = lambda *argv: train_i2i.add_train_args(argparse.ArgumentParser()).parse_args(argv)  # noqa: E731
    real_run = (400_000, 0.9999, 5_000, 5_000, "epsilon", True)  # DiT's recipe
    for argv, expected in ((("--model", "DiT-XL/2", "--image-size", "256"), real_run),
                           ((), (1000, 0.99, 250, 250, "x0", False))):
        args = parse(*argv)
        train_i2i.check_args(args, world_size=1)
        assert expected == (args.steps, args.ema_decay, args.sample_every, args.ckpt_every, args.prediction,
                            args.learn_sigma)
        assert args.precision == ("bf16" if torch.cuda.is_available() else "fp32")
    with pytest.raises(ValueError, match="--shard-group 4 must divide the world size 6"):
        train_i2i.check_args(parse("--shard-group", "4", "--global-batch-size", "60"), world_size=6)
