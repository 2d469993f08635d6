"""The HTTP shim: validates, authorises and enqueues; answers without waiting on PostgreSQL."""
