"""Training layer: everything torch- and transformers-side of one curtail run, and no Ray.

One module per concept:

- ``model``      — Llama model presets (``tiny``, ``small``, ``d20``) and ``build_model``.
- ``tokenizer``  — byte-level BPE trained on a corpus, cached, saved as a HF fast tokenizer.
- ``data``       — a corpus tokenized once into a flat token array; train / held-out parts.
- ``shards``     — a tokenized corpus as token shard files with a manifest, read lazily.
- ``prepare``    — ``curtail prepare-data``: text / JSONL / Parquet streamed into token shards.
- ``ledger``     — which token ranges each site was handed and actually trained, per epoch.
- ``intervals``  — sorted disjoint ``[start, end)`` token intervals (the ledger's pool, the journal).
- ``schedule``   — the one global learning-rate schedule, indexed by tokens trained.
- ``averaging``  — the DiLoCo outer step: pseudo-gradients, token weighting, outer optimizers.
- ``loop``       — ``SiteTrainer``: a site's model, inner AdamW and training/eval steps.
- ``power``      — ``PowerSampler``: a GPU's measured watts (NVML), for measured-power accounting.

Importing this package imports nothing heavy; import the submodules you need.
``ledger``, ``intervals``, ``schedule`` and ``shards`` are pure Python (no torch) so anything may use them.
"""
