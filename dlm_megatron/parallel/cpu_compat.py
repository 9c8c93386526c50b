"""Let megatron-core and DeepSpeed run on CPU (gloo) for development and CI.

Applied only when CUDA is absent: on a GPU machine nothing here runs. Each shim replaces a
hard CUDA assumption with its CPU equivalent; none changes numerics (DESIGN.md §5 lists the
measured equivalences: TP=2 equals TP=1 to ~2e-7 with these shims).
"""
from __future__ import annotations

import contextlib
import os

import torch

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply() -> None:
    """Install the CPU shims (idempotent; a no-op when CUDA is available)."""
    global _APPLIED
    _moe_without_transformer_engine()  # CPU or GPU: wherever TE is missing
    if _APPLIED or cuda_available():
        return
    _APPLIED = True
    # DeepSpeed picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    # megatron-core places buffers with device=torch.cuda.current_device(); "cpu" is a valid
    # device argument everywhere it is used (torch.empty, .to, rotary tables).
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # p2p and timers synchronise the GPU stream; CPU ops are synchronous already.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    # The TP RNG tracker saves/restores torch.cuda RNG state around dropout; with no CUDA
    # there is no such state. Training here uses no dropout, so the no-op tracker (the one
    # megatron uses for inference) is exact.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    mrandom.model_parallel_cuda_manual_seed = lambda *a, **k: None  # type: ignore[assignment]
    # Activation recomputation saves/restores the CUDA RNG state around the recomputed
    # forward; on CPU there is none (and no dropout), so these become no-ops.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None

    # DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (minutes) that only serves
    # inference all-reduce; training collectives go through gloo. Skip the build.
    try:
        import importlib

        # (``import deepspeed.comm.torch as m`` would bind the torch package itself:
        # deepspeed.comm has an attribute named torch.)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        ds_torch_comm.build_shm_op = lambda: None
    except Exception:  # pragma: no cover - deepspeed absent or changed layout
        pass

    # The default causal mask (used when no mask is passed) is allocated on "cuda".
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    def _causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tutils.get_default_causal_mask = _causal_mask
    fused_softmax.get_default_causal_mask = _causal_mask

    _patch_literal_cuda_tensors()
    _expert_bias_count_uncompiled()
    _autocast_aware_linear_on_cpu()
    _tied_embedding_sync_on_cpu()


def _moe_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router gating (moe_utils.RouterGatingLinearFunction) tests
    ``te_general_gemm is not None``, but the name is only bound when Transformer Engine imports:
    without TE every MoE forward raises NameError. Bind it to None so the torch.mm path runs
    (the same matmuls; TE's GEMM is only faster)."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception:  # pragma: no cover
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _expert_bias_count_uncompiled() -> None:
    """megatron-core decorates the router's token count for the aux-free expert bias
    (TopKRouter._apply_expert_bias, one in-place add) with torch.compile: on CPU that is a C++
    build in every process (tens of seconds on 2 cores) for a fusion of one op. Run the
    undecorated function, which does the same add."""
    from megatron.core.transformer.moe.router import TopKRouter

    orig = getattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable", None)
    if orig is not None:
        TopKRouter._apply_expert_bias = orig


def _tied_embedding_sync_on_cpu() -> None:
    """With tied embeddings and pp > 1, megatron-core copies the first stage's embedding to
    the last stage's output head at construction: ``weight.data.cuda()`` then an all-reduce
    over the embedding group. On CPU the weight stays where it is (gloo reduces CPU tensors)."""
    from megatron.core.models.common.language_module import language_module as lm

    orig = lm.LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t  # type: ignore[assignment]
        try:
            return orig(self)
        finally:
            torch.Tensor.cuda = cuda  # type: ignore[assignment]

    lm.LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _autocast_aware_linear_on_cpu() -> None:
    """megatron-core's linear autograd functions are decorated with custom_fwd/custom_bwd for
    device "cuda": backward re-enters the forward's *CUDA* autocast state. Under CPU autocast
    (DeepSpeed torch_autocast, bf16 at ZeRO-0) that leaves backward without autocast and a
    bf16 gradient meets an fp32 weight. Re-decorate the same functions for "cpu", which is
    what they do on a GPU for "cuda"."""
    from megatron.core.tensor_parallel import layers

    for cls in (layers.LinearWithFrozenWeight, layers.LinearWithGradAccumulationAndAsyncCommunication):
        fwd, bwd = cls.forward, cls.backward
        if hasattr(fwd, "__wrapped__") and hasattr(bwd, "__wrapped__"):
            cls.forward = staticmethod(torch.amp.custom_fwd(fwd.__wrapped__, device_type="cpu"))
            cls.backward = staticmethod(torch.amp.custom_bwd(bwd.__wrapped__, device_type="cpu"))


def _patch_literal_cuda_tensors() -> None:
    """Modules that allocate with a literal device="cuda" get a torch proxy that maps it to CPU."""
    import types

    class _TorchCPUProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    def _cpuify(fn):
        def wrapper(*args, **kwargs):
            if kwargs.get("device") in ("cuda", torch.device("cuda")):
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)

        return wrapper

    proxy = _TorchCPUProxy("torch")
    for name in ("zeros", "ones", "empty", "tensor", "full"):
        setattr(proxy, name, _cpuify(getattr(torch, name)))
    import importlib

    for modname in (
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.core.utils",
        # MoE: the aux-loss tracker's initialisation (track_moe_metrics) allocates on "cuda".
        # (The all-to-all token dispatcher creates a torch.cuda.Stream; on CPU the model uses
        # the allgather dispatcher instead, see model/denoiser.moe_settings.)
        "megatron.core.transformer.moe.moe_utils",
    ):
        try:
            mod = importlib.import_module(modname)
        except Exception:  # pragma: no cover
            continue
        mod.torch = proxy


@contextlib.contextmanager
def cuda_type_names():
    """While active, CPU parameters report CUDA tensor type names.

    megatron-core's (distributed) optimizer sorts parameters by ``param.type()`` and only
    accepts 'torch.cuda.FloatTensor'-style names. Scoped to optimizer construction: a
    global patch would mislead other libraries (DeepSpeed) that convert with .type(name).
    """
    if cuda_available():
        yield
        return
    orig = torch.Tensor.type

    def fake_type(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and self.device.type == "cpu":
            return orig(self).replace("torch.", "torch.cuda.", 1)
        return orig(self, dtype, non_blocking, **kw)

    torch.Tensor.type = fake_type
    try:
        yield
    finally:
        torch.Tensor.type = orig
