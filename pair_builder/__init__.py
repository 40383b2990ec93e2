"""pair_builder: instructions -> verified, deduplicated preference pairs from the served base model, as a Ray job.

    ray job submit --address http://127.0.0.1:8265 -- python -m pair_builder --config CFG

Plain, separately tested stages - ``sources`` (instructions, dedupe), ``sample``, ``critique``, ``verify``,
``refscore`` (reference log-probs), ``build`` (one item end to end) - wrapped by thin Ray actors
(``actors``); the driver (``__main__``) is the only writer (``writer``, ``report``).
"""
