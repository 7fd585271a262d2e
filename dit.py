"""LumosDiT: the DiT backbone of Lumos, conditioned through cross-attention.

Exact to the official Lumos checkpoints (key names, shapes, computation): see SPEC.md section 2.
The timestep drives adaLN; the condition (one DINO CLS token for I2I, up to 120 T5 tokens for T2I)
enters only through cross-attention, so the same blocks serve every condition. Novel view synthesis
is an option of the same model (`pose_dim=4`): the source view joins the noisy target on channels
and the relative camera pose is mixed into the condition token. So is the release's multi-scale T2I
model (`multi_scale=True`, SPEC section 2b): image size and aspect ratio join the timestep embedding,
and latents may be non-square.

    model = DiT_models["DiT-XL/2"]()                       # I2I, 822,006,176 parameters
    out = model(latent, t, cond_tokens, mask)              # (B, 2*4, 32, 32): epsilon, then v
    nvs = LumosDiT(in_channels=8, out_channels=4, pose_dim=4)
    out = nvs(target, t, cond_tokens, source=source_latent, pose=pose)
    t2i = LumosDiT(input_size=128, cond_dim=4096, cond_tokens=120, multi_scale=True, lewei_scale=2.0)
    out = t2i(latent_144x112, t, t5_tokens, mask, img_hw=hw, aspect_ratio=ratio)   # (B, 8, 144, 112)
"""
import json
import math
import os
import warnings
from functools import partial

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from encoders import load_weights_only, locate, open_safetensors


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


#################################################################################
#               Embedding Layers for Timesteps and Conditions                   #
#################################################################################

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) by a strided convolution."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, D): sinusoidal features, then an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """t (B,) float, possibly fractional -> (B, dim) as cat([cos, sin])."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """The multi-scale model's micro-conditions (PixArt-alpha): each scalar of s (B, k) through its
    own sinusoidal features and the shared MLP of width `hidden_size`, concatenated -> (B, k * hidden_size).
    img_hw (height, width in pixels) gives k = 2, the aspect ratio k = 1."""

    def forward(self, s):
        batch, scalars = s.shape
        return super().forward(s.reshape(-1)).reshape(batch, scalars * self.mlp[2].out_features)


class Mlp(nn.Module):
    """Linear, GELU(tanh), Linear; used for the transformer MLP and the condition projection."""

    def __init__(self, in_features, hidden_features, out_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConditionEmbedder(nn.Module):
    """Condition tokens (B, L, C_cond) -> (B, L, D); holds the null condition for CFG.

    In training a sample's condition is replaced by `y_embedding` with probability `dropout_prob`.
    The caption mask is kept, so the null tokens are cut to the caption's length (as the official
    forward does, in training and under CFG alike). The drop (`token_drop`) and the projection
    (`forward`) are two calls so that NVS can mix the pose into the tokens in between.
    """

    def __init__(self, cond_dim, hidden_size, cond_tokens, dropout_prob):
        super().__init__()
        self.y_proj = Mlp(cond_dim, hidden_size, hidden_size)
        # A buffer, not a parameter: the official checkpoints store it so, and it is not trained.
        self.register_buffer("y_embedding", torch.randn(cond_tokens, cond_dim) / cond_dim ** 0.5)
        self.dropout_prob = dropout_prob

    def token_drop(self, y, drop_cond=None, generator=None):
        """y (B, L, C_cond) -> (y with the null condition in dropped rows, drop (B,) bool or None).

        drop_cond (B,) bool forces the null condition per sample (CFG, or a training loop that
        draws its own per-sample randomness); otherwise in training mode the drop is drawn here,
        from `generator` if given. None means no sample was dropped.
        """
        if drop_cond is None and self.training and self.dropout_prob > 0:
            device = generator.device if generator is not None else y.device
            draw = torch.rand(y.shape[0], generator=generator, device=device)
            drop_cond = draw.to(y.device) < self.dropout_prob
        if drop_cond is None:
            return y, None
        drop_cond = drop_cond.to(y.device)
        null = self.y_embedding[: y.shape[1]].to(y.dtype)
        return torch.where(drop_cond[:, None, None], null[None], y), drop_cond

    def forward(self, y):
        """y (B, L, C_cond), after token_drop (and the pose mixer for NVS) -> (B, L, D)."""
        return self.y_proj(y)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Self-attention with fused QKV: (B, N, D) -> (B, N, D).

    Attention is F.scaled_dot_product_attention; under `torch.nn.attention.sdpa_kernel(
    SDPBackend.MATH)` it runs as plain matmuls and softmax: the reference bench.py compares the
    fused kernels against, and the form whose FLOPs FlopCounterMode sees (not the CPU flash kernel's).
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Image tokens x (B, N, D) attend to their own condition tokens y (B, L, D) -> (B, N, D).

    mask (B, L) bool, True for real tokens. A sample with no real token gets zero output
    (attention over nothing), not the NaN that an all -inf softmax row would give.

    With one condition token (I2I) the softmax over a single key is exactly 1, so the output is
    proj(v) of that token, the same for every query: q_linear and the k half of kv_linear get no
    gradient in I2I. They matter for T2I's many tokens, and the official checkpoints keep them.
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, mask=None):
        B, N, D = x.shape
        L, head_dim = y.shape[1], D // self.num_heads
        q = self.q_linear(x).view(B, N, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv_linear(y).view(B, L, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            has_token = mask.any(dim=1)
            attn_mask = (mask | ~has_token[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, N, D)
        if mask is not None:
            out = out * has_token[:, None, None].to(out.dtype)
        return self.proj(out)


class LumosBlock(nn.Module):
    """adaLN-Zero self-attention, ungated cross-attention, adaLN-Zero MLP.

    x (B, N, D), adaln_input (B, D): the timestep embedding (plus the size micro-conditions in a
    multi-scale model; the image/text condition never enters adaLN), y (B, L, D) condition tokens
    -> (B, N, D).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, adaln_input, y, mask=None):
        modulation = self.adaLN_modulation(adaln_input)[:, None]
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(x, y, mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """x (B, N, D), adaln_input (B, D) -> (B, N, p*p*C_pred), modulated by a learned table plus
    adaln_input."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x, adaln_input):
        shift, scale = (self.scale_shift_table[None] + adaln_input[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LumosDiT(nn.Module):
    """DiT with cross-attention conditioning, as in Lumos (I2I: one DINO token; T2I: T5 tokens).

    `out_channels` defaults to `in_channels`. With `learn_sigma` the output has 2 * out_channels:
    epsilon (or v), then the variance interpolation. With `pose_dim` > 0 the model does novel view
    synthesis (NVS, pose_dim 4: [d_polar, sin d_azimuth, cos d_azimuth, d_radius]): it takes the
    noisy target and the source view, concatenated on channels (in_channels = 2 * out_channels),
    and `pose_mixer` turns [condition feature, pose] into the condition token.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, cond_dim=768, cond_tokens=1, learn_sigma=True,
                 cond_dropout_prob=0.1, lewei_scale=1.0, out_channels=None, pose_dim=0,
                 multi_scale=False, grad_checkpointing=False):
        super().__init__()
        # Everything needed to rebuild this model (saved in checkpoints and exports).
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           cond_dim=cond_dim, cond_tokens=cond_tokens, learn_sigma=learn_sigma,
                           cond_dropout_prob=cond_dropout_prob, lewei_scale=lewei_scale,
                           out_channels=out_channels or in_channels, pose_dim=pose_dim, multi_scale=multi_scale)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if pose_dim and in_channels != 2 * (out_channels or in_channels):
            raise ValueError(f"LumosDiT with pose_dim={pose_dim} (NVS) takes the target and the source view: "
                             f"in_channels must be 2 x out_channels, "
                             f"got {in_channels} and {out_channels or in_channels}")
        if multi_scale and pose_dim:
            raise ValueError(f"a multi-scale LumosDiT has no pose input: pose_dim must be 0, got {pose_dim}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.lewei_scale = hidden_size, lewei_scale
        self.cond_dim, self.cond_tokens, self.learn_sigma = cond_dim, cond_tokens, learn_sigma
        self.out_channels = out_channels or in_channels
        self.pred_channels = self.out_channels * 2 if learn_sigma else self.out_channels
        self.pose_dim, self.multi_scale = pose_dim, multi_scale
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = ConditionEmbedder(cond_dim, hidden_size, cond_tokens, cond_dropout_prob)
        grid = input_size // patch_size
        pos_embed = get_2d_sincos_pos_embed(hidden_size, grid, lewei_scale, base_size=grid)
        self.register_buffer("pos_embed", torch.from_numpy(pos_embed).float()[None])
        self.blocks = nn.ModuleList([LumosBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.pred_channels)
        self.initialize_weights()
        if pose_dim:
            # Built after the other weights are drawn (as the NVSDiT subclass did), so that a
            # seeded run draws the same random numbers as before.
            self.pose_mixer = nn.Linear(cond_dim + pose_dim, cond_dim)
            self.initialize_pose_mixer()
        if multi_scale:
            # Size (height, width) and aspect-ratio embedders, D/3 wide per scalar (the release's; a
            # width not divisible by 3 gives the ratio the rest): together D, added to the timestep
            # embedding, so every block's adaLN and the final layer see the sum.
            self.csize_embedder = SizeEmbedder(hidden_size // 3)
            self.ar_embedder = SizeEmbedder(hidden_size - 2 * (hidden_size // 3))
            for embedder in (self.csize_embedder, self.ar_embedder):  # as t_embedder (the release's init)
                for linear in (embedder.mlp[0], embedder.mlp[2]):
                    nn.init.normal_(linear.weight, std=0.02)
                    nn.init.zeros_(linear.bias)

    def initialize_weights(self):
        def xavier_linear(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(xavier_linear)
        # The patch conv is initialised like the Linear layer it is.
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            # Zero adaLN: every gate starts at 0, so each block starts as the identity (adaLN-Zero).
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            # Zero cross-attention output: the ungated condition path also starts closed.
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # Zero output layer: the first prediction is 0, i.e. the mean of the epsilon target.
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @torch.no_grad()
    def initialize_pose_mixer(self):
        # Identity on the feature, zero on the pose and the bias (Zero-1-to-3's cc_projection): the
        # condition token starts as the feature itself, so I2I weights start from their own function.
        self.pose_mixer.weight.zero_()
        self.pose_mixer.weight[:, : self.cond_dim].copy_(torch.eye(self.cond_dim))
        self.pose_mixer.bias.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # pos_embed is fixed by this model's size and lewei_scale: recompute instead of copying, so
        # a 256 px checkpoint loads into a 512 px model.
        if prefix + "pos_embed" in state_dict:
            state_dict[prefix + "pos_embed"] = self.pos_embed.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def unpatchify(self, x, grid_hw):
        """(B, h*w, p*p*C), grid_hw (h, w) -> (B, C, h*p, w*p)."""
        (h, w), p, c = grid_hw, self.patch_size, self.pred_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def position_embedding(self, grid_hw, device, dtype):
        """(1, h*w, D): the buffer; in a multi-scale model computed for the latent's own grid at every
        call, in float64 and then cast, as the release does, with the model's base_size and lewei_scale."""
        if not self.multi_scale:
            return self.pos_embed.to(dtype)
        base = self.input_size // self.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, grid_hw, self.lewei_scale, base_size=base)
        return torch.from_numpy(pos_embed).to(device, dtype)[None]

    def forward(self, x, t, y, mask=None, img_hw=None, aspect_ratio=None, drop_cond=None, generator=None,
                source=None, pose=None, return_block=None):
        """
        x: (B, in_channels, H, W) noisy input; with pose_dim, (B, out_channels, H, W) the noisy
        target; H = W = input_size, except in a multi-scale model (any multiples of the patch);
        t: (B,) float timesteps in [0, 1000); y: (B, L, cond_dim) condition tokens;
        mask: (B, L) bool/0-1, True for real tokens, or None;
        img_hw: (B, 2) image height and width in pixels, aspect_ratio: (B, 1) height / width: both
        given iff multi_scale (PixArt-alpha's micro-conditions, as the release's `data_info`);
        drop_cond: (B,) bool, True forces the null condition (CFG); None in training draws it with
        cond_dropout_prob, from `generator` if given;
        source: (B, out_channels, H, W) the source view, pose: (B, pose_dim) the relative camera
        pose: both given iff pose_dim > 0; a dropped sample sees a zero source and keeps its pose;
        return_block: k in 1..depth to also return the tokens after the k-th block (REPA aligns them).
        Returns (B, pred_channels, H, W), or with return_block (that, (B, h*w, D)).
        """
        self._check_inputs(x, y, mask, source, pose, img_hw, aspect_ratio)
        if mask is not None:
            mask = mask.bool()
        y, dropped = self.y_embedder.token_drop(y, drop_cond, generator)
        if self.pose_dim:
            x, y = self.add_view(x, y, source, pose, dropped)
        grid_hw = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        latent_tokens = self.x_embedder(x) + self.position_embedding(grid_hw, x.device, x.dtype)
        adaln_input = self.t_embedder(t)
        if self.multi_scale:
            adaln_input = adaln_input + torch.cat([self.csize_embedder(img_hw), self.ar_embedder(aspect_ratio)], dim=1)
        cond_tokens = self.y_embedder(y)
        for depth, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and torch.is_grad_enabled():
                latent_tokens = checkpoint(block, latent_tokens, adaln_input, cond_tokens, mask, use_reentrant=False)
            else:
                latent_tokens = block(latent_tokens, adaln_input, cond_tokens, mask)
            if depth == return_block:
                block_tokens = latent_tokens
        output = self.unpatchify(self.final_layer(latent_tokens, adaln_input), grid_hw)
        return output if return_block is None else (output, block_tokens)

    def add_view(self, x, y, source, pose, dropped):
        """NVS: x (B, C, H, W), y (B, L, cond_dim), source (B, C, H, W), pose (B, pose_dim), dropped
        (B,) bool or None -> x (B, 2C, H, W) with the source view, y (B, L, cond_dim) with the pose.

        A dropped sample's source becomes zeros: the unconditional branch sees no image of the
        object at all (Zero-1-to-3's), only the pose.
        """
        if dropped is not None:
            source = torch.where(dropped[:, None, None, None], torch.zeros_like(source), source)
        pose_tokens = pose.to(y.dtype)[:, None].expand(-1, y.shape[1], -1)
        y = self.pose_mixer(torch.cat([y, pose_tokens], dim=-1))
        return torch.cat([x, source.to(x.dtype)], dim=1), y

    def forward_with_cfg(self, x, t, y, cfg_scale, mask=None, **inputs):
        """Classifier-free guidance in one batch: eps_u + s * (eps_c - eps_u) on the epsilon
        channels only; the variance channels come from the conditional half. `inputs`: source and
        pose for NVS, img_hw and aspect_ratio for the multi-scale model. Shapes as forward."""
        batch = x.shape[0]
        drop_cond = torch.arange(2 * batch, device=x.device) >= batch
        doubled = lambda a: None if a is None else torch.cat([a, a])
        inputs = {name: doubled(value) for name, value in inputs.items()}
        out = self.forward(doubled(x), doubled(t), doubled(y), doubled(mask), drop_cond=drop_cond, **inputs)
        eps, rest = out[:, : self.out_channels], out[:, self.out_channels:]
        eps_cond, eps_uncond = eps.chunk(2)
        guided = eps_uncond + cfg_scale * (eps_cond - eps_uncond)
        return torch.cat([guided, rest[:batch]], dim=1)

    def _check_inputs(self, x, y, mask, source, pose, img_hw, aspect_ratio):
        C, S, p = self.out_channels if self.pose_dim else self.in_channels, self.input_size, self.patch_size
        if self.multi_scale:
            if x.ndim != 4 or x.shape[1] != C or x.shape[2] % p or x.shape[3] % p:
                raise ValueError(f"LumosDiT input x has shape {tuple(x.shape)}, expected (B, {C}, H, W) with H and W "
                                 f"multiples of the patch size {p}")
        elif x.ndim != 4 or tuple(x.shape[1:]) != (C, S, S):
            raise ValueError(f"LumosDiT input x has shape {tuple(x.shape)}, expected (B, {C}, {S}, {S})")
        if y.ndim != 3 or y.shape[-1] != self.cond_dim or y.shape[1] > self.cond_tokens:
            raise ValueError(f"LumosDiT condition y has shape {tuple(y.shape)}, "
                             f"expected (B, L<={self.cond_tokens}, {self.cond_dim})")
        if mask is not None and tuple(mask.shape) != tuple(y.shape[:2]):
            raise ValueError(f"LumosDiT mask has shape {tuple(mask.shape)}, expected {tuple(y.shape[:2])}")
        if not self.multi_scale and (img_hw is not None or aspect_ratio is not None):
            raise ValueError("LumosDiT: img_hw and aspect_ratio are inputs of a multi-scale model; this one is not")
        if self.multi_scale and (img_hw is None or aspect_ratio is None or tuple(img_hw.shape) != (len(x), 2)
                                 or tuple(aspect_ratio.shape) != (len(x), 1)):
            raise ValueError(f"a multi-scale LumosDiT needs img_hw ({len(x)}, 2) and aspect_ratio ({len(x)}, 1), got "
                             f"{None if img_hw is None else tuple(img_hw.shape)} and "
                             f"{None if aspect_ratio is None else tuple(aspect_ratio.shape)}")
        if not self.pose_dim:
            if source is not None or pose is not None:
                raise ValueError("LumosDiT: source and pose are inputs of a model with pose_dim > 0 (NVS); "
                                 "this one has pose_dim=0")
            return
        if source is None or pose is None:
            raise ValueError(f"LumosDiT with pose_dim={self.pose_dim} (NVS) needs both source and pose")
        if tuple(source.shape) != tuple(x.shape) or tuple(pose.shape) != (x.shape[0], self.pose_dim):
            raise ValueError(f"LumosDiT: source {tuple(source.shape)} must match x {tuple(x.shape)} and pose "
                             f"{tuple(pose.shape)} must be ({x.shape[0]}, {self.pose_dim})")


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size, lewei_scale=1.0, base_size=16):
    """grid_size h (= w) or (h, w) -> (h*w, embed_dim), token by token row after row: the first half
    encodes the column (x), the second half the row (y). An axis of n tokens is at
    arange(n) / (n / base_size) / lewei_scale: any grid spans the base grid's range, scaled."""
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = np.arange(h, dtype=np.float32) / (h / base_size) / lewei_scale
    cols = np.arange(w, dtype=np.float32) / (w / base_size) / lewei_scale
    col, row = np.meshgrid(cols, rows)
    return np.concatenate([get_1d_sincos_pos_embed(embed_dim // 2, col),
                           get_1d_sincos_pos_embed(embed_dim // 2, row)], axis=1)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """pos (any shape) -> (pos.size, embed_dim) as [sin, cos]."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DiT_models = {
    f"DiT-{size}/{patch}": partial(LumosDiT, depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for size, (depth, width, heads) in _SIZES.items() for patch in (2, 4, 8)
}


def build_model(name, **overrides):
    """DiT_models[name](**overrides) with a clear error for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(DiT_models)}")
    return DiT_models[name](**overrides)


#################################################################################
#                                 Saved configs                                 #
#################################################################################

def upgrade_config(config):
    """A LumosDiT config saved by an earlier version -> a new dict in today's form (a current
    config comes back equal). Earlier versions called the condition dropout `class_dropout_prob`,
    and built NVS models (in_channels = 2 * out_channels) as a subclass with no `pose_dim` key
    and a 4-d pose; none was multi-scale before `multi_scale` was saved."""
    config = dict(config)
    config.setdefault("multi_scale", False)
    if "class_dropout_prob" in config:
        config["cond_dropout_prob"] = config.pop("class_dropout_prob")
    if "pose_dim" not in config:
        channels = config.get("in_channels", 4)
        config["pose_dim"] = 4 if channels == 2 * config.get("out_channels", channels) else 0
    return config


#################################################################################
#           Weights on disk: exports, training checkpoints, the release         #
#################################################################################

# torch.distributed.checkpoint works in a single process too, and warns about it at every load and save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def checkpoint_dir(out):
    return os.path.join(out, "checkpoints")


def latest_checkpoint(out):
    """Path of the latest complete checkpoint of the run folder `out`, or None. A save killed
    midway leaves only a `.tmp` folder, which is never "latest" (train_i2i renames it to its final
    name as the commit point, then points `latest` at it)."""
    pointer = os.path.join(checkpoint_dir(out), "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(checkpoint_dir(out), f.read().strip())
        if os.path.isdir(path):
            return path
    complete = sorted(d for d in os.listdir(checkpoint_dir(out)) if d.startswith("step_") and not d.endswith(".tmp")) \
        if os.path.isdir(checkpoint_dir(out)) else []
    return os.path.join(checkpoint_dir(out), complete[-1]) if complete else None


def export_metadata(path):
    """The metadata of an `ema.safetensors` export (read without loading its tensors)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open_safetensors(path) as f:  # a damaged file: one line, not SafetensorError's traceback
        raw = f.metadata() or {}
    if "lumos" not in raw:
        raise ValueError(f"{path}: no 'lumos' metadata; not an export of train_i2i.py")
    return {k: json.loads(v) for k, v in raw.items()}


WEIGHT_FILES = (".safetensors", ".pth", ".pt", ".bin")


def read_weights(spec, entry="ema"):
    """(state dict, info) of a trained LumosDiT. `spec`:
      *.safetensors   a training script's export (EMA weights; its metadata gives the run's settings)
      a folder        a training checkpoint (DCP, `checkpoints/step_N`) or a run folder (its latest
                      checkpoint); `entry` picks its "ema" or "model" weights
      *.pth/.pt/.bin  the official `Lumos_I2I.pth` or `Lumos_T2I.pth` (multi-scale): a state dict,
                      possibly nested under "state_dict", "model" or "ema"; the sizes are read off the
                      tensors
      OWNER/REPO/FILE one of those files in a Hub repo (e.g. Xiaomabufei/lumos/Lumos_T2I.pth), when
                      no local path has that name: downloaded and cached by huggingface_hub
    info: "config" (LumosDiT config, in today's form), "task", and the settings of the run: "model",
    "vae", "encoder", "image_size", "prediction" and the task's own (None where the file does not
    say: an official file, marked "release", says only what its tensors show)."""
    spec = hub_file(str(spec))
    if spec.endswith(".safetensors"):
        state, info = _read_export(spec)
    elif os.path.isdir(spec):
        state, info = _read_checkpoint(spec, entry)
    elif spec.endswith(WEIGHT_FILES[1:]):
        state, info = _read_official(spec)
    else:
        raise ValueError(f"{spec}: expected an ema.safetensors export, a checkpoint or run folder, "
                         f"or a .pth state dict")
    return state, {**info, "config": upgrade_config(info["config"])}


def hub_file(spec):
    """The local path of `spec`: itself when it exists or is not OWNER/REPO/FILE, else the Hub file."""
    parts = spec.split("/")
    if os.path.exists(spec) or spec.startswith((".", "/")) or len(parts) < 3 or not spec.endswith(WEIGHT_FILES):
        return spec
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        path = locate(repo, filename)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{spec}: no such local file, nor a file of the Hub repo {repo} ({error})") from None
    if path is None:
        raise FileNotFoundError(f"{spec}: no such local file, and the Hub repo {repo} has no {filename}")
    return str(path)


def _read_export(path):
    lumos = export_metadata(path)["lumos"]
    with open_safetensors(path) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, {**lumos, "task": lumos.get("task", "i2i")}


def _read_checkpoint(folder, entry):
    path = folder if os.path.exists(os.path.join(folder, "run_config.json")) else latest_checkpoint(folder)
    if path is None:
        raise FileNotFoundError(f"{folder}: neither a checkpoint (no run_config.json) nor a run folder "
                                f"with a complete checkpoint under checkpoints/")
    with open(os.path.join(path, "run_config.json")) as f:
        run_config = json.load(f)
    config = upgrade_config(run_config["model_config"])
    state = {entry: LumosDiT(**config).state_dict()}
    dcp.load(state, checkpoint_id=path)
    info = {k: run_config.get(k) for k in ("model", "vae", "encoder", "image_size", "prediction")}
    task_metadata = run_config.get("task_metadata", {})
    return state[entry], {**info, **task_metadata, "task": task_metadata.get("task", "i2i"), "config": config}


def _read_official(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    state = load_weights_only(path)  # a damaged file or one holding code: a one-line ValueError
    for key in ("state_dict", "model", "ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise ValueError(f"{path}: not a LumosDiT state dict (no x_embedder.proj.weight)")
    config, name = config_from_state(state, path)
    # Its training size: a 4-channel model works on SD-VAE latents, 8x smaller than the image.
    image_size = config["input_size"] * (8 if config["in_channels"] == 4 else 1)
    # Weights only ("release"): the I2I model, or the multi-scale one, the release's T2I model.
    return state, {"config": config, "task": "t2i" if config["multi_scale"] else "i2i", "release": True, "model": name,
                   "vae": None, "encoder": None, "image_size": image_size, "prediction": None}


def config_from_state(state, source):
    """(LumosDiT config, DiT_models name) of a state dict with the official keys: `Lumos_I2I.pth`,
    or the multi-scale `Lumos_T2I.pth` (it has csize_embedder.*), whose lewei_scale is PixArt-alpha's
    rule, 1 at 512 px and 2 at 1024 px (the release builds its 1024 px model with 2.0)."""
    width, channels, patch = state["x_embedder.proj.weight"].shape[:3]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    sizes = {name: make.keywords for name, make in DiT_models.items()}
    same_size = [n for n, kw in sizes.items()
                 if (kw["depth"], kw["hidden_size"], kw["patch_size"]) == (depth, width, patch)]
    if not same_size:
        raise ValueError(f"{source}: depth {depth}, width {width}, patch {patch} is none of dit.DiT_models")
    name = same_size[0]
    null_condition = state["y_embedder.y_embedding"]
    grid = math.isqrt(state["pos_embed"].shape[1]) if "pos_embed" in state else 32 // patch
    predicted = state["final_layer.linear.weight"].shape[0] // patch ** 2
    multi_scale = "csize_embedder.mlp.0.weight" in state
    image_size = grid * patch * (8 if channels == 4 else 1)
    config = dict(input_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=width, depth=depth,
                  num_heads=sizes[name]["num_heads"], mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
                  cond_dim=null_condition.shape[1], cond_tokens=null_condition.shape[0],
                  learn_sigma=predicted == 2 * channels, cond_dropout_prob=0.1,
                  lewei_scale=image_size / 512 if multi_scale else 1.0, out_channels=channels, pose_dim=0,
                  multi_scale=multi_scale)
    return config, name


#################################################################################
#                                     FLOPs                                     #
#################################################################################

def forward_flops(model, batch_size=1, cond_len=None):
    """Analytic forward FLOPs (2 per multiply-add) of the matmuls, convolution and attention;
    elementwise work is left out, as in the DiT paper and nanoGPT."""
    D, T = model.hidden_size, (model.input_size // model.patch_size) ** 2
    L = cond_len or model.cond_tokens
    patch_in = model.in_channels * model.patch_size ** 2
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    embed = T * patch_in * D + (256 * D + D * D) + L * (model.cond_dim * D + D * D)
    if model.pose_dim:
        embed += L * (model.cond_dim + model.pose_dim) * model.cond_dim  # pose mixer
    if model.multi_scale:  # the size and aspect-ratio embedders, a scalar each
        embed += sum(256 * width + width ** 2 for width in (D // 3, D // 3, D - 2 * (D // 3)))
    per_block = (D * 6 * D                     # adaLN modulation
                 + T * D * 3 * D + T * D * D   # self-attention qkv, proj
                 + 2 * T * T * D               # self-attention scores and values
                 + 2 * T * D * D + L * D * 2 * D  # cross-attention q, proj, kv
                 + 2 * T * L * D               # cross-attention scores and values
                 + 2 * T * D * mlp_hidden)     # MLP
    final = T * D * model.patch_size ** 2 * model.pred_channels
    return 2 * batch_size * (embed + len(model.blocks) * per_block + final)
