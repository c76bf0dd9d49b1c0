"""Statistics of value projections as attention sees them (``solar.calibrate(attention_mixing=True)``).

K-FAC prices an error E of a layer's update one position at a time: tr(G E S E^T) with S the
second moment of the layer's inputs x_t and G that of the loss gradients at its outputs. For a
value projection that drops what matters most: its output at position t reaches every position s
that attends to t, so the error that reaches attention head h's output at s is
E_k x̄_s^h, with x̄_s^h = sum_t a^h_st x_t the inputs mixed by the head's attention weights (k the
key/value head serving h). Counted at the attention output, one row per (position, head), the
metric keeps those cross-position terms: S becomes the second moment of the mixed inputs x̄ and G
that of the gradients at the attention output, block-diagonal over key/value heads (the heads
sharing one key/value head add up in its block; different heads' errors are taken as uncorrelated).

Found without knowing the model: while calibrating, ``torch.nn.functional.scaled_dot_product_attention``
is wrapped; a call whose ``value`` is a coded module's output (viewed as heads, repeated for
grouped-query attention) marks that module a value projection. The forward pass itself is left
exactly as it was (the wrapper returns the original function's output); the attention weights are
recomputed on the side from PyTorch's documented reference semantics. Attention that does not go
through that function (hand-written softmax) is not seen: those modules keep plain K-FAC.
"""
from __future__ import annotations

import math
from typing import Callable, Optional


def attention_weights(query, key, attn_mask=None, is_causal: bool = False, scale: Optional[float] = None):
    """softmax(q k^T * scale + bias) as ``scaled_dot_product_attention`` defines it (float64; keys
    repeated for grouped-query attention; rows that attend to nothing are 0 rather than NaN)."""
    import torch

    q, k = query.double(), key.double()
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    logits = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        logits = logits.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.double()
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


def _is_value(output, value) -> bool:
    """Whether ``value`` (B, heads, T, d) is the coded module's ``output`` (B, T, m) viewed as m / d
    key/value heads, each repeated for the query heads it serves (compared as views: no copy)."""
    import torch

    if output.dim() != 3 or value.dim() != 4 or output.dtype != value.dtype:
        return False
    B, heads, T, d = value.shape
    if output.shape[0] != B or output.shape[1] != T or output.shape[2] % d:
        return False
    kv = output.shape[2] // d
    if heads % kv:
        return False
    out = output.detach().reshape(B, T, kv, d).transpose(1, 2).unsqueeze(2)
    return torch.equal(out.expand(B, kv, heads // kv, T, d), value.unflatten(1, (kv, heads // kv)))


class AttentionMixing:
    """Collects the attention-mixed statistics of the coded modules that serve as value projections.

    Use as a context manager around the calibration passes; ``record(name, inputs, output)`` from
    each coded module's forward hook; ``mask()`` gives the current batch's token mask (flattened B*T
    booleans, or None). ``statistics(tokens)`` then returns the replacement input and gradient
    moments (gradient sums divided by ``tokens``, as :func:`solar.calibrate` divides its own).
    """

    def __init__(self, mask: Callable[[], Optional[object]]):
        self._mask = mask
        # name -> (input, output) of each coded module's latest call since the last attention call
        # (one entry per module at most, however many calls pass without attention).
        self._recent: dict = {}
        # name -> [sum of x̄ x̄^T, sum of g g^T per key/value head (or None), rows, key/value heads, head dim]
        self._sums: dict = {}
        self._original = None

    def __enter__(self):
        import torch.nn.functional as F

        self._original = F.scaled_dot_product_attention
        original = self._original

        def wrapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            out = original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, **kwargs)
            try:
                self._observe(query, key, value, attn_mask, is_causal, scale, out)
            finally:
                self._recent.clear()
            return out

        F.scaled_dot_product_attention = wrapped
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._original
        self._recent.clear()
        return False

    def record(self, name: str, inputs, output) -> None:
        self._recent.pop(name, None)  # re-inserted last: the dict's order is the calls' order
        self._recent[name] = (inputs, output)

    def _observe(self, query, key, value, attn_mask, is_causal, scale, out) -> None:
        if query.dim() != 4 or query.shape[-2] < 2:  # one query position (decoding): nothing to mix
            return
        for name, (x, output) in reversed(self._recent.items()):
            if not _is_value(output, value):
                continue
            B, H, L, d = query.shape[0], query.shape[1], query.shape[2], value.shape[-1]
            kv_heads = output.shape[2] // d
            keep = self._kept_rows(B, L)
            inputs = x.detach().double()
            sums = self._sums.setdefault(name, [0, None, 0, kv_heads, d])
            for h in range(H):  # one head at a time: B x L x S weights, not H times that
                kv = h * key.shape[1] // H
                mask = attn_mask
                if mask is not None and mask.dim() == 4 and mask.shape[1] == H:
                    mask = mask[:, h: h + 1]
                weights = attention_weights(query[:, h: h + 1].detach(), key[:, kv: kv + 1].detach(), mask,
                                            is_causal, scale)[:, 0]
                mixed = weights @ inputs  # (B, L, n)
                rows = mixed[keep] if keep is not None else mixed.reshape(B * L, -1)
                sums[0] = sums[0] + rows.T @ rows
                sums[2] += rows.shape[0]
            if out.requires_grad:
                out.register_hook(self._gradient_hook(name, keep, H, kv_heads, d))
            return

    def _kept_rows(self, B: int, L: int):
        mask = self._mask()
        if mask is None or mask.numel() != B * L:
            return None
        return mask.reshape(B, L)

    def _gradient_hook(self, name: str, keep, H: int, kv_heads: int, d: int):
        def hook(grad):
            import torch

            g = grad.detach().double().transpose(1, 2)  # (B, L, H, d)
            g = g[keep] if keep is not None else g.reshape(-1, H, d)
            per_head = torch.einsum("rhi,rhj->hij", g, g)
            blocks = per_head.reshape(kv_heads, H // kv_heads, d, d).sum(1)
            sums = self._sums[name]
            sums[1] = blocks if sums[1] is None else sums[1] + blocks
        return hook

    def statistics(self, tokens: float) -> dict:
        """{name: (input moment (n, n), gradient moment (m, m) or None)} in float32, for every
        module seen as a value projection."""
        import torch

        stats = {}
        for name, (sum_x, blocks, rows, kv_heads, d) in self._sums.items():
            grad = None
            if blocks is not None:
                grad = torch.block_diag(*blocks) / max(1.0, float(tokens))
                grad = grad.float().contiguous()
            stats[name] = ((sum_x / max(1, rows)).float().contiguous(), grad)
        return stats
