"""How often a run should save: interval models (``interval.py``, pure), what a run's files measure
(``measure.py``), and the advice that joins them (``advice.py``)."""
