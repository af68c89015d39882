"""Errors the learner raises; the app turns them into HTTP 4xx / gr.Error at its boundary."""


class LearnerError(Exception):
    """Something the learner cannot do as asked."""


class ModelError(LearnerError):
    """A model that cannot be found, converted or loaded."""


class ConfigError(LearnerError):
    """A config value or key that is not valid."""


class TokenizationError(LearnerError):
    """A prompt/answer pair whose tokens do not line up (the prompt is not a prefix of prompt + answer)."""
