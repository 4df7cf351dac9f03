"""Backbone registry: a name -> a builder returning an ``nn.Module`` that maps images ``[B, C, H, W]`` to logits.

``hf_vit`` (Hugging Face ``ViTForImageClassification``) and ``timm_vit`` (timm ``VisionTransformer``) live here;
the CNNs of the test-adequacy part register themselves in ``lightning_modules/cnn.py``. Nothing downloads:
pretrained weights come from a local folder or file given by the user.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitfl.core.registry import Registry, UnknownNameError


class UnknownBackboneError(UnknownNameError):
    """A backbone name no module registered."""


#: every backbone builder (name -> ``fn(num_classes, **kwargs) -> nn.Module``): the ViTs here, the CNNs of the
#: adequacy part in ``lightning_modules/cnn.py``, third-party ones under the ``vitfl.backbones`` entry point
BACKBONES = Registry("backbone", modules=("vitfl.lightning_modules.backbones", "vitfl.lightning_modules.cnn"),
                     entry_points="vitfl.backbones", error=UnknownBackboneError)


class PretrainedWeightsError(FileNotFoundError):
    """A local pretrained-weights path is missing or unreadable."""


def register_backbone(name: str):
    """Decorator: register a builder ``fn(num_classes, **kwargs) -> nn.Module`` as backbone ``name``."""
    return BACKBONES.register(name)


def registered_backbones() -> list[str]:
    return BACKBONES.names()


def build_backbone(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    return BACKBONES.get(name)(num_classes=num_classes, **kwargs)


class HFLogits(nn.Module):
    """Wraps ``ViTForImageClassification`` so that ``forward(pixels) -> logits`` (a tensor, not a ModelOutput).
    The HF model is ``.model`` (the last-FFN adapter unwraps it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


@register_backbone("hf_vit")
def hf_vit(num_classes: int, pretrained_path: str | None = None, image_size: int = 224, patch_size: int = 16,
           num_channels: int = 3, hidden_size: int = 768, num_hidden_layers: int = 12, num_attention_heads: int = 12,
           intermediate_size: int = 3072, hidden_dropout_prob: float = 0.0, attention_probs_dropout_prob: float = 0.0,
           hidden_act: str = "gelu", config: dict | None = None) -> nn.Module:
    """HF ViT from a ``ViTConfig`` (from scratch) or ``from_pretrained(pretrained_path)`` (a local folder written by
    ``save_pretrained``; the classifier is re-initialised when its class count differs). ``config``: a saved
    ``ViTConfig.to_dict()`` (what :func:`architecture_kwargs` records), built from scratch with nothing read from
    disk; it wins over every other argument."""
    from transformers import ViTConfig, ViTForImageClassification

    if config is not None:
        cfg = ViTConfig.from_dict({**config, "num_labels": num_classes})
        model = ViTForImageClassification(cfg)
    elif pretrained_path:
        path = Path(pretrained_path)
        if not (path / "config.json").is_file():
            raise PretrainedWeightsError(
                f"no Hugging Face model folder at {path} (expected config.json and model.safetensors written by "
                "save_pretrained; e.g. `huggingface-cli download google/vit-base-patch16-224-in21k --local-dir "
                f"{path}` on a machine with internet)")
        model = ViTForImageClassification.from_pretrained(str(path), num_labels=num_classes,
                                                          ignore_mismatched_sizes=True, local_files_only=True)
        model.train()  # from_pretrained returns eval mode; a fresh build (and Lightning's fit) expects train mode
    else:
        cfg = ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                        hidden_dropout_prob=hidden_dropout_prob,
                        attention_probs_dropout_prob=attention_probs_dropout_prob, hidden_act=hidden_act,
                        num_labels=num_classes)
        model = ViTForImageClassification(cfg)
    return HFLogits(model)


#: ``ViTConfig`` entries that :func:`architecture_kwargs` leaves out: label names follow ``num_classes``, and the
#: rest is bookkeeping of the folder the weights came from
_HF_CONFIG_DROP = ("id2label", "label2id", "_name_or_path", "transformers_version", "architectures", "_commit_hash",
                   "num_labels")


def architecture_kwargs(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The backbone arguments that rebuild ``module``'s architecture from scratch, with no ``pretrained_path``:
    a checkpoint's module is rebuilt from them and then receives its own weights, so loading it reads nothing but
    the checkpoint (the pretrained folder may have moved or gone). HF: the loaded ``ViTConfig`` (``config``);
    others: ``kwargs`` without ``pretrained_path`` (its file only held weights of the named architecture)."""
    out = {k: v for k, v in kwargs.items() if k != "pretrained_path"}
    if isinstance(module, HFLogits):
        cfg = module.model.config.to_dict()
        out = {"config": {k: v for k, v in cfg.items() if k not in _HF_CONFIG_DROP}}
    return out


@register_backbone("timm_vit")
def timm_vit(num_classes: int, model_name: str = "vit_base_patch16_224", pretrained_path: str | None = None,
             **kwargs: Any) -> nn.Module:
    """timm ``VisionTransformer`` via ``timm.create_model(model_name, pretrained=False, **kwargs)``; optional local
    weights (``.safetensors``, ``.pth``/``.bin`` state dict); a head of another class count is re-initialised."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise PretrainedWeightsError(f"no timm weights file at {path} (expected a .safetensors or .pth state "
                                         "dict of the same architecture)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in state and not k.startswith("head.")]
        if missing:
            raise PretrainedWeightsError(f"{path} does not match {model_name}: missing {missing[:5]}...")
        model.load_state_dict(state, strict=False)
    return model
