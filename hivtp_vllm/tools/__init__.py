"""Tools around the plugin, apart from the serving core.

``explain`` (with its tower reader ``tower`` and its picture ``heatmap``),
``checkpoints`` (``make-model``: random-weight test checkpoints) and
``local_server`` (a vLLM server in a subprocess, for tests, benchmarks and
the load-test runner). vLLM's serving path imports none of them, so the
plugin on a GPU server needs nothing they need (``pip install
'hivtp-vllm[tools]'`` brings that).
"""
