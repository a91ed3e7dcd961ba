"""qtrain's Optuna sweeper for Hydra (``hydra/sweeper=qtrain_optuna``; see
``qtrain_optuna_sweeper.py``)."""
