"""Reporting: formatting, plotting and writing what the measuring and training code produced
(memory tables, benchmark summaries, training curves, the paper's Tables 3 and 4). Imports only
errors and config from the package, never the code that measures, so every room above may use it."""
