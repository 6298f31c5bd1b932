"""A worker class the plugin does not know (``--worker-cls``), for the
start-up check in tests/test_server_llava.py: it runs vLLM's own CPU worker,
as a platform plugin's worker might, under a name the plugin has not checked."""

from vllm.v1.worker.cpu_worker import CPUWorker


class UnknownWorker(CPUWorker):
    pass
