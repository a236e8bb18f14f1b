"""Hand-offs to other training stacks: `verl` writes veRL's RL dataset, a reward module and launch scripts."""
