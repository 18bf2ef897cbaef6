"""Trains the autoencoder and writes a versioned artifact for the worker."""
