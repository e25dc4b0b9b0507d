"""A teacher's identity, so a saved selection can be checked against the model it is used with."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

# Config entries that say how a model is run or saved, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "use_cache",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_commit_hash",
        "id2label",
        "label2id",
        "problem_type",
    }
)
_FINGERPRINT_PARAMETERS = 4  # first and last few parameters are enough to tell checkpoints apart
_FINGERPRINT_ELEMENTS = 4096


@dataclass(frozen=True)
class TeacherIdentity:
    """What a selection records about its teacher; ``mismatches`` lists every way another teacher differs."""

    name: str
    model_type: str
    side: str
    hidden_size: int
    num_layers: int
    config_hash: str
    weights_fingerprint: str

    @classmethod
    def of(cls, model: nn.Module, side: str | None = None) -> TeacherIdentity:
        from flexkd.adapters.registry import get_adapter, unwrap_model

        model = unwrap_model(model)
        adapter = get_adapter(model, side=side)
        return cls(
            name=str(getattr(model.config, "_name_or_path", "") or ""),
            model_type=adapter.model_type,
            side=adapter.side,
            hidden_size=adapter.hidden_size,
            num_layers=adapter.num_layers,
            config_hash=config_hash(model.config),
            weights_fingerprint=weights_fingerprint(model),
        )

    @property
    def teacher_id(self) -> str:
        """The model's name or path when it has one, else ``config-<hash prefix>``."""
        return self.name or f"config-{self.config_hash[:16]}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TeacherIdentity:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})

    def mismatches(self, other: TeacherIdentity, *, check_weights: bool = True) -> list[str]:
        """Reasons a selection scored on ``self`` must not be used with ``other`` (empty when it may)."""
        problems = []
        for field in ("model_type", "side", "hidden_size", "num_layers"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                problems.append(
                    f"{field}: the selection was scored with {mine!r}, the teacher has {theirs!r}"
                )
        same_name = bool(self.name) and self.name == other.name
        if self.config_hash != other.config_hash and not same_name:
            problems.append(
                f"config: the selection was scored on {self.teacher_id!r} (config hash {self.config_hash[:16]}), "
                f"the teacher is {other.teacher_id!r} (config hash {other.config_hash[:16]})"
            )
        if check_weights and self.weights_fingerprint != other.weights_fingerprint:
            problems.append(
                f"weights: the teacher's weights differ from those the selection was scored with (fingerprint "
                f"{self.weights_fingerprint[:16]} vs {other.weights_fingerprint[:16]}); pass check_weights=False "
                f"to use it anyway"
            )
        return problems


def config_hash(config) -> str:
    """sha256 of the config's architecture-defining entries (run-time and bookkeeping entries dropped)."""
    data = {
        key: value for key, value in config.to_dict().items() if key not in _VOLATILE_CONFIG_KEYS
    }
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and leading values of the model's first and last parameters,
    taken as the model computes with them (see :func:`effective_parameters`).

    So a PEFT model is fingerprinted by its merged weights: with untrained LoRA adapters (B = 0) it is
    the bare model and agrees with it, and with ``merge_and_unload()`` it agrees with its merged
    model; a trained adapter on a sampled parameter makes it another teacher. A sharded model
    (DTensor parameters, e.g. ``fully_shard``) gives the unsharded model's value on every rank; every
    rank must then call this, since the leading values are gathered.
    """
    from flexkd.adapters.wrappers import unwrap_model

    named = effective_parameters(unwrap_model(model))
    chosen = named[:_FINGERPRINT_PARAMETERS] + named[-_FINGERPRINT_PARAMETERS:]
    digest = hashlib.sha256()
    for name, value in chosen:
        param = value()
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(_leading_values(param.detach(), _FINGERPRINT_ELEMENTS).numpy().tobytes())
    return digest.hexdigest()


def effective_parameters(model: nn.Module) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """``model``'s parameters as (name, value-maker), in ``named_parameters`` order, as the model
    computes with them, without changing the model.

    A plain LoRA layer of PEFT (no DoRA-like variant, no LoRA bias) counts as the layer it wraps with
    its active, unmerged adapters merged into the weight the way ``merge()`` would: its names lose
    ``base_layer.`` and its ``lora_*`` parameters are left out. Any other PEFT layer keeps all its
    parameters under their own names, so it fingerprints as base + adapter, unlike its base.
    """
    layers = _plain_lora_layers(model)
    adapter_parameters = {
        id(param)
        for layer in layers.values()
        for attribute in layer.adapter_layer_names
        for param in getattr(layer, attribute).parameters()
    }
    merged_weights = {id(layer.get_base_layer().weight): layer for layer in layers.values()}
    found = []
    for name, param in model.named_parameters():
        if id(param) in adapter_parameters:
            continue
        prefix, _, rest = name.rpartition(".base_layer.")
        if prefix in layers:
            name = f"{prefix}.{rest}"
        layer = merged_weights.get(id(param))
        if layer is None:
            found.append((name, lambda param=param: param))
        else:
            found.append((name, lambda layer=layer, param=param: _merged_weight(layer, param)))
    return found


def _plain_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    lora = sys.modules.get("peft.tuners.lora")
    if lora is None:  # nothing can be a PEFT layer before peft is imported
        return {}
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, lora.LoraLayer)
        and not getattr(module, "lora_variant", {})
        and not any(getattr(module, "lora_bias", {}).values())
        and not any(getattr(module, "use_dora", {}).values())
        and isinstance(getattr(module.get_base_layer(), "weight", None), nn.Parameter)
    }


def _merged_weight(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` plus the layer's active adapters not yet merged into it, added as ``merge()`` does."""
    if layer.disable_adapters:
        return weight
    adapters = [*layer.lora_A.keys(), *layer.lora_embedding_A.keys()]
    for name in layer.active_adapters:
        if name in adapters and name not in layer.merged_adapters:
            weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    return weight


def _leading_values(param: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` elements of ``param`` flattened, as fp32 on the CPU."""
    if not _is_dtensor(param):
        return param.reshape(-1)[:count].to(device="cpu", dtype=torch.float32)
    if param.dim() == 0:
        return param.full_tensor().reshape(1).to(device="cpu", dtype=torch.float32)
    return _dtensor_leading_values(param, count)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _dtensor_leading_values(param, count: int) -> torch.Tensor:
    """The leading values of a DTensor without gathering it: each rank places the part of the first
    ``count`` global elements it holds into a zero buffer of their fp32 bit patterns, and the buffers
    are summed over the mesh (a sum of one pattern and zeros is exact, -0.0 and NaN included)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, param.placements
    if any(not isinstance(p, (Shard, Replicate)) for p in placements):  # the same on every rank
        raise ValueError(f"weights_fingerprint: cannot read parameters placed as {placements}")
    local = param.to_local()
    count = min(count, param.numel())
    bits = torch.zeros(count, dtype=torch.int64, device=local.device)
    coordinate = mesh.get_coordinate()
    # Of the ranks that hold the same block (replicated mesh dims), only the first contributes.
    contributes = coordinate is not None and all(
        c == 0 for c, p in zip(coordinate, placements, strict=True) if not isinstance(p, Shard)
    )
    if contributes and local.numel() > 0 and count > 0:
        _, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
        strides = torch.ones(param.dim(), dtype=torch.int64)
        for d in range(param.dim() - 2, -1, -1):
            strides[d] = strides[d + 1] * param.shape[d + 1]
        rows = max(0, min(local.shape[0], -(-count // int(strides[0])) - offset[0]))
        block = local[:rows]
        flat = torch.zeros((), dtype=torch.int64)
        for d in range(param.dim()):
            along = (offset[d] + torch.arange(block.shape[d])) * strides[d]
            flat = flat.unsqueeze(-1) + along
        flat, values = flat.reshape(-1), block.reshape(-1).to(device="cpu", dtype=torch.float32)
        keep = flat < count
        bits[flat[keep].to(bits.device)] = (
            values[keep].view(torch.int32).to(torch.int64).to(bits.device)
        )
    for dim in range(mesh.ndim):
        torch.distributed.all_reduce(bits, group=mesh.get_group(dim))
    return bits.cpu().to(torch.int32).view(torch.float32)
