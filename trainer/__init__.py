"""Training side of a round: pair checks (``trainer.data``), one recipe per ``train.method`` (DPO LoRA,
``trainer.dpo``; SFT LoRA on the chosen answers, ``trainer.sft``; their shared steps in ``trainer.recipe``), the
verified merge into 16-bit weights (``trainer.merge``) and the memory planner (``trainer.plan``).

Each is a ``python -m trainer.<module> --config CFG`` entry point. Nothing heavy is imported here: the
generation side imports none of torch/TRL through this package, and Unsloth must be imported before them.
"""
