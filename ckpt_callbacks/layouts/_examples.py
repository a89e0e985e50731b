"""Built-in trees for ``plan_layout`` and ``ckpt-callbacks plan-layout --example``.

>>> len(llama70b(8)), len(llama70b(8, adam=True))
(723, 2170)
"""

from __future__ import annotations

from collections.abc import Sequence

from ckpt_callbacks.layouts._plan import LeafShape, Spec


def fsdp_spec(shape: Sequence[int], devices: int, axis: str = "fsdp") -> Spec:
    """FSDP: the first dim the device count divides is sharded over ``axis``; else replicated."""
    for dim, n in enumerate(shape):
        if n % devices == 0:
            return (None,) * dim + (axis,)
    return ()


def llama70b(devices: int, *, adam: bool = False) -> list[LeafShape]:
    """Llama-3-70B's 723 bf16 parameter leaves, FSDP over ``devices``; with ``adam``, also
    optax Adam's fp32 ``mu`` and ``nu`` and its step count (2,169 array leaves)."""
    hidden, ffn, kv, vocab = 8192, 28672, 1024, 128256
    layer: dict[str, tuple[int, ...]] = {
        "self_attn/q_proj": (hidden, hidden),
        "self_attn/k_proj": (hidden, kv),
        "self_attn/v_proj": (hidden, kv),
        "self_attn/o_proj": (hidden, hidden),
        "mlp/gate_proj": (hidden, ffn),
        "mlp/up_proj": (hidden, ffn),
        "mlp/down_proj": (ffn, hidden),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
    }
    shapes: dict[str, tuple[int, ...]] = {"model/embed_tokens": (vocab, hidden)}
    shapes |= {f"model/layers/{i}/{name}": shape for i in range(80) for name, shape in layer.items()}
    shapes |= {"model/norm": (hidden,), "lm_head": (hidden, vocab)}

    def leaves(prefix: str, dtype: str) -> list[LeafShape]:
        return [LeafShape(path=prefix + p, shape=s, dtype=dtype, spec=fsdp_spec(s, devices)) for p, s in shapes.items()]

    out = leaves("params/", "bfloat16")
    if adam:
        out += [*leaves("opt/mu/", "float32"), *leaves("opt/nu/", "float32")]
        out.append(LeafShape(path="opt/count", shape=(), dtype="int32"))
    return out


EXAMPLES = {"llama70b": llama70b}
