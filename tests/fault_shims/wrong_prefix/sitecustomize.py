"""Fault injection for the negative control in test_vllm_connector.py (not a mock: the real engine runs).

Put on PYTHONPATH of a vLLM server: every G2 -> G1 onboard reads the host slots one prompt (13 blocks) further
on, i.e. another prefix's KV, as a slot-mapping bug would. The greedy outputs must then differ from the
baseline's: proof that the determinism test can fail.
"""

try:
    import kvbm.mechanism.transfer as _transfer

    _copy = _transfer.copy_g2_to_g1

    def _wrong_prefix(layout, host, block_ids, slots):
        _copy(layout, host, block_ids, [(s + 13) % host.num_slots for s in slots])

    _transfer.copy_g2_to_g1 = _wrong_prefix
except ImportError:
    pass
