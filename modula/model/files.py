"""Expert files: one safetensors file per expert plus a JSON manifest; loading verifies it all.

Layout of an experts directory::

    manifest.json                what the files are and what they fit (see ``save_experts``)
    universal.safetensors        E* of every adapted layer        (lora, flan, res)
    domain-<name>.safetensors    one per domain expert            (molora, flan, res)
    routers.safetensors          every layer's router             (molora, flan, res)

Tensors are named ``<module path>.A`` / ``.B`` (routers: ``<module path>.router``). Each file
also carries its own metadata (expert, variant, rank, alpha, base fingerprint), so a file saved
alone by a trainer (``save_expert``) can be checked without a manifest. Saving is
deterministic and skips files whose bytes would not change, so adding a domain leaves the old
experts' files untouched. Only safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from modula.config.names import DOMAIN_NAME_RE, RESERVED_EXPERT_NAMES, expert_file
from modula.config.schema import ModulaLayerConfig, RouterConfig
from modula.errors import ModulaError
from modula.infra.files import atomic_write, sha256_file

from .layer import ModulaLinear
from .model import ModulaModel, attach_modula
from .targets import find_targets, linear_dims

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "ExpertFileError",
    "base_model_fingerprint",
    "load_expert",
    "load_experts",
    "load_modula",
    "read_manifest",
    "save_expert",
    "save_experts",
]

FORMAT = "modula-experts"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SAMPLE_BYTES = 1 << 20  # tensors above 1 MiB are fingerprinted from 16 evenly spaced chunks
_CHUNKS = 16


class ExpertFileError(ModulaError, ValueError):
    """An experts directory or file that cannot be loaded; the message says what and where."""


# ---- fingerprint -----------------------------------------------------------------------


def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The base model's parameters under their original names, MoDULA layers seen through."""
    if isinstance(model, ModulaModel):
        model = model.base_model
    out: list[tuple[str, torch.Tensor]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, ModulaLinear):
            module = module.base_layer
        for name, p in module.named_parameters(recurse=False):
            out.append((prefix + name, p))
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    return out


def base_model_fingerprint(model: nn.Module) -> str:
    """A content hash of the frozen base weights (``sha256:<hex>``), the same before and after
    attaching MoDULA. Names, dtypes and shapes are hashed with the bytes of each tensor; a
    tensor above 1 MiB contributes 16 evenly spaced 64 KiB chunks, which keeps a 7B model to a
    second or so while any retrained or different base still changes the hash."""
    h = hashlib.sha256()
    for name, p in _base_parameters(model):
        t = p.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.reshape(-1).contiguous().cpu().view(torch.uint8)
        n = flat.numel()
        if n <= _SAMPLE_BYTES:
            h.update(flat.numpy().tobytes())
        else:
            chunk = _SAMPLE_BYTES // _CHUNKS
            for i in range(_CHUNKS):
                start = (n - chunk) * i // (_CHUNKS - 1)
                h.update(flat[start : start + chunk].numpy().tobytes())
    return "sha256:" + h.hexdigest()


# ---- tensors of one expert ---------------------------------------------------------------


def _expert_kind(name: str) -> str:
    return name if name in ("universal", "routers", "classifier") else "domain"


def _expert_names(model: ModulaModel, *, classifier: bool | None = None) -> list[str]:
    """The model's experts in file order. ``classifier``: include the request classifier
    (default: when the model has a trained one, the only time it is worth saving)."""
    names = [] if model.variant == "molora" else ["universal"]
    names += model.domains
    if model.variant != "lora":
        names.append("routers")
    rr = model.request_router
    if rr is not None and (rr.trained if classifier is None else classifier):
        names.append("classifier")
    return names


def _expert_tensors(model: ModulaModel, name: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if name == "classifier":
        rr = model.request_router
        return {"classifier.weight": rr.head.weight, "classifier.bias": rr.head.bias,
                "classifier.mean": rr.mean, "classifier.scale": rr.scale}
    for path, lyr in model.modula_layers().items():
        if name == "routers":
            out[f"{path}.router"] = lyr.router.weight
        else:
            e = lyr.expert_module(name)
            out[f"{path}.A"], out[f"{path}.B"] = e.A, e.B
    return out


def _expected_shapes(model_info: dict[str, Any], name: str, n_gates: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape an expert file must hold, from the manifest's module table."""
    variant = model_info["variant"]
    shapes: dict[str, tuple[int, ...]] = {}
    if name == "classifier":
        d = int((model_info.get("request_router") or {}).get("features", -1))
        classes = n_gates + (variant == "res")  # [universal, *domains]
        return {"classifier.weight": (classes, d), "classifier.bias": (classes,),
                "classifier.mean": (d,), "classifier.scale": (d,)}
    for path, (d_in, d_out) in model_info["modules"].items():
        if name == "routers":
            shapes[f"{path}.router"] = (n_gates, d_in)
        elif name == "universal":
            r = model_info["universal_rank"]
            shapes[f"{path}.A"], shapes[f"{path}.B"] = (r, d_in), (d_out, r)
        else:
            r = model_info["domain_rank"]
            d_e = d_out if variant == "res" else d_in
            shapes[f"{path}.A"], shapes[f"{path}.B"] = (r, d_e), (d_out, r)
    return shapes


def _model_info(model: ModulaModel) -> dict[str, Any]:
    cfg = model.modula_config
    return {
        "variant": cfg.variant,
        "universal_rank": cfg.universal_rank,
        "domain_rank": cfg.domain_rank,
        "universal_alpha": cfg.universal_scaling * cfg.universal_rank,
        "domain_alpha": cfg.domain_scaling * cfg.domain_rank,
        "leaky_relu_slope": cfg.leaky_relu_slope,
        "res_input_norm": cfg.res_input_norm,
        "dropout": cfg.dropout,
        "router": {"top_k": cfg.router.top_k, "temperature": cfg.router.temperature},
        "target_modules": list(model.target_modules),
        "modules": {p: list(linear_dims(lyr.base_layer)) for p, lyr in model.modula_layers().items()},
        **({"request_router": {"features": model.request_router.n_features,
                               "layers": list(model.request_router.layers)}}
           if model.request_router is not None else {}),
    }


def _file_metadata(model: ModulaModel, name: str, fingerprint: str) -> dict[str, str]:
    """Self-description of one expert file; must not depend on other experts (so adding a
    domain leaves every other file byte-identical), except routers, which hold all rows."""
    cfg = model.modula_config
    kind = _expert_kind(name)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "expert": name,
        "kind": kind,
        "variant": cfg.variant,
        "base_fingerprint": fingerprint,
        "modules_sha256": _modules_digest(_model_info(model)["modules"]),
    }
    if kind == "universal":
        meta["rank"] = str(cfg.universal_rank)
        meta["alpha"] = repr(cfg.universal_scaling * cfg.universal_rank)
    elif kind == "domain":
        meta["rank"] = str(cfg.domain_rank)
        meta["alpha"] = repr(cfg.domain_scaling * cfg.domain_rank)
        if cfg.variant == "res" and cfg.res_input_norm != "none":
            meta["input_norm"] = cfg.res_input_norm  # what the expert was trained to read
    elif kind == "classifier":
        meta["expert_order"] = json.dumps(model.request_classes)
        meta["feature_layers"] = json.dumps(list(model.request_router.layers))
    else:
        meta["expert_order"] = json.dumps(model.expert_names)
    return meta


def _modules_digest(modules: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(modules, sort_keys=True).encode()).hexdigest()


def _serialise(model: ModulaModel, name: str, fingerprint: str) -> bytes:
    """The file's bytes. The metadata goes in as one JSON string: safetensors writes a metadata
    map in hash order, which would make the bytes differ from save to save."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _expert_tensors(model, name).items()}
    meta = json.dumps(_file_metadata(model, name, fingerprint), sort_keys=True)
    return st_save(tensors, metadata={"modula": meta})


def _write_if_changed(path: Path, data: bytes) -> tuple[str, bool]:
    digest = hashlib.sha256(data).hexdigest()
    if path.is_file() and path.stat().st_size == len(data) and sha256_file(path) == digest:
        return digest, False
    atomic_write(path, data)
    return digest, True


# ---- saving ------------------------------------------------------------------------------


def save_expert(model: ModulaModel, name: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write one expert (``universal``, a domain, or ``routers``) as a self-describing file,
    e.g. a domain expert trained alone on a worker. Returns ``{"sha256", "size", "written"}``."""
    if name not in _expert_names(model):
        raise ValueError(f"unknown expert {name!r} (experts: {', '.join(_expert_names(model))})")
    data = _serialise(model, name, base_model_fingerprint(model))
    digest, written = _write_if_changed(Path(path), data)
    return {"sha256": digest, "size": len(data), "written": written}


def save_experts(
    model: ModulaModel, directory: str | os.PathLike[str], base_model_id: str
) -> dict[str, Any]:
    """Write every expert file and ``manifest.json`` (written last, atomically, so a reader
    never sees a manifest naming a half-written file). Files whose bytes do not change are not
    rewritten; files of removed domains are deleted. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = base_model_fingerprint(model)
    old = None
    if (directory / MANIFEST).is_file():
        try:
            old = read_manifest(directory)
        except ExpertFileError:
            old = None
    entries = []
    dtype = None
    for name in _expert_names(model):
        data = _serialise(model, name, fingerprint)
        fname = expert_file(name)
        digest, _ = _write_if_changed(directory / fname, data)
        entries.append(
            {"name": name, "kind": _expert_kind(name), "file": fname, "sha256": digest, "size": len(data)}
        )
        dtype = dtype or str(next(iter(_expert_tensors(model, name).values())).dtype).removeprefix("torch.")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": {"id": base_model_id, "fingerprint": fingerprint},
        **_model_info(model),
        "domains": model.domains,
        "expert_order": model.expert_names,
        "dtype": dtype,
        "experts": entries,
    }
    _write_if_changed(directory / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    if old is not None:
        keep = {e["file"] for e in entries}
        for e in old.get("experts", []):
            stale = directory / e["file"]
            if e["file"] not in keep and stale.is_file():
                stale.unlink()
    return manifest


# ---- reading -----------------------------------------------------------------------------

_REQUIRED = {
    "format": str, "format_version": int, "base_model": dict, "variant": str,
    "universal_rank": int, "domain_rank": int, "universal_alpha": (int, float),
    "domain_alpha": (int, float), "leaky_relu_slope": (int, float), "dropout": (int, float),
    "router": dict, "target_modules": list, "modules": dict, "domains": list, "dtype": str,
    "experts": list,
}


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and structurally validate ``manifest.json``."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ExpertFileError(f"{path}: missing manifest (not an experts directory)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExpertFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExpertFileError(f"{path}: not a {FORMAT} manifest")
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise ExpertFileError(f"{path}: field {key!r} is missing")
        if not isinstance(manifest[key], typ) or isinstance(manifest[key], bool):
            raise ExpertFileError(f"{path}: field {key!r} has the wrong type")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ExpertFileError(
            f"{path}: format_version {manifest['format_version']} is not supported (this code reads {FORMAT_VERSION})"
        )
    if manifest["variant"] not in ("lora", "molora", "flan", "res"):
        raise ExpertFileError(f"{path}: unknown variant {manifest['variant']!r}")
    if not isinstance(manifest["base_model"].get("fingerprint"), str):
        raise ExpertFileError(f"{path}: base_model.fingerprint is missing")
    for e in manifest["experts"]:
        if not isinstance(e, dict) or not {"name", "file", "sha256", "size"} <= set(e):
            raise ExpertFileError(f"{path}: an experts entry lacks name/file/sha256/size")
        f = e["file"]
        if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", "..") or not f.endswith(".safetensors"):
            raise ExpertFileError(f"{path}: expert {e['name']!r} names an unsafe file {f!r}")
    for d in manifest["domains"]:
        if not isinstance(d, str) or not DOMAIN_NAME_RE.match(d) or d in RESERVED_EXPERT_NAMES:
            raise ExpertFileError(f"{path}: invalid domain name {d!r}")
    if len(set(manifest["domains"])) != len(manifest["domains"]):
        raise ExpertFileError(f"{path}: a domain is listed twice")
    for p, dims in manifest["modules"].items():
        if not (isinstance(dims, list) and len(dims) == 2 and all(isinstance(v, int) for v in dims)):
            raise ExpertFileError(f"{path}: module {p!r} has malformed dims {dims!r}")
    return manifest


def _layer_config(manifest: dict[str, Any]) -> ModulaLayerConfig:
    return ModulaLayerConfig(
        variant=manifest["variant"],
        universal_rank=manifest["universal_rank"],
        domain_rank=manifest["domain_rank"],
        universal_alpha=float(manifest["universal_alpha"]),
        domain_alpha=float(manifest["domain_alpha"]),
        dropout=float(manifest["dropout"]),
        target_modules=list(manifest["target_modules"]),
        leaky_relu_slope=float(manifest["leaky_relu_slope"]),
        # manifests written before the option existed hold experts that read h as is
        res_input_norm=manifest.get("res_input_norm", "none"),
        router=RouterConfig(**manifest["router"]),
    )


def _read_verified(
    path: Path, sha256: str | None, size: int | None, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an expert file once, check size and checksum on those bytes, then parse them."""
    if not path.is_file():
        raise ExpertFileError(f"{where}: file {path} is missing")
    data = path.read_bytes()
    if size is not None and len(data) != size:
        raise ExpertFileError(f"{where}: {path.name} is {len(data)} bytes, the manifest says {size}")
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ExpertFileError(
                f"{where}: checksum mismatch for {path.name} (sha256 {digest[:12]}..., "
                f"expected {sha256[:12]}...): the file is corrupt or was changed"
            )
    try:
        tensors = st_load(data)
        meta = _header_metadata(data)
    except (SafetensorError, ValueError) as exc:
        raise ExpertFileError(f"{where}: {path.name} is not a valid safetensors file ({exc})") from None
    return tensors, meta


def _header_metadata(data: bytes) -> dict[str, str]:
    """Our metadata from a safetensors header (8-byte length, then JSON; see ``_serialise``)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = json.loads((header.get("__metadata__") or {}).get("modula", "{}"))
    if not isinstance(meta, dict):
        raise ValueError("malformed modula metadata")
    return meta


def _check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ExpertFileError(
            f"{where}: tensors do not match the model's adapted layers"
            + (f"; missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "")
            + (f"; unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}" if extra else "")
        )
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ExpertFileError(
                f"{where}: shape mismatch for {k}: file has {tuple(tensors[k].shape)}, "
                f"the model needs {tuple(shape)}"
            )


def _check_compatible(manifest: dict[str, Any], model: ModulaModel, where: str) -> None:
    info = _model_info(model)
    for key in ("variant", "universal_rank", "domain_rank", "leaky_relu_slope"):
        if manifest[key] != info[key]:
            raise ExpertFileError(f"{where}: {key} is {manifest[key]!r} in the files but {info[key]!r} in the model")
    if _has_classifier(manifest) and (manifest.get("request_router") or {}).get("features") != (
            info.get("request_router") or {}).get("features"):
        raise ExpertFileError(f"{where}: the classifier was trained on other features "
                              f"({manifest.get('request_router')}) than this model gives "
                              f"({info.get('request_router')})")
    if manifest.get("res_input_norm", "none") != info["res_input_norm"]:
        raise ExpertFileError(f"{where}: res_input_norm is {manifest.get('res_input_norm', 'none')!r} "
                              f"in the files but {info['res_input_norm']!r} in the model")
    for key in ("universal_alpha", "domain_alpha"):
        if abs(float(manifest[key]) - float(info[key])) > 1e-9 * max(1.0, abs(float(info[key]))):
            raise ExpertFileError(f"{where}: {key} is {manifest[key]} in the files but {info[key]} in the model")
    if manifest["modules"] != info["modules"]:
        ours, theirs = set(info["modules"]), set(manifest["modules"])
        detail = (
            f"only in the files: {sorted(theirs - ours)[:3]}; only in the model: {sorted(ours - theirs)[:3]}"
            if ours != theirs
            else "same layers, different dimensions"
        )
        raise ExpertFileError(
            f"{where}: target modules differ (files: {manifest['target_modules']}, model: "
            f"{info['target_modules']}; {detail})"
        )


def _check_base(manifest: dict[str, Any], fingerprint: str, where: str) -> None:
    theirs = manifest["base_model"]["fingerprint"]
    if theirs != fingerprint:
        raise ExpertFileError(
            f"{where}: the experts were trained on a different base model "
            f"({manifest['base_model'].get('id')!r}, {theirs[:19]}...) than this one ({fingerprint[:19]}...)"
        )


def _read_all(
    directory: Path, manifest: dict[str, Any], names: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    entries = {e["name"]: e for e in manifest["experts"]}
    n_gates = len(manifest["domains"]) + (manifest["variant"] == "flan")
    loaded = {}
    for name in names:
        if name not in entries:
            raise ExpertFileError(f"{directory}: the manifest lists no expert {name!r}")
        e = entries[name]
        where = f"{directory} [{name}]"
        tensors, meta = _read_verified(directory / e["file"], e["sha256"], e["size"], where)
        if meta.get("expert") != name:
            raise ExpertFileError(f"{where}: {e['file']} holds expert {meta.get('expert')!r}, not {name!r}")
        _check_tensors(tensors, _expected_shapes(manifest, name, n_gates), where)
        loaded[name] = tensors
    return loaded


def _copy_into(model: ModulaModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    if name == "classifier" and model.request_router is None:
        raise ExpertFileError(f"the model has no request router to load a classifier into "
                              f"(variant {model.variant!r})")
    model.release_inference()  # new weights: what was derived from the old ones goes
    with torch.no_grad():
        for key, target in _expert_tensors(model, name).items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
    if name == "classifier":
        model.request_router.trained = True


def load_experts(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    verify_base: bool = True,
) -> ModulaModel:
    """Load an experts directory into a ``ModulaModel`` (its variant, ranks, targets and domain
    order must match the manifest) or, given a plain HF model, build one (``load_modula``).
    Everything is verified before any tensor is copied, so a failure leaves the model as it was.
    Raises ``ExpertFileError``."""
    if not isinstance(model, ModulaModel):
        return load_modula(model, directory, verify_base=verify_base)
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = str(directory)
    _check_compatible(manifest, model, where)
    if manifest["domains"] != model.domains:
        raise ExpertFileError(
            f"{where}: domains {manifest['domains']} in the files, {model.domains} in the model "
            "(same names in the same router order are needed)"
        )
    if verify_base:
        _check_base(manifest, base_model_fingerprint(model), where)
    loaded = _read_all(directory, manifest, _expert_names(model, classifier=_has_classifier(manifest)))
    for name, tensors in loaded.items():
        _copy_into(model, name, tensors)
    return model


def _has_classifier(manifest: dict[str, Any]) -> bool:
    return any(e.get("name") == "classifier" for e in manifest["experts"])


def load_modula(
    base_model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    verify_base: bool = True,
    adapter_dtype: torch.dtype | None = None,
) -> ModulaModel:
    """Attach MoDULA to ``base_model`` as the manifest describes and load every expert. The
    base model is only modified once every check has passed."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = str(directory)
    try:
        cfg = _layer_config(manifest)
    except ValueError as exc:
        raise ExpertFileError(f"{where}: the manifest's layer settings are invalid ({exc})") from None
    if verify_base:
        _check_base(manifest, base_model_fingerprint(base_model), where)
    try:
        paths = find_targets(base_model, cfg.target_modules)
    except ValueError as exc:
        raise ExpertFileError(f"{where}: {exc}") from None
    modules = {p: list(linear_dims(base_model.get_submodule(p))) for p in paths}
    if modules != manifest["modules"]:
        raise ExpertFileError(f"{where}: the base model's target layers differ from the manifest's modules")
    names = (["universal"] if cfg.variant != "molora" else []) + list(manifest["domains"])
    names += ["routers"] if cfg.variant != "lora" else []
    names += ["classifier"] if _has_classifier(manifest) else []
    loaded = _read_all(directory, manifest, names)
    dtype = adapter_dtype or getattr(torch, manifest["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ExpertFileError(f"{where}: unknown dtype {manifest['dtype']!r}")
    model = attach_modula(base_model, cfg, list(manifest["domains"]), adapter_dtype=dtype)
    for name, tensors in loaded.items():
        _copy_into(model, name, tensors)
    return model


def load_expert(
    model: ModulaModel,
    name: str,
    path: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    verify_base: bool = True,
) -> None:
    """Load one expert file written by ``save_expert`` (or found in an experts directory) into
    ``model``, whose expert ``name`` must exist (``add_domain`` first for a new domain)."""
    path = Path(path)
    where = f"{path} [{name}]"
    if name not in _expert_names(model, classifier=True):
        raise ExpertFileError(
            f"{where}: the model has no expert {name!r} (experts: {', '.join(_expert_names(model))}; "
            "add_domain() a new domain first)"
        )
    tensors, meta = _read_verified(path, sha256, None, where)
    cfg = model.modula_config
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise ExpertFileError(f"{where}: not a {FORMAT} v{FORMAT_VERSION} expert file")
    if meta.get("kind") != _expert_kind(name):
        raise ExpertFileError(f"{where}: the file holds a {meta.get('kind')!r} expert, not {_expert_kind(name)!r}")
    if meta.get("variant") != cfg.variant:
        raise ExpertFileError(f"{where}: variant {meta.get('variant')!r} in the file, {cfg.variant!r} in the model")
    info = _model_info(model)
    if meta.get("modules_sha256") != _modules_digest(info["modules"]):
        raise ExpertFileError(f"{where}: the file was saved for other target modules / layer sizes")
    if (meta.get("kind") == "domain" and cfg.variant == "res"
            and meta.get("input_norm", "none") != cfg.res_input_norm):
        raise ExpertFileError(
            f"{where}: the expert was trained to read res_input_norm="
            f"{meta.get('input_norm', 'none')!r}, the model uses {cfg.res_input_norm!r}")
    if name == "classifier" and meta.get("expert_order") != json.dumps(model.request_classes):
        raise ExpertFileError(
            f"{where}: classifier saved for classes {meta.get('expert_order')}, the model has "
            f"{model.request_classes}")
    if name == "routers" and meta.get("expert_order") != json.dumps(model.expert_names):
        raise ExpertFileError(
            f"{where}: routers saved for experts {meta.get('expert_order')}, the model has {model.expert_names}"
        )
    if verify_base and meta.get("base_fingerprint") != base_model_fingerprint(model):
        raise ExpertFileError(f"{where}: the expert was trained on a different base model")
    _check_tensors(tensors, _expected_shapes(info, name, len(model.expert_names)), where)
    _copy_into(model, name, tensors)
