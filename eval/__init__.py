"""Evaluation: verifiable-instruction (IFEval) scoring, base-model checks and reports.

The checker registry lives here; pair_builder imports it so eval and pair verification share one code path.
"""
