"""VRWKV ViT-Adapter: the dense backbone of the official Vision-RWKV ADE20K / COCO models, as a timm family.

A re-implementation of ``VRWKV_Adapter`` (OpenGVLab/Vision-RWKV @ 0e0e38a, ``segmentation/mmseg_custom``),
itself ViT-Adapter (Chen et al., ICLR 2023) around a Vision-RWKV. Three parts:

* the plain VRWKV (``medurwkv.nets.vrwkv``: patch embedding, resized position embedding, ``Block``) that
  works on stride-16 tokens;
* a ``SpatialPriorModule``: a small conv net that gives stride 4/8/16/32 maps, the last three flattened to
  one token sequence ``c``;
* one ``InteractionBlock`` per group of VRWKV blocks: an ``Injector`` (VRWKV tokens query ``c`` with
  multi-scale deformable attention), the group of blocks, an ``Extractor`` (``c`` queries the VRWKV tokens,
  then a ConvFFN). The last group has two more extractors.

``VisionRWKVAdapter.forward`` returns four C-channel maps at strides 4, 8, 16, 32, the official output.
``MSDeformAttn`` is plain PyTorch (``F.grid_sample``); it reproduces the official CUDA op's sampling:
bilinear, pixel centres at half-integers, zeros outside the map.

Official checkpoints (``upernet_vrwkv_adapter_*_512_160k_ade20k.pth``: ``{'state_dict': {'backbone.*',
'decode_head.*', 'auxiliary_head.*'}, 'meta': ...}``) load unchanged:
``timm.create_model('vrwkv_adapter_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
SyncBatchNorm is replaced by ``nn.BatchNorm2d`` (same state-dict keys). To start from an ImageNet VRWKV
classifier instead, as the official ADE20K training did, use ``model.load_pretrained(PATH, strict=False)``.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv

from ..checkpoint import CheckpointError, load_state_dict_strict, load_weights
from .vrwkv import VisionRWKV, build_with_local_weights, shape_str
from .vrwkv import checkpoint_filter_fn as vrwkv_checkpoint_filter_fn

__all__ = [
    "VisionRWKVAdapter",
    "SpatialPriorModule",
    "MSDeformAttn",
    "ms_deform_attn_sample",
    "Injector",
    "Extractor",
    "InteractionBlock",
    "DeformInputs",
    "deform_inputs",
    "checkpoint_filter_fn",
    "PretrainedLoadReport",
    "ADAPTER_VARIANTS",
    "OFFICIAL_DROP_PATH",
]

_logger = logging.getLogger(__name__)

# Hyper-parameters of the official ADE20K configs (segmentation/configs/ade20k/
# upernet_vrwkv_adapter_{tiny,small,base,large}_512_160k_ade20k.py). Common to all four: patch 16,
# conv_inplane 64, n_points 4, cffn_ratio 0.25. Note that the adapter's layer scale differs from the
# ImageNet classifiers' (tiny: 1 instead of none; small: 1e-5 instead of 1).
_GROUPS_12 = ((0, 2), (3, 5), (6, 8), (9, 11))
ADAPTER_VARIANTS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        embed_dim=192, depth=12, post_norm=False, init_values=1.0, key_norm=False,
        deform_num_heads=6, deform_ratio=1.0, img_size=224, interaction_indexes=_GROUPS_12,
    ),
    "small": dict(
        embed_dim=384, depth=12, post_norm=True, init_values=1e-5, key_norm=False,
        deform_num_heads=6, deform_ratio=1.0, img_size=224, interaction_indexes=_GROUPS_12,
    ),
    "base": dict(
        embed_dim=768, depth=12, post_norm=True, init_values=1e-5, key_norm=False,
        deform_num_heads=12, deform_ratio=0.5, img_size=224, interaction_indexes=_GROUPS_12,
    ),
    "large": dict(
        embed_dim=1024, depth=24, post_norm=True, init_values=1e-5, key_norm=True,
        deform_num_heads=16, deform_ratio=0.5, img_size=192, interaction_indexes=((0, 5), (6, 11), (12, 17), (18, 23)),
    ),
}
# Stochastic depth used for the official ADE20K fine-tunes. Not the constructor default (0.0, so that a
# model built for inference or feature extraction is deterministic); pass drop_path_rate=... to train.
OFFICIAL_DROP_PATH: Dict[str, float] = {"tiny": 0.1, "small": 0.2, "base": 0.3, "large": 0.4}

_STRIDE = 32  # coarsest stride of the pyramid: H and W must be multiples of it


# --- multi-scale deformable attention ---------------------------------------------------------------------------
class DeformInputs(NamedTuple):
    """Geometry of one deformable-attention direction (see ``deform_inputs``).

    Attributes:
        reference_points: (1, Lq, 1, 2) float32 (x, y) of every query token, normalised to [0, 1] over the
            image (pixel centres of the query's own grid); shared by all value levels.
        value_shapes: (h, w) of each value level, in the order the levels are concatenated.
        query_shapes: (h, w) of each query level (the Extractor's ConvFFN needs them to un-flatten tokens).
    """

    reference_points: torch.Tensor
    value_shapes: List[Tuple[int, int]]
    query_shapes: List[Tuple[int, int]]


def _reference_points(shapes: List[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Pixel centres ((i + 0.5) / size) of each grid, row-major, levels concatenated: (1, sum h*w, 1, 2).

    Built in float32 with linspace-then-divide, as the official ``get_reference_points``, so that the sampling
    positions round exactly like the official model's."""
    points: List[torch.Tensor] = []
    for h, w in shapes:
        ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h
        xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    return torch.cat(points, dim=0)[None, :, None, :]


def deform_inputs(x: torch.Tensor) -> Tuple[DeformInputs, DeformInputs]:
    """Geometry of the two attention directions for an image batch ``x`` (B, C, H, W).

    Returns:
        ``(inject, extract)``. ``inject``: the stride-16 VRWKV tokens query the SPM tokens at strides 8, 16
        and 32. ``extract``: the SPM tokens (three levels) query the stride-16 VRWKV tokens.
    """
    H, W = x.shape[-2], x.shape[-1]
    spm_levels = [(H // 8, W // 8), (H // 16, W // 16), (H // 32, W // 32)]
    vit_level = [(H // 16, W // 16)]
    inject = DeformInputs(_reference_points(vit_level, x.device), spm_levels, vit_level)
    extract = DeformInputs(_reference_points(spm_levels, x.device), vit_level, spm_levels)
    return inject, extract


def ms_deform_attn_sample(
    value: torch.Tensor,
    value_shapes: List[Tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Core of multi-scale deformable attention: weighted sum of bilinearly sampled values.

    Same semantics as the official CUDA op ``MultiScaleDeformableAttention`` (and its reference
    ``ms_deform_attn_core_pytorch``): a location (x, y) in [0, 1] maps to pixel (x * w - 0.5, y * h - 0.5) of its
    level, corners outside the map contribute zero (``grid_sample``, ``align_corners=False``, zeros padding).

    Args:
        value: (N, S, M, D) values of M heads, levels concatenated row-major (S = sum h*w).
        value_shapes: (h, w) of each level.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) for L levels and P points.
        attention_weights: (N, Lq, M, L, P), already normalised.

    Returns:
        (N, Lq, M * D) in ``value``'s dtype (computed in at least float32).
    """
    N, S, M, D = value.shape
    Lq, L = sampling_locations.shape[1], sampling_locations.shape[3]
    sizes = [h * w for h, w in value_shapes]
    if S != sum(sizes) or L != len(value_shapes):
        raise ValueError(f"value has {S} tokens in {L} levels, but value_shapes are {value_shapes}")
    # grid_sample in half precision would blur sampling positions; the official op also runs in float32
    dtype = torch.promote_types(value.dtype, torch.float32)
    grids = (2 * sampling_locations.to(dtype) - 1).transpose(1, 2).flatten(0, 1)  # (N*M, Lq, L, P, 2)
    weights = attention_weights.to(dtype).transpose(1, 2).flatten(0, 1)  # (N*M, Lq, L, P)
    out = value.new_zeros((N * M, D, Lq), dtype=dtype)
    for level, v in enumerate(value.to(dtype).split(sizes, dim=1)):
        h, w = value_shapes[level]
        v = v.permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        sampled = F.grid_sample(v, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)  # (N*M, D, Lq, P)
        out = out + (sampled * weights[:, None, :, level]).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), with the value width scaled by ``ratio`` as in
    ViT-Adapter. Every query attends to ``n_points`` learned offsets around its reference point on each of
    ``n_levels`` value maps, per head; offsets are in pixels of the level they sample.

    Parameter names and shapes follow the official module: ``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``."""

    def __init__(self, dim: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, ratio: float = 1.0):
        super().__init__()
        value_dim = int(dim * ratio)
        if value_dim % n_heads:
            raise ValueError(f"MSDeformAttn: value width int({dim} * {ratio}) = {value_dim} is not divisible by n_heads={n_heads}")
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.head_dim = value_dim // n_heads
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: no learned offsets yet; head m starts looking in direction
        2*pi*m/n_heads (scaled so the larger component is 1 pixel), point p at p+1 times that; uniform
        attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([theta.cos(), theta.sin()], dim=-1)
        direction = direction / direction.abs().amax(dim=-1, keepdim=True)
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = direction.view(self.n_heads, 1, 1, 2) * distance  # (heads, 1, points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor, value_shapes: List[Tuple[int, int]]
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, dim).
            reference_points: (N or 1, Lq, L or 1, 2) normalised (x, y) in [0, 1].
            value: (N, S, dim), the ``len(value_shapes)`` levels flattened row-major and concatenated.
            value_shapes: (h, w) of each level.

        Returns:
            (N, Lq, dim).
        """
        N, Lq, _ = query.shape
        if len(value_shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn built for {self.n_levels} levels, got {len(value_shapes)}")
        M, L, P = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(N, value.shape[1], M, self.head_dim)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = F.softmax(self.attention_weights(query).view(N, Lq, M, L * P), dim=-1).view(N, Lq, M, L, P)
        # offsets are in pixels of each level: divide by that level's (w, h) to move in normalised units
        dtype = torch.promote_types(offsets.dtype, torch.float32)
        size = torch.tensor([[float(w), float(h)] for h, w in value_shapes], dtype=dtype, device=query.device)
        locations = reference_points.to(dtype)[:, :, None, :, None, :] + offsets.to(dtype) / size[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(v, value_shapes, locations, weights))


# --- adapter building blocks ------------------------------------------------------------------------------------
def _conv_bn_relu(in_chs: int, out_chs: int, stride: int) -> List[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem giving the local spatial prior of ViT-Adapter: maps at strides 4, 8, 16, 32, each projected
    to ``embed_dim`` by a 1x1 conv (``fc1``..``fc4``).

    The official module uses SyncBatchNorm; ``nn.BatchNorm2d`` has the same parameters and state-dict keys
    (convert with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training)."""

    def __init__(self, in_chans: int = 3, inplanes: int = 64, embed_dim: int = 384):
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(in_chans, inplanes, 2),
            *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``c1`` as a (B, C, H/4, W/4) map and ``c2``, ``c3``, ``c4`` as (B, h*w, C) tokens."""
        s4 = self.stem(x)
        s8 = self.conv2(s4)
        s16 = self.conv3(s8)
        s32 = self.conv4(s16)
        t8 = self.fc2(s8).flatten(2).transpose(1, 2)
        t16 = self.fc3(s16).flatten(2).transpose(1, 2)
        t32 = self.fc4(s32).flatten(2).transpose(1, 2)
        return self.fc1(s4), t8, t16, t32


class DWConv(nn.Module):
    """3x3 depth-wise conv applied to each level of a multi-level token sequence on its own grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, shapes: List[Tuple[int, int]]) -> torch.Tensor:
        B, _, C = x.shape
        levels = x.split([h * w for h, w in shapes], dim=1)
        out: List[torch.Tensor] = []
        for i, t in enumerate(levels):
            h, w = shapes[i]
            out.append(self.dwconv(t.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """Linear -> depth-wise 3x3 conv (per level) -> GELU -> Linear: an MLP with some local mixing."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, shapes: List[Tuple[int, int]]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # the adapter's norms use eps 1e-6, unlike the VRWKV blocks (1e-5)


class Injector(nn.Module):
    """VRWKV tokens <- SPM tokens: ``x + gamma * MSDeformAttn(norm(x), norm(c))``. ``gamma`` starts at 0
    so that a pretrained VRWKV is undisturbed at the start of fine-tuning."""

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, n_levels: int = 3, deform_ratio: float = 1.0, init_values: float = 0.0):
        super().__init__()
        self.query_norm = _norm(dim)
        self.feat_norm = _norm(dim)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, geometry: DeformInputs) -> torch.Tensor:
        attn = self.attn(self.query_norm(x), geometry.reference_points, self.feat_norm(c), geometry.value_shapes)
        return x + self.gamma * attn


class Extractor(nn.Module):
    """SPM tokens <- VRWKV tokens: ``c + MSDeformAttn(norm(c), norm(x))``, then ``c + ConvFFN(norm(c))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        n_levels: int = 1,
        deform_ratio: float = 1.0,
        cffn_ratio: float = 0.25,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.query_norm = _norm(dim)
        self.feat_norm = _norm(dim)
        self.attn = MSDeformAttn(dim, n_levels, num_heads, n_points, deform_ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = _norm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c: torch.Tensor, x: torch.Tensor, geometry: DeformInputs) -> torch.Tensor:
        c = c + self.attn(self.query_norm(c), geometry.reference_points, self.feat_norm(x), geometry.value_shapes)
        return c + self.drop_path(self.ffn(self.ffn_norm(c), geometry.query_shapes))


class InteractionBlock(nn.Module):
    """One adapter stage: inject SPM features into the VRWKV tokens, run this stage's VRWKV blocks, extract
    the updated tokens back into the SPM features (twice more with ``extra_extractors`` in the last stage).

    The VRWKV blocks are owned by the backbone (``VisionRWKVAdapter.blocks``, so that checkpoint keys stay
    ``blocks.N``): the backbone calls ``inject``, runs the stage's blocks, then calls ``extract``. ``forward``
    does the three for a given list of blocks (eager mode only: TorchScript passes no module lists)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 6,
        n_points: int = 4,
        deform_ratio: float = 1.0,
        cffn_ratio: float = 0.25,
        init_values: float = 0.0,
        drop_path: float = 0.0,
        extra_extractor: bool = False,
    ):
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, n_levels=3, deform_ratio=deform_ratio, init_values=init_values)
        self.extractor = Extractor(dim, num_heads, n_points, n_levels=1, deform_ratio=deform_ratio, cffn_ratio=cffn_ratio, drop_path=drop_path)
        self.extra_extractors = (
            nn.ModuleList(Extractor(dim, num_heads, n_points, 1, deform_ratio, cffn_ratio, drop_path) for _ in range(2)) if extra_extractor else None
        )

    def inject(self, x: torch.Tensor, c: torch.Tensor, geometry: DeformInputs, grad_checkpointing: bool = False) -> torch.Tensor:
        """VRWKV tokens ``x`` <- SPM tokens ``c`` (the ``Injector``)."""
        if grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.injector, x, c, geometry, use_reentrant=False)
        return self.injector(x, c, geometry)

    def extract(self, c: torch.Tensor, x: torch.Tensor, geometry: DeformInputs, grad_checkpointing: bool = False) -> torch.Tensor:
        """SPM tokens ``c`` <- VRWKV tokens ``x`` (the ``Extractor``, then the extra ones of the last stage)."""
        if grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            c = torch.utils.checkpoint.checkpoint(self.extractor, c, x, geometry, use_reentrant=False)
        else:
            c = self.extractor(c, x, geometry)
        if self.extra_extractors is not None:
            for extractor in self.extra_extractors:
                if grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                    c = torch.utils.checkpoint.checkpoint(extractor, c, x, geometry, use_reentrant=False)
                else:
                    c = extractor(c, x, geometry)
        return c

    @torch.jit.unused
    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        blocks: Sequence[nn.Module],
        inject: DeformInputs,
        extract: DeformInputs,
        hw: Tuple[int, int],
        grad_checkpointing: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: (B, h*w, C) VRWKV tokens on the stride-16 grid ``hw``.
            c: (B, n, C) SPM tokens (strides 8, 16, 32 concatenated).
            blocks: the VRWKV blocks of this stage.
            inject, extract: geometry from ``deform_inputs``.
            grad_checkpointing: recompute each sub-module in the backward pass to save memory.

        Returns:
            Updated ``(x, c)``.
        """
        x = self.inject(x, c, inject, grad_checkpointing)
        for blk in blocks:
            if grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        return x, self.extract(c, x, extract, grad_checkpointing)


# --- the model --------------------------------------------------------------------------------------------------
def _check_interaction_indexes(indexes: Sequence[Sequence[int]], depth: int) -> Tuple[Tuple[int, int], ...]:
    groups = tuple((int(g[0]), int(g[-1])) for g in indexes)
    expected_start = 0
    for start, end in groups:
        if start != expected_start or end < start:
            raise ValueError(
                f"interaction_indexes must be consecutive [first, last] block groups covering 0..{depth - 1}, "
                f"got {list(map(list, indexes))}"
            )
        expected_start = end + 1
    if expected_start != depth:
        raise ValueError(f"interaction_indexes {list(map(list, indexes))} do not cover all {depth} blocks")
    return groups


class VisionRWKVAdapter(VisionRWKV):
    """Vision-RWKV with a ViT-Adapter: a dense backbone that returns four ``embed_dim``-channel feature maps
    at strides 4, 8, 16 and 32 (the official ``VRWKV_Adapter`` with ``add_rwkv_feature=True``).

    The VRWKV part (``patch_embed``, ``pos_embed``, ``blocks``) is the ``VisionRWKV`` it inherits, without its
    final norm and classifier. Input height and width must be multiples of 32.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 192,
        depth: int = 12,
        hidden_rate: int = 4,
        post_norm: bool = False,
        init_values: Optional[float] = 1.0,
        key_norm: bool = False,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 6,
        deform_ratio: float = 1.0,
        cffn_ratio: float = 0.25,
        inject_init_values: float = 0.0,
        interaction_indexes: Sequence[Sequence[int]] = _GROUPS_12,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        """
        Args:
            img_size: pretraining image size of the VRWKV; fixes the position-embedding grid (resized at run
                time for other inputs).
            patch_size: must be 16 (the adapter aligns the VRWKV grid with the stride-16 SPM map).
            in_chans: input channels (SPM stem and patch embedding).
            num_classes: must be 0; accepted because timm passes it. The adapter has no classifier.
            embed_dim, depth, hidden_rate, post_norm, init_values, key_norm: the VRWKV (see ``ADAPTER_VARIANTS``).
            conv_inplane: width of the SPM stem (64 in all official models).
            n_points: sampling points per head and level in the deformable attentions.
            deform_num_heads: heads of the deformable attentions.
            deform_ratio: value width of the deformable attentions as a fraction of ``embed_dim``.
            cffn_ratio: hidden width of the extractors' ConvFFN as a fraction of ``embed_dim``.
            inject_init_values: initial injector ``gamma`` (0: the adapter starts as a no-op on the VRWKV).
            interaction_indexes: [first, last] VRWKV block of each interaction stage.
            pos_drop_rate: dropout after the position embedding.
            drop_path_rate: stochastic depth; linearly increasing over the VRWKV blocks and constant in the
                extractors' ConvFFN, as the official code. 0 by default; the official ADE20K training used
                ``OFFICIAL_DROP_PATH`` (0.1 for tiny).
        """
        if num_classes:
            raise ValueError(f"VisionRWKVAdapter is a dense backbone without a classifier; num_classes must be 0, got {num_classes}")
        if patch_size != 16:
            raise ValueError(f"VisionRWKVAdapter needs patch_size=16 (the VRWKV grid is the stride-16 SPM level), got {patch_size}")
        if embed_dim % deform_num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by deform_num_heads={deform_num_heads}")
        groups = _check_interaction_indexes(interaction_indexes, depth)  # fail before building anything
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=embed_dim,
            depth=depth,
            hidden_rate=hidden_rate,
            post_norm=post_norm,
            init_values=init_values,
            key_norm=key_norm,
            final_norm=False,  # the official adapter drops the VRWKV's final LayerNorm (ln1 = None)
            pos_drop_rate=pos_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.in_chans = in_chans
        self.interaction_indexes = groups
        self._stage_first: List[int] = [g[0] for g in groups]  # as lists for TorchScript
        self._stage_last: List[int] = [g[1] for g in groups]
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPriorModule(in_chans, conv_inplane, embed_dim)
        n_stages = len(self.interaction_indexes)
        self.interactions = nn.ModuleList(
            InteractionBlock(
                embed_dim,
                deform_num_heads,
                n_points,
                deform_ratio,
                cffn_ratio,
                inject_init_values,
                drop_path=drop_path_rate,
                extra_extractor=i == n_stages - 1,
            )
            for i in range(n_stages)
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = nn.BatchNorm2d(embed_dim)
        self.norm2 = nn.BatchNorm2d(embed_dim)
        self.norm3 = nn.BatchNorm2d(embed_dim)
        self.norm4 = nn.BatchNorm2d(embed_dim)
        self.feature_info = [dict(module=f"norm{i + 1}", num_chs=embed_dim, reduction=2 ** (i + 2)) for i in range(4)]
        for module in (self.up, self.spm, self.interactions):
            module.apply(self._init_adapter_weights)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def _init_adapter_weights(m: nn.Module) -> None:
        # official VRWKV_Adapter._init_weights: truncated normal linears, He (fan-out) convolutions
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm API -------------------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if num_classes:
            raise ValueError("VisionRWKVAdapter has no classifier; put a segmentation/detection head on its feature maps")

    def load_pretrained(self, path: str, strict: bool = True) -> Optional["PretrainedLoadReport"]:
        """Load weights from ``path``.

        Args:
            path: an official ``upernet_vrwkv_adapter_*``/``mask_rcnn_vrwkv_adapter_*`` checkpoint (or weights
                converted from one), or, with ``strict=False``, an ImageNet VRWKV classifier checkpoint.
            strict: every weight of the model must come from the file and every backbone weight of the file
                must be used. With False, load the tensors that fit (the VRWKV part of a classifier
                checkpoint: how the official ADE20K training started) and keep the rest as initialised.

        Returns:
            With ``strict=False``, a ``PretrainedLoadReport`` of what was loaded, kept and ignored (also logged).

        Raises:
            CheckpointError: unreadable file, a VRWKV of another width/depth, or (strict) weights that do not fit.
        """
        source = str(path)
        if strict:
            self.load_checkpoint(load_weights(path), source=source)
            return None
        state_dict = checkpoint_filter_fn(load_weights(path), self, source=source)
        own = self.state_dict()
        mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
        if mismatched:
            raise CheckpointError(f"{source}: {len(mismatched)} weights have the wrong shape (e.g. {', '.join(mismatched[:4])})")
        usable = {k: v for k, v in state_dict.items() if k in own}
        self.load_state_dict(usable, strict=False)
        report = PretrainedLoadReport(
            source=source,
            loaded=sorted(usable),
            missing=[k for k in own if k not in usable],
            ignored=sorted(k for k in state_dict if k not in own),
        )
        _logger.info("%s", report)
        return report

    def load_checkpoint(self, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> int:
        """Strict load of an adapter checkpoint's tensors (official layout or converted); returns the count."""
        mapped = checkpoint_filter_fn(state_dict, self, source=source)
        if not any(k.startswith("spm.") for k in mapped):
            raise CheckpointError(
                f"{source}: a plain Vision-RWKV checkpoint (no adapter weights such as spm.*, interactions.*); "
                "to start the adapter from it, as the official ADE20K training did, use "
                "model.load_pretrained(path, strict=False)"
            )
        load_state_dict_strict(self, mapped, source=source)
        return len(mapped)

    # --- forward --------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {shape_str(x)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]} (shape {shape_str(x)})")
        H, W = x.shape[-2], x.shape[-1]
        stride = 32  # _STRIDE, as a local: TorchScript reads no module globals
        if H % stride or W % stride or H == 0 or W == 0:
            raise ValueError(
                f"VisionRWKVAdapter needs image height and width that are positive multiples of {stride} "
                f"(its coarsest feature map has stride {stride}), got shape {shape_str(x)}; pad or resize the input"
            )

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four feature maps [f1, f2, f3, f4]: (B, embed_dim, H/s, W/s) for s = 4, 8, 16, 32."""
        self._check_input(x)
        inject, extract = deform_inputs(x)
        c1, c2, c3, c4 = self.spm(x)
        n2, n3, n4 = c2.shape[1], c3.shape[1], c4.shape[1]
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)
        tokens, (h, w) = self.embed(x)
        B, _, C = tokens.shape

        stage_maps: List[torch.Tensor] = []  # the VRWKV tokens after each stage, as (B, C, h, w) maps
        for s, stage in enumerate(self.interactions):
            first, last = self._stage_first[s], self._stage_last[s]
            tokens = stage.inject(tokens, c, inject, self.grad_checkpointing)
            for i, blk in enumerate(self.blocks):  # this stage's blocks (a ModuleList is iterated whole)
                if first <= i <= last:
                    if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                        tokens = torch.utils.checkpoint.checkpoint(blk, tokens, (h, w), use_reentrant=False)
                    else:
                        tokens = blk(tokens, (h, w))
            c = stage.extract(c, tokens, extract, self.grad_checkpointing)
            stage_maps.append(tokens.transpose(1, 2).reshape(B, C, h, w))
        levels = c.split([n2, n3, n4], dim=1)
        c2 = levels[0].transpose(1, 2).reshape(B, C, 2 * h, 2 * w)
        c3 = levels[1].transpose(1, 2).reshape(B, C, h, w)
        c4 = levels[2].transpose(1, 2).reshape(B, C, h // 2, w // 2)
        c1 = self.up(c2) + c1
        # add the VRWKV stage outputs (all at stride 16) to the pyramid, resized to each level's stride
        c1 = c1 + F.interpolate(stage_maps[0], scale_factor=4.0, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(stage_maps[1], scale_factor=2.0, mode="bilinear", align_corners=False)
        c3 = c3 + stage_maps[2]
        c4 = c4 + F.interpolate(stage_maps[3], scale_factor=0.5, mode="bilinear", align_corners=False)
        return [self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """[f1, f2, f3, f4] at strides 4, 8, 16, 32, each with ``embed_dim`` channels (see ``forward_features``)."""
        return self.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError("VisionRWKVAdapter has no classification head; use its feature maps")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """The pyramid maps selected by ``indices`` (0..3 = strides 4..32), for timm's feature API.

        Args:
            x: (B, C, H, W) images, H and W multiples of 32.
            indices: last n levels if int, all if None, the given levels if a sequence.
            norm, stop_early: accepted for API compatibility. The maps always include their BatchNorm
                (``norm1``..``norm4``, part of the official output), and every level depends on every stage.
            output_fmt: ``'NCHW'`` maps or ``'NLC'`` tokens.
            intermediates_only: return only the selected maps; otherwise ``(all four maps, selected)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        take, _ = feature_take_indices(4, indices)
        feats = self.forward_features(x)
        inter = [feats[i] for i in take]
        if output_fmt == "NLC":
            inter = [f.flatten(2).transpose(1, 2) for f in inter]
        return inter if intermediates_only else (feats, inter)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Nothing can be pruned (every level depends on all stages); returns the absolute level indices."""
        take, _ = feature_take_indices(4, indices)
        return take


@dataclass
class PretrainedLoadReport:
    """What ``VisionRWKVAdapter.load_pretrained(path, strict=False)`` did."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # kept as initialised (random, or layer scale at init_values)
    ignored: List[str] = field(default_factory=list)  # in the file but not in the model (e.g. the classifier's final norm)

    @staticmethod
    def _group(keys: Sequence[str]) -> str:
        # "blocks.3.gamma1" -> "blocks.*.gamma1", "interactions.0.injector..." -> "interactions": short but complete
        groups: Dict[str, int] = {}
        for k in keys:
            parts = k.split(".")
            if parts[0] == "blocks" and len(parts) > 2:
                name = "blocks.*." + ".".join(parts[2:])
            else:
                name = parts[0]
            groups[name] = groups.get(name, 0) + 1
        return ", ".join(f"{name} ({n})" if n > 1 else name for name, n in groups.items()) or "none"

    def __str__(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors; kept as initialised {len(self.missing)}: "
            f"{self._group(self.missing)}; ignored {len(self.ignored)}: {self._group(self.ignored)}"
        )


# --- checkpoints ------------------------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionRWKVAdapter, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Official VRWKV-Adapter (or VRWKV) checkpoint -> ``model``'s names.

    * the VRWKV part exactly as ``medurwkv.nets.vrwkv.checkpoint_filter_fn``: unwrap, strip ``backbone.``, drop
      ``decode_head``/``auxiliary_head``/classifier, rename ``layers``/``patch_embed.projection``, refuse another
      width or depth, resample ``pos_embed`` to the model's ``img_size``, adapt the patch embedding's input
      channels;
    * adapts the SPM stem (``spm.stem.0.weight``) to the model's input channels too (``adapt_input_conv``);
    * supplies BatchNorm ``num_batches_tracked`` counters when a file lacks them (they do not affect outputs).
    """
    sd = vrwkv_checkpoint_filter_fn(state_dict, model, source)
    w = sd.get("spm.stem.0.weight")
    if w is not None and w.shape[1] != model.in_chans:
        sd["spm.stem.0.weight"] = adapt_input_conv(model.in_chans, w, base_chans=w.shape[1])
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith(".num_batches_tracked") and k not in sd and k.replace("num_batches_tracked", "running_mean") in sd:
            sd[k] = v.clone()
    return sd


# --- registry ---------------------------------------------------------------------------------------------------
def _cfg(origin_url: str = "", **kwargs: Any) -> Dict[str, Any]:
    # No download URL on purpose (see vrwkv._cfg): pass the file with pretrained_cfg_overlay=dict(file=PATH).
    return {
        "url": "",
        "origin_url": origin_url,
        "num_classes": 0,
        "input_size": (3, 512, 512),  # the ADE20K crop; any multiple of 32 works
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": ("patch_embed.proj", "spm.stem.0"),
        "license": "apache-2.0",
        **kwargs,
    }


_HF = "https://huggingface.co/OpenGVLab/Vision-RWKV/resolve/main/"
default_cfgs = generate_default_cfgs(
    {f"vrwkv_adapter_{size}.ade20k_upernet": _cfg(_HF + f"upernet_vrwkv_adapter_{size}_512_160k_ade20k.pth") for size in ADAPTER_VARIANTS}
)


def _create_vrwkv_adapter(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionRWKVAdapter:
    return build_with_local_weights(
        VisionRWKVAdapter, variant, pretrained, checkpoint_filter_fn, feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs
    )


def _variant_args(name: str, **kwargs: Any) -> Dict[str, Any]:
    return {**ADAPTER_VARIANTS[name], **kwargs}


@register_model
def vrwkv_adapter_tiny(pretrained: bool = False, **kwargs: Any) -> VisionRWKVAdapter:
    """VRWKV-T + ViT-Adapter (192 wide, pre-norm, layer scale 1; 8.4 M parameters): the Med-URWKV encoder."""
    return _create_vrwkv_adapter("vrwkv_adapter_tiny", pretrained, **_variant_args("tiny", **kwargs))


@register_model
def vrwkv_adapter_small(pretrained: bool = False, **kwargs: Any) -> VisionRWKVAdapter:
    """VRWKV-S + ViT-Adapter (384 wide, post-norm, layer scale 1e-5)."""
    return _create_vrwkv_adapter("vrwkv_adapter_small", pretrained, **_variant_args("small", **kwargs))


@register_model
def vrwkv_adapter_base(pretrained: bool = False, **kwargs: Any) -> VisionRWKVAdapter:
    """VRWKV-B + ViT-Adapter (768 wide, post-norm, layer scale 1e-5, half-width deformable values)."""
    return _create_vrwkv_adapter("vrwkv_adapter_base", pretrained, **_variant_args("base", **kwargs))


@register_model
def vrwkv_adapter_large(pretrained: bool = False, **kwargs: Any) -> VisionRWKVAdapter:
    """VRWKV-L + ViT-Adapter (1024 wide, 24 blocks, post-norm, layer scale 1e-5, key norm, 192 pretraining size)."""
    return _create_vrwkv_adapter("vrwkv_adapter_large", pretrained, **_variant_args("large", **kwargs))
