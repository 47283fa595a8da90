"""Vision Transformer and DINO projection head, state_dict-compatible with the DINO reference.

Attention runs through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU;
on the CPU in float32 even under bf16 autocast: `fused_attention`); the explicit softmax path is
used only when attention probabilities are asked for. Optional DINOv2-era parts, absent by default
(so the reference's keys stay exactly as they are): register tokens (Darcet et al., arXiv
2309.16588) and the mask token of iBOT's masked patches.

Blocks also take *packed* tokens: the tokens of several batches of crops (one batch per resolution)
flattened into one (sum of images * tokens, D) tensor, with a `layout` of (images, tokens) per
batch. Token-wise layers then run once on every crop and attention runs per batch
(`VisionTransformer.forward_packed`).
"""
import math
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


Layout = Tuple[Tuple[int, int], ...]  # (images, tokens) of each batch in packed tokens


def unpack(x: torch.Tensor, layout: Optional[Layout]) -> List[torch.Tensor]:
    """Per-batch (images, tokens, ...) views of packed tokens; [x] when x is not packed."""
    if layout is None:
        return [x]
    parts = x.split([images * tokens for images, tokens in layout])
    return [part.view(images, tokens, *x.shape[1:])
            for part, (images, tokens) in zip(parts, layout)]


def pack(parts: Sequence[torch.Tensor], layout: Optional[Layout]) -> torch.Tensor:
    """The inverse of `unpack`."""
    if layout is None:
        return parts[0]
    flat = [part.flatten(0, 1) for part in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              layout: Optional[Layout] = None) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    # One draw per image, shared by all its tokens.
    masks = [part.new_empty(len(part), *[1] * (part.ndim - 1)).bernoulli_(keep_prob)
             .expand(*part.shape[:-1], 1) for part in unpack(x, layout)]
    return x / keep_prob * pack(masks, layout)


def add_on_kept_images(x: torch.Tensor, branch: Callable, drop_prob: float,
                       layout: Optional[Layout]) -> torch.Tensor:
    """x + drop_path(branch(x)) in expectation, running the branch only on the kept images.

    Each batch keeps a random subset of its images (all but round(p * images), at least one)
    and scales their update by images / kept: every image's expected update is branch(x), as
    with the masked drop_path, and dropped images cost nothing (DINOv2's efficient stochastic
    depth; a fixed count keeps shapes static for compiled graphs).
    """
    parts = unpack(x, layout)
    counts = [max(1, len(part) - round(drop_prob * len(part))) for part in parts]
    chosen = [torch.randperm(len(part), device=x.device)[:count]
              for part, count in zip(parts, counts)]
    kept_layout = None if layout is None else tuple(
        (count, tokens) for count, (_, tokens) in zip(counts, layout))
    kept = pack([part[rows] for part, rows in zip(parts, chosen)], kept_layout)
    updates = unpack(branch(kept, kept_layout), kept_layout)
    return pack([part.index_add(0, rows, update.to(part.dtype), alpha=len(part) / len(rows))
                 for part, rows, update in zip(parts, chosen, updates)], layout)


class DropPath(nn.Module):
    """Stochastic depth with rate drop_prob; skip_dropped: Block skips dropped images instead."""

    def __init__(self, drop_prob: float = 0.0, skip_dropped: bool = False):
        super().__init__()
        self.drop_prob = drop_prob
        self.skip_dropped = skip_dropped

    def forward(self, x: torch.Tensor, layout: Optional[Layout] = None) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, layout)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; fused (SDPA) unless the probabilities are asked for."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # False forces the explicit softmax path everywhere (a reference-like baseline).
        self.fused_attn = True

    def forward(self, x: torch.Tensor, return_attention: bool = False,
                layout: Optional[Layout] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return (output, attention probabilities or None); packed x attends per batch."""
        outputs, attentions = zip(*[self.attend(qkv, return_attention)
                                    for qkv in unpack(self.qkv(x), layout)])
        return self.proj_drop(self.proj(pack(outputs, layout))), attentions[0]

    def attend(self, qkv: torch.Tensor, return_attention: bool
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One batch's (B, T, 3D) projections -> (B, T, D) attention output, probabilities."""
        batch, tokens, _ = qkv.shape
        # qkv rows are [q | k | v], heads contiguous inside each: the reference weight layout.
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if return_attention or not self.fused_attn:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        else:
            attn = None
            dropout = self.attn_drop.p if self.training else 0.0
            out = fused_attention(q, k, v, dropout, self.scale)
        return out.transpose(1, 2).reshape(batch, tokens, -1), attn


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                    scale: float) -> torch.Tensor:
    """SDPA; on the CPU, bfloat16/float16 inputs are attended in float32 and cast back."""
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    # The CPU flash kernel's backward in bfloat16 is 10x slower than in float32 at DINO's small
    # token counts (17 tokens: 61 ms vs 5 ms per call, torch 2.14 with AMX), which left a bf16
    # step of a ViT-T/7 at 28 px barely faster than float32; autocast would cast float32 inputs
    # back to bf16.
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                             dropout_p=dropout_p, scale=scale)
    return out.to(q.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with drop-path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=nn.LayerNorm, skip_dropped: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path, skip_dropped) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False,
                layout: Optional[Layout] = None) -> torch.Tensor:
        """Return the block output, or only the attention probabilities when asked for."""
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        x = self.residual(x, lambda h, lay: self.attn(self.norm1(h), layout=lay)[0], layout)
        return self.residual(x, lambda h, lay: self.mlp(self.norm2(h)), layout)

    def residual(self, x: torch.Tensor, branch: Callable,
                 layout: Optional[Layout]) -> torch.Tensor:
        """x + drop_path(branch(x)), the branch taking (tokens, layout)."""
        if not (self.training and isinstance(self.drop_path, DropPath)):
            return x + branch(x, layout)
        if self.drop_path.skip_dropped:
            return add_on_kept_images(x, branch, self.drop_path.drop_prob, layout)
        return x + self.drop_path(branch(x, layout), layout)


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> patch tokens (B, H/p * W/p, D) with one strided convolution."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT whose forward returns the final-normed [CLS] token (or class logits).

    num_register_tokens > 0 adds learned tokens after [CLS] (key `register_tokens`, no position
    embedding); use_mask_token adds the learned `mask_token` that replaces masked patches.
    """

    def __init__(self, img_size=(224,), patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer=nn.LayerNorm, skip_dropped_paths: bool = False,
                 num_register_tokens: int = 0, use_mask_token: bool = False, **kwargs):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size[0], patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.num_register_tokens = num_register_tokens
        if num_register_tokens:
            # DINOv2's initialisation: registers start almost at zero.
            self.register_tokens = nn.Parameter(
                torch.randn(1, num_register_tokens, embed_dim) * 1e-6)
        if use_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # On the CPU even when built on the meta device (a size check of vit_large).
        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                  drop_path_rates[i], norm_layer, skip_dropped_paths)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def interpolate_pos_encoding(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a height x width image (`x` is unused: the reference's
        signature)."""
        return interpolate_pos_embed(self.pos_embed, height, width, self.patch_embed.patch_size)

    def prepare_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """[CLS], registers, patches; patches where `masks` (B, N) is True become mask_token."""
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if self.num_register_tokens:
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(batch, -1, -1),
                                tokens[:, 1:]), dim=1)
        return self.pos_drop(tokens)

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """[CLS] features of a batch of images, or of a list of batches (`forward_packed`)."""
        if isinstance(x, (list, tuple)):
            return self.forward_packed(x)
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def forward_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Final-normed [CLS] (B, D) and patch tokens (B, N, D), registers left out."""
        x = self.prepare_tokens(x, masks)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1 + self.num_register_tokens:]
    def forward_packed(self, batches: Sequence[torch.Tensor]) -> torch.Tensor:
        """torch.cat([self(batch) for batch in batches]) in one pass over packed tokens: each
        batch holds images of one resolution; token-wise layers run once on all of them."""
        tokens = [self.prepare_tokens(batch) for batch in batches]
        layout = tuple((len(part), part.shape[1]) for part in tokens)
        x = pack(tokens, layout)
        for block in self.blocks:
            x = block(x, layout=layout)
        cls_tokens = torch.cat([part[:, 0] for part in unpack(x, layout)])
        return self.head(self.norm(cls_tokens))

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (B, heads, T, T) of the last block over [CLS] and the patches
        (registers left out, so the layout is the reference's), computed exactly."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.without_registers(self.blocks[-1](x, return_attention=True), dims=(2, 3))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> List[torch.Tensor]:
        """Final-normed [CLS] and patch tokens of the last `n` blocks, shallow to deep."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - i <= n:
                outputs.append(self.without_registers(self.norm(x)))
        return outputs

    def without_registers(self, x: torch.Tensor, dims: Tuple[int, ...] = (1,)) -> torch.Tensor:
        """Drop the register positions along the token dimensions `dims`."""
        if not self.num_register_tokens:
            return x
        first = 1 + self.num_register_tokens
        for dim in dims:
            x = torch.cat((x.narrow(dim, 0, 1), x.narrow(dim, first, x.shape[dim] - first)), dim)
        return x


def interpolate_pos_embed(pos_embed: torch.Tensor, height: int, width: int,
                          patch_size: int) -> torch.Tensor:
    """Stored (1, 1 + N, D) position embeddings resampled (bicubic, as the reference) to the
    patch grid of a height x width image."""
    stored = pos_embed.shape[1] - 1
    npatch = (height // patch_size) * (width // patch_size)
    if npatch == stored and height == width:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    dim = pos_embed.shape[-1]
    side = int(math.sqrt(stored))
    # The +0.1 guards against scale_factor rounding the output grid one short (reference #8).
    rows = height // patch_size + 0.1
    cols = width // patch_size + 0.1
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(rows / math.sqrt(stored), cols / math.sqrt(stored)),
                         mode="bicubic")
    if grid.shape[-2:] != (int(rows), int(cols)):
        raise RuntimeError(f"position-embedding grid {tuple(grid.shape[-2:])} does not match "
                           f"the patch grid {(int(rows), int(cols))}")
    patch_pos_embed = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _vit(embed_dim: int, num_heads: int, patch_size: int, depth: int = 12,
         **kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit(192, 3, patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit(384, 6, patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit(768, 12, patch_size, **kwargs)


def vit_large(patch_size: int = 14, **kwargs) -> VisionTransformer:
    """DINOv2's ViT-L: width 1024, 24 blocks, 16 heads, patch 14 (main_dino passes its own
    --patch_size, default 16)."""
    return _vit(1024, 16, patch_size, depth=24, **kwargs)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row.

    Same parameters (`weight_g` (K,1), `weight_v` (K,in)) and numbers as the legacy
    `torch.nn.utils.weight_norm(nn.Linear(...), dim=0)`, without its deprecated hooks.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's default init, which the reference keeps for this layer.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP → L2-normalise → weight-normalised prototypes (logits of size out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += _bn_gelu(hidden_dim, use_bn) + [nn.Linear(hidden_dim, hidden_dim)]
            layers += _bn_gelu(hidden_dim, use_bn) + [nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear_and_norm)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def _bn_gelu(dim: int, use_bn: bool) -> List[nn.Module]:
    return ([nn.BatchNorm1d(dim)] if use_bn else []) + [nn.GELU()]
