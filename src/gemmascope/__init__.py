"""gemmascope: sparse autoencoders on every layer and site of a language model."""

from gemmascope.sae import SAE, SAEConfig

__version__ = "0.1.0"

__all__ = ["SAE", "SAEConfig", "__version__", "list_sae_ids", "load", "save"]


def __getattr__(name: str):
    # Lazy so that `import gemmascope` stays cheap; io pulls in safetensors and huggingface_hub.
    if name in ("load", "save", "list_sae_ids"):
        from gemmascope import io

        return getattr(io, name)
    raise AttributeError(f"module 'gemmascope' has no attribute {name!r}")
