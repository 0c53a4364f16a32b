"""Task tools over one bank: multi-task training, transfer to a new task, unsupervised domain adaptation.

Plain functions on typed configs (`MultiTaskConfig`); the command line only translates flags into them.
"""
