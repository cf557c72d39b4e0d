"""Self-contained checkpoints: the record of how a model was built, and the model rebuilt from it.

A checkpoint written by :class:`~retrieval_lightning.module.RetrievalModule` (through Lightning or
``save_checkpoint``) carries, beside its weights, an *architecture record*: the backbone's and every
head's class and constructor arguments (heads recorded by registry name, so plugins resolve through
the registry on load) and the module's own arguments. ``load_from_checkpoint(path)`` needs nothing
else: no config file, no datamodule.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from functools import partial
from typing import TYPE_CHECKING, Any, Mapping

from retrieval_lightning.checkpoints import ARCHITECTURE_FORMAT, ARCHITECTURE_KEY, PLUGINS_KEY, CheckpointLoadError
from retrieval_lightning.registry import HEADS, PluginError

if TYPE_CHECKING:
    from retrieval_lightning.module import RetrievalModule

#: the alias module through which configs name heads (``class_path: gem_arcface``)
_ALIAS_MODULE = "retrieval_lightning.head_plugins"


def _import_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def head_class_path(cls: type) -> str:
    """The registry name of a head class when it has one (also for config aliases), else its import path."""
    if cls.__module__ == _ALIAS_MODULE:
        return cls.__qualname__
    target = f"{cls.__module__}:{cls.__qualname__}"
    for name, entry in HEADS.entries().items():
        if entry.target == target:
            return name
    return _import_path(cls)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record {type(value).__name__} in a checkpoint's architecture: {value!r}")


def architecture_of(module: "RetrievalModule") -> dict[str, Any]:
    """The architecture record of a module (plain values only: loads with ``weights_only=True``)."""
    backbone_args = dict(module.backbone.init_args)
    backbone_args["weights"] = None  # the checkpoint's weights replace whatever the backbone started from
    return {
        "format": ARCHITECTURE_FORMAT,
        "backbone": {"class_path": _import_path(type(module.backbone)), "init_args": _plain(backbone_args)},
        "heads": {
            role: {"class_path": head_class_path(type(head)), "init_args": _plain(head.init_args)}
            for role, head in module.heads.items()
        },
        "module": _plain({
            "num_classes": module.num_classes,
            "loss_weights": module.loss_weights,
            "detach": sorted(module.detach),
            "freeze": sorted(module.frozen),
            "optim": module.optim,
            "eval_scales": list(module.eval_scales),
            "eval_resize": module.eval_resize,
            "search_chunk": module.search_chunk,
            "freeze_bn": module.freeze_bn,
            "rerank": module.rerank,
            "postprocess": module.postprocess,
            # only when set: a record written before the option existed still equals one of a run without it
            **({"momentum_contrast": module.momentum_contrast.config} if module.momentum_contrast is not None else {}),
        }),
    }


def plugin_sources(module: "RetrievalModule") -> dict[str, str]:
    """``{head name: "distribution version"}`` of the module's registered heads."""
    entries = HEADS.entries()
    names = {head_class_path(type(head)) for head in module.heads.values()}
    return {name: f"{entries[name].distribution} {entries[name].version}" for name in sorted(names) if name in entries}


def _resolve(class_path: str, what: str) -> type:
    if "." not in class_path or class_path.startswith(_ALIAS_MODULE + "."):
        return HEADS.get(class_path.rsplit(".", 1)[-1])
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CheckpointLoadError(f"{what} class {class_path!r} cannot be imported: {exc}") from exc


def _accepted_arguments(cls: type | partial) -> set[str] | None:
    """Keyword arguments ``cls`` takes (``None``: any, or its signature cannot be read)."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def _construct(cls: type | partial, init_args: Mapping[str, Any], what: str, source: str) -> Any:
    """``cls(**init_args)``, or an error naming the checkpoint, the part and the arguments that
    do not fit (a checkpoint written by another version of a plugin)."""
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as exc:
        target = cls.func if isinstance(cls, partial) else cls
        accepted = _accepted_arguments(cls)
        unknown = sorted(set(init_args) - accepted) if accepted is not None else []
        hint = (f"; this version of {target.__name__} takes no argument {', '.join(map(repr, unknown))} (the "
                "checkpoint was written by another version of it)") if unknown else ""
        raise CheckpointLoadError(f"{source}: {what} ({target.__module__}.{target.__qualname__}) cannot be built "
                                  f"from the checkpoint's arguments {dict(init_args)}: {exc}{hint}") from exc


def resolve_head(checkpoint: Mapping[str, Any], role: str, source: str) -> type:
    """The class of the checkpoint's head ``role``, or an error naming the distribution it came from when its
    plugin is not installed here."""
    spec = checkpoint[ARCHITECTURE_KEY]["heads"][role]
    try:
        return _resolve(spec["class_path"], f"head {role!r}")
    except PluginError as exc:
        origin = (checkpoint.get(PLUGINS_KEY) or {}).get(spec["class_path"])
        hint = (f"; the checkpoint's head {spec['class_path']!r} came from distribution {origin}: install it"
                if origin and spec["class_path"] not in HEADS.entries() else "")
        raise CheckpointLoadError(f"{source}: head {role!r}: {exc}{hint}") from exc


def build_from_architecture(checkpoint: Mapping[str, Any], source: str, overrides: Mapping[str, Any]) -> "RetrievalModule":
    """A fresh, unloaded module built from a checkpoint's architecture record."""
    from retrieval_lightning.module import RetrievalModule
    from retrieval_lightning.optim import OptimConfig
    from retrieval_lightning.retrieval.postprocess import PostProcessConfig
    from retrieval_lightning.retrieval.rerank import RerankConfig

    record = checkpoint.get(ARCHITECTURE_KEY)
    if not isinstance(record, Mapping):
        raise CheckpointLoadError(
            f"{source} has no architecture record (written before self-contained checkpoints, or not by "
            "retrieval-lightning): build the model from its config and load it with init_from"
        )
    if record.get("format") != ARCHITECTURE_FORMAT:
        raise CheckpointLoadError(f"{source}: architecture record format {record.get('format')!r}, "
                                  f"this version reads {ARCHITECTURE_FORMAT}")
    for part, keys in (("backbone", ("class_path", "init_args")), ("heads", ()), ("module", ("optim", "rerank"))):
        if not isinstance(record.get(part), Mapping) or any(key not in record[part] for key in keys):
            raise CheckpointLoadError(f"{source}: its architecture record has no complete {part!r} entry (a file "
                                      "edited or cut short?): rebuild the model from its config with init_from")
    backbone_cls = _resolve(record["backbone"]["class_path"], "backbone")
    backbone = _construct(backbone_cls, record["backbone"]["init_args"], "the backbone", source)
    heads = {role: _construct(resolve_head(checkpoint, role, source), spec["init_args"], f"head {role!r}", source)
             for role, spec in record["heads"].items()}
    args = dict(record["module"])
    args.pop("momentum_contrast", None)  # a training device (its momentum copy is training-only): not rebuilt
    args.pop("spill", None)  # a machine's setting (a directory there), not the model's: the default unless overridden
    args["optim"] = _construct(OptimConfig, args["optim"], "the module's optim", source)
    args["rerank"] = _construct(RerankConfig, args["rerank"], "the module's rerank", source)
    if args.get("postprocess"):
        args["postprocess"] = _construct(PostProcessConfig, args["postprocess"], "the module's postprocess", source)
    else:
        args["postprocess"] = None
    args.update(overrides)
    what = f"the module (overridden: {', '.join(sorted(overrides))})" if overrides else "the module"
    return _construct(partial(RetrievalModule, backbone=backbone, heads=heads), args, what, source)
