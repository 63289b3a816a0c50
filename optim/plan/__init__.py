"""The memory-budget planner: the fastest measured combination of units that fits a memory budget.

`candidates` names the combinations worth measuring on a device, `profile` measures them with the bench runner
(once per machine, device, family, size and steps; re-measured when stale) and keeps the report on disk,
`choose` picks from a profile's rows, and `budget` reads what the user typed ("6GB").
"""
