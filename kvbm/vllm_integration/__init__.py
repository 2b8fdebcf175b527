"""Dynamo-compatible module path: kv_connector_module_path = "kvbm.vllm_integration.connector"."""
