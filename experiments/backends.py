"""Loading a framework backend by name, lazily, so that each entry point imports only one."""

from __future__ import annotations

BACKENDS = ("jax", "torch")


class BackendUnavailable(RuntimeError):
    pass


def backend_class(name: str):
    """The backend class for `name` (`JaxBackend`), with a clear error for one not built yet."""
    if name == "jax":
        from tnt_jax.train import JaxBackend

        return JaxBackend
    if name == "torch":
        try:
            from tnt_torch.train import TorchBackend
        except ImportError as e:
            raise BackendUnavailable(
                "the torch backend is not built yet (tnt_torch has no train module); "
                "use --backend jax") from e
        return TorchBackend
    raise BackendUnavailable(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")

