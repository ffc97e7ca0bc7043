"""HF causal LMs as ferrytune sees them: built on the meta device, cut into units and blocks.

* ``load_layout(path)`` (``_layout.py``): the model on meta, its decoder layers and outer modules
  as ``Unit``s, their parameters (``ParamSpec``) packed into ``BlockSpec``s; ``bind`` puts a
  tensor behind a parameter of the meta model; a MoE layer's block puts its dense part first and each
  fused expert tensor after it, 4 KiB-aligned (``ExpertLayout``: expert ``e``'s ranges, read alone);
* ``SafetensorsReader`` / ``SafetensorsWriter`` (``_safetensors.py``): one tensor at a time;
* ``open_checkpoint`` / ``CheckpointLoader`` and ``checkpoint_tensors`` (``_names.py``): checkpoint
  names as transformers maps them (renames, legacy names, fused experts), read and written per block;
* ``logits_at`` (``_head.py``): logits of gathered hidden states through the model's own head code
  (Gemma 2's soft-capping, Cohere's and Granite's logit scales);
* ``load_resident_model`` (``_resident.py``): a plain resident HF model with aligned storage,
  the reference the engine is compared with.
"""

from ferrytune.models._layout import (EXPERT_ALIGN_ELEMS, OUTER, BlockSpec, ExpertLayout, ModelLayout, ParamSpec, Unit, bind, build_layout,
                                      build_skeleton, load_layout)
from ferrytune.models._head import logits_at
from ferrytune.models._names import CheckpointLoader, checkpoint_tensors, open_checkpoint
from ferrytune.models._resident import ALIGN_BYTES, load_resident_model, own_aligned_storage_
from ferrytune.models._safetensors import SafetensorsReader, SafetensorsWriter, iter_shard_files

__all__ = ["ALIGN_BYTES", "EXPERT_ALIGN_ELEMS", "OUTER", "BlockSpec", "ExpertLayout", "CheckpointLoader", "checkpoint_tensors", "open_checkpoint", "ModelLayout", "ParamSpec", "SafetensorsReader", "SafetensorsWriter",
           "Unit", "bind", "build_layout", "build_skeleton", "iter_shard_files", "load_layout", "load_resident_model", "logits_at",
           "own_aligned_storage_"]
