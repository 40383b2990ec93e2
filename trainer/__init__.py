"""Training side of a round: pair checks (``trainer.data``), DPO LoRA (``trainer.dpo``), the verified merge
into 16-bit weights (``trainer.merge``) and the memory planner (``trainer.plan``).

Each is a ``python -m trainer.<module> --config CFG`` entry point. Nothing heavy is imported here: the
generation side imports none of torch/TRL through this package, and Unsloth must be imported before them.
"""
