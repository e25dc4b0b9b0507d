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
    """sha256 over the names, shapes and leading values of the model's first and last parameters and
    of every parameter a PEFT adapter changes, taken as the model computes with them (see
    :func:`effective_parameters`).

    So a PEFT teacher whose adapters are all zero (LoRA's untrained B = 0, or disabled) IS its bare
    model and agrees with it, while a trained adapter anywhere makes it another teacher. A copy merged
    with ``merge_and_unload()`` is a plain model again, fingerprinted by the first and last parameters
    only, so it agrees with the PEFT model only when the adapters sit in those. A sharded model (DTensor
    parameters, e.g. ``fully_shard``) gives the unsharded model's value on every rank; every rank must
    then call this, since the leading values are gathered.
    """
    from flexkd.adapters.wrappers import unwrap_model

    named = effective_parameters(unwrap_model(model))
    ends = {
        *range(_FINGERPRINT_PARAMETERS),
        *range(len(named) - _FINGERPRINT_PARAMETERS, len(named)),
    }
    digest = hashlib.sha256()
    for position, (name, value, adapted) in enumerate(named):
        if position not in ends and not adapted:
            continue
        param = value()
        digest.update(f"{name}:{tuple(param.shape)}".encode())
        digest.update(_leading_values(param.detach(), _FINGERPRINT_ELEMENTS).numpy().tobytes())
    return digest.hexdigest()


def effective_parameters(model: nn.Module) -> list[tuple[str, Callable[[], torch.Tensor], bool]]:
    """``model``'s parameters as (name, value-maker, changed by an adapter), in ``named_parameters``
    order, as the model computes with them, without changing the model.

    A plain LoRA layer of PEFT (no DoRA-like variant, no LoRA bias) counts as the layer it wraps with
    its active, unmerged adapters merged into the weight the way ``merge()`` does: its names lose
    ``base_layer.``, its ``lora_*`` parameters are left out, and its weight counts as changed when an
    adapter's B is non-zero. Any other PEFT layer keeps all its parameters under their own names, its
    adapter's counted as changed, so it fingerprints as base + adapter, never as its base.
    """
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:  # nothing can be a PEFT layer before peft is imported
        return [
            (name, lambda param=param: param, False) for name, param in model.named_parameters()
        ]
    tuner_layers = [m for m in model.modules() if isinstance(m, tuners.BaseTunerLayer)]
    plain = {name: m for name, m in model.named_modules() if _is_plain_lora(m)}
    adapter_parameters = {
        id(param): layer
        for layer in tuner_layers
        for attribute in layer.adapter_layer_names
        for param in getattr(layer, attribute, nn.ModuleDict()).parameters()
    }
    merged_weights = {id(layer.get_base_layer().weight): layer for layer in plain.values()}
    found = []
    for name, param in model.named_parameters():
        owner = adapter_parameters.get(id(param))
        if owner is not None:
            if not _is_plain_lora(owner):
                found.append((name, lambda param=param: param, True))
            continue
        prefix, _, rest = name.rpartition(".base_layer.")
        if prefix in plain:
            name = f"{prefix}.{rest}"
        layer = merged_weights.get(id(param))
        if layer is None:
            found.append((name, lambda param=param: param, False))
        else:
            merged = lambda layer=layer, param=param: _merged_weight(layer, param)  # noqa: E731
            found.append((name, merged, bool(_unmerged_adapters(layer))))
    return found


def _is_plain_lora(module: nn.Module) -> bool:
    lora = sys.modules.get("peft.tuners.lora")
    return (
        lora is not None
        and isinstance(module, lora.LoraLayer)
        and not getattr(module, "lora_variant", {})
        and not any(getattr(module, "lora_bias", {}).values())
        and not any(getattr(module, "use_dora", {}).values())
        and isinstance(getattr(module.get_base_layer(), "weight", None), nn.Parameter)
    )


def _unmerged_adapters(layer: nn.Module) -> list[str]:
    """The active adapters of a plain LoRA layer that change its output: not merged, B non-zero."""
    if layer.disable_adapters:
        return []
    found = []
    for name in layer.active_adapters:
        b = layer.lora_B[name] if name in layer.lora_B else layer.lora_embedding_B.get(name)
        if b is None or name in layer.merged_adapters:
            continue
        b = b.weight if isinstance(b, nn.Module) else b
        if torch.count_nonzero(b.full_tensor() if _is_dtensor(b) else b) > 0:
            found.append(name)
    return found


def _merged_weight(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` plus the layer's active adapters not yet merged into it, added as ``merge()`` does."""
    for name in _unmerged_adapters(layer):
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
