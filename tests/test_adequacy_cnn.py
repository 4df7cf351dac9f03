"""The adequacy CNNs (lightning_modules/cnn.py): registry, shapes, argument checks, Lightning training step."""
import pytest
import torch

from vitfl.lightning_modules.backbones import build_backbone, registered_backbones
from vitfl.lightning_modules.cnn import LeNet5, SmallCNN


def test_registered_and_shapes():
    assert {"lenet5", "small_cnn"} <= set(registered_backbones())
    lenet = build_backbone("lenet5", 10)
    assert isinstance(lenet, LeNet5)
    assert lenet(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert build_backbone("lenet5", 7, in_channels=3, image_size=32)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    cnn = build_backbone("small_cnn", 100, in_channels=3, image_size=32, width=8)
    assert isinstance(cnn, SmallCNN)
    assert cnn(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert cnn(torch.zeros(1, 3, 64, 64)).shape == (1, 100)  # global pooling: any size


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible by 4"):
        LeNet5(image_size=10)
    with pytest.raises(TypeError, match="unexpected"):
        build_backbone("lenet5", 10, hidden_size=3)


def test_image_classifier_trains_lenet():
    from vitfl.lightning_modules.classifier import ImageClassifier

    torch.manual_seed(0)
    module = ImageClassifier(backbone="lenet5", num_classes=3, backbone_kwargs={"in_channels": 1, "image_size": 8})
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
