"""The benchmarks. This top-level folder is installed as the package `liveportrait_triton.benchmarks`
(pyproject.toml `package-dir`), so its modules import the rest of the package relatively; results are written
where `--out` says (committed ones live in benchmarks/results/). See benchmarks/README.md."""
