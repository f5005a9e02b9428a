"""The real models the window benchmark trains, and the micro-batches they train on.

Each model runs a real forward and backward pass; every pipeline builds its own copy from the same
seed and cycles through the same micro-batches, so all pipelines compute the same thing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvMLP(nn.Module):
    """A 1-d convolution, then residual blocks of Linear, LayerNorm and GELU, then a classifier:
    the layer kinds of an fp32 vision or audio model, dominated by its parameters."""

    def __init__(self, channels: int, width: int, depth: int, classes: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, width, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
                                    for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)   # (batch, length, width)
        for block in self.blocks:
            h = h + F.gelu(block(h))
        return self.head(h)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True)
        h = h + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return h + self.down(F.gelu(self.up(self.norm2(h))))


class GPT(nn.Module):
    """Token and position embeddings, pre-norm attention blocks, an untied head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class ManySmall(nn.Module):
    """Hundreds of small tensors: residual blocks of a narrow Linear and LayerNorm (launch- and
    Python-bound rather than bandwidth-bound)."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class Wide(nn.Module):
    """A stack of wide Linear layers fed a handful of rows: almost all memory is parameters,
    gradients and optimizer state, which is where the pipelines differ."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def build(kind: str, size: dict, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """The model, its parameters made and initialised on ``device`` (by its own random generator,
    seeded: every pipeline's copy is the same), then cast to ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = {"convmlp": ConvMLP, "gpt": GPT, "small": ManySmall, "wide": Wide}[kind](**size)
    return model.to(dtype=dtype)


def batches(kind: str, size: dict, shape: dict, dtype: torch.dtype, device: torch.device,
            seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (input, target) micro-batches of fresh random data."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        if kind == "convmlp":
            x = torch.randn(shape["batch"], size["channels"], shape["length"], generator=g)
            y = torch.randint(0, size["classes"], (shape["batch"], shape["length"]), generator=g)
        elif kind == "gpt":
            x = torch.randint(0, size["vocab"], (shape["batch"], size["context"]), generator=g)
            y = torch.randint(0, size["vocab"], (shape["batch"], size["context"]), generator=g)
        else:
            width = size["width"]
            x = torch.randn(shape["batch"], width, generator=g)
            y = torch.randn(shape["batch"], width, generator=g)
        x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        out.append((x, y.to(device)))
    return out


def loss(kind: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The micro-batch's mean loss, in fp32."""
    x, y = batch
    out = model(x)
    if kind in ("convmlp", "gpt"):
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten())
    return F.mse_loss(out.float(), y.float())


def numel(kind: str, size: dict) -> int:
    return sum(p.numel() for p in build(kind, size, torch.float32, torch.device("meta"), 0).parameters())


def tensors(kind: str, size: dict) -> int:
    return len(list(build(kind, size, torch.float32, torch.device("meta"), 0).parameters()))


def linear_weight_numel(kind: str, size: dict) -> int:
    """Elements of the model's nn.Linear weights (what ``fuse_linear`` accumulates in the GEMM)."""
    model = build(kind, size, torch.float32, torch.device("meta"), 0)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
