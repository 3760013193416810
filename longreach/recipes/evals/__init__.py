"""Evaluations: held-out perplexity by context length, passkey retrieval, and their tables/JSON/figures."""

from .passkey import build_prompt, greedy_decode, passkey_grid
from .perplexity import perplexity_by_length
from .report import compare_tables, plot_passkey, plot_perplexity, print_results, write_json, write_report

__all__ = ["build_prompt", "compare_tables", "greedy_decode", "passkey_grid", "perplexity_by_length", "plot_passkey",
           "plot_perplexity", "print_results", "write_json", "write_report"]
