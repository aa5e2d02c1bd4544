"""Deep visual prompts through the frozen CLIP image tower (VPT-deep style, as AdaCLIP uses them).

Learnable prompt tokens enter the vision transformer as extra tokens: before block 0 they are **appended** after the
class and patch tokens; before each later prompted block the last ``n`` tokens (the previous prompts, as the blocks
left them) are **replaced** by that block's prompts; after the last prompted block they travel on through every
remaining block. Layer taps and the global embedding leave the prompt tokens out, so the outputs have the shapes of
:meth:`zsad.backbone.CLIPBackbone.encode_image`.

The frozen HF blocks are called one by one (``layer(h, None)``: no mask, any attention back-end), the same loop the
DPAM stream uses, so autograd reaches the prompts through the frozen weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from zsad.backbone.clip import CLIPBackbone, VisionOutput


def encode_image_with_prompts(
    backbone: CLIPBackbone,
    images: torch.Tensor,
    prompts: Sequence[torch.Tensor],
    layers: Sequence[int] = (),
    project: bool = False,
) -> VisionOutput:
    """One vision forward with deep visual prompts.

    Args:
        backbone: The frozen CLIP backbone.
        images: ``[B, 3, S, S]`` normalised images.
        prompts: One ``[B, n, width]`` (or ``[n, width]``, shared by the batch) tensor per prompted block, block 0
            first; all of the same length ``n``. Block 0's prompts are appended, the following blocks' replace the
            last ``n`` tokens.
        layers: 1-based layers whose tokens to return (prompt tokens excluded).
        project: Apply ``post_layernorm`` + ``visual_projection`` to the returned tokens (AdaCLIP: ``False``, its
            heads read the raw residual stream).

    Returns:
        :class:`~zsad.backbone.VisionOutput` with the global embedding ``proj(ln_post(h_L[CLS]))`` of the prompted
        stream and the requested layers' class and patch tokens.

    Raises:
        ValueError: No prompts, prompts of different lengths, more prompted blocks than the tower has, or a layer
            outside ``1..L``.
    """
    from zsad.backbone.clip import VisionOutput

    if not prompts:
        msg = "encode_image_with_prompts needs at least one prompt tensor (block 0's); use encode_image otherwise."
        raise ValueError(msg)
    if len(prompts) > backbone.num_layers:
        msg = f"{len(prompts)} prompted blocks requested; the vision tower has {backbone.num_layers}."
        raise ValueError(msg)
    lengths = {int(p.shape[-2]) for p in prompts}
    if len(lengths) != 1:
        msg = f"Every block's visual prompts must have the same length, got {sorted(lengths)}."
        raise ValueError(msg)
    n = lengths.pop()
    layers = tuple(int(k) for k in layers)
    for k in layers:
        if not 1 <= k <= backbone.num_layers:
            msg = f"Layer {k} is outside 1..{backbone.num_layers} (1-based, as HF hidden_states[k])."
            raise ValueError(msg)
    h, grid = backbone.embed(images)
    batch = h.shape[0]

    def _batched(prompt: torch.Tensor) -> torch.Tensor:
        prompt = prompt.to(h.dtype)
        return prompt.unsqueeze(0).expand(batch, -1, -1) if prompt.dim() == 2 else prompt

    captured: dict[int, torch.Tensor] = {}
    wanted = set(layers)
    for index, block in enumerate(backbone.vision.encoder.layers):
        if index == 0:
            h = torch.cat([h, _batched(prompts[0])], dim=1)
        elif index < len(prompts):
            h = torch.cat([h[:, :-n], _batched(prompts[index])], dim=1)
        h = block(h, None)
        if index + 1 in wanted:
            captured[index + 1] = h[:, :-n]
    tokens = [captured[k] for k in layers]
    if project:
        tokens = [backbone.project(t) for t in tokens]
    return VisionOutput(
        global_embedding=backbone.project(h[:, 0], ln_post=True),
        patch_tokens=[t[:, 1:] for t in tokens],
        class_tokens=[t[:, 0] for t in tokens],
        grid=grid,
        layers=layers,
    )
