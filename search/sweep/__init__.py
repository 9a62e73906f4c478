"""Running sweeps: storages, the queue of trials, lost workers, the worker loop and pool."""
