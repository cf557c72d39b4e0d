"""Backbone: named stages for any timm CNN, the EfficientNet-Lite0 package weights, safe loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from skimage import data

from retrieval_lightning.backbone import Backbone, WeightsMismatchError, map_state_dict_in_order
from retrieval_lightning.checkpoints import CheckpointLoadError, load_tensor_file

EGYPTIAN_CAT, TABBY, TIGER_CAT = 285, 281, 282


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return Backbone("efficientnet_lite0", weights="efficientnet_lite0_package", stages=("conv4", "conv5")).eval()


def test_named_stages_for_resnet_and_efficientnet() -> None:
    r = Backbone("resnet18", stages=("conv4", "conv5")).eval()
    out = r(torch.rand(1, 3, 64, 96))
    assert out["conv4"].shape == (1, 256, 4, 6) and out["conv5"].shape == (1, 512, 2, 3)
    assert r.stage_reductions["conv4"] == 16 and r.stage_reductions["conv5"] == 32
    with pytest.raises(ValueError, match="unknown backbone stages"):
        Backbone("resnet18", stages=("layer9",))


def test_lite0_package_weights_recognise_the_cat(lite0: Backbone) -> None:
    import timm

    classifier = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    classifier.load_state_dict(
        {**classifier.state_dict(), **{k: v for k, v in lite0.model.state_dict().items()}}, strict=False
    )
    # the classifier layer is not in the features model: map it from the package file too
    from retrieval_lightning.backbone import efficientnet_lite0_package_file

    full = map_state_dict_in_order(load_tensor_file(efficientnet_lite0_package_file()), classifier.state_dict(), "t")
    classifier.load_state_dict(full)
    image = torch.tensor(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = lite0.normalize(F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True))
    top3 = classifier(x).topk(3).indices[0].tolist()
    assert top3[0] in (EGYPTIAN_CAT, TABBY, TIGER_CAT)
    # and the backbone features equal the classifier's own trunk
    torch.testing.assert_close(lite0.model(x)[4], classifier.blocks(classifier.bn1(classifier.conv_stem(x))))


def test_in_order_mapping_refuses_shape_mismatch() -> None:
    src = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(WeightsMismatchError, match="tensor #1 'b'.*\\(4,\\).*\\(5,\\)"):
        map_state_dict_in_order(src, {"x": torch.zeros(2, 3), "y": torch.zeros(5)}, "test")
    with pytest.raises(WeightsMismatchError, match="2 tensors in the file, the model has 1"):
        map_state_dict_in_order(src, {"x": torch.zeros(2, 3)}, "test")


def test_lite0_package_refuses_other_architectures() -> None:
    with pytest.raises(WeightsMismatchError, match="only fit timm 'efficientnet_lite0'"):
        Backbone("resnet18", weights="efficientnet_lite0_package")


def test_local_weights_file_safetensors_and_torch(tmp_path: Path) -> None:
    source = Backbone("resnet18")
    state = {f"backbone.model.{k}": v.clone() for k, v in source.model.state_dict().items()}
    st_path = tmp_path / "w.safetensors"
    save_file(state, str(st_path))
    loaded = Backbone("resnet18", weights=str(st_path))
    for k, v in source.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v)
    pt_path = tmp_path / "w.pth"
    torch.save({"state_dict": state}, pt_path)
    Backbone("resnet18", weights=str(pt_path))


def test_weights_that_do_not_fit_name_the_keys(tmp_path: Path) -> None:
    state = Backbone("resnet18").model.state_dict()
    state["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match="conv1.weight"):
        Backbone("resnet18", weights=str(path))
    torch.save({"unrelated": torch.zeros(1)}, path)
    with pytest.raises(WeightsMismatchError, match="missing"):
        Backbone("resnet18", weights=str(path))


def test_a_deeper_relatives_weights_are_refused_not_loaded_in_part(tmp_path: Path) -> None:
    """ResNet-34 holds every ResNet-18 tensor, shape for shape: it loaded its first blocks silently."""
    path = tmp_path / "r34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"not part of timm 'resnet18' \(first: \['layer1.2"):
        Backbone("resnet18", weights=str(path))
    imagenet = timm.create_model("resnet18", pretrained=False).state_dict()  # with its classifier: fits
    torch.save(imagenet, path)
    assert torch.equal(Backbone("resnet18", weights=str(path)).model.state_dict()["conv1.weight"],
                       imagenet["conv1.weight"])


def test_an_official_model_state_file_loads_as_backbone_weights(tmp_path: Path) -> None:
    state = Backbone("resnet18").model.state_dict()
    path = tmp_path / "official.pyth"
    torch.save({"model_state": state, "epoch": 3}, path)  # the layout init_from and --ckpt_path accept
    loaded = Backbone("resnet18", weights=str(path))
    assert torch.equal(loaded.model.state_dict()["layer4.1.bn2.running_mean"], state["layer4.1.bn2.running_mean"])


class _Evil:
    def __reduce__(self):
        return (print, ("executed!",))


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointLoadError, match=r"evil.pth: refused .*weights_only.*Cause: Unsupported operand"):
        load_tensor_file(path)
    torch.save({"x": _Evil()}, path)  # torch's own format holding an object: the refused global is named
    with pytest.raises(CheckpointLoadError, match=r"Cause: .*Unsupported global: GLOBAL (builtins.)?print was not an allowed global by default.$"):
        load_tensor_file(path)
    with pytest.raises(CheckpointLoadError, match="not found"):
        load_tensor_file(tmp_path / "missing.pth")


def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path: Path) -> None:
    """Not the unpickling-refusal message (which sends the user re-saving a file that is no checkpoint)."""
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointLoadError, match=r"notes.ckpt: not a PyTorch checkpoint \(neither"):
        load_tensor_file(text)
    saved = tmp_path / "cut.ckpt"
    torch.save({"w": torch.zeros(64, 64)}, saved)
    saved.write_bytes(saved.read_bytes()[:500])  # an interrupted copy
    with pytest.raises(CheckpointLoadError, match=r"cut.ckpt: not a readable checkpoint \(RuntimeError: .*zip archive[^.]*\)$"):
        load_tensor_file(saved)


class _Blocked:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_every_checkpoint_reader_names_the_file_and_reads_torchs_legacy_format(tmp_path: Path) -> None:
    """Found by a review: a legacy-format file (``_use_new_zipfile_serialization=False``, which the readers
    accept) was refused by the memory-mapped reader (``mmap`` needs the zip format); a truncated ``last.ckpt``
    met by a resume and a corrupt ``.safetensors`` file gave tracebacks without the file's name; a blocked
    module's function was "named" by torch's advice to load with ``weights_only=False``."""
    from retrieval_lightning.checkpoints import open_checkpoint, open_lightning_checkpoint

    state = {"state_dict": {"w": torch.arange(6.0)}, "epoch": 3}
    legacy = tmp_path / "legacy.ckpt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for read in (open_checkpoint, open_lightning_checkpoint, load_tensor_file):
        assert torch.equal(read(legacy)["state_dict"]["w"], state["state_dict"]["w"])
    cut = tmp_path / "last.ckpt"
    torch.save(state, cut)
    cut.write_bytes(cut.read_bytes()[:300])  # a preempted write
    with pytest.raises(CheckpointLoadError, match=r"last.ckpt: not a readable checkpoint \(RuntimeError: .*zip"):
        open_checkpoint(cut)
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointLoadError, match=r"w.safetensors: not a readable .safetensors file \(.*"):
        load_tensor_file(weights)
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": _Blocked()}, evil)
    for read in (open_checkpoint, load_tensor_file):
        with pytest.raises(CheckpointLoadError, match=r"evil.ckpt: .*unsupported GLOBAL (posix|nt).system") as caught:
            read(evil)
        assert "weights_only set to False" not in str(caught.value)


def test_bgr_input_order_flips_channels() -> None:
    rgb = Backbone("resnet18", mean=(0, 0, 0), std=(1, 1, 1))
    bgr = Backbone("resnet18", input_order="bgr", mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(bgr.normalize(x), x.flip(1))
    torch.testing.assert_close(rgb.normalize(x), x)
    # default statistics are per RGB channel: with BGR input each channel still gets its own
    rgb, bgr = Backbone("resnet18"), Backbone("resnet18", input_order="bgr")
    torch.testing.assert_close(bgr.normalize(x), rgb.normalize(x).flip(1))


def test_rgb_trained_weights_read_bgr_input_as_they_were_trained(lite0: Backbone) -> None:
    """CVNet's recipes start from RGB-trained ImageNet weights with BGR input: the first convolution
    takes the channels reversed, so the same photo gives the same features; a weights file is
    taken as it is (the official CVNet weights are BGR)."""
    bgr = Backbone("efficientnet_lite0", weights="efficientnet_lite0_package", stages=("conv4", "conv5"),
                   input_order="bgr").eval()
    photo = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want, got = lite0(photo), bgr(photo)
    for stage in ("conv4", "conv5"):
        torch.testing.assert_close(got[stage], want[stage], atol=1e-4, rtol=1e-4)  # summation order only
    assert not torch.equal(bgr.model.conv_stem.weight, lite0.model.conv_stem.weight)


def test_unknown_name_and_unreachable_timm_weights_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval_lightning.backbone import UnknownBackboneError
    from retrieval_lightning.errors import user_error_types

    with pytest.raises(UnknownBackboneError, match=r"unknown timm backbone 'resnet5'; did you mean 'resnet50'"):
        Backbone("resnet5")
    assert issubclass(UnknownBackboneError, user_error_types())

    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache\nand outgoing traffic is off.")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"backbone 'resnet18', weights: timm: the pretrained weights could not "
                                                r"be fetched \(Cannot find the requested files in the disk cache\)"):
        Backbone("resnet18", weights="timm")
    with pytest.raises(LocalEntryNotFoundError):  # without weights to fetch, the failure is not about weights
        Backbone("resnet18", weights=None)
