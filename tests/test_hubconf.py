import os
import subprocess
import sys
import types
import urllib.error

import pytest
import torch
import torch.nn as nn

import hubconf
import utils
import vision_transformer as vits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL_PREFIX = "https://dl.fbaipublicfiles.com/dino/"
# name: (feature width, parameters without classifier (reference §3.1; ResNet-50 without fc),
#        reference release file)
REFERENCE_ENTRIES = {
    "dino_vits16": (384, 21_665_664, "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "dino_vits8": (384, 21_670_272, "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "dino_vitb16": (768, 85_798_656, "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "dino_vitb8": (768, 85_807_872, "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dino_resnet50": (2048, 23_508_032, "dino_resnet50_pretrain/dino_resnet50_pretrain.pth"),
}
XCIT_ENTRIES = ["dino_xcit_small_12_p16", "dino_xcit_small_12_p8", "dino_xcit_medium_24_p16",
                "dino_xcit_medium_24_p8"]


@pytest.fixture
def no_download(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"unexpected download of {url}")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_dependencies_and_entry_points():
    assert hubconf.dependencies == ["torch", "torchvision"]
    for name in [*REFERENCE_ENTRIES, *XCIT_ENTRIES, "dino_from_checkpoint"]:
        assert callable(getattr(hubconf, name)), name


@pytest.mark.parametrize("name", sorted(REFERENCE_ENTRIES))
def test_entry_builds_without_weights_through_torch_hub(name, no_download):
    width, n_params, _ = REFERENCE_ENTRIES[name]
    model = torch.hub.load(REPO, name, source="local", pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == n_params
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert model(images).shape == (2, width)
        if isinstance(model, vits.VisionTransformer):
            patch = model.patch_embed.patch_size
            tokens = (32 // patch) * (48 // patch) + 1
            heads = width // 64
            attention = model.get_last_selfattention(images)
            assert attention.shape == (2, heads, tokens, tokens)
            assert torch.allclose(attention.sum(-1), torch.ones(2, heads, tokens))
            layers = model.get_intermediate_layers(images, n=2)
            assert [layer.shape for layer in layers] == [(2, tokens, width)] * 2


def test_vit_kwargs_reach_the_constructor(no_download):
    model = hubconf.dino_vits16(pretrained=False, drop_path_rate=0.2)
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_non_vit_entries_reject_constructor_kwargs():
    with pytest.raises(TypeError, match="drop_path_rate"):
        hubconf.dino_resnet50(pretrained=False, zero_init_residual=True)


@pytest.mark.parametrize("name", sorted(REFERENCE_ENTRIES))
def test_pretrained_asks_for_the_reference_release_and_fails_clearly_offline(name, monkeypatch):
    requests = []

    def record(url, map_location=None, **kwargs):
        requests.append((url, map_location))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", record)
    with pytest.raises(utils.InputError, match="could not download reference weights"):
        getattr(hubconf, name)()
    assert requests == [(URL_PREFIX + REFERENCE_ENTRIES[name][2], "cpu")]


@pytest.mark.parametrize("name", ["dino_vits16", "dino_resnet50"])
def test_pretrained_weights_are_loaded(name, monkeypatch):
    torch.manual_seed(1)
    release = {key: value.clone()
               for key, value in getattr(hubconf, name)(pretrained=False).state_dict().items()}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: release)
    torch.manual_seed(2)
    model = getattr(hubconf, name)()
    for key, value in model.state_dict().items():
        assert torch.equal(value, release[key]), key
    # ViT releases load strictly, as the reference; the ResNet-50 one does not (no `fc` keys).
    del release["norm.weight" if name == "dino_vits16" else "bn1.weight"]
    if name == "dino_vits16":
        with pytest.raises(RuntimeError, match="norm.weight"):
            getattr(hubconf, name)()
    else:
        getattr(hubconf, name)()


@pytest.mark.parametrize("name", XCIT_ENTRIES)
def test_xcit_entry_fetches_the_xcit_repo_and_fails_clearly_offline(name, monkeypatch):
    calls = []

    def offline_hub_load(repo, model, **kwargs):
        calls.append((repo, model, kwargs))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load", offline_hub_load)
    with pytest.raises(utils.InputError, match="facebookresearch/xcit"):
        getattr(hubconf, name)(pretrained=False)
    assert calls == [("facebookresearch/xcit:main", name[len("dino_"):],
                      {"pretrained": False, "num_classes": 0, "drop_path_rate": 0.0})]


def test_xcit_pretrained_uses_its_release(monkeypatch):
    stand_in = nn.Linear(4, 4)
    stand_in.embed_dim = 4
    release = {key: torch.full_like(value, 0.5) for key, value in stand_in.state_dict().items()}
    requests = []
    monkeypatch.setattr(torch.hub, "load", lambda repo, model, **kwargs: stand_in)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, **kwargs: requests.append(url) or release)
    model = hubconf.dino_xcit_medium_24_p8()
    assert requests == [URL_PREFIX + "dino_xcit_medium_24_p8_pretrain/"
                                     "dino_xcit_medium_24_p8_pretrain.pth"]
    assert torch.equal(model.weight, torch.full((4, 4), 0.5))


def test_a_shadowing_utils_module_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))
    with pytest.raises(ImportError, match="not DINO's utils.py"):
        torch.hub.load(REPO, "dino_vits16", source="local", pretrained=False)


# ------------------------------------------------------------------------------------------------
# dino_from_checkpoint, on a checkpoint written by main_dino
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory):
    """checkpoint.pth of a one-epoch (one-iteration) vit_tiny/8 main_dino run on 32 digits."""
    from sample_data import write_digits_folder

    root = tmp_path_factory.mktemp("hub_ckpt")
    data = write_digits_folder(str(root / "data"), size=32, limit=32)
    command = [sys.executable, "main_dino.py", "--data_path", data, "--output_dir",
               str(root / "out"), "--arch", "vit_tiny", "--patch_size", "8",
               "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
               "--out_dim", "64", "--epochs", "1", "--batch_size_per_gpu", "32",
               "--warmup_epochs", "0", "--num_workers", "0", "--lr", "0.01"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return str(root / "out" / "checkpoint.pth")


@pytest.mark.slow
def test_checkpoint_entry_reads_arch_and_patch_from_stored_args(dino_checkpoint):
    model = torch.hub.load(REPO, "dino_from_checkpoint", source="local",
                           checkpoint=dino_checkpoint)
    teacher = utils.load_checkpoint_file(dino_checkpoint)["teacher"]
    assert isinstance(model, vits.VisionTransformer)
    assert model.embed_dim == 192 and model.patch_embed.patch_size == 8
    for key, value in model.state_dict().items():
        assert torch.equal(value, teacher["backbone." + key]), key


@pytest.mark.slow
def test_checkpoint_entry_loads_the_student_when_asked(dino_checkpoint):
    student = hubconf.dino_from_checkpoint(dino_checkpoint, checkpoint_key="student")
    teacher = hubconf.dino_from_checkpoint(dino_checkpoint)
    stored = utils.load_checkpoint_file(dino_checkpoint)["student"]
    for key, value in student.state_dict().items():
        assert torch.equal(value, stored["module.backbone." + key]), key
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)


@pytest.mark.slow
def test_checkpoint_entry_errors(dino_checkpoint, tmp_path):
    with pytest.raises(utils.InputError, match="is not a file"):
        hubconf.dino_from_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(utils.InputError, match="unknown architecture 'vit_huge'"):
        hubconf.dino_from_checkpoint(dino_checkpoint, arch="vit_huge")
    with pytest.raises(utils.InputError, match="does not fit the model: pos_embed has shape"):
        hubconf.dino_from_checkpoint(dino_checkpoint, patch_size=16)
    with pytest.raises(utils.InputError, match="has no 'ema' entry"):
        hubconf.dino_from_checkpoint(dino_checkpoint, checkpoint_key="ema")


@pytest.mark.slow
def test_checkpoint_entry_on_a_backbone_only_file(dino_checkpoint, tmp_path):
    teacher = utils.load_checkpoint_file(dino_checkpoint)["teacher"]
    backbone = {key[len("backbone."):]: value for key, value in teacher.items()
                if key.startswith("backbone.")}
    path = str(tmp_path / "backbone.pth")
    torch.save(backbone, path)
    with pytest.raises(utils.InputError, match="pass arch="):
        hubconf.dino_from_checkpoint(path)
    model = hubconf.dino_from_checkpoint(path, arch="vit_tiny", patch_size=8)
    assert all(torch.equal(value, backbone[key]) for key, value in model.state_dict().items())
