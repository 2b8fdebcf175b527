"""Fault injection for tests/test_vllm_lifecycle.py (not a mock: the real engine runs, only slower).

Put on PYTHONPATH of a vLLM server: every onboard job sleeps KVBM_FAULT_ONBOARD_DELAY_S seconds (default 0.4)
before moving its bytes, so clients that disconnect within a second often do so while their prefix is still
being onboarded: the case that killed vLLM's EngineCore before the request lifecycle was fixed.
"""

import os
import time

try:
    import kvbm.mechanism.transfer as _transfer

    _run = _transfer.TransferEngine.run_onboard
    _delay = float(os.environ.get("KVBM_FAULT_ONBOARD_DELAY_S", "0.4"))

    def _slow_onboard(self, job, ready=None):
        time.sleep(_delay)
        return _run(self, job, ready)

    _transfer.TransferEngine.run_onboard = _slow_onboard
except ImportError:
    pass
