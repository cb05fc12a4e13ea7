"""fusedopt's CPU benchmark suite: ``python -m bench [--quick | --smoke]`` from the repo root."""
