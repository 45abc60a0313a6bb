"""Measuring and adapting the model on labelled data: ``worker eval`` and ``worker finetune``.

| module | holds |
|---|---|
| ``datasets`` | labelled sets (folders, CSV, JSONL), stable splits, validation |
| ``embedder`` | images -> embeddings through the serving decode path, cached by sha256 |
| ``metrics`` | pure numpy metrics: PR curve, AP, ROC-AUC, thresholds for a target |
| ``evaluation`` | per-class scores and metrics of a compiled policy |
| ``eval_report`` | metrics.json, report.md and the plots of ``worker eval`` |
| ``thresholds`` | writing suggested thresholds back into policy YAML |
| ``finetune_data`` | class texts, zero-shot heads, the training set |
| ``trainer`` | ``Trainer``: the optimisation loop, WiSE-FT interpolation |
| ``finetune`` | one fine-tuning run end to end |
| ``finetune_report`` | report.json, report.md, training curve |

It may import the engine, model, images and the policy package; never the queue.
"""
