"""Hydra recipes, installed as swiftkv_train.recipes."""
