"""Alias of kvbm.integrations.vllm.connector under the module path Dynamo users already pass."""

from kvbm.integrations.vllm.connector import (  # noqa: F401
    DynamoConnector,
    KvbmConnector,
    KvbmConnectorMetadata,
    KvbmWorkerMetadata,
)
