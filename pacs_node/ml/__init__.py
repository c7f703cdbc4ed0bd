"""Networks, degradation simulators, training and metrics (no pipeline or network imports).

Each trained model NAME has a module ``pacs_node.ml.<NAME with - as _>`` exposing
``train_main(argv: list[str]) -> int`` and ``eval_main(argv: list[str]) -> int``, called by
``pacs-node models train NAME ...`` and ``pacs-node models eval NAME ...``.
"""
