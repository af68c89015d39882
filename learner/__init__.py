"""The learner: models, sampling, losses, reward model, DPO/KTO rounds, evaluation. Imports neither app nor storage."""
