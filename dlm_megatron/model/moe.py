"""Mixture-of-experts bookkeeping around megatron-core's MoE layers (no layers of our own).

megatron-core's router adds the load-balancing loss to the gradient through
``MoEAuxLossAutoScaler`` (the loss value itself never joins the returned loss) and records
``aux_loss / coeff`` per layer in its logging tracker. This module gives the trainer:

- ``set_aux_loss_scale``: the scale of that gradient. megatron-core's pipeline schedule sets
  it to 1 / num_microbatches; a loop that runs micro-batches itself (DeepSpeed, the tests'
  reference) must set the same, or the aux loss would weigh num_microbatches times too much.
- ``RouterLoad``: tokens routed to each expert per MoE layer during one optimizer step
  (forward hooks on the routers, summed on the device: no host sync until read).

This file holds no distributed code: the trainer reduces the returned tensors over ranks.
"""
from __future__ import annotations

import torch


def set_aux_loss_scale(scale: float, device) -> None:
    """Scale of the routers' aux-loss gradient for the micro-batches that follow."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(scale), device=device))


def routers(model: torch.nn.Module) -> list:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, TopKRouter)]


class RouterLoad:
    """Tokens per expert [num_moe_layers, num_experts] routed during training forwards since
    the last ``reset`` (evaluation forwards are not counted)."""

    def __init__(self, model: torch.nn.Module):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        # megatron-core's tracker is process-global and sized by the first model's layer count:
        # a new model in the same process (tests run several) starts from an empty one.
        get_moe_layer_wise_logging_tracker().clear()
        self.routers = routers(model)
        self.counts = None
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled()):
                return
            _, routing_map = output
            if self.counts is None:
                self.counts = torch.zeros(len(self.routers), routing_map.shape[-1], dtype=torch.float64,
                                          device=routing_map.device)
            self.counts[i] += routing_map.sum(dim=0).to(torch.float64)
        return hook

    def take(self) -> torch.Tensor | None:
        """The counts since the last call (then reset), or None without MoE layers."""
        counts, self.counts = self.counts, None
        return counts


def aux_loss_sums() -> torch.Tensor | None:
    """megatron-core's tracked load-balancing loss (aux_loss / coeff) summed over layers and
    micro-batches since the last call, then cleared; None when no aux loss ran."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    entry = tracker.get("load_balancing_loss")
    total = None if entry is None else entry["values"].detach().double().sum()
    clear_aux_losses_tracker()
    return total


def max_load(counts_LE: torch.Tensor) -> float:
    """Load of the heaviest expert relative to a perfectly even split, the worst layer's:
    max_e tokens[l, e] / mean_e tokens[l, e] (1 = balanced, num_experts = all on one expert)."""
    mean_L = counts_LE.mean(dim=1).clamp_min(1e-12)
    return float((counts_LE.max(dim=1).values / mean_L).max())
