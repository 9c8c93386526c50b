"""Training engines (DeepSpeed ZeRO, megatron-core DDP + distributed optimizer) behind one small interface."""


class TrainingDiverged(RuntimeError):
    """Training cannot go on (non-finite losses/gradients); the message is one line for the user."""
