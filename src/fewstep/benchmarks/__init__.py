"""Benchmarks: scripts run as ``python -m fewstep.benchmarks.<name>`` that print a table and write markdown + JSON.

They are measurements, not tests: ``teacher_baselines`` gives the bars (the exact analytic teacher under
Euler/Heun/adaptive solvers) that every distilled student is compared with.
"""
