"""``gptevo evolve``: the seed's story from GPT-2 to gpt-oss as a ladder of configs, measured.

- :mod:`gptevo.evolve.ladder`: the steps (ModelConfig diffs) at each scale; spec/evolution.md.
- :mod:`gptevo.evolve.metrics`: parameters, KV bytes, FLOPs and weight bytes per token per step.
- :mod:`gptevo.evolve.random_model`: a model with random weights built in memory for a step.
- :mod:`gptevo.evolve.measure`: decode/prefill tok/s and peak memory, one process per step.
- :mod:`gptevo.evolve.quality`: the shipped held-out losses (tools/evolve_train.py).
- :mod:`gptevo.evolve.claims`: the seed's claims beside our numbers.
- :mod:`gptevo.evolve.report`: the result (stable JSON schema) and the text table;
  :mod:`gptevo.evolve.html`: the self-contained HTML report (matplotlib, optional extra ``report``).
"""
from gptevo.evolve.ladder import SCALES, Scale, Step, ladder

__all__ = ["SCALES", "Scale", "Step", "ladder"]
