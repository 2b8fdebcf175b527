"""KVBM as a vLLM v1 KV connector: `kv_connector_module_path` = "kvbm.integrations.vllm.connector" (or the
Dynamo-compatible alias "kvbm.vllm_integration.connector"), `kv_connector` = "KvbmConnector" or "DynamoConnector"."""
