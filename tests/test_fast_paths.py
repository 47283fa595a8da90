"""Every fast path gives the plain path's numbers (fp32, one optimizer step, <= 1e-5)."""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import main_dino
import utils
import vision_transformer as vits
from benchmarks import reference_like

CLIP_GRAD = 0.05


def tiny_student_teacher(depth=2):
    torch.manual_seed(0)
    backbone = vits.VisionTransformer(patch_size=8, embed_dim=48, depth=depth, num_heads=3,
                                      qkv_bias=True, drop_path_rate=0.0)
    student = utils.MultiCropWrapper(backbone, vits.DINOHead(48, 64, hidden_dim=96,
                                                             norm_last_layer=False))
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def crops_for_step():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)] + \
           [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(3)]


def fast_step(student, teacher, dino_loss, optimizer, crops):
    loss, _ = main_dino.forward_loss(student, teacher, dino_loss, crops, 0,
                                     torch.autocast("cpu", enabled=False))
    main_dino.backward(loss, optimizer, None)
    main_dino.clip_and_step(student, optimizer, None, 0, CLIP_GRAD, freeze_last_layer=0)
    main_dino.update_teacher(list(student.parameters()), list(teacher.parameters()), 0.9)
    return loss


def reference_like_step(student, teacher, dino_loss, optimizer, crops):
    reference_like.use_explicit_attention(student)
    reference_like.use_explicit_attention(teacher)
    teacher_output = teacher(crops[:2])
    loss = reference_like.dino_loss_pairwise(dino_loss, student(crops), teacher_output, 0)
    optimizer.zero_grad()
    loss.backward()
    reference_like.clip_gradients_per_parameter(student, CLIP_GRAD)
    optimizer.step()
    reference_like.update_teacher_per_parameter(list(student.parameters()),
                                                list(teacher.parameters()), 0.9)
    return loss


def test_fast_training_step_equals_reference_like_step():
    results = []
    for step, fused in ((fast_step, True), (reference_like_step, False)):
        student, teacher = tiny_student_teacher()
        dino_loss = main_dino.DINOLoss(64, 5, 0.04, 0.04, 0, 1)
        # Adam's first step moves a weight by ~lr * g / (|g| + eps) whatever |g| is, so with the
        # default eps a gradient of 1e-8 that two attention kernels round differently moves it
        # by 1e-4; eps 1e-6 keeps that amplification below the tolerance on every CPU.
        optimizer = torch.optim.AdamW(utils.get_params_groups(student), lr=1e-3, eps=1e-6,
                                      fused=fused)
        loss = step(student, teacher, dino_loss, optimizer, crops_for_step())
        results.append((loss.item(), student.state_dict(), teacher.state_dict(), dino_loss.center))
    (fast_loss, fast_student, fast_teacher, fast_center), \
        (ref_loss, ref_student, ref_teacher, ref_center) = results
    assert fast_loss == pytest.approx(ref_loss, rel=1e-6)
    for name in fast_student:
        torch.testing.assert_close(fast_student[name], ref_student[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(fast_teacher[name], ref_teacher[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_center, ref_center, rtol=0, atol=1e-6)
    initial, _ = tiny_student_teacher()
    moved = [not torch.equal(fast_student[n], p) for n, p in initial.state_dict().items()]
    assert sum(moved) > len(moved) // 2  # the step really changed the weights


def test_foreach_clipping_equals_per_parameter_clipping():
    torch.manual_seed(0)
    first, _ = tiny_student_teacher()
    second = copy.deepcopy(first)
    loss_input = torch.randn(6, 3, 32, 32)
    for model in (first, second):
        (model(loss_input) ** 2).sum().backward()
    norms = utils.clip_gradients(first, 0.5)
    reference_norms = reference_like.clip_gradients_per_parameter(second, 0.5)
    assert [n.item() for n in norms] == pytest.approx(reference_norms, rel=1e-6)
    for a, b in zip(first.parameters(), second.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)


def test_fused_adamw_matches_plain_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(5, 7, requires_grad=True), torch.randn(7, requires_grad=True)]
    copies = [w.detach().clone().requires_grad_() for w in weights]
    for params, fused in ((weights, True), (copies, False)):
        optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.04},
                                       {"params": params[1:], "weight_decay": 0.0}],
                                      lr=0.01, fused=fused)
        for _ in range(3):
            optimizer.zero_grad()
            (params[0].sum(0) * params[1]).pow(2).sum().backward()
            optimizer.step()
    for a, b in zip(weights, copies):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_backbone_and_head_match_eager():
    student, _ = tiny_student_teacher()
    compiled = copy.deepcopy(student)
    compiled.backbone.compile(dynamic=False)
    compiled.head.compile(dynamic=False)
    assert list(compiled.state_dict()) == list(student.state_dict())  # keys unchanged
    crops = crops_for_step()
    eager_out, compiled_out = student(crops), compiled(crops)
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=1e-5)
    eager_out.square().sum().backward()
    compiled_out.square().sum().backward()
    for a, b in zip(student.parameters(), compiled.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)


def test_packed_student_gives_the_per_resolution_loss_and_gradients():
    results = []
    for packed in (False, True):
        student, teacher = tiny_student_teacher()
        student.packed = teacher.packed = packed
        dino_loss = main_dino.DINOLoss(64, 5, 0.04, 0.04, 0, 1)
        loss, diagnostics = main_dino.forward_loss(student, teacher, dino_loss, crops_for_step(),
                                                   0, torch.autocast("cpu", enabled=False))
        loss.backward()
        results.append((loss, diagnostics, [p.grad for p in student.parameters()],
                        list(student.state_dict())))
    (loss, diagnostics, grads, keys), (packed_loss, packed_diagnostics, packed_grads,
                                       packed_keys) = results
    assert packed_keys == keys
    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(packed_diagnostics, diagnostics, rtol=0, atol=1e-6)
    for packed_grad, grad in zip(packed_grads, grads):
        torch.testing.assert_close(packed_grad, grad, rtol=0, atol=1e-5)


def test_packed_forward_needs_a_vit():
    resnet, _ = utils.build_backbone("resnet18")
    with pytest.raises(utils.InputError, match="--packed_forward needs one of our ViTs"):
        utils.MultiCropWrapper(resnet, vits.DINOHead(512, 8), packed=True)


@pytest.mark.slow
def test_compiled_step_matches_eager_step(single_process_group, monkeypatch):
    """Teacher, student and loss captured as one graph, with its backward.

    The aot_eager backend checks the capture (autocast, the center's all-reduce, the
    temperature input) and AOTAutograd's backward in seconds; inductor's C++ code generation
    for this graph takes ~2 minutes on a cold cache (the compiled-modules test covers it).
    """
    real_compile = torch.compile
    backend = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", lambda function, mode, **kwargs: real_compile(
        function, backend=backend, **kwargs))
    results = []
    for forward_loss in (main_dino.forward_loss, main_dino.compiled_forward_loss("default")):
        student, teacher = tiny_student_teacher(depth=1)
        student.packed = teacher.packed = True
        student = utils.SingleProcessWrapper(student)  # what a one-process run trains
        dino_loss = main_dino.DINOLoss(64, 5, 0.04, 0.05, 2, 3)
        autocast = torch.autocast("cpu", enabled=False)
        for epoch in (0, 1):  # the temperature changes: no recompilation, the same numbers
            student.zero_grad()
            loss, diagnostics = forward_loss(student, teacher, dino_loss, crops_for_step(),
                                             epoch, autocast)
            loss.backward()
        results.append((loss, diagnostics, dino_loss.center,
                        [p.grad for p in student.parameters()], list(student.state_dict())))
    (loss, diagnostics, center, grads, keys), (compiled_loss, compiled_diagnostics,
                                               compiled_center, compiled_grads,
                                               compiled_keys) = results
    assert backend.frame_count == 1  # one graph, not recompiled for the second epoch
    assert compiled_keys == keys  # no `_orig_mod.` in the checkpoint keys
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled_diagnostics, diagnostics, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled_center, center, rtol=0, atol=1e-6)
    for compiled_grad, grad in zip(compiled_grads, grads):
        torch.testing.assert_close(compiled_grad, grad, rtol=1e-4, atol=1e-5)
