"""Throughput / MFU / memory benchmarks of llmjax; recorded results live in benchmarks/results/."""
