"""HF models on the meta device cut into units and blocks; safetensors read and written one tensor at a time."""

from ferrytune.models._resident import ALIGN_BYTES, load_resident_model, own_aligned_storage_

__all__ = ["ALIGN_BYTES", "load_resident_model", "own_aligned_storage_"]
