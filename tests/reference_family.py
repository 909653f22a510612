"""Transcriptions of REPA's successors, for comparing this project with them on identical tensors.

- REG, github.com/Martinser/REG @ 021ea2e50c38c5803bd9afff16316958a01fbd1d: ``models/sit.py`` (FinalLayer
  L139-163, SiT.__init__ L201-223, forward L282-315, get_2d_sincos_pos_embed with cls_token/extra_tokens
  L323-338) and ``loss.py`` (SILoss.__call__ L52-102), ``train.py`` (target = [x_norm_clstoken,
  x_norm_patchtokens] L305-308; total loss L318-321). The blocks, embedders and patch embedding are the
  ones of official REPA (tests/reference_repa.py), which REG's file repeats.
- iREPA, github.com/End2End-Diffusion/iREPA @ 99ad4ac234efe8de52ce157120f72856e836d09f: ``ldm/utils.py``
  spatial_zscore L113-127; ``ldm/models/sit.py`` ProjectionLayer, conv branch L48-53 and L67-79.
- Dispersive loss, the official PyTorch ``disp_loss`` as carried by github.com/whaletech-ai/Disperse-Loss @
  24a50442d9ba219b3205f66f95c91b4a605e4e95 ``transport/transport.py`` (``Transport.disp_loss``, applied to
  ``act[-1]``, the last block's output, with weight 0.25 in ``training_losses``).
- HASTE, github.com/NUS-HPC-AI-Lab/HASTE @ eb7b1f1f0210abc5e533685ce1b386588be503bd ``train.py`` L293-303:
  the alignment terms are zero once ``global_step`` (steps completed) reaches ``--early-stop-point``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference_repa as repa


# -- REG: models/sit.py ---------------------------------------------------------------------------------
class RegFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, cls_token_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.linear_cls = nn.Linear(hidden_size, cls_token_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, cls=None):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = repa.modulate(self.norm_final(x), shift, scale)
        if cls is None:
            return self.linear(x), None
        cls_token = self.linear_cls(x[:, 0]).unsqueeze(1)
        x = self.linear(x[:, 1:])
        return x, cls_token.squeeze(1)


def reg_pos_embed(embed_dim, grid_size):
    """get_2d_sincos_pos_embed(..., cls_token=1, extra_tokens=1): a zero row in front of the grid's."""
    pos = repa.get_2d_sincos_pos_embed(embed_dim, grid_size)
    return np.concatenate([np.zeros([1, embed_dim]), pos], axis=0)


class RegSiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, decoder_hidden_size=768,
                 encoder_depth=8, depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 z_dims=(768,), projector_dim=2048):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.encoder_depth = patch_size, encoder_depth
        self.x_embedder = repa.PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = repa.TimestepEmbedder(hidden_size)
        self.y_embedder = repa.LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([repa.SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.projectors = nn.ModuleList([repa.build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        cls_token_dim = z_dims[0]
        self.final_layer = RegFinalLayer(decoder_hidden_size, patch_size, self.out_channels, cls_token_dim)
        self.cls_projectors2 = nn.Linear(in_features=cls_token_dim, out_features=hidden_size, bias=True)
        self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        pos = reg_pos_embed(hidden_size, int(num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))

    def forward(self, x, t, y, cls_token=None):
        x = self.x_embedder(x)
        cls_token = self.cls_projectors2(cls_token)
        cls_token = self.wg_norm(cls_token)
        cls_token = cls_token.unsqueeze(1)
        x = torch.cat((cls_token, x), dim=1)
        x = x + self.pos_embed
        n, t_, d = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs = [projector(x.reshape(-1, d)).reshape(n, t_, -1) for projector in self.projectors]
        x, cls_token = self.final_layer(x, c, cls=cls_token)
        return self.unpatchify(x), zs, cls_token


# -- REG: loss.py SILoss.__call__ (linear path, v prediction) and train.py's total --------------------------
def mean_flat(x):
    return torch.mean(x, dim=list(range(1, len(x.size()))))


def reg_loss(model, images, y, zs, cls_token, time_input, noises, noises_cls, proj_coeff=0.5, cls_coeff=0.03):
    time_input = time_input.view(-1, 1, 1, 1)
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = 1 - time_input, time_input, -1, 1
    model_input = alpha_t * images + sigma_t * noises
    cls_input = alpha_t.squeeze(-1).squeeze(-1) * cls_token + sigma_t.squeeze(-1).squeeze(-1) * noises_cls
    model_target = d_alpha_t * images + d_sigma_t * noises
    cls_target = d_alpha_t * cls_token + d_sigma_t * noises_cls
    model_output, zs_tilde, cls_output = model(model_input, time_input.flatten(), y, cls_token=cls_input)
    denoising_loss = mean_flat((model_output - model_target) ** 2)
    denoising_loss_cls = mean_flat((cls_output - cls_target) ** 2)
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        for z_j, z_tilde_j in zip(z, z_tilde, strict=True):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss += mean_flat(-(z_j * z_tilde_j).sum(dim=-1))
    proj_loss /= len(zs) * bsz
    return denoising_loss.mean() + proj_loss.mean() * proj_coeff + denoising_loss_cls.mean() * cls_coeff


# -- iREPA: ldm/utils.py and ldm/models/sit.py ------------------------------------------------------------
def irepa_spatial_zscore(feat, alpha=1.0, eps=1e-6):
    mean = feat.mean(dim=1, keepdim=True)
    std = feat.std(dim=1, keepdim=True)
    return (feat - alpha * mean) / (std + eps)


class IrepaConvProjection(nn.Module):
    def __init__(self, hidden_size, z_dim, kernel_size):
        super().__init__()
        self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size=kernel_size, stride=1,
                                          padding=kernel_size // 2)

    def forward(self, x):
        b, t, d = x.shape
        h = w = int(math.isqrt(t))
        assert h * w == t
        x_ = x.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        y = self.projection_layer(x_)
        y = y.permute(0, 2, 3, 1).contiguous()
        return y.reshape(b, t, -1)


# -- Dispersive loss: Transport.disp_loss --------------------------------------------------------------------
def disp_loss(z):
    z = z.reshape((z.shape[0], -1))
    diff = torch.nn.functional.pdist(z).pow(2) / z.shape[1]
    diff = torch.concat((diff, diff, torch.zeros(z.shape[0])))
    return torch.log(torch.exp(-diff).mean())


def disp_loss_tau(z, tau):
    """The paper's form (its Eq. for the InfoNCE-L2 variant) with a temperature: exp(-D(z_i, z_j) / tau)."""
    z = z.reshape((z.shape[0], -1))
    diff = torch.nn.functional.pdist(z).pow(2) / z.shape[1]
    diff = torch.concat((diff, diff, torch.zeros(z.shape[0])))
    return torch.log(torch.exp(-diff / tau).mean())


# -- HASTE: train.py's switch ------------------------------------------------------------------------------
def haste_aligns(global_step, early_stop_point):
    """Whether the update made after ``global_step`` completed steps still carries the alignment loss."""
    return not global_step >= early_stop_point


# -- iREPA: its SiT is REPA's with ProjectionLayer projectors (ldm/models/sit.py L33-79, L274-276) ----------------
class IrepaMlpProjection(nn.Module):
    def __init__(self, hidden_size, z_dim, projector_dim):
        super().__init__()
        self.projection_layer = repa.build_mlp(hidden_size, projector_dim, z_dim)

    def forward(self, x):
        b, t, d = x.shape
        return self.projection_layer(x.reshape(b * t, d)).reshape(b, t, -1)


def irepa_sit(projection_layer_type="conv", proj_kwargs_kernel_size=1, **kw):
    """iREPA's SiT: REPA's, with ``projectors`` built from ProjectionLayer (applied as ``projector(x)``)."""
    model = repa.SiT(**kw)
    hidden, dims, pdim = model.x_embedder.proj.out_channels, kw["z_dims"], kw["projector_dim"]
    model.projectors = nn.ModuleList(
        IrepaConvProjection(hidden, z, proj_kwargs_kernel_size) if projection_layer_type == "conv"
        else IrepaMlpProjection(hidden, z, pdim) for z in dims)
    return model


def irepa_forward(model, x, t, y):
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    zs = None
    for i, block in enumerate(model.blocks):
        x = block(x, c)
        if (i + 1) == model.encoder_depth:
            zs = [projector(x) for projector in model.projectors]
    return model.unpatchify(model.final_layer(x, c)), zs
