"""OpenAI's fine-tuning API on lorafleet (issue 17; design in docs/finetuning-api.md).

Step 1, files: ``/v1/files`` (upload, list, retrieve, content, delete) with per-tenant storage,
quotas and line-by-line validation in the formats training reads, plus ``lorafleet files``.
Step 2, jobs: ``/v1/fine_tuning/jobs`` (create, list, retrieve, cancel, events, checkpoints),
hyperparameters validated onto a ``FinetuneConfig``, plus ``lorafleet jobs``. The server mounts
the routes (:func:`lorafleet.ftapi.routes.mount`); the package keeps its code out of ``lorafleet.serve``.
"""
