"""Med-URWKV: a U-shaped, pure-RWKV 2D segmentation network with a pretrained Vision-RWKV encoder.

Layout (Zhou, arXiv 2506.10858; the decoder details are not published, ours are documented here)::

    image (B, C_in, H, W), H and W multiples of 32
      -> encoder (a ``UNetEncoder``): four maps at strides 4, 8, 16, 32, widths ``encoder.out_channels``
           "adapter": ``AdapterEncoder``, VRWKV + ViT-Adapter (paper-faithful; ADE20K checkpoint)
           "plain":   ``PlainEncoder``, VRWKV only (ImageNet checkpoint); blocks 3/6/9/12 resampled to
                      strides 4/8/16/32 with linear patch expanding / merging
      -> bottleneck: Linear E -> D4, VRWKV blocks on the stride-32 grid
      -> 3 decoder stages (stride 16, 8, 4): PatchExpand (Linear D -> 2D, 2x2 pixel shuffle -> D/2, LayerNorm),
         concat the encoder skip, Linear -> D/2, VRWKV blocks with Q-Shift on the stage's grid
      -> final x4 PatchExpand to full resolution, 1x1 convolution head -> logits (B, C_out, H, W)

Every token mixer is a VRWKV block (``medurwkv.nets.vrwkv.Block``: Q-Shift, Bi-WKV spatial mix, channel mix).

Encoders follow MONAI's ``FlexibleUNet`` composition: an encoder reports its own feature widths
(``out_channels``) and strides (``strides``), says which of its modules pretrained weights initialise
(``pretrained_module``) and loads them (``load_pretrained_encoder``). A new encoder is one ``UNetEncoder``
subclass, passed to ``MedURWKV(encoder=...)`` as an instance or added to ``ENCODERS`` under a name.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, load_weights
from .adapter import ADAPTER_VARIANTS, VisionRWKVAdapter
from .vrwkv import VRWKV_VARIANTS, Block, shape_str

__all__ = [
    "MedURWKV",
    "UNetEncoder",
    "AdapterEncoder",
    "PlainEncoder",
    "ENCODERS",
    "PatchExpand",
    "PatchMerge",
    "default_decoder_dims",
    "enable_mc_dropout",
]

PLAIN_FEATURE_BLOCKS: Tuple[int, int, int, int] = (2, 5, 8, 11)  # 0-based VRWKV blocks feeding strides 4..32


class PatchExpand(nn.Module):
    """Swin-Unet patch expanding on NHWC maps: ``Linear(dim, scale^2 * out_dim)``, pixel shuffle by ``scale``,
    LayerNorm. With ``scale=2`` and ``out_dim=dim // 2`` this is the classic ``Linear(C, 2C)`` expand."""

    def __init__(self, dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, dim) -> (B, s*h, s*w, out_dim)
        B, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(B, h, w, s, s, self.out_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, h * s, w * s, self.out_dim)
        return self.norm(x)


class PatchMerge(nn.Module):
    """Swin patch merging on NHWC maps: 2x2 neighbourhood concatenated (4C), LayerNorm, ``Linear(4C, out_dim)``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, C) -> (B, h/2, w/2, out_dim)
        B, h, w, C = x.shape
        x = x.view(B, h // 2, 2, w // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, h // 2, w // 2, 4 * C)
        return self.reduction(self.norm(x))


class RWKVStage(nn.Module):
    """A stack of VRWKV blocks (pre-norm, as VRWKV-T) run on an NHWC map's grid."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], hidden_rate: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, layer_id=i, depth=depth, hidden_rate=hidden_rate, drop_path=drop_path[i], input_norm=False) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, C = x.shape
        t = x.reshape(B, h * w, C)
        for blk in self.blocks:
            t = blk(t, (h, w))
        return t.view(B, h, w, C)


class UNetEncoder(nn.Module):
    """What ``MedURWKV`` needs from an encoder (as MONAI's ``FlexibleUNet`` needs from its ``BaseEncoder``).

    ``forward(x)`` returns one (B, C_i, H / s_i, W / s_i) map per stride ``s_i`` in ``strides`` (4, 8, 16, 32),
    finest first, with ``C_i = out_channels[i]``. ``pretrained_module`` is the part that pretrained weights
    initialise (frozen in the first epochs of the recipe); ``load_pretrained_encoder`` loads them strictly
    from a file. Subclasses set ``out_channels`` and ``strides`` once built, from their own layers.
    """

    out_channels = ()  # Tuple[int, ...]; not annotated here, TorchScript reads class annotations
    strides = ()
    pretrained_hint = ""  # which weights file fits, added to load errors
    __jit_unused_properties__ = ["pretrained_module"]  # not compiled by torch.jit.script (returns a module)

    @property
    def pretrained_module(self) -> nn.Module:
        return self

    def load_pretrained_encoder(self, path: str) -> int:
        """Load ``pretrained_module`` strictly from ``path`` (official checkpoint, safetensors or ``medurwkv
        convert`` output, read by ``medurwkv.checkpoint.load_weights``); returns the number of tensors."""
        try:
            return self.pretrained_module.load_checkpoint(load_weights(path), source=str(path))
        except CheckpointError as e:
            raise CheckpointError(f"{e} ({self.pretrained_hint})" if self.pretrained_hint else str(e)) from None

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError


class AdapterEncoder(VisionRWKVAdapter, UNetEncoder):
    """Vision-RWKV + ViT-Adapter (the paper's encoder): ``embed_dim`` channels at strides 4, 8, 16, 32;
    initialised from the official ADE20K UperNet checkpoint. Its state dict is the adapter's own."""

    pretrained_hint = (
        "the 'adapter' encoder takes the ADE20K UperNet checkpoint upernet_vrwkv_adapter_<size>_512_160k_ade20k.pth; "
        "use encoder='plain' for ImageNet classification checkpoints"
    )

    def __init__(
        self, variant: str = "tiny", in_channels: int = 1, drop_path_rate: float = 0.0, img_size: Optional[int] = None, **overrides: Any
    ):
        """``variant``'s hyper-parameters (``ADAPTER_VARIANTS``), with ``overrides`` (any ``VisionRWKVAdapter``
        argument, e.g. a smaller ``depth`` and ``interaction_indexes`` for tests) on top."""
        if variant not in ADAPTER_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(ADAPTER_VARIANTS)}, got {variant!r}")
        cfg = dict(ADAPTER_VARIANTS[variant], in_chans=in_channels, drop_path_rate=drop_path_rate, **overrides)
        if img_size is not None:
            cfg["img_size"] = img_size
        super().__init__(**cfg)
        self.pretrained_cfg = {"architecture": f"vrwkv_adapter_{variant}"}  # named in load errors
        self.out_channels = tuple(int(f["num_chs"]) for f in self.feature_info)
        self.strides = tuple(int(f["reduction"]) for f in self.feature_info)


class PlainEncoder(UNetEncoder):
    """A plain (single-stride) Vision-RWKV as a U-Net encoder: block outputs at stride 16 resampled to
    strides 4, 8, 16, 32 with linear patch expanding / merging (no convolution); initialised from an official
    ImageNet checkpoint (only ``backbone``; the resamplers start at random)."""

    pretrained_hint = "the 'plain' encoder takes an ImageNet classification checkpoint such as vrwkv_t_in1k_224.pth"

    def __init__(
        self,
        variant: str = "tiny",
        in_channels: int = 1,
        drop_path_rate: float = 0.0,
        img_size: Optional[int] = None,
        blocks: Sequence[int] = PLAIN_FEATURE_BLOCKS,
    ):
        super().__init__()
        if variant not in VRWKV_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VRWKV_VARIANTS)}, got {variant!r}")
        if len(blocks) != 4:
            raise ValueError(f"blocks needs 4 block indices (strides 4, 8, 16, 32), got {blocks}")
        kwargs = dict(in_chans=in_channels, drop_path_rate=drop_path_rate, num_classes=0)
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.backbone = timm.create_model(f"vrwkv_{variant}", **kwargs)
        self.indices = [int(b) for b in blocks]
        dim = self.backbone.embed_dim
        # the last level reuses the backbone's pretrained final norm (its ImageNet features); the earlier
        # levels get their own
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in blocks[:-1])
        self.resample = nn.ModuleList(
            [PatchExpand(dim, dim, scale=4), PatchExpand(dim, dim, scale=2), nn.Identity(), PatchMerge(dim, dim)]
        )
        patch = self.backbone.patch_size
        self.out_channels = (dim,) * 4
        self.strides = (patch // 4, patch // 2, patch, patch * 2)

    @property
    def pretrained_module(self) -> nn.Module:
        return self.backbone

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        # the backbone's blocks up to the last one used (what forward_intermediates(stop_early=True) runs), in a
        # form TorchScript compiles
        tokens, (h, w) = self.backbone.embed(x)
        outs = self.backbone.run_blocks(tokens, (h, w), self.indices[-1] + 1)
        B, _, C = tokens.shape
        maps = [outs[i].view(B, h, w, C) for i in self.indices]
        normed: List[torch.Tensor] = []
        for i, norm in enumerate(self.norms):
            normed.append(norm(maps[i]))
        normed.append(self.backbone.norm(maps[3]))
        feats: List[torch.Tensor] = []
        for i, resample in enumerate(self.resample):
            feats.append(resample(normed[i]).permute(0, 3, 1, 2))
        return feats


PlainPyramid = PlainEncoder  # the name before encoders reported their own widths and strides

# Encoders by name, for configs (``"encoder": "adapter"``). Each is built as ``cls(variant=..., in_channels=...,
# drop_path_rate=..., img_size=...)``.
ENCODERS: Dict[str, type] = {"adapter": AdapterEncoder, "plain": PlainEncoder}


def default_decoder_dims(encoder_width: int) -> Tuple[int, int, int, int]:
    """Decoder widths at strides 32, 16, 8, 4: twice the encoder's coarsest width (at most 768), halved at each
    finer stage (tiny, 192 wide: 384/192/96/48, ~14.1 M parameters with the adapter; small and base: 768..96)."""
    top = min(2 * int(encoder_width), 768)
    return (top, top // 2, top // 4, top // 8)


class MedURWKV(nn.Module):
    """Med-URWKV, the pure-RWKV U-Net for 2D medical image segmentation.

    Args:
        in_channels: image channels (1 for CT/MR; pretrained RGB stems are adapted with timm's
            ``adapt_input_conv`` when encoder weights are loaded).
        out_channels: classes, background included; the output is logits (no softmax).
        variant: Vision-RWKV encoder size, ``"tiny"``, ``"small"``, ``"base"`` or ``"large"`` (used when
            ``encoder`` is a name).
        encoder: a name in ``ENCODERS``: ``"adapter"`` (VRWKV + ViT-Adapter, as the paper; loads the official
            ADE20K UperNet checkpoint) or ``"plain"`` (VRWKV only; loads the official ImageNet checkpoint);
            or a built ``UNetEncoder`` (its ``out_channels`` and ``strides`` size the decoder).
        dropout: dropout probability on decoder features (used by MONAI Label's MC-dropout uncertainty).
        drop_path_rate: stochastic depth in encoder and decoder blocks.
        bottleneck_depth: VRWKV blocks at stride 32.
        decoder_depths: VRWKV blocks at strides 16, 8, 4.
        decoder_dims: widths at strides 32, 16, 8, 4 (default ``default_decoder_dims`` of the encoder's width).
        img_size: pretraining image size of the encoder's position embedding (other sizes are resized).
        pretrained_encoder: optional path of an official Vision-RWKV checkpoint, safetensors, or
            ``medurwkv convert`` output, loaded strictly into the encoder at construction.

    Input: (B, in_channels, H, W) with H and W multiples of 32. Output: (B, out_channels, H, W) logits.
    """

    # Python-side properties torch.jit.script leaves out (a module; a setter that edits a submodule)
    __jit_unused_properties__ = ["pretrained_module", "dropout"]

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        variant: str = "tiny",
        encoder: Union[str, UNetEncoder] = "adapter",
        dropout: float = 0.0,
        drop_path_rate: float = 0.1,
        bottleneck_depth: int = 2,
        decoder_depths: Sequence[int] = (2, 2, 2),
        decoder_dims: Optional[Sequence[int]] = None,
        img_size: Optional[int] = None,
        pretrained_encoder: Optional[str] = None,
    ):
        super().__init__()
        if isinstance(encoder, str) and encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)} or a UNetEncoder, got {encoder!r}")
        if not isinstance(encoder, (str, UNetEncoder)):
            raise TypeError(f"encoder must be a name in {sorted(ENCODERS)} or a UNetEncoder, got {type(encoder).__name__}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if len(decoder_depths) != 3:
            raise ValueError(f"decoder_depths needs 3 values (strides 16, 8, 4), got {decoder_depths}")
        if decoder_dims is not None and len(decoder_dims) != 4:
            raise ValueError(f"decoder_dims needs 4 values (strides 32, 16, 8, 4), got {tuple(decoder_dims)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.variant = variant
        self.encoder_type = encoder if isinstance(encoder, str) else type(encoder).__name__
        self._dropout = dropout

        if isinstance(encoder, str):
            encoder = ENCODERS[encoder](variant=variant, in_channels=in_channels, drop_path_rate=drop_path_rate, img_size=img_size)
        if tuple(encoder.strides) != (4, 8, 16, 32) or len(encoder.out_channels) != 4:
            raise ValueError(
                f"{type(encoder).__name__} gives maps at strides {tuple(encoder.strides)} with widths "
                f"{tuple(encoder.out_channels)}; MedURWKV's decoder needs four maps at strides (4, 8, 16, 32)"
            )
        self.encoder = encoder
        skips = tuple(int(c) for c in encoder.out_channels)  # strides 4, 8, 16, 32
        dims = tuple(decoder_dims or default_decoder_dims(skips[-1]))

        n_dec = bottleneck_depth + sum(decoder_depths)
        # stochastic depth decreasing from the bottleneck (deepest) to the last decoder stage
        dpr = [drop_path_rate * (1 - i / max(n_dec - 1, 1)) for i in range(max(n_dec, 1))]
        self.bottleneck_proj = nn.Linear(skips[3], dims[0], bias=False)
        self.bottleneck_norm = nn.LayerNorm(dims[0])
        self.bottleneck = RWKVStage(dims[0], bottleneck_depth, dpr[:bottleneck_depth])
        self.expand = nn.ModuleList()
        self.fuse = nn.ModuleList()
        self.stages = nn.ModuleList()
        start = bottleneck_depth
        for i, depth in enumerate(decoder_depths):
            d_in, d_out = dims[i], dims[i + 1]
            self.expand.append(PatchExpand(d_in, d_out, scale=2))
            self.fuse.append(nn.Linear(d_out + skips[2 - i], d_out, bias=False))
            self.stages.append(RWKVStage(d_out, depth, dpr[start : start + depth]))
            start += depth
        self.final_expand = PatchExpand(dims[3], dims[3], scale=4)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Conv2d(dims[3], out_channels, kernel_size=1)
        self._init_decoder()
        if pretrained_encoder:
            self.load_pretrained_encoder(pretrained_encoder)

    def _init_decoder(self) -> None:
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def dropout(self) -> float:
        return self._dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        """Change the dropout probability in place (MONAI Label's epistemic scoring sets it)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self._dropout = p
        self.drop.p = p

    def encoder_parameters(self) -> List[nn.Parameter]:
        """Parameters initialised from the pretrained checkpoint (frozen in the first epochs of the recipe)."""
        return list(self.pretrained_module.parameters())

    @property
    def pretrained_module(self) -> nn.Module:
        """The part of the encoder that pretrained weights initialise: the ViT-Adapter backbone, or the plain
        VRWKV (without the pyramid resamplers). ``medurwkv convert`` writes exactly its state dict."""
        return self.encoder.pretrained_module

    def load_pretrained_encoder(self, path: str) -> int:
        """Load encoder weights strictly from an official Vision-RWKV checkpoint (ADE20K UperNet for
        ``adapter``, ImageNet for ``plain``), safetensors, or ``medurwkv convert`` output. Returns the tensor
        count; ``CheckpointError`` naming the file and the checkpoint the encoder takes when they do not fit."""
        return self.encoder.load_pretrained_encoder(path)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"MedURWKV expects a (B, C, H, W) batch, got shape {shape_str(x)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"MedURWKV was built for {self.in_channels} input channel(s), got {x.shape[1]} (shape {shape_str(x)})")
        H, W = x.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(f"MedURWKV needs H and W divisible by 32, got {H}x{W}; pad or resize the input (e.g. DivisiblePad(k=32))")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        f1, f2, f3, f4 = (f.permute(0, 2, 3, 1) for f in self.encoder(x))  # NHWC, strides 4..32
        y = self.bottleneck(self.bottleneck_norm(self.bottleneck_proj(f4)))
        for expand, fuse, stage, skip in zip(self.expand, self.fuse, self.stages, (f3, f2, f1)):
            y = expand(y)
            y = stage(self.drop(fuse(torch.cat((y, skip), dim=-1))))
        y = self.final_expand(y).permute(0, 3, 1, 2)
        return self.head(self.drop(y))

    def parameter_count(self) -> Dict[str, int]:
        """Parameters per part: encoder, bottleneck, decoder (expands, fuses, stages), head."""
        parts: Dict[str, int] = {"encoder": 0, "bottleneck": 0, "decoder": 0, "head": 0}
        for name, p in self.named_parameters():
            if name.startswith("encoder"):
                parts["encoder"] += p.numel()
            elif name.startswith("bottleneck"):
                parts["bottleneck"] += p.numel()
            elif name.startswith("head"):
                parts["head"] += p.numel()
            else:
                parts["decoder"] += p.numel()
        parts["total"] = sum(parts.values())
        return parts


def enable_mc_dropout(model: nn.Module) -> nn.Module:
    """Eval mode everywhere (BatchNorm keeps running statistics) except dropout layers, for MC-dropout."""
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)):
            m.train()
    return model
