"""Names both sides agree on, in a leaf module (stdlib only), so that the scheduler side
imports two strings without importing the worker stack."""

from __future__ import annotations

__all__ = ["EXTENSION", "GPU", "PLUGIN_NAME"]

#: The Dask resource name that stands for GPUs.
GPU = "GPU"
#: The name of both plugins, of the workers' heartbeat metric, and of their RPC operation.
PLUGIN_NAME = "gpuresources"
#: The key of the scheduler extension that holds what outlives a scheduler plugin instance.
EXTENSION = "gpuresources"
