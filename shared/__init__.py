"""Code shared by every stage: config, record schemas, OpenAI client, atomic io, run dirs, logging, cost ledger.

Only light dependencies here (pydantic, pyyaml, openai, httpx): the generation side and the training side
both import it, and neither may pull the other's heavy libraries through it.
"""
