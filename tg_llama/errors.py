"""The typed errors of tg-llama. The CLI prints them as one line; the API raises them."""

class TgLlamaError(Exception):
  """Base class: every error tg-llama raises on purpose."""

class CheckpointError(TgLlamaError, ValueError):
  """A weights file or directory that is missing, truncated, corrupt, or does not match its config."""

class UnsupportedModelError(TgLlamaError, ValueError):
  """An architecture, quantization or tokenizer type that tg-llama does not run (rather than run wrong)."""

class ContextLengthError(TgLlamaError, ValueError):
  """A prompt (plus what is asked to be generated) that does not fit in the model's context."""

class EngineBusyError(TgLlamaError):
  """The engine takes no more requests now: its queue is full, or it is shutting down."""

class InvalidArgumentError(TgLlamaError, ValueError):
  """An argument out of its range (a sampling knob, a token id, a context size the machine cannot hold), refused
  before any work is done."""
