"""Shared helpers: data files, images, downloads, metrics, devices."""
