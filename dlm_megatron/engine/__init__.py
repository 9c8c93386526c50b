"""Training engines (DeepSpeed ZeRO, megatron-core DDP + distributed optimizer) behind one small interface."""


class TrainingDiverged(RuntimeError):
    """Training cannot go on (non-finite losses/gradients); the message is one line for the user."""


ZERO_STATE_FORMAT = "zero-fragments-v1"
"""meta.json ``optimizer`` of checkpoints whose optimizer state (either engine) is in the
project's own per-parameter format (engine/zero_state.py, engine/megatron_state.py), loadable
at any DP size (and, for MoE on the megatron engine, any EP size)."""
