"""The round loop: serve -> base check -> eval -> pairs -> DPO -> merge -> next round. Orchestration only."""
