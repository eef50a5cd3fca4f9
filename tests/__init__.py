"""The test suite: real servers on free loopback ports, started and stopped by the tests."""
