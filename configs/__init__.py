"""Experiment configs: one shared base (`common.py`) plus one small file per benchmark."""
