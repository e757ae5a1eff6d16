"""What the tests and the benchmark share: helper processes and small utilities."""
