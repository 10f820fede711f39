"""Pretraining data: built-in corpus, filters, dedup, decontamination, mixture, packing and loader.

Import the submodules directly (``gemmalab.data.corpus``, ``gemmalab.data.packing``,
``gemmalab.data.mixture``, ``gemmalab.data.loader``); this package imports nothing so that each
stage keeps its own optional dependencies.
"""
