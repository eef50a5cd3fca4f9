"""Benchmarks (`make bench`): predict, end to end, training, Knative autoscaling."""
