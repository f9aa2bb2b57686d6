"""A small GPT-style decoder: token + position embedding, pre-norm blocks of causal attention
(F.scaled_dot_product_attention) and a GeLU MLP, final norm, head tied to the token embedding.

Each Block is its own nn.Module in GPT.blocks (an nn.ModuleList), so pyperf.checkpoint.checkpoint_blocks finds and
wraps them. With GPTConfig(fused=True) the norms, bias+GeLU and bias+dropout+residual-add run pyperf's fused layers
(pyperf.nn); with fused=False the same graph is written with torch ops, with the same parameter names, so
state_dicts move between the two.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    seq_len: int = 128
    dropout: float = 0.0
    fused: bool = False
    norm: str = "layernorm"          # "layernorm" | "rmsnorm"
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError("d_model (%d) must be a multiple of n_heads (%d)" % (self.d_model, self.n_heads))
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError("norm must be 'layernorm' or 'rmsnorm'; got %r" % self.norm)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1); got %r" % self.dropout)


# ---- torch versions of the fused layers (fused=False): same maths, same parameter names ----------------------

class TorchBiasGeLU(nn.Module):
    """gelu(x + bias), tanh approximation by default like pyperf.nn.BiasGeLU (and GPT-2)."""

    def __init__(self, features, approximate="tanh"):
        super().__init__()
        self.approximate = approximate
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x):
        return F.gelu(x + self.bias, approximate=self.approximate)


class TorchBiasDropoutResidual(nn.Module):
    """residual + dropout(x + bias)"""

    def __init__(self, features, p=0.0):
        super().__init__()
        self.p = p
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x, residual):
        return residual + F.dropout(x + self.bias, self.p, self.training)


def _pyperf_nn():
    try:
        import pyperf.nn as pnn
    except Exception:  # noqa: BLE001  (a missing or stale build: fall back, fused_layers_available() says so)
        return None
    need = ("FusedLayerNorm", "FusedRMSNorm", "BiasGeLU", "BiasDropoutResidual")
    return pnn if all(hasattr(pnn, n) for n in need) else None


def fused_layers_available() -> bool:
    """Whether pyperf.nn's fused layers are in this build (GPTConfig(fused=True) uses them when they are)."""
    return _pyperf_nn() is not None


def _layers(cfg):
    pnn = _pyperf_nn() if cfg.fused else None
    if pnn is None:
        norm = (lambda d: nn.LayerNorm(d)) if cfg.norm == "layernorm" else (lambda d: nn.RMSNorm(d))
        return norm, TorchBiasGeLU, TorchBiasDropoutResidual
    norm = pnn.FusedLayerNorm if cfg.norm == "layernorm" else pnn.FusedRMSNorm
    return norm, pnn.BiasGeLU, pnn.BiasDropoutResidual


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)   # its bias is in the residual layer

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm block: h = x + drop(attn(norm1(x)) + b1); out = h + drop(fc2(gelu(fc1(norm2(h)) + b)) + b2)."""

    def __init__(self, cfg):
        super().__init__()
        norm, bias_gelu, bias_drop_res = _layers(cfg)
        d, f = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        self.norm1 = norm(d)
        self.attn = Attention(cfg)
        self.res1 = bias_drop_res(d, cfg.dropout)
        self.norm2 = norm(d)
        self.fc1 = nn.Linear(d, f, bias=False)
        self.act = bias_gelu(f)
        self.fc2 = nn.Linear(f, d, bias=False)
        self.res2 = bias_drop_res(d, cfg.dropout)

    def forward(self, x):
        h = self.res1(self.attn(self.norm1(x)), x)
        return self.res2(self.fc2(self.act(self.fc1(self.norm2(h)))), h)


def _init(module, n_layers):
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)


class BlockStack(nn.Module):
    """cfg.n_layers Blocks on (B, T, d_model) activations: the benchmark's unit."""

    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        _init(self, cfg.n_layers)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        norm = _layers(cfg)[0]
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = norm(cfg.d_model)
        _init(self, cfg.n_layers)

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids, T <= seq_len. Returns logits (B, T, vocab), or the mean cross-entropy loss
        when targets (B, T) are given."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError("sequence length %d exceeds GPTConfig.seq_len %d" % (T, self.cfg.seq_len))
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for b in self.blocks:
            x = b(x)
        logits = F.linear(self.norm_f(x), self.wte.weight)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
