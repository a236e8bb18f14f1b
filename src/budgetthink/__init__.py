"""budgetthink: reasoning models for tens of dollars — s1 distillation + budget forcing, R1-Zero-style RL,
test-time scaling evaluation, an OpenAI-compatible server with thinking budgets, and an honest cost ledger."""

__version__ = "0.1.0"
