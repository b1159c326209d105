"""Side-by-side speed benchmark of resnet_flax against torchvision: ``python -m benchmarks``.

Each implementation runs in its own worker process (so its peak memory is its own), the parent alternates
single timed calls between them (so both see the same machine state), and the results go to a table and a
JSON file. See benchmarks/README.md for the numbers on the development machine and what each lever bought.
"""
