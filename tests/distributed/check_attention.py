"""sdpa vs dense core attention at TP=1 and TP=2: loss and every gradient, for a bidirectional
(masked diffusion) and a causal (AR) model, block diffusion's boolean 2L mask (one mask shared
by the batch), and per-sample [B, 1, S, S] document masks on the bidirectional and the causal
model (every sample its own document boundaries, as data.document_masks trains).

usage: torchrun --standalone --nproc_per_node=2 tests/distributed/check_attention.py OUT.json
Rank 0 writes {case: {"loss": {"dense_tp1": ..}, "max_grad_diff": {...}, "max_grad": ..}}; the
document-mask cases add "loss_unmasked" (sdpa, TP1, the same batch without the masks).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from check_tp import loss_and_grads  # noqa: E402
from common import COMMON_OVERRIDES, REPO  # noqa: E402


def document_ids(batch: int, length: int):
    """[batch, length] document numbers, each sample split at its own two random points."""
    import numpy as np

    rng = np.random.default_rng(0)
    seg = np.zeros((batch, length), dtype=np.int64)
    for row in seg:
        for cut in rng.choice(np.arange(4, length - 4), size=2, replace=False):
            row[cut:] += 1
    assert len({tuple(r) for r in seg}) == batch  # distinct masks per sample
    return seg


def main():
    out = sys.argv[1]
    from dlm_megatron.train import quiet_warnings

    quiet_warnings()
    import torch

    from dlm_megatron.config import load_config
    from dlm_megatron.data.tokenizer import load_tokenizer
    from dlm_megatron.parallel import dist as pdist

    tok = load_tokenizer("builtin")
    x = torch.randint(3, tok.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(4)
    docs = document_ids(4, 32)
    cases = {"masked": ("masked", None), "ar": ("ar", None), "block": ("block", None),
             "masked_document_masks": ("masked", docs), "ar_document_masks": ("ar", docs)}
    res, lay = {}, None
    for case, (objective, seg) in cases.items():
        runs = {}
        for tp in (2, 1):
            for backend in ("dense", "sdpa"):
                cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), list(COMMON_OVERRIDES) + [
                    f"diffusion.objective={objective}", "diffusion.block_size=8", f"parallel.tp={tp}",
                    f"model.attention_backend={backend}", f"data.document_masks={str(seg is not None).lower()}"])
                lay = pdist.init_distributed(cfg)
                runs[f"{backend}_tp{tp}"] = loss_and_grads(cfg, tok, x, pos, lay, segment_ids=seg)
        ref_loss, ref_g = runs["dense_tp1"]
        res[case] = {
            "loss": {k: l for k, (l, _) in runs.items()},
            "max_grad_diff": {k: max((g[n] - ref_g[n]).abs().max().item() for n in ref_g) for k, (_, g) in runs.items()},
            "max_grad": max(v.abs().max().item() for v in ref_g.values()),
        }
        if seg is not None:  # the same model and batch without the masks: they must matter
            res[case]["loss_unmasked"] = loss_and_grads(cfg, tok, x, pos, lay)[0]
    if lay.rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    pdist.destroy()


if __name__ == "__main__":
    main()
