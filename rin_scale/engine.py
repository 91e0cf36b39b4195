"""DeepSpeed set-up: process group, device, precision, the DeepSpeed config and the engine.

    rank, world, local_rank = init_distributed()
    prec = choose_precision(cfg.train.precision, device())
    engine, opt, sched = build_engine(model, cfg, world, load_universal=False)

The optimizers and the LR schedule it hands to DeepSpeed are in rin_scale.optim.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config, ConfigError, check_world


# --------------------------------------------------------------------------------------------
# Processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 0.0) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / deepspeed / submitit env vars; a bare process
    becomes a world of one. DeepSpeed picks gloo on the CPU and NCCL on GPUs. timeout_s: the deadline
    of every collective (train.collective_timeout_s); 0 = DeepSpeed's default (10 minutes, as long as
    the storage retry budget: an outage one rank waits out would tear the job down)."""
    from datetime import timedelta

    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" not in os.environ:  # a launcher that sets RANK only: the rank within its node
        gpus = torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID") or (
            str(int(os.environ["RANK"]) % gpus) if gpus else os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        # NCCL's flight recorder: the last collectives of each rank, kept in a ring buffer that the
        # hang watchdog dumps beside its stacks (RUN/hangs/*-nccl.pkl; read with torch's fr_trace).
        # Set before the process group exists, which is when NCCL reads it.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        # fp32 runs multiply on the tensor cores in TF32, the precision perf.GPU_PEAK_TFLOPS' fp32
        # peaks are for (torch's default is full fp32, 8-16x slower on A100/H100)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not dist.is_initialized():
        kw = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(verbose=False, **kw)
    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Precision


@dataclass
class Precision:
    name: str  # "bf16" | "fp32"
    reason: str

    @property
    def dtype(self):
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def autocast(self, dev: torch.device):
        """bf16 compute with fp32 master weights (torch AMP). Used under every ZeRO stage: DeepSpeed's
        own bf16 block keeps bf16 weights without ZeRO and rejects stage 0 + fp32 accumulation."""
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.name == "bf16")


def choose_precision(setting: str, dev: torch.device) -> Precision:
    """'auto': bf16 on GPUs with bf16, and on CPUs that multiply it natively (avx512_bf16 or
    amx_bf16); fp32 elsewhere. Decided by what does not change with the machine's load: a timing
    probe (bf16 vs fp32 matmul) picked fp32 for one run and bf16 for the next of the same command on
    a busy machine, and their losses differed from step 1."""
    if setting == "fp32":
        return Precision("fp32", "asked for (train.precision=fp32)")
    if dev.type == "cuda":
        if setting == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16: this GPU has no bf16; use train.precision=fp32")
        ok = torch.cuda.is_bf16_supported()
        return Precision("bf16" if ok else "fp32", "GPU" + ("" if ok else " without bf16 support"))
    if setting == "bf16":
        return Precision("bf16", "asked for (train.precision=bf16)")
    from .perf import native_cpu_bf16

    native = native_cpu_bf16()
    if native:
        return Precision("bf16", "this CPU multiplies bf16 natively (avx512_bf16 / amx_bf16)")
    if native is None:
        return Precision("fp32", "this CPU's bf16 support cannot be read from /proc/cpuinfo")
    return Precision("fp32", "this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)")


# --------------------------------------------------------------------------------------------
# DeepSpeed


def ds_config(cfg: Config, world_size: int, load_universal: bool = False,
              precision: Precision | None = None) -> dict:
    """The DeepSpeed config: global batch fixed, micro-batch and accumulation from the world size.
    load_universal: the state to resume is a universal checkpoint (saved at another world size).
    precision: the run's (choose_precision); None: fp32."""
    tc = cfg.train
    micro, accum = check_world(cfg, world_size)
    zero = {"stage": tc.zero_stage}
    if tc.zero_stage > 0:
        # overlap needs a side stream to reduce on: the CPU accelerator has none, and there the
        # overlapped run measured slower (bench/comm_buckets.py)
        zero.update(comm_buckets(tc.comm_bucket_mb, tc.zero_stage, tc.overlap_comm and torch.cuda.is_available()))
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    c = {
        "train_batch_size": tc.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our LAMB / AdamW (ZeRO-aware, see Lamb)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL", "load_universal": load_universal},
    }
    if tc.grad_clip > 0:
        c["gradient_clipping"] = tc.grad_clip
    if precision is not None and precision.name == "bf16":
        # The trainer's bf16 is torch.autocast around engine(...). DeepSpeed's forward turns an
        # autocast it finds off inside the model unless this section enables it, and it looks with
        # torch.is_autocast_enabled(), which sees CUDA's autocast only: CPU runs kept bf16, every
        # GPU run would have run in fp32. No lower-precision modules: the gradients are reduced
        # in fp32 as before (DeepSpeed's default would reduce those of Linear and Conv in bf16).
        # train.reduce_bf16 names the modules whose gradients are reduced in bf16 (DeepSpeed's
        # comm_dtype per parameter): half the traffic, at the error docs/benchmarks.md states.
        safe = ["torch.nn.Linear", "torch.nn.Conv2d", "torch.nn.Conv3d"] if tc.reduce_bf16 else []
        c["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": safe}
    return c


def comm_buckets(bucket_mb: float, stage: int, overlap: bool) -> dict:
    """ZeRO's gradient communication: buckets of `bucket_mb` MB of fp32 gradients, reduced while
    the backward pass goes on (overlap_comm) out of one contiguous buffer (contiguous_gradients,
    which also keeps the gradients from fragmenting memory). DeepSpeed's defaults (no overlap, 500M
    elements: 2 GB buckets) reduce the whole gradient of a model our size after the backward."""
    elements = int(bucket_mb * 2**20 / 4)
    c = {"overlap_comm": overlap, "contiguous_gradients": True, "reduce_scatter": True,
         "reduce_bucket_size": elements}
    if stage == 3:
        c["stage3_prefetch_bucket_size"] = elements
    else:
        c.update(allgather_partitions=True, allgather_bucket_size=elements)
    return c


# Interface tokens per checkpointed chunk of a write (per example): at 1024x1024 (16,384 tokens)
# the write and its MLP then hold a quarter of their activations at a time.
CHECKPOINT_CHUNK_TOKENS = 4096


def configure_checkpointing(model, cfg: Config, whole_blocks: bool = False) -> None:
    """Route every k-th RIN block through DeepSpeed's activation checkpointing (or none).

    A block is checkpointed stage by stage (Block.forward_segments): its read, its latent layers,
    and its write in chunks of CHECKPOINT_CHUNK_TOKENS interface tokens, each recomputed once in
    the backward pass. That is the recomputation of checkpointing the whole block (whole_blocks),
    but the backward pass holds one stage's (one chunk's) activations at a time instead of the
    whole block's: on the imagenet1024 preset (16,384 tokens) the activations fall to 0.12 of no
    checkpointing for 1.09x the step time, against 0.27 for whole blocks (bench/train_memory.py)."""
    k = cfg.train.activation_checkpointing
    if not k:
        model.checkpoint_fn = None
        return
    import deepspeed

    deepspeed.checkpointing.configure(None, partition_activations=False, contiguous_checkpointing=False,
                                      checkpoint_in_cpu=cfg.train.checkpoint_cpu_offload, synchronize=False,
                                      profile=False)
    checkpoint = _keep_autocast(deepspeed.checkpointing.checkpoint)
    model.checkpoint_fn = checkpoint if whole_blocks else by_stage(checkpoint)
    model.checkpoint_every = k


def by_stage(checkpoint, chunk_tokens: int = CHECKPOINT_CHUNK_TOKENS):
    """checkpoint_fn(block, x, z) that checkpoints the block's stages apart. A no-grad pass (the
    self-conditioning pass, sampling) checkpoints nothing but still writes in chunks, which bounds
    its largest intermediate (the interface MLP's hidden layer) the same way."""
    def run(block, x, z):
        return block.forward_segments(x, z, checkpoint if torch.is_grad_enabled() else None, chunk_tokens)

    return run


def _keep_autocast(checkpoint):
    """DeepSpeed's checkpoint recomputes the forward inside backward(), outside the caller's
    autocast context: a bf16 forward would be recomputed in fp32 (twice the cost, and gradients of
    other activations than the loss saw). The recompute re-enters the autocast state of the forward."""
    def run(fn, *args):
        dev = args[0].device.type
        enabled, dtype = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)

        def fn_in_autocast(*a):
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                return fn(*a)

        return checkpoint(fn_in_autocast, *args)

    return run


def build_engine(model, cfg: Config, world_size: int, load_universal: bool = False,
                 precision: Precision | None = None, groups: str = "by_setting"):
    """(engine, base optimizer, LR scheduler). The model must already be on its device; `precision`
    is the one its forwards run in (ds_config); `groups` the optimizer's param groups
    (optim.make_optimizer)."""
    import deepspeed

    from .optim import Lamb, make_optimizer, make_scheduler

    configure_checkpointing(model, cfg)
    opt = make_optimizer(model, cfg, groups)
    sched = make_scheduler(opt, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(cfg, world_size, load_universal, precision))
    if isinstance(opt, Lamb) and opt.partitioned:
        opt.pieces = zero_pieces(engine.optimizer)
    if world_size == 1 and cfg.train.zero_stage == 0:
        # Nothing to reduce over one rank, yet DeepSpeed would flatten every gradient into one buffer,
        # all-reduce it and copy it back at each step (~3% of a cifar10 bf16 step on the CPU). It
        # turns the same switch off itself where there is no process group.
        engine.enable_backward_allreduce = False
    return engine, opt, sched


def zero_pieces(zopt):
    """For LAMB under ZeRO: a function from one of the ZeRO optimizer's flat fp32 partitions to
    [(start, length)], where each tensor of its group lies in it on this rank (length 0: on other
    ranks only), in the group's order, which is the same on every rank. Read from DeepSpeed's own
    bookkeeping: ZeRO 1-2 link each weight to its fragment of the partition (_hp_mapping, the
    mapping behind deepspeed.utils.safe_get_full_fp32_param); ZeRO-3 records each weight's place in
    its sub-group's partition (grad_position), its rank-r slice being [r * size, (r + 1) * size) of
    the weight, padded past its end."""
    table = {}
    if hasattr(zopt, "single_partition_of_fp32_groups"):  # ZeRO 1 and 2
        for params, flat in zip(zopt.bit16_groups, zopt.single_partition_of_fp32_groups):
            rows = []
            for p in params:
                frag = getattr(getattr(p, "_hp_mapping", None), "hp_fragment", None)
                rows.append((frag.storage_offset() - flat.storage_offset(), frag.numel()) if frag is not None
                            else (0, 0))
            table[id(flat)] = (flat, rows)
    else:  # ZeRO-3
        rank = dist.get_rank(group=zopt.dp_process_group)
        for i, (params, flat) in enumerate(zip(zopt.fp16_groups, zopt.fp32_partitioned_groups_flat)):
            rows = []
            for p in params:
                sub, start, size = zopt.grad_position[zopt.get_param_id(p)]
                assert sub == i, (sub, i)
                rows.append((start, max(0, min(size, p.ds_numel - rank * size))))
            table[id(flat)] = (flat, rows)

    def pieces(flat):
        found = table.get(id(flat))
        if found is None or found[0] is not flat:
            raise RuntimeError("LAMB was handed a ZeRO partition it has no layout for (DeepSpeed replaced "
                               "its flat fp32 partitions after the engine was built)")
        return found[1]
    return pieces
