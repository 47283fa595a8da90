import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import attention_maps
import utils
import vision_transformer as vits
from visualize_attention import threshold_masks

MEAN = np.array(utils.IMAGENET_MEAN)
STD = np.array(utils.IMAGENET_STD)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(data.chelsea())  # 451 wide, 300 high


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    model, _ = utils.build_frozen_backbone("vit_tiny", 8, "random", "teacher",
                                           torch.device("cpu"), visualisation=True)
    return model


def test_image_to_tensor_normalises_and_crops_top_left(photo):
    pixels = np.asarray(photo.crop((0, 0, 50, 37)), dtype=np.float64) / 255
    tensor = attention_maps.image_to_tensor(photo.crop((0, 0, 50, 37)), patch_size=8)
    assert tensor.shape == (3, 32, 48)
    for row, col in [(0, 0), (31, 47), (17, 5)]:
        expected = (pixels[row, col] - MEAN) / STD
        np.testing.assert_allclose(tensor[:, row, col].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("size,shape", [([40, 60], (40, 56)), ([20], (16, 24)), (None, (296, 448))])
def test_image_to_tensor_resizes_then_crops_to_the_patch(photo, size, shape):
    # One value sets the shorter side: 300x451 -> 20x30, then cropped to multiples of 8.
    assert attention_maps.image_to_tensor(photo, 8, size).shape == (3, *shape)


@pytest.mark.parametrize("size", [[10, 20, 30], [0, 32]])
def test_bad_image_size_is_an_input_error(photo, size):
    with pytest.raises(utils.InputError, match="one positive value"):
        attention_maps.image_to_tensor(photo, 8, size)


def test_image_smaller_than_a_patch_is_an_input_error(photo):
    with pytest.raises(utils.InputError, match="no whole 16x16 patch"):
        attention_maps.image_to_tensor(photo, 16, [8, 40])


def test_unreadable_image_is_an_input_error(tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(utils.InputError, match="cannot read image"):
        attention_maps.open_rgb(str(not_an_image))
    with pytest.raises(utils.InputError, match="cannot read image"):
        attention_maps.open_rgb(str(tmp_path / "missing.png"))


def test_model_is_frozen_and_needs_weights_or_an_explicit_random(tiny_vit):
    assert not tiny_vit.training
    assert not any(param.requires_grad for param in tiny_vit.parameters())
    with pytest.raises(utils.InputError, match="random"):  # vit_tiny has no reference release
        utils.build_frozen_backbone("vit_tiny", 8, "", "teacher", torch.device("cpu"),
                                    visualisation=True)


def reference_last_attention(model, images):
    """The last block's softmax(q k^T / sqrt(d)), computed here from the model's weights."""
    x = model.prepare_tokens(images)
    for block in model.blocks[:-1]:
        x = block(x)
    attn = model.blocks[-1].attn
    batch, tokens, dim = x.shape
    head_dim = dim // attn.num_heads
    qkv = attn.qkv(model.blocks[-1].norm1(x)).reshape(batch, tokens, 3, attn.num_heads, head_dim)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(dim=-1)


def test_cls_attention_is_the_exact_cls_row_over_patches(photo, tiny_vit):
    images = attention_maps.image_to_tensor(photo, 8, [48, 72])[None]
    with torch.no_grad():
        full = reference_last_attention(tiny_vit, images)
    np.testing.assert_allclose(full[:, :, 0].sum(-1).numpy(), np.ones((1, 3)), atol=1e-5)
    maps = attention_maps.cls_attention(tiny_vit, images, 8)
    assert maps.shape == (1, 3, 6, 9)
    assert torch.isfinite(maps).all() and (maps > 0).all()
    # Patch k of the sequence is grid cell (k // 9, k % 9): row-major, as the patch embedding.
    torch.testing.assert_close(maps.reshape(1, 3, -1), full[:, :, 0, 1:], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), 1 - full[:, :, 0, 0], atol=1e-5, rtol=0)


def test_batched_frames_give_the_same_maps_as_one_at_a_time(photo, tiny_vit):
    first = attention_maps.image_to_tensor(photo, 8, [32, 48])
    second = attention_maps.image_to_tensor(photo.transpose(Image.FLIP_LEFT_RIGHT), 8, [32, 48])
    batched = attention_maps.cls_attention(tiny_vit, torch.stack([first, second]), 8)
    for index, image in enumerate([first, second]):
        alone = attention_maps.cls_attention(tiny_vit, image[None], 8)[0]
        torch.testing.assert_close(batched[index], alone, atol=1e-6, rtol=1e-4)


def test_upsample_repeats_each_patch_value_over_its_pixels():
    maps = torch.arange(12.0).reshape(1, 2, 2, 3)
    pixels = attention_maps.upsample_patches(maps, 4)
    assert pixels.shape == (1, 2, 8, 12)
    assert pixels[0, 1, 5, 9] == maps[0, 1, 1, 2] == 11
    expected = maps.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    assert torch.equal(pixels, expected)


def test_threshold_mask_by_hand():
    # Head 0 mass (normalised): 0.1 0.4 / 0.2 0.3. Ascending cumulative sums 0.1 0.3 0.6 1.0.
    attentions = torch.tensor([[[0.2, 0.8], [0.4, 0.6]],
                               [[0.6, 0.4], [0.8, 0.2]]])
    # t=0.6 keeps cumsum > 0.4: the 0.3 and 0.4 patches (mass 0.7; 0.4 alone is not enough).
    assert threshold_masks(attentions, 0.6).tolist() == [[[False, True], [False, True]],
                                                         [[True, False], [True, False]]]
    assert threshold_masks(attentions, 0.3).tolist() == [[[False, True], [False, False]],
                                                         [[False, False], [True, False]]]
    assert threshold_masks(attentions, 1.0).all()


def test_threshold_mask_is_the_smallest_top_set_on_real_attention(photo, tiny_vit):
    maps = attention_maps.cls_attention(
        tiny_vit, attention_maps.image_to_tensor(photo, 8, [48, 72])[None], 8)[0].double()
    masks = threshold_masks(maps, 0.6)
    for attention, mask in zip(maps, masks):
        share = attention / attention.sum()
        kept, dropped = share[mask], share[~mask]
        assert kept.sum() >= 0.6
        assert kept.sum() - kept.min() < 0.6  # dropping any kept patch falls short
        assert kept.min() >= dropped.max()


def test_cls_attention_leaves_the_register_tokens_out():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=8, num_register_tokens=4).eval()
    with torch.no_grad():
        model.register_tokens.normal_()
    images = torch.randn(1, 3, 32, 40)
    maps = attention_maps.cls_attention(model, images, patch_size=8)
    tokens = model.prepare_tokens(images)
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    full = model.blocks[-1](tokens, return_attention=True)  # [CLS], 4 registers, 20 patches
    torch.testing.assert_close(maps, full[:, :, 0, 5:].reshape(1, 3, 4, 5))
