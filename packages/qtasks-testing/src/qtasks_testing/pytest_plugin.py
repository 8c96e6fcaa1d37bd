"""pytest plugin for qtasks: fixtures for apps, workers and the inline runner."""
