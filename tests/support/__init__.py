"""Helpers shared by the test suites: real redis-server and gateway processes."""
