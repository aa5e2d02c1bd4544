"""DPAM: the value-value attention stream of AnomalyCLIP (and AdaptCLIP) over frozen HF CLIP blocks.

From layer ``k`` on, each block computes, besides its ordinary attention ``softmax(q kᵀ·s) v``, a second attention
``softmax(v vᵀ·s) v`` with the same frozen weights. The value-value outputs accumulate in a second stream that starts
from the input of layer ``k`` and never feeds back into the residual stream::

    u      = LN1(h)
    o_ori  = out_proj(MHA(q(u), k(u), v(u)))
    o_vv   = out_proj(MHA(v(u), v(u), v(u)))
    s      = s + o_vv
    h      = h + o_ori;  h = h + MLP(LN2(h))

No weights are copied: the frozen submodules of the transformers ``CLIPEncoderLayer`` are called directly, so a
checkpoint loaded with ``from_pretrained`` serves both streams (see ``hf_clip.md`` §5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def vv_attention_block(block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one frozen ``CLIPEncoderLayer`` on ``h`` and also return its value-value attention output.

    Args:
        block: A transformers ``CLIPEncoderLayer`` (``layer_norm1``, ``self_attn`` with ``q/k/v/out_proj``,
            ``layer_norm2``, ``mlp``).
        h: ``[B, T, W]`` residual-stream input of the block.

    Returns:
        ``(h_out, o_vv)``: the block's ordinary output (identical to ``block(h, None)``) and the value-value
        attention output after ``out_proj`` (``[B, T, W]``), to be added to the DPAM stream.
    """
    attn = block.self_attn
    u = block.layer_norm1(h)
    q = _heads(attn.q_proj(u), attn.num_heads)
    k = _heads(attn.k_proj(u), attn.num_heads)
    v = _heads(attn.v_proj(u), attn.num_heads)
    # One SDPA call computes both attentions: batch the (q, k) and (v, v) problems along a new leading axis.
    queries = torch.stack([q, v])
    keys = torch.stack([k, v])
    values = torch.stack([v, v])
    out = F.scaled_dot_product_attention(queries, keys, values, scale=attn.scale)
    o_ori = attn.out_proj(_merge(out[0]))
    o_vv = attn.out_proj(_merge(out[1]))
    h = h + o_ori
    h = h + block.mlp(block.layer_norm2(h))
    return h, o_vv
