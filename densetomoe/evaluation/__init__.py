"""Evaluation, all of it: what a converted model keeps and what it costs.

* :mod:`.quick`: the fidelity check every conversion runs against the dense outputs (``QuickReport``);
* :mod:`.command`: ``densetomoe eval`` (:func:`~.command.evaluate`): suites, the top-k sweep, routing,
  speed, and the llama.cpp row (:mod:`.served`);
* :mod:`.costs`: FLOPs (one formula, :func:`~.costs.ffn_flops`), parameters and timing;
* :mod:`.metrics`: perplexity by sliding windows, chrF/BLEU, expert load;
* :mod:`.report`: the report's schema, ``report.md`` and its figures;
* :mod:`.suites`: the shipped evaluation suites.

The modules sit on different floors of the house (``tests/test_structure.py``): metrics and costs
low, so that data and llama.cpp can use them; the command on top.
"""
