"""Re-export of :mod:`vtoolkit.models.flops` (the analytic FLOPs accounting moved below the methods and the
benchmark, which both use it); kept so that ``vtoolkit.bench.flops`` imports keep working."""
from vtoolkit.models.flops import (  # noqa: F401
    Shape,
    decode_flops,
    llm_layer_flops,
    prefill_flops,
    prefill_ratio,
    projector_flops,
    vision_flops,
)
