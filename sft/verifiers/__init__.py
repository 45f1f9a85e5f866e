"""Verifiers: whether an answer follows checkable instructions, without a model or torch.

``instructions`` holds IFEval's instruction checkers (``bind`` an instruction id and its
arguments to a function of the answer text, ``record_checks`` for a record's
``instruction_id_list`` and ``kwargs``, ``followed`` for the judgments); ``text`` the word,
sentence and language counts they use. Data readers, GRPO's rewards, ``sft verify`` and
``sft ifeval`` all judge with these.
"""
