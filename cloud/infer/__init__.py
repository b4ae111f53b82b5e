"""Serving the fine-tuned models (`offsite cloud infer`): one copy of each base model, every finished job's
adapter beside it, continuous batching across jobs, and an OpenAI-compatible HTTP API.

- routing: the base's blocks, each able to run a batch's rows through different jobs' versions of it.
- adapters: what a job adds to its base (its own adapter blocks, virtual tokens, a prefix), loaded on first
  use and evicted least-recently-used under a memory budget.
- engine: the decode loop: requests join and leave between steps, one KV cache row each.
- api: the HTTP API (FastAPI), its keys and its errors.
"""
