"""Plain-PyTorch reference of every specrt op: the oracle the compiled ops are tested against.

Written for clarity, not speed: loops over sequences and nodes, fp64/fp32 math. The exact
semantics (and edge-case rules) are specified in ``docs/ops.md``; this file is their executable
form. Sections are owned by area: attention, cache writes / rollback, sampling.
"""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def tree_attention(q, k_cache, v_cache, block_table, seq_lens, qo_indptr, mask, sm_scale,
                   return_lse=False):
    """Reference of ``specrt.ops.tree_attention`` (see docs/ops.md). Returns ``out`` or
    ``(out, lse)``; ``out`` has q's dtype, ``lse`` is float32."""
    raise NotImplementedError


# --------------------------------------------------------------------------------------------
# cache writes and rollback
# --------------------------------------------------------------------------------------------


def append_kv(k, v, k_cache, v_cache, slot_mapping):
    """Reference of ``specrt.ops.append_kv``: writes in place, returns nothing."""
    raise NotImplementedError


def kv_rollback(kv_cache, block_table, committed_lens, path, num_accepted):
    """Reference of ``specrt.ops.kv_rollback``: updates ``kv_cache`` and ``committed_lens`` in
    place."""
    raise NotImplementedError


# --------------------------------------------------------------------------------------------
# sampling and verification
# --------------------------------------------------------------------------------------------


def philox_uniform(seed, offset, idx):
    """The uniform in [0, 1) that Philox-4x32-10 gives for (seed, offset, idx) (docs/ops.md)."""
    raise NotImplementedError


def processed_probs(logits, temperature, top_k, top_p):
    """Processed target distribution of each row (``[N, V]`` float32; greedy rows one-hot)."""
    raise NotImplementedError


def sample(logits, temperature, top_k, top_p, seed, offset, uniforms=None):
    """Reference of ``specrt.ops.sample``. Returns ``(tokens int32 [N], probs float32 [N, V])``."""
    raise NotImplementedError


def rejection_sample(target_logits, draft_tokens, parents, node_indptr, draft_probs,
                     temperature, top_k, top_p, seed, offset, uniforms=None, max_t=None):
    """Reference of ``specrt.ops.rejection_sample``. Returns
    ``(out_tokens [B, max_T], out_path [B, max_T], num_accepted [B])``, all int32."""
    raise NotImplementedError
