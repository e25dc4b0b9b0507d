"""Sharded (FSDP2) teachers and students, and the launcher check.

``shard_model`` applies ``torch.distributed.fsdp.fully_shard`` to every transformer block the adapter
finds, then to the model. A sharded model's forward is a collective: every rank must run the same
number of forwards (and backwards), so the helpers here keep ranks in step where their data differ.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn


def close_process_group() -> None:
    """Wait for every rank, then destroy the default process group, if this process has one.

    :func:`end_launched_rank` calls it at the end of a launched rank. The barrier keeps a rank that tears
    down first from cutting off a peer still waiting on its last collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def end_launched_rank(code: int = 0) -> None:
    """For the last line of a script run by torchrun or ``accelerate launch`` (``flexkd`` and
    ``python -m flexkd`` end with it): in such a rank, close the process group (after a success: its
    barrier would wait on ranks a failure may have stopped), run the ``atexit`` handlers, flush the
    standard streams and end the process with ``code`` at once; in any other process, return.

    Ending at once skips Python's finalization and C++ static destructors. Once a functional
    collective has run (FSDP2 and DTensor use them), the gloo backend and its worker threads outlive
    ``destroy_process_group`` (in torch 2.13 the thread count stays where it was), so they would meet
    the interpreter's teardown, where a finished rank was seen to abort ("terminate called without an
    active exception", SIGABRT) and turn a good run into a launcher failure. Files the script wrote
    must be closed before: open buffered files are not flushed."""
    if not torch.distributed.is_torchelastic_launched():
        return
    if code == 0:
        close_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (``fully_shard``, tensor parallel)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """``fully_shard`` each transformer block of every stack of ``model`` (and its embeddings and output
    head when they are not tied), then ``model`` itself.

    Needs an initialised process group (``mesh`` defaults to all ranks). The model is changed in
    place and returned; its parameters become DTensors sharded on dim 0.
    """
    from torch.distributed.fsdp import fully_shard

    from flexkd.adapters import get_adapter

    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
        raise ValueError(
            f"model: FSDP shards models whose parameters share one float dtype, got {sorted(map(str, dtypes))}"
        )
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            "shard_model needs torch.distributed initialised (start with torchrun --nproc_per_node N)"
        )
    units = [
        block for side in get_adapter(model).sides for block in get_adapter(model, side).blocks
    ]
    # Untied embeddings and output head get units of their own: otherwise they sit in the root unit,
    # gathered for the whole forward, and an early-exit tap never needs the head at all.
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and outputs is not None and outputs.weight is not inputs.weight:
        units += [inputs, outputs]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def end_early_forward(model: nn.Module) -> None:
    """After a forward that a tap stopped early (no backward follows): free every gathered parameter
    and reset the sharded model's per-iteration state, which its skipped post-forward hooks would do."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    from flexkd.adapters.registry import unwrap_model

    model = unwrap_model(model)
    if not isinstance(model, FSDPModule):
        return
    model.reset_iter_state()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def in_step(batches: Iterable, *, device: torch.device) -> Iterator[tuple[object, bool]]:
    """``(batch, counts)`` pairs in which every rank runs the same number of steps: once a rank's
    batches run out it repeats its last one with ``counts=False`` until every rank's have.

    For a sharded model, whose forward and backward are collectives; costs one tiny all-reduce per step.
    """
    import torch.distributed as dist

    rank, last = dist.get_rank(), None
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        more = torch.tensor([batch is not None], dtype=torch.float32, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif last is None:
            raise ValueError(
                f"batches: rank {rank} has none while other ranks do; a sharded teacher needs at "
                "least one batch on every rank"
            )
        else:
            yield last, False


# What each launcher sets when it is asked for several processes.
_LAUNCHER_SIZES = (
    ("WORLD_SIZE", "torchrun / accelerate launch"),
    ("LOCAL_WORLD_SIZE", "torchrun"),
    ("SLURM_NTASKS", "SLURM (srun)"),
    ("OMPI_COMM_WORLD_SIZE", "mpirun"),
)
SEVERAL_PROCESSES_HINT = (
    "start N processes with `torchrun --nproc_per_node N -m flexkd distill CONFIG` or "
    "`accelerate launch --multi_gpu --num_processes N -m flexkd distill CONFIG` (this form starts N "
    "processes on CPU-only machines too; `accelerate launch --cpu --num_processes N` starts one)"
)
_warned = False


def requested_processes() -> tuple[int, str] | None:
    """How many processes the launcher of this process asked for, and which launcher, when it is
    more than one; ``accelerate launch --cpu`` sets nothing, so its command line is read (Linux)."""
    for name, launcher in _LAUNCHER_SIZES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value), f"{launcher} ({name}={value})"
    if os.environ.get("ACCELERATE_USE_CPU") is not None:
        asked = _accelerate_num_processes(Path(f"/proc/{os.getppid()}/cmdline"))
        if asked is not None and asked > 1:
            return asked, f"accelerate launch --num_processes {asked}"
    return None


def _accelerate_num_processes(cmdline: Path) -> int | None:
    try:
        args = cmdline.read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        value = None
        if arg == "--num_processes" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--num_processes="):
            value = arg.partition("=")[2]
        if value is not None and value.isdigit():
            return int(value)
    return None


def warn_if_fewer_processes(world_size: int) -> None:
    """Warn (once per process) when a launcher asked for several processes but the run has fewer."""
    global _warned
    asked = requested_processes()
    if _warned or asked is None or asked[0] <= world_size:
        return
    _warned = True
    warnings.warn(
        f"flexkd: started by {asked[1]} asking for {asked[0]} processes, but this run has a world "
        f"size of {world_size}: each process runs alone. To {SEVERAL_PROCESSES_HINT}",
        RuntimeWarning,
        stacklevel=2,
    )


# accelerate's FSDP settings flexkd's own sharding does not take: (variable, what it asks for when set)
_ACCELERATE_FSDP_IGNORED = (
    ("FSDP_OFFLOAD_PARAMS", "--fsdp_offload_params"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "--fsdp_activation_checkpointing"),
    ("FSDP_AUTO_WRAP_POLICY", "--fsdp_auto_wrap_policy"),
    ("FSDP_TRANSFORMER_CLS_TO_WRAP", "--fsdp_transformer_layer_cls_to_wrap"),
    ("FSDP_IGNORED_MODULES", "--fsdp_ignored_modules"),
)


def take_accelerate_fsdp(cfg, environ=os.environ):
    """``cfg`` with the sharding ``accelerate launch --use_fsdp --fsdp_version 2`` asked for, and
    accelerate's own FSDP switched off in this process (``ACCELERATE_USE_FSDP`` removed from
    ``environ``); ``cfg`` unchanged without ``--use_fsdp``.

    flexkd shards with :func:`shard_model` (the ``distributed.fsdp`` section: every transformer block of
    the teacher and the student, then each model), so the launcher's request means
    ``distributed.fsdp: {teacher: true, student: true}`` with its ``--fsdp_reshard_after_forward``, on
    CPU and GPU alike; accelerate would otherwise wrap the whole distiller by its own policy on a GPU
    and do nothing on a CPU. Settings of the plugin that this sharding does not take are named in a
    warning; FSDP1 (``--fsdp_version 1``, accelerate's default) is refused."""
    from flexkd.errors import ConfigError

    if environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return cfg
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate launch --use_fsdp: flexkd shards with FSDP2 (torch.distributed.fsdp."
            f"fully_shard), this launch asks for FSDP version {version}; add --fsdp_version 2"
        )
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in ("true", "false"):
        raise ConfigError(
            f"accelerate launch --fsdp_reshard_after_forward: FSDP2 takes true or false, got {reshard!r}"
        )
    ignored = [
        flag
        for name, flag in _ACCELERATE_FSDP_IGNORED
        if environ.get(name, "false").lower() not in ("", "false", "none", "no_wrap")
    ]
    if ignored:
        warnings.warn(
            f"flexkd: accelerate launch --use_fsdp: flexkd shards every transformer block itself "
            f"(distributed.fsdp); not applied: {', '.join(ignored)}",
            RuntimeWarning,
            stacklevel=2,
        )
    del environ["ACCELERATE_USE_FSDP"]
    fsdp = cfg.distributed.fsdp.model_copy(
        update={"teacher": True, "student": True, "reshard_after_forward": reshard == "true"}
    )
    return cfg.model_copy(
        update={"distributed": cfg.distributed.model_copy(update={"fsdp": fsdp})}
    )


def check_sharding(cfg, world_size: int) -> None:
    """Fail before any model is built when ``cfg.distributed`` cannot work with ``world_size`` processes."""
    from flexkd.errors import ConfigError

    fsdp = cfg.distributed.fsdp
    for role in ("teacher", "student"):
        if not getattr(fsdp, role):
            continue
        field = f"distributed.fsdp.{role}"
        if not torch.distributed.is_available():
            raise ConfigError(f"{field}: this PyTorch build has no torch.distributed")
        if world_size < 2:
            raise ConfigError(
                f"{field}: sharding needs several processes, this run has {world_size}; "
                f"{SEVERAL_PROCESSES_HINT}"
            )
    if fsdp.replicas > 1:
        field = "distributed.fsdp.replicas"
        if not (fsdp.teacher or fsdp.student):
            raise ConfigError(f"{field}: {fsdp.replicas} replicas of what? shard the teacher or the student")
        if world_size % fsdp.replicas or world_size // fsdp.replicas < 2:
            raise ConfigError(
                f"{field}: {fsdp.replicas} replicas of {world_size} processes; each replica must be a "
                f"group of at least 2 processes that divides the world (world_size = replicas x group)"
            )


_meshes: dict = {}  # (device type, replicas, world size, process group) -> DeviceMesh


def sharding_mesh(cfg, device_type: str):
    """The device mesh ``distributed.fsdp`` shards over: None (every process) or, with ``replicas`` > 1,
    the 2-D ``(replicate, shard)`` mesh of HSDP; one per process and size."""
    replicas = cfg.distributed.fsdp.replicas
    if replicas == 1:
        return None
    world = torch.distributed.get_world_size()
    key = (device_type, replicas, world, torch.distributed.group.WORLD)  # a new group: a new mesh
    if key not in _meshes:
        from torch.distributed.device_mesh import init_device_mesh

        _meshes[key] = init_device_mesh(
            device_type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard")
        )
    return _meshes[key]


def shard_trainable(module: nn.Module, *, reshard_after_forward: bool = True, mesh=None) -> None:
    """``fully_shard`` ``module`` (each member of a ``ModuleList``, whose members are what is called)
    when it has trainable parameters: a projector next to a sharded student, so that its gradients are
    averaged over ranks like the student's. As DDP does, every rank starts from rank 0's values (each
    rank initialised its own)."""
    from torch.distributed.fsdp import fully_shard

    members = list(module) if isinstance(module, nn.ModuleList) else [module]
    for member in members:
        if any(p.requires_grad for p in member.parameters()):
            with torch.no_grad():
                for tensor in [*member.parameters(), *member.buffers()]:
                    torch.distributed.broadcast(tensor, src=0)
            fully_shard(member, mesh=mesh, reshard_after_forward=reshard_after_forward)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module):
    """Accumulate a sharded model's gradients locally (no reduce-scatter) inside the block."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def shard_from_config(cfg, model: nn.Module, role: str) -> nn.Module:
    """``model`` sharded when ``distributed.fsdp.<role>`` asks for it (``role``: teacher or student)."""
    fsdp = cfg.distributed.fsdp
    if getattr(fsdp, role):
        mesh = sharding_mesh(cfg, _device_type(model))
        shard_model(model, reshard_after_forward=fsdp.reshard_after_forward, mesh=mesh)
    return model


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type
