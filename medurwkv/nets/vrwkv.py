"""Vision-RWKV (VRWKV, Duan et al., ICLR 2025) as a timm model family.

A faithful re-implementation of the official ``VRWKV`` backbone (OpenGVLab/Vision-RWKV @ 0e0e38a): patch
embedding, learned absolute position embedding resized bicubically at run time, and blocks of

* ``SpatialMix``: Q-Shift token mixing, then the bidirectional WKV (``medurwkv.ops.bi_wkv``) with a sigmoid
  receptance gate;
* ``ChannelMix``: Q-Shift, squared-ReLU MLP with a sigmoid receptance gate.

Official checkpoints (``{'state_dict': {'backbone.*', 'head.*'}, 'meta': ...}``) load unchanged through
``checkpoint_filter_fn`` (key renames, position-embedding resampling, input-channel adaptation, head
handling): ``timm.create_model('vrwkv_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv

from ..checkpoint import CheckpointError, load_state_dict_strict, load_weights, model_name, unwrap_state_dict
from ..ops import bi_wkv

__all__ = ["VisionRWKV", "Block", "SpatialMix", "ChannelMix", "q_shift", "checkpoint_filter_fn", "VRWKV_VARIANTS"]

# Hyper-parameters of the official models (the ImageNet classification configs of OpenGVLab/Vision-RWKV).
VRWKV_VARIANTS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, post_norm=False, init_values=None, key_norm=False),
    "small": dict(embed_dim=384, depth=12, post_norm=True, init_values=1.0, key_norm=False),
    "base": dict(embed_dim=768, depth=12, post_norm=True, init_values=1e-5, key_norm=False),
    "large": dict(embed_dim=1024, depth=24, post_norm=True, init_values=1e-5, key_norm=True, img_size=192, head_hidden_size=3072),
}


def shape_str(x: torch.Tensor) -> str:
    """``x``'s shape as ``(1, 3, 64, 64)``, for error messages (``tuple(x.shape)`` does not compile in TorchScript)."""
    return "(" + ", ".join([str(d) for d in x.shape]) + ")"


def q_shift(x: torch.Tensor, hw: Tuple[int, int], shift_pixel: int = 1, gamma: float = 0.25) -> torch.Tensor:
    """Quad-directional token shift on a (B, T, C) sequence laid out row-major on an ``hw`` grid.

    Channel quarter 0 takes its left neighbour, 1 its right, 2 the one above, 3 the one below (zeros at the
    borders); the remaining channels (when ``4 * int(C * gamma) < C``) are passed through unchanged."""
    B, T, C = x.shape
    H, W = hw
    if H * W != T:
        raise ValueError(f"q_shift: grid {H}x{W} does not match {T} tokens")
    g = int(C * gamma)
    s = shift_pixel
    x = x.reshape(B, H, W, C)
    out = torch.empty_like(x)  # one allocation, five slice copies and four border fills (no pad/cat copies)
    w, h = max(W - s, 0), max(H - s, 0)
    out[:, :, s:, 0:g] = x[:, :, :w, 0:g]  # from the left
    out[:, :, :s, 0:g] = 0
    out[:, :, :w, g : 2 * g] = x[:, :, s:, g : 2 * g]  # from the right
    out[:, :, w:, g : 2 * g] = 0
    out[:, s:, :, 2 * g : 3 * g] = x[:, :h, :, 2 * g : 3 * g]  # from above
    out[:, :s, :, 2 * g : 3 * g] = 0
    out[:, :h, :, 3 * g : 4 * g] = x[:, s:, :, 3 * g : 4 * g]  # from below
    out[:, h:, :, 3 * g : 4 * g] = 0
    out[..., 4 * g :] = x[..., 4 * g :]
    return out.reshape(B, T, C)


def token_mix(x: torch.Tensor, xx: torch.Tensor, mixes: List[torch.Tensor]) -> List[torch.Tensor]:
    """``x * m + xx * (1 - m)`` for each mix ratio ``m`` in ``mixes``, as ``xx + (x - xx) * m``: one shared
    subtraction and one fused ``addcmul`` per ratio instead of four element-wise passes each. (A list, not
    ``*mixes``: TorchScript compiles no variable argument lists.)"""
    d = x - xx
    return [torch.addcmul(xx, d, m) for m in mixes]


def _bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``medurwkv.ops.bi_wkv``; under ``torch.jit.script`` its registered operator ``torch.ops.medurwkv.bi_wkv``
    (TorchScript cannot compile the Python dispatch: imports, environment lookups)."""
    if torch.jit.is_scripting():
        return torch.ops.medurwkv.bi_wkv(w, u, k, v, None)
    return bi_wkv(w, u, k, v)


class SpatialMix(nn.Module):
    """Token mixing of a VRWKV block: Q-Shift interpolation, k/v/r projections, Bi-WKV, gated output.

    Parameter names follow the official ``VRWKV_SpatialMix`` so checkpoints map one-to-one."""

    def __init__(self, dim: int, layer_id: int = 0, depth: int = 12, key_norm: bool = False, shift_pixel: int = 1, gamma: float = 0.25):
        super().__init__()
        self.shift_pixel = shift_pixel
        self.gamma = gamma
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else None
        self.output = nn.Linear(dim, dim, bias=False)
        # "fancy" initialisation of the official code (layer-dependent decay, zig-zag bonus, mix ratios)
        r01 = layer_id / max(depth - 1, 1)
        r10 = 1.0 - layer_id / depth
        i = torch.arange(dim, dtype=torch.float32)
        self.spatial_decay = nn.Parameter(-5 + 8 * (i / max(dim - 1, 1)) ** (0.7 + 1.3 * r01))
        self.spatial_first = nn.Parameter(math.log(0.3) + 0.5 * ((i + 1) % 3 - 1))
        ratio = (i / dim).view(1, 1, dim)
        self.spatial_mix_k = nn.Parameter(ratio**r10)
        self.spatial_mix_v = nn.Parameter(ratio**r10 + 0.3 * r01)
        self.spatial_mix_r = nn.Parameter(ratio ** (0.5 * r10))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        T = x.shape[1]
        xx = q_shift(x, hw, self.shift_pixel, self.gamma)
        mixed = token_mix(x, xx, [self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r])
        xk, xv, xr = mixed[0], mixed[1], mixed[2]
        k, v, sr = self.key(xk), self.value(xv), torch.sigmoid(self.receptance(xr))
        # decay and bonus are divided by the token count, exactly as the official wrapper calls its kernel
        y = _bi_wkv(self.spatial_decay / T, self.spatial_first / T, k, v)
        if self.key_norm is not None:
            y = self.key_norm(y)
        return self.output(sr * y)


class ChannelMix(nn.Module):
    """Channel mixing of a VRWKV block: Q-Shift interpolation, squared-ReLU MLP, sigmoid gate."""

    def __init__(self, dim: int, layer_id: int = 0, depth: int = 12, hidden_rate: int = 4, key_norm: bool = False, shift_pixel: int = 1, gamma: float = 0.25):
        super().__init__()
        self.shift_pixel = shift_pixel
        self.gamma = gamma
        hidden = hidden_rate * dim
        self.key = nn.Linear(dim, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden) if key_norm else None
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        r10 = 1.0 - layer_id / depth
        ratio = (torch.arange(dim, dtype=torch.float32) / dim).view(1, 1, dim)
        self.spatial_mix_k = nn.Parameter(ratio**r10)
        self.spatial_mix_r = nn.Parameter(ratio**r10)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        xx = q_shift(x, hw, self.shift_pixel, self.gamma)
        mixed = token_mix(x, xx, [self.spatial_mix_k, self.spatial_mix_r])
        xk, xr = mixed[0], mixed[1]
        k = torch.square(torch.relu(self.key(xk)))
        if self.key_norm is not None:
            k = self.key_norm(k)
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class Block(nn.Module):
    """VRWKV block. Pre-norm (VRWKV-T): ``x + att(ln1(x))``; post-norm (S/B/L): ``x + ln1(att(x))``; with
    optional layer scale ``gamma1``/``gamma2``. ``input_norm`` adds the ``ln0`` of the official first block."""

    def __init__(
        self,
        dim: int,
        layer_id: int = 0,
        depth: int = 12,
        hidden_rate: int = 4,
        post_norm: bool = False,
        init_values: Optional[float] = None,
        key_norm: bool = False,
        drop_path: float = 0.0,
        input_norm: Optional[bool] = None,
    ):
        super().__init__()
        self.post_norm = post_norm
        self.ln0 = nn.LayerNorm(dim) if (layer_id == 0 if input_norm is None else input_norm) else None
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.att = SpatialMix(dim, layer_id, depth, key_norm=key_norm)
        self.ffn = ChannelMix(dim, layer_id, depth, hidden_rate, key_norm=key_norm)
        self.gamma1 = nn.Parameter(init_values * torch.ones(dim)) if init_values is not None else None
        self.gamma2 = nn.Parameter(init_values * torch.ones(dim)) if init_values is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _scale(self, x: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
        return x if gamma is None else gamma * x

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if self.ln0 is not None:
            x = self.ln0(x)
        if self.post_norm:
            x = x + self.drop_path(self._scale(self.ln1(self.att(x, hw)), self.gamma1))
            x = x + self.drop_path(self._scale(self.ln2(self.ffn(x, hw)), self.gamma2))
        else:
            x = x + self.drop_path(self._scale(self.att(self.ln1(x), hw), self.gamma1))
            x = x + self.drop_path(self._scale(self.ffn(self.ln2(x), hw), self.gamma2))
        return x


class VisionRWKV(nn.Module):
    """Vision-RWKV backbone + classifier (global average pooling over the final-norm tokens, then a linear
    or, for VRWKV-L, Linear-Tanh-Linear head)."""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 192,
        depth: int = 12,
        hidden_rate: int = 4,
        post_norm: bool = False,
        init_values: Optional[float] = None,
        key_norm: bool = False,
        final_norm: bool = True,
        head_hidden_size: Optional[int] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
    ):
        """
        Args:
            img_size: pretraining image size; fixes the position-embedding grid (resized for other inputs).
            patch_size: patch size of the stem convolution.
            in_chans: input channels.
            num_classes: classes of the head (0 for no head).
            global_pool: ``'avg'`` or ``''`` (no pooling in ``forward_head``).
            embed_dim, depth, hidden_rate: width, number of blocks, channel-mix expansion.
            post_norm, init_values, key_norm: block flavour of the official variants (see ``VRWKV_VARIANTS``).
            final_norm: LayerNorm after the last block (``norm``; ``ln1`` in official checkpoints).
            head_hidden_size: hidden width of the VRWKV-L MLP head; None for a linear head.
            drop_rate, pos_drop_rate, drop_path_rate: dropout before the head, after the position
                embedding, and stochastic depth (linearly increasing over the blocks).
            weight_init: unused, accepted for timm API compatibility.
        """
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,  # pad bottom/right to a multiple of the patch, as mmcv's padding='corner'
        )
        grid = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # as torch.linspace, device-free
        self.blocks = nn.ModuleList(
            Block(embed_dim, i, depth, hidden_rate, post_norm, init_values, key_norm, drop_path=dpr[i]) for i in range(depth)
        )
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes, head_hidden_size)
        self.apply(self._init_weights)

    def _make_head(self, num_classes: int, hidden: Optional[int]) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if hidden:
            return nn.Sequential(nn.Linear(self.embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))
        return nn.Linear(self.embed_dim, num_classes)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # official init_cfg: TruncNormal(std=0.02, bias=0) for Linear, Constant(1, 0) for LayerNorm
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- timm API -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = self._make_head(num_classes, None)

    def load_pretrained(self, path: str) -> int:
        """Load an official Vision-RWKV checkpoint (or weights converted by ``medurwkv convert``), strictly."""
        return self.load_checkpoint(load_weights(path), source=str(path))

    def load_checkpoint(self, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> int:
        """Map ``state_dict`` with this class's ``checkpoint_filter`` and load it strictly; returns the number
        of tensors loaded. Raises ``CheckpointError`` naming ``source`` when the weights do not fit."""
        mapped = type(self).checkpoint_filter(state_dict, self, source)
        load_state_dict_strict(self, mapped, source=source)
        return len(mapped)

    # --- forward --------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {shape_str(x)}")
        if x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f"expected {self.patch_embed.proj.in_channels} input channels, got {x.shape[1]} (shape {shape_str(x)})")
        x = self.patch_embed(x)  # (B, h, w, C)
        B, h, w, C = x.shape
        pos = resample_abs_pos_embed(
            self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size, num_prefix_tokens=0, antialias=False
        )  # bicubic, align_corners=False, no antialias: as the official resize_pos_embed
        return self.pos_drop(x.reshape(B, h * w, C) + pos), (h, w)

    def run_blocks(self, x: torch.Tensor, hw: Tuple[int, int], n: int = -1) -> List[torch.Tensor]:
        """Outputs of the first ``n`` blocks (all if ``n < 0``) on embedded tokens ``x`` laid out on ``hw``.
        (A count, not a slice of ``blocks``: TorchScript iterates a ModuleList only as a whole.)"""
        outs: List[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if n < 0 or i < n:
                if self.grad_checkpointing and not torch.jit.is_scripting() and x.requires_grad:
                    x = torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
                else:
                    x = blk(x, hw)
                outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm, (B, h*w, C)."""
        x, hw = self.embed(x)
        x = self.run_blocks(x, hw)[-1]
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs, following timm's ViT convention.

        Args:
            x: (B, C, H, W) images.
            indices: last n blocks if int, all if None, the given block indices if a sequence.
            norm: apply the final norm to every intermediate.
            stop_early: stop after the last requested block.
            output_fmt: ``'NCHW'`` maps or ``'NLC'`` tokens.
            intermediates_only: return only the list of intermediates.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, hw = self.embed(x)
        outs = self.run_blocks(x, hw, max_index + 1 if stop_early else -1)
        inter = [self.norm(outs[i]) if norm else outs[i] for i in take]
        if output_fmt == "NCHW":
            B, _, C = x.shape
            inter = [y.reshape(B, hw[0], hw[1], C).permute(0, 3, 1, 2).contiguous() for y in inter]
        if intermediates_only:
            return inter
        return self.norm(outs[-1]), inter

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# --- checkpoints ------------------------------------------------------------------------------------------------
_FOREIGN_PREFIXES = ("decode_head.", "auxiliary_head.", "neck.", "data_preprocessor.")


def _official_to_timm_key(k: str) -> Optional[str]:
    """Map one official key (``backbone.`` already stripped) to ours; None for keys that are not ours."""
    if k.startswith("layers."):
        return "blocks." + k[len("layers.") :]
    if k.startswith("patch_embed.projection."):
        return "patch_embed.proj." + k[len("patch_embed.projection.") :]
    if k.startswith("ln1."):  # final norm of the backbone
        return "norm." + k[len("ln1.") :]
    if k.startswith("head.fc."):  # mmcls LinearClsHead
        return "head." + k[len("head.fc.") :]
    return k


def remap_official_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official (mmcls / mmseg / InternImage) or already-converted keys -> our names. Keys of detection or
    segmentation heads are dropped; everything else is kept so that a strict load reports leftovers."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_FOREIGN_PREFIXES):
            continue
        if k.startswith("backbone."):
            k = k[len("backbone.") :]
        out[_official_to_timm_key(k)] = v
    return out


def check_embed_dim(state_dict: Dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint") -> None:
    """Refuse, with a readable message, a checkpoint that is not a VRWKV of the model's width and depth."""
    if "patch_embed.proj.weight" not in state_dict or not any(k.startswith("blocks.") for k in state_dict):
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(f"{source}: not a Vision-RWKV checkpoint (no patch_embed/blocks weights; first keys: {sample})")
    width = state_dict["patch_embed.proj.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    want_w = model.patch_embed.proj.out_channels
    want_d = len(model.blocks)
    if (width, depth) != (want_w, want_d):
        found = next((n for n, v in VRWKV_VARIANTS.items() if (v["embed_dim"], v["depth"]) == (width, depth)), "unknown")
        raise CheckpointError(
            f"{source}: checkpoint is a VRWKV with embed_dim={width}, depth={depth} (variant {found}); "
            f"the model {model_name(model)} has embed_dim={want_w}, depth={want_d}"
        )


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: "VisionRWKV", source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Official Vision-RWKV checkpoint -> ``model``'s state dict.

    * unwraps ``state_dict``/``model`` wrappers and strips ``backbone.``; drops segmentation/detection heads;
    * renames ``layers`` -> ``blocks``, ``patch_embed.projection`` -> ``patch_embed.proj``, ``ln1`` -> ``norm``,
      ``head.fc`` -> ``head``;
    * resamples the position embedding when the model was built for another image size (bicubic, no
      antialias), adapts the stem to the model's input channels (``adapt_input_conv``) and drops the
      classifier when the class count differs.
    """
    sd = remap_official_keys(unwrap_state_dict(state_dict, source))
    check_embed_dim(sd, model, source)
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        n = sd["pos_embed"].shape[1]
        old = int(math.isqrt(n))
        if old * old != n:
            raise CheckpointError(f"{source}: pos_embed has {n} tokens, not a square grid")
        sd["pos_embed"] = resample_abs_pos_embed(
            sd["pos_embed"], new_size=model.patch_embed.grid_size, old_size=(old, old), num_prefix_tokens=0, antialias=False
        )
    w = sd.get("patch_embed.proj.weight")
    in_chans = model.patch_embed.proj.in_channels
    if w is not None and w.shape[1] != in_chans:
        sd["patch_embed.proj.weight"] = adapt_input_conv(in_chans, w, base_chans=w.shape[1])
    head_keys = [k for k in sd if k.startswith("head.")]
    own_head = [k for k in own if k.startswith("head.")]
    if set(head_keys) != set(own_head) or any(sd[k].shape != own[k].shape for k in head_keys):
        # another class count, or a checkpoint without a classifier (segmentation backbones): keep ours
        for k in head_keys:
            sd.pop(k)
        sd.update({k: own[k] for k in own_head})
    return sd


VisionRWKV.checkpoint_filter = staticmethod(checkpoint_filter_fn)


# --- registry ---------------------------------------------------------------------------------------------------
def _cfg(origin_url: str = "", **kwargs: Any) -> Dict[str, Any]:
    # No download URL on purpose: weights are never fetched at run time. Download the file named by
    # ``origin_url`` yourself and pass it with ``pretrained_cfg_overlay=dict(file=PATH)``.
    return {
        "url": "",
        "origin_url": origin_url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


_HF = "https://huggingface.co/OpenGVLab/Vision-RWKV/resolve/main/"
default_cfgs = generate_default_cfgs(
    {
        "vrwkv_tiny.in1k": _cfg(_HF + "vrwkv_t_in1k_224.pth"),
        "vrwkv_small.in1k": _cfg(_HF + "vrwkv_s_in1k_224.pth"),
        "vrwkv_base.in1k": _cfg(_HF + "vrwkv_b_in1k_224.pth"),
        "vrwkv_large.in22k_ft_in1k_384": _cfg(_HF + "vrwkv_l_22kto1k_384.pth", input_size=(3, 384, 384), crop_pct=1.0, classifier="head.2"),
    }
)


def build_with_local_weights(model_cls: type, variant: str, pretrained: bool, filter_fn: Any, **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg``, except that a weights file given as ``pretrained_cfg_overlay=dict(file=...)``
    is read by ``model.load_pretrained`` (``medurwkv.checkpoint.load_weights``: tensor-only, NumPy metadata
    tolerated, errors naming the file) and loaded strictly, instead of by timm's generic loader. Without a
    file, ``pretrained=True`` fails: no weights are ever downloaded."""
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    model = build_model_with_cfg(model_cls, variant, pretrained and not file, pretrained_filter_fn=filter_fn, **kwargs)
    if pretrained and file:
        # with features_only=True timm has already wrapped the network (FeatureGetterNet.model)
        getattr(model, "model", model).load_pretrained(file)
    return model


def _create_vrwkv(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionRWKV:
    return build_with_local_weights(VisionRWKV, variant, pretrained, checkpoint_filter_fn, feature_cfg=dict(out_indices=(2, 5, 8, 11), feature_cls="getter"), **kwargs)


def _variant_args(name: str, **kwargs: Any) -> Dict[str, Any]:
    return {**VRWKV_VARIANTS[name], **kwargs}


@register_model
def vrwkv_tiny(pretrained: bool = False, **kwargs: Any) -> VisionRWKV:
    """VRWKV-T: 192 wide, 12 blocks, pre-norm, no layer scale (6.2 M parameters)."""
    return _create_vrwkv("vrwkv_tiny", pretrained, **_variant_args("tiny", **kwargs))


@register_model
def vrwkv_small(pretrained: bool = False, **kwargs: Any) -> VisionRWKV:
    """VRWKV-S: 384 wide, 12 blocks, post-norm, layer scale (23.8 M parameters)."""
    return _create_vrwkv("vrwkv_small", pretrained, **_variant_args("small", **kwargs))


@register_model
def vrwkv_base(pretrained: bool = False, **kwargs: Any) -> VisionRWKV:
    """VRWKV-B: 768 wide, 12 blocks, post-norm, layer scale 1e-5 (93.7 M parameters)."""
    return _create_vrwkv("vrwkv_base", pretrained, **_variant_args("base", **kwargs))


@register_model
def vrwkv_large(pretrained: bool = False, **kwargs: Any) -> VisionRWKV:
    """VRWKV-L: 1024 wide, 24 blocks, post-norm, layer scale 1e-5, key norm, MLP head (334.9 M parameters)."""
    return _create_vrwkv("vrwkv_large", pretrained, **_variant_args("large", **kwargs))
