"""Operations tooling: deployment files and the benchmark suite (`python -m ops.bench`)."""
