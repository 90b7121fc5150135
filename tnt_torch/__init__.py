"""TnT in PyTorch: the same model, parameter for parameter, as tnt_jax (in progress)."""
