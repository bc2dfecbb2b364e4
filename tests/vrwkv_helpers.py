"""Helpers shared by the backbone, network and converter tests."""

import torch


def to_official_layout(state_dict):
    """Our keys -> the keys of an official mmcls checkpoint (independent of the filter under test)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head."):
            out["head.fc." + k[5:]] = v
            continue
        k = k.replace("blocks.", "layers.", 1).replace("patch_embed.proj.", "patch_embed.projection.")
        if k.startswith("norm."):
            k = "ln1." + k[5:]
        out["backbone." + k] = v
    return out


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    return model
