"""The adequacy step: the test-adequacy experiments (DeepImportance RQ1-5) and the coverage table of a run's model.

What the experiments share before any measurement: a data set as in-memory tensors (through the project's data
modules), the classifier under test (the project's ``ImageClassifier`` on a Lightning ``Trainer``, or one loaded from
a checkpoint), the merged YAML config (``configs/adequacy/default.yaml``, ``quick.yaml``, then flags), and one call per
research question that writes its tables and plots under the folder the caller gives (a run store's
``adequacy_dir``). The science (attributions, IDC, criteria, attacks, the RQs themselves) is in ``adequacy/``.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["AdequacyData", "load_data", "train_classifier", "load_classifier", "accuracy", "build_config", "prepare",
           "run_rq", "RQS", "step_coverage"]

@dataclass
class AdequacyData:
    """Tensors of one data set: ``train_x [N, C, H, W]`` / ``train_y [N]`` (the training split), ``test_x`` /
    ``test_y`` (the pool test suites are drawn from: the evaluation split), the class count, and the input range
    ``clip_values`` (normalised pixel 0 and 1, over all channels) that attacks and noise stay within."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    clip_values: tuple[float, float]
    datamodule: object = field(default=None, repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])


def _split_tensors(dm, split: str, max_n: int | None, seed: int, desc: str) -> tuple[Tensor, Tensor]:
    ds = dm.dataset(split)
    idx = np.arange(len(ds))
    if max_n is not None and len(idx) > max_n:
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=max_n, replace=False))
    xs, ys = [], []
    for i in tqdm(idx, desc=desc, leave=False, disable=len(idx) < 5000):
        x, y, _ = ds[int(i)]
        xs.append(x)
        ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def load_data(name: str = "digits", root: str | None = None, image_size: int | None = None, seed: int = 0,
              max_train: int | None = None, max_test: int | None = None, test_split: str = "eval",
              batch_size: int = 64) -> AdequacyData:
    """A registered data module (``vitfl.datamodules.build_datamodule``: digits, cifar100, tiny_imagenet) as tensors.
    ``max_train`` / ``max_test`` cap the splits by a seeded random subset (large data sets)."""
    from vitfl.datamodules import build_datamodule

    kw = {"root": root, "seed": seed, "batch_size": batch_size}
    if image_size is not None:
        kw["image_size"] = image_size
    dm = build_datamodule(name, **kw)
    dm.setup()
    tx, ty = _split_tensors(dm, "train", max_train, seed, f"{name} train")
    ex, ey = _split_tensors(dm, test_split, max_test, seed + 1, f"{name} {test_split}")
    mean, std = np.asarray(dm.mean), np.asarray(dm.std)
    clip = (float(((0 - mean) / std).min()), float(((1 - mean) / std).max()))
    return AdequacyData(name, tx, ty, ex, ey, int(dm.num_classes), clip, dm)


def train_classifier(data: AdequacyData, backbone: str = "lenet5", backbone_kwargs: dict | None = None,
                     max_epochs: int = 30, lr: float = 2e-3, weight_decay: float = 1e-4, batch_size: int = 64,
                     seed: int = 0, progress: bool = True) -> nn.Module:
    """Train ``ImageClassifier(backbone)`` on ``data``'s training tensors with a Lightning ``Trainer`` (CPU or the
    available accelerator, no logger, no checkpoints) and return its backbone (images -> logits) in eval mode."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vitfl.lightning_modules.classifier import ImageClassifier

    L.seed_everything(seed, workers=True, verbose=False)
    kwargs = dict(backbone_kwargs or {})
    if backbone in ("lenet5", "small_cnn"):
        kwargs.setdefault("in_channels", data.input_shape[0])
        kwargs.setdefault("image_size", data.input_shape[-1])
    module = ImageClassifier(backbone=backbone, num_classes=data.num_classes, backbone_kwargs=kwargs, lr=lr,
                             weight_decay=weight_decay, warmup_epochs=min(1.0, max_epochs / 10))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=batch_size, shuffle=True,
                        generator=gen)
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, deterministic=False,
                        accelerator="auto", devices=1)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    model = module.backbone.cpu().eval()
    model.train_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return model


def load_classifier(checkpoint: str) -> nn.Module:
    """The backbone of an ``ImageClassifier`` Lightning checkpoint, on CPU in eval mode."""
    from vitfl.lightning_modules.runs import load_classifier as load

    return load(checkpoint).backbone.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    from vitfl.adequacy.activations import predict

    return float((predict(model, x, batch_size).argmax(1) == y).float().mean())


RQS = ("rq1", "rq2", "rq3", "rq4", "rq5")


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_config(configs: list[str | Path], quick_config: str | Path | None = None,
                 flags: Mapping[str, Any] | None = None) -> dict:
    """Merge the YAML files in order, then ``quick_config`` (when given), then the non-None ``flags``."""
    cfg: dict = {}
    for path in configs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        cfg = _merge(cfg, yaml.safe_load(path.read_text()) or {})
    if quick_config is not None:
        cfg = _merge(cfg, yaml.safe_load(Path(quick_config).read_text()) or {})
    f = {k: v for k, v in (flags or {}).items() if v is not None}
    over: dict = {}
    for key, path in (("data", ("data", "name")), ("root", ("data", "root")), ("checkpoint", ("model", "checkpoint")),
                      ("backbone", ("model", "backbone")), ("layer", ("layer",)), ("method", ("attribution", "method")),
                      ("token_reduction", ("token_reduction",)), ("seed", ("seed",)),
                      ("max_train", ("data", "max_train")), ("max_test", ("data", "max_test")),
                      ("threads", ("threads",))):
        if key in f:
            node = over
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = f[key]
    return _merge(cfg, over)


def prepare(cfg: Mapping, progress: bool = True):
    """(data, model, info): the data set as tensors and the classifier under test (loaded or trained now)."""
    d, mc = cfg["data"], cfg["model"]
    data = load_data(d["name"], d.get("root"), d.get("image_size"), seed=cfg.get("seed", 0),
                     max_train=d.get("max_train"), max_test=d.get("max_test"))
    t0 = time.perf_counter()
    if mc.get("checkpoint"):
        model = load_classifier(mc["checkpoint"])
        source = f"checkpoint {mc['checkpoint']}"
    else:
        model = train_classifier(data, mc["backbone"], mc.get("backbone_kwargs") or {}, mc.get("max_epochs", 30),
                                 mc.get("lr", 2e-3), mc.get("weight_decay", 1e-4), mc.get("batch_size", 64),
                                 seed=cfg.get("seed", 0), progress=progress)
        source = f"trained {mc['backbone']} for {mc.get('max_epochs', 30)} epochs"
    info = {"model": source, "model_seconds": time.perf_counter() - t0, "data": data.name,
            "n_train": len(data.train_x), "n_test_pool": len(data.test_x),
            "train_accuracy": accuracy(model, data.train_x, data.train_y),
            "test_accuracy": accuracy(model, data.test_x, data.test_y)}
    return data, model, info


def _attr_kw(cfg: Mapping) -> dict:
    a = cfg.get("attribution", {})
    return {"n_steps": a.get("n_steps", 32), "batch_size": a.get("batch_size", 64)}


def _methods(model, methods) -> list[str]:
    from vitfl.adequacy.attribution import _is_vit

    methods = list(methods)
    if _is_vit(model) and "lrp" in methods:
        warnings.warn("Captum's LRP cannot run on a ViT: leaving 'lrp' out", stacklevel=2)
        methods.remove("lrp")
    return methods


def _suite(cfg, data, model, progress):
    from vitfl.adequacy.experiments import CoverageSuite

    return CoverageSuite(model, data.train_x, data.train_y, cfg.get("layer"), cfg.get("criteria"), cfg.get("idc"),
                         method=cfg.get("attribution", {}).get("method"),
                         token_reduction=cfg.get("token_reduction", "cls"), sa_labels=cfg.get("sa_labels", "pred"),
                         attr_kw=_attr_kw(cfg), progress=progress)


def run_rq(rq: str, cfg: Mapping, out_dir: str | Path, progress: bool = True) -> dict:
    """Prepare data and model, run research question ``rq`` and write its results under ``out_dir``.
    Returns {"results": DataFrames, "paths": written files, "info": model and timing facts}."""
    if rq not in RQS:
        raise ValueError(f"unknown research question {rq!r}; expected one of {RQS}")
    import torch

    threads = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _run_rq(rq, cfg, out_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _run_rq(rq: str, cfg: Mapping, out_dir: str | Path, progress: bool) -> dict:
    from vitfl.adequacy import experiments as ex

    t0 = time.perf_counter()
    data, model, info = prepare(cfg, progress)
    seed, tr = cfg.get("seed", 0), cfg.get("token_reduction", "cls")
    akw = _attr_kw(cfg)
    c = cfg.get(rq, {})
    if rq == "rq1":
        res = ex.rq1_pruning(model, data.train_x, data.train_y, data.test_x, data.test_y, layer=cfg.get("layer"),
                             methods=_methods(model, c["methods"]), ns=c["ns"], random_reps=c["random_reps"],
                             seed=seed, token_reduction=tr, progress=progress, **akw)
        report = ex.report_rq1
    elif rq == "rq2":
        suite = _suite(cfg, data, model, progress)
        info["suite"] = suite.describe()
        res = ex.rq2_diversity(suite, data.test_x, data.test_y, data.clip_values, frac=c["frac"], sigma=c["sigma"],
                               iterations=c["iterations"], input_method=c["input_method"], seed=seed,
                               progress=progress, **akw)
        report = ex.report_rq2
    elif rq == "rq3":
        suite = _suite(cfg, data, model, progress)
        info["suite"] = suite.describe()
        res = ex.rq3_sensitivity(suite, data.test_x, data.test_y, data.clip_values, sizes=c["sizes"],
                                 ratios=c["ratios"], attacks=c["attacks"], seed=seed, progress=progress,
                                 attack_kw=c.get("attack_kw"))
        report = ex.report_rq3
    elif rq == "rq4":
        suite = _suite(cfg, data, model, progress)
        info["suite"] = suite.describe()
        res = ex.rq4_correlation(suite, data.test_x, data.test_y, data.num_classes, data.clip_values,
                                 sizes=c["sizes"], reps=c["reps"], seed=seed, progress=progress, cw_kw=c.get("cw_kw"))
        report = ex.report_rq4
    else:
        res = ex.rq5_overhead(model, data.train_x, data.train_y, data.test_x, data.test_y, layer=cfg.get("layer"),
                              methods=_methods(model, c["methods"]), criteria=cfg.get("criteria"),
                              idc=cfg.get("idc"), modes=[tuple(m) for m in c["modes"]], token_reduction=tr,
                              progress=progress, **akw)
        report = ex.report_rq5
    info["seconds"] = time.perf_counter() - t0
    paths = report(out_dir, res, {**cfg, "run_info": info})
    return {"results": res, "paths": paths, "info": info}


def step_coverage(layout, quick: bool = False, attack: str = "fgsm", n_train: int | None = None,
                  n_clean: int | None = None, batch_size: int = 128, criteria: Mapping | None = None,
                  attr_kw: Mapping | None = None):
    """The coverage table of a run's model at its last FFN's activation: every criterion (or ``criteria``) on the
    clean evaluation split vs its adversarial version (FGSM through ART), written to the run's ``adequacy/`` and
    printed. ``n_train`` / ``n_clean``: seeded samples of the training and evaluation splits (quick: 300 / 100;
    default: all); ``batch_size``: the attack's batch (small for a ViT-B on a CPU). Skipped when the table of the same
    checkpoint (content hash) and options exists (``adequacy/coverage.done.json``)."""
    from vitfl.adequacy.attacks import adversarial_examples
    from vitfl.adequacy.experiments import coverage_table, report_coverage_table
    from vitfl.lightning_modules.runs import datamodule_from_run, load_run_model

    epochs = layout.checkpoint_epochs()
    identity = {"kind": "coverage", "checkpoint": layout.file_hash(layout.checkpoint(epochs[-1])) if epochs else None,
                "options": {"quick": quick, "attack": attack, "n_train": n_train, "n_clean": n_clean,
                            "criteria": criteria, "attr_kw": attr_kw}}
    marker = layout.path("adequacy_marker", name="coverage", rq="coverage")
    done = layout.read_result(marker, identity)
    if done is not None and all(layout.abs(p).is_file() for p in done.get("paths", ())):
        print(f"the coverage table of this checkpoint with these options exists ({layout.rel(marker)}): skipped")
        return None
    model, epoch = load_run_model(layout)
    net = model.backbone.eval()
    dm = datamodule_from_run(layout)
    dm.setup()

    def tensors(split, n=None):
        ds = dm.dataset(split)
        idx = range(len(ds))
        if n is not None and n < len(ds):  # a seeded sample: a split may be ordered by class
            idx = sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist())
        items = [ds[i] for i in idx]
        return torch.stack([t[0] for t in items]), torch.tensor([t[1] for t in items])

    train_x, train_y = tensors("train", n_train if n_train is not None else (300 if quick else None))
    clean_x, clean_y = tensors("eval", n_clean if n_clean is not None else (100 if quick else None))
    mean, std = np.asarray(dm.mean), np.asarray(dm.std)
    clip = (float(((0 - mean) / std).min()), float(((1 - mean) / std).max()))
    adv_x = adversarial_examples(net, clean_x, clean_y, method=attack, clip_values=clip,
                                 nb_classes=dm.num_classes, batch_size=batch_size)
    with torch.no_grad():
        fooled = (net(adv_x).argmax(1) != clean_y).float().mean().item()
    df = coverage_table(net, None, train_x, clean_x, adv_x, train_labels=train_y, clean_labels=clean_y,
                        adv_labels=clean_y, criteria=criteria, attr_kw=attr_kw)
    paths = report_coverage_table(layout.adequacy_dir, df, {"epoch": epoch, "attack": attack, "n_clean": len(clean_x),
                                                           "n_train": len(train_x), "attack_success": fooled})
    layout.write_result(marker, identity, {"kind": "coverage", "paths": [layout.rel(p) for p in paths]})
    print(f"{attack.upper()} fooled {fooled:.1%} of {len(clean_x)} clean eval inputs; layer: "
          f"{', '.join(df.attrs.get('layers', []))}")
    show = df[["criterion", "params", "clean", "adversarial", "delta", "kind"]].copy()
    for c in ("clean", "adversarial", "delta"):
        show[c] = show[c].map(lambda v: f"{v:.4g}")
    print(show.to_string(index=False))
    return df
