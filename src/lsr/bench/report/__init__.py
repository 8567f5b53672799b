"""The report layer: what a run's rows say. `selection` picks the rows a chart or table shows,
`tables` formats every table, `style` draws every implementation the same way, `plot` and
`side_by_side` draw the charts, `summary` writes the run table and results/README.md, `ship` the
"which one to ship" tables, `compare` two runs' ratios. It reads `lsr.bench.data` (and the noise
rule of `lsr.bench.measure.timing`); it measures nothing.
"""
