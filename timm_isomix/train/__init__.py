"""Training, validation and checkpoints: the logic behind train.py and validate.py."""
