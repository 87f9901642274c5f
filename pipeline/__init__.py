"""scan-pipe library: feature store, vocabulary, models, training, evaluation, reports.

Importable and pure: nothing in here imports `stages` (the application) or knows about DVC.
"""

__version__ = "0.1.0"
