"""The contract shared by the API shim and the workers: settings, tables, request and message models."""
