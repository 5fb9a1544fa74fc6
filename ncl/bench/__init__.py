"""ncl-bench: sharded Llama and gpt-oss inference over ncl, measured on local ranks and projected onto a
target topology, with K-Perf-style reports (CSV, XLSX, PNG graphs, Markdown).  See ncl.bench.cli."""
