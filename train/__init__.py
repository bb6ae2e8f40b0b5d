"""Training d2l's DenseNet on Fashion-MNIST or your own data: data sets, the two input
paths, steps, loop, checkpoints, plots, CLI.

Importing it changes no global state: the entry points call `train.host.configure_host()`.
"""
