"""Low-rank KV-head compression: merge groups of KV heads into one (MHA -> GQA, GQA -> fewer).

Example:
    >>> import torchkvq.heads
    >>> model = torchkvq.heads.compress(model, texts, kv_heads=1, tokenizer=tok)  # doctest: +SKIP
    >>> model.save_pretrained("smollm2-1kv")  # an ordinary transformers model  # doctest: +SKIP

See :func:`compress` and docs/heads.md.
"""

from .calibrate import attention_modules, calibration_token_ids, collect_input_moments
from .compress import CompressReport, compress
from .merge import LayerPlan, LayerReport, apply_plan, emulate_plan, key_merge, plan_layer, value_merge
from .finetune import recover
from .refine import output_error, refine_attention

__all__ = [
    "compress",
    "recover",
    "refine_attention",
    "output_error",
    "plan_layer",
    "apply_plan",
    "emulate_plan",
    "LayerPlan",
    "key_merge",
    "value_merge",
    "collect_input_moments",
    "calibration_token_ids",
    "attention_modules",
    "CompressReport",
    "LayerReport",
]
