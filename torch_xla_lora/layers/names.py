"""Module names of the common transformers architectures, by the layer kind they become.

Used to choose a LoRA layer for a module (``patching``) and how it is sharded
on a mesh (``sharding``): q/k/v/gate/up are column-parallel, o/down
row-parallel; fused projections (QKV, gate_up) are column-parallel too, their
equal output slices covered by the one fused op of the column kind.
"""

QKV_NAMES = frozenset({"c_attn", "qkv_proj", "query_key_value", "Wqkv"})
MERGED_NAMES = frozenset({"gate_up_proj"})
ROW_NAMES = frozenset({"o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2", "wo"})
COLUMN_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_fc", "fc1", "dense_h_to_4h", "wi"})
