"""One reader per on-disk format. Each returns the raw metadata and lazy tinygrad tensors under the
format's own names; tg_llama/convert.py is the only place that knows how to map them to the model."""

