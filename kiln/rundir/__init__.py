"""The run directory's one owner, split by concern: `layout` (file and directory names,
`RunPaths`, the run states and their exit codes) and `read` (status, metrics from an offset,
anomalies, summary, config, listings). `kiln.runs` is its public face: import from there.
"""
