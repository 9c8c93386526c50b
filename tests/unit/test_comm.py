"""All collectives go through dlm_megatron/parallel/comm.py, on the device their backend needs.

NCCL reduces CUDA tensors only; a CPU flag handed to it crashes the first GPU step. The CPU
suite cannot run NCCL, so it checks the two things that make that crash impossible: no module
but comm.py calls a collective (AST scan of the package), and comm's helpers pick CUDA for an
NCCL group and CPU for gloo (and refuse a tensor on the wrong device).
"""
import ast
from pathlib import Path

import pytest
import torch

PKG = Path(__file__).resolve().parents[2] / "dlm_megatron"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
    "send_object_list", "recv_object_list", "all_reduce_coalesced", "all_gather_coalesced", "_all_gather_base",
    "_reduce_scatter_base",
}
# the modules whose collectives count: torch.distributed and the module that defines them
DIST_MODULES = {"torch.distributed", "torch.distributed.distributed_c10d"}


def distributed_aliases(tree: ast.AST) -> set[str]:
    """Names bound to torch.distributed or its distributed_c10d module in a module
    (``import torch.distributed as dist``, ``from torch.distributed import distributed_c10d`` ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    names.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if f"{node.module}.{a.name}" in DIST_MODULES:
                    names.add(a.asname or a.name)
    return names


def collective_calls(source: str) -> list[str]:
    """Every use of a torch.distributed collective: called (``dist.all_reduce(x)``) or passed
    on (``dist.P2POp(dist.isend, ...)``), through any alias of torch.distributed or
    distributed_c10d, and ``from torch.distributed(.distributed_c10d) import all_reduce``."""
    tree = ast.parse(source)
    aliases = distributed_aliases(tree) | DIST_MODULES
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in DIST_MODULES:
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            text = ast.unparse(node.value)
            if text in aliases:
                found.append(f"{text}.{node.attr} (line {node.lineno})")
    return found


def test_scanner_finds_every_spelling():
    src = ("import torch.distributed as dist\nimport torch\nfrom torch import distributed as D\n"
           "from torch.distributed import broadcast\n"
           "dist.all_reduce(x)\ntorch.distributed.send(x, 1)\nD.all_gather_into_tensor(a, b)\n"
           "dist.barrier()\ndist.get_rank()\nx.all_reduce()\n")
    calls = collective_calls(src)
    assert len(calls) == 4, calls  # barrier / get_rank are group management; x.all_reduce is not torch's
    assert any("broadcast" in c for c in calls)


@pytest.mark.parametrize("src", [
    "import torch.distributed as dist\ndist.send_object_list([x], dst=1)\n",
    "import torch.distributed as dist\ndist.recv_object_list(objs, src=0)\n",
    "import torch.distributed as dist\nops = [dist.P2POp(dist.isend, t, 1)]\n",          # passed, not called
    "import torch.distributed as dist\nfn = dist.all_reduce\nfn(x)\n",
    "import torch.distributed.distributed_c10d as c10d\nc10d.all_reduce(x)\n",
    "from torch.distributed import distributed_c10d\ndistributed_c10d.broadcast(x, 0)\n",
    "import torch\ntorch.distributed.distributed_c10d.all_gather(out, x)\n",
    "from torch.distributed.distributed_c10d import reduce_scatter_tensor\n",
])
def test_scanner_finds_indirect_uses(src):
    assert len(collective_calls(src)) == 1, (src, collective_calls(src))


def test_no_collective_outside_comm_module():
    offenders = {}
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "parallel" / "comm.py":
            continue
        calls = collective_calls(path.read_text())
        if calls:
            offenders[str(path.relative_to(PKG.parent))] = calls
    assert not offenders, f"collectives must go through dlm_megatron/parallel/comm.py: {offenders}"


def test_backend_device_choice():
    from dlm_megatron.parallel import comm

    assert comm.device_for_backend("gloo") == torch.device("cpu")
    assert comm.device_for_backend("mpi") == torch.device("cpu")
    assert comm.device_for_backend("nccl").type == "cuda"
    assert comm.device_for_backend("NCCL").type == "cuda"


def test_helpers_on_a_gloo_group(monkeypatch):
    """A real single-process gloo group: host helpers reduce and return CPU values; the
    in-place helper refuses a tensor on the wrong device for the backend."""
    import torch.distributed as dist

    from dlm_megatron.parallel import comm

    created = not dist.is_initialized()  # other in-process tests may have left a gloo group
    if created:
        # without a process group every helper is the identity (single-process tools)
        assert comm.sum_host(3.0) == 3.0 and comm.max_host(1.0) == 1.0
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        assert comm.backend_device() == torch.device("cpu")
        assert comm.sum_host(2.5) == 2.5
        out = comm.all_reduce_host(torch.tensor([1.0, 4.0]), "max")
        assert out.device.type == "cpu" and out.tolist() == [1.0, 4.0]
        flag = comm.any_flag(torch.tensor(True))
        assert flag.item() == 1.0
        # pretend the group were NCCL: a CPU tensor must be refused, not handed over
        monkeypatch.setattr(comm, "backend_device", lambda group=None: torch.device("cuda", 0))
        with pytest.raises(RuntimeError, match="needs cuda"):
            comm.all_reduce_(torch.zeros(1))
    finally:
        if created:
            dist.destroy_process_group()
