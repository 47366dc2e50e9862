"""Strict reading of what a run wrote: checkpoints (run folder or checkpoint directory) and timm exports.

A *source* is a run folder (its newest complete checkpoint), a checkpoint directory
``RUN/checkpoints/step_XXXXXXXX/`` (the recipe is its own ``config.yaml``; ``RUN/config.yaml`` for
checkpoints written before they held one) or, for the evaluation tools, a folder written by
:func:`smog_scale.export.timm_export.export_timm`. A checkpoint holds Accelerate's
``model.safetensors`` or, from a DeepSpeed run, DeepSpeed's ``pytorch_model/`` folder. Loading is
strict everywhere: a key or shape that does not fit raises :class:`CheckpointLoadError` naming the file
and the keys. Only the export drops keys (projector, predictor, the other encoder), and it names them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import timm
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from smog_scale.config.schema import ModelConfig
from smog_scale.models.backbone import build_backbone  # also registers resnet50x2 / resnet50x4
from smog_scale.models.smog import SMoGModel
from smog_scale.training import checkpoint

Encoder = Literal["online", "momentum"]

_DDP_PREFIX = "module."  # Accelerate saves a DDP-wrapped model's state dict with this prefix

_DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate's save_state gives DeepSpeed's checkpoint

SHOWN_KEYS = 8  # keys listed per kind in an error message



class CheckpointLoadError(ValueError):
    """A source that cannot be loaded as asked; the message names the file and the offending keys."""



@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint and the recipe it was trained with."""

    path: Path  # RUN/checkpoints/step_XXXXXXXX
    config_file: Path  # the checkpoint's config.yaml (RUN/config.yaml for older checkpoints)
    recipe: dict[str, Any]  # config.yaml as written by the trainer (resolved config plus "derived")
    step: int

    @property
    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig(**self.recipe.get("model", {}))
        except TypeError as err:
            raise CheckpointLoadError(f"{self.config_file}: bad 'model' section: {err}") from err

    @property
    def weights(self) -> Path:
        """What holds the model: ``model.safetensors``, or the ``pytorch_model/`` folder of a DeepSpeed run."""
        deepspeed = self.path / _DEEPSPEED_TAG
        return deepspeed if deepspeed.is_dir() else self.path / "model.safetensors"

    @property
    def image_size(self) -> int:
        """Side of the global crops the backbone was trained on (first record of ``data.crops``)."""
        crops = self.recipe.get("data", {}).get("crops") or [{}]
        return int(crops[0].get("size", 224))



def resolve_checkpoint(source: str | Path) -> Checkpoint:
    """The checkpoint named by a run folder (newest complete one) or a checkpoint directory."""
    path = Path(source)
    if not path.exists():
        raise CheckpointLoadError(f"{path}: no such run folder or checkpoint directory")
    if not path.name.startswith(checkpoint.PREFIX) and (path / "config.yaml").is_file():
        found = checkpoint.complete_checkpoints(path)
        if not found:
            raise CheckpointLoadError(f"{path}: run folder without a complete checkpoint in "
                                  f"{checkpoint.checkpoint_dir(path)}")
        path = found[-1]
    elif not path.name.startswith(checkpoint.PREFIX):
        raise CheckpointLoadError(f"{path}: neither a run folder (config.yaml) nor a checkpoint directory "
                                  "(step_XXXXXXXX)")
    config_file = checkpoint.recipe_file(path)
    if not config_file.is_file():
        raise CheckpointLoadError(f"{config_file}: missing; a checkpoint's recipe is read from its config.yaml "
                              "(from RUN/config.yaml for checkpoints written before they held one)")
    recipe = yaml.safe_load(config_file.read_text()) or {}
    state_file = path / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    step = state.get("global_step", path.name[len(checkpoint.PREFIX):])
    return Checkpoint(path, config_file, recipe, int(step))



def read_state(ckpt: Checkpoint, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of the checkpoint's model whose key starts with ``prefix`` (prefix removed), and every key.

    Keys are the SMoGModel's (``online.backbone.*`` ...); a DDP wrapper's ``module.`` is removed.
    From ``model.safetensors`` only the selected tensors are read, so exporting R50x4 does not load both
    encoders. A DeepSpeed checkpoint is merged to float32 whole by DeepSpeed's own ``zero_to_fp32``.
    """
    file = ckpt.weights
    if file.name == _DEEPSPEED_TAG:
        stored = _read_deepspeed(ckpt.path)
        return {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}, list(stored)
    if not file.is_file():
        raise CheckpointLoadError(f"{file}: missing; a complete checkpoint holds Accelerate's model.safetensors "
                              f"(or DeepSpeed's {_DEEPSPEED_TAG}/ folder)")
    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            wrapped = bool(keys) and all(k.startswith(_DDP_PREFIX) for k in keys)
            names = {k.removeprefix(_DDP_PREFIX) if wrapped else k: k for k in keys}
            tensors = {k[len(prefix):]: handle.get_tensor(s) for k, s in names.items() if k.startswith(prefix)}
    except (SafetensorError, OSError) as err:
        raise CheckpointLoadError(f"{file}: not a readable safetensors file: {err}") from err
    return tensors, list(names)



def _read_deepspeed(path: Path) -> dict[str, torch.Tensor]:
    """Float32 weights of the DeepSpeed ZeRO checkpoint in ``path / pytorch_model`` (tested: ZeRO-2, 1 rank)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise CheckpointLoadError(f"{path / _DEEPSPEED_TAG}: a DeepSpeed checkpoint; reading it needs DeepSpeed "
                              f"(pip install 'smog_scale[deepspeed]')") from err
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=_DEEPSPEED_TAG)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointLoadError(f"{path / _DEEPSPEED_TAG}: not a readable DeepSpeed checkpoint: {err!r}") \
            from err



def strict_load(module: nn.Module, state: dict[str, torch.Tensor], file: Path, prefix: str = "",
                what: str = "") -> None:
    """``module.load_state_dict(state)`` that fails naming missing, unexpected and mis-shaped keys.

    ``prefix`` is prepended to the keys in the message; ``what`` describes ``module`` there."""
    expected = module.state_dict()
    missing = [prefix + k for k in expected if k not in state]
    unexpected = [prefix + k for k in state if k not in expected]
    shapes = [f"{prefix}{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {kind}: " + ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
                if keys]
    if problems:
        raise CheckpointLoadError(f"{file} does not fit {what or type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)



def load_backbone(ckpt: Checkpoint, which: Encoder = "online") -> tuple[nn.Module, dict[str, int]]:
    """The ``which`` encoder's backbone (eval mode) and the other keys by prefix: {prefix: tensors}."""
    prefix = f"{which}.backbone."
    state, keys = read_state(ckpt, prefix)
    if not state:
        raise CheckpointLoadError(f"{ckpt.weights}: no '{prefix}*' keys; not a SMoG checkpoint "
                              f"(keys start with {sorted({k.split('.')[0] for k in keys})[:SHOWN_KEYS]})")
    mc = ckpt.model_config
    backbone = build_backbone(mc.backbone, **mc.backbone_kwargs)
    strict_load(backbone, state, ckpt.weights, prefix,
                f"{mc.backbone}{f' {mc.backbone_kwargs}' if mc.backbone_kwargs else ''} (model in {ckpt.config_file})")
    dropped = Counter(".".join(k.split(".")[:2 if k.startswith(("online.", "momentum.")) else 1])
                      for k in keys if not k.startswith(prefix))
    return backbone.eval(), dict(sorted(dropped.items()))



def load_model(ckpt: Checkpoint) -> SMoGModel:
    """The whole SMoGModel of a checkpoint (eval mode), loaded strictly."""
    mc = ckpt.model_config
    model = SMoGModel(mc.backbone, mc.proj_hidden_dim, mc.proj_dim, mc.pred_hidden_dim, mc.backbone_kwargs)
    strict_load(model, read_state(ckpt)[0], ckpt.weights,
                what=f"SMoGModel of {ckpt.config_file}")
    return model.eval()



def load_groups(ckpt: Checkpoint) -> torch.Tensor:
    """The group features G [K, D] saved with the checkpoint."""
    file = ckpt.path / "smog.safetensors"
    if not file.is_file():
        raise CheckpointLoadError(f"{file}: missing; a complete checkpoint holds the groups in smog.safetensors")
    groups = load_file(str(file)).get("groups")
    dim = ckpt.model_config.proj_dim
    if groups is None or groups.ndim != 2 or groups.shape[1] != dim:
        shape = None if groups is None else tuple(groups.shape)
        raise CheckpointLoadError(f"{file}: expected 'groups' [K, {dim}] (model.proj_dim = {dim}), found {shape}")
    return groups



def input_side(backbone: nn.Module, backbone_kwargs: dict[str, Any], trained_side: int) -> int:
    """Evaluation input side: the training crop size, unless the model has a fixed input size (Swin)."""
    defaults = cast(dict[str, Any], backbone.pretrained_cfg)  # timm's, a plain dict
    if not defaults.get("fixed_input_size", False):
        return trained_side
    size = backbone_kwargs.get("img_size", defaults["input_size"][1:])
    return int(size if isinstance(size, int) else size[-1])



def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()



def load_exported(export_dir: str | Path) -> nn.Module:
    """An export folder through timm's ``local-dir:`` loader (strict: config.json says num_classes 0), eval mode."""
    try:
        return timm.create_model(f"local-dir:{Path(export_dir).resolve()}", pretrained=True, num_classes=0).eval()
    except (RuntimeError, FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointLoadError(f"{export_dir}: timm cannot load this export: {err}") from err



@dataclass(frozen=True)
class EvalBackbone:
    """A backbone to evaluate with what the evaluation tools print and record about it."""

    module: nn.Module
    architecture: str
    image_size: int
    description: str



def load_eval_backbone(source: str | Path, which: Encoder = "online", random_init: bool = False) -> EvalBackbone:
    """Backbone of an export folder, run folder or checkpoint; ``random_init``: same architecture, untrained.

    A checkpoint is loaded whole and strictly (only the export drops keys), then ``which`` encoder's
    backbone is taken.
    """
    if is_export_dir(source):
        try:
            config = json.loads((Path(source) / "config.json").read_text())
            arch, kwargs = config["architecture"], config.get("model_args", {})
            size = int(config["pretrained_cfg"]["input_size"][-1])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            raise CheckpointLoadError(f"{Path(source) / 'config.json'}: not an export's config: {err!r}") from err
        module = None if random_init else load_exported(source)
        trained = f"export {source} (step {config.get('smog', {}).get('step', '?')})"
    else:
        ckpt = resolve_checkpoint(source)
        arch, kwargs, size = ckpt.model_config.backbone, ckpt.model_config.backbone_kwargs, ckpt.image_size
        module = None if random_init else getattr(load_model(ckpt), which).backbone  # strict, nothing dropped
        trained = f"{ckpt.path} ({which} encoder, step {ckpt.step})"
    if module is None:  # random_init
        torch.manual_seed(0)
        module = build_backbone(arch, **kwargs).eval()
    size = input_side(module, kwargs, size)
    return EvalBackbone(module, arch, size, f"{arch} random init" if random_init else f"{arch} from {trained}")
