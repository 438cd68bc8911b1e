"""Side-by-side benchmarks (nanogdrt vs the reference library), run from the repository root as
`python -m bench.bench_beam` etc.; they import tests/references.py as `tests.references`."""
