import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vision_transformer as vits

PARAM_COUNTS = {  # reference §3.1, num_classes=0
    ("vit_tiny", 16): 5_524_416, ("vit_tiny", 8): 5_526_720,
    ("vit_small", 16): 21_665_664, ("vit_small", 8): 21_670_272,
    ("vit_base", 16): 85_798_656, ("vit_base", 8): 85_807_872,
}
WIDTHS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}


def reference_vit_layout(dim: int, patch: int, depth: int = 12):
    """(key, shape) pairs in the reference's registration order."""
    tokens = (224 // patch) ** 2 + 1
    layout = [("cls_token", (1, 1, dim)), ("pos_embed", (1, tokens, dim)),
              ("patch_embed.proj.weight", (dim, 3, patch, patch)),
              ("patch_embed.proj.bias", (dim,))]
    for i in range(depth):
        b = f"blocks.{i}."
        layout += [(b + "norm1.weight", (dim,)), (b + "norm1.bias", (dim,)),
                   (b + "attn.qkv.weight", (3 * dim, dim)), (b + "attn.qkv.bias", (3 * dim,)),
                   (b + "attn.proj.weight", (dim, dim)), (b + "attn.proj.bias", (dim,)),
                   (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
                   (b + "mlp.fc1.weight", (4 * dim, dim)), (b + "mlp.fc1.bias", (4 * dim,)),
                   (b + "mlp.fc2.weight", (dim, 4 * dim)), (b + "mlp.fc2.bias", (dim,))]
    return layout + [("norm.weight", (dim,)), ("norm.bias", (dim,))]


@pytest.mark.parametrize("arch,patch", sorted(PARAM_COUNTS))
def test_keys_shapes_and_parameter_counts(arch, patch):
    model = vits.__dict__[arch](patch_size=patch)
    state = model.state_dict()
    expected = reference_vit_layout(WIDTHS[arch], patch)
    assert len(state) == 150
    assert [(k, tuple(v.shape)) for k, v in state.items()] == expected
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[(arch, patch)]
    assert model.embed_dim == model.num_features == WIDTHS[arch]
    assert list(model.buffers()) == []


def test_reference_layout_loads_strictly_and_drives_the_output():
    torch.manual_seed(0)
    reference_state = {k: torch.randn(shape) * 0.02 for k, shape in reference_vit_layout(192, 16)}
    first, second = vits.vit_tiny(), vits.vit_tiny()
    first.load_state_dict(reference_state, strict=True)
    second.load_state_dict(reference_state, strict=True)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(first.eval()(x), second.eval()(x))


def test_classifier_head_appears_only_with_classes():
    model = vits.vit_tiny(num_classes=10)
    state = model.state_dict()
    assert tuple(state["head.weight"].shape) == (10, 192)
    assert tuple(state["head.bias"].shape) == (10,)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_init_and_layer_settings():
    model = vits.vit_small(drop_path_rate=0.1)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert model.blocks[0].attn.qkv.bias is not None
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    rates = [block.drop_path.drop_prob for block in model.blocks[1:]]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(1, 12)])
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    std = model.blocks[3].mlp.fc1.weight.std().item()
    assert 0.018 < std < 0.022


def test_dino_head_keys_shapes_and_frozen_g():
    head = vits.DINOHead(384, 1000)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
                      "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
                      "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
                      "last_layer.weight_g": (1000, 1), "last_layer.weight_v": (1000, 256)}
    assert torch.all(head.last_layer.weight_g == 1)
    assert not head.last_layer.weight_g.requires_grad
    assert vits.DINOHead(384, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    bn_keys = list(vits.DINOHead(384, 10, use_bn=True).state_dict())
    assert bn_keys[:7] == ["mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias",
                           "mlp.1.running_mean", "mlp.1.running_var", "mlp.1.num_batches_tracked"]
    assert "mlp.3.weight" in bn_keys and "mlp.6.weight" in bn_keys
    assert list(vits.DINOHead(384, 10, nlayers=1).state_dict())[:2] == ["mlp.weight", "mlp.bias"]


def test_weight_norm_layer_matches_torch_weight_norm():
    torch.manual_seed(0)
    ours = vits.WeightNormLinear(256, 50)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    with pytest.warns(FutureWarning):  # the deprecated API the reference used
        legacy = torch.nn.utils.weight_norm(nn.Linear(256, 50, bias=False), dim=0)
    legacy.load_state_dict(ours.state_dict())
    x = torch.randn(7, 256)
    torch.testing.assert_close(ours(x), legacy(x), rtol=1e-6, atol=1e-6)


def test_head_output_is_cosine_similarity_to_prototypes():
    torch.manual_seed(0)
    head = vits.DINOHead(32, 20, hidden_dim=64)
    x = torch.randn(4, 32)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    prototypes = F.normalize(head.last_layer.weight_v, dim=-1)
    torch.testing.assert_close(head(x), bottleneck @ prototypes.t())


def test_sdpa_and_explicit_attention_give_the_same_block_output():
    torch.manual_seed(0)
    attention = vits.Attention(192, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(2, 50, 192)
    fused, no_probs = attention(x)
    explicit, probs = attention(x, return_attention=True)
    assert no_probs is None
    assert (fused - explicit).abs().max().item() <= 1e-5
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 50))


def test_cpu_reduced_precision_attention_is_computed_in_float32():
    # The CPU's bfloat16 flash kernel has a 10x slower backward; vision_transformer.fused_attention
    # attends in float32 there, so its output is float32 SDPA of the bf16 inputs, rounded once.
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, 17, 64).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vits.fused_attention(q, k, v, dropout_p=0.0, scale=0.125)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.125)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.bfloat16())
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_explicit_attention_matches_hand_computation():
    torch.manual_seed(0)
    attention = vits.Attention(8, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(1, 3, 8)
    _, probs = attention(x, return_attention=True)
    qkv = x[0] @ attention.qkv.weight.t() + attention.qkv.bias  # (3 tokens, 24)
    q, k = qkv[:, 0:4], qkv[:, 8:12]  # head 0: first 4 columns of the q and k blocks
    expected = torch.softmax(q @ k.t() / 2.0, dim=-1)  # scale = head_dim ** -0.5 = 1/2
    torch.testing.assert_close(probs[0, 0], expected)


def test_last_selfattention_and_intermediate_layers():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16).eval()
    x = torch.randn(2, 3, 64, 96)
    attn = model.get_last_selfattention(x)
    assert attn.shape == (2, 3, 25, 25)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 25))
    layers = model.get_intermediate_layers(x, n=4)
    assert len(layers) == 4 and all(layer.shape == (2, 25, 192) for layer in layers)
    torch.testing.assert_close(layers[-1][:, 0], model(x))


def test_pos_encoding_unchanged_at_training_size():
    model = vits.vit_tiny()
    tokens = model.patch_embed(torch.zeros(1, 3, 224, 224))
    tokens = torch.cat((model.cls_token, tokens), dim=1)
    assert model.interpolate_pos_encoding(tokens, 224, 224) is model.pos_embed


def test_pos_encoding_interpolation_is_bicubic_with_the_reference_scale():
    model = vits.vit_tiny(patch_size=16)
    with torch.no_grad():  # a ramp down the rows, constant along the columns
        rows = torch.arange(14, dtype=torch.float32).repeat_interleave(14)
        model.pos_embed[0, 1:] = rows[:, None].expand(196, 192)
    tokens = torch.zeros(1, 1 + 7 * 21, 192)
    pos = model.interpolate_pos_encoding(tokens, 112, 336)  # H=112 → 7 rows, W=336 → 21 cols
    grid = pos[0, 1:, 0].reshape(7, 21)
    assert torch.allclose(grid, grid[:, :1].expand(7, 21), atol=1e-5)  # rows follow input H
    source = model.pos_embed[0, 1:, 0].reshape(1, 1, 14, 14)
    expected = F.interpolate(source, scale_factor=(7.1 / 14, 21.1 / 14), mode="bicubic")
    torch.testing.assert_close(grid, expected[0, 0])
    assert not torch.allclose(grid, F.interpolate(source, size=(7, 21), mode="bicubic")[0, 0])


@pytest.mark.parametrize("height,width", [(224, 224), (160, 96), (48, 240)])
def test_forward_any_multiple_of_the_patch(height, width):
    model = vits.vit_tiny(patch_size=16).eval()
    assert model(torch.randn(2, 3, height, width)).shape == (2, 192)


def test_drop_path_keeps_expectation_and_zeroes_whole_samples():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    out = vits.drop_path(x, 0.25, training=True)
    per_sample = out[:, 0, 0]
    assert torch.all((per_sample == 0) | torch.isclose(per_sample, torch.tensor(1 / 0.75)))
    assert torch.all(out == per_sample[:, None, None])
    assert math.isclose(out.mean().item(), 1.0, abs_tol=0.05)
    assert torch.equal(vits.drop_path(x, 0.25, training=False), x)


# ------------------------------------------------------------------------------------------------
# DINOv2-era options: register tokens, iBOT's mask token, vit_large
# ------------------------------------------------------------------------------------------------

def test_register_tokens_are_one_key_after_pos_embed_with_no_position():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16, num_register_tokens=4).eval()
    layout = reference_vit_layout(192, 16)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == (
        layout[:2] + [("register_tokens", (1, 4, 192))] + layout[2:])
    assert model.register_tokens.abs().max() < 1e-4  # DINOv2's almost-zero start
    plain = vits.vit_tiny(patch_size=16).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "register_tokens"})
    x = torch.randn(2, 3, 32, 48)
    tokens = model.prepare_tokens(x)
    assert tokens.shape == (2, 1 + 4 + 6, 192)
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
    without_registers = torch.cat((tokens[:, :1], tokens[:, 5:]), dim=1)
    torch.testing.assert_close(without_registers, plain.prepare_tokens(x))
    assert not torch.allclose(model(x), plain(x))  # the registers take part in attention


def test_registers_are_left_out_of_attention_maps_layers_and_patch_features():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16, num_register_tokens=3).eval()
    with torch.no_grad():
        model.register_tokens.normal_()
    x = torch.randn(2, 3, 64, 96)  # 4 x 6 patches
    attention = model.get_last_selfattention(x)
    assert attention.shape == (2, 3, 25, 25)
    tokens = model.prepare_tokens(x)
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    full = model.blocks[-1](tokens, return_attention=True)
    keep = [0] + list(range(4, 28))
    torch.testing.assert_close(attention, full[:, :, keep][:, :, :, keep])
    assert torch.all(attention.sum(-1) < 1)  # the registers' share of every row is gone
    layers = model.get_intermediate_layers(x, n=2)
    assert [layer.shape for layer in layers] == [(2, 25, 192)] * 2
    cls_token, patch_tokens = model.forward_features(x)
    torch.testing.assert_close(cls_token, model(x))
    torch.testing.assert_close(patch_tokens, layers[-1][:, 1:])


def test_mask_token_replaces_masked_patches_before_their_positions():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16, use_mask_token=True, num_register_tokens=1).eval()
    assert tuple(model.state_dict()["mask_token"].shape) == (1, 192)
    nn.init.normal_(model.mask_token)
    x = torch.randn(2, 3, 32, 32)  # 2 x 2 patches
    masks = torch.tensor([[True, False, False, True], [False] * 4])
    tokens, intact = model.prepare_tokens(x, masks), model.prepare_tokens(x)
    positions = model.interpolate_pos_encoding(tokens, 32, 32)[0, 1:]
    torch.testing.assert_close(tokens[0, 2], model.mask_token[0] + positions[0])
    torch.testing.assert_close(tokens[0, 5], model.mask_token[0] + positions[3])
    torch.testing.assert_close(tokens[0, 3:5], intact[0, 3:5])
    torch.testing.assert_close(tokens[1], intact[1])


def test_vit_large_has_dinov2_width_depth_heads_and_patch_14():
    with torch.device("meta"):
        model = vits.vit_large()
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads,
            model.patch_embed.patch_size) == (1024, 24, 16, 14)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == reference_vit_layout(
        1024, 14, depth=24)
    dim, tokens = 1024, (224 // 14) ** 2 + 1
    per_block = 12 * dim * dim + 13 * dim
    expected = dim + tokens * dim + 3 * 14 * 14 * dim + dim + 24 * per_block + 2 * dim
    # DINOv2 counts 304.4M: its position embedding is for 518 px and it has LayerScale.
    assert sum(p.numel() for p in model.parameters()) == expected == 303_178_752
def tiny_vit(**kwargs) -> vits.VisionTransformer:
    torch.manual_seed(0)
    return vits.VisionTransformer(patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True,
                                  norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6), **kwargs)


@pytest.mark.parametrize("training", [False, True])
def test_packed_forward_equals_one_call_per_resolution(training):
    model = tiny_vit().train(training)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, side, side, generator=generator)
               for n, side in ((3, 32), (5, 16), (2, 24))]
    packed = model(batches)
    packed.square().sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    separate = torch.cat([model(batch) for batch in batches])
    separate.square().sum().backward()
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-5)
    for packed_grad, param in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, param.grad, rtol=0, atol=1e-5)
    assert packed.shape == (10, 48) and packed.std() > 0.1


def test_packed_drop_path_draws_one_mask_per_image():
    torch.manual_seed(0)
    layout = ((300, 4), (500, 2))
    x = torch.ones(300 * 4 + 500 * 2, 6)
    out = vits.drop_path(x, 0.25, training=True, layout=layout)
    for part in vits.unpack(out, layout):
        per_image = part[:, 0, 0]
        assert torch.all(part == per_image[:, None, None])  # every token of an image alike
        assert torch.all((per_image == 0) | torch.isclose(per_image, torch.tensor(1 / 0.75)))
        assert abs((per_image > 0).float().mean().item() - 0.75) < 0.06


@pytest.mark.parametrize("layout", [None, ((5, 7), (8, 3))])
def test_efficient_drop_path_skips_dropped_images_with_the_same_expectation(layout):
    """Each draw keeps images - round(p * images) images per batch, runs the branch on them
    only and scales their update; the mean over many draws is x + branch(x)."""
    torch.manual_seed(0)
    block = vits.Block(16, num_heads=2, qkv_bias=True, drop_path=0.3, skip_dropped=True).train()
    x = torch.randn(6, 7, 16) if layout is None else torch.randn(5 * 7 + 8 * 3, 16)
    seen = set()

    def branch(tokens, branch_layout):
        seen.add((tuple(tokens.shape), branch_layout))
        return block.attn(block.norm1(tokens), layout=branch_layout)[0]

    with torch.no_grad():
        update = branch(x, layout)
        seen.clear()
        draws = torch.stack([block.residual(x, branch, layout) for _ in range(3000)])
    # (images, kept) per batch: round(0.3 * 6) = 2 of 6 dropped; 2 of 5 and 2 of 8 when packed.
    if layout is None:
        assert seen == {((4, 7, 16), None)}  # the branch never saw a dropped image
        groups = [(draws, x, update, 6, 4)]
    else:
        assert seen == {((3 * 7 + 6 * 3, 16), ((3, 7), (6, 3)))}
        groups = [(draws.split([35, 24], dim=1)[i].unflatten(1, (n, t)),
                   vits.unpack(x, layout)[i], vits.unpack(update, layout)[i], n, k)
                  for i, (n, t, k) in enumerate(((5, 7, 3), (8, 3, 6)))]
    for group_draws, group_x, group_update, n, k in groups:
        scaled = group_x + group_update * (n / k)
        is_kept = (group_draws - scaled).abs().amax(dim=(2, 3)) < 1e-5
        is_dropped = (group_draws - group_x).abs().amax(dim=(2, 3)) == 0
        assert torch.all(is_kept ^ is_dropped) and torch.all(is_kept.sum(dim=1) == k)
        # Every image is kept with probability k / n, so the mean update is branch(x).
        mean = group_draws.mean(dim=0)
        standard_error = group_update.abs() * math.sqrt((n / k - 1) / len(group_draws))
        assert torch.all((mean - group_x - group_update).abs() <= 5 * standard_error + 1e-6)
        kept_rate = is_kept.float().mean(dim=0)
        assert torch.all((kept_rate - k / n).abs() < 0.04)


def test_efficient_drop_path_model_keeps_keys_and_eval_outputs():
    plain, efficient = tiny_vit(drop_path_rate=0.2), tiny_vit(drop_path_rate=0.2,
                                                            skip_dropped_paths=True)
    assert list(plain.state_dict()) == list(efficient.state_dict())
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(plain.eval()(x), efficient.eval()(x))
    efficient.train()(x).sum().backward()  # trains, every parameter gets a gradient
    assert all(param.grad is not None for param in efficient.parameters())
