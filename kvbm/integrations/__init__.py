"""Engine integrations. Only kvbm.integrations.vllm imports vllm."""
