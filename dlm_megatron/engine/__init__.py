"""Training engines (DeepSpeed ZeRO, megatron-core DDP + distributed optimizer) behind one small interface."""


class TrainingDiverged(RuntimeError):
    """Training cannot go on (non-finite losses/gradients); the message is one line for the user."""


ZERO_STATE_FORMAT = "zero-fragments-v1"
"""meta.json ``optimizer`` of checkpoints whose DeepSpeed optimizer state is in the
project's own per-parameter format (engine/zero_state.py), loadable at any DP size."""
