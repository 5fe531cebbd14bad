"""Trainers: VLPO (GRPO/PPO with latent Gaussian terms) and proposer-solver self-evolution."""
