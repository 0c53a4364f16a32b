"""Tools above the models: the speed benchmark and the model table."""
