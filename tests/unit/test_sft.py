"""SFT data and objective: prompt never noised, zero weight on the prompt, LLaDA normalisation."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlm_megatron.data import DataError
from dlm_megatron.data.sft import SFTDataset, encode_example, render_messages
from dlm_megatron.diffusion.objectives import SFTMaskedDiffusion

EOT, MASK = 0, 1


def test_encode_example_pads_response_with_eot_and_cuts():
    a = encode_example([5, 6, 7], [8, 9], 8, EOT)
    assert a.tolist() == [5, 6, 7, 8, 9, EOT, EOT, EOT, 3]
    b = encode_example(list(range(10, 20)), [8, 9], 6, EOT)  # prompt cut from the left, >= 1 response token
    assert b[-1] == 5 and b[:5].tolist() == list(range(15, 20)) and b[5] == 8


def test_render_messages():
    p, r = render_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "<{role}>{content}|")
    assert p == "<user>hi|<assistant>" and r == "yo"


def test_dataset_formats_and_errors(tmp_path):
    tok = SimpleNamespace(eot_id=EOT, encode_batch=lambda xs: [[2 + (ord(c) % 50) for c in x] for x in xs])
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"prompt": "ab", "response": "cd"}) + "\n" +
                 json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}) + "\n")
    ds = SFTDataset(f, tok, 12)
    assert len(ds) == 2 and ds[0].shape == (13,) and ds.sample_width == 13 and ds[0][-1] == 2
    f.write_text("{\"foo\": 1}\n")
    with pytest.raises(DataError):
        SFTDataset(f, tok, 12)


def test_prompt_never_masked_and_weights():
    obj = SFTMaskedDiffusion(SimpleNamespace(eps=1e-3, antithetic=False, random_length_prob=0.5), MASK, seed=0)
    L = 16
    rows = [encode_example(list(range(2, 2 + p)), list(range(40, 40 + r)), L, EOT) for p, r in ((3, 5), (10, 2), (1, 14), (7, 4))]
    x = torch.from_numpy(np.stack(rows))
    for step in range(20):
        b = obj.make_batch(x, torch.arange(4) + 4 * step, step=step, global_batch_size=4)
        P = x[:, -1]
        prompt = torch.arange(L)[None, :] < P[:, None]
        assert b.tokens_BS.shape == (4, L)
        assert torch.equal(b.tokens_BS[prompt], x[:, :-1][prompt])          # prompt never masked
        assert (b.loss_weight_BS[prompt] == 0).all()                          # no loss on the prompt
        masked = b.tokens_BS == MASK
        assert (b.loss_weight_BS[~masked] == 0).all()
        # sum_i w_i nll_i / (B L) == mean_b [ sum_{masked i} nll_i / (t_b |response_b|) ]  (LLaDA SFT)
        nll = torch.rand(4, L, generator=torch.Generator().manual_seed(step))
        ours = (b.loss_weight_BS * nll).sum() / (4 * L)
        resp = (L - P).float()
        ref = torch.stack([(nll[i][masked[i]] / b.t_B[i]).sum() / resp[i] for i in range(4)]).mean()
        assert torch.allclose(ours, ref, rtol=1e-5)
