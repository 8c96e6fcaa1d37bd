"""Test cases, a pytest plugin and component contract suites for qtasks."""
