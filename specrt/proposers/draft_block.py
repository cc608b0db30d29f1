"""The decoder block that feature-level draft heads run: EAGLE's layer and each MTP module's
block (a Llama-family layer: q/k/v with rotate-half RoPE, o projection, RMSNorm, SiLU MLP).

It is exposed in pieces on plain tensors so that the paged inference path
(:meth:`DraftBlock.paged_forward`, on the head's own one-layer paged cache) and the training
code's dense attention (``specrt.train.eagle``, ``specrt.train.mtp``) share every weight and
every numeric step except the attention itself:
:meth:`~DraftBlock.block_inputs` -> :meth:`~DraftBlock.qkv` -> attention ->
:meth:`~DraftBlock.finish`. Numerics follow the reference (RMSNorm variance in fp32, weight in
the model dtype; RoPE in the model dtype).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..batch import AttentionMetadata

__all__ = ["DraftBlock", "param", "rms_norm", "rope"]


def param(*shape, dtype, device, ones: bool = False) -> nn.Parameter:
    """A head weight of ``shape``: ones (norms) or zeros (filled by a checkpoint or an
    initialiser)."""
    f = torch.ones if ones else torch.zeros
    return nn.Parameter(f(shape, dtype=dtype, device=device))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` [..., D] with ``cos`` / ``sin`` [..., D/2] (broadcast)."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class DraftBlock(nn.Module):
    """Base of a draft head's decoder block.

    A subclass sets ``cfg`` (``hidden_size``, ``intermediate_size``, ``num_heads``,
    ``num_kv_heads``, ``head_dim``, ``q_size``, ``kv_size``, ``rms_norm_eps``,
    ``attention_bias``), creates the block weights ``qkv_weight`` [q + 2 kv, attention input
    width], ``qkv_bias`` (or None), ``o_weight``, ``post_norm``, ``gate_up_weight`` ([gate; up]
    rows) and ``down_weight`` with :meth:`_make_block_weights`, and defines
    :meth:`block_inputs`; a block whose attention input is normed inside the layer (an MTP
    module's ``input_layernorm``) overrides :meth:`attention_input`.
    """

    def _make_block_weights(self, attn_in: int, dtype, device) -> None:
        """The block's weights for an attention input ``attn_in`` wide (norms ones, the rest
        zeros; checkpoints and initialisers fill them)."""
        c = self.cfg

        def p(*shape, ones=False):
            return param(*shape, dtype=dtype, device=device, ones=ones)

        self.qkv_weight = p(c.q_size + 2 * c.kv_size, attn_in)
        self.qkv_bias = p(c.q_size + 2 * c.kv_size) if c.attention_bias else None
        self.o_weight = p(c.hidden_size, c.q_size)
        self.post_norm = p(c.hidden_size, ones=True)
        self.gate_up_weight = p(2 * c.intermediate_size, c.hidden_size)
        self.down_weight = p(c.hidden_size, c.intermediate_size)

    def block_inputs(self, emb: torch.Tensor, h: torch.Tensor) -> tuple:
        """``(attention input, residual)`` from token embeddings and features."""
        raise NotImplementedError

    def attention_input(self, a: torch.Tensor) -> torch.Tensor:
        """What the q/k/v projection reads of the attention input (identity by default)."""
        return a

    def qkv(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """Rotated q [n, Hq, D], k [n, Hkv, D] and v [n, Hkv, D] of attention inputs ``a``
        (``cos`` / ``sin`` [n, 1, D/2])."""
        c = self.cfg
        n = a.shape[0]
        qkv = F.linear(self.attention_input(a), self.qkv_weight, self.qkv_bias)
        qk = rope(qkv[:, : c.q_size + c.kv_size].view(n, c.num_heads + c.num_kv_heads,
                                                      c.head_dim), cos, sin)
        return (qk[:, : c.num_heads], qk[:, c.num_heads:],
                qkv[:, c.q_size + c.kv_size:].view(n, c.num_kv_heads, c.head_dim))

    def finish(self, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Block output from the residual and the attention output [n, Hq * D]."""
        x = residual + F.linear(attn, self.o_weight)
        gate, up = F.linear(rms_norm(x, self.post_norm, self.cfg.rms_norm_eps),
                            self.gate_up_weight).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down_weight)

    def paged_forward(self, emb, h, cos, sin, kv: torch.Tensor, attn: AttentionMetadata,
                      rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One pass over a ragged batch of new tokens on a one-layer paged cache ``kv``
        [1, 2, pages, page_size, Hkv, D] (their K/V are written first).

        ``rows`` (int64 [m], optional): only these of the ``attn``'s N query rows are new;
        ``emb`` / ``h`` / ``cos`` / ``sin`` then hold those m rows, the other rows' K/V must
        already sit at their slots (``attn.slot_mapping`` -1 there: not rewritten) and their
        outputs are not computed. Returns the block outputs of the computed rows.
        """
        a, res = self.block_inputs(emb, h)
        q, k, v = self.qkv(a, cos, sin)
        if rows is not None:
            n = attn.slot_mapping.shape[0]
            qf, kf, vf = (t.new_zeros((n,) + t.shape[1:]) for t in (q, k, v))
            qf[rows], kf[rows], vf[rows] = q, k, v
            q, k, v = qf, kf, vf
        ops.append_kv(k, v, kv[0, 0], kv[0, 1], attn.slot_mapping, validate=not attn.trusted)
        o = ops.tree_attention(q, kv[0, 0], kv[0, 1], attn.block_table, attn.seq_lens,
                               attn.qo_indptr, attn.mask, sm_scale=self.cfg.head_dim ** -0.5,
                               validate=not attn.trusted)
        if rows is not None:
            o = o[rows]
        return self.finish(res, o.reshape(o.shape[0], -1))
