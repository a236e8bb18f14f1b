"""Training: the shared optimisation pieces (common.py), the RL losses (losses.py) and the RL loop (rl.py).

    budgetthink rl --config recipes/tiny-countdown-grpo.yaml --out runs/rl [key=value ...] [--resume]
"""
