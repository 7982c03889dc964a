"""Tools around the built-in model that serve evaluations, not users: its trainer and
model-card writer (``train``), video metrics and prompt checks (``metrics``), one-call
denoising of noised generator videos (``denoising``), attention recording, locality and
density (``probe``), and pieces of the results pages (``report``).

The product keeps what generation and training data need (``sparsegen.toy``: pipeline,
codec, prompt encoder, procedural data). Scripts in ``evals/`` import this package as
``toylab`` (their folder is on ``sys.path`` when they run); the tests add ``evals/`` to
``sys.path`` once, in ``tests/conftest.py``.
"""
