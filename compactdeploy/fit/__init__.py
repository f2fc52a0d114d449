"""The loop: per-layer widths chosen against latency measured on the target, under a budget.

costs.py measures what each layer costs at each width on the device (a cached table), allocate.py
reads the model's groups and their importance and walks from the full model down the table,
search.py builds and measures the picks until one meets the budget (state.py keeps them for
--resume), budgets.py parses the budgets, report.py and plots.py describe the result.
"""

from .budgets import Budget, parse_latency_budget, parse_memory_budget
from .search import FitResult, NoModelWithin, check_fit_options, record_final_over, search

__all__ = ["Budget", "FitResult", "NoModelWithin", "check_fit_options", "parse_latency_budget", "parse_memory_budget",
           "record_final_over", "search"]
