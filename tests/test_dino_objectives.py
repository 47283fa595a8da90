"""KoLeo, Sinkhorn-Knopp, iBOT's masks and loss, against float64 computations by hand."""

import numpy as np
import pytest
import torch

import dino_objectives
import main_dino
import utils
import vision_transformer as vits


def log_softmax64(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def hand_koleo(features, eps=1e-8):
    """-mean log(nearest-neighbour distance) of the L2-normalised rows, float64, pair by pair."""
    x = features.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    logs = []
    for i in range(len(x)):
        distances = [np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i]
        logs.append(np.log(min(distances) + eps))
    return -np.mean(logs)


def hand_sinkhorn(scores, iterations=3):
    """DINOv2's Sinkhorn-Knopp sequence, float64: (K, B) layout, every normalisation kept."""
    q = np.exp(scores.double().numpy()).T
    prototypes, batch = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= prototypes
        q /= q.sum(axis=0, keepdims=True)
        q /= batch
    q *= batch
    return q.T


def test_koleo_matches_hand_computation_per_view():
    torch.manual_seed(0)
    features = torch.randn(2 * 5, 7)
    per_view = dino_objectives.koleo_loss_per_view(features)
    expected = hand_koleo(features[:5]) + hand_koleo(features[5:])
    assert per_view.item() == pytest.approx(expected, rel=1e-5)
    # The neighbour is searched within a view only, not across the two views.
    assert dino_objectives.koleo_loss(features).item() == pytest.approx(hand_koleo(features),
                                                                        rel=1e-5)
    assert hand_koleo(features) != pytest.approx(expected / 2, rel=1e-3)


def test_koleo_is_scale_free_finite_on_duplicates_and_pushes_points_apart():
    torch.manual_seed(1)
    features = torch.randn(6, 4)
    assert dino_objectives.koleo_loss(features * 10).item() == pytest.approx(
        dino_objectives.koleo_loss(features).item(), rel=1e-5)
    duplicates = torch.cat((features[:3], features[:3]))
    assert dino_objectives.koleo_loss(duplicates).item() == pytest.approx(-np.log(1e-8), rel=1e-3)
    points = features.clone().requires_grad_(True)
    dino_objectives.koleo_loss(points).backward()
    with torch.no_grad():
        moved = points - 0.01 * points.grad
    assert dino_objectives.koleo_loss(moved) < dino_objectives.koleo_loss(features)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_sinkhorn_knopp_matches_dinov2_sequence(scale):
    torch.manual_seed(2)
    # Scale 40 gives scores up to ~150, whose exp() overflows float32 (not float64).
    scores = torch.randn(9, 5) * scale / 25 / 0.04
    probs = dino_objectives.sinkhorn_knopp(scores)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    np.testing.assert_allclose(probs.numpy(), hand_sinkhorn(scores), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(9))
    if scale == 1.0:  # balanced over the prototypes: far closer to equal masses than softmax
        softmax_spread = torch.softmax(scores, dim=1).sum(dim=0).std()
        assert probs.sum(dim=0).std() < 0.2 * softmax_spread


def test_dino_loss_with_sinkhorn_knopp_targets_and_no_center_update():
    torch.manual_seed(3)
    ncrops, batch, dim = 4, 3, 6
    loss_fn = main_dino.DINOLoss(dim, ncrops, 0.04, 0.04, 0, 2, centering="sinkhorn_knopp")
    student, teacher = torch.randn(ncrops * batch, dim), torch.randn(2 * batch, dim)
    loss = loss_fn(student, teacher, epoch=0)
    q = hand_sinkhorn(teacher / 0.04)
    log_p = log_softmax64(student.double().numpy() / 0.1)
    rows = [slice(c * batch, (c + 1) * batch) for c in range(ncrops)]
    terms = [np.mean(np.sum(-q[rows[t]] * log_p[rows[s]], axis=1))
             for t in range(2) for s in range(ncrops) if s != t]
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)
    assert torch.equal(loss_fn.center, torch.zeros(1, dim))
    assert list(loss_fn.state_dict()) == ["center"]


def hand_patch_masks(masks):
    return dino_objectives.patch_masks_of(np.array(masks, dtype=bool), torch.device("cpu"))


def test_ibot_loss_and_center_update_match_hand_computation():
    torch.manual_seed(4)
    masks = [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]  # 3 images, 4 patches: 3 + 0 + 1 masked
    patch_masks = hand_patch_masks(masks)
    dim = 5
    loss_fn = dino_objectives.IBOTPatchLoss(dim)
    loss_fn.center.copy_(torch.randn(1, dim) * 0.1)
    center = loss_fn.center.clone()
    student, teacher = torch.randn(4, dim), torch.randn(4, dim)
    loss = loss_fn(student, teacher, patch_masks, teacher_temp=0.07)

    q = np.exp(log_softmax64((teacher.double().numpy() - center.double().numpy()) / 0.07))
    token_ce = np.sum(-q * log_softmax64(student.double().numpy() / 0.1), axis=1)
    # Image 0 averages its 3 tokens, image 2 its 1, image 1 counts as 0; 3 images in all.
    expected = (token_ce[:3].mean() + 0.0 + token_ce[3]) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    expected_center = 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected_center)
    assert list(loss_fn.state_dict()) == ["center"]

    no_masks = hand_patch_masks([[0, 0, 0, 0]] * 3)
    empty = torch.zeros(0, dim)
    assert loss_fn(empty, empty, no_masks, 0.07).item() == 0.0
    torch.testing.assert_close(loss_fn.center, expected_center)  # nothing to average: kept


def test_ibot_loss_with_sinkhorn_knopp_leaves_the_center():
    torch.manual_seed(5)
    patch_masks = hand_patch_masks([[1, 1, 0], [0, 1, 1]])
    loss_fn = dino_objectives.IBOTPatchLoss(6, centering="sinkhorn_knopp")
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    loss = loss_fn(student, teacher, patch_masks, teacher_temp=0.04)
    token_ce = np.sum(-hand_sinkhorn(teacher / 0.04)
                      * log_softmax64(student.double().numpy() / 0.1), axis=1)
    assert loss.item() == pytest.approx((token_ce[:2].mean() + token_ce[2:].mean()) / 2, rel=1e-5)
    assert torch.equal(loss_fn.center, torch.zeros(1, 6))


def test_block_mask_counts_and_rectangles():
    rng = np.random.default_rng(0)
    for target in (4, 10, 30, 50):
        mask = dino_objectives.block_mask(rng, 10, 10, target)
        assert 0 < mask.sum() <= target
        assert mask.sum() >= 0.5 * target  # blocks are added until (about) the target
    single = np.zeros((8, 8), dtype=bool)  # one block: a filled rectangle of 4 to 12 patches
    added = dino_objectives._add_block(np.random.default_rng(3), single, 12, 4, 0.3)
    rows, cols = np.nonzero(single)
    assert single[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert 4 <= added == single.sum() <= 12
    assert dino_objectives.block_mask(rng, 4, 4, 0).sum() == 0


def test_mask_sampler_follows_dinov2_batch_rules_and_is_deterministic():
    sampler = dino_objectives.MaskSampler((0.1, 0.5), probability=0.5, seed=7)
    patch_masks = sampler(images=8, grid=(6, 6), draw=3, device=torch.device("cpu"))
    masks = patch_masks.masks
    counts = masks.sum(dim=1)
    assert masks.shape == (8, 36) and masks.dtype == torch.bool
    assert (counts > 0).sum() == 4  # int(8 * 0.5) images get a mask
    assert counts.max() <= int(36 * 0.5)
    torch.testing.assert_close(patch_masks.indices, masks.reshape(-1).nonzero().squeeze(1))
    torch.testing.assert_close(patch_masks.weights,
                               1.0 / counts[patch_masks.indices // 36].float())
    again = sampler(images=8, grid=(6, 6), draw=3, device=torch.device("cpu"))
    assert torch.equal(again.masks, masks)
    assert not torch.equal(sampler(8, (6, 6), 4, torch.device("cpu")).masks, masks)


def tiny_vit(**options):
    torch.manual_seed(0)
    return vits.VisionTransformer(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  qkv_bias=True, **options).eval()


def test_masked_wrapper_without_masks_gives_the_multicrop_outputs():
    backbone, head = tiny_vit(), vits.DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8)] * 3
    plain = utils.MultiCropWrapper(backbone, head)(crops)
    outputs = dino_objectives.MaskedMultiCropWrapper(backbone, head)(crops)
    assert torch.equal(outputs.dino, plain)
    assert torch.equal(outputs.global_cls, backbone(torch.cat(crops[:2])))
    assert outputs.ibot is None


def test_masked_wrapper_masks_the_student_inputs_only():
    backbone = tiny_vit(use_mask_token=True, num_register_tokens=2)
    torch.nn.init.normal_(backbone.mask_token)
    head = vits.DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)
    ibot_head = vits.DINOHead(32, 12, hidden_dim=24, bottleneck_dim=8)
    wrapper = dino_objectives.MaskedMultiCropWrapper(backbone, head, ibot_head)
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    patch_masks = hand_patch_masks([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    student = wrapper(crops, patch_masks)
    teacher = wrapper(crops, patch_masks, mask_inputs=False)
    images = torch.cat(crops)
    masked_cls, masked_patches = backbone.forward_features(images, patch_masks.masks)
    _, intact_patches = backbone.forward_features(images)
    assert student.ibot.shape == (6, 12)
    torch.testing.assert_close(student.ibot, ibot_head(masked_patches[patch_masks.masks]))
    torch.testing.assert_close(teacher.ibot, ibot_head(intact_patches[patch_masks.masks]))
    torch.testing.assert_close(student.global_cls, masked_cls)
    assert not torch.allclose(student.ibot, teacher.ibot)
    shared = dino_objectives.MaskedMultiCropWrapper(backbone, head)(crops, patch_masks)
    torch.testing.assert_close(shared.ibot, head(masked_patches[patch_masks.masks]))


def test_ibot_center_moves_once_per_accumulated_step():
    torch.manual_seed(6)
    loss_fn = dino_objectives.IBOTPatchLoss(4, micro_batches=2)
    first, second = torch.randn(3, 4), torch.randn(5, 4)
    loss_fn.update_center(first)
    assert torch.equal(loss_fn.center, torch.zeros(1, 4))
    loss_fn.update_center(second)
    expected = 0.1 * torch.cat((first, second)).mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)
