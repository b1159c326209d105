"""Side-by-side speed benchmark of resnet_flax against torchvision: ``python -m benchmarks``.

Each implementation runs in its own worker process (so its peak memory is its own), the parent alternates
single timed calls between them (so both see the same machine state), and the results go to a table and a
JSON file and result files (benchmarks/results/). docs/performance.md has the method and the results.
"""
